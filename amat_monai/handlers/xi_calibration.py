"""ξ calibration as an Ignite handler on a MONAI evaluator run over the clean training set."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys, convert_to_tensor

from amat_monai.attacks import LossFn, per_sample_terms, pgd
from amat_monai.calibration import compute_xi, metric_threshold, write_xi
from amat_monai.conditions import LossTermsCondition, MetricCondition, TotalLossCondition
from amat_monai.losses import term_names

__all__ = ["XiCalibrationHandler"]


class XiCalibrationHandler:
    """Collect per-sample, per-term losses of every batch and write ``xi.json`` when the run completes.

    Args:
        loss_fn: the per-sample training loss ``[B]`` or ``[B, K]`` (the one AMAT will use).
        output_path: where ``xi.json`` goes (written atomically).
        z: ``ξ = location + z · scale`` for the ``"terms"`` and ``"total"`` conditions (0 for segmentation, 2
            for landmarks in the papers).
        estimator: ``"mean_std"``, ``"median_mad"`` or ``"huber"``.
        checkpoint: the checkpoint of the model being calibrated; its SHA-256 is recorded.
        condition_metric: the ``"metric"`` condition's score function (e.g.
            :class:`amat_monai.metrics.PresentClassDice`); without it ``xi.json`` has no metric threshold.
        metric_quantile: the metric threshold: ``None`` for the mean score, else the share of training samples
            left on its failing side (see :func:`amat_monai.calibration.metric_threshold`).
        feasibility_eps: radii at which to report the share of training samples that pass each condition (0:
            the clean input; others: the training attack, L2 PGD with ``attack_steps`` steps). AMAT can only grow
            the margins of samples that pass at its first margin Δ, so ``[0, Δ]`` tells before training whether
            the condition leaves it room.
        attack_steps, step_size_factor, clamp: the training attack of the feasibility report (step
            ``min(step_size_factor / steps, 1) · ε``, random start, network in train mode, as in training).

    Attach it to a ``SupervisedEvaluator`` whose output holds raw logits under ``pred`` (no postprocessing).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        output_path: str | os.PathLike,
        z: float = 0.0,
        estimator: str = "mean_std",
        checkpoint: str | os.PathLike | None = None,
        condition_metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        metric_quantile: float | None = None,
        feasibility_eps: Sequence[float] = (0.0,),
        attack_steps: int = 3,
        step_size_factor: float = 4.0,
        clamp: Sequence[float] | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.output_path = output_path
        self.z = z
        self.estimator = estimator
        self.checkpoint = checkpoint
        self.condition_metric = condition_metric
        self.metric_quantile = metric_quantile
        self.feasibility_eps = [float(e) for e in feasibility_eps]
        if any(e < 0 for e in self.feasibility_eps):
            raise ValueError(f"feasibility_eps must be non-negative, got {self.feasibility_eps}")
        self.attack_steps = int(attack_steps)
        self.step_size_factor = float(step_size_factor)
        self.clamp = tuple(clamp) if clamp is not None else None
        self.losses: list[torch.Tensor] = []
        self.scores: list[torch.Tensor] = []
        self._attacked: dict[float, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.result: dict | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.losses, self.scores = [], []
        self._attacked = {e: [] for e in self.feasibility_eps if e > 0}

    def _terms_and_score(self, pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        terms = per_sample_terms(self.loss_fn(pred, label), pred.shape[0]).double().cpu()
        score = self.condition_metric(pred, label).double().cpu() if self.condition_metric is not None else None
        return terms, score

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        pred, label = output[CommonKeys.PRED], output[CommonKeys.LABEL]
        terms, score = self._terms_and_score(pred, label)
        self.losses.append(terms)
        if score is not None:
            self.scores.append(score)
        if self._attacked:
            x, y = engine.prepare_batch(engine.state.batch, engine.state.device, engine.non_blocking)[:2]
            x = convert_to_tensor(x, track_meta=False)
            y = convert_to_tensor(y, track_meta=False)
            for eps in self._attacked:
                step = min(self.step_size_factor / self.attack_steps, 1.0) * eps
                x_adv = pgd(engine.network, self.loss_fn, x, y, eps, steps=self.attack_steps, step_size=step,
                            clamp=self.clamp, train_mode=True)
                self._attacked[eps].append(self._terms_and_score(engine.network(x_adv), y))

    def _feasibility(self, conditions: dict, clean: tuple[torch.Tensor, torch.Tensor | None]) -> dict:
        by_eps = {0.0: clean} if 0.0 in self.feasibility_eps else {}
        for eps, parts in self._attacked.items():
            terms = torch.cat([p[0] for p in parts])
            by_eps[eps] = (terms, torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None)
        out: dict = {"eps": sorted(by_eps), "attack_steps": self.attack_steps}
        for name, condition in conditions.items():
            shares = []
            for eps in out["eps"]:
                terms, score = by_eps[eps]
                badness = condition.badness_of_scores(score) if name == "metric" else condition.badness(None, None, terms)
                shares.append(float(condition.passes(badness).double().mean()))
            out[name] = shares
        return out

    def write(self, engine: Engine | None = None) -> dict:
        if not self.losses:
            raise RuntimeError("ξ calibration saw no batch: the calibration data set is empty")
        losses = torch.cat(self.losses)
        names = term_names(self.loss_fn, losses.shape[1])
        terms = compute_xi(losses, self.z, self.estimator, names)
        total = compute_xi(losses.sum(dim=1), self.z, self.estimator, ["total"])[0]
        conditions = {"terms": LossTermsCondition(torch.tensor([t["xi"] for t in terms]), names),
                      "total": TotalLossCondition(total["xi"])}
        metric = None
        scores = torch.cat(self.scores) if self.scores else None
        if scores is not None:
            higher = bool(getattr(self.condition_metric, "higher_is_better", False))
            metric = metric_threshold(scores, higher, self.metric_quantile,
                                      getattr(self.condition_metric, "name", "metric"))
            conditions["metric"] = MetricCondition(self.condition_metric, metric["xi"])
        feasibility = self._feasibility(conditions, (losses, scores))
        self.result = write_xi(self.output_path, terms, self.checkpoint, total, metric, feasibility)
        self.logger.info(
            f"wrote {self.output_path}: " + ", ".join(f"{t['name']} ξ={t['xi']:.4f}" for t in terms)
            + f", total ξ={total['xi']:.4f}" + (f", {metric['name']} ξ={metric['xi']:.4f}" if metric else "")
            + "; passing at ε " + ", ".join(f"{e:g}" for e in feasibility["eps"]) + ": "
            + "; ".join(f"{k} " + "/".join(f"{v:.1%}" for v in feasibility[k]) for k in conditions)
        )
        return self.result
