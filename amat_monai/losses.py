"""Per-sample, per-term task losses.

Attacks, the AMAT margin rule and ξ calibration all need a loss per sample and per term (``[B, K]``), while a
trainer needs one scalar. A *terms loss* is an ``nn.Module`` returning ``[B, K]`` with a ``term_names`` tuple;
:class:`MeanLoss` turns it into the scalar training loss (sum of terms, mean over samples), so that the
attack, the margin rule and the optimiser all see the same loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

__all__ = ["SegmentationLoss", "MeanLoss", "term_names"]


def term_names(loss_fn: nn.Module, num_terms: int) -> list[str]:
    """The loss's ``term_names`` when it has them, else ``term0, term1, ...``."""
    names = list(getattr(loss_fn, "term_names", ()))
    return names if len(names) == num_terms else [f"term{k}" for k in range(num_terms)]


class SegmentationLoss(nn.Module):
    """Soft Dice + cross-entropy per sample, as nnU-Net trains: ``[B, 2]`` = (Dice term, CE term).

    Args:
        include_background: include class 0 in the Dice term.
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term.
        smooth_nr: Dice numerator smoothing (MONAI ``DiceLoss``).
        smooth_dr: Dice denominator smoothing.

    ``forward(pred, target)`` takes logits ``[B, C, *spatial]`` and integer labels ``[B, 1, *spatial]``
    (or ``[B, *spatial]``) and returns ``[B, 2]``.
    """

    term_names = ("dice", "ce")

    def __init__(
        self,
        include_background: bool = False,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ) -> None:
        super().__init__()
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            reduction="none",
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == pred.dim() - 1:
            target = target[:, None]
        if target.shape[0] != pred.shape[0] or target.shape[2:] != pred.shape[2:]:
            raise ValueError(f"target shape {tuple(target.shape)} does not match prediction {tuple(pred.shape)}")
        target = target.long()
        dice = self.dice(pred, target).flatten(1).mean(dim=1)
        ce = F.cross_entropy(pred, target[:, 0], reduction="none").flatten(1).mean(dim=1)
        return torch.stack([self.dice_weight * dice, self.ce_weight * ce], dim=1)


class MeanLoss(nn.Module):
    """Scalar training loss from a terms loss: sum over terms, mean over samples.

    With a batch made of B clean and B adversarial samples this is exactly ``0.5·clean + 0.5·adversarial``.
    """

    def __init__(self, terms: nn.Module) -> None:
        super().__init__()
        self.terms = terms

    @property
    def term_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.terms, "term_names", ()))

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.terms(pred, target)
        return (losses if losses.dim() == 1 else losses.sum(dim=1)).mean()
