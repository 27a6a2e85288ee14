"""AMAT as an Ignite handler: adversarial training at per-sample adaptive margins."""

from __future__ import annotations

import logging
import math
import os

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from amat_monai.attacks import LossFn, per_sample_norm, per_sample_terms
from amat_monai.calibration import load_xi
from amat_monai.distributed import sync_margins
from amat_monai.handlers.adversarial_training import AdversarialTrainingHandler, unwrap_network
from amat_monai.margins import BoundaryTracker, MarginTable, bisect_boundary, satisfies, update_margins

__all__ = ["AdaptiveMarginHandler"]


class AdaptiveMarginHandler(AdversarialTrainingHandler):
    """Adaptive-margin adversarial training (AMAT, Ma & Liang).

    Each sample is attacked at its own margin ``E[i]`` (initially ``delta``). Right after the trainer's forward
    pass on ``[x; x_adv]`` (and before the optimiser step, so that the boundary search sees the weights the
    attack saw) the margins of the batch's samples are updated from their adversarial losses by
    :func:`amat_monai.margins.update_margins`: expand by ``delta`` when every term is below ``xi``, shrink
    otherwise.

    Args:
        loss_fn: per-sample loss ``[B]`` or ``[B, K]``; one threshold per term.
        xi: thresholds: path of an ``xi.json`` written by calibration, or numbers.
        delta: expansion step Δ, the floor and the initial margin (input units).
        shrink: ``"bisect"`` (halfway to the boundary found by bisection, default) or ``"step"`` (back by Δ).
        eps_max: optional cap on the margins.
        bisect_steps: forward passes of the boundary search.
        condition_terms: indices of the loss terms the expand condition tests (default: all, as in the paper);
            the others get no threshold. The authors' nnU-Net code tested the Dice term alone.
        log_every: log a margin summary every this many epochs (0: never).
        kwargs: attack settings, see :class:`~amat_monai.handlers.AdversarialTrainingHandler`.

    The margin table is in :meth:`state_dict`, so pass the handler in MONAI ``CheckpointSaver``'s ``save_dict``.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        xi: str | os.PathLike | list[float] | float,
        delta: float,
        shrink: str = "bisect",
        eps_max: float | None = None,
        bisect_steps: int = 10,
        condition_terms: list[int] | None = None,
        log_every: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(loss_fn, **kwargs)
        if delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if eps_max is not None and eps_max < delta:
            raise ValueError(f"eps_max ({eps_max}) must be at least delta ({delta})")
        if shrink not in ("bisect", "step"):
            raise ValueError(f"shrink must be 'bisect' or 'step', got {shrink!r}")
        self.xi = load_xi(xi)
        if condition_terms is not None:
            terms = sorted({int(k) for k in condition_terms})
            if not terms or terms[0] < 0 or terms[-1] >= self.xi.numel():
                raise ValueError(f"condition_terms must index the {self.xi.numel()} thresholds of xi, got {condition_terms}")
            untested = torch.ones(self.xi.numel(), dtype=torch.bool)
            untested[terms] = False
            self.xi[untested] = math.inf  # a finite loss is always below it
        self.delta = float(delta)
        self.shrink = shrink
        self.eps_max = eps_max
        self.bisect_steps = int(bisect_steps)
        self.log_every = int(log_every)
        self.table = MarginTable(init=self.delta)
        self._tracker: BoundaryTracker | None = None
        self.logger = logging.getLogger(__name__)

    def radii(self, ids: list[str], x: torch.Tensor) -> torch.Tensor:
        return self.table.get(ids)

    def observer(self) -> BoundaryTracker | None:
        self._tracker = BoundaryTracker(self.xi) if self.shrink == "bisect" else None
        return self._tracker

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self.update)
        if self.log_every > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.log_every), self.log_summary)

    @torch.no_grad()
    def update(self, engine: Engine) -> None:
        """Update the margins of the current batch from the trainer's adversarial predictions."""
        cur = self.current
        if cur is None:
            return
        pred = self.adversarial_prediction(engine.state.output[CommonKeys.PRED]).detach()
        adv_losses = per_sample_terms(self.loss_fn(pred, cur.y), len(cur.ids))
        if adv_losses.shape[1] != self.xi.numel():
            raise ValueError(
                f"the loss has {adv_losses.shape[1]} terms but xi has {self.xi.numel()} thresholds; "
                "calibrate xi with the same loss"
            )
        boundary = None
        if self.shrink == "bisect":
            boundary = self._boundary_norms(engine, cur, adv_losses)
        new = update_margins(
            cur.eps.double().cpu(),
            adv_losses.cpu(),
            self.xi,
            self.delta,
            shrink=self.shrink,
            eps_max=self.eps_max,
            boundary_norm=boundary,
        )
        self.table.set(cur.ids, new)
        sync_margins(self.table, cur.ids, new)  # every rank holds every sample's margin (no-op on one process)
        self.current = None

    def _boundary_norms(self, engine: Engine, cur, adv_losses: torch.Tensor) -> torch.Tensor:
        """Norm of each failing sample's boundary point between its last good and first bad PGD iterates."""
        tracker = self._tracker
        tracker(self.steps, cur.x_adv - cur.x, adv_losses)  # the final iterate, scored by the trainer
        norms = torch.zeros(len(cur.ids), dtype=torch.float64)
        failing = ~satisfies(adv_losses, self.xi)
        if failing.any():
            network = unwrap_network(engine.network)
            was_training = network.training
            if self.attack_train_mode is not None:
                network.train(self.attack_train_mode)
            try:
                good = bisect_boundary(
                    network,
                    self.loss_fn,
                    cur.x[failing],
                    cur.y[failing],
                    tracker.good[failing],
                    tracker.bad[failing],
                    self.xi,
                    steps=self.bisect_steps,
                )
            finally:
                network.train(was_training)
            norms[failing.cpu()] = per_sample_norm(good, self.norm).double().cpu()
        return norms

    def log_summary(self, engine: Engine) -> None:
        s = self.table.summary()
        self.logger.info(
            f"epoch {engine.state.epoch}: margins of {s['count']} samples: "
            f"mean {s['mean']:.4f}, min {s['min']:.4f}, max {s['max']:.4f}"
        )

    def state_dict(self) -> dict:
        return {"margins": self.table.state_dict(), "xi": self.xi.clone(), "delta": self.delta}

    def load_state_dict(self, state: dict) -> None:
        self.table.load_state_dict(state["margins"])
