"""TEAT_ε (Dong et al., ICLR 2022): PGD adversarial training plus a temporal-ensembling regulariser."""

from __future__ import annotations

import math

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

from amat_monai.attacks import LossFn
from amat_monai.distributed import sync_ensemble
from amat_monai.handlers.adversarial_training import FixedMarginHandler

__all__ = ["TemporalEnsemblingHandler", "teat_weight"]


def teat_weight(progress: float, max_weight: float = 300.0, start: float = 0.5, end: float = 0.7) -> float:
    """Regulariser weight ``w(t)``: 0 before ``start``, ``max_weight·exp(−5(1−τ)²)`` ramping up between ``start``
    and ``end`` (``τ`` the position inside the ramp), ``max_weight`` after ``end``; ``progress`` in [0, 1]."""
    if progress < start:
        return 0.0
    tau = min(1.0, (progress - start) / (end - start))
    return max_weight * math.exp(-5.0 * (1.0 - tau) ** 2)


class TemporalEnsemblingHandler(FixedMarginHandler):
    """VAT_ε plus ``w(t)·mean((softmax(f(x_adv)) − s_i)²)`` where ``s_i`` is an exponential moving average
    (``momentum``) of the softmax of the model's clean prediction for sample ``i``.

    Args:
        loss_fn: per-sample loss for the attack.
        eps: attack radius.
        momentum: EMA momentum of the ensembled predictions (0.9 in the paper).
        max_weight, ramp_start, ramp_end: the weight schedule of :func:`teat_weight`, as training fractions.
        softmax_over: ``"map"`` takes the softmax over the whole flattened output map (what the method doc
            describes for segmentation); ``"channel"`` takes it over classes at each pixel.
        kwargs: attack settings, see :class:`~amat_monai.handlers.AdversarialTrainingHandler`.

    A sample seen for the first time starts its ensemble at its current clean prediction. The ensembles are in
    :meth:`state_dict` (on the CPU).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        eps: float,
        momentum: float = 0.9,
        max_weight: float = 300.0,
        ramp_start: float = 0.5,
        ramp_end: float = 0.7,
        softmax_over: str = "map",
        **kwargs,
    ) -> None:
        super().__init__(loss_fn, eps, **kwargs)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if softmax_over not in ("map", "channel"):
            raise ValueError(f"softmax_over must be 'map' or 'channel', got {softmax_over!r}")
        if kwargs.get("adversarial_only"):
            raise ValueError("TEAT needs the clean predictions: adversarial_only must be False")
        self.momentum = momentum
        self.max_weight = max_weight
        self.ramp = (ramp_start, ramp_end)
        self.softmax_over = softmax_over
        self.ensemble: dict[str, torch.Tensor] = {}
        self.last_weight = 0.0

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.regularise)

    def _probabilities(self, pred: torch.Tensor) -> torch.Tensor:
        if self.softmax_over == "map":
            return torch.softmax(pred.flatten(1).float(), dim=1).view_as(pred)
        return torch.softmax(pred.float(), dim=1)

    def progress(self, engine: Engine) -> float:
        total = (engine.state.max_epochs or 1) * (engine.state.epoch_length or 1)
        return (engine.state.iteration - 1) / max(total, 1)

    def regularise(self, engine: Engine) -> None:
        """Add the regulariser to the trainer's loss (before its backward pass), then update the ensembles."""
        cur = self.current
        if cur is None:
            return
        pred = engine.state.output[CommonKeys.PRED]
        batch = len(cur.ids)
        clean_prob = self._probabilities(pred[:batch].detach())
        targets = torch.stack(
            [self.ensemble[i].to(clean_prob) if i in self.ensemble else clean_prob[k] for k, i in enumerate(cur.ids)]
        )
        self.last_weight = teat_weight(self.progress(engine), self.max_weight, *self.ramp)
        if self.last_weight > 0:
            adv_prob = self._probabilities(pred[batch:])
            engine.state.output[CommonKeys.LOSS] = engine.state.output[CommonKeys.LOSS] + self.last_weight * (
                (adv_prob - targets) ** 2
            ).mean()
        updated = self.momentum * targets + (1 - self.momentum) * clean_prob
        for k, sample_id in enumerate(cur.ids):
            self.ensemble[sample_id] = updated[k].detach().to("cpu", torch.float32)
        sync_ensemble(self.ensemble, cur.ids)  # every rank holds every sample's ensemble (no-op on one process)

    def state_dict(self) -> dict:
        return {"ensemble": dict(self.ensemble)}

    def load_state_dict(self, state: dict) -> None:
        self.ensemble = dict(state["ensemble"])
