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

__all__ = ["SegmentationLoss", "LandmarkLoss", "MeanLoss", "term_names"]


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
        # per-pixel CE as log-softmax + gather: the same values and gradients as F.cross_entropy(reduction="none"),
        # bit for bit, about a quarter faster on CPU (docs/PERFORMANCE.md), and the attack calls it at every step
        ce = -pred.log_softmax(dim=1).gather(1, target).flatten(1).mean(dim=1)
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


class LandmarkLoss(nn.Module):
    """Heatmap + offset loss of landmark detection (method doc §6) per sample: ``[B, 3]`` =
    (heatmap, offset_x, offset_y), so that AMAT keeps one threshold per term.

    Args:
        num_landmarks: ``K``; predictions and targets have ``3K`` channels ``[heatmaps, offsets x, offsets y]``
            (see :mod:`amat_monai.landmarks`). ``None`` infers it from the channel count.
        heatmap: ``"dice"`` (``0.5·(1 − soft Dice)`` of the sigmoid heatmaps, averaged over landmarks, which
            the papers found more robust) or ``"bce"`` (binary cross-entropy with logits, averaged over pixels).
        heatmap_weight, offset_weight: term weights.
        smooth: soft Dice smoothing.

    The offset terms are L1 distances averaged over the pixels inside the landmarks' discs (where the target
    heatmap is positive); a sample with no disc pixel gets 0.
    """

    term_names = ("heatmap", "offset_x", "offset_y")

    def __init__(
        self,
        num_landmarks: int | None = None,
        heatmap: str = "dice",
        heatmap_weight: float = 1.0,
        offset_weight: float = 1.0,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if heatmap not in ("dice", "bce"):
            raise ValueError(f"heatmap must be 'dice' or 'bce', got {heatmap!r}")
        self.num_landmarks = num_landmarks
        self.heatmap = heatmap
        self.heatmap_weight = heatmap_weight
        self.offset_weight = offset_weight
        self.smooth = smooth

    def _split(self, t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        channels = t.shape[1]
        if t.dim() < 3 or channels % 3 or (self.num_landmarks is not None and channels != 3 * self.num_landmarks):
            k = "3K" if self.num_landmarks is None else str(3 * self.num_landmarks)
            raise ValueError(f"{name} must be [B, {k}, *spatial] (heatmaps, offsets x, offsets y), got {tuple(t.shape)}")
        k = channels // 3
        return t[:, :k].flatten(2), t[:, k : 2 * k].flatten(2), t[:, 2 * k :].flatten(2)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"target shape {tuple(target.shape)} does not match prediction {tuple(pred.shape)}")
        h_logit, ox, oy = self._split(pred, "pred")
        h_true, tx, ty = self._split(target.to(pred.dtype), "target")
        if self.heatmap == "dice":
            prob = torch.sigmoid(h_logit)
            inter = (prob * h_true).sum(dim=2)
            denom = prob.sum(dim=2) + h_true.sum(dim=2)
            dice = (2 * inter + self.smooth) / (denom + self.smooth)
            heat = 0.5 * (1 - dice).mean(dim=1)
        else:
            heat = F.binary_cross_entropy_with_logits(h_logit, h_true, reduction="none").mean(dim=(1, 2))
        mask = (h_true > 0).to(pred.dtype)
        count = mask.sum(dim=(1, 2)).clamp_min(1.0)
        off_x = ((ox - tx).abs() * mask).sum(dim=(1, 2)) / count
        off_y = ((oy - ty).abs() * mask).sum(dim=(1, 2)) / count
        return torch.stack([self.heatmap_weight * heat, self.offset_weight * off_x, self.offset_weight * off_y], dim=1)
