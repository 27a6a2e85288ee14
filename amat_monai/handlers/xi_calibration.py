"""ξ calibration as an Ignite handler on a MONAI evaluator run over the clean training set."""

from __future__ import annotations

import logging
import os

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys

from amat_monai.attacks import LossFn, per_sample_terms
from amat_monai.calibration import compute_xi, write_xi
from amat_monai.losses import term_names

__all__ = ["XiCalibrationHandler"]


class XiCalibrationHandler:
    """Collect per-sample, per-term losses of every batch and write ``xi.json`` when the run completes.

    Args:
        loss_fn: the per-sample training loss ``[B]`` or ``[B, K]`` (the one AMAT will use).
        output_path: where ``xi.json`` goes (written atomically).
        z: ``ξ = location + z · scale`` (0 for segmentation, 2 for landmarks in the papers).
        estimator: ``"mean_std"`` or ``"huber"``.
        checkpoint: the checkpoint of the model being calibrated; its SHA-256 is recorded.

    Attach it to a ``SupervisedEvaluator`` whose output holds raw logits under ``pred`` (no postprocessing).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        output_path: str | os.PathLike,
        z: float = 0.0,
        estimator: str = "mean_std",
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        self.loss_fn = loss_fn
        self.output_path = output_path
        self.z = z
        self.estimator = estimator
        self.checkpoint = checkpoint
        self.losses: list[torch.Tensor] = []
        self.result: dict | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.losses = []

    @torch.no_grad()
    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        pred, label = output[CommonKeys.PRED], output[CommonKeys.LABEL]
        self.losses.append(per_sample_terms(self.loss_fn(pred, label), pred.shape[0]).double().cpu())

    def write(self, engine: Engine | None = None) -> dict:
        if not self.losses:
            raise RuntimeError("ξ calibration saw no batch: the calibration data set is empty")
        losses = torch.cat(self.losses)
        terms = compute_xi(losses, self.z, self.estimator, term_names(self.loss_fn, losses.shape[1]))
        self.result = write_xi(self.output_path, terms, self.checkpoint)
        self.logger.info(f"wrote {self.output_path}: " + ", ".join(f"{t['name']} ξ={t['xi']:.4f}" for t in terms))
        return self.result
