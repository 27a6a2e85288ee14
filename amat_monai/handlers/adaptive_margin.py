"""AMAT as an Ignite handler: adversarial training at per-sample adaptive margins.

Algorithm 1 of the method (``../shared/docs/amat-method.md`` §2), line by line, and where it happens:

1. ``m = E[ids]``: :meth:`AdaptiveMarginHandler.margins_of` reads :class:`~amat_monai.margins.MarginTable`.
2. clean pass, ``L0``: the trainer's forward pass on ``[x; x_adv]``, its first half
   (:meth:`~AdversarialTrainingHandler.clean_prediction`), read in :meth:`AdaptiveMarginHandler.update`.
3. ``x_adv = Adv(x, y, m)``: :meth:`AdversarialTrainingHandler.__call__` at ``ITERATION_STARTED``
   (:func:`amat_monai.attacks.pgd`), with a :class:`~amat_monai.margins.BoundaryTracker` watching the path.
4. adversarial pass, ``L1``: the same forward pass, its second half.
5. ``L = 0.5·mean(ΣL0) + 0.5·mean(ΣL1)``: :class:`amat_monai.losses.MeanLoss` over the ``2B`` rows.
6. backward and optimiser step: MONAI's ``SupervisedTrainer``, after ``FORWARD_COMPLETED``.
7. margin update: :meth:`AdaptiveMarginHandler.update` at ``FORWARD_COMPLETED`` (before the step, so the
   boundary is that of the weights the attack saw): the expand condition (:mod:`amat_monai.conditions`) on
   the clean and adversarial outputs, the boundary (:meth:`~amat_monai.margins.BoundaryTracker.interpolate`
   or :func:`~amat_monai.margins.bisect_boundary`), then :func:`amat_monai.margins.update_margins`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from amat_monai.attacks import LossFn, frozen_norm_statistics, per_sample_norm, per_sample_terms
from amat_monai.checkpoints import atomic_write_text
from amat_monai.conditions import make_condition
from amat_monai.distributed import all_gather_objects, get_rank, sync_margins, unwrap_network
from amat_monai.handlers.adversarial_training import AdversarialTrainingHandler
from amat_monai.margins import (
    BOUNDARY_SEARCHES,
    GROWTH_RULES,
    SHRINK_RULES,
    BoundaryTracker,
    MarginTable,
    bisect_boundary,
    update_margins,
)

__all__ = ["AdaptiveMarginHandler", "OUTCOMES"]

#: what happened to a sample's margin at its last visit: the condition passed (grown), failed (shrunk by the shrink
#: rule, which with ``shrink="none"`` keeps the margin), or failed on the clean input (frozen)
OUTCOMES = ("grown", "shrunk", "frozen")


class AdaptiveMarginHandler(AdversarialTrainingHandler):
    """Adaptive-margin adversarial training (AMAT, Ma & Liang).

    Each sample is attacked at its own margin (initially ``init``, default ``delta``). Right after the trainer's
    forward pass on ``[x; x_adv]`` the margins of the batch's samples are updated: a sample that fails the
    expand condition on its clean input keeps its margin; one that passes it at its margin grows; one that fails
    it shrinks (see :mod:`amat_monai.margins`).

    Args:
        loss_fn: per-sample loss ``[B]`` or ``[B, K]`` (the attack's and the loss conditions').
        xi: thresholds: path of an ``xi.json`` written by calibration, its content, or numbers (``"terms"``).
        delta: additive growth step Δ and, unless ``floor`` / ``init`` say otherwise, the floor and the initial
            margin (input units).
        condition: ``"terms"`` (every loss term below its ξ_k), ``"total"`` (summed loss below one ξ) or
            ``"metric"`` (``condition_metric`` better than its ξ); see :mod:`amat_monai.conditions`.
        condition_metric: the ``"metric"`` condition's score function (e.g.
            :class:`amat_monai.metrics.PresentClassDice`).
        condition_terms: with ``"terms"``: indices of the terms tested (default: all).
        growth: ``"additive"`` (``+Δ``) or ``"geometric"`` (``×growth_factor``).
        growth_factor: κ of geometric growth.
        shrink: ``"halfway"`` (to the boundary), ``"step"`` (back by Δ) or ``"none"``.
        boundary: how ``"halfway"`` finds the boundary: ``"interpolate"`` between the PGD iterates on each side
            of it (no extra forward pass) or ``"bisect"`` (``bisect_steps`` forward passes).
        bisect_steps: forward passes of the bisection.
        eps_max: optional cap on the margins.
        floor: lowest margin a shrink can reach (default ``delta``).
        init: margin of a sample seen for the first time (default ``delta``).
        freeze_clean_failures: a sample failing the condition on its clean input keeps its margin.
        xi_follows_model: move ξ with the model: after each iteration, ``ξ = ξ_cal + (m − m_cal)`` per
            threshold, where ``m`` is the mean over the samples visited so far of each one's latest clean badness
            (loss, or negated score; the trainer's clean half gives it at no cost) and ``m_cal`` that of the
            calibrated STD model (``xi.json``). Adversarial training raises the clean loss, so a ξ fixed on the
            STD model freezes most samples as clean failures (ceph, ξ = mean + 2σ of the STD losses: 146 of 150
            images in the first epoch); this keeps ξ at the calibrated distance from the current model's typical
            sample instead. Needs an ``xi.json`` with the calibration's means.
        history_path: when given, a JSON file (written atomically at every epoch end, on rank 0) with each
            epoch's margin quantiles, grown / shrunk / frozen counts and ξ at its end (``xi_next``), and
            every sample's margin per epoch,
            time-averaged training radius and last outcome (see ``scripts/margin_diagnostics.py``).
        log_every: log a margin summary every this many epochs (0: never).
        kwargs: attack settings, see :class:`~amat_monai.handlers.AdversarialTrainingHandler`.

    The margin table and the history are in :meth:`state_dict`, so pass the handler in MONAI
    ``CheckpointSaver``'s ``save_dict``: a resumed run continues with the same margins.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        xi: str | os.PathLike | dict | list[float] | float,
        delta: float,
        condition: str = "terms",
        condition_metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        condition_terms: Sequence[int] | None = None,
        growth: str = "additive",
        growth_factor: float = 1.5,
        shrink: str = "halfway",
        boundary: str = "interpolate",
        bisect_steps: int = 10,
        eps_max: float | None = None,
        floor: float | None = None,
        init: float | None = None,
        freeze_clean_failures: bool = True,
        xi_follows_model: bool = False,
        history_path: str | os.PathLike | None = None,
        log_every: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(loss_fn, **kwargs)
        if delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if growth not in GROWTH_RULES:
            raise ValueError(f"growth must be one of {GROWTH_RULES}, got {growth!r}")
        if growth == "geometric" and growth_factor <= 1:
            raise ValueError(f"growth_factor must be above 1 for geometric growth, got {growth_factor}")
        if shrink not in SHRINK_RULES:
            raise ValueError(f"shrink must be one of {SHRINK_RULES}, got {shrink!r}")
        if boundary not in BOUNDARY_SEARCHES:
            raise ValueError(f"boundary must be one of {BOUNDARY_SEARCHES}, got {boundary!r}")
        self.delta = float(delta)
        self.floor = self.delta if floor is None else float(floor)
        init = self.delta if init is None else float(init)
        if self.floor < 0 or init < self.floor:
            raise ValueError(f"need 0 <= floor <= init, got floor {self.floor}, init {init}")
        if eps_max is not None and eps_max < init:
            raise ValueError(f"eps_max ({eps_max}) must be at least the initial margin ({init})")
        self.condition_name = condition
        self.condition = make_condition(condition, xi, loss_fn, condition_metric, condition_terms)
        self.growth = growth
        self.growth_factor = float(growth_factor)
        self.shrink = shrink
        self.boundary = boundary
        self.bisect_steps = int(bisect_steps)
        self.eps_max = eps_max
        self.freeze_clean_failures = bool(freeze_clean_failures)
        self.xi_follows_model = bool(xi_follows_model)
        if self.xi_follows_model and self.condition.reference is None:
            raise ValueError("xi_follows_model needs xi as an xi.json (path or content) holding the calibrated "
                             "model's mean clean losses / scores; write one with `amat-monai calibrate`")
        self.calibrated_xi = self.condition.thresholds.clone()
        self.history_path = history_path
        self.log_every = int(log_every)
        self.table = MarginTable(init=init)
        self.outcomes: dict[str, int] = {}  # sample id -> index in OUTCOMES, at its last visit
        self.history: list[dict] = []  # one entry per finished epoch
        self._margins_per_epoch: list[list[float]] = []
        self._epoch_counts = torch.zeros(len(OUTCOMES), dtype=torch.long)
        self._latest_clean: dict[str, list[float]] = {}  # sample id -> its latest clean badness (xi_follows_model)
        self._clean_sum: torch.Tensor | None = None  # running sum and count of those, per threshold
        self._clean_count: torch.Tensor | None = None
        self.logger = logging.getLogger(__name__)

    def margins_of(self, ids: list[str], x: torch.Tensor) -> torch.Tensor:
        return self.table.get(ids)

    def make_observer(self, y: torch.Tensor) -> BoundaryTracker | None:
        return BoundaryTracker(self.condition, y) if self.shrink == "halfway" else None

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self.update)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset_counts)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.record_epoch)

    # -- step 7 of the algorithm ------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, engine: Engine) -> None:
        """Update the margins of the current batch from the trainer's clean and adversarial predictions."""
        cur = self.current
        if cur is None:
            return
        pred = engine.state.output[CommonKeys.PRED].detach()
        adv_pred = self.adversarial_prediction(pred)
        adv_losses = self._losses(adv_pred, cur.y)
        adv_badness = self.condition.badness(adv_pred, cur.y, adv_losses)
        passed = self.condition.passes(adv_badness).cpu()
        clean_pred = self.clean_prediction(pred)
        if clean_pred is None:  # adversarial_only: the trainer made no clean pass
            network = unwrap_network(engine.network)
            with frozen_norm_statistics(network):
                clean_pred = network(cur.x)
        clean_badness = self.condition.badness(clean_pred, cur.y, self._losses(clean_pred, cur.y))
        frozen = ~self.condition.passes(clean_badness).cpu() if self.freeze_clean_failures else None
        boundary = None
        if self.shrink == "halfway":
            boundary = self._boundary_norms(engine, cur, adv_pred, adv_losses, clean_badness, ~passed)
        margins = cur.margins.double().cpu()
        new = update_margins(margins, passed, self.delta, growth=self.growth, growth_factor=self.growth_factor,
                             shrink=self.shrink, boundary_norm=boundary, frozen=frozen, floor=self.floor,
                             eps_max=self.eps_max)
        self.table.set(cur.ids, new, trained_at=margins)
        sync_margins(self.table, cur.ids, new, trained_at=margins)  # every rank holds every margin
        outcome = torch.where(passed, 0, 1)
        if frozen is not None:
            outcome = torch.where(frozen, 2, outcome)
        self._epoch_counts += torch.bincount(outcome, minlength=len(OUTCOMES))
        self.outcomes.update(zip(cur.ids, outcome.tolist()))
        if self.xi_follows_model:
            self._follow_model(cur.ids, clean_badness)
        self.current = None

    def _follow_model(self, ids: list[str], clean_badness: torch.Tensor) -> None:
        """``ξ = ξ_cal + (mean latest clean badness − the calibrated model's mean)`` (``xi_follows_model``).

        The mean is kept as a running sum and count of each sample's latest value, so an update costs the batch,
        not the dataset; a metric can be undefined on a sample (NaN), which the sums skip, as they skip ±inf.
        """
        values = clean_badness.double().reshape(len(ids), -1).cpu().tolist()
        for rank_ids, rank_values in all_gather_objects((list(ids), values)):  # every rank's visits
            for sample_id, value in zip(rank_ids, rank_values):
                self._add_latest_clean(sample_id, value)
        mean = self._clean_sum / self._clean_count  # NaN where no sample has a value yet
        followed = self.calibrated_xi + mean - self.condition.reference
        self.condition.thresholds = torch.where(torch.isfinite(mean), followed, self.condition.thresholds)

    def _add_latest_clean(self, sample_id: str, value: list[float]) -> None:
        new = torch.tensor(value, dtype=torch.float64)
        if self._clean_sum is None:
            self._clean_sum, self._clean_count = torch.zeros_like(new), torch.zeros_like(new)
        old = self._latest_clean.get(sample_id)
        if old is not None:
            old = torch.tensor(old, dtype=torch.float64)
            self._clean_sum -= torch.where(torch.isfinite(old), old, 0.0)
            self._clean_count -= torch.isfinite(old).double()
        self._clean_sum += torch.where(torch.isfinite(new), new, 0.0)  # an undefined (NaN) or infinite value is left out
        self._clean_count += torch.isfinite(new).double()
        self._latest_clean[sample_id] = value

    def _losses(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return per_sample_terms(self.loss_fn(pred, y), pred.shape[0])

    def _boundary_norms(self, engine: Engine, cur, adv_pred, adv_losses, clean_badness, failing) -> torch.Tensor:
        """Norm of each failing sample's boundary point, between its last passing and first failing iterate."""
        tracker: BoundaryTracker = cur.observer
        tracker(self.steps, cur.x_adv - cur.x, adv_losses, adv_pred)  # the final iterate
        norms = torch.zeros(len(cur.ids), dtype=torch.float64)
        if not failing.any():
            return norms
        if self.boundary == "interpolate":
            points = tracker.interpolate(clean_badness)[failing.to(cur.x.device)]
        else:
            mask = failing.to(cur.x.device)
            network = unwrap_network(engine.network)
            was_training = network.training
            if self.attack_train_mode is not None:
                network.train(self.attack_train_mode)
            try:
                points = bisect_boundary(network, self.condition, self._losses, cur.x[mask], cur.y[mask],
                                         tracker.good[mask], tracker.bad[mask], steps=self.bisect_steps)
            finally:
                network.train(was_training)
        norms[failing] = per_sample_norm(points, self.norm).double().cpu()
        return norms

    # -- per-epoch record ----------------------------------------------------------------------------------
    def _reset_counts(self, engine: Engine | None = None) -> None:
        self._epoch_counts = torch.zeros(len(OUTCOMES), dtype=torch.long)

    def epoch_summary(self) -> dict:
        """The margins now and this epoch's outcome counts so far: ``{"margins": summary, "outcomes": {name:
        count}, "values": [N] margins}`` (what :meth:`record_epoch` records and
        :class:`~amat_monai.handlers.AdversarialStatsHandler` plots)."""
        return {"margins": self.table.summary(), "outcomes": dict(zip(OUTCOMES, self._epoch_counts.tolist())),
                "values": self.table.values()}

    def record_epoch(self, engine: Engine) -> None:
        """Append this epoch's margin summary to :attr:`history`, log it, and write ``history_path``."""
        now = self.epoch_summary()
        summary, counts = now["margins"], now["outcomes"]
        self.history.append({"epoch": int(engine.state.epoch), "margins": summary, "outcomes": counts,
                             "xi_next": self.condition.thresholds.tolist()})
        self._margins_per_epoch.append([round(v, 4) for v in self.table.values().tolist()])
        if self.log_every > 0 and engine.state.epoch % self.log_every == 0:
            self.logger.info(
                f"epoch {engine.state.epoch}: margins of {summary['count']} samples: mean {summary['mean']:.4f}, "
                f"median {summary['median']:.4f}, min {summary['min']:.4f}, max {summary['max']:.4f}; "
                + ", ".join(f"{'failed, kept' if k == 'shrunk' and self.shrink == 'none' else k} {v}"
                            for k, v in counts.items())
                + (f"; ξ now {[round(v, 4) for v in self.condition.thresholds.tolist()]}"
                   if self.xi_follows_model else "")
            )
        if self.history_path is not None and get_rank() == 0:
            atomic_write_text(self.history_path, json.dumps(self.report()) + "\n")

    def report(self) -> dict:
        """The margin history: settings, per-epoch summaries and per-sample values (see ``history_path``)."""
        ids = self.table.ids()
        return {
            "settings": {"condition": self.condition_name, "thresholds": self.calibrated_xi.tolist(),
                         "threshold_names": self.condition.names, "delta": self.delta, "growth": self.growth,
                         "growth_factor": self.growth_factor, "shrink": self.shrink, "boundary": self.boundary,
                         "floor": self.floor, "init": self.table.init, "eps_max": self.eps_max,
                         "freeze_clean_failures": self.freeze_clean_failures,
                         "xi_follows_model": self.xi_follows_model, "calibrated_xi": self.calibrated_xi.tolist()},
            "epochs": self.history,
            "samples": {
                "ids": ids,
                "margins_per_epoch": self._margins_per_epoch,
                "mean_training_radius": [round(v, 4) for v in self.table.mean_training_radius().tolist()],
                "last_outcome": [OUTCOMES[self.outcomes[i]] if i in self.outcomes else None for i in ids],
            },
        }

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"margins": self.table.state_dict(), "outcomes": dict(self.outcomes), "history": list(self.history),
                "margins_per_epoch": list(self._margins_per_epoch), "thresholds": self.condition.thresholds.tolist(),
                "latest_clean": dict(self._latest_clean)}

    def load_state_dict(self, state: dict) -> None:
        self.table.load_state_dict(state["margins"])
        self.outcomes = dict(state.get("outcomes", {}))
        self.history = list(state.get("history", []))
        self._margins_per_epoch = list(state.get("margins_per_epoch", []))
        if "thresholds" in state:  # ξ as the run left it (it moves with xi_follows_model)
            self.condition.thresholds = torch.as_tensor(state["thresholds"], dtype=torch.float64)
        self._latest_clean, self._clean_sum, self._clean_count = {}, None, None
        for sample_id, value in state.get("latest_clean", {}).items():
            self._add_latest_clean(sample_id, value)
