"""Adversarial training as an Ignite handler on a plain MONAI ``SupervisedTrainer``.

At ``ITERATION_STARTED`` the handler attacks the batch (L2 PGD inside each sample's ball) and appends the
adversarial copies to it, so the trainer's forward pass sees ``[x; x_adv]`` and a loss averaged over samples
(:class:`amat_monai.losses.MeanLoss`) is exactly ``0.5·clean + 0.5·adversarial``. Subclasses choose each
sample's margin (the radius of its attack): one ε for all (:class:`FixedMarginHandler`, VAT) or per-sample margins
(:class:`~amat_monai.handlers.AdaptiveMarginHandler`, AMAT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys, convert_to_tensor

from amat_monai.attacks import LossFn, Observer, pgd
from amat_monai.distributed import unwrap_network

__all__ = ["AdversarialBatch", "AdversarialTrainingHandler", "FixedMarginHandler", "batch_ids"]


def batch_ids(batch: dict, id_key: str) -> list[str]:
    """The batch's stable sample ids as strings (MONAI collates strings to a list, integers to a tensor)."""
    if id_key not in batch:
        raise KeyError(
            f"batch has no sample id under {id_key!r} (keys: {sorted(batch)}); adversarial training with "
            "per-sample state needs a stable id per sample, e.g. 'case:slice'"
        )
    ids = batch[id_key]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [str(i) for i in ids]


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Drop MONAI's MetaTensor wrapper: the attack needs plain tensors (and is faster on them)."""
    return convert_to_tensor(t, track_meta=False)


@dataclass
class AdversarialBatch:
    """What the handler crafted for the current iteration (read by subclasses and other handlers)."""

    ids: list[str]
    x: torch.Tensor
    y: torch.Tensor
    x_adv: torch.Tensor
    margins: torch.Tensor
    observer: Observer | None = None


class AdversarialTrainingHandler:
    """Base handler: attack every training batch at per-sample margins chosen by :meth:`margins_of`.

    Args:
        loss_fn: per-sample loss returning ``[B]`` or ``[B, K]`` (the terms of the training loss).
        steps: PGD steps during training.
        step_size_factor: each step is ``min(step_size_factor / steps, 1) * eps_i``: the authors' rule (they used
            4), capped so that one step never exceeds the ball's radius (with 3 steps and a factor of 4 it would
            be 4ε/3, and every step would land on the sphere).
        norm: ``"l2"`` or ``"linf"``.
        random_start: start PGD from a random point in the ball.
        clamp: optional ``(low, high)`` input range.
        attack_train_mode: attack with the network in train mode (the authors' choice) or eval mode
            (``False``); ``None`` keeps the mode the network is in. Normalisation statistics are never changed.
        adversarial_only: train on ``x_adv`` alone instead of ``[x; x_adv]``.
        image_key, label_key, id_key: batch keys of the input, the label and the stable sample id.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        steps: int = 20,
        step_size_factor: float = 4.0,
        norm: str = "l2",
        random_start: bool = True,
        clamp: Sequence[float] | None = None,
        attack_train_mode: bool | None = True,
        adversarial_only: bool = False,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        id_key: str = "sample_id",
    ) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if step_size_factor <= 0:
            raise ValueError(f"step_size_factor must be positive, got {step_size_factor}")
        self.loss_fn = loss_fn
        self.steps = int(steps)
        self.step_size_factor = float(step_size_factor)
        self.norm = norm
        self.random_start = random_start
        self.clamp = tuple(clamp) if clamp is not None else None
        self.attack_train_mode = attack_train_mode
        self.adversarial_only = adversarial_only
        self.image_key = image_key
        self.label_key = label_key
        self.id_key = id_key
        self.current: AdversarialBatch | None = None

    # -- to be specialised -------------------------------------------------------------------------------
    def margins_of(self, ids: list[str], x: torch.Tensor) -> torch.Tensor:
        """Per-sample margin ``[B]`` (the attack's radius) for this batch."""
        raise NotImplementedError

    def make_observer(self, y: torch.Tensor) -> Observer | None:
        """A new observer of this batch's attack path, if the subclass needs one (kept in :attr:`current`)."""
        return None

    def step_size(self, margins: torch.Tensor) -> torch.Tensor:
        """Per-sample PGD step length: ``min(step_size_factor / steps, 1) · margins``."""
        return min(self.step_size_factor / self.steps, 1.0) * margins

    # -- Ignite ---------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """Attack the batch in ``engine.state.batch`` and put ``[x; x_adv]`` in its place."""
        batch = engine.state.batch
        if not isinstance(batch, dict):
            raise TypeError(f"{type(self).__name__} needs dictionary batches, got {type(batch).__name__}")
        prepared = engine.prepare_batch(batch, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        x, y = _plain(prepared[0]), _plain(prepared[1])
        ids = batch_ids(batch, self.id_key)
        if len(ids) != x.shape[0]:
            raise ValueError(f"batch has {x.shape[0]} images but {len(ids)} ids under {self.id_key!r}")
        margins = self.margins_of(ids, x).to(device=x.device, dtype=x.dtype)
        observer = self.make_observer(y)
        x_adv = pgd(
            unwrap_network(engine.network),
            self.loss_fn,
            x,
            y,
            margins,
            steps=self.steps,
            step_size=self.step_size(margins),
            norm=self.norm,
            random_start=self.random_start,
            clamp=self.clamp,
            train_mode=self.attack_train_mode,
            observer=observer,
        )
        self.current = AdversarialBatch(ids=ids, x=x, y=y, x_adv=x_adv, margins=margins, observer=observer)
        new_batch = dict(batch)
        new_batch[self.image_key] = x_adv if self.adversarial_only else torch.cat([x, x_adv])
        new_batch[self.label_key] = y if self.adversarial_only else torch.cat([y, y])
        engine.state.batch = new_batch

    def adversarial_prediction(self, pred: torch.Tensor) -> torch.Tensor:
        """The rows of the trainer's prediction that belong to ``x_adv``."""
        return pred if self.adversarial_only else pred[pred.shape[0] // 2 :]

    def clean_prediction(self, pred: torch.Tensor) -> torch.Tensor | None:
        """The rows of the trainer's prediction that belong to ``x`` (``None`` with ``adversarial_only``)."""
        return None if self.adversarial_only else pred[: pred.shape[0] // 2]

    # -- checkpointing (subclasses with state extend these) -----------------------------------------------
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class FixedMarginHandler(AdversarialTrainingHandler):
    """VAT_ε: PGD adversarial training with one radius ``eps`` for every sample (Madry et al.).

    Args:
        eps: the radius, in input units (z-scored intensities for MRI).
        kwargs: see :class:`AdversarialTrainingHandler`.
    """

    def __init__(self, loss_fn: LossFn, eps: float, **kwargs) -> None:
        if eps < 0:
            raise ValueError(f"eps must be non-negative, got {eps}")
        super().__init__(loss_fn, **kwargs)
        self.eps = float(eps)

    def margins_of(self, ids: list[str], x: torch.Tensor) -> torch.Tensor:
        return torch.full((x.shape[0],), self.eps)
