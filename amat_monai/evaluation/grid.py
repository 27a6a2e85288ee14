"""The attack grid: attacks by name with the papers' steps and step sizes, and the cells (attack × ε) to run,
the sanity checks' extra cells included.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from amat_monai.attacks import ATTACKS

__all__ = [
    "TASKS",
    "DEFAULT_STEPS",
    "STEP_SIZE_FACTORS",
    "RANDOM_ATTACKS",
    "GRADIENT_ATTACKS",
    "AttackSpec",
    "make_attacks",
    "Cell",
    "build_cells",
]


TASKS = ("segmentation", "landmarks", "detection")
#: Gradient steps per attack by default (method doc §6); noise takes none, FGSM one.
DEFAULT_STEPS = {"pgd": 100, "ifgsm": 10, "fgsm": 1, "noise": 0}
#: Step size as a multiple of ε / steps, per task (PGD-100: 4ε/100 or 5ε/100; IFGSM-10: 4ε/10 or ε/5). The papers
#: give no detection step sizes; detection takes segmentation's, the authors' default for L2 PGD.
STEP_SIZE_FACTORS = {
    "segmentation": {"pgd": 4.0, "ifgsm": 4.0, "fgsm": 1.0},
    "landmarks": {"pgd": 5.0, "ifgsm": 2.0, "fgsm": 1.0},
    "detection": {"pgd": 4.0, "ifgsm": 4.0, "fgsm": 1.0},
}
RANDOM_ATTACKS = ("pgd", "noise")
GRADIENT_ATTACKS = ("pgd", "ifgsm", "fgsm")


@dataclass(frozen=True)
class AttackSpec:
    """One attack of the grid.

    Attributes:
        name: ``"pgd"``, ``"ifgsm"``, ``"fgsm"`` or ``"noise"`` (a key of :data:`amat_monai.attacks.ATTACKS`).
        steps: gradient steps (ignored by FGSM, which takes one, and noise, which takes none).
        step_size_factor: each step is ``step_size_factor · ε / steps`` (FGSM: one step of length ``ε``).
        norm: ``"l2"`` or ``"linf"``.
        restarts: independent runs, the worst kept per sample; deterministic attacks (IFGSM, FGSM) run once.
        random_start: PGD starts from a random point of the ball.
        clamp: optional ``(low, high)`` bound on the attacked input.
        fn: attack function overriding the registry entry (same signature as :func:`amat_monai.attacks.pgd`).
    """

    name: str
    steps: int = 0
    step_size_factor: float = 1.0
    norm: str = "l2"
    restarts: int = 1
    random_start: bool = True
    clamp: tuple[float, float] | None = None
    fn: Callable[..., Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.fn is None and self.name not in ATTACKS:
            raise ValueError(f"unknown attack {self.name!r}; choose from {sorted(ATTACKS)}")
        if self.norm not in ("l2", "linf"):
            raise ValueError(f"attack {self.name}: norm must be 'l2' or 'linf', got {self.norm!r}")
        if self.restarts < 1:
            raise ValueError(f"attack {self.name}: restarts must be >= 1, got {self.restarts}")
        if self.name in ("pgd", "ifgsm") and self.steps < 1:
            raise ValueError(f"attack {self.name}: steps must be >= 1, got {self.steps}")
        if self.step_size_factor <= 0:
            raise ValueError(f"attack {self.name}: step_size_factor must be positive, got {self.step_size_factor}")

    @property
    def effective_steps(self) -> int:
        return {"fgsm": 1, "noise": 0}.get(self.name, self.steps)

    @property
    def effective_restarts(self) -> int:
        return self.restarts if self.name in RANDOM_ATTACKS or self.fn is not None else 1

    def step_size(self, eps: float) -> float | None:
        """Step length at noise level ``eps`` (``None`` for noise)."""
        if self.name == "noise":
            return None
        if self.name == "fgsm":
            return float(eps)
        return self.step_size_factor * float(eps) / self.effective_steps

    @property
    def label(self) -> str:
        """Display name: ``PGD``, ``IFGSM``, ``FGSM``, ``Noise`` (``-Linf`` appended for L-infinity)."""
        base = "Noise" if self.name == "noise" else self.name.upper()
        return base if self.norm == "l2" else f"{base}-Linf"

    def run(self, model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, eps: float,
            generator: torch.Generator | None) -> torch.Tensor:
        """The attacked input, with the network in eval mode."""
        fn = self.fn or ATTACKS[self.name]
        kwargs: dict[str, Any] = {"norm": self.norm, "clamp": self.clamp, "generator": generator}
        if self.name != "noise":
            kwargs.update(train_mode=False)
        if self.name in ("pgd", "ifgsm"):
            kwargs.update(steps=self.effective_steps, step_size=self.step_size(eps))
        if self.name == "pgd":
            kwargs.update(random_start=self.random_start)
        return fn(model, loss_fn, x, y, float(eps), **kwargs)


def make_attacks(
    names: Sequence[str] = ("pgd", "ifgsm"),
    task: str = "segmentation",
    steps: Sequence[int] | Mapping[str, int] | int | None = None,
    norm: str = "l2",
    restarts: int = 1,
    clamp: Sequence[float] | None = None,
    step_size_factors: Mapping[str, float] | None = None,
) -> list[AttackSpec]:
    """Attack specs with the protocol's defaults for ``task``.

    Args:
        names: attack names, e.g. ``("pgd", "ifgsm")``.
        task: ``"segmentation"``, ``"landmarks"`` or ``"detection"`` (chooses the step-size factors).
        steps: steps per attack in the order of ``names``, one int for all, or ``{name: steps}``;
            default PGD 100, IFGSM 10 (FGSM and noise ignore it).
        norm: ``"l2"`` (the papers) or ``"linf"``.
        restarts: restarts of the random attacks (PGD, noise).
        clamp: optional ``(low, high)`` input bound (e.g. ``(-1, 1)`` for the landmark images).
        step_size_factors: overrides of the factors by attack name.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    names = [str(n).strip().lower() for n in names]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise ValueError(f"unknown or missing attacks {unknown or names}; choose from {sorted(ATTACKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attack names repeat: {names}")
    if steps is None or isinstance(steps, int):
        steps_list = [DEFAULT_STEPS[n] if steps is None else int(steps) for n in names]
    elif isinstance(steps, Mapping):
        steps_list = [int(steps.get(n, DEFAULT_STEPS[n])) for n in names]
    else:
        steps_list = [int(s) for s in steps]
        if len(steps_list) != len(names):
            raise ValueError(f"--steps gives {len(steps_list)} values for {len(names)} attacks {names}")
    factors = {**STEP_SIZE_FACTORS[task], **(step_size_factors or {})}
    return [
        AttackSpec(
            name=n,
            steps=s,
            step_size_factor=float(factors.get(n, 1.0)),
            norm=norm,
            restarts=int(restarts),
            clamp=tuple(clamp) if clamp is not None else None,
        )
        for n, s in zip(names, steps_list)
    ]


@dataclass(frozen=True)
class Cell:
    spec: AttackSpec
    eps: float
    role: str  # "grid" (requested) or "sanity" (extra cell for a check)

    @property
    def key(self) -> tuple:
        return (self.spec.name, self.spec.norm, self.eps, self.spec.effective_steps, self.role)


def build_cells(
    specs: Sequence[AttackSpec], eps: Sequence[float], sanity: bool, sanity_steps: int, large_eps_factor: float
) -> tuple[list[Cell], Cell | None]:
    cells = [Cell(s, float(e), "grid") for s in specs for e in eps]
    large = None
    if not sanity:
        return cells, large
    positive = sorted({float(e) for e in eps if e > 0})

    def _short(spec: AttackSpec) -> AttackSpec:
        return replace(spec, steps=min(spec.steps, sanity_steps)) if spec.name in ("pgd", "ifgsm") else spec

    have = {(s.name, s.norm) for s in specs}
    for s in specs:
        if 0.0 not in {float(e) for e in eps} and s.name != "noise":
            cells.append(Cell(_short(s), 0.0, "sanity"))
    norms = sorted({s.norm for s in specs})
    template = specs[0]
    for nm in norms:
        for name in ("fgsm", "noise"):
            if (name, nm) not in have:
                extra = AttackSpec(name=name, norm=nm, clamp=template.clamp, restarts=1)
                cells += [Cell(extra, e, "sanity") for e in positive]
    if positive:
        base = next((s for s in specs if s.name == "pgd" and s.fn is None), None)
        base = base or AttackSpec(name="pgd", steps=sanity_steps, step_size_factor=4.0, norm=template.norm,
                                  clamp=template.clamp)
        large = Cell(replace(_short(base), restarts=1), large_eps_factor * positive[-1], "sanity")
        cells.append(large)
    return cells, large


