"""The detectors of attacked inputs (:mod:`amat_monai.attack_detection`): the statistics on hand-computed cases, a
fitted detector on a constructed outlier, the files, and ``amat-monai detector fit / evaluate`` on both bundles."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from amat_monai import cli
from amat_monai.attack_detection import (
    AdaptiveLoss,
    DetectorAwareModel,
    FeatureDensityDetector,
    ShrunkGaussian,
    SqueezeDisagreement,
    fit_detectors,
    ledoit_wolf,
    load_detectors,
    per_volume_max,
    roc_auc,
    threshold_at,
)
from amat_monai.data import make_synthetic_ceph, make_synthetic_decathlon
from conftest import PROJECT_ROOT, SEG_TINY

SEG = PROJECT_ROOT / "bundles" / "hippocampus_seg"
CEPH = PROJECT_ROOT / "bundles" / "ceph_landmarks"


def _overrides(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--override", f"{k}={json.dumps(v)}")]


# ------------------------------------------------------------------ statistics
def test_mahalanobis_matches_a_hand_computation():
    gaussian = ShrunkGaussian(torch.tensor([1.0, 2.0]), torch.tensor([[2.0, 0.5], [0.5, 1.0]]))
    # diff (1, 2): 2·1·1 + 2·0.5·1·2 + 1·2·2 = 8; diff (0, 0): 0; diff (-1, 0): 2
    d2 = gaussian.mahalanobis(torch.tensor([[2.0, 4.0], [1.0, 2.0], [0.0, 2.0]]))
    assert torch.allclose(d2, torch.tensor([8.0, 0.0, 2.0]))


def test_ledoit_wolf_matches_the_papers_definition():
    x = torch.randn(12, 5, dtype=torch.float64) * torch.tensor([3.0, 1.0, 1.0, 0.5, 0.2], dtype=torch.float64)
    mean, shrunk, s = ledoit_wolf(x)
    # the paper's quantities, by explicit sums over samples
    xc = (x - x.mean(0)).numpy()
    n, d = xc.shape
    cov = sum(np.outer(r, r) for r in xc) / n
    m = np.trace(cov) / d
    d2 = np.sum((cov - m * np.eye(d)) ** 2) / d
    b2 = min(sum(np.sum((np.outer(r, r) - cov) ** 2) for r in xc) / n**2 / d, d2)
    assert s == pytest.approx(b2 / d2)
    assert np.allclose(shrunk.numpy(), (1 - b2 / d2) * cov + (b2 / d2) * m * np.eye(d))
    assert torch.allclose(mean, x.mean(0))


def test_ledoit_wolf_keeps_an_isotropic_sample_and_stays_invertible_with_few_samples():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    _, shrunk, s = ledoit_wolf(x)
    assert s == 0.0 and torch.allclose(shrunk, 0.5 * torch.eye(2, dtype=torch.float64))
    few = torch.randn(5, 20)
    _, shrunk, s = ledoit_wolf(few)
    assert 0.0 < s <= 1.0 and torch.linalg.matrix_rank(shrunk) == 20  # the raw covariance has rank 4


def test_roc_auc_and_thresholds_by_hand():
    assert roc_auc([0, 1], [2, 3]) == 1.0 and roc_auc([2, 3], [0, 1]) == 0.0
    assert roc_auc([1], [1]) == 0.5
    assert roc_auc([0, 2], [1, 3]) == 0.75  # 3 of the 4 pairs ordered
    scores = np.arange(100, dtype=float)  # 0..99: 5 % lie above 94
    assert threshold_at(scores, 0.05) == 94.0 and np.mean(scores > 94.0) == 0.05
    assert threshold_at(scores[:10], 0.05) == 9.0  # with 10 scores, 5 % allows none above
    assert per_volume_max([1, 5, 2, 0], ["a", "a", "b", "b"]) == {"a": 5.0, "b": 2.0}


# ------------------------------------------------------------------ a fitted detector
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(6, 2, 1))


def _smooth(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)


def test_a_fitted_detector_flags_an_outlier_and_not_a_clean_sample():
    net = _net().eval()
    detector = FeatureDensityDetector(net, ["1", "3"]).fit([{"image": _smooth(200, 1)}], progress=False)
    threshold = threshold_at(detector(_smooth(100, 2)).detach(), 0.05)
    clean = detector(_smooth(40, 3)).detach()
    checkerboard = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 4.0 - 2.0
    outlier = detector(checkerboard.expand(1, 1, 16, 16)).detach()
    assert outlier.item() > 10 * threshold
    assert (clean <= threshold).float().mean() >= 0.85  # about 95 % of clean samples pass


def test_adaptive_loss_adds_minus_weight_times_the_detectors_score_of_the_input():
    net = _net().eval()
    density = FeatureDensityDetector(net, ["3"]).fit([{"image": _smooth(50, 1)}], progress=False)
    x = _smooth(3, 4)
    for detector in (density, SqueezeDisagreement(net)):
        aware = DetectorAwareModel(net, detector)
        pred = aware(x)
        loss = AdaptiveLoss(lambda p, y: (p - y).pow(2).flatten(1).mean(1), aware, weight=2.5)
        terms = loss(pred, torch.zeros_like(pred))
        assert terms.shape == (3, 2)
        assert torch.allclose(terms[:, 0], pred.pow(2).flatten(1).mean(1))
        assert torch.allclose(terms[:, 1], -2.5 * detector(x))


def test_few_samples_for_the_dimension_are_shrunk_and_said(caplog):
    net = _net().eval()
    with caplog.at_level(logging.WARNING, logger="amat_monai.attack_detection.detector"):
        detector = FeatureDensityDetector(net, ["3"]).fit([{"image": _smooth(8, 1)}], progress=False)
    assert "8 clean samples for 12 feature dimensions" in caplog.text and "shrunk" in caplog.text
    assert torch.isfinite(detector(_smooth(2, 2))).all()
    with pytest.raises(ValueError, match="not modules of Sequential"):
        FeatureDensityDetector(net, ["bottleneck"])


def test_files_load_without_pickle_and_a_detector_of_other_weights_is_refused(tmp_path):
    net = _net()
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save(net.state_dict(), ckpt)
    loader = [{"image": _smooth(40, 1), "case": [f"c{i // 4}" for i in range(40)]}]
    val = [{"image": _smooth(40, 2), "case": [f"v{i // 4}" for i in range(40)]}]
    info = fit_detectors(net, ckpt, loader, val, ["3"], progress=False)
    assert set(info["thresholds"]) == {"sample", "volume"} and info["threshold_cases"] == [f"v{i}" for i in range(10)]
    with np.load(ckpt.parent / "detector.npz", allow_pickle=False) as arrays:  # plain arrays only
        assert sorted(arrays) == ["mean_0", "precision_0", "z_location", "z_scale"]
    loaded = load_detectors(_net(), ckpt)
    assert torch.allclose(loaded["density"](_smooth(2, 5)), FeatureDensityDetector.load(
        net, ckpt.parent / "detector.npz", ckpt.parent / "detector.json")(_smooth(2, 5)))
    assert loaded["squeeze"].thresholds == pytest.approx(info["squeeze"]["thresholds"])
    other = tmp_path / "other" / "models" / "model.pt"
    other.parent.mkdir(parents=True)
    torch.save({k: v + 1 for k, v in net.state_dict().items()}, other)
    with pytest.raises(ValueError, match="fitted on another checkpoint"):
        load_detectors(_net(), other, ckpt.parent / "detector.json")


# ------------------------------------------------------------------ the bundles
@pytest.fixture(scope="module")
def seg_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("detector")
    task = Path(make_synthetic_decathlon(root / "Task", num_cases=10, seed=6))
    run = root / "std"
    assert cli.main(["train", "--method", "std", "--bundle", str(SEG), "--dataset-dir", str(task), "--output-dir",
                     str(run), "--epochs", "1", "--device", "cpu", *_overrides(SEG_TINY)]) == 0
    return task, run


def test_fit_reads_training_and_validation_cases_only(seg_model, capsys):
    task, run = seg_model
    assert cli.main(["detector", "fit", "--bundle", str(SEG), "--dataset-dir", str(task), "--output-dir", str(run),
                     "--checkpoint", str(run / "models" / "model.pt"), "--device", "cpu", *_overrides(SEG_TINY)]) == 0
    assert "wrote" in capsys.readouterr().out
    info = json.loads((run / "models" / "detector.json").read_text())
    split = json.loads((run / "split.json").read_text())
    assert info["fit_cases"] == sorted(split["training"]) and info["threshold_cases"] == sorted(split["validation"])
    assert not set(info["fit_cases"] + info["threshold_cases"]) & set(split["test"])
    assert [layer["name"] for layer in info["layers"]] == ["bottleneck", "upsamples.1"]
    assert 0.0 <= info["validation_false_positive_rate"]["sample"] <= 0.05


def test_evaluate_reports_every_attack_noise_and_the_adaptive_attacks(seg_model, tmp_path, capsys):
    task, run = seg_model
    model = run / "models" / "model.pt"
    if not (run / "models" / "detector.json").is_file():
        test_fit_reads_training_and_validation_cases_only(seg_model, capsys)
    out = tmp_path / "det"
    argv = ["detector", "evaluate", "--bundle", str(SEG), "--dataset-dir", str(task), "--output-dir", str(out),
            "--checkpoint", str(model), "--device", "cpu", "--attacks", "pgd,ifgsm", "--eps", "1,4", "--steps", "2,2",
            "--adaptive-weights", "5", *_overrides(SEG_TINY)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| density | pgd-2 | 4 |" in printed and "pgd-2 adaptive (against squeeze, weight 5)" in printed
    report = json.loads((out / "detection.json").read_text())
    keys = {(r["detector"], r["attack"], r["eps"], r["source"]) for r in report["rows"]}
    for detector in ("density", "squeeze"):
        for attack in ("pgd", "ifgsm", "noise"):
            assert {(detector, attack, 1.0, "grid"), (detector, attack, 4.0, "grid")} <= keys
        for target in ("density", "squeeze"):
            assert (detector, "pgd", 4.0, f"against {target}, weight 5") in keys
    assert all(0.0 <= r["auc"] <= 1.0 and "volume" in r for r in report["rows"])
    # each adaptive attack lowers the score of the detector it is told to evade
    rows = {(r["detector"], r["attack"], r["eps"], r["source"]): r for r in report["rows"]}
    for target in ("density", "squeeze"):
        assert rows[(target, "pgd", 4.0, f"against {target}, weight 5")]["auc"] < rows[(target, "pgd", 4.0, "grid")]["auc"]
    # run again: every finished robust evaluation is reused (not rewritten), the report is the same
    runs = sorted(out.glob("*/robustness.json"))
    assert [p.parent.name for p in runs] == ["adaptive-density-5", "adaptive-squeeze-5", "attacks"]
    written = [p.stat().st_mtime_ns for p in runs]
    assert cli.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in runs] == written
    assert json.loads((out / "detection.json").read_text())["rows"] == report["rows"]


def test_evaluate_refuses_a_detector_of_another_checkpoint(seg_model, tmp_path, capsys):
    task, run = seg_model
    if not (run / "models" / "detector.json").is_file():
        test_fit_reads_training_and_validation_cases_only(seg_model, capsys)
    state = torch.load(run / "models" / "model.pt", weights_only=True)
    other = tmp_path / "models" / "model.pt"
    other.parent.mkdir()
    torch.save({k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}, other)
    assert cli.main(["detector", "evaluate", "--bundle", str(SEG), "--dataset-dir", str(task), "--output-dir",
                     str(tmp_path / "det"), "--checkpoint", str(other), "--detector", str(run / "models" / "detector.json"),
                     "--device", "cpu", "--attacks", "pgd", "--eps", "1", "--steps", "1", *_overrides(SEG_TINY)]) == 2
    assert "fitted on another checkpoint" in capsys.readouterr().err


def test_ceph_detector_fits_and_evaluates(tmp_path, capsys):
    from test_ceph_bundle import TINY as CEPH_TINY

    data = make_synthetic_ceph(tmp_path / "ceph", num_train=6, num_test=6, seed=3)
    # the whole validation list sets the threshold (detector.json lifts training's validate_max_cases)
    tiny = {**{k: v for k, v in CEPH_TINY.items() if k != "validate_max_cases"}, "validate_split": "test1[:3]",
            "test_split": "test1[3:]"}
    run = tmp_path / "std"
    assert cli.main(["train", "--method", "std", "--bundle", str(CEPH), "--dataset-dir", str(data), "--output-dir",
                     str(run), "--epochs", "1", "--device", "cpu", *_overrides(tiny)]) == 0
    model = run / "models" / "model.pt"
    assert cli.main(["detector", "fit", "--bundle", str(CEPH), "--dataset-dir", str(data), "--output-dir", str(run),
                     "--checkpoint", str(model), "--device", "cpu", *_overrides(tiny)]) == 0
    info = json.loads((run / "models" / "detector.json").read_text())
    assert info["fit_cases"] == ["001", "002", "003", "004", "005", "006"]
    assert info["threshold_cases"] == ["007", "008", "009"] and "volume" not in info["thresholds"]
    assert info["squeeze"]["probabilities"] == "sigmoid:19"
    out = tmp_path / "det"
    assert cli.main(["detector", "evaluate", "--bundle", str(CEPH), "--dataset-dir", str(data), "--output-dir", str(out),
                     "--checkpoint", str(model), "--device", "cpu", "--attacks", "pgd", "--eps", "1", "--steps", "2",
                     "--adaptive-weights", "1", *_overrides(tiny)]) == 0
    report = json.loads((out / "detection.json").read_text())
    assert report["metric"] == "mre" and report["success_margin"] == 1.0 and report["n_samples"] == 3
    assert {r["attack"] for r in report["rows"]} == {"pgd", "noise"}


def test_screen_gives_the_verdict_per_image_and_per_slice():
    from amat_monai.attack_detection import screen

    net = _net().eval()
    detector = FeatureDensityDetector(net, ["3"]).fit([{"image": _smooth(60, 1)}], progress=False)
    detector.thresholds = {"sample": 5.0, "volume": 7.0}
    image = _smooth(1, 2)[0]  # [1, 16, 16]
    verdict = screen(detector, image)
    assert set(verdict) == {"score", "threshold", "flag"} and verdict["threshold"] == 5.0
    assert verdict["score"] == pytest.approx(float(detector(image[None])[0]))
    # a volume of 3 slices along its first spatial axis, each padded from 16x16 to 20x20 as the fit's slices were
    volume = torch.stack([_smooth(1, s)[0, 0] for s in (3, 4, 5)])[None]  # [1, 3, 16, 16]
    verdict = screen(detector, volume, slice_dim=0, slice_size=(20, 20))
    padded = nn.functional.pad(volume[0][:, None], (2, 2, 2, 2))
    assert verdict["slices"]["score"] == pytest.approx(detector(padded).tolist(), rel=1e-5)
    assert verdict["score"] == pytest.approx(max(verdict["slices"]["score"])) and verdict["threshold"] == 7.0
    assert verdict["slices"]["flag"] == [s > 5.0 for s in verdict["slices"]["score"]]


def test_evaluate_without_a_fitted_detector_says_how_to_fit_one(seg_model, tmp_path, capsys):
    task, run = seg_model
    model = tmp_path / "models" / "model.pt"
    model.parent.mkdir()
    model.write_bytes((run / "models" / "model.pt").read_bytes())
    assert cli.main(["detector", "evaluate", "--bundle", str(SEG), "--dataset-dir", str(task), "--output-dir",
                     str(tmp_path / "det"), "--checkpoint", str(model), "--device", "cpu", "--attacks", "pgd",
                     "--eps", "1", "--steps", "1", *_overrides(SEG_TINY)]) == 2
    err = capsys.readouterr().err
    assert f"detector file not found: {model.parent / 'detector.json'}" in err and "amat-monai detector fit" in err
