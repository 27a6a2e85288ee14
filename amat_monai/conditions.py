"""AMAT's expand condition: when has a sample survived the attack at its margin?

A condition turns the model's output on a sample (and the loss terms already computed for it) into a
per-sample *badness* ``[B, K']`` and compares it with thresholds ``[K']``: a sample passes when every column is
strictly below its threshold. Three conditions, chosen with ``condition`` in ``amat.json``:

* ``"terms"`` (:class:`LossTermsCondition`): every loss term below its own ξ_k, the paper's text; optionally
  only some terms (``terms``), the others masked out.
* ``"total"`` (:class:`TotalLossCondition`): the summed loss below one ξ, as the authors' landmark code did.
* ``"metric"`` (:class:`MetricCondition`): the task metric on the output against a threshold, as the authors'
  nnU-Net code did with hard Dice. The metric is a *score function* ``score(pred, y) -> [B]`` with an attribute
  ``higher_is_better`` (:class:`amat_monai.metrics.PresentClassDice` for segmentation,
  :class:`amat_monai.landmarks.LandmarkGridError` for landmarks).

The thresholds come from ``xi.json`` (written by :mod:`amat_monai.calibration`), which holds all three kinds, so
one calibration serves every condition. Badness is "lower is better" throughout (a higher-is-better score is
negated, and so is its threshold), so that the boundary interpolation in :mod:`amat_monai.margins` needs no
special case.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from amat_monai.attacks import LossFn, per_sample_terms
from amat_monai.calibration import load_thresholds

__all__ = ["CONDITIONS", "ExpandCondition", "LossTermsCondition", "TotalLossCondition", "MetricCondition",
           "make_condition"]

CONDITIONS = ("terms", "total", "metric")

#: ``score(pred, y) -> [B]``, with a boolean attribute ``higher_is_better``.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExpandCondition:
    """Base class: ``badness(pred, y, losses) -> [B, K']`` compared with ``thresholds`` ``[K']``.

    Args:
        thresholds: one threshold per column of the badness, in badness units (lower is better).
        names: a name per column, for logs and reports.
    """

    def __init__(self, thresholds: torch.Tensor, names: Sequence[str]) -> None:
        self.thresholds = torch.as_tensor(thresholds, dtype=torch.float64).reshape(-1)
        self.names = list(names)
        if len(self.names) != self.thresholds.numel():
            raise ValueError(f"{len(self.names)} names for {self.thresholds.numel()} thresholds")
        #: the calibrated model's mean clean badness per column (from ``xi.json``; None for plain numbers): what
        #: :class:`~amat_monai.handlers.AdaptiveMarginHandler` with ``xi_follows_model`` measures ξ's distance from
        self.reference: torch.Tensor | None = None

    def badness(self, pred: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def passes(self, badness: torch.Tensor) -> torch.Tensor:
        """``[B]`` mask: every column strictly below its threshold."""
        if badness.dim() == 1:
            badness = badness[:, None]
        if badness.shape[1] != self.thresholds.numel():
            raise ValueError(f"badness has {badness.shape[1]} columns but there are {self.thresholds.numel()} thresholds")
        return (badness < self.thresholds.to(badness)).all(dim=1)

    def __call__(self, pred: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``[B]`` mask of the samples that pass."""
        return self.passes(self.badness(pred, y, losses))


class LossTermsCondition(ExpandCondition):
    """Every tested loss term below its own threshold ξ_k (method doc §2, step 7).

    Args:
        xi: per-term thresholds ``[K]``.
        names: the loss's term names.
        terms: indices of the terms to test (default: all); the others are masked out, not given ξ = ∞.
    """

    def __init__(self, xi: torch.Tensor, names: Sequence[str] | None = None, terms: Sequence[int] | None = None) -> None:
        xi = torch.as_tensor(xi, dtype=torch.float64).reshape(-1)
        names = list(names) if names is not None and len(names) == xi.numel() else [f"term{k}" for k in range(xi.numel())]
        if terms is None:
            terms = range(xi.numel())
        self.terms = sorted({int(k) for k in terms})
        if not self.terms or self.terms[0] < 0 or self.terms[-1] >= xi.numel():
            raise ValueError(f"condition_terms must index the {xi.numel()} loss terms, got {list(terms)}")
        self.num_terms = xi.numel()
        super().__init__(xi[self.terms], [names[k] for k in self.terms])

    def badness(self, pred: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        losses = per_sample_terms(losses, losses.shape[0])
        if losses.shape[1] != self.num_terms:
            raise ValueError(
                f"the loss has {losses.shape[1]} terms but xi has {self.num_terms} thresholds; "
                "calibrate xi with the same loss"
            )
        return losses[:, self.terms]


class TotalLossCondition(ExpandCondition):
    """The summed loss below one threshold ξ (the authors' published landmark code)."""

    def __init__(self, xi: float) -> None:
        super().__init__(torch.tensor([float(xi)], dtype=torch.float64), ["total"])

    def badness(self, pred: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return per_sample_terms(losses, losses.shape[0]).sum(dim=1, keepdim=True)


class MetricCondition(ExpandCondition):
    """The task metric on the output, against a threshold in the metric's own units.

    Args:
        score_fn: ``score(pred, y) -> [B]`` with ``higher_is_better`` (e.g. hard Dice, radial error).
        threshold: pass when the score is better than this (``>`` for higher-is-better scores, ``<`` otherwise).
    """

    def __init__(self, score_fn: ScoreFn, threshold: float) -> None:
        self.score_fn = score_fn
        self.sign = -1.0 if getattr(score_fn, "higher_is_better", False) else 1.0
        threshold = torch.tensor([self.sign * float(threshold)], dtype=torch.float64)
        super().__init__(threshold, [getattr(score_fn, "name", "metric")])

    def badness(self, pred: torch.Tensor, y: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return self.badness_of_scores(self.score_fn(pred, y))

    def badness_of_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` badness from ``[B]`` scores already computed."""
        return (self.sign * scores.double())[:, None]


def _check_terms(source: Any, thresholds: dict, loss_fn: LossFn | None) -> None:
    """Fail before training when the ξ file was calibrated for another loss (other number or names of terms)."""
    loss_names = list(getattr(loss_fn, "term_names", None) or ())
    xi_names = list(thresholds.get("names") or ())
    count = thresholds["xi"].numel()
    where = source if isinstance(source, (str, os.PathLike)) else "xi"
    if loss_names and (count != len(loss_names) or (xi_names and xi_names != loss_names)):
        raise ValueError(
            f"{where} holds {count} thresholds{f' {xi_names}' if xi_names else ''} but the loss has {len(loss_names)} terms "
            f"{loss_names}: it was calibrated for another bundle or loss; run `amat-monai calibrate` with this bundle"
        )


def make_condition(
    condition: str,
    xi: str | os.PathLike | dict | Sequence[float] | float,
    loss_fn: LossFn | None = None,
    score_fn: ScoreFn | None = None,
    terms: Sequence[int] | None = None,
) -> ExpandCondition:
    """The condition named ``condition`` with its thresholds read from ``xi`` (an ``xi.json`` path, its content,
    or plain numbers for ``"terms"``).

    Raises:
        ValueError: naming the argument, for an unknown condition or one whose threshold ``xi`` lacks.
    """
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {CONDITIONS}, got {condition!r}")
    if condition == "metric" and score_fn is None:
        raise ValueError("condition='metric' needs a score function (the bundle's condition_metric)")
    thresholds = load_thresholds(xi, condition)
    if condition == "terms":
        _check_terms(xi, thresholds, loss_fn)
        made: ExpandCondition = LossTermsCondition(
            thresholds["xi"], thresholds.get("names") or getattr(loss_fn, "term_names", None), terms)
    elif terms is not None:
        raise ValueError(f"condition_terms applies to condition='terms' only, not {condition!r}")
    elif condition == "total":
        made = TotalLossCondition(thresholds["xi"])
    else:
        made = MetricCondition(score_fn, thresholds["xi"])
    if thresholds.get("means") is not None:
        means = torch.as_tensor(thresholds["means"], dtype=torch.float64).reshape(-1)
        if isinstance(made, LossTermsCondition):
            means = means[made.terms]
        made.reference = means * (made.sign if isinstance(made, MetricCondition) else 1.0)
    return made
