"""The entry point: run the grid, aggregate per-sample records into the report, write ``robustness.*``."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from amat_monai.checkpoints import atomic_write_text, file_sha256
from amat_monai.evaluation.engine import RobustEvaluator
from amat_monai.evaluation.grid import AttackSpec, build_cells, make_attacks
from amat_monai.evaluation.sanity import finite_or_none, sanity_checks
from amat_monai.metrics import SegmentationMetric, TaskMetric
from amat_monai.reporting import metric_tables, plot_runs, report_values

logger = logging.getLogger(__name__)

__all__ = ["robust_evaluate", "write_outputs"]


def _concat(records: list[dict], getter: Callable[[dict], torch.Tensor]) -> np.ndarray:
    return torch.cat([getter(r) for r in records]).numpy() if records else np.zeros(0)


def robust_evaluate(
    network: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dataloader: Iterable,
    metric: TaskMetric | None = None,
    attacks: Sequence[str] | Sequence[AttackSpec] = ("pgd", "ifgsm"),
    eps: Sequence[float] = (2.0, 6.0, 10.0),
    *,
    task: str = "segmentation",
    steps: Sequence[int] | int | None = None,
    norm: str = "l2",
    restarts: int = 1,
    clamp: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    inferer: Callable | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    seed: int = 0,
    sanity: bool = True,
    sanity_steps: int = 20,
    large_eps_factor: float = 10.0,
    noise_ratio: float = 0.5,
    progress: bool = True,
    input_scores: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    **evaluator_kwargs: Any,
) -> dict[str, Any]:
    """Score ``network`` on clean and attacked inputs over a grid of attacks × noise levels.

    Args:
        network: the trained network (evaluated and attacked in eval mode).
        loss_fn: the task's per-sample training loss terms (``[B]`` or ``[B, K]``), e.g. the bundle's
            ``loss_terms``; attacks maximise their sum against the true label.
        dataloader: the test loader; dict batches with ``"image"``, ``"label"``, ideally ``"sample_id"`` and the
            metric's ``meta_keys`` (``"case"``, ``"slice"`` for 2D segmentation).
        metric: the task metric (default :class:`~amat_monai.metrics.SegmentationMetric`).
        attacks: attack names (``pgd``, ``ifgsm``, ``fgsm``, ``noise``) or :class:`AttackSpec` objects.
        eps: noise levels in input units; ``0`` may be included (it must score the clean value).
        task: ``"segmentation"``, ``"landmarks"`` or ``"detection"``: the step sizes for that task.
        steps, norm, restarts, clamp: see :func:`make_attacks` (ignored for :class:`AttackSpec` entries).
        device: default: the network's device.
        inferer: optional ``inferer(x, network)`` (e.g. a MONAI inferer); attacks and scoring both use it.
        output_dir: when given, write ``robustness.json/.csv/.md/.png`` there (atomically).
        checkpoint: the weights' path, recorded in the report (with its SHA-256).
        name: the model's name in the markdown row (default: the checkpoint's or output folder's name).
        seed: seed of the random attacks.
        sanity: run the sanity checks (and the extra cells they need).
        sanity_steps: at most this many steps in the extra cells of the sanity checks.
        large_eps_factor: the large-ε check attacks at this multiple of the largest ε.
        noise_ratio: noise may do at most this fraction of the gradient attack's damage.
        progress: show a progress bar.
        input_scores: ``{name: fn}`` scoring each clean and attacked input (``[B]``), written to the CSV as
            ``score_<name>`` (see :class:`RobustEvaluator`).
        evaluator_kwargs: passed to :class:`RobustEvaluator` (e.g. ``prepare_batch``, ``val_handlers``).

    Returns:
        The report, as written to ``robustness.json`` (plus ``"rows"``, the per-sample records, which are only
        written to the CSV).
    """
    metric = metric or SegmentationMetric()
    if not isinstance(metric, TaskMetric):
        raise TypeError(f"metric must be an amat_monai.metrics.TaskMetric, got {type(metric).__name__}")
    eps = [float(e) for e in eps]
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise ValueError(f"eps must be a non-empty list of finite non-negative numbers, got {eps}")
    if len(set(eps)) != len(eps):
        raise ValueError(f"eps values repeat: {eps}")
    if all(isinstance(a, AttackSpec) for a in attacks):
        specs = list(attacks)  # type: ignore[arg-type]
    else:
        specs = make_attacks([str(a) for a in attacks], task=task, steps=steps, norm=norm, restarts=restarts,
                             clamp=clamp)
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    cells, large_cell = build_cells(specs, eps, sanity, sanity_steps, large_eps_factor)

    evaluator = RobustEvaluator(device, dataloader, network, loss_fn, metric, cells, inferer=inferer, seed=seed,
                                progress=progress, input_scores=input_scores, **evaluator_kwargs)
    was_training = network.training
    start = time.perf_counter()
    try:
        evaluator.run()
    finally:
        network.train(was_training)
    seconds = time.perf_counter() - start
    records = evaluator.records
    if not records:
        raise ValueError("the test data loader yielded no batches")

    ids = [i for r in records for i in r["ids"]]
    meta = {"sample_id": ids, **{k: [v for r in records for v in r["meta"][k]] for k in metric.meta_keys}}
    n = len(ids)

    def _columns(getter: Callable[[dict], dict]) -> dict[str, np.ndarray]:
        keys = getter(records[0])["values"].keys()
        return {k: _concat(records, lambda r, k=k: getter(r)["values"][k]) for k in keys}

    clean_cols = _columns(lambda r: r["clean"])
    clean_summary = metric.aggregate(clean_cols, meta)
    clean = float(clean_summary[metric.name])
    grad_norm = _concat(records, lambda r: r["clean"]["grad_norm"])
    zero_grad = int((grad_norm == 0).sum())

    csv_rows: list[dict[str, Any]] = []

    def _add_csv(attack: str, nm: str, e: float, steps_: int, step_size: float | None, restarts_: int, role: str,
                 cols: dict[str, np.ndarray], loss: np.ndarray, extra: dict[str, np.ndarray]) -> None:
        for i in range(n):
            row = {"sample_id": ids[i], **{k: meta[k][i] for k in metric.meta_keys}, "attack": attack, "norm": nm,
                   "eps": e, "steps": steps_, "step_size": step_size, "restarts": restarts_, "role": role,
                   "loss": float(loss[i])}
            row.update({k: float(v[i]) for k, v in extra.items()})
            row.update({k: float(v[i]) for k, v in cols.items() if not k.startswith("_")})
            csv_rows.append(row)

    _add_csv("clean", "", 0.0, 0, None, 1, "clean", clean_cols, _concat(records, lambda r: r["clean"]["loss"]),
             {"grad_norm": grad_norm})

    results, extras, overshoot = [], [], 0.0
    large_eps_result = None
    for cell in cells:
        cols = _columns(lambda r, c=cell: r["cells"][c.key])
        summary = metric.aggregate(cols, meta)
        delta = _concat(records, lambda r, c=cell: r["cells"][c.key]["delta_norm"])
        overshoot = max(overshoot, float(np.max(delta - cell.eps, initial=0.0)) / max(cell.eps, 1e-12)
                        if cell.eps > 0 else float(np.max(delta, initial=0.0)))
        spec = cell.spec
        row = {
            "attack": spec.name,
            "label": spec.label,
            "norm": spec.norm,
            "eps": cell.eps,
            "steps": spec.effective_steps,
            "step_size": spec.step_size(cell.eps),
            "restarts": spec.effective_restarts,
            "random_start": bool(spec.random_start and spec.name == "pgd"),
            "value": float(summary[metric.name]),
            "metrics": {k: finite_or_none(v) for k, v in summary.items()},
            "seconds": round(evaluator.seconds.get(cell.key, 0.0), 4),
        }
        (results if cell.role == "grid" else extras).append(row)
        if cell is large_cell:
            large_eps_result = {"attack": spec.name, "eps": cell.eps, "steps": spec.effective_steps,
                                "value": row["value"]}
        _add_csv(spec.name, spec.norm, cell.eps, row["steps"], row["step_size"], row["restarts"], cell.role, cols,
                 _concat(records, lambda r, c=cell: r["cells"][c.key]["loss"]),
                 {"delta_norm": delta, "restart": _concat(records, lambda r, c=cell: r["cells"][c.key]["restart"])})

    averages = {}
    for spec in specs:
        vals = [r["value"] for r in results if r["attack"] == spec.name and r["norm"] == spec.norm and r["eps"] > 0]
        finite = [v for v in vals if math.isfinite(v)]
        averages[spec.name if spec.norm == "l2" else f"{spec.name}-linf"] = float(np.mean(finite)) if finite else None

    report: dict[str, Any] = {
        "task": task,
        "metric": metric.name,
        "higher_is_better": bool(metric.higher_is_better),
        "digits": int(getattr(metric, "digits", 4 if metric.higher_is_better else 2)),
        "name": name or _default_name(checkpoint, output_dir),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "n_samples": n,
        "clean": clean,
        "clean_metrics": {k: finite_or_none(v) for k, v in clean_summary.items()},
        "reported_metrics": [k for k in getattr(metric, "reported", ()) if k in clean_summary],
        "results": results,
        "averages": averages,
        "throughput": {
            "seconds": round(seconds, 3),
            "samples_per_second": round(n / seconds, 4) if seconds > 0 else None,
            "attacked_samples_per_second": round(n * len(cells) / seconds, 4) if seconds > 0 else None,
        },
        "device": str(device),
        "seed": seed,
    }
    if sanity:
        # the large-ε cell joins the others: PGD must not improve there either
        rows_for_checks = [{"attack": r["attack"], "norm": r["norm"], "eps": r["eps"], "value": r["value"]}
                           for r in results + extras]
        report["sanity"] = sanity_checks(metric, clean, rows_for_checks, zero_grad, large_eps_result,
                                         noise_ratio=noise_ratio, max_overshoot=overshoot)
        report["sanity"]["extra_results"] = extras
        for message in report["sanity"]["warnings"]:
            logger.warning(f"sanity check failed: {message}")
            warnings.warn(f"robust evaluation sanity check failed: {message}", RuntimeWarning, stacklevel=2)
    else:
        report["sanity"] = {"passed": None, "warnings": [], "checks": {}, "zero_gradient_samples": zero_grad}
    report["sanity"]["zero_gradient_samples"] = zero_grad
    if output_dir is not None:
        write_outputs(output_dir, report, csv_rows)
    report["rows"] = csv_rows
    return report


def _default_name(checkpoint: str | os.PathLike | None, output_dir: str | os.PathLike | None) -> str:
    """A run's name: ``runs/amat/models/model.pt`` -> ``amat``; else the checkpoint's or output folder's name."""
    if checkpoint:
        path = Path(checkpoint)
        return path.parent.parent.name if path.parent.name == "models" and path.parent.parent.name else path.stem
    return Path(output_dir).name if output_dir else "model"


# --------------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def write_outputs(output_dir: str | os.PathLike, report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``robustness.json``, ``robustness.csv``, ``robustness.md`` and ``robustness.png`` atomically."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if k != "rows"}
    atomic_write_text(out / "robustness.json", json.dumps(_json_safe(public), indent=2) + "\n")
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    atomic_write_text(out / "robustness.csv", buffer.getvalue())
    atomic_write_text(out / "robustness.md", "\n".join(t.markdown for t in metric_tables([public])))
    plot_runs([public], out / "robustness.png", values=report_values([public]))


