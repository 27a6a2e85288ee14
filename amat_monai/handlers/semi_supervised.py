"""Semi-supervised adversarial training (SSAT; Li, Pan & Zhu, arXiv 2006.13555; method doc §8) as an Ignite handler.

Each training iteration also draws a batch of *unlabelled* images, labels them with the model's own clean
prediction (a pseudo-label, :mod:`amat_monai.pseudo_labels`), attacks them against that pseudo-label, and adds
``weight · mean_i L(f(x_u,i + δ_i), ŷ_i)`` to the trainer's loss before its backward pass. The supervised part is
whatever else the trainer does: plain (STD), VAT or AMAT (attach this handler beside theirs).

The authors' code (OCT classification) uses an L∞ FGSM of random strength and weight 3 (ours defaults to 0.3, the
weight validation chose on both real-data tasks); here the attack is L2 in the bundle's units, FGSM by default or
PGD-k, with a radius drawn uniformly per sample from ``eps`` (a range) or fixed, or ``eps="margin"``: adaptive
margins for the unlabelled samples too (AMAT's rule, :mod:`amat_monai.margins`: ``+Δ`` while the attacked
pseudo-label loss stays below a threshold ξ_u, kept otherwise), with ξ_u = mean + z·std of the pseudo-label losses
of the clean pool under the model the run starts from (the STD model when fine-tuning it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys, convert_to_tensor
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from amat_monai.attacks import LossFn, frozen_norm_statistics, per_sample_terms, pgd
from amat_monai.calibration import compute_xi
from amat_monai.distributed import get_rank, get_world_size, is_distributed, sync_margins, unwrap_network
from amat_monai.handlers.adversarial_training import batch_ids
from amat_monai.margins import MarginTable, update_margins

__all__ = ["SemiSupervisedAdversarialHandler", "SSAT_ATTACKS"]

SSAT_ATTACKS = ("fgsm", "pgd")

#: ``pseudo_label(pred) -> (target, confidence [B])``, see :mod:`amat_monai.pseudo_labels`
PseudoLabeller = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class SemiSupervisedAdversarialHandler:
    """Adds an adversarial loss on unlabelled images, attacked against the model's own pseudo-labels.

    Args:
        loss_fn: the bundle's per-sample loss (``[B]`` or ``[B, K]``), taking the pseudo-label as its label.
        dataset: the unlabelled images (items with ``image_key`` and ``id_key``; a label, if any, is ignored).
        pseudo_label: ``pred -> (target, confidence)`` (:class:`~amat_monai.pseudo_labels.ArgmaxPseudoLabel`,
            :class:`~amat_monai.pseudo_labels.LandmarkPseudoLabel`).
        weight: weight of the unlabelled term (3 in the authors' code, which hurt clean and robust accuracy in both of
            our real-data studies; 0.3 was validation's choice in both, see ``docs/RESULTS.md``).
        eps: the attack radius (input units): a number, ``(low, high)`` for a radius drawn uniformly per sample
            and iteration (the authors' random strength), or ``"margin"`` (per-sample adaptive margins, see above).
        margin_delta: with ``eps="margin"``: the initial margin and the growth step Δ.
        margin_eps_max: with ``eps="margin"``: the cap on the margins (``None``: none).
        margin_z: with ``eps="margin"``: ξ_u = mean + ``margin_z``·std of the clean pool's pseudo-label losses.
        attack: ``"fgsm"`` (one step of length ε) or ``"pgd"`` (``steps`` steps of ``step_size_factor·ε/steps``,
            capped at ε, from a random start).
        steps: PGD steps.
        step_size_factor: PGD step length factor.
        norm: ``"l2"`` or ``"linf"``.
        clamp: optional ``(low, high)`` input range.
        batch_size: unlabelled images per iteration.
        confidence_threshold: leave out the samples whose pseudo-label confidence is below this (``None``: keep all).
        teacher: a frozen network that makes the pseudo-labels (e.g. the STD model; ``None``: the model in training,
            its normalisation statistics untouched).
        attack_train_mode: attack with the network in train mode (as the supervised handlers do), eval mode
            (``False``), or as it is (``None``).
        seed: seed of the unlabelled draw order and of the radii.
        num_workers: workers of the unlabelled loader.
        image_key, id_key: batch keys of the image and the sample id.

    The unlabelled order is a seeded permutation per pass over the pool; under DDP each rank draws its own shard
    (:class:`~torch.utils.data.DistributedSampler`), like the labelled loader. The position in that order is in
    :meth:`state_dict`, so pass the handler in ``CheckpointSaver``'s ``save_dict``: a resumed run draws the same
    batches as an uninterrupted one.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        dataset: Dataset,
        pseudo_label: PseudoLabeller,
        weight: float = 0.3,
        eps: float | Sequence[float] | str = (0.0, 1.0),
        margin_delta: float = 1.0,
        margin_eps_max: float | None = None,
        margin_z: float = 2.0,
        attack: str = "fgsm",
        steps: int = 1,
        step_size_factor: float = 2.5,
        norm: str = "l2",
        clamp: Sequence[float] | None = None,
        batch_size: int = 32,
        confidence_threshold: float | None = None,
        teacher: nn.Module | None = None,
        attack_train_mode: bool | None = True,
        seed: int = 0,
        num_workers: int = 0,
        image_key: str = CommonKeys.IMAGE,
        id_key: str = "sample_id",
    ) -> None:
        if weight < 0:
            raise ValueError(f"ssat weight must be non-negative, got {weight}")
        self.adaptive = eps == "margin"
        if self.adaptive:
            if margin_delta <= 0 or (margin_eps_max is not None and margin_eps_max < margin_delta):
                raise ValueError(f"ssat margins need margin_delta > 0 and margin_eps_max >= it, got {margin_delta} "
                                 f"and {margin_eps_max}")
            low = high = 0.0
        elif isinstance(eps, str):
            raise ValueError(f"ssat eps must be a radius, a range (low, high) or 'margin', got {eps!r}")
        else:
            low, high = (float(eps), float(eps)) if isinstance(eps, (int, float)) else (float(v) for v in eps)
        if not 0 <= low <= high:
            raise ValueError(f"ssat eps must be a radius >= 0 or a range (low, high) with 0 <= low <= high, got {eps!r}")
        if attack not in SSAT_ATTACKS:
            raise ValueError(f"ssat attack must be one of {SSAT_ATTACKS}, got {attack!r}")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"ssat steps and batch_size must be >= 1, got {steps} and {batch_size}")
        if confidence_threshold is not None and not 0 <= confidence_threshold <= 1:
            raise ValueError(f"ssat confidence_threshold must lie in [0, 1] or be null, got {confidence_threshold}")
        if len(dataset) == 0:
            raise ValueError("the unlabelled dataset of semi-supervised training is empty (check labelled_fraction: "
                             "below 1 leaves the other training cases unlabelled)")
        self.loss_fn = loss_fn
        self.dataset = dataset
        self.pseudo_label = pseudo_label
        self.weight = float(weight)
        self.eps_range = (low, high)
        self.margin_delta = float(margin_delta)
        self.margin_eps_max = margin_eps_max
        self.margin_z = float(margin_z)
        self.table = MarginTable(init=self.margin_delta)
        self.xi: float | None = None  # ξ_u of the margin mode, calibrated at the first call
        self.attack = attack
        self.steps = int(steps) if attack == "pgd" else 1
        self.step_size_factor = float(step_size_factor)
        self.norm = norm
        self.clamp = tuple(clamp) if clamp is not None else None
        self.batch_size = int(batch_size)
        self.confidence_threshold = confidence_threshold
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self.attack_train_mode = attack_train_mode
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.image_key = image_key
        self.id_key = id_key
        self.cycle = 0  # passes over the unlabelled pool started
        self.position = 0  # batches drawn in the current pass
        self.draws = 0  # batches drawn in all
        self._batches = None
        self._epoch = {"loss": 0.0, "kept": 0, "seen": 0, "iterations": 0}
        self.logger = logging.getLogger(__name__)

    # -- the unlabelled stream ----------------------------------------------------------------------------
    def _order(self, cycle: int) -> list[int]:
        """This rank's indices for pass ``cycle`` over the pool: a seeded permutation (sharded under DDP)."""
        if is_distributed():
            sampler = DistributedSampler(self.dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True,
                                         seed=self.seed, drop_last=True)
            sampler.set_epoch(cycle)
            return list(sampler)
        generator = torch.Generator().manual_seed(self.seed + cycle)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def _open(self) -> None:
        order = self._order(self.cycle)
        if not order:
            raise ValueError(f"the unlabelled pool has {len(self.dataset)} samples, fewer than the "
                             f"{get_world_size()} processes that share it")
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        self._batches = iter(DataLoader(self.dataset, batch_sampler=batches[self.position:],
                                        num_workers=self.num_workers))

    def next_batch(self) -> dict:
        """The next unlabelled batch (a new pass over the pool starts when one ends)."""
        if self._batches is None:
            self._open()
        try:
            batch = next(self._batches)
        except StopIteration:
            self.cycle, self.position = self.cycle + 1, 0
            self._open()
            batch = next(self._batches)
        self.position += 1
        self.draws += 1
        if not isinstance(batch, dict) or self.image_key not in batch:
            keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
            raise KeyError(f"the unlabelled batch has no image under {str(self.image_key)!r} (it has {keys}); set the "
                           "ssat handler's image_key (ssat_image_key in ssat.json)")
        return batch

    def radii(self, n: int) -> torch.Tensor:
        """``[n]`` attack radii, uniform in ``eps`` (seeded by the draw, so a resumed run draws the same)."""
        low, high = self.eps_range
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.draws)
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    # -- Ignite -------------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._log_epoch)

    def __call__(self, engine: Engine) -> None:
        """Add ``weight ·`` the mean adversarial loss of an unlabelled batch to the trainer's loss."""
        added = self.unlabelled_loss(unwrap_network(engine.network), engine.state.device)
        engine.state.output[CommonKeys.LOSS] = engine.state.output[CommonKeys.LOSS] + added
        engine.state.output["ssat_loss"] = added.detach()

    def unlabelled_loss(self, network: nn.Module, device: torch.device | str | None = None) -> torch.Tensor:
        """``weight · mean_i ΣL(f(x_u,i + δ_i), ŷ_i)`` over the kept samples of the next unlabelled batch (0 when
        none is kept), differentiable in the network's parameters."""
        if self.adaptive and self.xi is None:
            self.xi = self.calibrate(network, device)
        batch = self.next_batch()
        x = convert_to_tensor(batch[self.image_key], track_meta=False).to(device or "cpu")
        target, confidence = self._pseudo_labels(network, x)
        keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        if self.confidence_threshold is not None:
            keep = confidence.to(x.device) >= self.confidence_threshold
        ids = batch_ids(batch, self.id_key) if self.adaptive else []
        radii = self.table.get(ids) if self.adaptive else self.radii(x.shape[0])
        radii = radii.to(device=x.device, dtype=x.dtype)
        step = radii if self.attack == "fgsm" else min(self.step_size_factor / self.steps, 1.0) * radii
        x_adv = pgd(network, self.loss_fn, x, target, radii, steps=self.steps, step_size=step, norm=self.norm,
                    random_start=self.attack == "pgd", clamp=self.clamp, train_mode=self.attack_train_mode)
        stats = self._epoch
        stats["iterations"] += 1
        stats["seen"] += x.shape[0]
        stats["kept"] += int(keep.sum())
        if not keep.any():
            return torch.zeros((), device=x.device)
        losses = per_sample_terms(self.loss_fn(network(x_adv[keep]), target[keep]), int(keep.sum())).sum(dim=1)
        if self.adaptive:
            self._update_margins(ids, radii, keep, losses.detach())
        added = self.weight * losses.mean()
        stats["loss"] += float(added)
        return added

    def _pseudo_labels(self, network: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.teacher if self.teacher is not None else network
        with torch.no_grad(), frozen_norm_statistics(source):
            return self.pseudo_label(source(x))

    @torch.no_grad()
    def calibrate(self, network: nn.Module, device: torch.device | str | None = None) -> float:
        """ξ_u of the margin mode: mean + ``margin_z``·std of the clean pseudo-label losses over the pool."""
        losses = []
        for batch in DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers):
            x = convert_to_tensor(batch[self.image_key], track_meta=False).to(device or "cpu")
            target, _ = self._pseudo_labels(network, x)
            with frozen_norm_statistics(network):
                losses.append(per_sample_terms(self.loss_fn(network(x), target), x.shape[0]).sum(dim=1).cpu())
        xi = compute_xi(torch.cat(losses), z=self.margin_z)[0]["xi"]
        self.logger.info(f"unlabelled margins: ξ_u = {xi:.4f} (mean + {self.margin_z:g}·std of the pseudo-label "
                         f"losses of {len(self.dataset)} unlabelled samples)")
        return float(xi)

    def _update_margins(self, ids: list[str], radii: torch.Tensor, keep: torch.Tensor, losses: torch.Tensor) -> None:
        """``+Δ`` for a kept sample whose attacked pseudo-label loss stayed below ξ_u; every other margin stays."""
        passed = torch.zeros(len(ids), dtype=torch.bool)
        passed[keep.cpu()] = losses.cpu() < self.xi
        margins = radii.double().cpu()
        new = update_margins(margins, passed, self.margin_delta, shrink="none", eps_max=self.margin_eps_max)
        self.table.set(ids, new, trained_at=margins)
        sync_margins(self.table, ids, new, trained_at=margins)  # every rank holds every margin
        self._epoch["grown"] = self._epoch.get("grown", 0) + int(passed.sum())

    def _reset(self, engine: Engine | None = None) -> None:
        self._epoch = {"loss": 0.0, "kept": 0, "seen": 0, "iterations": 0}

    def _log_epoch(self, engine: Engine) -> None:
        stats = self._epoch
        if stats["iterations"]:
            mean = stats["loss"] / stats["iterations"]
            engine.state.metrics["ssat_loss"] = mean
            margins = ""
            if self.adaptive:
                m = self.table.summary()
                margins = (f"; unlabelled margins mean {m['mean']:.3f}, median {m['median']:.3f}, max {m['max']:.3f} "
                           f"({stats.get('grown', 0)} grown)")
            self.logger.info(f"epoch {engine.state.epoch}: unlabelled adversarial term {mean:.4f} (weight "
                             f"{self.weight:g}), {stats['kept']} of {stats['seen']} unlabelled samples kept{margins}")

    # -- checkpointing ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"cycle": self.cycle, "position": self.position, "draws": self.draws}
        return {**state, "xi": self.xi, "margins": self.table.state_dict()} if self.adaptive else state

    def load_state_dict(self, state: dict) -> None:
        self.cycle, self.position, self.draws = int(state["cycle"]), int(state["position"]), int(state["draws"])
        self.xi = state.get("xi")
        if "margins" in state:
            self.table.load_state_dict(state["margins"])
        self._batches = None  # reopened at the restored position
