"""The weights shipped in ``bundles/<name>/models/`` are the models whose numbers ``docs/RESULTS.md`` reports:
the same files (sha256 recorded by the evaluation), loadable with ``weights_only=True`` into the bundle's
inference network, with the ``xi.json`` AMAT was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from amat_monai.checkpoints import file_sha256

ROOT = Path(__file__).resolve().parents[1]
#: task name in docs/results -> (bundle folder, number of loss terms, hence of ξ values)
SHIPPED = {"hippocampus": ("hippocampus_seg", 2), "ceph": ("ceph_landmarks", 3), "bccd": ("bccd_detection", 3)}
#: the tasks whose bundles ship attack detectors (none for detection: see bundles/bccd_detection/docs/README.md)
WITH_DETECTORS = ("ceph", "hippocampus")


def _evaluations(results: Path) -> list[Path]:
    """The test-split robustness.json files: the baseline reproduction's and the margin study's."""
    return [*results.glob("*/robustness.json"), *results.glob("margins/test/*/robustness.json")]


def _shipped(task: str) -> tuple[Path, Path]:
    bundle = ROOT / "bundles" / SHIPPED[task][0]
    if not (bundle / "models" / "model.pt").is_file():
        pytest.skip(f"{bundle.name} ships no models/model.pt yet (scripts/reproduce.py --ship)")
    return bundle, ROOT / "docs" / "results" / task


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_shipped_weights_are_the_evaluated_ones(task):
    bundle, results = _shipped(task)
    models = bundle / "models"
    vats = sorted((models / "baselines").glob("vat*.pt"))
    assert len(vats) == 1, f"expected the best VAT model only in {models / 'baselines'}, found {vats}"
    # which evaluated run each shipped file is, found by the sha256 its robustness.json recorded
    evaluated = {json.loads(f.read_text())["checkpoint_sha256"]: f.parent.name for f in _evaluations(results)}
    shipped = {path: evaluated.get(file_sha256(path)) for path in (models / "model.pt", models / "baselines" / "std.pt", vats[0])}
    assert (shipped[models / "model.pt"] or "").startswith("AMAT"), shipped
    assert shipped[models / "baselines" / "std.pt"] == "STD" and shipped[vats[0]] == vats[0].stem.upper(), shipped

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    for path in shipped:
        network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)

    xi = json.loads((models / "xi.json").read_text())
    assert xi["checkpoint_sha256"] == file_sha256(bundle / xi["checkpoint"]), "ξ was calibrated on another model"
    assert len(xi["xi"]) == SHIPPED[task][1] and all(v > 0 for v in xi["xi"])
    # docs/RESULTS.md reports the ξ AMAT was trained with (the margin study's table lists every threshold of it)
    values = [xi["terms"][0]["xi"]]
    if (results / "MARGINS.md").is_file():
        values += [xi["total"]["xi"]] + ([xi["metric"]["xi"]] if xi.get("metric") else [])
    reported = (ROOT / "docs" / "RESULTS.md").read_text()
    assert all(f"{v:.4f}" in reported for v in values), f"docs/RESULTS.md names another ξ than {values}"


@pytest.mark.parametrize("task", sorted(SHIPPED))
def test_metadata_eval_metrics_are_the_shipped_models_numbers(task):
    bundle, results = _shipped(task)
    reports = {json.loads(f.read_text())["checkpoint_sha256"]: json.loads(f.read_text()) for f in _evaluations(results)}
    report = reports[file_sha256(bundle / "models" / "model.pt")]
    metrics = json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]
    clean, pgd, ifgsm = metrics.values()  # the clean metric, then the PGD and IFGSM averages
    assert (clean, pgd, ifgsm) == pytest.approx(
        (report["clean"], report["averages"]["pgd"], report["averages"]["ifgsm"]), abs=5e-5)


@pytest.mark.parametrize("task", WITH_DETECTORS)
def test_shipped_detectors_belong_to_the_shipped_models_and_their_reported_numbers(task):
    from amat_monai.attack_detection import FeatureDensityDetector, detector_paths

    bundle, results = _shipped(task)
    study = json.loads((results / "detection" / "study.json").read_text())["detection"]
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    network = parser.get_parsed_content("network_def")
    for name, model in (("AMAT", bundle / "models" / "model.pt"), ("STD", bundle / "models" / "baselines" / "std.pt")):
        npz, js = detector_paths(model)
        # refuses a detector of other weights; loads the statistics with allow_pickle=False
        detector = FeatureDensityDetector.load(network, npz, js, model)
        assert detector.thresholds and detector.provenance["fit_cases"], js
        reported = study[name]["detector"]
        assert reported["checkpoint_sha256"] == file_sha256(model), f"{name}: the report measured another model"
        assert reported["thresholds"] == pytest.approx(detector.thresholds), f"{name}: the report used other thresholds"
