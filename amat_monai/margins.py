"""The AMAT margin update rule (Ma & Liang), in one place.

Each training sample ``i`` has a margin ``E[i]``: the noise level its adversarial example is drawn at. After
every iteration the margins of the samples in the batch are updated from their adversarial losses ``L1``
(``[B, K]``, one column per loss term) and the thresholds ``xi`` (``[K]``):

* **expand** when every term is below its threshold (``L1[i, k] < xi[k]`` for all ``k``): ``E[i] += delta``;
* **shrink** otherwise, either halfway to the boundary found by bisection along the attack path,
  ``E[i] = max((E[i] + ||b_i||) / 2, delta)`` (``shrink="bisect"``, the default), or one step back,
  ``E[i] = max(E[i] - delta, delta)`` (``shrink="step"``);
* optionally **cap** every margin at ``eps_max``.

New samples start at ``init`` (``delta`` by default).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from amat_monai.attacks import LossFn, frozen_norm_statistics, per_sample_terms

__all__ = [
    "SHRINK_RULES",
    "expand",
    "shrink_step",
    "shrink_to_boundary",
    "satisfies",
    "MarginTable",
    "BoundaryTracker",
    "bisect_boundary",
    "update_margins",
]

SHRINK_RULES = ("bisect", "step")


def expand(margins: torch.Tensor, delta: float, eps_max: float | None = None) -> torch.Tensor:
    """``E + delta``, capped at ``eps_max`` when given."""
    out = margins + delta
    return out if eps_max is None else out.clamp_max(eps_max)


def shrink_step(margins: torch.Tensor, delta: float) -> torch.Tensor:
    """Step back by ``delta``, floored at ``delta``: ``max(E - delta, delta)``."""
    return (margins - delta).clamp_min(delta)


def shrink_to_boundary(margins: torch.Tensor, boundary_norm: torch.Tensor, delta: float) -> torch.Tensor:
    """Halfway to the boundary, floored at ``delta``: ``max((E + ||b||) / 2, delta)``."""
    return ((margins + boundary_norm) / 2).clamp_min(delta)


def satisfies(losses: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
    """``[B]`` mask: every term of a sample's ``[B, K]`` losses is strictly below its threshold ``xi[k]``."""
    xi = torch.as_tensor(xi, dtype=losses.dtype, device=losses.device).reshape(-1)
    if losses.dim() == 1:
        losses = losses[:, None]
    if losses.shape[1] != xi.numel():
        raise ValueError(f"losses have {losses.shape[1]} terms but xi has {xi.numel()} thresholds")
    return (losses < xi).all(dim=1)


class MarginTable:
    """Per-sample margins keyed by a stable sample id (for instance ``"hippocampus_001:12"``).

    Args:
        init: margin of a sample seen for the first time.

    The table is a ``state_dict``-able object, so that MONAI's ``CheckpointSaver`` / ``CheckpointLoader``
    store and restore it, and a resumed run continues with exactly the same margins.
    """

    def __init__(self, init: float) -> None:
        if init < 0:
            raise ValueError(f"init must be non-negative, got {init}")
        self.init = float(init)
        self._index: dict[str, int] = {}
        self._values = torch.zeros(0, dtype=torch.float64)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: str) -> bool:
        return str(sample_id) in self._index

    def ids(self) -> list[str]:
        return list(self._index)

    def _rows(self, ids: Iterable) -> torch.Tensor:
        rows, new = [], []
        for sample_id in ids:
            key = str(sample_id)
            if key not in self._index:
                self._index[key] = len(self._index)
                new.append(key)
            rows.append(self._index[key])
        if new:
            fill = torch.full((len(new),), self.init, dtype=self._values.dtype)
            self._values = torch.cat([self._values, fill])
        return torch.as_tensor(rows, dtype=torch.long)

    def get(self, ids: Sequence, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
        """Margins of ``ids`` as a ``[B]`` tensor; unseen ids are added at ``init``."""
        rows = self._rows(ids)  # may grow the table: index after it
        return self._values[rows].to(device=device, dtype=dtype)

    def set(self, ids: Sequence, values: torch.Tensor) -> None:
        rows = self._rows(ids)
        values = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)
        if values.numel() != rows.numel():
            raise ValueError(f"got {values.numel()} margins for {rows.numel()} ids")
        self._values[rows] = values

    def as_dict(self) -> dict[str, float]:
        return {key: float(self._values[row]) for key, row in self._index.items()}

    def summary(self) -> dict[str, float]:
        """Count, mean, min and max of the margins (for logging)."""
        if not len(self):
            return {"count": 0, "mean": float("nan"), "min": float("nan"), "max": float("nan")}
        v = self._values
        return {"count": len(self), "mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}

    def state_dict(self) -> dict:
        return {"init": self.init, "ids": self.ids(), "margins": self._values.clone()}

    def load_state_dict(self, state: dict) -> None:
        ids, values = list(state["ids"]), torch.as_tensor(state["margins"], dtype=torch.float64)
        if len(ids) != values.numel():
            raise ValueError(f"margin state has {len(ids)} ids but {values.numel()} values")
        self.init = float(state.get("init", self.init))
        self._index = {str(k): i for i, k in enumerate(ids)}
        self._values = values.clone()


class BoundaryTracker:
    """Attack observer that remembers, per sample, where the attack path first crossed the thresholds.

    Pass it as ``observer`` to :func:`amat_monai.attacks.pgd`, then call it once more with the final
    iterate's losses. For each sample it keeps the first iterate that violated the condition
    (``bad``) and the iterate just before it (``good``; zero perturbation, the clean input, if the very first
    iterate already violated it).
    """

    def __init__(self, xi: torch.Tensor) -> None:
        self.xi = xi
        self.good: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None
        self.crossed: torch.Tensor | None = None
        self._previous: torch.Tensor | None = None

    def __call__(self, step: int, delta: torch.Tensor, losses: torch.Tensor) -> None:
        if self._previous is None:
            self._previous = torch.zeros_like(delta)
            self.good = torch.zeros_like(delta)
            self.bad = torch.zeros_like(delta)
            self.crossed = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)
        newly = ~satisfies(losses, self.xi) & ~self.crossed
        self.good[newly] = self._previous[newly]
        self.bad[newly] = delta[newly]
        self.crossed |= newly
        self._previous = delta.detach().clone()


@torch.no_grad()
def bisect_boundary(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    good: torch.Tensor,
    bad: torch.Tensor,
    xi: torch.Tensor,
    steps: int = 10,
) -> torch.Tensor:
    """Bisect the segment ``[good, bad]`` of each sample's perturbation for the threshold crossing.

    ``good`` satisfies the condition and ``bad`` does not; after ``steps`` halvings the returned perturbation is
    the last point known to satisfy it. Uses ``steps`` forward passes, no gradient, and leaves the
    normalisation statistics untouched.
    """
    with frozen_norm_statistics(model):
        for _ in range(steps):
            mid = (good + bad) / 2
            ok = satisfies(per_sample_terms(loss_fn(model(x + mid), y), x.shape[0]), xi)
            mask = ok.view(-1, *([1] * (x.dim() - 1)))
            good = torch.where(mask, mid, good)
            bad = torch.where(mask, bad, mid)
    return good


def update_margins(
    margins: torch.Tensor,
    adv_losses: torch.Tensor,
    xi: torch.Tensor,
    delta: float,
    *,
    shrink: str = "bisect",
    eps_max: float | None = None,
    boundary_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """New margins ``[B]`` from the current ones and the adversarial losses ``[B, K]``.

    Args:
        margins: current margins of the batch's samples.
        adv_losses: their adversarial per-term losses.
        xi: per-term thresholds ``[K]``.
        delta: expansion step and floor.
        shrink: ``"bisect"`` (needs ``boundary_norm``, the L2 norm of each sample's boundary point) or ``"step"``.
        eps_max: optional cap.
    """
    if shrink not in SHRINK_RULES:
        raise ValueError(f"shrink must be one of {SHRINK_RULES}, got {shrink!r}")
    ok = satisfies(adv_losses, xi).to(margins.device)
    if shrink == "bisect":
        if boundary_norm is None:
            raise ValueError("shrink='bisect' needs boundary_norm")
        shrunk = shrink_to_boundary(margins, boundary_norm.to(margins), delta)
    else:
        shrunk = shrink_step(margins, delta)
    out = torch.where(ok, expand(margins, delta), shrunk)
    return out if eps_max is None else out.clamp_max(eps_max)

