"""Box results for MONAI Label: the detection bundle's JSON boxes, checked, and a label map of their outlines.

A detection bundle decodes the detector's output in ``postprocessing`` with
:class:`amat_monai.object_detection.DetectBoxesd`, which leaves ``result``, the JSON returned by MONAI Label:
``{"boxes": [{"label", "name", "score", "x1", "y1", "x2", "y2"}, ...]}`` in the served image's pixels. This module
checks that JSON and draws the boxes' outlines on the served image's grid, for viewers. No MONAI Label import.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BOX_DECODER", "check_box_result", "box_label_map"]

#: the transform that marks a bundle as a detection bundle
BOX_DECODER = "DetectBoxesd"


def check_box_result(result: Any, num_classes: int | None = None) -> list[dict]:
    """Check the decoder's JSON ``result`` and return its box list (which may be empty: nothing detected).

    Raises:
        ValueError: if it has no ``boxes`` list, a box lacks a finite corner or score, has ``x2 < x1`` or
            ``y2 < y1``, or a label outside ``0..num_classes - 1``.
    """
    boxes = result.get("boxes") if isinstance(result, Mapping) else None
    if not isinstance(boxes, list):
        raise ValueError(f"the detection bundle's postprocessing left no 'boxes' list in 'result': {result!r}")
    for item in boxes:
        values = {f: item.get(f) if isinstance(item, Mapping) else None for f in ("x1", "y1", "x2", "y2", "score")}
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values()):
            raise ValueError(f"box {item!r}: corners and score must be finite numbers")
        if values["x2"] < values["x1"] or values["y2"] < values["y1"]:
            raise ValueError(f"box {item!r}: x2 < x1 or y2 < y1")
        label = item.get("label")
        if not isinstance(label, int) or label < 0 or (num_classes is not None and label >= num_classes):
            raise ValueError(f"box {item!r}: label must be a class index below {num_classes}")
    return boxes


def box_label_map(boxes: list[dict], width: int, height: int, thickness: int = 2) -> np.ndarray:
    """A ``uint8`` label map of shape ``(width, height)`` (MONAI's x-first order for 2D images) with each box's
    outline, ``thickness`` pixels wide inside the box, drawn with value ``label + 1``.

    Corners are 0-based half-open pixel coordinates (:func:`amat_monai.object_detection.detections_json`), clipped
    to the image; boxes are drawn lowest score first, so the most confident box wins where outlines cross.
    """
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    out = np.zeros((width, height), dtype=np.uint8)
    for item in sorted(boxes, key=lambda b: b["score"]):
        x1, y1 = max(int(math.floor(item["x1"])), 0), max(int(math.floor(item["y1"])), 0)
        x2, y2 = min(int(math.ceil(item["x2"])), width), min(int(math.ceil(item["y2"])), height)
        if x2 <= x1 or y2 <= y1:
            continue  # outside the image
        value = int(item["label"]) + 1
        t = min(thickness, x2 - x1, y2 - y1)
        out[x1:x2, y1:y1 + t] = out[x1:x2, y2 - t:y2] = value
        out[x1:x1 + t, y1:y2] = out[x2 - t:x2, y1:y2] = value
    return out
