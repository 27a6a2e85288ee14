"""Label writer for the MONAI Label app: MONAI's own image writers instead of MONAI Label's ITK writer.

MONAI Label 0.8.5 writes every non-NIfTI label with ``itk``; this app does not install ``itk`` (see
:mod:`amat_monai.label.compat`), so labels are written with MONAI's ``NibabelWriter`` (NIfTI, 2D or 3D, keeping the
image's affine) or ``PILWriter`` (2D images served as PNG / JPEG / BMP / TIFF come back as a PNG label).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from monai.data.image_writer import NibabelWriter, PILWriter

__all__ = ["PIL_SUFFIXES", "label_suffix", "write_label"]

#: image suffixes whose labels are written as PNG by ``PILWriter``.
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def label_suffix(image_path: str | None, spatial_ndim: int) -> str:
    """The suffix of the label file written for ``image_path``: ``.png`` for 2D PIL images, else ``.nii.gz``."""
    name = (image_path or "").lower()
    if spatial_ndim == 2 and name.endswith(PIL_SUFFIXES):
        return ".png"
    return ".nii.gz"


def write_label(
    label: np.ndarray | torch.Tensor, image_path: str | None, spatial_ndim: int, affine=None
) -> str:
    """Write an integer label array to a new temporary file and return its path.

    Args:
        label: the label, ``spatial_ndim`` spatial dimensions with an optional leading channel of size 1, in the
            array order MONAI's loader gave the image (so that the file lines up with the image).
        image_path: the image the label belongs to; its suffix chooses the format (:func:`label_suffix`).
        spatial_ndim: 2 or 3.
        affine: the image's affine (NIfTI only); identity when None.

    Raises:
        ValueError: if the label has more than one channel or the wrong number of dimensions, or does not fit in
            8 bits for a PNG.
    """
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if array.ndim == spatial_ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != spatial_ndim:
        raise ValueError(f"expected a single-channel {spatial_ndim}D label, got shape {tuple(array.shape)}")
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise ValueError("the label holds non-integer values; the bundle's postprocessing must end with a discrete map")

    suffix = label_suffix(image_path, spatial_ndim)
    if suffix == ".png":
        if array.min() < 0 or array.max() > 255:
            raise ValueError(f"label values {array.min()}..{array.max()} do not fit in an 8-bit PNG")
        writer = PILWriter(output_dtype=np.uint8, scale=None)  # label values as they are, not rescaled
        writer.set_data_array(array.astype(np.uint8), channel_dim=None)
        writer.set_metadata({"spatial_shape": array.shape})
    else:
        writer = NibabelWriter(output_dtype=np.uint8 if array.min() >= 0 and array.max() <= 255 else np.int16)
        writer.set_data_array(array, channel_dim=None)
        if isinstance(affine, torch.Tensor):
            affine = affine.detach().cpu().numpy()
        writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="amat-label-")
    os.close(fd)
    try:
        writer.write(path, verbose=False)
    except BaseException:
        os.remove(path)
        raise
    return path
