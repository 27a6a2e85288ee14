"""The weights shipped in ``bundles/<name>/models/`` are the models whose numbers ``docs/RESULTS.md`` reports:
the same files (sha256 recorded by the evaluation), loadable with ``weights_only=True`` into the bundle's
inference network, with the ``xi.json`` AMAT was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from amat_monai.calibration import file_sha256

ROOT = Path(__file__).resolve().parents[1]
#: task name in docs/results -> (bundle folder, number of loss terms, hence of ξ values)
SHIPPED = {"hippocampus": ("hippocampus_seg", 2), "ceph": ("ceph_landmarks", 3)}


def _shipped(task: str) -> tuple[Path, Path]:
    bundle = ROOT / "bundles" / SHIPPED[task][0]
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip(f"{bundle.name} ships no models/model.pt yet (scripts/reproduce.py --ship)")
    return bundle, ROOT / "docs" / "results" / task


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_weights_are_the_evaluated_ones(task):
    bundle, results = _shipped(task)
    models = bundle / "models"
    files = {"AMAT": models / "model.pt", "STD": models / "baselines" / "std.pt"}
    vats = sorted((models / "baselines").glob("vat*.pt"))
    assert len(vats) == 1, f"expected the best VAT model only in {models / 'baselines'}, found {vats}"
    files[vats[0].stem.upper()] = vats[0]

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    for method, path in files.items():
        report = json.loads((results / method / "robustness.json").read_text())
        assert file_sha256(path) == report["checkpoint_sha256"], f"{path} is not the model evaluated as {method}"
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)

    xi = json.loads((models / "xi.json").read_text())
    assert len(xi["xi"]) == SHIPPED[task][1] and all(v > 0 for v in xi["xi"])
    assert f"{xi['terms'][0]['xi']:.4f}" in (results / "RESULTS.md").read_text(), "RESULTS.md names another ξ"
