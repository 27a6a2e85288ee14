"""Robust evaluation: a task metric on clean inputs and under a grid of white-box attacks × noise levels.

:class:`RobustEvaluator` is a MONAI :class:`~monai.engines.Evaluator` whose iteration runs the whole attack
grid on one batch. Every attack maximises the task's training loss (the per-sample ``[B, K]`` loss terms)
against the true label with the network in eval mode, and the attacked input goes through the same inference
path that is scored. With restarts, the worst restart is kept for each sample separately, judged by the
metric's primary value (ties, and samples where the primary value is undefined, by the loss).

Defaults follow the papers' protocol (method doc §6): L2 noise over the whole input, PGD-100 with random start
and step ``4ε/100`` (segmentation) or ``5ε/100`` (landmarks); IFGSM-10 from ``x``, step ``4ε/10``
(segmentation) or ``ε/5`` (landmarks); FGSM one step of length ``ε``; random noise of norm exactly ``ε``.

Sanity checks (``robustness.json["sanity"]``, and Python warnings when one fails), all in the primary metric's
units with the metric's ``tolerance`` as slack:

* ``zero_eps_equals_clean``: every attack at ε = 0 scores the clean value (slack ``tolerance / 10``);
* ``monotone_in_eps``: no attack's value improves as ε grows (clean counts as ε = 0);
* ``attack_strength_order``: at each ε, PGD at least as strong as IFGSM, IFGSM at least as strong as FGSM;
* ``noise_weaker_than_attack``: random noise of the same norm does at most ``noise_ratio`` (0.5) of the
  strongest gradient attack's damage (plus the slack);
* ``large_eps_breaks_model``: PGD at ``large_eps_factor`` (10) × the largest ε takes the value below
  ``break_fraction · clean`` (above ``clean / break_fraction`` for errors);
* ``zero_gradient``: no sample has an exactly zero input gradient of the loss at the clean input;
* ``within_budget``: every perturbation's norm is at most its ε.

Together they catch broken attacks and gradient masking. The cells they need but the grid lacks (ε = 0,
FGSM, noise, the large ε) are run as extra cells, with at most ``sanity_steps`` (20) steps each.

Python use::

    report = robust_evaluate(net, SegmentationLoss(), test_loader, SegmentationMetric(),
                             attacks=("pgd", "ifgsm"), eps=(2, 6, 10), output_dir="eval/std")
    report["results"]  # [{"attack", "norm", "eps", "steps", "step_size", "restarts", "value", ...}]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.engines import Evaluator
from monai.utils import CommonKeys
from torch import nn
from tqdm.auto import tqdm

from amat_monai.attacks import ATTACKS, per_sample_norm, per_sample_terms
from amat_monai.calibration import atomic_write_text, file_sha256
from amat_monai.metrics import SegmentationMetric, TaskMetric

__all__ = [
    "TASKS",
    "DEFAULT_STEPS",
    "STEP_SIZE_FACTORS",
    "AttackSpec",
    "make_attacks",
    "RobustEvaluator",
    "robust_evaluate",
    "sanity_checks",
    "write_outputs",
    "load_checkpoint",
    "RobustEvaluation",
    "evaluate_command",
]

logger = logging.getLogger(__name__)

TASKS = ("segmentation", "landmarks")
#: Gradient steps per attack by default (method doc §6); noise takes none, FGSM one.
DEFAULT_STEPS = {"pgd": 100, "ifgsm": 10, "fgsm": 1, "noise": 0}
#: Step size as a multiple of ε / steps, per task (PGD-100: 4ε/100 or 5ε/100; IFGSM-10: 4ε/10 or ε/5).
STEP_SIZE_FACTORS = {
    "segmentation": {"pgd": 4.0, "ifgsm": 4.0, "fgsm": 1.0},
    "landmarks": {"pgd": 5.0, "ifgsm": 2.0, "fgsm": 1.0},
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
        task: ``"segmentation"`` or ``"landmarks"`` (chooses the step-size factors).
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
class _Cell:
    spec: AttackSpec
    eps: float
    role: str  # "grid" (requested) or "sanity" (extra cell for a check)

    @property
    def key(self) -> tuple:
        return (self.spec.name, self.spec.norm, self.eps, self.spec.effective_steps, self.role)


class _InferencePath(nn.Module):
    """``inferer(x, network)`` as a module, so attacks differentiate through the path that is scored."""

    def __init__(self, network: nn.Module, inferer: Callable | None) -> None:
        super().__init__()
        self.network = network
        self.inferer = inferer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x) if self.inferer is None else self.inferer(x, self.network)
        return out.as_tensor() if hasattr(out, "as_tensor") else out


def _plain(t: Any) -> Any:
    return t.as_tensor() if hasattr(t, "as_tensor") else t


def _per_sample_list(batch: Mapping[str, Any], key: str, n: int) -> list[Any]:
    value = batch.get(key)
    if value is None:
        return [None] * n
    if isinstance(value, torch.Tensor):
        value = value.reshape(-1).tolist() if value.numel() == n else [None] * n
    value = list(value)
    return [v if not isinstance(v, torch.Tensor) else v.item() for v in value] if len(value) == n else [None] * n


class RobustEvaluator(Evaluator):
    """A MONAI evaluator whose iteration scores one batch clean and under every cell of an attack grid.

    Args:
        device: evaluation device.
        val_data_loader: the test loader (dict batches with image and label; ``sample_id`` when available).
        network: the trained network (put in eval mode).
        loss_fn: per-sample ``[B]`` / ``[B, K]`` task loss that the attacks maximise.
        metric: the :class:`~amat_monai.metrics.TaskMetric`.
        cells: the grid (built by :func:`robust_evaluate`).
        inferer: optional ``inferer(x, network)``; attacks and scoring both use it.
        seed: seed of the random attacks (batch ``i`` uses ``seed + i``).
        image_key, label_key, id_key: batch keys.
        progress: show a tqdm bar over batches × cells.
        kwargs: other :class:`~monai.engines.Evaluator` arguments (``prepare_batch``, ``val_handlers``...).

    After :meth:`run`, ``self.records`` holds per-batch outputs, aggregated by :func:`robust_evaluate`.
    """

    def __init__(
        self,
        device: torch.device | str,
        val_data_loader: Iterable,
        network: nn.Module,
        loss_fn: Callable,
        metric: TaskMetric,
        cells: Sequence[_Cell],
        inferer: Callable | None = None,
        seed: int = 0,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        id_key: str = "sample_id",
        progress: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(device=device, val_data_loader=val_data_loader, decollate=False, **kwargs)
        self.network = network
        self.model = _InferencePath(network, inferer)
        self.loss_fn = loss_fn
        self.metric = metric
        self.cells = list(cells)
        self.seed = int(seed)
        self.image_key, self.label_key, self.id_key = image_key, label_key, id_key
        self.records: list[dict] = []
        self.seconds: dict[tuple, float] = {}
        self.progress = progress
        self._bar: tqdm | None = None
        self.add_event_handler(Events.STARTED, self._on_started)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._on_iteration_completed)
        self.add_event_handler(Events.COMPLETED, self._close_bar)
        self.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)

    def _on_started(self, engine: Engine) -> None:
        self.records, self.seconds = [], {}
        total = engine.state.epoch_length * (1 + len(self.cells)) if engine.state.epoch_length else None
        self._bar = tqdm(total=total, desc="robust evaluation", unit="cell", disable=not self.progress, leave=False)

    def _on_iteration_completed(self, engine: Engine) -> None:
        self.records.append(engine.state.output)

    def _close_bar(self, engine: Engine | None = None) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _on_exception(self, engine: Engine, e: BaseException) -> None:
        self._close_bar()
        raise e

    def _score(self, x: torch.Tensor, y: torch.Tensor, batch: Mapping[str, Any]) -> tuple[dict, torch.Tensor]:
        with torch.no_grad():
            pred = self.model(x)
            losses = per_sample_terms(self.loss_fn(pred, y), x.shape[0]).sum(dim=1)
            values = self.metric.per_sample(pred, batch)
        if self.metric.name not in values:
            raise KeyError(f"{type(self.metric).__name__}.per_sample returned no {self.metric.name!r} column")
        values = {k: torch.as_tensor(v).detach().double().cpu().reshape(-1) for k, v in values.items()}
        return values, losses.detach().double().cpu()

    def _input_gradient_norm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            losses = per_sample_terms(self.loss_fn(self.model(x), y), x.shape[0])
            (grad,) = torch.autograd.grad(losses.sum(), x, allow_unused=True)
        if grad is None:  # the loss does not depend on the input at all
            return torch.zeros(x.shape[0], dtype=torch.float64)
        return per_sample_norm(grad.detach(), "l2").double().cpu()

    def _worse(
        self, v_new: torch.Tensor, l_new: torch.Tensor, v_old: torch.Tensor, l_old: torch.Tensor
    ) -> torch.Tensor:
        """Per sample: is the new restart worse? By the primary value when both are defined, else by the loss."""
        both = torch.isfinite(v_new) & torch.isfinite(v_old)
        by_metric = self.metric.is_worse(v_new, v_old) | ((v_new == v_old) & (l_new > l_old))
        return torch.where(both, by_metric, l_new > l_old)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if not isinstance(batchdata, Mapping):
            raise TypeError(f"robust evaluation needs dictionary batches, got {type(batchdata).__name__}")
        prepared = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if not isinstance(prepared, (tuple, list)) or len(prepared) < 2 or prepared[1] is None:
            raise KeyError(f"batch has no label under {self.label_key!r}; keys: {sorted(batchdata)}")
        x, y = _plain(prepared[0]).float(), _plain(prepared[1])
        n = x.shape[0]
        batch = dict(batchdata)
        batch[self.image_key], batch[self.label_key] = x, y
        ids = [str(i) for i in _per_sample_list(batchdata, self.id_key, n)]
        if all(i == "None" for i in ids):
            ids = [f"{engine.state.iteration - 1}:{i}" for i in range(n)]
        meta = {k: _per_sample_list(batchdata, k, n) for k in self.metric.meta_keys}

        self.network.eval()
        clean_values, clean_loss = self._score(x, y, batch)
        out = {
            "ids": ids,
            "meta": meta,
            "clean": {"values": clean_values, "loss": clean_loss, "grad_norm": self._input_gradient_norm(x, y)},
            "cells": {},
        }
        if self._bar is not None:
            self._bar.update(1)
        generator_device = x.device if x.device.type != "mps" else "cpu"
        for cell in self.cells:
            start = time.perf_counter()
            best: dict | None = None
            for restart in range(cell.spec.effective_restarts):
                gen = torch.Generator(device=generator_device)
                gen.manual_seed(self.seed + 1_000_003 * (engine.state.iteration - 1) + 7919 * restart)
                x_adv = cell.spec.run(self.model, self.loss_fn, x, y, cell.eps, gen)
                if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                    raise RuntimeError(f"attack {cell.spec.name} returned {getattr(x_adv, 'shape', type(x_adv))}, "
                                       f"expected a tensor of shape {tuple(x.shape)}")
                values, loss = self._score(x_adv, y, batch)
                delta_norm = per_sample_norm((x_adv - x).detach(), cell.spec.norm).double().cpu()
                current = {"values": values, "loss": loss, "delta_norm": delta_norm,
                           "restart": torch.full((n,), restart, dtype=torch.long)}
                if best is None:
                    best = current
                    continue
                worse = self._worse(values[self.metric.name], loss, best["values"][self.metric.name], best["loss"])
                best = {
                    "values": {k: torch.where(worse, v, best["values"][k]) for k, v in values.items()},
                    **{k: torch.where(worse, current[k], best[k]) for k in ("loss", "delta_norm", "restart")},
                }
            out["cells"][cell.key] = best
            self.seconds[cell.key] = self.seconds.get(cell.key, 0.0) + time.perf_counter() - start
            if self._bar is not None:
                self._bar.update(1)
        return out


# --------------------------------------------------------------------------------------------------------
# Aggregation and sanity checks
# --------------------------------------------------------------------------------------------------------
def _concat(records: list[dict], getter: Callable[[dict], torch.Tensor]) -> np.ndarray:
    return torch.cat([getter(r) for r in records]).numpy() if records else np.zeros(0)


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def _damage(metric: TaskMetric, value: float, clean: float) -> float:
    return clean - value if metric.higher_is_better else value - clean


def sanity_checks(
    metric: TaskMetric,
    clean: float,
    rows: Sequence[Mapping[str, Any]],
    zero_gradient_samples: int,
    large_eps: Mapping[str, Any] | None,
    noise_ratio: float = 0.5,
    max_overshoot: float = 0.0,
) -> dict[str, Any]:
    """Evaluate the sanity checks on aggregated rows (``attack, norm, eps, value``), see the module docstring.

    Returns ``{"passed", "warnings", "tolerance", "checks": {name: {"passed": True/False/None, ...}}}``;
    ``passed: None`` means the grid had nothing to check.
    """
    tol = float(metric.tolerance)
    checks: dict[str, dict[str, Any]] = {}
    values = {(r["attack"], r["norm"], float(r["eps"])): r["value"] for r in rows}
    attacks = sorted({(r["attack"], r["norm"]) for r in rows})

    def _better(a: float, b: float, slack: float) -> bool:
        """Is ``a`` better than ``b`` by more than ``slack``?"""
        return (a - b > slack) if metric.higher_is_better else (b - a > slack)

    # ε = 0 equals clean
    zero = {f"{a}/{nm}": values[(a, nm, 0.0)] for a, nm in attacks if (a, nm, 0.0) in values}
    bad = {k: v for k, v in zero.items() if not (math.isfinite(v) and abs(v - clean) <= tol / 10)}
    checks["zero_eps_equals_clean"] = {"passed": (not bad) if zero else None, "values": zero, "failures": bad,
                                       "slack": tol / 10}

    # monotone in ε (clean is ε = 0)
    failures = []
    for a, nm in attacks:
        series = sorted(((e, v) for (aa, nn_, e), v in values.items() if (aa, nn_) == (a, nm)))
        if not series or series[0][0] > 0:
            series = [(0.0, clean)] + series
        for (e0, v0), (e1, v1) in zip(series, series[1:]):
            if _better(v1, v0, tol):
                failures.append({"attack": a, "norm": nm, "eps": [e0, e1], "values": [v0, v1]})
    checks["monotone_in_eps"] = {"passed": not failures, "failures": failures}

    # strength order
    failures, compared = [], 0
    for strong, weak in (("pgd", "ifgsm"), ("ifgsm", "fgsm")):
        for (a, nm, e), v_strong in values.items():
            if a != strong or e == 0 or (weak, nm, e) not in values:
                continue
            compared += 1
            v_weak = values[(weak, nm, e)]
            if _better(v_strong, v_weak, tol):
                failures.append({"stronger": strong, "weaker": weak, "norm": nm, "eps": e,
                                 "values": [v_strong, v_weak]})
    checks["attack_strength_order"] = {"passed": (not failures) if compared else None, "failures": failures}

    # noise much weaker than the strongest gradient attack
    failures, compared = [], 0
    for (a, nm, e), v_noise in values.items():
        if a != "noise" or e == 0:
            continue
        grads = [values[(g, nm, e)] for g in GRADIENT_ATTACKS if (g, nm, e) in values]
        if not grads:
            continue
        compared += 1
        worst = min(grads) if metric.higher_is_better else max(grads)
        d_noise, d_attack = _damage(metric, v_noise, clean), _damage(metric, worst, clean)
        if d_noise > noise_ratio * d_attack + tol:
            failures.append({"norm": nm, "eps": e, "noise_damage": d_noise, "attack_damage": d_attack})
    checks["noise_weaker_than_attack"] = {"passed": (not failures) if compared else None, "failures": failures,
                                          "noise_ratio": noise_ratio}

    # a very large ε breaks the model
    if large_eps is not None:
        v = large_eps["value"]
        if metric.higher_is_better:
            threshold = max(metric.break_fraction * clean, tol)  # "near 0", also when clean is near 0
            ok = math.isfinite(v) and v <= threshold
        else:
            threshold = clean / metric.break_fraction if clean > 0 else tol
            ok = math.isfinite(v) and v >= threshold
        checks["large_eps_breaks_model"] = {"passed": ok, **dict(large_eps), "threshold": threshold}
    else:
        checks["large_eps_breaks_model"] = {"passed": None}

    checks["zero_gradient"] = {"passed": zero_gradient_samples == 0, "samples": int(zero_gradient_samples)}
    checks["within_budget"] = {"passed": max_overshoot <= 1e-4, "max_overshoot": max_overshoot}

    messages = {
        "zero_eps_equals_clean": "an attack at eps=0 changed the metric: the attack or the inference is broken "
        "(non-deterministic model?)",
        "monotone_in_eps": "the metric improved as eps grew: the attack is too weak or broken",
        "attack_strength_order": "a stronger attack (PGD > IFGSM > FGSM) was weaker: check steps and step sizes",
        "noise_weaker_than_attack": "random noise hurt about as much as the gradient attack: gradient masking "
        "or a broken attack",
        "large_eps_breaks_model": "a very large eps did not break the model: gradient masking or a broken attack",
        "zero_gradient": "some samples have a zero input gradient: gradient masking or a detached input",
        "within_budget": "a perturbation exceeded its eps budget: the attack's projection is broken",
    }
    warns = [f"{name}: {messages[name]} ({_brief(c)})" for name, c in checks.items() if c["passed"] is False]
    return {
        "passed": all(c["passed"] is not False for c in checks.values()),
        "warnings": warns,
        "tolerance": tol,
        "checks": checks,
    }


def _brief(check: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in check.items() if k != "passed"}, default=str)[:300]


# --------------------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------------------
def _build_cells(
    specs: Sequence[AttackSpec], eps: Sequence[float], sanity: bool, sanity_steps: int, large_eps_factor: float
) -> tuple[list[_Cell], _Cell | None]:
    cells = [_Cell(s, float(e), "grid") for s in specs for e in eps]
    large = None
    if not sanity:
        return cells, large
    positive = sorted({float(e) for e in eps if e > 0})

    def _short(spec: AttackSpec) -> AttackSpec:
        return replace(spec, steps=min(spec.steps, sanity_steps)) if spec.name in ("pgd", "ifgsm") else spec

    have = {(s.name, s.norm) for s in specs}
    for s in specs:
        if 0.0 not in {float(e) for e in eps} and s.name != "noise":
            cells.append(_Cell(_short(s), 0.0, "sanity"))
    norms = sorted({s.norm for s in specs})
    template = specs[0]
    for nm in norms:
        for name in ("fgsm", "noise"):
            if (name, nm) not in have:
                extra = AttackSpec(name=name, norm=nm, clamp=template.clamp, restarts=1)
                cells += [_Cell(extra, e, "sanity") for e in positive]
    if positive:
        base = next((s for s in specs if s.name == "pgd" and s.fn is None), None)
        base = base or AttackSpec(name="pgd", steps=sanity_steps, step_size_factor=4.0, norm=template.norm,
                                  clamp=template.clamp)
        large = _Cell(replace(_short(base), restarts=1), large_eps_factor * positive[-1], "sanity")
        cells.append(large)
    return cells, large


def robust_evaluate(
    network: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dataloader: Iterable,
    metric: TaskMetric | None = None,
    attacks: Sequence[str] | Sequence[AttackSpec] = ("pgd", "ifgsm"),
    eps: Sequence[float] = (2.0, 6.0, 10.0),
    *,
    task: str = "segmentation",
    steps: Sequence[int] | int | None = None,
    norm: str = "l2",
    restarts: int = 1,
    clamp: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    inferer: Callable | None = None,
    output_dir: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    name: str | None = None,
    seed: int = 0,
    sanity: bool = True,
    sanity_steps: int = 20,
    large_eps_factor: float = 10.0,
    noise_ratio: float = 0.5,
    progress: bool = True,
    **evaluator_kwargs: Any,
) -> dict[str, Any]:
    """Score ``network`` on clean and attacked inputs over a grid of attacks × noise levels.

    Args:
        network: the trained network (evaluated and attacked in eval mode).
        loss_fn: the task's per-sample training loss terms (``[B]`` or ``[B, K]``), e.g. the bundle's
            ``loss_terms``; attacks maximise their sum against the true label.
        dataloader: the test loader; dict batches with ``"image"``, ``"label"``, ideally ``"sample_id"`` and the
            metric's ``meta_keys`` (``"case"``, ``"slice"`` for 2D segmentation).
        metric: the task metric (default :class:`~amat_monai.metrics.SegmentationMetric`).
        attacks: attack names (``pgd``, ``ifgsm``, ``fgsm``, ``noise``) or :class:`AttackSpec` objects.
        eps: noise levels in input units; ``0`` may be included (it must score the clean value).
        task: ``"segmentation"`` or ``"landmarks"``: the papers' step sizes for that task.
        steps, norm, restarts, clamp: see :func:`make_attacks` (ignored for :class:`AttackSpec` entries).
        device: default: the network's device.
        inferer: optional ``inferer(x, network)`` (e.g. a MONAI inferer); attacks and scoring both use it.
        output_dir: when given, write ``robustness.json/.csv/.md/.png`` there (atomically).
        checkpoint: the weights' path, recorded in the report (with its SHA-256).
        name: the model's name in the markdown row (default: the checkpoint's or output folder's name).
        seed: seed of the random attacks.
        sanity: run the sanity checks (and the extra cells they need).
        sanity_steps: at most this many steps in the extra cells of the sanity checks.
        large_eps_factor: the large-ε check attacks at this multiple of the largest ε.
        noise_ratio: noise may do at most this fraction of the gradient attack's damage.
        progress: show a progress bar.
        evaluator_kwargs: passed to :class:`RobustEvaluator` (e.g. ``prepare_batch``, ``val_handlers``).

    Returns:
        The report, as written to ``robustness.json`` (plus ``"rows"``, the per-sample records, which are only
        written to the CSV).
    """
    metric = metric or SegmentationMetric()
    if not isinstance(metric, TaskMetric):
        raise TypeError(f"metric must be an amat_monai.metrics.TaskMetric, got {type(metric).__name__}")
    eps = [float(e) for e in eps]
    if not eps or any(not math.isfinite(e) or e < 0 for e in eps):
        raise ValueError(f"eps must be a non-empty list of finite non-negative numbers, got {eps}")
    if len(set(eps)) != len(eps):
        raise ValueError(f"eps values repeat: {eps}")
    if all(isinstance(a, AttackSpec) for a in attacks):
        specs = list(attacks)  # type: ignore[arg-type]
    else:
        specs = make_attacks([str(a) for a in attacks], task=task, steps=steps, norm=norm, restarts=restarts,
                             clamp=clamp)
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    cells, large_cell = _build_cells(specs, eps, sanity, sanity_steps, large_eps_factor)

    evaluator = RobustEvaluator(device, dataloader, network, loss_fn, metric, cells, inferer=inferer, seed=seed,
                                progress=progress, **evaluator_kwargs)
    was_training = network.training
    start = time.perf_counter()
    try:
        evaluator.run()
    finally:
        network.train(was_training)
    seconds = time.perf_counter() - start
    records = evaluator.records
    if not records:
        raise ValueError("the test data loader yielded no batches")

    ids = [i for r in records for i in r["ids"]]
    meta = {"sample_id": ids, **{k: [v for r in records for v in r["meta"][k]] for k in metric.meta_keys}}
    n = len(ids)

    def _columns(getter: Callable[[dict], dict]) -> dict[str, np.ndarray]:
        keys = getter(records[0])["values"].keys()
        return {k: _concat(records, lambda r, k=k: getter(r)["values"][k]) for k in keys}

    clean_cols = _columns(lambda r: r["clean"])
    clean_summary = metric.aggregate(clean_cols, meta)
    clean = float(clean_summary[metric.name])
    grad_norm = _concat(records, lambda r: r["clean"]["grad_norm"])
    zero_grad = int((grad_norm == 0).sum())

    csv_rows: list[dict[str, Any]] = []

    def _add_csv(attack: str, nm: str, e: float, steps_: int, step_size: float | None, restarts_: int, role: str,
                 cols: dict[str, np.ndarray], loss: np.ndarray, extra: dict[str, np.ndarray]) -> None:
        for i in range(n):
            row = {"sample_id": ids[i], **{k: meta[k][i] for k in metric.meta_keys}, "attack": attack, "norm": nm,
                   "eps": e, "steps": steps_, "step_size": step_size, "restarts": restarts_, "role": role,
                   "loss": float(loss[i])}
            row.update({k: float(v[i]) for k, v in extra.items()})
            row.update({k: float(v[i]) for k, v in cols.items() if not k.startswith("_")})
            csv_rows.append(row)

    _add_csv("clean", "", 0.0, 0, None, 1, "clean", clean_cols, _concat(records, lambda r: r["clean"]["loss"]),
             {"grad_norm": grad_norm})

    results, extras, overshoot = [], [], 0.0
    large_eps_result = None
    for cell in cells:
        cols = _columns(lambda r, c=cell: r["cells"][c.key])
        summary = metric.aggregate(cols, meta)
        delta = _concat(records, lambda r, c=cell: r["cells"][c.key]["delta_norm"])
        overshoot = max(overshoot, float(np.max(delta - cell.eps, initial=0.0)) / max(cell.eps, 1e-12)
                        if cell.eps > 0 else float(np.max(delta, initial=0.0)))
        spec = cell.spec
        row = {
            "attack": spec.name,
            "label": spec.label,
            "norm": spec.norm,
            "eps": cell.eps,
            "steps": spec.effective_steps,
            "step_size": spec.step_size(cell.eps),
            "restarts": spec.effective_restarts,
            "random_start": bool(spec.random_start and spec.name == "pgd"),
            "value": float(summary[metric.name]),
            "metrics": {k: _finite(v) for k, v in summary.items()},
            "seconds": round(evaluator.seconds.get(cell.key, 0.0), 4),
        }
        (results if cell.role == "grid" else extras).append(row)
        if cell is large_cell:
            large_eps_result = {"attack": spec.name, "eps": cell.eps, "steps": spec.effective_steps,
                                "value": row["value"]}
        _add_csv(spec.name, spec.norm, cell.eps, row["steps"], row["step_size"], row["restarts"], cell.role, cols,
                 _concat(records, lambda r, c=cell: r["cells"][c.key]["loss"]),
                 {"delta_norm": delta, "restart": _concat(records, lambda r, c=cell: r["cells"][c.key]["restart"])})

    averages = {}
    for spec in specs:
        vals = [r["value"] for r in results if r["attack"] == spec.name and r["norm"] == spec.norm and r["eps"] > 0]
        finite = [v for v in vals if math.isfinite(v)]
        averages[spec.name if spec.norm == "l2" else f"{spec.name}-linf"] = float(np.mean(finite)) if finite else None

    report: dict[str, Any] = {
        "task": task,
        "metric": metric.name,
        "higher_is_better": bool(metric.higher_is_better),
        "digits": int(getattr(metric, "digits", 4 if metric.higher_is_better else 2)),
        "name": name or _default_name(checkpoint, output_dir),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "n_samples": n,
        "clean": clean,
        "clean_metrics": {k: _finite(v) for k, v in clean_summary.items()},
        "results": results,
        "averages": averages,
        "throughput": {
            "seconds": round(seconds, 3),
            "samples_per_second": round(n / seconds, 4) if seconds > 0 else None,
            "attacked_samples_per_second": round(n * len(cells) / seconds, 4) if seconds > 0 else None,
        },
        "device": str(device),
        "seed": seed,
    }
    if sanity:
        # the large-ε cell joins the others: PGD must not improve there either
        rows_for_checks = [{"attack": r["attack"], "norm": r["norm"], "eps": r["eps"], "value": r["value"]}
                           for r in results + extras]
        report["sanity"] = sanity_checks(metric, clean, rows_for_checks, zero_grad, large_eps_result,
                                         noise_ratio=noise_ratio, max_overshoot=overshoot)
        report["sanity"]["extra_results"] = extras
        for message in report["sanity"]["warnings"]:
            logger.warning(f"sanity check failed: {message}")
            warnings.warn(f"robust evaluation sanity check failed: {message}", RuntimeWarning, stacklevel=2)
    else:
        report["sanity"] = {"passed": None, "warnings": [], "checks": {}, "zero_gradient_samples": zero_grad}
    report["sanity"]["zero_gradient_samples"] = zero_grad
    if output_dir is not None:
        write_outputs(output_dir, report, csv_rows)
    report["rows"] = csv_rows
    return report


def _default_name(checkpoint: str | os.PathLike | None, output_dir: str | os.PathLike | None) -> str:
    """A run's name: ``runs/amat/models/model.pt`` -> ``amat``; else the checkpoint's or output folder's name."""
    if checkpoint:
        path = Path(checkpoint)
        return path.parent.parent.name if path.parent.name == "models" and path.parent.parent.name else path.stem
    return Path(output_dir).name if output_dir else "model"


class RobustEvaluation:
    """:func:`robust_evaluate` as a configurable object, for bundle configs (``"evaluator"`` with a ``run()``).

    Takes the arguments of :func:`robust_evaluate`; :meth:`run` returns its report.
    """

    def __init__(self, network: nn.Module, loss_fn: Callable, dataloader: Iterable, metric: TaskMetric | None = None,
                 **kwargs: Any) -> None:
        self.network, self.loss_fn, self.dataloader, self.metric = network, loss_fn, dataloader, metric
        self.kwargs = kwargs
        self.report: dict[str, Any] | None = None

    def run(self) -> dict[str, Any]:
        self.report = robust_evaluate(self.network, self.loss_fn, self.dataloader, self.metric, **self.kwargs)
        return self.report


# --------------------------------------------------------------------------------------------------------
# Output files
# --------------------------------------------------------------------------------------------------------
def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    return obj


def write_outputs(output_dir: str | os.PathLike, report: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``robustness.json``, ``robustness.csv``, ``robustness.md`` and ``robustness.png`` atomically."""
    from amat_monai.reporting import paper_table, plot_runs

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in report.items() if k != "rows"}
    atomic_write_text(out / "robustness.json", json.dumps(_json_safe(public), indent=2) + "\n")
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    atomic_write_text(out / "robustness.csv", buffer.getvalue())
    atomic_write_text(out / "robustness.md", paper_table([public]).markdown)
    plot_runs([public], out / "robustness.png")


# --------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------
def load_checkpoint(network: nn.Module, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
    """Load weights saved by MONAI's ``CheckpointSaver`` (``{"network": state_dict, ...}``) or a plain state dict.

    Raises:
        FileNotFoundError: naming the file when it is missing.
        ValueError: naming the file when it holds no usable state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(state, Mapping):
        for key in ("network", "model", "state_dict", "net"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds no network state dict (keys: {list(state)[:10]})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        network.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the bundle's network_def: {str(e)[:500]}") from None


#: command-line options -> ids of the ``robust`` section of ``robust_evaluate.json``
_CLI_KEYS = {"attacks": "robust#attacks", "eps": "robust#eps", "steps": "robust#steps", "norm": "robust#norm",
             "restarts": "robust#restarts"}


def evaluate_command(args: argparse.Namespace) -> int:
    """``amat-monai evaluate``: robust evaluation of a bundle's checkpoint on its test split.

    Runs the bundle's ``configs/train.json`` with ``configs/robust_evaluate.json`` merged on top as a MONAI
    ``ConfigWorkflow``, with ``dataset_dir``, ``output_dir``, ``max_cases``, ``device`` and ``checkpoint``
    overridden, and the ``robust`` section overridden by ``--attacks``, ``--eps``, ``--steps``, ``--norm``
    and ``--restarts`` when given. When the checkpoint lies in ``<run>/models/`` and ``<run>/split.json``
    exists, that split file is used, so the test split is the one the model was trained against.
    """
    from amat_monai.workflows import build_workflow, parse_overrides, run_workflow

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if not Path(args.dataset_dir).is_dir():
        raise FileNotFoundError(f"--dataset-dir not found: {args.dataset_dir}")
    ovr: dict[str, Any] = {
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "output_dir": str(Path(args.output_dir).resolve()),
        "checkpoint": str(checkpoint.resolve()),
    }
    if args.max_cases is not None:
        ovr["max_cases"] = int(args.max_cases)
    if args.device is not None:
        ovr["device"] = f"$torch.device('{args.device}')"
    split = checkpoint.resolve().parent.parent / "split.json"
    if checkpoint.resolve().parent.name == "models" and split.is_file():
        ovr["split_file"] = str(split)
    for option, key in _CLI_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            ovr[key] = value
    ovr.update(parse_overrides(getattr(args, "override", None)))
    workflow = build_workflow(args.bundle, ["train.json", "robust_evaluate.json"], "infer", **ovr)
    results = run_workflow(workflow)
    report = next((r for r in reversed(results or []) if isinstance(r, dict) and "results" in r), None)
    if report is None:
        raise RuntimeError(f"{args.bundle}/configs/robust_evaluate.json: its run list returned no robustness report")
    out = Path(workflow.parser.get_parsed_content("robust#output_dir"))
    print((out / "robustness.md").read_text(), end="")
    sanity = report["sanity"]
    status = {True: "all checks passed", None: "checks skipped"}.get(
        sanity.get("passed"), "FAILED: " + "; ".join(sanity["warnings"])
    )
    print(f"sanity: {status}")
    print(f"wrote {out / 'robustness.json'} ({report['throughput']['samples_per_second']} samples/s)")
    return 0
