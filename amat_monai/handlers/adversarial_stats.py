"""Per-epoch statistics of adversarial training, for TensorBoard, MLflow and the log.

The trainer of a VAT / AMAT / TEAT run sees ``[x; x_adv]``; MONAI's ``TensorBoardStatsHandler`` can only plot the
loss of the whole batch. :class:`AdversarialStatsHandler` splits it into the clean and the adversarial loss and,
for AMAT, adds the margin distribution (a histogram per epoch), the share of samples whose margin grew, shrank or
was kept, and the radius the attack actually used. The scalars go into ``engine.state.metrics`` (so MONAI's
``TensorBoardStatsHandler`` and ``MLFlowHandler`` record them with the other metrics), the histogram into a
TensorBoard ``SummaryWriter``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor

from amat_monai.attacks import LossFn, per_sample_terms
from amat_monai.distributed import get_rank
from amat_monai.handlers.adversarial_training import AdversarialTrainingHandler

__all__ = ["AdversarialStatsHandler", "tensorboard_writer"]

logger = logging.getLogger(__name__)


def tensorboard_writer(log_dir: str | os.PathLike, enabled: bool = True) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` for rank 0, else ``None`` (other ranks, ``enabled=False``,
    or the ``tensorboard`` package missing, which is logged)."""
    if not enabled or get_rank() != 0:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        logger.warning(f"TensorBoard logging is off: {e} (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(log_dir))


class AdversarialStatsHandler:
    """Record the clean / adversarial loss and, for AMAT, the margins, once per epoch.

    Attach it to the trainer before the adversarial handler (it reads the attacked batch at
    ``FORWARD_COMPLETED``, which AMAT then releases) and before MONAI's ``TensorBoardStatsHandler`` (and
    ``MLFlowHandler``) so that they log the scalars it puts into ``engine.state.metrics``; the bundles'
    ``train.json`` do:

    * ``adv/clean_loss``, ``adv/adversarial_loss``: epoch means over the two halves of ``[x; x_adv]``;
    * ``adv/radius``: the mean radius the attack used (VAT / TEAT: ε; AMAT: the samples' margins);
    * AMAT only: ``adv/margin_mean``, ``adv/margin_median``, ``adv/margin_max`` and ``adv/<outcome>_rate`` for
      each outcome of the update rule (e.g. ``grown``, ``shrunk``, ``frozen``) among the epoch's updates; the
      margin of every sample as the histogram ``adv/margins``.

    Args:
        adversarial_handler: the run's VAT / AMAT / TEAT handler (``None``: nothing to record, for STD).
        loss_fn: the per-sample terms loss (``[B, K]``), as given to the adversarial handler.
        summary_writer: a TensorBoard ``SummaryWriter`` for the histogram (``None``: scalars only).
        pred_key, label_key: where the trainer's output holds the prediction and the label.
    """

    def __init__(
        self,
        adversarial_handler: AdversarialTrainingHandler | None,
        loss_fn: LossFn,
        summary_writer: Any = None,
        pred_key: str = "pred",
        label_key: str = "label",
    ) -> None:
        self.adversarial = adversarial_handler
        self.loss_fn = loss_fn
        self.writer = summary_writer
        self.pred_key, self.label_key = pred_key, label_key
        self._sums = torch.zeros(3, dtype=torch.float64)  # clean loss, adversarial loss, radius: sums over samples
        self._count = 0

    def attach(self, engine: Engine) -> None:
        if self.adversarial is None:
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        # before the adversarial handler's own FORWARD_COMPLETED update, which releases the batch it attacked
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._sums.zero_()
        self._count = 0

    @torch.no_grad()
    def _accumulate(self, engine: Engine) -> None:
        pred, current = self._prediction(engine.state.output), self.adversarial.current
        if pred is None or current is None:
            return
        n = current.x.shape[0]
        adv_loss = per_sample_terms(self.loss_fn(self.adversarial.adversarial_prediction(pred), current.y), n)
        clean_pred = self.adversarial.clean_prediction(pred)
        clean_loss = per_sample_terms(self.loss_fn(clean_pred, current.y), n) if clean_pred is not None else None
        self._sums += torch.stack([
            clean_loss.sum().double().cpu() if clean_loss is not None else torch.tensor(float("nan"), dtype=torch.float64),
            adv_loss.sum().double().cpu(),
            current.margins.sum().double().cpu(),
        ])
        self._count += n

    def _prediction(self, output: Any) -> torch.Tensor | None:
        pred = output.get(self.pred_key) if isinstance(output, dict) else None
        return convert_to_tensor(pred, track_meta=False).detach() if isinstance(pred, torch.Tensor) else None

    def __call__(self, engine: Engine) -> None:
        """Put the epoch's statistics into ``engine.state.metrics`` and the margin histogram into the writer."""
        stats: dict[str, float] = {}
        if self._count:
            clean, adversarial, radius = (self._sums / self._count).tolist()
            stats.update({"adv/clean_loss": clean, "adv/adversarial_loss": adversarial, "adv/radius": radius})
        epoch_summary = getattr(self.adversarial, "epoch_summary", None)
        if callable(epoch_summary):
            summary = epoch_summary()
            margins, outcomes = summary["margins"], summary["outcomes"]
            stats.update({f"adv/margin_{k}": float(margins[k]) for k in ("mean", "median", "max") if k in margins})
            total = sum(outcomes.values())
            stats.update({f"adv/{k}_rate": v / total for k, v in outcomes.items()} if total else {})
            if self.writer is not None and summary["values"].numel():
                self.writer.add_histogram("adv/margins", summary["values"], engine.state.epoch)
                self.writer.flush()
        engine.state.metrics.update(stats)
