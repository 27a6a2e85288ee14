"""Sanity checks of a robust evaluation: the checks that catch broken attacks and gradient masking (see the
package docstring for the list).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from amat_monai.evaluation.grid import GRADIENT_ATTACKS
from amat_monai.metrics import TaskMetric

__all__ = ["sanity_checks", "damage", "finite_or_none"]


def finite_or_none(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def damage(metric: TaskMetric, value: float, clean: float) -> float:
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
        d_noise, d_attack = damage(metric, v_noise, clean), damage(metric, worst, clean)
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


