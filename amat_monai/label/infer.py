"""MONAI Label inference tasks for the project's local bundles.

Both tasks are MONAI Label's own ``BundleInferTask`` (which reads ``configs/inference.json``: ``network_def``,
``preprocessing``, ``inferer``, ``postprocessing``; ``configs/metadata.json``; ``models/model.pt``) with these
changes: a bundle that cannot be served raises instead of being skipped with a warning, weights are loaded
strictly, the postprocessing's save transforms (:data:`SAVE_TRANSFORMS`) are dropped, a bundle whose inferer is
a ``SliceInferer`` (a 2D network run over 3D volumes) reports dimension 3, and results are written by
:func:`amat_monai.label.writer.write_label` (MONAI's writers, no ITK). A bundle that ships the attack detector of
its model (``models/detector.json`` + ``detector.npz``, from ``amat-monai detector fit``) adds its verdict to every
result: ``{"adversarial": {"score", "threshold", "flag", "squeeze": {...}}}`` (the feature-density detector's
verdict, and the squeeze baseline's under ``squeeze``), with per-slice lists for volumes
(:func:`amat_monai.attack_detection.screen`).
Import this module only in the MONAI Label server process (after :func:`amat_monai.label.compat.install`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import SaveImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask

from amat_monai.attack_detection import FeatureDensityDetector, detector_paths, screen, squeeze_baseline
from amat_monai.checkpoints import file_sha256, read_json
from amat_monai.label.detection import BOX_DECODER, box_label_map, check_box_result
from amat_monai.label.landmarks import check_landmark_result, find_decoder, landmark_label_map, to_image_grid
from amat_monai.label.writer import write_label
from amat_monai.object_detection import DetectBoxesd
from amat_monai.transforms import SaveResultd

__all__ = ["SAVE_TRANSFORMS", "AmatBundleInferTask", "LandmarkBundleInferTask", "DetectionBundleInferTask",
           "bundle_task", "check_bundle"]

#: postprocessing transforms dropped when serving: results go back to the client, not into the bundle folder
#: (``SaveResultd`` covers the landmark bundles' ``SaveLandmarksd``)
SAVE_TRANSFORMS = [SaveImaged, SaveResultd]


def check_bundle(path: str) -> dict:
    """Check that ``path`` is a servable bundle and return its ``configs/metadata.json``.

    Raises:
        FileNotFoundError: naming the first missing file (``models/model.pt`` comes from training).
        ValueError: if the metadata lacks the ``image`` input / ``pred`` output that MONAI Label reads, or its
            ``channel_def`` keys are not channel numbers (MONAI Label turns them into label values).
    """
    for rel in ("configs/inference.json", "configs/metadata.json", "models/model.pt"):
        if not os.path.isfile(os.path.join(path, rel)):
            hint = " (train the bundle, or copy its trained weights there)" if rel.endswith("model.pt") else ""
            raise FileNotFoundError(f"bundle {path}: missing {rel}{hint}")
    meta_file = os.path.join(path, "configs", "metadata.json")
    with open(meta_file) as f:
        metadata = json.load(f)
    fmt = metadata.get("network_data_format", {})
    if "image" not in fmt.get("inputs", {}) or "pred" not in fmt.get("outputs", {}):
        raise ValueError(f"{meta_file}: network_data_format needs input 'image' and output 'pred'")
    bad = [k for k in fmt["outputs"]["pred"].get("channel_def", {}) if not str(k).isdigit()]
    if bad:
        raise ValueError(f"{meta_file}: outputs.pred.channel_def keys must be channel numbers, got {bad}")
    return metadata


def _image_meta(data: dict[str, Any], key: str) -> dict:
    value = data.get(key)
    return dict(value.meta) if isinstance(value, MetaTensor) else dict(data.get(f"{key}_meta_dict") or {})


def _spatial_shape(data: dict[str, Any], key: str) -> tuple[int, ...]:
    """The served image's spatial shape as loaded (x first), before the bundle's preprocessing changed it."""
    shape = _image_meta(data, key).get("spatial_shape")
    if shape is None:
        raise ValueError(f"the loaded {key!r} carries no spatial_shape; the bundle must load it with LoadImaged")
    return tuple(int(s) for s in np.asarray(shape).reshape(-1))


def _affine(data: dict[str, Any], key: str):
    meta = data.get(f"{key}_meta_dict")
    if meta and meta.get("affine") is not None:
        return meta["affine"]
    value = data.get(key)
    return value.affine if isinstance(value, MetaTensor) else None


def _detector_files(path: str) -> tuple[str, str] | None:
    """The bundle's detector files, checked against ``models/model.pt``; ``None`` when it ships none.

    Raises:
        ValueError: the detector was fitted on other weights than the bundle's model.
    """
    model = os.path.join(path, "models", "model.pt")
    npz, js = detector_paths(model)
    if not js.is_file():
        return None
    if not npz.is_file():
        raise FileNotFoundError(f"bundle {path}: {js.name} names statistics {npz} that do not exist")
    sha = read_json(js).get("checkpoint_sha256")
    if sha != file_sha256(model):
        raise ValueError(f"bundle {path}: {js} was fitted on other weights than models/model.pt (sha256 "
                         f"{str(sha)[:12]}…); fit it again with `amat-monai detector fit` or remove it")
    return str(npz), str(js)


class AmatBundleInferTask(BundleInferTask):
    """A local bundle served as a segmentation model: ``/infer/<name>`` returns the label image."""

    #: where :meth:`run_inferer` leaves the attack detector's verdict for the writer
    verdict_key = "adversarial"

    def __init__(self, path: str, conf: dict[str, str], **kwargs) -> None:
        metadata = check_bundle(path)
        kwargs.setdefault("type", InferType.SEGMENTATION)
        kwargs.setdefault("post_filter", SAVE_TRANSFORMS)
        super().__init__(path, conf, load_strict=True, **kwargs)
        if not self.is_valid():
            raise ValueError(f"bundle {path}: MONAI Label could not load it (see the log above)")
        spatial_shape = metadata["network_data_format"]["inputs"]["image"].get("spatial_shape") or []
        if len(spatial_shape) not in (2, 3):
            raise ValueError(f"bundle {path}: metadata input 'image' needs a 2D or 3D spatial_shape")
        inferer = self.bundle_config.get("inferer") or {}
        target = inferer.get("_target_", "") if isinstance(inferer, dict) else ""
        self.slice_dim: int | None = None
        if isinstance(target, str) and target.rsplit(".", 1)[-1] == "SliceInferer":
            self.dimension = len(spatial_shape) + 1  # a 2D network run slice by slice serves volumes
            self.slice_dim = int(inferer.get("spatial_dim", 0))
        self.detector_files = _detector_files(path)
        self._detector: FeatureDensityDetector | None = None
        self._baseline = None

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        data = super().run_inferer(data, convert_to_batch, device)
        if self.detector_files is not None:
            network = self._get_network(device, data)
            if self._detector is None or self._detector.network is not network:
                npz, js = self.detector_files
                self._detector = FeatureDensityDetector.load(network, npz, js)
                self._baseline = squeeze_baseline(network, self._detector.provenance)
            image = torch.as_tensor(data[self.input_key])
            data[self.verdict_key] = screen(self._detector, image, self.slice_dim, baseline=self._baseline)
        return data

    def result_json(self, data: dict[str, Any]) -> dict[str, Any]:
        """The JSON part of the result: the postprocessing's, with the attack detector's verdict when there is one."""
        result = dict(data.get(self.output_json_key) or {})
        if data.get(self.verdict_key) is not None:
            result[self.verdict_key] = data[self.verdict_key]
        return result

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        ndim = len(_spatial_shape(data, self.key_image))
        path = write_label(data[self.key_pred], data.get("image_path"), ndim, _affine(data, self.key_pred))
        return path, self.result_json(data)


class LandmarkBundleInferTask(AmatBundleInferTask):
    """A local landmark bundle: the JSON result holds the landmarks, the image is a small label map.

    The bundle's postprocessing must decode with :class:`amat_monai.landmarks.DecodeLandmarksd` (see
    :mod:`amat_monai.label.landmarks`). The label map has the served image's grid, with a disc of radius
    ``label_radius`` pixels and value ``k + 1`` at landmark ``k``.
    """

    label_radius = 3
    #: where the decoder leaves the ``[K, 2]`` (x, y) coordinates in original pixels
    coords_key = "landmarks"

    def __init__(self, path: str, conf: dict[str, str], decoder_id: str, **kwargs) -> None:
        super().__init__(path, conf, add_post_restore=False, **kwargs)
        names_id = f"{decoder_id}#names"
        names = self.bundle_config.get_parsed_content(names_id) if names_id in self.bundle_config else None
        if not names:
            channels = int(self._metadata(path)["network_data_format"]["outputs"]["pred"]["num_channels"])
            names = [f"landmark {i + 1}" for i in range(channels // 3)]  # the decoder's own default names
        self.landmark_names = [str(n) for n in names]
        if len(set(self.landmark_names)) != len(self.landmark_names):
            raise ValueError(f"bundle {path}: {names_id} has duplicate names")
        self.labels = {name: i + 1 for i, name in enumerate(self.landmark_names)}

    @staticmethod
    def _metadata(path: str) -> dict:
        with open(os.path.join(path, "configs", "metadata.json")) as f:
            return json.load(f)

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        result = self.result_json(data)
        check_landmark_result(result, len(self.landmark_names))
        coords = data.get(self.coords_key)
        if coords is None:
            raise ValueError(f"the landmark bundle's postprocessing left no {self.coords_key!r} coordinates")
        shape = _spatial_shape(data, self.key_image)
        if len(shape) != 2:
            raise ValueError(f"landmark bundles serve 2D images, got an image of spatial shape {shape}")
        width, height = shape
        original = result.get("original_size", data.get("original_size"))
        image_xy = to_image_grid(coords, original, (height, width))
        label_map = landmark_label_map(image_xy, width, height, self.label_radius)
        path = write_label(label_map, data.get("image_path"), 2, _affine(data, self.key_image))
        result["label_map"] = {"radius_px": self.label_radius, "values": dict(self.labels)}
        return path, result


class DetectionBundleInferTask(AmatBundleInferTask):
    """A local detection bundle: the JSON result holds the boxes, the image is a label map of their outlines.

    The bundle's postprocessing must decode with :class:`amat_monai.object_detection.DetectBoxesd` (see
    :mod:`amat_monai.label.detection`); the boxes are in the served image's pixels. The label map has the served
    image's grid, with each box's outline (``outline_px`` wide) of value ``label + 1``. The task is served through
    MONAI Label's segmentation path (a label image plus JSON, ``output=json`` for the JSON alone): its own detection
    path expects 3D boxes for 3D Slicer.
    """

    outline_px = 2

    def __init__(self, path: str, conf: dict[str, str], decoder_id: str, **kwargs) -> None:
        # MONAI Label would take a bundle named "...detection" for its 3D box pipeline; the type is set here. The
        # bundle's decoder is replaced by one on the served network (the config's holds another instance, whose
        # anchors no forward pass has set)
        super().__init__(path, conf, add_post_restore=False, type=InferType.SEGMENTATION,
                         post_filter=[*SAVE_TRANSFORMS, DetectBoxesd], **kwargs)
        parsed = {k: self.bundle_config.get_parsed_content(f"{decoder_id}#{k}") if f"{decoder_id}#{k}" in self.bundle_config
                  else None for k in ("classes", "zoom")}
        if not parsed["classes"]:
            raise ValueError(f"bundle {path}: {decoder_id}#classes must list the class names")
        self.class_names = [str(c) for c in parsed["classes"]]
        self.zoom = [float(z) for z in parsed["zoom"] or (1.0, 1.0)]
        self.labels = {name: i + 1 for i, name in enumerate(self.class_names)}

    def run_inferer(self, data: dict[str, Any], convert_to_batch=True, device="cuda"):
        data = super().run_inferer(data, convert_to_batch, device)
        decoder = DetectBoxesd(self.output_label_key, self._get_network(device, data), self.class_names, self.zoom)
        return decoder(data)

    def writer(self, data: dict[str, Any], extension=None, dtype=None) -> tuple[Any, Any]:
        result = self.result_json(data)
        boxes = check_box_result(result, len(self.class_names))
        shape = _spatial_shape(data, self.key_image)
        if len(shape) != 2:
            raise ValueError(f"detection bundles serve 2D images, got an image of spatial shape {shape}")
        label_map = box_label_map(boxes, shape[0], shape[1], self.outline_px)
        path = write_label(label_map, data.get("image_path"), 2, _affine(data, self.key_image))
        result["label_map"] = {"outline_px": self.outline_px, "values": dict(self.labels)}
        return path, result


def bundle_task(path: str, conf: dict[str, str]) -> AmatBundleInferTask:
    """The task serving the bundle at ``path``: landmarks or boxes when its postprocessing decodes them, else
    segmentation."""
    check_bundle(path)
    parser = ConfigParser()
    parser.read_config(os.path.join(path, "configs", "inference.json"))
    decoder_id = find_decoder(parser)
    if decoder_id is not None:
        return LandmarkBundleInferTask(path, conf, decoder_id=decoder_id)
    decoder_id = find_decoder(parser, name=BOX_DECODER)
    if decoder_id is not None:
        return DetectionBundleInferTask(path, conf, decoder_id=decoder_id)
    return AmatBundleInferTask(path, conf)
