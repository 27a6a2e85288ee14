"""The AMAT margin update rule (Ma & Liang), in one place.

Each training sample ``i`` has a margin ``m_i``: the radius its adversarial example is drawn at. After every
iteration the margins of the batch's samples are updated from whether they passed the expand condition
(:mod:`amat_monai.conditions`) at their margin:

* **frozen**: a sample that already fails on its *clean* input keeps its margin (no attack radius can make
  it pass, so neither growth nor a collapse to the floor would mean anything);
* **grow** when it passed: ``m + Δ`` (``growth="additive"``, the paper) or ``m · κ`` (``"geometric"``);
* **shrink** when it failed: halfway to the boundary ``b_i`` (``shrink="halfway"``, the paper),
  ``max((m + ||b_i||) / 2, floor)``; one step back, ``max(m − Δ, floor)`` (``"step"``); or not at all
  (``"none"``, what the authors' nnU-Net code does in effect);
* **cap** every margin at ``eps_max`` when given.

The boundary ``b_i`` is where the attack path first crossed the condition. By default it is interpolated from
the condition's values at the PGD iterates the attack computed anyway (:class:`BoundaryTracker`), so it costs
no forward pass; :func:`bisect_boundary` refines it with extra forward passes instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from amat_monai.attacks import frozen_norm_statistics

__all__ = [
    "GROWTH_RULES",
    "SHRINK_RULES",
    "BOUNDARY_SEARCHES",
    "grow",
    "shrink_step",
    "shrink_to_boundary",
    "MarginTable",
    "BoundaryTracker",
    "bisect_boundary",
    "update_margins",
]

GROWTH_RULES = ("additive", "geometric")
SHRINK_RULES = ("halfway", "step", "none")
BOUNDARY_SEARCHES = ("interpolate", "bisect")


def grow(margins: torch.Tensor, rule: str, delta: float, factor: float = 1.5, eps_max: float | None = None) -> torch.Tensor:
    """``m + delta`` (``rule="additive"``) or ``m · factor`` (``"geometric"``), capped at ``eps_max``."""
    if rule not in GROWTH_RULES:
        raise ValueError(f"growth must be one of {GROWTH_RULES}, got {rule!r}")
    out = margins + delta if rule == "additive" else margins * factor
    return out if eps_max is None else out.clamp_max(eps_max)


def shrink_step(margins: torch.Tensor, delta: float, floor: float | None = None) -> torch.Tensor:
    """Step back by ``delta``: ``max(m − delta, floor)`` (``floor`` defaults to ``delta``)."""
    return (margins - delta).clamp_min(delta if floor is None else floor)


def shrink_to_boundary(margins: torch.Tensor, boundary_norm: torch.Tensor, floor: float) -> torch.Tensor:
    """Halfway to the boundary: ``max((m + ||b||) / 2, floor)``."""
    return ((margins + boundary_norm) / 2).clamp_min(floor)


def update_margins(
    margins: torch.Tensor,
    passed: torch.Tensor,
    delta: float,
    *,
    growth: str = "additive",
    growth_factor: float = 1.5,
    shrink: str = "halfway",
    boundary_norm: torch.Tensor | None = None,
    frozen: torch.Tensor | None = None,
    floor: float | None = None,
    eps_max: float | None = None,
) -> torch.Tensor:
    """New margins ``[B]`` from the current ones and the condition's verdict at them.

    Args:
        margins: current margins of the batch's samples.
        passed: ``[B]`` mask, the sample passed the expand condition at its margin.
        delta: additive growth step and the default floor.
        growth: ``"additive"`` or ``"geometric"`` (times ``growth_factor``).
        shrink: ``"halfway"`` (needs ``boundary_norm``, the norm of each sample's boundary point), ``"step"`` or
            ``"none"``.
        frozen: ``[B]`` mask of samples that keep their margin whatever happened (clean failures).
        floor: no shrink goes below it (default ``delta``).
        eps_max: optional cap.
    """
    if shrink not in SHRINK_RULES:
        raise ValueError(f"shrink must be one of {SHRINK_RULES}, got {shrink!r}")
    floor = delta if floor is None else floor
    passed = passed.to(margins.device)
    if shrink == "halfway":
        if boundary_norm is None:
            raise ValueError("shrink='halfway' needs boundary_norm")
        shrunk = shrink_to_boundary(margins, boundary_norm.to(margins), floor)
    elif shrink == "step":
        shrunk = shrink_step(margins, delta, floor)
    else:
        shrunk = margins
    out = torch.where(passed, grow(margins, growth, delta, growth_factor), shrunk)
    if frozen is not None:
        out = torch.where(frozen.to(margins.device), margins, out)
    return out if eps_max is None else out.clamp_max(eps_max)


class MarginTable:
    """Per-sample margins keyed by a stable sample id (for instance ``"hippocampus_001:12"``).

    Args:
        init: margin of a sample seen for the first time.

    Beside each margin the table keeps what the diagnostics need: the number of visits and the sum of the
    radii each sample was trained at (their ratio is its time-averaged training radius). It is a
    ``state_dict``-able object, so that MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` store and restore it,
    and a resumed run continues with exactly the same margins.
    """

    def __init__(self, init: float) -> None:
        if init < 0:
            raise ValueError(f"init must be non-negative, got {init}")
        self.init = float(init)
        self._index: dict[str, int] = {}
        self._values = torch.zeros(0, dtype=torch.float64)
        self._radius_sum = torch.zeros(0, dtype=torch.float64)
        self._visits = torch.zeros(0, dtype=torch.float64)

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
            zeros = torch.zeros(len(new), dtype=torch.float64)
            self._values = torch.cat([self._values, torch.full_like(zeros, self.init)])
            self._radius_sum = torch.cat([self._radius_sum, zeros])
            self._visits = torch.cat([self._visits, zeros])
        return torch.as_tensor(rows, dtype=torch.long)

    def get(self, ids: Sequence, device: torch.device | str | None = None, dtype=torch.float32) -> torch.Tensor:
        """Margins of ``ids`` as a ``[B]`` tensor; unseen ids are added at ``init``."""
        rows = self._rows(ids)  # may grow the table: index after it
        return self._values[rows].to(device=device, dtype=dtype)

    def set(self, ids: Sequence, values: torch.Tensor, trained_at: torch.Tensor | None = None) -> None:
        """Store new margins; ``trained_at`` (the radii the samples were just trained at) counts a visit."""
        rows = self._rows(ids)
        values = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)
        if values.numel() != rows.numel():
            raise ValueError(f"got {values.numel()} margins for {rows.numel()} ids")
        self._values[rows] = values
        if trained_at is not None:
            self._radius_sum[rows] += torch.as_tensor(trained_at).detach().to("cpu", torch.float64).reshape(-1)
            self._visits[rows] += 1

    def values(self) -> torch.Tensor:
        """All margins, in :meth:`ids` order."""
        return self._values.clone()

    def mean_training_radius(self) -> torch.Tensor:
        """Each sample's time-averaged training radius (NaN for a sample never trained), in :meth:`ids` order."""
        return torch.where(self._visits > 0, self._radius_sum / self._visits.clamp_min(1), torch.nan)

    def as_dict(self) -> dict[str, float]:
        return {key: float(self._values[row]) for key, row in self._index.items()}

    def summary(self) -> dict[str, float]:
        """Count, mean, min, quartiles and max of the margins (for logging)."""
        if not len(self):
            return {"count": 0, **{k: float("nan") for k in ("mean", "min", "q25", "median", "q75", "max")}}
        v = self._values
        q = torch.quantile(v, torch.tensor([0.25, 0.5, 0.75], dtype=v.dtype)).tolist()
        return {"count": len(self), "mean": float(v.mean()), "min": float(v.min()), "q25": q[0], "median": q[1],
                "q75": q[2], "max": float(v.max())}

    def state_dict(self) -> dict:
        return {"init": self.init, "ids": self.ids(), "margins": self._values.clone(),
                "radius_sum": self._radius_sum.clone(), "visits": self._visits.clone()}

    def load_state_dict(self, state: dict) -> None:
        ids, values = list(state["ids"]), torch.as_tensor(state["margins"], dtype=torch.float64)
        if len(ids) != values.numel():
            raise ValueError(f"margin state has {len(ids)} ids but {values.numel()} values")
        zeros = torch.zeros_like(values)
        self.init = float(state.get("init", self.init))
        self._index = {str(k): i for i, k in enumerate(ids)}
        self._values = values.clone()
        self._radius_sum = torch.as_tensor(state.get("radius_sum", zeros), dtype=torch.float64).clone()
        self._visits = torch.as_tensor(state.get("visits", zeros), dtype=torch.float64).clone()


class BoundaryTracker:
    """Attack observer that locates, per sample, where the attack path first crossed the expand condition.

    Pass it as ``observer`` to :func:`amat_monai.attacks.pgd`, then call it once more with the final iterate
    (scored by the trainer). For each sample it keeps the first iterate that failed the condition (``bad``)
    and the iterate just before it (``good``), with the condition's badness at both. When the very first
    iterate already failed, ``good`` is the clean input (zero perturbation), whose badness the trainer's clean
    pass gives to :meth:`interpolate`.

    Args:
        condition: an :class:`~amat_monai.conditions.ExpandCondition`.
        y: the batch's targets (for conditions that score the output against them).
    """

    def __init__(self, condition, y: torch.Tensor) -> None:
        self.condition = condition
        self.y = y
        self.good: torch.Tensor | None = None
        self.bad: torch.Tensor | None = None
        self.good_badness: torch.Tensor | None = None
        self.bad_badness: torch.Tensor | None = None
        self.crossed: torch.Tensor | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, step: int, delta: torch.Tensor, losses: torch.Tensor, pred: torch.Tensor) -> None:
        badness = self.condition.badness(pred, self.y, losses).double()
        if self._previous is None:
            self.good = torch.zeros_like(delta)
            self.bad = torch.zeros_like(delta)
            self.good_badness = torch.full_like(badness, torch.nan)  # the clean input's, filled in later
            self.bad_badness = torch.zeros_like(badness)
            self.crossed = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)
            self._previous = (torch.zeros_like(delta), self.good_badness.clone())
        newly = ~self.condition.passes(badness) & ~self.crossed
        self.good[newly] = self._previous[0][newly]
        self.good_badness[newly] = self._previous[1][newly]
        self.bad[newly] = delta[newly]
        self.bad_badness[newly] = badness[newly]
        self.crossed |= newly
        self._previous = (delta.detach().clone(), badness)

    def interpolate(self, clean_badness: torch.Tensor) -> torch.Tensor:
        """Boundary points ``[B, ...]`` on the segment ``[good, bad]`` of each crossed sample, where the badness,
        taken as linear along the segment, meets the threshold (the first column to meet it counts).

        Args:
            clean_badness: ``[B, K']`` the condition's badness at the clean input, for samples whose good point is
                the clean input.

        Samples that never crossed get their last iterate.
        """
        good_b = torch.where(torch.isnan(self.good_badness), clean_badness.to(self.good_badness), self.good_badness)
        threshold = self.condition.thresholds.to(good_b)
        rise = self.bad_badness - good_b
        crossing = self.bad_badness >= threshold
        fraction = torch.where(crossing & (rise > 0), (threshold - good_b) / rise.clamp_min(1e-12),
                               torch.where(crossing, torch.zeros_like(rise), torch.ones_like(rise)))
        fraction = fraction.clamp(0, 1).amin(dim=1).to(self.good.dtype)
        fraction = fraction.view(-1, *([1] * (self.good.dim() - 1)))
        points = self.good + fraction * (self.bad - self.good)
        crossed = self.crossed.view(-1, *([1] * (self.good.dim() - 1)))
        return torch.where(crossed, points, self._previous[0])


@torch.no_grad()
def bisect_boundary(
    model: nn.Module,
    condition,
    loss_fn,
    x: torch.Tensor,
    y: torch.Tensor,
    good: torch.Tensor,
    bad: torch.Tensor,
    steps: int = 10,
) -> torch.Tensor:
    """Bisect the segment ``[good, bad]`` of each sample's perturbation for the condition's crossing.

    ``good`` passes the condition and ``bad`` does not; after ``steps`` halvings the returned perturbation is the
    last point known to pass. Uses ``steps`` forward passes, no gradient, and leaves the normalisation
    statistics untouched.
    """
    with frozen_norm_statistics(model):
        for _ in range(steps):
            mid = (good + bad) / 2
            pred = model(x + mid)
            ok = condition(pred, y, loss_fn(pred, y))
            mask = ok.view(-1, *([1] * (x.dim() - 1)))
            good = torch.where(mask, mid, good)
            bad = torch.where(mask, bad, mid)
    return good
