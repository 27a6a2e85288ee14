"""The threshold ξ of AMAT, calibrated on a normally trained model (method doc §3).

Run the STD model over the clean training set, collect every sample's loss per term, and set
``ξ_k = location_k + z · scale_k``: mean and standard deviation by default, the median and the normalised MAD,
or Huber's robust location and scale (the authors' scripts). The same is done for the summed loss (the
``"total"`` condition) and, when the bundle has a condition metric, a threshold in the metric's units (the
``"metric"`` condition: the mean score, or a quantile). The result is written to ``xi.json`` together with the
SHA-256 of the checkpoint it came from and a feasibility report (the share of training samples that pass
each condition at ε = 0 and at ε = Δ); :func:`load_thresholds` reads it back for AMAT.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from amat_monai.checkpoints import atomic_write_text, file_sha256, read_json

__all__ = [
    "ESTIMATORS",
    "huber_location_scale",
    "median_mad",
    "compute_xi",
    "metric_threshold",
    "write_xi",
    "load_xi",
    "load_thresholds",
]

ESTIMATORS = ("mean_std", "median_mad", "huber")


def median_mad(values: torch.Tensor) -> tuple[float, float]:
    """The median and the normalised median absolute deviation ``1.4826 · median(|v − median(v)|)``."""
    v = values.double().flatten()
    median = v.median()
    return float(median), float(1.4826 * (v - median).abs().median())


def huber_location_scale(values: torch.Tensor, c: float = 1.345, iterations: int = 50) -> tuple[float, float]:
    """Huber M-estimate of location with the normalised MAD as scale.

    The scale is ``1.4826 · median(|v − median(v)|)`` (consistent with the standard deviation for normal
    data); the location is found by iteratively re-weighted means with Huber weights ``min(1, c / |r|)``.
    """
    v = values.double().flatten()
    median, scale = median_mad(v)
    if scale <= 0:
        return median, 0.0
    location = torch.tensor(median, dtype=torch.float64)
    for _ in range(iterations):
        r = (v - location) / scale
        w = torch.clamp(c / r.abs().clamp_min(1e-12), max=1.0)
        new = (w * v).sum() / w.sum()
        if torch.isclose(new, location, rtol=0, atol=1e-12):
            break
        location = new
    return float(location), float(scale)


def compute_xi(
    losses: torch.Tensor, z: float = 0.0, estimator: str = "mean_std", term_names: list[str] | None = None
) -> list[dict]:
    """Per-term threshold statistics from ``[N]`` or ``[N, K]`` training losses.

    Returns one dict per term: ``name, n, mean, std, location, scale, z, xi, estimator``
    (``std`` is the sample standard deviation, ``ddof = 1``).
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    losses = torch.as_tensor(losses, dtype=torch.float64)
    if losses.dim() == 1:
        losses = losses[:, None]
    if losses.dim() != 2 or losses.shape[0] < 2:
        raise ValueError(f"need at least 2 samples of [N] or [N, K] losses to calibrate, got {tuple(losses.shape)}")
    if not torch.isfinite(losses).all():
        raise ValueError("losses contain non-finite values; the model or the data is broken")
    names = term_names or [f"term{k}" for k in range(losses.shape[1])]
    terms = []
    for k, name in enumerate(names):
        v = losses[:, k]
        mean, std = float(v.mean()), float(v.std(unbiased=True))
        location, scale = {"mean_std": lambda: (mean, std), "median_mad": lambda: median_mad(v),
                           "huber": lambda: huber_location_scale(v)}[estimator]()
        terms.append(
            {
                "name": name,
                "n": int(v.numel()),
                "mean": mean,
                "std": std,
                "location": location,
                "scale": scale,
                "z": float(z),
                "xi": location + z * scale,
                "estimator": estimator,
            }
        )
    return terms


def metric_threshold(scores: torch.Tensor, higher_is_better: bool, quantile: float | None = None,
                     name: str = "metric") -> dict:
    """Threshold of the ``"metric"`` condition from the STD model's clean per-sample training scores ``[N]``.

    Args:
        scores: per-sample scores (NaN entries, undefined samples, are ignored).
        higher_is_better: the score's direction (Dice: True; radial error: False).
        quantile: ``None``: the mean score (the authors' nnU-Net code); else the share of training samples left
            on the failing side of ξ (0.15: ξ is the 15th percentile of Dice, or the 85th of an error).
    """
    v = torch.as_tensor(scores, dtype=torch.float64).flatten()
    v = v[torch.isfinite(v)]
    if v.numel() < 2:
        raise ValueError(f"need at least 2 finite metric scores to calibrate, got {v.numel()}")
    if quantile is not None and not 0 < quantile < 1:
        raise ValueError(f"metric quantile must lie in (0, 1), got {quantile}")
    if quantile is None:
        xi = float(v.mean())
    else:
        xi = float(torch.quantile(v, quantile if higher_is_better else 1 - quantile))
    return {"name": name, "n": int(v.numel()), "mean": float(v.mean()), "median": float(v.median()),
            "higher_is_better": bool(higher_is_better), "quantile": quantile, "xi": xi}


def write_xi(
    path: str | os.PathLike,
    terms: list[dict],
    checkpoint: str | os.PathLike | None = None,
    total: dict | None = None,
    metric: dict | None = None,
    feasibility: dict | None = None,
) -> dict:
    """Write ``xi.json`` (atomically) and return its content.

    Args:
        terms: per-term statistics from :func:`compute_xi` (the ``"terms"`` condition).
        total: statistics of the summed loss (the ``"total"`` condition).
        metric: from :func:`metric_threshold` (the ``"metric"`` condition).
        feasibility: share of training samples passing each condition at each calibration ε.
    """
    content = {
        "xi": [t["xi"] for t in terms],
        "terms": terms,
        "total": total,
        "metric": metric,
        "feasibility": feasibility,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
    }
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")
    return content


def load_xi(source: str | os.PathLike | list | tuple | float | dict) -> torch.Tensor:
    """Thresholds ``[K]`` from an ``xi.json`` path, its parsed content, or plain numbers.

    Raises:
        FileNotFoundError: naming the file, when ``xi.json`` is missing (run calibration first).
        ValueError: naming the file, when it is not a valid ξ file.
    """
    name = "xi"
    if isinstance(source, (str, os.PathLike)):
        name = str(source)
        if not Path(source).is_file():
            raise FileNotFoundError(
                f"ξ file not found: {source} (AMAT needs thresholds from a normally trained model: "
                "run `amat-monai calibrate` on the STD checkpoint first)"
            )
        source = read_json(source)
    values = source.get("xi") if isinstance(source, dict) else source
    try:
        xi = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name}: 'xi' must be a number or a list of numbers, got {values!r}") from None
    if xi.numel() == 0 or not all(math.isfinite(v) for v in xi.tolist()):
        raise ValueError(f"{name}: 'xi' must hold finite numbers, got {values!r}")
    return xi


def load_thresholds(source: str | os.PathLike | list | tuple | float | dict, condition: str = "terms") -> dict:
    """The thresholds of one expand condition: ``{"xi": tensor [K] or float, "names": [...] or None, "means": the
    calibrated model's mean clean training values, one per threshold, or None}``.

    ``source`` is an ``xi.json`` path or its content; plain numbers are taken as the thresholds themselves.

    Raises:
        ValueError: naming the file, when it lacks the ``condition``'s threshold (an ``xi.json`` written before
            the condition existed, or a calibration without a condition metric).
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "xi"
    if isinstance(source, (str, os.PathLike)):
        load_xi(source)  # the file's own checks, with their messages
        source = read_json(source)
    if not isinstance(source, dict):
        xi = load_xi(source)
        return {"xi": xi if condition == "terms" else float(xi.reshape(-1)[0]), "names": None, "means": None}
    if condition == "terms":
        terms = source.get("terms") or []
        means = [t.get("mean") for t in terms]
        return {"xi": load_xi(source), "names": [t.get("name") for t in terms] or None,
                "means": means if means and all(isinstance(m, (int, float)) for m in means) else None}
    section = source.get(condition)
    value = section.get("xi") if isinstance(section, dict) else None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(
            f"{name} has no {condition!r} threshold (its section is {section!r}); calibrate again with this "
            f"version (`amat-monai calibrate`){' and the bundle condition_metric' if condition == 'metric' else ''}"
        )
    mean = section.get("mean")
    return {"xi": float(value), "names": [section.get("name", condition)],
            "means": [float(mean)] if isinstance(mean, (int, float)) else None}
