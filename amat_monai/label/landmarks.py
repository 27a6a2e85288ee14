"""Landmark results for MONAI Label: the bundle's JSON landmarks, checked, and a small label map.

A landmark bundle decodes its maps in ``postprocessing`` with :class:`amat_monai.landmarks.DecodeLandmarksd`, which
leaves ``landmarks`` (``[K, 2]`` as ``(x, y)`` in ORIGINAL pixel units) and ``result``, the JSON returned by MONAI
Label: ``{"landmarks": [{"id", "name", "x", "y", "x_mm", "y_mm"}, ...], "original_size": [H, W], ...}``. This
module finds that transform in a bundle config, checks the JSON, and draws the label map on the served image's
grid (the original grid is mapped to it with pixel centres aligned). No MONAI Label import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from amat_monai.landmarks import map_coordinates

__all__ = ["DECODER", "check_landmark_result", "find_decoder", "landmark_label_map", "to_image_grid"]

#: the transform that marks a bundle as a landmark bundle
DECODER = "DecodeLandmarksd"


def find_decoder(config: Any, key: str = "postprocessing", name: str = DECODER) -> str | None:
    """The config id of the ``name`` transform (the landmark :data:`DECODER` unless told) in ``config[key]`` (a
    ``Compose`` or a list), or None.

    Args:
        config: a ``monai.bundle.ConfigParser`` (or anything indexable by ids such as ``"postprocessing#transforms"``).
        key: the id of the postprocessing.
        name: the transform's class name (the last part of its ``_target_``).
    """
    if key not in config:
        return None
    post = config[key]
    if isinstance(post, Mapping):
        items, prefix = post.get("transforms", []), f"{key}#transforms"
    else:
        items, prefix = post, key
    for i, item in enumerate(items if isinstance(items, list) else []):
        target = item.get("_target_", "") if isinstance(item, Mapping) else ""
        if isinstance(target, str) and target.rsplit(".", 1)[-1] == name:
            return f"{prefix}#{i}"
    return None


def check_landmark_result(result: Any, num_landmarks: int | None = None) -> list[dict]:
    """Check the decoder's JSON ``result`` and return its landmark list.

    Raises:
        ValueError: if it has no ``landmarks`` list (of ``num_landmarks`` entries when given), or an entry lacks a
            finite ``x``, ``y``, ``x_mm`` or ``y_mm``.
    """
    landmarks = result.get("landmarks") if isinstance(result, Mapping) else None
    if not isinstance(landmarks, list) or not landmarks:
        raise ValueError(f"the landmark bundle's postprocessing left no 'landmarks' list in 'result': {result!r}")
    if num_landmarks is not None and len(landmarks) != num_landmarks:
        raise ValueError(f"expected {num_landmarks} landmarks, the bundle returned {len(landmarks)}")
    for item in landmarks:
        for field in ("x", "y", "x_mm", "y_mm"):
            value = item.get(field) if isinstance(item, Mapping) else None
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"landmark {item!r}: {field} is not a finite number")
    return landmarks


def to_image_grid(coords: Any, original_size: Sequence[int] | None, image_size: Sequence[int]) -> np.ndarray:
    """Map ``(x, y)`` original-pixel coordinates ``[K, 2]`` to the served image's grid ``image_size = (H, W)``."""
    coords = np.asarray(coords.detach().cpu() if hasattr(coords, "detach") else coords, dtype=np.float64)
    if original_size is None:
        return coords
    original = np.asarray(original_size.detach().cpu() if hasattr(original_size, "detach") else original_size)
    return np.asarray(map_coordinates(coords, original.reshape(-1)[:2].tolist(), list(image_size)))


def landmark_label_map(coords_xy: np.ndarray, width: int, height: int, radius: int = 3) -> np.ndarray:
    """A ``uint8`` label map of shape ``(width, height)`` (MONAI's x-first array order for 2D images) with a disc
    of value ``k + 1`` and radius ``radius`` pixels around landmark ``k``.

    Coordinates are ``(x, y)`` pixels of the served image, rounded to the nearest pixel; a landmark outside the
    image draws only the part of its disc inside (or nothing). Where discs overlap the later landmark wins.
    """
    coords = np.asarray(coords_xy, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"expected (x, y) coordinates of shape [K, 2], got {coords.shape}")
    if coords.shape[0] > 255:
        raise ValueError("at most 255 landmarks fit in a uint8 label map")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    xs, ys = np.meshgrid(np.arange(width), np.arange(height), indexing="ij")
    out = np.zeros((width, height), dtype=np.uint8)
    for k, (x, y) in enumerate(np.round(coords)):
        out[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = k + 1
    return out
