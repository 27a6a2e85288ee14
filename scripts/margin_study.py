"""The AMAT margin study (``scripts/reproduce.py --experiment margins``): does AMAT beat a well-tuned VAT?

    python scripts/reproduce.py --experiment margins --protocol cpu --task hippocampus
    python scripts/reproduce.py --experiment margins --protocol cpu --task hippocampus --report-only

Every arm fine-tunes the same STD model with the same budget (epochs, attack steps, learning rate): VAT at several
ε (its clean-vs-robust curve), AMAT with three margin rules (A: +Δ and halfway to the boundary, the paper's; B: +Δ
and no shrink, what the authors' nnU-Net code does in effect; C: geometric growth and no shrink), then the best
rule (on the validation split) at two more threshold levels, so that AMAT has a curve of its own; then the best so
far with Δ doubled ("reach") and with every margin starting at the best VAT's ε ("init"). Arms and levels are chosen
on validation; every model is evaluated once on test. The report (``docs/results/<task>/MARGINS.md``,
``study.json``, ``pareto.png``, ``margins.png``, each test's per-case scores ``case_scores.json``) gives
paired-bootstrap intervals over test cases (:mod:`amat_monai.comparison`), the fair-chance check of the chosen
arm's margins, and the paper's claim as holds / does not hold, for the chosen arm and, where its margins failed
the check, for the most robust arm whose margins passed it.

Stages are resumable (``<output-dir>/<task>-margins/stages.json``): a finished stage is skipped, an interrupted
training continues from its checkpoint.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from amat_monai.checkpoints import atomic_write_text, file_sha256  # noqa: E402
from amat_monai.cli import main as cli_main  # noqa: E402
from amat_monai.comparison import (  # noqa: E402
    CaseScores, curve_gap, frontier, load_case_scores, paired_bootstrap, read_case_scores, save_case_scores)
from amat_monai.reporting import load_report, paper_table, save_figure  # noqa: E402
from amat_monai.workflows import calibrate  # noqa: E402
from reproduce import PROTOCOLS, TASKS, Stages, ship_models, study_folder  # noqa: E402
from reproduce import train_stage as reproduce_train_stage  # noqa: E402

#: The AMAT margin study (``--experiment margins``): VAT's clean-vs-robust curve against AMAT arms, every arm
#: fine-tuned from the same STD model with the same budget (epochs, attack steps, learning rate); arms and ξ levels
#: chosen on the validation split, every model evaluated once on test.
MARGIN_STUDY: dict[str, dict[str, Any]] = {
    "hippocampus": {
        "vat_eps": [5.0, 10.0, 15.0, 20.0],
        # Δ·epochs = 25, the span of VAT's ε, so that a margin can reach the VAT range in the 5-epoch fine-tune
        "amat": {"delta": 5.0, "amat_eps_max": 25.0, "amat_condition": "metric"},
        "arms": {
            "A": {"amat_growth": "additive", "amat_shrink": "halfway"},  # the paper's rule
            "B": {"amat_growth": "additive", "amat_shrink": "none"},  # what the authors' nnU-Net code does
            "C": {"amat_growth": "geometric", "amat_growth_factor": 1.6, "amat_shrink": "none"},
        },
        # ξ: the STD model's mean training score (default: 0.858, which 72 % of the clean training slices pass and
        # none under PGD-20 at ε = Δ on STD), then two lower Dice thresholds that leave 10 % and 3 % of the clean
        # training slices failing, so that margins can grow towards VAT's ε
        "levels": [{"xi_metric_quantile": 0.10}, {"xi_metric_quantile": 0.03}],
        # the best so far with Δ doubled: with +Δ per visit, a margin's time-averaged radius over 5 visits is at most
        # 3Δ, so Δ = 5 reaches VAT15's ε only for a slice that passes every visit (33 % did)
        "reach": {"delta": 10.0, "amat_eps_max": 30.0},
        # then the best so far with margins starting at the best VAT's ε (the reach arm left 12 % at the floor)
        "init_at_best_vat_eps": True,
        # the bootstrap's metric and the column that names a case (a volume's slices are resampled together)
        "case_scores": ("dice", "case"),
        "validate": ["test_section=\"validation\""],
        "foreground": ["robust_slices=\"foreground\""],
        "spot_check": {"steps": [100, 10], "max_cases": 8},
    },
    "ceph": {
        "vat_eps": [1.0, 2.0, 3.0, 5.0],
        # Δ·epochs = 5, VAT's largest ε, within the 4-epoch fine-tune; the total loss against one ξ (the authors'
        # landmark code; ξ = mean + z·std of the STD model's training losses, z = 2 in train.json)
        # ξ follows the model: with the STD model's ξ fixed, 146 of the 150 training images failed it on their
        # clean input in AMAT-A's first epoch (a first run of this study), so no margin could move
        "amat": {"delta": 1.25, "amat_eps_max": 6.0, "amat_condition": "total", "amat_xi_follows_model": True},
        "arms": {
            "A": {"amat_growth": "additive", "amat_shrink": "halfway"},
            "B": {"amat_growth": "additive", "amat_shrink": "none"},
            "C": {"amat_growth": "geometric", "amat_growth_factor": 1.6, "amat_shrink": "none"},
        },
        # ξ's distance from the current model's mean clean loss, z·σ of the STD losses: one level stricter, one looser
        "levels": [{"xi_z": 1.0}, {"xi_z": 4.0}],
        # the best so far with Δ doubled: at Δ = 1.25 most margins stopped at 2.5, none reached VAT3's ε on average
        "reach": {"delta": 2.5, "amat_eps_max": 8.0},
        # then the best so far with margins starting at the best VAT's ε: 54 % of the reach arm's images failed ξ at
        # their first radius and stayed at the floor
        "init_at_best_vat_eps": True,
        # validation: the first 50 test1 images; test: the other 100 (the bundle's splits). One evaluation costs
        # about 13 s per image on one thread, so the first 25 of validation and the first 50 of test are evaluated
        # (a fixed subset, the same for every arm), to keep the task within 4 h
        "case_scores": ("mre", "sample_id"),
        "validate": ["test_split=\"test1[:50]\""],
        "max_cases": {"validate": 25, "test": 50},
        "spot_check": {"steps": [100, 10], "max_cases": 10},
    },
}


#: the smoke protocol's study (tests): fewer arms, the same code path
SMOKE_STUDY: dict[str, Any] = {"vat_eps": [5.0, 10.0], "levels": [{"xi_metric_quantile": 0.25}],
                               "arms": {k: MARGIN_STUDY["hippocampus"]["arms"][k] for k in ("A", "C")},
                               "spot_check": {"steps": [2, 2], "max_cases": 8}}


def study_settings(task: str, protocol: str) -> dict[str, Any]:
    """The study of ``task`` under ``protocol`` (the smoke protocol trims it)."""
    return {**MARGIN_STUDY[task], **(SMOKE_STUDY if protocol == "smoke" else {})}


def _evaluate_stage(stages: Stages, label: str, bundle: Path, dataset: Path, model: str | Callable[[], str],
                    eval_dir: Path, eps: list[float], steps: list[int], overrides: list[str], device: str | None,
                    max_cases: int | None = None, weights: Path | None = None) -> dict[str, Any]:
    """One ``amat-monai evaluate`` run as a resumable stage of the weights ``model`` (a path, or a function that
    returns one: a model trained only if the stage must run); returns its report. A finished evaluation of other
    weights than those now at ``weights`` (default: ``model``'s path), e.g. a model trained again, runs again."""
    weights = Path(model) if weights is None and not callable(model) else weights
    report = eval_dir / "robustness.json"
    if stages.is_finished(label) and weights is not None and weights.is_file() and report.is_file():
        if load_report(report).get("checkpoint_sha256") != file_sha256(weights):
            print(f"[reproduce] {label}: evaluated other weights than {weights}, runs again", flush=True)
            stages.forget(label)
    if callable(model) and not stages.is_finished(label):
        model = model()  # trained (as its own stage) before this one starts its clock

    def evaluate() -> str:
        checkpoint = model() if callable(model) else model
        argv = ["evaluate", "--bundle", str(bundle), "--dataset-dir", str(dataset), "--checkpoint", checkpoint,
                "--output-dir", str(eval_dir), "--attacks", "pgd,ifgsm", "--eps", ",".join(f"{e:g}" for e in eps),
                "--steps", ",".join(str(s) for s in steps)]
        argv += ["--max-cases", str(max_cases)] if max_cases else []
        argv += ["--device", device] if device else []
        for item in overrides:
            argv += ["--override", item]
        if cli_main(argv) != 0:
            raise RuntimeError(f"{label} failed (amat-monai {' '.join(argv)})")
        return str(report)

    return load_report(stages.run(label, str(report), evaluate))


def _robust_score(report: dict[str, Any]) -> float:
    """PGD avg + IFGSM avg, signed so that higher is better."""
    sign = 1.0 if report["higher_is_better"] else -1.0
    return sign * (report["averages"]["pgd"] + report["averages"]["ifgsm"])


def run_margin_study(task: str, protocol: str, data_dir: Path, out: Path, device: str | None,
                     complete_intervals: bool = False) -> dict[str, Any]:
    """The stages of the margin study for one task (resumable); returns the reports by split and model.
    ``complete_intervals``: test again the models of VAT's curve (STD and the VATs) whose per-case test scores are
    missing (``--complete-intervals``), so that the models tested since get the curve's interval.
    """
    spec, settings, study = TASKS[task], PROTOCOLS[protocol][task], study_settings(task, protocol)
    bundle, dataset, work, stages = study_folder(task, data_dir, out, "-margins")
    ev = settings["evaluate"]

    def train_stage(name: str, method: str, extra: dict[str, Any]) -> Callable[[], str]:
        """The weights of ``name``, trained as a stage when first asked for: a model whose evaluations are all
        done (e.g. restored with ``--restore``) is not trained again."""
        return functools.cache(lambda: reproduce_train_stage(
            stages, work, name, bundle, method, dataset, settings, device,
            models["STD"]() if method != "std" else None, extra))

    def calibrate_stage(label: str, level: dict[str, Any]) -> str:
        out_dir = work / "xi" / label
        # the feasibility report attacks with the training attack's steps
        steps = settings["adversarial"].get("attack_steps")
        # hippocampus training writes its random split next to the model; the ISBI splits are fixed files
        split = work / "runs" / "STD" / "split.json"
        return stages.run(f"calibrate {label}", str(out_dir / "xi.json"), lambda: calibrate(
            bundle, dataset, out_dir, models["STD"](), device=device, **({"split_file": str(split)} if split.is_file() else {}),
            delta=study["amat"]["delta"], **({"attack_steps": steps} if steps else {}), **settings["common"], **level))

    max_cases = {split: study.get("max_cases", {}).get(split, ev.get("max_cases")) for split in ("validate", "test")}

    def weights_of(name: str) -> Path:
        return work / "runs" / name / "models" / "model.pt"

    def validate(name: str) -> dict[str, Any]:
        return _evaluate_stage(stages, f"validate {name}", bundle, dataset, models[name], work / "val" / name,
                               spec["eps"], ev["steps"], [*ev.get("override", []), *study["validate"]], device,
                               max_cases=max_cases["validate"], weights=weights_of(name))

    models: dict[str, Callable[[], str]] = {}
    models["STD"] = train_stage("STD", "std", {})
    xi = {"mean": calibrate_stage("mean", {"xi_metric_quantile": None})}  # the location + z·scale level
    for eps in study["vat_eps"]:
        models[f"VAT{eps:g}"] = train_stage(f"VAT{eps:g}", "vat", {"eps": eps})
    rules: dict[str, dict[str, Any]] = {}  # the AMAT settings (ξ file included) each AMAT model trains with

    def amat_arm(name: str, rule: dict[str, Any]) -> None:
        rules[name] = rule
        models[name] = train_stage(name, "amat", rule)

    stale = [n for n in models if (n == "STD" or n.startswith("VAT")) and stages.is_finished(f"test {n}")
             and not _has_case_scores(work / "test" / n)] if complete_intervals else []
    # trained again first where their weights are gone (so that their validations run again too), then forgotten:
    # a run cut short in between finds them stale again
    stages.run_independent({name: models[name] for name in stale})
    for name in stale:
        stages.forget(f"test {name}")
    for arm, rule in study["arms"].items():
        amat_arm(f"AMAT-{arm}", {**study["amat"], **rule, "xi_file": xi["mean"]})
    val = stages.run_independent({name: functools.partial(validate, name) for name in models})
    best_arm = max(study["arms"], key=lambda a: _robust_score(val[f"AMAT-{a}"]))

    def best_so_far(prefix: str) -> str:  # on validation
        return max((n for n in models if n.startswith(prefix)), key=lambda n: _robust_score(val[n]))

    for level in study["levels"]:
        label = "-".join(f"{k.removeprefix('xi_').removeprefix('metric_')}{v:g}" for k, v in level.items())
        xi[label] = calibrate_stage(label, level)
        amat_arm(f"AMAT-{best_arm}-{label}", {**study["amat"], **study["arms"][best_arm], "xi_file": xi[label]})
        val[f"AMAT-{best_arm}-{label}"] = validate(f"AMAT-{best_arm}-{label}")
    if "reach" in study:  # the best so far with a larger Δ, so that its margins can reach VAT's ε in the budget
        best = best_so_far("AMAT")
        amat_arm(f"{best}-reach", {**rules[best], **study["reach"]})
        val[f"{best}-reach"] = validate(f"{best}-reach")
    if study.get("init_at_best_vat_eps"):
        # the best so far with every margin starting at the best VAT's ε: no sample trains below VAT's radius, so
        # what it adds over VAT is the per-sample growth alone (a fair chance by construction)
        best, vat_eps = best_so_far("AMAT"), float(best_so_far("VAT").removeprefix("VAT"))
        amat_arm(f"{best}-init", {**rules[best], "amat_init": vat_eps})
        val[f"{best}-init"] = validate(f"{best}-init")
    test = stages.run_independent({name: functools.partial(
        _evaluate_stage, stages, f"test {name}", bundle, dataset, path, work / "test" / name, spec["eps"], ev["steps"],
        ev.get("override", []), device, max_cases=max_cases["test"], weights=weights_of(name))
        for name, path in models.items()})
    amat_names = [n for n in models if n.startswith("AMAT")]
    vat_names = [n for n in models if n.startswith("VAT")]
    best_amat = max(amat_names, key=lambda n: _robust_score(val[n]))  # chosen on validation
    best_vat = max(vat_names, key=lambda n: _robust_score(val[n]))
    extra: dict[str, dict[str, Any]] = {"foreground": {}, "spot_check": {}}
    for name in ("STD", best_vat, best_amat) if "foreground" in study else ():
        extra["foreground"][name] = _evaluate_stage(
            stages, f"test-foreground {name}", bundle, dataset, models[name], work / "test-foreground" / name,
            spec["eps"], ev["steps"], [*ev.get("override", []), *study["foreground"]], device, weights=weights_of(name))
    for name in (best_vat, best_amat):
        sc = study["spot_check"]
        extra["spot_check"][name] = _evaluate_stage(
            stages, f"spot-check {name}", bundle, dataset, models[name], work / "spot-check" / name, spec["eps"],
            sc["steps"], ev.get("override", []), device, max_cases=sc["max_cases"], weights=weights_of(name))
    return {"val": val, "test": test, "best_arm": best_arm, "best_amat": best_amat, "best_vat": best_vat,
            "stages": stages.done, "extra": extra, "work": str(work)}


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def _model_order(work: Path) -> list[str]:
    """Model names in the order their training stages were first run."""
    stages = json.loads((work / "stages.json").read_text()) if (work / "stages.json").is_file() else {}
    return [k.removeprefix("train ") for k in stages if k.startswith("train ")]


def _reports(folder: Path, order: list[str]) -> dict[str, dict[str, Any]]:
    return {n: load_report(folder / n / "robustness.json") for n in order if (folder / n / "robustness.json").is_file()}


def _on_metric(report: dict[str, Any], metric: str) -> dict[str, Any]:
    """A copy of ``report`` whose primary values are those of another column (e.g. ``dice_fg``)."""
    out = json.loads(json.dumps(report))
    out["clean"] = report["clean_metrics"][metric]
    for row in out["results"]:
        row["value"] = row["metrics"][metric]
    for attack in out["averages"]:
        vals = [r["value"] for r in out["results"] if r["attack"] == attack and r["eps"] > 0 and r["value"] is not None]
        out["averages"][attack] = float(np.mean(vals)) if vals else None
    return out


CASE_SCORES = "case_scores.json"  # beside a committed test report: its per-case scores of the study's metric


def _has_case_scores(folder: Path) -> bool:
    return (folder / "robustness.csv").is_file() or (folder / CASE_SCORES).is_file()


def _case_scores(folder: Path, metric: str, case_key: str, higher: bool) -> CaseScores | None:
    """The per-case scores of the evaluation in ``folder``: from its per-sample CSV, else from the per-case file a
    report committed (a restored study); None if neither is there."""
    if (folder / "robustness.csv").is_file():
        return read_case_scores(folder / "robustness.csv", metric, case_key, higher)
    return load_case_scores(folder / CASE_SCORES, metric) if _has_case_scores(folder) else None


def _fmt(d: dict[str, float], digits: int) -> str:
    if not np.isfinite(d["low"]):
        return f"{d['estimate']:+.{digits}f} (no interval)"
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _curve_cell(gap: dict[str, float], digits: int) -> str:
    """Where a model lies against VAT's curve, with its gap: "above (+x [lo, hi])", "n/a (outside its clean range)"."""
    if not np.isfinite(gap["estimate"]):
        return "n/a (outside its clean range)"
    where = _against_curve(gap)
    return f"{where} ({_fmt(gap, digits)})" if where else f"gap {_fmt(gap, digits)}"


def _summary(report: dict[str, Any]) -> dict[str, float]:
    """A report's clean value and attack averages, as :meth:`amat_monai.comparison.CaseScores.summary` gives them."""
    return {"clean": report["clean"], **report["averages"]}


def _against_curve(gap: dict[str, float]) -> str | None:
    """Where AMAT lies against VAT's curve from the bootstrap interval of its gap (None: outside its clean range, or
    no interval)."""
    if not np.isfinite(gap["estimate"]) or not np.isfinite(gap["low"]):
        return None
    return "above" if gap["low"] > 0 else "below" if gap["high"] < 0 else "on"


def _fair_chance(history: dict[str, Any], eps: float) -> dict[str, Any]:
    """The chosen arm's margins against the best VAT's ε: time-averaged training radius and the floor."""
    samples = history["samples"]
    radius = np.asarray(samples["mean_training_radius"], dtype=float)
    final = np.asarray(samples["margins_per_epoch"][-1], dtype=float)
    outcome = np.asarray([o or "" for o in samples["last_outcome"]])
    floor = history["settings"]["floor"]
    at_floor = (final <= floor + 1e-6) & (outcome != "frozen")
    share_reaching = float(np.nanmean(radius >= eps - 1e-6))
    return {"best_vat_eps": eps, "share_radius_reaching_best_vat_eps": share_reaching,
            "share_at_floor_not_frozen": float(at_floor.mean()), "share_frozen_last_visit": float((outcome == "frozen").mean()),
            "median_mean_training_radius": float(np.nanmedian(radius)),
            "passes": bool(share_reaching >= 0.5 and at_floor.mean() <= 0.10)}


def _plots(out: Path, test: dict[str, dict[str, Any]], order: list[str], history: dict[str, Any] | None,
           best_amat: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [n for n in order if n in test and (n == "STD" or n.startswith("VAT"))]
    arms = [n for n in order if n in test and n.startswith("AMAT")]
    higher = next(iter(test.values()))["higher_is_better"]
    metric = next(iter(test.values()))["metric"]
    point = {n: (test[n]["clean"], test[n]["averages"]["pgd"]) for n in curve + arms}
    # left: every model; right: the adversarial arms only, where VAT's and AMAT's points sit close together
    panels = [p for p in (curve + arms, [n for n in curve + arms if n != "STD"]) if p]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    axes = axes[0]
    try:
        for ax, names in zip(axes, panels):
            if curve:
                ax.plot(*zip(*frontier([point[n] for n in curve], higher)), "-", color="C0", label="VAT's frontier")
                ax.plot(*zip(*(point[n] for n in curve)), "o", color="C0", label="STD, VAT_ε")
            own = sorted((n for n in arms if best_amat and n.split("-")[1] == best_amat.split("-")[1]),
                         key=lambda n: point[n][0])
            if own:
                ax.plot(*zip(*(point[n] for n in own)), "-s", color="C1",
                        label=f"AMAT-{best_amat.split('-')[1]}: its ξ levels, larger Δ")
            if arms:
                ax.scatter(*zip(*(point[n] for n in arms)), marker="x", color="k", label="AMAT arms", zorder=3)
            for n in names:
                ax.annotate(n, point[n], fontsize=7, xytext=(3, 3), textcoords="offset points")
            xs, ys = zip(*(point[n] for n in names))
            pad_x, pad_y = 0.1 * (max(xs) - min(xs)) or 0.01, 0.1 * (max(ys) - min(ys)) or 0.01
            ax.set_xlim(min(xs) - pad_x, max(xs) + pad_x)
            ax.set_ylim(min(ys) - pad_y, max(ys) + pad_y)
            ax.set_xlabel(f"clean {metric}")
            ax.set_ylabel(f"PGD average {metric}")
            ax.grid(alpha=0.3)
        for ax, title in zip(axes, ("all models", "adversarially trained models")):
            ax.set_title(title, fontsize=9)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / "pareto.png")
    finally:
        plt.close(fig)
    if history is None:
        return
    epochs = history["samples"]["margins_per_epoch"]
    fig, axes = plt.subplots(1, len(epochs), figsize=(2.4 * len(epochs), 2.6), sharey=True, squeeze=False)
    try:
        top = max(max(e) for e in epochs)
        for i, (ax, values) in enumerate(zip(axes[0], epochs)):
            ax.hist(values, bins=30, range=(0, top))
            ax.set_title(f"after epoch {i + 1}", fontsize=8)
            ax.set_xlabel("margin", fontsize=8)
        axes[0][0].set_ylabel("samples", fontsize=8)
        fig.suptitle(f"{best_amat}: margins per epoch", fontsize=9)
        fig.tight_layout()
        save_figure(fig, out / "margins.png")
    finally:
        plt.close(fig)


def write_margin_report(task: str, protocol: str, work: Path, results_dir: Path, resamples: int = 1000) -> None:
    """``results_dir/<task>/MARGINS.md``, ``study.json`` and the plots, from whatever stages are on disk."""
    spec, study = TASKS[task], study_settings(task, protocol)
    order = _model_order(work)
    val, test = _reports(work / "val", order), _reports(work / "test", order)
    out = results_dir / task / "margins"
    if out.is_dir():
        shutil.rmtree(out)
    for split in ("val", "test", "test-foreground", "spot-check"):
        for name, report in _reports(work / split, order).items():
            (out / split / name).mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / split / name / "robustness.json", json.dumps(report, indent=2))
    higher = next(iter(val.values()))["higher_is_better"] if val else True
    sign = 1.0 if higher else -1.0
    digits = 4 if higher else 2

    amat_val = [n for n in val if n.startswith("AMAT")]
    vat_val = [n for n in val if n.startswith("VAT")]
    best_amat = max(amat_val, key=lambda n: _robust_score(val[n])) if amat_val else None
    arms = [n for n in amat_val if n.count("-") == 1]
    best_arm = max(arms, key=lambda n: _robust_score(val[n])) if arms else None
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s)")
    lines = [f"## AMAT margin study: {spec['title']}", "",
             f"`python scripts/reproduce.py --experiment margins --protocol {protocol} --task {task}` on {machine}. "
             f"Settings: protocol `{protocol}` ({json.dumps(PROTOCOLS[protocol][task]['adversarial'])} for every "
             f"adversarial arm, fine-tuned from STD); study {json.dumps(study)}.", ""]
    study_json: dict[str, Any] = {"task": task, "protocol": protocol, "study": study, "best_arm_on_validation": best_arm,
                                  "best_amat_on_validation": best_amat}

    lines += ["### ξ and the feasibility of each condition on the STD model", "",
              "Share of the training samples that pass each condition on the STD model, clean (ε = 0) and under the "
              "PGD attack (L2, random start, the number of steps given) at AMAT's first margin Δ.", "",
              "| ξ level | terms ξ | total ξ | metric ξ | PGD steps | passing at ε (terms / total / metric) |",
              "|---|---|---|---|---|---|"]
    for xi_file in sorted((work / "xi").glob("*/xi.json")):
        xi = json.loads(xi_file.read_text())
        f = xi.get("feasibility") or {}
        shares = " ; ".join(f"ε={e:g}: " + " / ".join(f"{f[k][i]:.1%}" for k in ("terms", "total", "metric") if k in f)
                            for i, e in enumerate(f.get("eps", [])))
        metric = xi.get("metric") or {}
        lines.append(f"| {xi_file.parent.name} | {', '.join(f'{v:.4f}' for v in xi['xi'])} | {xi['total']['xi']:.4f} | "
                     f"{metric.get('xi', float('nan')):.4f} ({metric.get('name', '')}) | {f.get('attack_steps', '')} | "
                     f"{shares} |")
        study_json.setdefault("xi", {})[xi_file.parent.name] = {k: xi.get(k) for k in ("xi", "total", "metric", "feasibility")}
    lines.append("")

    if val:
        lines += ["### Validation split (choices are made here)", "", paper_table(list(val.values()), list(val)).markdown,
                  f"Best rule on validation: **{best_arm}**; best AMAT model: **{best_amat}** "
                  f"(highest PGD avg + IFGSM avg).", ""]
    if test:
        lines += ["### Test split (evaluated once)", "", paper_table(list(test.values()), list(test)).markdown]
    vat_test = [n for n in test if n.startswith("VAT")]
    comparisons: dict[str, Any] = {}
    if best_amat in test and vat_test and "STD" in test:
        best_vat = max(vat_test, key=lambda n: _robust_score(test[n]))  # the strongest comparator, on test itself
        metric, case_key = study["case_scores"]
        scores = {n: c for n in test if (c := _case_scores(work / "test" / n, metric, case_key, higher))}
        for n, c in scores.items():  # committed, so that a restored study compares new models case by case
            save_case_scores(c, out / "test" / n / CASE_SCORES, metric)
        curve = ["STD", *vat_test] if all(n in scores for n in ["STD", *vat_test]) else []
        committed = _restored(work).get("study", {})
        kept = committed.get("comparisons", {}) if committed.get("best_vat_on_test") == best_vat else {}
        carried: list[str] = []
        for n in (n for n in test if n.startswith("AMAT")):
            compared_here = n in scores and best_vat in scores
            if n in kept and not (compared_here and curve):  # a restored study: the committed, complete comparison
                comparisons[n], carried = kept[n], [*carried, n]
            elif compared_here:
                comparisons[n] = paired_bootstrap(scores, n, best_vat, curve, resamples=resamples)
        if not curve:  # a restored study lacks the curve's per-case scores: the gap's point estimate, from the reports
            points = [_summary(test[n]) for n in ["STD", *vat_test]]
            for n in (n for n in comparisons if n not in carried):
                for attack in ("pgd", "ifgsm"):
                    gap = sign * curve_gap(_summary(test[n]), points, attack, higher)
                    comparisons[n][f"curve_{attack}"] = {"estimate": gap, "low": math.nan, "high": math.nan, "n": 0}
        n_cases = len(scores["STD"].cases) if "STD" in scores else committed.get("n_test_cases")
        lines += [f"### AMAT against the best VAT ({best_vat}, the best on test) and against VAT's curve", "",
                  f"Paired bootstrap over the {n_cases} test cases ({resamples} resamples), 95 % intervals; "
                  "positive means AMAT is better. The curve is VAT's frontier: the line, in clean order, through "
                  "STD and the VAT_ε arms that no other of them beats on both clean and robust value "
                  f"(`amat_monai.comparison.frontier`, on the PGD avg resp. IFGSM avg; piecewise linear in clean "
                  f"{metric}); its gap is AMAT's robustness minus the frontier's at AMAT's clean value (blank: "
                  "AMAT's clean value lies outside it).", "",
                  "| model | clean − best VAT | PGD avg − best VAT | IFGSM avg − best VAT | PGD avg − curve | IFGSM avg − curve |",
                  "|---|---|---|---|---|---|"]
        for n, c in comparisons.items():
            cells = [_fmt(c[k], digits) if k in c and np.isfinite(c[k]["estimate"]) else "" for k in
                     ("clean", "pgd", "ifgsm", "curve_pgd", "curve_ifgsm")]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        missing = [n for n in ["STD", *vat_test] if n not in scores]
        if carried and not missing:
            lines += ["", f"The rows of {', '.join(carried)} are the committed ones: their per-case scores were not "
                      "committed, so they were bootstrapped when the study was first reported, against the VAT models "
                      "of that time (a VAT tested again with `--complete-intervals` after training again is not the "
                      "same model: training on CPU is not bit-reproducible here)."]
        if missing:
            lines += ["", f"This study was restored from its committed results (`--restore`), which lack the per-case "
                      f"scores of {', '.join(missing)} (tested before they were committed), so "
                      + (f"the rows of {', '.join(carried)} are the committed ones and " if carried else "")
                      + "the curve gaps of the models tested since are point estimates from the test reports, "
                      "without an interval (`--complete-intervals` tests those models again)."]
    tol = 0.02 if higher else 0.3

    def claim(name: str) -> tuple[dict[str, bool], bool]:
        """The paper's claim for ``name`` (against the best VAT on test), its lines appended to the report."""
        c = comparisons[name]
        clean_gap = test[name]["clean"] - test["STD"]["clean"]
        claims = {"pgd_above_best_vat": c["pgd"]["low"] > 0, "ifgsm_above_best_vat": c["ifgsm"]["low"] > 0,
                  "clean_within_tolerance_of_std": sign * clean_gap >= -tol}
        holds = all(claims.values())
        lines.extend(["", f"**The paper's claim for {name}** (PGD and IFGSM averages above the best VAT's with the "
                      f"interval excluding 0, clean within {tol:g} of STD): **{'holds' if holds else 'does not hold'}**.",
                      f"- PGD avg {test[name]['averages']['pgd']:.{digits}f} vs {best_vat} "
                      f"{test[best_vat]['averages']['pgd']:.{digits}f}: difference {_fmt(c['pgd'], digits)}",
                      f"- IFGSM avg {test[name]['averages']['ifgsm']:.{digits}f} vs {best_vat} "
                      f"{test[best_vat]['averages']['ifgsm']:.{digits}f}: difference {_fmt(c['ifgsm'], digits)}",
                      f"- clean {test[name]['clean']:.{digits}f} vs STD {test['STD']['clean']:.{digits}f} "
                      f"(difference {clean_gap:+.{digits}f})"])
        if not holds and "curve_pgd" in c:
            gap = c["curve_pgd"]
            where = _against_curve(gap)
            lines.append(f"- Against VAT's curve at the same clean {metric}: {name} lies **{where}** it (PGD avg gap "
                         f"{_fmt(gap, digits)})." if where else f"- Against VAT's curve at the same clean {metric}: PGD "
                         f"avg {_curve_cell(gap, digits)} (positive: above it).")
        lines.append("")
        return claims, holds

    if best_amat in comparisons:
        claims, holds = claim(best_amat)
        study_json.update({"best_vat_on_test": best_vat, "comparisons": comparisons, "claims": claims,
                           "claim_holds": holds, "n_test_cases": n_cases})

    history, fair = None, None
    committed = _restored(work).get("study", {})
    best_vat = study_json.get("best_vat_on_test") or (
        max(vat_val, key=lambda n: _robust_score(val[n])) if vat_val else None)
    epochs: list[dict[str, Any]] = []  # the chosen model's margins and outcomes per epoch
    if best_amat and (work / "runs" / best_amat / "margins.json").is_file():
        history = json.loads((work / "runs" / best_amat / "margins.json").read_text())
        fair = _fair_chance(history, float(best_vat.removeprefix("VAT")) if best_vat else 0.0)
        epochs = [{k: e[k] for k in ("epoch", "margins", "outcomes")} for e in history["epochs"]]
    elif best_amat and committed.get("best_amat_on_validation") == best_amat:
        # a restored study: the margin history is not committed, its summary and plot are
        fair, epochs = committed.get("fair_chance"), committed.get("margin_epochs", [])
        if (work / "margins.png").is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / "margins.png", out / "margins.png")
    if fair is not None:
        eps = fair["best_vat_eps"]
        study_json["fair_chance"] = fair
        lines += [f"### Did {best_amat}'s margins get a fair chance?", "",
                  f"- time-averaged training radius ≥ the best VAT's ε = {eps:g} for "
                  f"{fair['share_radius_reaching_best_vat_eps']:.1%} of samples (needed: ≥ 50 %); median "
                  f"{fair['median_mean_training_radius']:.2f}",
                  f"- at the floor without being a clean failure: {fair['share_at_floor_not_frozen']:.1%} (needed: "
                  f"≤ 10 %); frozen (clean failure) at the last visit: {fair['share_frozen_last_visit']:.1%}",
                  f"- fair-chance check: **{'passes' if fair['passes'] else 'fails'}**", "",
                  "| epoch | mean | q25 | median | q75 | max | grown | shrunk | frozen |", "|---|---|---|---|---|---|---|---|---|"]
        study_json["margin_epochs"] = epochs
        for e in epochs:
            m, o = e["margins"], e["outcomes"]
            lines.append(f"| {e['epoch']} | {m['mean']:.2f} | {m['q25']:.2f} | {m['median']:.2f} | {m['q75']:.2f} | "
                         f"{m['max']:.2f} | {o['grown']} | {o['shrunk']} | {o['frozen']} |")
        lines += ["", "![margins](margins/margins.png)", ""]
    # the other AMAT models' checks: from their margin history, else (a restored study) from the committed summary
    others, eps = {}, float(best_vat.removeprefix("VAT")) if best_vat else None
    for n in (n for n in order if n.startswith("AMAT") and n != best_amat) if best_vat else ():
        history_file = work / "runs" / n / "margins.json"
        if history_file.is_file():
            others[n] = _fair_chance(json.loads(history_file.read_text()), eps)
        elif committed.get("fair_chance_other_models", {}).get(n, {}).get("best_vat_eps") == eps:
            others[n] = committed["fair_chance_other_models"][n]
    if others:
        lines += [f"The other AMAT models whose margin history is at hand (or its summary, committed in `study.json`), "
                  f"against the same ε = {eps:g}:", "",
                  "| model | time-averaged radius ≥ ε | its median | at the floor, not a clean failure | fair chance |",
                  "|---|---|---|---|---|"]
        for n, f in others.items():
            study_json.setdefault("fair_chance_other_models", {})[n] = f
            lines.append(f"| {n} | {f['share_radius_reaching_best_vat_eps']:.1%} | {f['median_mean_training_radius']:.2f} | "
                         f"{f['share_at_floor_not_frozen']:.1%} | {'passes' if f['passes'] else 'fails'} |")
        lines.append("")
    passing = [n for n, f in study_json.get("fair_chance_other_models", {}).items()
               if f["passes"] and n in comparisons and n in val]
    if fair is not None and not fair["passes"] and passing:
        # the claim is only a fair test where the margins could reach VAT's radius: judged again on the most robust
        # AMAT (on validation) whose margins passed the check
        fair_amat = max(passing, key=lambda n: _robust_score(val[n]))
        lines += [f"### The claim for the most robust AMAT whose margins had a fair chance: {fair_amat}", "",
                  f"{best_amat}'s margins failed the fair-chance check, so the claim is judged again on {fair_amat}, "
                  f"the most robust on validation of the AMAT models whose margins passed it."]
        fair_claims, fair_holds = claim(fair_amat)
        study_json["fair_chance_claim"] = {"model": fair_amat, "claims": fair_claims, "claim_holds": fair_holds}

    foreground = _reports(work / "test-foreground", order)
    if foreground and task == "hippocampus":
        fg = {n: _on_metric(r, "dice_fg") for n, r in foreground.items()}
        lines += ["### Hippocampus on ALL foreground test slices (`dice_fg`: the classes in the label or the prediction)",
                  "", paper_table(list(fg.values()), list(fg)).markdown]
    spot = _reports(work / "spot-check", order)
    if spot:
        lines += [f"### PGD-{study['spot_check']['steps'][0]} spot check ({study['spot_check']['max_cases']} test cases)",
                  "", paper_table(list(spot.values()), list(spot)).markdown]
    best_vat_val = max(vat_val, key=lambda n: _robust_score(val[n])) if vat_val else None
    study_json["best_vat_on_validation"] = best_vat_val
    pending = [f"test {n}" for n in val if n not in test]
    pending += [f"test-foreground {n}" for n in ("STD", best_vat_val, best_amat)
                if task == "hippocampus" and n and n not in foreground]
    pending += [f"spot-check {n}" for n in (best_vat_val, best_amat) if n and n not in spot]
    if pending:
        lines += ["**Not run yet** (the study is resumable: its command continues it): " + ", ".join(pending) + ".", ""]
    sanity = {n: r["sanity"].get("passed") for split in (val, test, spot) for n, r in split.items()}
    lines += ["Evaluator sanity checks: " + ("all passed" if all(v is True for v in sanity.values()) else
              "; ".join(f"{n}: {v}" for n, v in sanity.items() if v is not True)), ""]
    if test:
        _plots(out, test, order, history, best_amat)
        lines += ["![pareto](margins/pareto.png)", ""]
    stages = json.loads((work / "stages.json").read_text()) if (work / "stages.json").is_file() else {}
    total = sum(v["seconds"] for v in stages.values()) / 60
    lines += ["Wall time: " + ", ".join(f"{k} {v['seconds'] / 60:.1f}" for k, v in stages.items())
              + f" (minutes; total {total:.1f}). A stage that was interrupted and resumed records the time of its "
              "last run only, so trainings resumed from a checkpoint in a later session show less than they took.", ""]
    study_json["stages"] = stages
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "study.json", json.dumps(study_json, indent=2, default=float))
    atomic_write_text(results_dir / task / "MARGINS.md", "\n".join(lines))


def claim_summary(results_dir: Path) -> list[str]:
    """Markdown lines: the paper's claim per task, from each task's ``margins/study.json`` (empty if none)."""
    rows = []
    for task in TASKS:
        path = results_dir / task / "margins" / "study.json"
        study = json.loads(path.read_text()) if path.is_file() else {}
        amat, vat = study.get("best_amat_on_validation"), study.get("best_vat_on_test")
        if not (amat and vat and "comparisons" in study):
            continue
        fair_claim = study.get("fair_chance_claim")
        judged = [(amat, "", study["claim_holds"], study.get("fair_chance", {}))]
        if fair_claim:  # the chosen model's margins failed the check: the claim judged again on one that passed
            model = fair_claim["model"]
            judged.append((model, " (the most robust with a fair chance)", fair_claim["claim_holds"],
                           study["fair_chance_other_models"][model]))
        folder = results_dir / task / "margins" / "test"
        test = {n: load_report(folder / n / "robustness.json") for n in ("STD", *(m for m, *_ in judged))}
        digits = 4 if test["STD"]["higher_is_better"] else 2
        sign = 1.0 if test["STD"]["higher_is_better"] else -1.0
        for model, note, holds, fair in judged:
            c = study["comparisons"][model]
            rows.append(f"| {task} ({test['STD']['metric']}) | {model}{note} | {vat} | {_fmt(c['pgd'], digits)} | "
                        f"{_fmt(c['ifgsm'], digits)} | {sign * (test[model]['clean'] - test['STD']['clean']):+.{digits}f} | "
                        f"**{'holds' if holds else 'does not hold'}** | "
                        f"{_curve_cell(c['curve_pgd'], digits) if 'curve_pgd' in c else 'n/a (not measured)'} | "
                        f"{'n/a' if 'passes' not in fair else 'passes' if fair['passes'] else 'fails'} |")
    if not rows:
        return []
    return ["## The paper's AMAT claim, per task (margin studies)", "",
            "AMAT chosen on the validation split (the most robust; where its margins failed the fair-chance check, "
            "a second row: the most robust whose margins passed it), evaluated once on test, against the best VAT on "
            "test; paired "
            "bootstrap 95 % intervals over test cases; in every column positive = AMAT better. The claim: PGD and IFGSM averages "
            "above the best VAT's with the interval excluding 0, clean within 0.02 Dice / 0.3 mm of STD. The curve "
            "column places AMAT against VAT's clean-vs-robust frontier at AMAT's clean value (PGD avg gap). Details "
            "and commands: each task's margin study below.", "",
            "| task | AMAT (validation choice) | best VAT | PGD avg vs best VAT | IFGSM avg vs best VAT | clean vs STD | "
            "claim | against VAT's curve | margins' fair chance |", "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def study_xi_file(work: Path, name: str) -> Path:
    """The ``xi.json`` an AMAT run of the study was trained with: the ξ level its ``run.json`` names (or, for weights
    put back by :func:`restore_margin_study`, the level the restore found), in ``work`` (which may have moved)."""
    run = work / "runs" / name / "run.json"
    if run.is_file():
        level = Path(json.loads(run.read_text())["identity"]["xi_file"]).parent.name
    else:
        level = _restored(work).get("xi_levels", {}).get(name)
        if level is None:
            raise FileNotFoundError(f"{run} is missing: which ξ {name} was trained with is unknown")
    return work / "xi" / level / "xi.json"


RESTORED = "restored.json"  # in a work folder that restore_margin_study rebuilt: what it started from


def _restored(work: Path) -> dict[str, Any]:
    path = work / RESTORED
    return json.loads(path.read_text()) if path.is_file() else {}


def restore_margin_study(task: str, work: Path, results_dir: Path, bundles: Path) -> list[str]:
    """Rebuild a study's work folder from what was committed (``--restore``), so that it goes on on a machine that
    lacks its runs instead of training every arm again; returns the stages restored.

    Put back: every report of ``results_dir/<task>/margins/<split>/<model>/`` with its stage record; the shipped
    weights (``bundles/<bundle>/models/``: the chosen AMAT, STD, the best VAT), each checked byte for byte against
    its test report, with the ξ file the AMAT was trained with; each ξ level from ``study.json``; the chosen
    model's margin plot (its margin history is not committed, its summary is in ``study.json``); the per-case scores
    of each test (``case_scores.json``), so that a model tested since is compared case by case. Where the best VAT's
    are missing (a study reported before they were committed), its test runs again; the report then keeps the
    committed comparisons of the other models, and VAT's curve, which needs every VAT's per-case scores, is left
    out for the new ones where any is missing. A model that was not shipped is trained again only if a stage
    that was not restored needs it.
    """
    if (work / "stages.json").is_file():
        raise SystemExit(f"{work} already holds a study (stages.json): --restore only fills an empty folder")
    committed = results_dir / task / "margins"
    if not (committed / "study.json").is_file():
        raise SystemExit(f"{task}: nothing to restore, {committed / 'study.json'} is missing")
    study = json.loads((committed / "study.json").read_text())
    models = bundles / TASKS[task]["bundle"] / "models"
    amat, vat = study["best_amat_on_validation"], study["best_vat_on_validation"]
    shipped = {"STD": models / "baselines" / "std.pt", vat: models / "baselines" / f"{vat.lower()}.pt", amat: models / "model.pt"}
    restored, records = {}, study["stages"]
    for name, source in shipped.items():
        sha = load_report(committed / "test" / name / "robustness.json")["checkpoint_sha256"]
        if file_sha256(source) != sha:
            raise SystemExit(f"{source} is not the {name} the study tested (sha256 {sha}); cannot restore")
        target = work / "runs" / name / "models" / "model.pt"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        restored[f"train {name}"] = records[f"train {name}"]
    shipped_xi = json.loads((models / "xi.json").read_text())
    level_of_amat = None
    for level, xi in study["xi"].items():  # the keys the report reads; the shipped level whole
        if all(xi[k] == shipped_xi.get(k) for k in ("xi", "total", "metric")):
            level_of_amat, xi = level, shipped_xi
        atomic_write_text(work / "xi" / level / "xi.json", json.dumps(xi, indent=2))
        restored[f"calibrate {level}"] = records[f"calibrate {level}"]
    if level_of_amat is None:
        raise SystemExit(f"{models / 'xi.json'} is none of the study's ξ levels ({sorted(study['xi'])}); cannot restore")
    for split in ("val", "test", "test-foreground", "spot-check"):
        for report in sorted((committed / split).glob("*/robustness.json")):
            name = report.parent.name
            stage = f"{'validate' if split == 'val' else split} {name}"
            has_cases = (report.parent / CASE_SCORES).is_file()
            if split == "test" and name == vat and not has_cases:
                continue  # run again: a model tested since is compared with it case by case
            (work / split / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report, work / split / name / "robustness.json")
            if split == "test" and has_cases:
                shutil.copyfile(report.parent / CASE_SCORES, work / split / name / CASE_SCORES)
            restored[stage] = records[stage]
    if (committed / "margins.png").is_file():  # the chosen model's margins per epoch, drawn from its history
        shutil.copyfile(committed / "margins.png", work / "margins.png")
    # every training keeps its record, so that the report orders the models as before; one without weights here
    # runs again only if a stage that is not restored needs it
    ordered = {k: v for k, v in records.items() if k in restored or k.startswith("train ")}
    atomic_write_text(work / "stages.json", json.dumps(ordered, indent=2))
    atomic_write_text(work / RESTORED, json.dumps({"study": study, "xi_levels": {amat: level_of_amat}}, indent=2))
    return [k for k in ordered if k in restored]


def ship_margin_study(task: str, work: Path, results_dir: Path, bundles: Path) -> None:
    """Ship the study's choices (``--ship``): its best AMAT on validation as ``models/model.pt`` with the ξ it was
    trained with, its STD and its best VAT on validation under ``models/baselines/``; only once all are tested."""
    study = json.loads((results_dir / task / "margins" / "study.json").read_text())
    amat, vat = study["best_amat_on_validation"], study.get("best_vat_on_validation")
    missing = [n for n in (amat, vat, "STD") if not n or not (work / "test" / n / "robustness.json").is_file()]
    if missing:
        raise SystemExit(f"{task}: the margin study has no test evaluation of {missing} yet; run it before --ship")
    evaluated = {n: load_report(work / "test" / n / "robustness.json")["checkpoint_sha256"] for n in ("STD", vat, amat)}
    ship_models(task, {name: work / "runs" / name / "models" / "model.pt" for name in ("STD", vat, amat)},
                amat, vat, study_xi_file(work, amat), bundles, evaluated)
