"""Dictionary transforms shared by the tasks' inference configs."""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping

from monai.config import KeysCollection
from monai.transforms import MapTransform

from amat_monai.checkpoints import atomic_write_text

__all__ = ["SaveResultd"]


class SaveResultd(MapTransform):
    """Write each item's JSON ``result`` to ``<output_dir>/<name><suffix>.json``, atomically.

    ``<name>`` is the stem of the image file (``image_key``'s ``filename_or_obj`` metadata, else the item's
    ``sample_id``); the file holds ``{"image": <source>, **result}``.
    """

    def __init__(self, keys: KeysCollection = "result", output_dir: str = "./eval", suffix: str = "_result",
                 image_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.suffix, self.image_key = output_dir, suffix, image_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        meta = getattr(d.get(self.image_key), "meta", None) or {}
        source = meta.get("filename_or_obj") or d.get("sample_id") or "image"
        stem = os.path.basename(str(source)).split(".")[0]
        for key in self.key_iterator(d):
            path = os.path.join(self.output_dir, f"{stem}{self.suffix}.json")
            atomic_write_text(path, json.dumps({"image": str(source), **d[key]}, indent=2) + "\n")
        return d
