"""Labelled and unlabelled training cases for semi-supervised training (``labelled_fraction``).

The split is made at the level of cases (a hippocampus volume, a radiograph), never of slices, so that no slice of an
unlabelled case is ever seen with its label. It is deterministic: the sorted case ids are shuffled with
``numpy.random.default_rng(seed)`` and the first ``round(fraction · n)`` (at least one) are labelled. 208
hippocampus training cases at 0.2 give 42 labelled and 166 unlabelled; 150 ISBI training images give 30 and 120.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["POOLS", "check_labelled_fraction", "split_labelled", "select_pool"]

#: which part of the training cases a data set holds: the labelled cases, or the unlabelled rest
POOLS = ("labelled", "unlabelled")


def check_labelled_fraction(fraction: float | None) -> float:
    """``fraction`` as a float in (0, 1] (``None`` means 1: every case labelled).

    Raises:
        ValueError: naming ``labelled_fraction`` when it lies outside (0, 1].
    """
    value = 1.0 if fraction is None else fraction
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"labelled_fraction must be a number in (0, 1], got {fraction!r}") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(f"labelled_fraction must lie in (0, 1], got {fraction!r}")
    return value


def split_labelled(cases: Sequence[str], fraction: float | None, seed: int = 0) -> dict[str, list[str]]:
    """``{"labelled": [...], "unlabelled": [...]}``: a seeded, case-level split of ``cases`` (each list sorted)."""
    fraction = check_labelled_fraction(fraction)
    names = sorted(str(c) for c in cases)
    if len(set(names)) != len(names):
        raise ValueError("case ids must be unique to split them into labelled and unlabelled cases")
    if not names:
        raise ValueError("no case to split into labelled and unlabelled cases")
    n_labelled = max(1, int(round(fraction * len(names))))
    order = np.random.default_rng(seed).permutation(len(names))
    labelled = {names[i] for i in order[:n_labelled]}
    return {"labelled": [c for c in names if c in labelled], "unlabelled": [c for c in names if c not in labelled]}


def select_pool(cases: Sequence[str], pool: str, fraction: float | None, seed: int = 0) -> list[str]:
    """The cases of ``pool`` (``"labelled"`` or ``"unlabelled"``), in the order of ``cases``.

    Raises:
        ValueError: for an unknown pool, or an empty unlabelled pool (naming ``labelled_fraction``).
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "labelled" and check_labelled_fraction(fraction) == 1.0:
        return list(cases)
    chosen = set(split_labelled(cases, fraction, seed)[pool])
    if not chosen:
        raise ValueError(
            f"labelled_fraction={fraction!r} leaves no unlabelled case among the {len(cases)} training cases: "
            "semi-supervised training needs a labelled_fraction below 1 (e.g. 0.2)"
        )
    return [c for c in cases if str(c) in chosen]
