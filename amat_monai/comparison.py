"""Comparing training methods with confidence: paired bootstrap over test cases, and the clean-vs-robust curve.

Every model of a comparison is evaluated on the same test samples (:func:`amat_monai.evaluation.robust_evaluate`
writes one ``robustness.csv`` row per sample and attack cell). A *case* is the unit that is resampled: a volume
for slice-wise segmentation (its slices stay together, since they are not independent), an image for landmarks.
A resample draws cases with replacement, and every model is scored on the same draw, so the interval of a
difference accounts for the pairing.

The reported summaries are those of the papers: the clean value and, per attack, the mean over the noise levels
of the mean over samples (``PGD avg``, ``IFGSM avg``).

VAT's curve is its frontier: the piecewise-linear line, in clean order, through those (clean, robust) points of STD
and VAT_ε that no other of them beats on both (a VAT arm that is both less accurate and less robust than another
is not a trade-off VAT offers). :func:`curve_gap` is how far a model lies above that line at its own clean score:
positive means more robust than VAT would be at the same clean accuracy.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from amat_monai.checkpoints import atomic_write_text

__all__ = ["CaseScores", "read_case_scores", "save_case_scores", "load_case_scores", "paired_bootstrap", "frontier",
           "curve_value", "curve_gap", "SUMMARIES"]

#: the summaries of a model: ``clean`` and each attack's average over its noise levels
SUMMARIES = ("clean", "pgd", "ifgsm")


@dataclass
class CaseScores:
    """Per-case sums and counts of a per-sample metric, for each attack cell.

    Attributes:
        cases: the case ids, sorted.
        cells: ``{(attack, eps): (sums [C], counts [C])}``; ``("clean", 0.0)`` is the clean input.
        higher_is_better: the metric's direction.
    """

    cases: list[str]
    cells: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]]
    higher_is_better: bool

    def summary(self, weights: np.ndarray | None = None) -> dict[str, float]:
        """``clean`` and per-attack averages, with each case counted ``weights[c]`` times (default once)."""
        w = np.ones(len(self.cases)) if weights is None else weights
        means: dict[tuple[str, float], float] = {}
        for key, (sums, counts) in self.cells.items():
            n = float((w * counts).sum())
            means[key] = float((w * sums).sum()) / n if n > 0 else math.nan
        out = {"clean": means.get(("clean", 0.0), math.nan)}
        for attack in sorted({a for a, e in self.cells if a != "clean"}):
            values = [v for (a, e), v in means.items() if a == attack and e > 0]
            out[attack] = float(np.mean(values)) if values else math.nan
        return out


def read_case_scores(csv_path: str | os.PathLike, metric: str, case_key: str = "case",
                     higher_is_better: bool = True) -> CaseScores:
    """Per-case scores of ``metric`` from a ``robustness.csv`` (rows of role ``clean`` and ``grid``).

    Args:
        csv_path: the evaluator's per-sample CSV.
        metric: the column (``dice``, ``dice_fg``, ``mre``); empty (undefined) values are skipped.
        case_key: the column that groups samples into cases (``case`` for slices; ``sample_id`` for images).
        higher_is_better: the metric's direction.
    """
    sums: dict[tuple[str, float], dict[str, float]] = {}
    counts: dict[tuple[str, float], dict[str, int]] = {}
    cases: set[str] = set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        for field in (metric, case_key, "attack", "eps", "role"):
            if field not in (reader.fieldnames or []):
                raise ValueError(f"{csv_path} has no column {field!r} (columns: {reader.fieldnames})")
        for row in reader:
            if row["role"] not in ("clean", "grid") or row[metric] in ("", "nan"):
                continue
            key = (row["attack"], float(row["eps"]))
            case = row[case_key]
            cases.add(case)
            sums.setdefault(key, {})[case] = sums.get(key, {}).get(case, 0.0) + float(row[metric])
            counts.setdefault(key, {})[case] = counts.get(key, {}).get(case, 0) + 1
    if ("clean", 0.0) not in sums:
        raise ValueError(f"{csv_path} has no clean rows with a {metric!r} value")
    order = sorted(cases)
    cells = {key: (np.array([sums[key].get(c, 0.0) for c in order]), np.array([counts[key].get(c, 0) for c in order]))
             for key in sums}
    return CaseScores(order, cells, higher_is_better)


def save_case_scores(scores: CaseScores, path: str | os.PathLike, metric: str) -> None:
    """Write ``scores`` (of ``metric``) as a small JSON file (atomically): what a bootstrap needs, without the
    per-sample CSV (kept out of committed results for its size)."""
    cells = [{"attack": a, "eps": e, "sums": sums.tolist(), "counts": counts.tolist()}
             for (a, e), (sums, counts) in sorted(scores.cells.items())]
    atomic_write_text(path, json.dumps({"metric": metric, "higher_is_better": scores.higher_is_better,
                                        "cases": scores.cases, "cells": cells}))


def load_case_scores(path: str | os.PathLike, metric: str) -> CaseScores:
    """The :class:`CaseScores` that :func:`save_case_scores` wrote; a file of another metric is an error."""
    data = json.loads(Path(path).read_text())
    if data.get("metric") != metric:
        raise ValueError(f"{path} holds per-case scores of {data.get('metric')!r}, not of {metric!r}")
    cells = {(c["attack"], float(c["eps"])): (np.asarray(c["sums"], dtype=float), np.asarray(c["counts"], dtype=int))
             for c in data["cells"]}
    return CaseScores([str(c) for c in data["cases"]], cells, bool(data["higher_is_better"]))


def frontier(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[tuple[float, float]]:
    """The ``(clean, robust)`` points that no other point beats on both, sorted by clean value."""
    s = 1.0 if higher_is_better else -1.0
    pts = sorted({(float(c), float(r)) for c, r in points})
    kept = [p for p in pts if not any(s * q[0] >= s * p[0] and s * q[1] >= s * p[1] and q != p for q in pts)]
    return sorted(kept)


def curve_value(points: Sequence[tuple[float, float]], clean: float, higher_is_better: bool = True) -> float:
    """The robust value of the piecewise-linear :func:`frontier` of ``(clean, robust)`` ``points`` at ``clean``;
    NaN outside the frontier's clean range (no extrapolation)."""
    pts = frontier(points, higher_is_better)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not pts or clean < xs[0] or clean > xs[-1]:
        return math.nan
    return float(np.interp(clean, xs, ys))


def curve_gap(model: Mapping[str, float], curve: Sequence[Mapping[str, float]], attack: str,
              higher_is_better: bool = True) -> float:
    """``model``'s robust value minus the curve's at the model's clean value (unsigned: the caller signs it)."""
    value = curve_value([(c["clean"], c[attack]) for c in curve], model["clean"], higher_is_better)
    return model[attack] - value


def _interval(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"low": math.nan, "high": math.nan, "n": 0}
    low, high = np.percentile(finite, [2.5, 97.5])
    return {"low": float(low), "high": float(high), "n": int(finite.size)}


def paired_bootstrap(
    models: Mapping[str, CaseScores],
    model: str,
    against: str | None = None,
    curve: Sequence[str] = (),
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """95 % percentile intervals of ``model`` minus ``against`` (each summary) and of ``model``'s gap to the curve
    through ``curve`` (names, e.g. STD and the VATs), over ``resamples`` paired resamples of the cases.

    Differences are signed so that positive means ``model`` is better. Returns, per quantity, the point estimate
    (on all cases) and the interval: ``{"clean": {...}, "pgd": {...}, "ifgsm": {...}, "curve_pgd": {...}, ...}``.
    """
    base = models[model]
    for name, scores in models.items():
        if scores.cases != base.cases:
            raise ValueError(f"{name} and {model} were evaluated on different cases: the comparison needs the same")
    sign = 1.0 if base.higher_is_better else -1.0
    attacks = [k for k in base.summary() if k != "clean"]
    rng = np.random.default_rng(seed)
    n = len(base.cases)

    def quantities(weights: np.ndarray | None) -> dict[str, float]:
        summaries = {name: models[name].summary(weights) for name in {model, against, *curve} if name}
        out = {}
        if against:
            out.update({k: sign * (summaries[model][k] - summaries[against][k]) for k in ("clean", *attacks)})
        if curve:
            for attack in attacks:
                out[f"curve_{attack}"] = sign * curve_gap(summaries[model], [summaries[c] for c in curve], attack,
                                                          base.higher_is_better)
        return out

    point = quantities(None)
    draws = {k: [] for k in point}
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, n, n), minlength=n).astype(float)
        for k, v in quantities(weights).items():
            draws[k].append(v)
    return {k: {"estimate": point[k], **_interval(np.asarray(draws[k]))} for k in point}
