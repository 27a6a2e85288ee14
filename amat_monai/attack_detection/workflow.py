"""Fitting a bundle's detectors (clean training and validation data) and measuring them under attack.

:func:`fit_detectors` fits :class:`FeatureDensityDetector` on the clean training split, sets both detectors'
thresholds on the clean validation split, and writes ``detector.npz`` + ``detector.json`` (provenance: the
checkpoint's SHA-256, the layers, the cases of each split used, the thresholds and their false-positive rates).

:func:`evaluate_detectors` runs the robust evaluator's attack grid (plus random noise of the same norms) with the
detectors scoring every clean and attacked input, then the adaptive attack: PGD on the task loss minus
``weight`` × the density detector's score (white box against model and detector). It reports ROC-AUC and the
detection rates per attack and ε, on all attacks and on the successful ones only, per sample and per volume.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from amat_monai.attack_detection.detector import (
    FeatureDensityDetector,
    SqueezeDisagreement,
    detector_paths,
    per_volume_max,
    threshold_at,
)
from amat_monai.attacks import per_sample_terms
from amat_monai.checkpoints import atomic_write_text, file_sha256, load_checkpoint, read_json
from amat_monai.evaluation import make_attacks, robust_evaluate
from amat_monai.metrics import TaskMetric

logger = logging.getLogger(__name__)

__all__ = ["roc_auc", "DetectorAwareModel", "AdaptiveLoss", "fit_detectors", "load_detectors", "squeeze_baseline",
           "evaluate_detectors", "detection_table"]


def roc_auc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """Area under the ROC curve: P(positive scores above negative), ties counted half (Mann–Whitney U)."""
    neg, pos = np.asarray(negatives, dtype=float), np.asarray(positives, dtype=float)
    if neg.size == 0 or pos.size == 0:
        return float("nan")
    both = np.concatenate([neg, pos])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(both.size)
    sorted_scores = both[order]
    # average ranks over ties
    start = 0
    while start < both.size:
        stop = start
        while stop + 1 < both.size and sorted_scores[stop + 1] == sorted_scores[start]:
            stop += 1
        ranks[order[start: stop + 1]] = (start + stop) / 2.0 + 1.0
        start = stop + 1
    u = ranks[neg.size:].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))


class DetectorAwareModel(nn.Module):
    """The network as the adaptive attacker sees it: each forward pass also scores its input with ``detector``.

    The score of the last pass is kept in ``last_score`` for :class:`AdaptiveLoss`, so that an attack that calls
    ``model(x)`` and then ``loss(pred, y)`` differentiates through the network and the detector together.
    """

    def __init__(self, network: nn.Module, detector: nn.Module) -> None:
        super().__init__()
        self.network, self.detector = network, detector
        self.last_score: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        self.last_score = self.detector.score_output(x, out)
        return out


class AdaptiveLoss:
    """The adaptive attacker's loss: the task's per-sample terms and ``-weight`` × the detector's score of the
    input (from ``model``, the :class:`DetectorAwareModel` that made the prediction): the attack climbs the task
    loss while keeping its input unsuspicious."""

    def __init__(self, loss_fn: Callable, model: DetectorAwareModel, weight: float) -> None:
        self.loss_fn, self.model, self.weight = loss_fn, model, float(weight)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = per_sample_terms(self.loss_fn(pred, target), pred.shape[0])
        if self.model.last_score is None:
            raise RuntimeError("AdaptiveLoss: the DetectorAwareModel has not scored a forward pass yet")
        return torch.cat([terms, -self.weight * self.model.last_score.to(terms)[:, None]], dim=1)


def _case_of(batch: Mapping[str, Any], n: int) -> list[str]:
    for key in ("case", "sample_id"):
        value = batch.get(key)
        if value is not None:
            value = value.tolist() if isinstance(value, torch.Tensor) else list(value)
            if len(value) == n:
                return [str(v) for v in value]
    return [f"sample {i}" for i in range(n)]


@torch.no_grad()
def _clean_scores(detectors: Mapping[str, nn.Module], loader: Iterable, device: torch.device | str,
                  progress: bool) -> tuple[dict[str, np.ndarray], list[str]]:
    scores: dict[str, list[np.ndarray]] = {name: [] for name in detectors}
    cases: list[str] = []
    for batch in tqdm(loader, desc="detector: validation scores", disable=not progress, leave=False):
        x = torch.as_tensor(batch["image"]).float().to(device)
        cases += _case_of(batch, x.shape[0])
        for name, detector in detectors.items():
            scores[name].append(detector(x).double().cpu().numpy())
    if not cases:
        raise ValueError("the detector's threshold loader yielded no batches")
    return {k: np.concatenate(v) for k, v in scores.items()}, cases


def _cases_of_loader(loader: Iterable) -> list[str]:
    data = getattr(loader, "dataset", None)
    items = getattr(data, "data", None) or getattr(data, "items", None)
    if isinstance(items, (list, tuple)):
        found = {str(i.get("case", i.get("sample_id"))) for i in items if isinstance(i, Mapping)}
        if found - {"None"}:
            return sorted(found - {"None"})
    return []


def fit_detectors(
    network: nn.Module,
    checkpoint: str | os.PathLike,
    fit_loader: Iterable,
    threshold_loader: Iterable,
    layers: Sequence[str],
    *,
    statistics: Sequence[str] = ("mean", "std"),
    probabilities: str = "softmax",
    false_positive_rate: float = 0.05,
    device: torch.device | str = "cpu",
    output_dir: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
    slice_size: Sequence[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fit the density detector on ``fit_loader``, set both detectors' thresholds on ``threshold_loader``.

    Writes ``detector.npz`` and ``detector.json`` into ``output_dir`` (default: the checkpoint's folder) and
    returns the json's content. Both loaders must yield clean, unaugmented ``{"image", "case" | "sample_id"}``
    batches of the training and validation splits; the test split is never read. ``slice_size``: the size of
    the slices of volumes the loaders yield, recorded so that :func:`screen` brings served slices to it.
    """
    load_checkpoint(network, checkpoint, device)
    network.eval()
    density = FeatureDensityDetector(network, layers, statistics).fit(fit_loader, device, progress=progress)
    squeeze = SqueezeDisagreement(network, probabilities)
    detectors = {"density": density, "squeeze": squeeze}
    scores, cases = _clean_scores(detectors, threshold_loader, device, progress)
    per_volume = len(set(cases)) < len(cases)  # slices of volumes
    summary: dict[str, Any] = {}
    for name, detector in detectors.items():
        thresholds = {"sample": threshold_at(scores[name], false_positive_rate)}
        measured = {"sample": float(np.mean(scores[name] > thresholds["sample"]))}
        if per_volume:
            volumes = np.array(list(per_volume_max(scores[name], cases).values()))
            thresholds["volume"] = threshold_at(volumes, false_positive_rate)
            measured["volume"] = float(np.mean(volumes > thresholds["volume"]))
        detector.thresholds = thresholds
        summary[name] = {"thresholds": thresholds, "validation_false_positive_rate": measured}
    npz, js = detector_paths(checkpoint) if output_dir is None else (Path(output_dir) / "detector.npz",
                                                                        Path(output_dir) / "detector.json")
    extra = {
        "false_positive_rate": false_positive_rate,
        "squeeze": {"probabilities": probabilities, "kernel_size": squeeze.kernel_size, **summary["squeeze"]},
        "validation_false_positive_rate": summary["density"]["validation_false_positive_rate"],
        "split_file": str(split_file) if split_file else None,
        "slice_size": [int(v) for v in slice_size] if slice_size is not None else None,
        "fit_cases": _cases_of_loader(fit_loader),
        "threshold_cases": sorted(set(cases)),
        "n_threshold_samples": len(cases),
    }
    density.save(npz, js, checkpoint, extra)
    density.remove_hooks()
    logger.info(f"detector: wrote {npz} and {js}; thresholds {summary}")
    return read_json(js)


def load_detectors(network: nn.Module, checkpoint: str | os.PathLike,
                   detector_json: str | os.PathLike | None = None) -> dict[str, nn.Module]:
    """The density detector and the squeeze baseline of ``checkpoint`` (refused if fitted on other weights)."""
    npz, js = detector_paths(checkpoint)
    if detector_json is not None:
        js = Path(detector_json)
        npz = js.parent / read_json(js).get("statistics_file", "detector.npz")
    for path in (js, npz):
        if not Path(path).is_file():
            raise FileNotFoundError(f"detector file not found: {path} (fit it with `amat-monai detector fit`)")
    density = FeatureDensityDetector.load(network, npz, js, checkpoint)
    return {"density": density, "squeeze": squeeze_baseline(network, density.provenance)}


def squeeze_baseline(network: nn.Module, provenance: Mapping[str, Any]) -> SqueezeDisagreement:
    """The squeeze baseline that ``detector.json`` (its ``provenance``) describes, with its thresholds."""
    info = provenance["squeeze"]
    squeeze = SqueezeDisagreement(network, info["probabilities"], info["kernel_size"])
    squeeze.thresholds = {k: float(v) for k, v in info["thresholds"].items()}
    return squeeze


#: robustness.csv columns that stay text
_TEXT_COLUMNS = {"sample_id", "attack", "norm", "role"}


def _record(folder: Path, statistics: str, report: dict[str, Any]) -> dict[str, Any]:
    atomic_write_text(folder / "detector_statistics.sha256", statistics + "\n")
    return report


def _cached(folder: Path, checkpoint: str | os.PathLike, statistics: str, grid: Sequence, eps: Sequence[float],
            metric: TaskMetric) -> dict[str, Any] | None:
    """A finished robust evaluation in ``folder`` of the same checkpoint, detector statistics and grid, with its
    per-sample rows read back from ``robustness.csv``; ``None`` when there is none."""
    files = [folder / n for n in ("robustness.json", "robustness.csv", "detector_statistics.sha256")]
    if not all(f.is_file() for f in files) or files[2].read_text().strip() != statistics:
        return None
    report = read_json(files[0])
    wanted = {(spec.name, float(e), spec.effective_steps) for spec in grid for e in eps}
    if report.get("checkpoint_sha256") != file_sha256(checkpoint) or \
            {(r["attack"], float(r["eps"]), int(r["steps"])) for r in report["results"]} != wanted:
        return None
    text = _TEXT_COLUMNS | set(metric.meta_keys)
    with open(files[1], newline="") as f:
        rows = [{k: (v if k in text else (float(v) if v != "" else float("nan"))) for k, v in r.items()}
                for r in csv.DictReader(f)]
    for r in rows:
        r["steps"] = int(r["steps"])
    logger.info(f"detector evaluation: reusing the finished run in {folder}")
    return {**report, "rows": rows}


def _rates(clean: np.ndarray, attacked: np.ndarray, threshold: float | None, fpr: float) -> dict[str, Any]:
    row: dict[str, Any] = {"n": int(attacked.size), "auc": roc_auc(clean, attacked)}
    if attacked.size:
        row["detected_at_threshold"] = float(np.mean(attacked > threshold)) if threshold is not None else None
        row["detected_at_fpr"] = float(np.mean(attacked > threshold_at(clean, fpr))) if clean.size else None
    return row


def detection_table(rows: Sequence[Mapping[str, Any]], detectors: Mapping[str, nn.Module], metric_name: str,
                    higher_is_better: bool, success_margin: float, fpr: float, volume_key: str | None,
                    source: str) -> list[dict[str, Any]]:
    """Per detector, attack and ε: AUC and detection rates from the robust evaluator's per-sample rows."""
    clean = [r for r in rows if r["role"] == "clean"]
    clean_by_id = {r["sample_id"]: r for r in clean}
    cells: dict[tuple, list] = {}
    for r in rows:
        if r["role"] == "grid":
            cells.setdefault((r["attack"], r["eps"], r["steps"]), []).append(r)
    out = []
    for name, detector in detectors.items():
        column = f"score_{name}"
        clean_scores = np.array([r[column] for r in clean])
        thresholds = getattr(detector, "thresholds", {}) or {}
        for (attack, eps, steps), cell in cells.items():
            attacked = np.array([r[column] for r in cell])
            sign = 1.0 if higher_is_better else -1.0
            damage = np.array([sign * (clean_by_id[r["sample_id"]][metric_name] - r[metric_name]) for r in cell])
            success = np.nan_to_num(damage, nan=-np.inf) >= success_margin
            row = {"detector": name, "source": source, "attack": attack, "eps": eps, "steps": steps,
                   "clean_false_positive_rate": float(np.mean(clean_scores > thresholds["sample"]))
                   if "sample" in thresholds else None,
                   **_rates(clean_scores, attacked, thresholds.get("sample"), fpr),
                   "successful": _rates(clean_scores, attacked[success], thresholds.get("sample"), fpr)}
            if volume_key and "volume" in thresholds and all(volume_key in r for r in cell):
                clean_v = np.array(list(per_volume_max(clean_scores, [r[volume_key] for r in clean]).values()))
                adv_v = np.array(list(per_volume_max(attacked, [r[volume_key] for r in cell]).values()))
                row["volume"] = {**_rates(clean_v, adv_v, thresholds["volume"], fpr),
                                 "clean_false_positive_rate": float(np.mean(clean_v > thresholds["volume"]))}
            out.append(row)
    return out


def _markdown(table: Sequence[Mapping[str, Any]], name: str) -> str:
    def pct(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.1f}"

    def auc(v: Any) -> str:
        return "–" if v is None or not math.isfinite(v) else f"{v:.3f}"

    lines = [f"### {name}", "",
             "| detector | attack | ε | AUC | detected at threshold (%) | at 5 % FPR (%) | successful: n | AUC | "
             "detected (%) | volumes: AUC | detected (%) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        s, v = r["successful"], r.get("volume") or {}
        attack = f"{r['attack']}-{r['steps']}" if r["attack"] in ("pgd", "ifgsm") else r["attack"]
        attack += "" if r["source"] == "grid" else f" adaptive ({r['source']})"
        lines.append(f"| {r['detector']} | {attack} | {r['eps']:g} | {auc(r['auc'])} | "
                     f"{pct(r.get('detected_at_threshold'))} | {pct(r.get('detected_at_fpr'))} | {s['n']} | "
                     f"{auc(s['auc'])} | {pct(s.get('detected_at_threshold'))} | {auc(v.get('auc'))} | "
                     f"{pct(v.get('detected_at_threshold'))} |")
    return "\n".join(lines) + "\n"


def evaluate_detectors(
    network: nn.Module,
    loss_fn: Callable,
    dataloader: Iterable,
    metric: TaskMetric,
    checkpoint: str | os.PathLike,
    *,
    attacks: Sequence[str] = ("pgd", "ifgsm"),
    eps: Sequence[float] = (2.0, 6.0, 10.0),
    steps: Sequence[int] | None = None,
    task: str = "segmentation",
    norm: str = "l2",
    clamp: Sequence[float] | None = None,
    adaptive_weights: Sequence[float] = (1.0,),
    adaptive_detectors: Sequence[str] = ("density", "squeeze"),
    adaptive_steps: int | None = None,
    detector_json: str | os.PathLike | None = None,
    success_margin: float | None = None,
    false_positive_rate: float = 0.05,
    device: torch.device | str = "cpu",
    inferer: Callable | None = None,
    output_dir: str | os.PathLike = "detection",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure the detectors of ``checkpoint`` on clean and attacked test inputs; writes ``detection.json/.md``.

    Random noise of every ε joins the grid (it should not be flagged). The adaptive attack (PGD on the task loss
    minus ``weight`` × the detector's score, through :class:`DetectorAwareModel`) runs against each of
    ``adaptive_detectors`` at each of ``adaptive_weights``. ``success_margin``: an attack succeeded when it lowered
    the metric by at least this much (raised it, for errors); default 0.1 for Dice-like metrics and 1.0 (mm) for
    errors. Each robust evaluation's folder (``attacks/``, ``adaptive-<detector>-<weight>/``) is reused when it
    holds a finished run of the same checkpoint, detector statistics and attack grid.
    """
    load_checkpoint(network, checkpoint, device)
    network.eval()
    detectors = load_detectors(network, checkpoint, detector_json)
    statistics = detectors["density"].statistics_sha256
    names = [a for a in attacks if a != "noise"]
    specs = make_attacks([*names, "noise"], task=task, steps=[*steps, 1] if steps else None, norm=norm, clamp=clamp)
    out = Path(output_dir)
    common = dict(metric=metric, eps=eps, task=task, device=device, inferer=inferer, checkpoint=checkpoint,
                  seed=seed, sanity=False, progress=progress, input_scores=detectors)

    def run(folder: Path, model: nn.Module, loss: Callable, grid: list) -> dict[str, Any]:
        return _cached(folder, checkpoint, statistics, grid, eps, metric) or _record(
            folder, statistics, robust_evaluate(model, loss, dataloader, attacks=grid, output_dir=folder, **common))

    report = run(out / "attacks", network, loss_fn, specs)
    if success_margin is None:
        success_margin = 0.1 if report["higher_is_better"] else 1.0
    volume_key = "case" if "case" in getattr(metric, "meta_keys", ()) else None
    args = (detectors, report["metric"], report["higher_is_better"], success_margin, false_positive_rate, volume_key)
    table = detection_table(report["rows"], *args, source="grid")
    pgd = next((s for s in specs if s.name == "pgd"), None)
    adaptive = make_attacks(["pgd"], task=task, steps=[adaptive_steps or (pgd.effective_steps if pgd else 20)],
                            norm=norm, clamp=clamp)
    for target in adaptive_detectors:
        for weight in adaptive_weights:
            aware = DetectorAwareModel(network, detectors[target])
            rep = run(out / f"adaptive-{target}-{weight:g}", aware, AdaptiveLoss(loss_fn, aware, weight), adaptive)
            table += detection_table(rep["rows"], *args, source=f"against {target}, weight {weight:g}")
    result = {
        "checkpoint": str(checkpoint),
        "metric": report["metric"],
        "success_margin": success_margin,
        "false_positive_rate": false_positive_rate,
        "n_samples": report["n_samples"],
        "clean": report["clean"],
        "attack_values": {f"{r['attack']}{r['eps']:g}": r["value"] for r in report["results"]},
        "detector": {k: v for k, v in detectors["density"].provenance.items()
                     if k not in ("fit_cases", "threshold_cases")},
        "rows": table,
    }
    atomic_write_text(out / "detection.json", json.dumps(result, indent=2, default=float) + "\n")
    name = Path(checkpoint).parent.parent.name if Path(checkpoint).parent.name == "models" else Path(checkpoint).stem
    atomic_write_text(out / "detection.md", _markdown(table, name))
    for d in detectors.values():
        if isinstance(d, FeatureDensityDetector):
            d.remove_hooks()
    return result
