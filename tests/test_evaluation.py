"""The robust evaluator on tiny hand-made models: report schema, ε = 0, per-sample worst restarts, sanity flags."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

from amat_monai.cli import main
from amat_monai.checkpoints import load_checkpoint
from amat_monai.evaluation import AttackSpec, make_attacks, robust_evaluate
from amat_monai.losses import SegmentationLoss
from amat_monai.metrics import SegmentationMetric

N_BATCHES, PER_BATCH = 2, 3
N = N_BATCHES * PER_BATCH


def make_batches(same_label: bool = False) -> list[dict]:
    """16x16 slices: class 1 and class 2 squares with intensities 1 and 2 plus a little noise; 2 cases."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for b in range(N_BATCHES):
        label = torch.zeros(PER_BATCH, 1, 16, 16, dtype=torch.long)
        for i in range(PER_BATCH):
            shift = 0 if same_label else i
            label[i, 0, 2 + shift : 7 + shift, 2:7] = 1
            label[i, 0, 9:14, 8 + shift : 13 + shift] = 2
        image = label.float() + 0.1 * torch.randn(label.shape, generator=g)
        batches.append(
            {
                "image": image,
                "label": label,
                "sample_id": [f"case{b}:{i}" for i in range(PER_BATCH)],
                "case": [f"case{b}"] * PER_BATCH,
                "slice": torch.arange(PER_BATCH),
            }
        )
    return batches


class Threshold(nn.Module):
    """A hand-set linear segmenter: intensity ~0 -> background, ~1 -> class 1, ~2 -> class 2 (clean Dice 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([0.0, 10.0, 20.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -5.0, -20.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Rounding(Threshold):
    """Gradient masking: the input is rounded, so the input gradient is exactly zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.round(x))


class Noisy(Threshold):
    """A randomised "defence": fresh noise on every forward pass, even in eval mode."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + 8.0 * torch.randn(x.shape[0], 3, *x.shape[2:])


class Constant(nn.Module):
    """Ignores its input (0 * x keeps the graph connected): predicts one fixed mask, robust to everything."""

    def __init__(self, label: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", torch.nn.functional.one_hot(label[0], 3).permute(2, 0, 1).float() * 10)
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], -1, -1, -1) + 0.0 * x.sum() * self.scale


GOOD_ATTACKS = ("pgd", "ifgsm")
GOOD_STEPS = {"pgd": 20, "ifgsm": 10}


def _evaluate(model: nn.Module, batches: list[dict] | None = None, **kwargs) -> dict:
    kwargs.setdefault("attacks", GOOD_ATTACKS)
    kwargs.setdefault("steps", GOOD_STEPS)
    kwargs.setdefault("eps", (1.0, 3.0, 5.0))
    kwargs.setdefault("large_eps_factor", 20.0)
    return robust_evaluate(model, SegmentationLoss(), make_batches() if batches is None else batches,
                           SegmentationMetric(),
                           progress=False, **kwargs)


REPORT_SCHEMA = {
    "type": "object",
    "required": ["task", "metric", "higher_is_better", "checkpoint", "n_samples", "clean", "results", "averages",
                 "sanity", "throughput", "clean_metrics"],
    "properties": {
        "task": {"const": "segmentation"},
        "metric": {"const": "dice"},
        "higher_is_better": {"const": True},
        "n_samples": {"type": "integer"},
        "clean": {"type": "number"},
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["attack", "norm", "eps", "steps", "step_size", "restarts", "value", "metrics"],
                "properties": {
                    "attack": {"enum": ["pgd", "ifgsm", "fgsm", "noise"]},
                    "norm": {"enum": ["l2", "linf"]},
                    "eps": {"type": "number"},
                    "steps": {"type": "integer"},
                    "step_size": {"type": ["number", "null"]},
                    "restarts": {"type": "integer"},
                    "value": {"type": "number"},
                    "metrics": {"type": "object", "required": ["dice", "dice_fg", "dice_3d"]},
                },
            },
        },
        "averages": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
        "throughput": {"type": "object", "required": ["samples_per_second", "seconds"]},
        "sanity": {"type": "object", "required": ["passed", "warnings", "checks", "zero_gradient_samples"]},
    },
}


def test_report_schema_files_and_eps_zero_rows(tmp_path):
    ckpt = tmp_path / "runs" / "std" / "models" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save(Threshold().state_dict(), ckpt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy model and attack raise no sanity warning
        report = _evaluate(Threshold(), eps=(0.0, 1.0, 3.0, 5.0), output_dir=tmp_path / "out", checkpoint=ckpt)

    saved = json.loads((tmp_path / "out" / "robustness.json").read_text())
    jsonschema.validate(saved, REPORT_SCHEMA)
    assert saved["n_samples"] == N and saved["clean"] == 1.0 and saved["name"] == "std"
    assert saved["checkpoint"] == str(ckpt) and len(saved["checkpoint_sha256"]) == 64
    assert [(r["attack"], r["eps"]) for r in saved["results"]] == [
        (a, e) for a in GOOD_ATTACKS for e in (0.0, 1.0, 3.0, 5.0)
    ]
    by = {(r["attack"], r["eps"]): r for r in saved["results"]}
    assert by[("pgd", 3.0)]["step_size"] == pytest.approx(4 * 3.0 / 20) and by[("pgd", 3.0)]["steps"] == 20
    assert by[("ifgsm", 3.0)]["step_size"] == pytest.approx(4 * 3.0 / 10) and by[("ifgsm", 3.0)]["restarts"] == 1
    for attack in GOOD_ATTACKS:  # ε = 0 equals clean; the average leaves ε = 0 out
        assert by[(attack, 0.0)]["value"] == saved["clean"]
        assert by[(attack, 0.0)]["metrics"] == saved["clean_metrics"]
        assert saved["averages"][attack] == pytest.approx(sum(by[(attack, e)]["value"] for e in (1.0, 3.0, 5.0)) / 3)
        assert by[(attack, 5.0)]["value"] < by[(attack, 1.0)]["value"] < 1.0  # the attack works
    sanity = saved["sanity"]
    assert sanity["passed"] is True and sanity["warnings"] == [] and sanity["zero_gradient_samples"] == 0
    assert {k: v["passed"] for k, v in sanity["checks"].items()} == {
        "zero_eps_equals_clean": True,
        "monotone_in_eps": True,
        "attack_strength_order": True,
        "noise_weaker_than_attack": True,
        "large_eps_breaks_model": True,
        "zero_gradient": True,
        "within_budget": True,
    }
    assert saved["throughput"]["samples_per_second"] > 0

    # CSV: one row per sample for clean and for every cell (grid and sanity extras)
    rows = list(csv.DictReader((tmp_path / "out" / "robustness.csv").open()))
    n_cells = len(saved["results"]) + len(sanity["extra_results"])
    assert len(rows) == N * (1 + n_cells) == len(report["rows"])
    assert {"sample_id", "case", "slice", "attack", "eps", "loss", "dice", "dice_fg", "delta_norm"} <= set(rows[0])
    clean = {r["sample_id"]: r["dice"] for r in rows if r["attack"] == "clean"}
    zero = [r for r in rows if r["eps"] == "0.0" and r["attack"] != "clean"]
    assert len(zero) == 2 * N and all(r["dice"] == clean[r["sample_id"]] and float(r["delta_norm"]) == 0 for r in zero)
    assert all(float(r["delta_norm"]) <= float(r["eps"]) * (1 + 1e-5) for r in rows if r["attack"] != "clean")

    md = (tmp_path / "out" / "robustness.md").read_text()
    assert "| method | clean | PGD1 | PGD3 | PGD5 | PGD avg | IFGSM1 | IFGSM3 | IFGSM5 | IFGSM avg |" in md
    assert f"| std | 1.0000 | {by[('pgd', 1.0)]['value']:.4f} |" in md
    assert "Attacks (L2): PGD 20 steps, step 4ε/20, random start; IFGSM 10 steps, step 4ε/10." in md
    assert (tmp_path / "out" / "robustness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob(".*tmp"))  # atomic writes leave no temporary files


def test_protocol_defaults_per_task():
    seg = {s.name: s for s in make_attacks(("pgd", "ifgsm", "fgsm", "noise"), task="segmentation", restarts=3)}
    assert seg["pgd"].steps == 100 and seg["pgd"].step_size(2.0) == pytest.approx(4 * 2.0 / 100)
    assert seg["ifgsm"].steps == 10 and seg["ifgsm"].step_size(2.0) == pytest.approx(4 * 2.0 / 10)
    assert seg["fgsm"].effective_steps == 1 and seg["fgsm"].step_size(2.0) == 2.0
    assert seg["noise"].effective_steps == 0 and seg["noise"].step_size(2.0) is None
    assert [seg[n].effective_restarts for n in ("pgd", "ifgsm", "fgsm", "noise")] == [3, 1, 1, 3]
    lm = {s.name: s for s in make_attacks(("pgd", "ifgsm"), task="landmarks", norm="linf")}
    assert lm["pgd"].step_size(1.0) == pytest.approx(5 * 1.0 / 100)
    assert lm["ifgsm"].step_size(1.0) == pytest.approx(1.0 / 5) and lm["ifgsm"].label == "IFGSM-Linf"
    assert make_attacks(("pgd", "ifgsm"), steps=[7, 3])[1].steps == 3
    with pytest.raises(ValueError, match="unknown"):
        make_attacks(("pgd", "cw"))
    with pytest.raises(ValueError, match="2 values for 1 attacks"):
        make_attacks(("pgd",), steps=[7, 3])
    det = {a.name: a for a in make_attacks(("pgd", "ifgsm"), task="detection")}
    assert det["pgd"].step_size(10.0) == pytest.approx(4 * 10.0 / 100) and det["ifgsm"].step_size(10.0) == 4.0
    with pytest.raises(ValueError, match="task"):
        make_attacks(("pgd",), task="classification")


def test_worst_restart_is_kept_per_sample():
    """Restart r wipes out only sample r of each batch: the per-sample worst case has every sample at Dice 0,
    while keeping the worst restart for the whole batch would leave two samples of three at Dice 1."""
    calls = {"n": 0}

    def one_sample_attack(model, loss_fn, x, y, eps, **kwargs):
        r = calls["n"] % PER_BATCH
        calls["n"] += 1
        x_adv = x.clone()
        x_adv[r] = 0.0  # predicted all background: Dice 0 for this sample
        return x_adv

    spec = AttackSpec(name="pgd", steps=1, restarts=PER_BATCH, fn=one_sample_attack)
    report = _evaluate(Threshold(), attacks=[spec], eps=(1.0,), sanity=False)
    assert calls["n"] == N_BATCHES * PER_BATCH
    assert report["results"][0]["value"] == 0.0 and report["results"][0]["restarts"] == PER_BATCH
    rows = [r for r in report["rows"] if r["attack"] == "pgd"]
    assert [r["dice"] for r in rows] == [0.0] * N
    assert [r["restart"] for r in rows] == [float(i % PER_BATCH) for i in range(N)]  # the restart that hit it


def _flags(report: dict) -> dict:
    return {k: v["passed"] for k, v in report["sanity"]["checks"].items()}


class BatchNormed(nn.Module):
    """Threshold behind a batch norm whose running statistics are the identity: eval mode gives the clean Dice 1,
    train mode (batch statistics) gives other outputs and moves the running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1, affine=False)
        self.threshold = Threshold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.threshold(self.norm(x))


def test_evaluation_keeps_a_batch_norm_network_in_eval_mode_through_every_attack():
    # the evaluator wraps the network in its scoring path; restoring the wrapper's default train mode after an
    # attack used to switch the network to train mode, so attacked inputs were scored with batch statistics
    model = BatchNormed().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = _evaluate(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "running statistics moved"
    assert not model.training and not model.norm.training
    assert _flags(report)["zero_eps_equals_clean"] is True and report["clean"] == pytest.approx(1.0)


def test_sanity_zero_eps_fires_on_a_randomised_model():
    with pytest.warns(RuntimeWarning, match="zero_eps_equals_clean"):
        report = _evaluate(Noisy())
    assert _flags(report)["zero_eps_equals_clean"] is False
    assert report["sanity"]["passed"] is False


def test_sanity_monotonicity_fires_on_an_attack_that_weakens_with_eps():
    def backwards(model, loss_fn, x, y, eps, **kwargs):
        return torch.zeros_like(x) if 0 < eps < 2 else x.clone()  # destroys the input at small ε only

    attacks = [AttackSpec("pgd", steps=20, step_size_factor=4.0), AttackSpec("ifgsm", steps=10, fn=backwards)]
    with pytest.warns(RuntimeWarning, match="monotone_in_eps"):
        report = _evaluate(Threshold(), attacks=attacks)
    failure = report["sanity"]["checks"]["monotone_in_eps"]["failures"]
    assert [(f["attack"], f["eps"]) for f in failure] == [("ifgsm", [1.0, 3.0])]


def test_sanity_strength_order_fires_on_a_crippled_pgd():
    with pytest.warns(RuntimeWarning, match="attack_strength_order"):
        report = _evaluate(Threshold(), attacks=[AttackSpec("pgd", steps=1, step_size_factor=0.05),
                                                 AttackSpec("ifgsm", steps=10, step_size_factor=4.0)])
    flags = _flags(report)
    assert flags["attack_strength_order"] is False and flags["monotone_in_eps"] is True
    failures = report["sanity"]["checks"]["attack_strength_order"]["failures"]
    assert {(f["stronger"], f["weaker"]) for f in failures} >= {("pgd", "ifgsm")}


def test_sanity_gradient_masking_fires_zero_gradient_and_noise_checks():
    with pytest.warns(RuntimeWarning):
        report = _evaluate(Rounding())
    flags = _flags(report)
    assert report["clean"] == 1.0
    assert report["sanity"]["zero_gradient_samples"] == N and flags["zero_gradient"] is False
    assert flags["noise_weaker_than_attack"] is False  # the "attack" is no better than noise
    assert flags["within_budget"] is True


def test_sanity_large_eps_fires_on_a_model_that_ignores_its_input():
    batches = make_batches(same_label=True)
    with pytest.warns(RuntimeWarning, match="large_eps_breaks_model"):
        report = _evaluate(Constant(batches[0]["label"][:, 0]), batches)
    flags = _flags(report)
    assert report["clean"] == 1.0 and all(r["value"] == 1.0 for r in report["results"])
    assert flags["large_eps_breaks_model"] is False and flags["zero_gradient"] is False


def test_sanity_budget_fires_on_an_attack_that_ignores_eps():
    def unbounded(model, loss_fn, x, y, eps, **kwargs):
        return x + (eps + 1.0) * torch.ones_like(x) / math.sqrt(x[0].numel()) * 2

    with pytest.warns(RuntimeWarning, match="within_budget"):
        report = _evaluate(Threshold(), attacks=[AttackSpec("pgd", steps=20, step_size_factor=4.0, fn=unbounded)])
    assert _flags(report)["within_budget"] is False


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="eps"):
        _evaluate(Threshold(), eps=(-1.0,))
    with pytest.raises(ValueError, match="no batches"):
        _evaluate(Threshold(), batches=[], sanity=False)
    with pytest.raises(TypeError, match="TaskMetric"):
        robust_evaluate(Threshold(), SegmentationLoss(), make_batches(), metric=object(), progress=False)
    batches = [{k: v for k, v in b.items() if k != "label"} for b in make_batches()]
    with pytest.raises(KeyError, match="label"):
        _evaluate(Threshold(), batches=batches, sanity=False)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(Threshold(), tmp_path / "missing.pt")
    torch.save({"network": nn.Conv2d(1, 2, 1).state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        load_checkpoint(Threshold(), tmp_path / "other.pt")
    torch.save({"network": {f"module.{k}": v for k, v in Threshold().state_dict().items()}}, tmp_path / "ddp.pt")
    load_checkpoint(Threshold(), tmp_path / "ddp.pt")  # CheckpointSaver dicts of DDP-wrapped networks load


def test_cli_evaluate_runs_the_hippocampus_bundle_on_synthetic_data(tmp_path, capsys):
    """End to end through the bundle's train.json + robust_evaluate.json (tiny synthetic task, 2 PGD steps)."""
    from amat_monai.data.synthetic import make_synthetic_decathlon
    from amat_monai.workflows import build_workflow

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"
    if not (bundle / "configs" / "train.json").is_file():
        pytest.skip("the hippocampus bundle is not there")
    data = make_synthetic_decathlon(tmp_path / "task", num_cases=6, shape_range=((8, 10), (12, 14), (8, 10)))
    ckpt = tmp_path / "runs" / "std" / "models" / "model.pt"
    ckpt.parent.mkdir(parents=True)
    workflow = build_workflow(bundle, ["train.json"], "train", dataset_dir=data, output_dir=str(tmp_path / "runs"))
    torch.save(workflow.parser.get_parsed_content("network_def").state_dict(), ckpt)

    out = tmp_path / "eval"
    argv = ["evaluate", "--bundle", str(bundle), "--checkpoint", str(ckpt), "--dataset-dir", data, "--output-dir",
            str(out), "--attacks", "pgd,ifgsm", "--eps", "1,2", "--steps", "2,2", "--device", "cpu",
            "--override", "robust#sanity_steps=1", "--override", "progress=false"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an untrained network trips sanity checks; not the point here
        assert main(argv) == 0
    report = json.loads((out / "robustness.json").read_text())
    assert report["name"] == "std" and report["checkpoint"] == str(ckpt) and report["n_samples"] > 0
    assert [(r["attack"], r["eps"], r["steps"]) for r in report["results"]] == [
        ("pgd", 1.0, 2), ("pgd", 2.0, 2), ("ifgsm", 1.0, 2), ("ifgsm", 2.0, 2)
    ]
    assert report["results"][0]["step_size"] == pytest.approx(4 * 1.0 / 2)
    assert "| method | clean | PGD1 | PGD2 | PGD avg | IFGSM1 | IFGSM2 | IFGSM avg |" in capsys.readouterr().out

    assert main(argv[:4] + [str(tmp_path / "nope.pt")] + argv[5:]) == 2
    assert "nope.pt" in capsys.readouterr().err


@pytest.mark.realdata
def test_cli_evaluate_on_real_hippocampus_cases(amat_data_dir, tmp_path):
    """The real Decathlon task through the bundle: slices carry case and slice keys, so the 3D Dice is defined."""
    task = amat_data_dir / "Task04_Hippocampus"
    if not task.is_dir():
        pytest.skip(f"Task04_Hippocampus not found in {amat_data_dir}")
    from amat_monai.workflows import build_workflow

    bundle = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"
    ckpt = tmp_path / "untrained.pt"
    workflow = build_workflow(bundle, ["train.json"], "train", dataset_dir=str(task), output_dir=str(tmp_path / "r"))
    torch.save(workflow.parser.get_parsed_content("network_def").state_dict(), ckpt)
    out = tmp_path / "eval"
    argv = ["evaluate", "--bundle", str(bundle), "--checkpoint", str(ckpt), "--dataset-dir", str(task),
            "--output-dir", str(out), "--attacks", "pgd", "--eps", "2", "--steps", "1", "--max-cases", "4",
            "--device", "cpu", "--override", "robust#sanity=false", "--override", "progress=false"]
    assert main(argv) == 0
    report = json.loads((out / "robustness.json").read_text())
    clean = report["clean_metrics"]
    assert report["n_samples"] > 0 and clean["n_cases"] >= 1
    assert 0 < clean["n_dice"] <= clean["n_dice_fg"] <= report["n_samples"]  # all-class slices within fg slices
    rows = list(csv.DictReader((out / "robustness.csv").open()))
    assert all(r["case"].startswith("hippocampus_") and r["slice"].isdigit() for r in rows)


def test_linf_grid_keeps_its_budget_and_labels():
    report = _evaluate(Threshold(), eps=(0.1, 0.3), norm="linf")
    assert {r["norm"] for r in report["results"]} == {"linf"}
    assert set(report["averages"]) == {"pgd-linf", "ifgsm-linf"}
    assert report["sanity"]["checks"]["within_budget"]["passed"] is True
    linf_rows = [r for r in report["rows"] if r["attack"] != "clean"]
    assert max(r["delta_norm"] - r["eps"] for r in linf_rows) <= 1e-6
    assert report["results"][-1]["value"] < report["clean"]
