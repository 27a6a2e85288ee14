"""Each bundle passes the checks of the MONAI model zoo's CI (its ``ci/verify_bundle.py --mode full``), made here
with MONAI's own bundle tools and offline (the metadata schema is ``bundles/meta_schema.json``, the file the
metadata's ``schema`` URL names): the files a bundle must have, version and changelog, the metadata schema, the
network's input and output shapes from the metadata (``verify_net_in_out``) and a TorchScript export of the
shipped ``models/model.pt`` (``ckpt_export``; not for the detection bundle, whose README says why)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ckpt_export, verify_metadata, verify_net_in_out

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SCHEMA = BUNDLES / "meta_schema.json"
NAMES = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs" / "metadata.json").is_file())


@pytest.mark.parametrize("name", NAMES)
def test_bundle_has_the_files_version_and_metadata_the_model_zoo_requires(name):
    bundle = BUNDLES / name
    for f in ("configs/metadata.json", "LICENSE", "configs/inference.json", "models/model.pt"):
        assert (bundle / f).is_file(), f"{name} lacks {f}"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"], f"{name}: version {meta['version']} has no changelog entry"
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(SCHEMA))  # raises if invalid


@pytest.mark.parametrize("name", NAMES)
def test_network_shapes_and_torchscript_export(name, tmp_path):
    bundle = BUNDLES / name
    common = {"net_id": "network_def", "meta_file": str(bundle / "configs" / "metadata.json"),
              "config_file": str(bundle / "configs" / "inference.json"), "bundle_root": str(bundle)}
    verify_net_in_out(device="cpu", **common)  # the metadata's input / output shapes, in train and eval mode
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    if meta["network_data_format"]["outputs"]["pred"]["format"] == "detection":
        pytest.skip(f"{name}: the detector's forward records the anchors its loss and box selection read, a side "
                    "effect TorchScript drops (see its docs/README.md, 'Not here')")
    ts = tmp_path / "model.ts"
    ckpt_export(filepath=str(ts), ckpt_file=str(bundle / "models" / "model.pt"), **common)
    assert ts.is_file() and ts.stat().st_size > 0
