import pytest
import torch
from torch import nn

from amat_monai.conditions import LossTermsCondition
from amat_monai.margins import (
    BoundaryTracker,
    MarginTable,
    bisect_boundary,
    grow,
    shrink_step,
    shrink_to_boundary,
    update_margins,
)

T = torch.tensor
D = torch.float64


def test_growth_shrink_and_cap_rules():
    torch.testing.assert_close(grow(T([0.5, 2.0]), "additive", 0.5), T([1.0, 2.5]))
    torch.testing.assert_close(grow(T([0.5, 2.0]), "additive", 0.5, eps_max=2.2), T([1.0, 2.2]))
    torch.testing.assert_close(grow(T([0.5, 2.0]), "geometric", 0.5, factor=1.5), T([0.75, 3.0]))
    torch.testing.assert_close(grow(T([4.0, 9.0]), "geometric", 0.5, factor=2.0, eps_max=10.0), T([8.0, 10.0]))
    torch.testing.assert_close(shrink_step(T([2.0, 0.7, 0.5]), 0.5), T([1.5, 0.5, 0.5]))
    torch.testing.assert_close(shrink_to_boundary(T([2.0, 2.0, 0.6]), T([1.0, 0.0, 0.2]), 0.5), T([1.5, 1.0, 0.5]))
    with pytest.raises(ValueError, match="growth"):
        grow(T([1.0]), "exponential", 0.5)


def test_update_on_a_hand_computed_batch():
    margins = T([1.0, 2.0, 0.6, 3.0], dtype=D)
    passed = T([True, False, False, False])
    boundary = T([9.9, 1.0, 0.2, 0.0], dtype=D)  # the first sample passed: its boundary is ignored
    halfway = update_margins(margins, passed, 0.5, boundary_norm=boundary)
    torch.testing.assert_close(halfway, T([1.5, 1.5, 0.5, 1.5], dtype=D))
    step = update_margins(margins, passed, 0.5, shrink="step")
    torch.testing.assert_close(step, T([1.5, 1.5, 0.5, 2.5], dtype=D))
    none = update_margins(margins, passed, 0.5, shrink="none", growth="geometric", growth_factor=2.0)
    torch.testing.assert_close(none, T([2.0, 2.0, 0.6, 3.0], dtype=D))
    capped = update_margins(T([1.0, 3.0, 0.6, 3.0], dtype=D), passed, 0.5, shrink="step", eps_max=1.2)
    torch.testing.assert_close(capped, T([1.2, 1.2, 0.5, 1.2], dtype=D))
    floored = update_margins(margins, passed, 0.5, shrink="step", floor=1.8)
    torch.testing.assert_close(floored, T([1.5, 1.8, 1.8, 2.5], dtype=D))
    with pytest.raises(ValueError, match="boundary_norm"):
        update_margins(margins, passed, 0.5)
    with pytest.raises(ValueError, match="shrink"):
        update_margins(margins, passed, 0.5, shrink="halve")


def test_clean_failures_keep_their_margin():
    # sample 1 fails on its clean input: no expansion, no collapse to the floor, whatever the attack did
    margins = T([2.0, 4.0, 4.0], dtype=D)
    passed = T([True, False, False])
    frozen = T([False, True, False])
    out = update_margins(margins, passed, 0.5, boundary_norm=T([0.0, 0.0, 1.0], dtype=D), frozen=frozen)
    torch.testing.assert_close(out, T([2.5, 4.0, 2.5], dtype=D))


def test_table_adds_new_ids_at_init_and_round_trips_its_state():
    table = MarginTable(init=0.5)
    torch.testing.assert_close(table.get(["a", "b"]), T([0.5, 0.5]))
    table.set(["b", "c"], T([2.0, 3.0]), trained_at=T([1.0, 2.0]))
    table.set(["b"], T([2.5]), trained_at=T([2.0]))
    assert table.as_dict() == {"a": 0.5, "b": 2.5, "c": 3.0}
    s = table.summary()
    assert s["count"] == 3 and s["mean"] == pytest.approx(2.0) and (s["min"], s["median"], s["max"]) == (0.5, 2.5, 3.0)
    radius = table.mean_training_radius()
    assert torch.isnan(radius[0]) and radius[1:].tolist() == [1.5, 2.0]  # b: (1 + 2) / 2 visits
    copy = MarginTable(init=9.0)
    copy.load_state_dict(table.state_dict())
    assert copy.as_dict() == table.as_dict() and copy.init == 0.5
    torch.testing.assert_close(copy.mean_training_radius(), radius, equal_nan=True)
    with pytest.raises(ValueError, match="ids"):
        copy.load_state_dict({"ids": ["a"], "margins": T([1.0, 2.0])})
    with pytest.raises(ValueError, match="margins for"):
        table.set(["a"], T([1.0, 2.0]))


def _feed(tracker, deltas, losses):
    for t, (d, l) in enumerate(zip(deltas, losses)):
        tracker(t, d, l, None)


def test_tracker_keeps_the_last_good_and_first_bad_iterates():
    tracker = BoundaryTracker(LossTermsCondition(T([1.0])), y=None)
    deltas = [torch.full((2, 1, 1, 1), float(v)) for v in (1, 2, 3)]
    # sample 1 fails at once (its good point is the clean input), sample 0 crosses between iterates 1 and 2
    _feed(tracker, deltas, [T([[0.5], [2.0]]), T([[0.9], [2.0]]), T([[1.5], [0.1]])])
    assert tracker.crossed.tolist() == [True, True]
    assert tracker.good.flatten().tolist() == [2.0, 0.0]
    assert tracker.bad.flatten().tolist() == [3.0, 1.0]
    # linear interpolation of the badness: sample 0 meets ξ = 1 at 0.9 + f·0.6 = 1, f = 1/6, point 2 + 1/6;
    # sample 1 starts from its clean badness 0.0 and reaches 2.0 at 1: f = 1/2, point 0.5
    points = tracker.interpolate(clean_badness=T([[0.2], [0.0]], dtype=D)).flatten()
    torch.testing.assert_close(points, T([2.0 + 1 / 6, 0.5]))


def test_interpolation_uses_the_first_term_to_cross():
    tracker = BoundaryTracker(LossTermsCondition(T([1.0, 1.0])), y=None)
    deltas = [torch.full((1, 1, 1, 1), float(v)) for v in (1, 2)]
    # from iterate 0 to 1, term 0 goes 0.5 -> 1.5 (meets 1 at f = 1/2), term 1 goes 0 -> 4 (meets 1 at f = 1/4)
    _feed(tracker, deltas, [T([[0.5, 0.0]]), T([[1.5, 4.0]])])
    torch.testing.assert_close(tracker.interpolate(T([[0.0, 0.0]], dtype=D)).flatten(), T([1.25]))


def test_interpolated_boundary_matches_bisection_on_a_smooth_loss():
    # identity model, loss = ||delta||^2 + 0.1 ||delta|| (smooth, increasing along the ray), threshold 1.2:
    # the exact boundary is the root of r^2 + 0.1 r = 1.2, r = 1.0477
    loss = lambda p, y: p.flatten(1).norm(dim=1) ** 2 + 0.1 * p.flatten(1).norm(dim=1)  # noqa: E731
    condition = LossTermsCondition(T([1.2]))
    direction = torch.ones(1, 1, 4, 4) / 4.0
    radii = torch.linspace(0.1, 2.0, 20)  # a dense attack path along the ray
    tracker = BoundaryTracker(condition, y=None)
    for t, r in enumerate(radii):
        d = direction * r
        tracker(t, d, loss(d, None)[:, None], d)
    interpolated = tracker.interpolate(T([[0.0]], dtype=D)).flatten(1).norm(dim=1)
    x = torch.zeros(1, 1, 4, 4)
    bisected = bisect_boundary(nn.Identity(), condition, loss, x, None, tracker.good, tracker.bad, steps=20)
    exact = (-0.1 + (0.01 + 4 * 1.2) ** 0.5) / 2
    torch.testing.assert_close(bisected.flatten(1).norm(dim=1), T([exact]), atol=1e-4, rtol=0)
    torch.testing.assert_close(interpolated, T([exact]), atol=0.01, rtol=0)


def test_bisection_finds_the_boundary():
    # With an identity model and loss = ||delta||, the condition loss < xi holds exactly inside the ball of radius xi.
    x = torch.zeros(2, 1, 4, 4)
    direction = torch.ones(1, 4, 4) / 4.0  # unit L2 norm
    bad = torch.stack([direction * 1.0, direction * 3.0])
    condition = LossTermsCondition(T([0.7]))
    good = bisect_boundary(nn.Identity(), condition, lambda p, y: p.flatten(1).norm(dim=1), x, x,
                           torch.zeros_like(x), bad)
    norms = good.flatten(1).norm(dim=1)
    assert (norms < 0.7).all()
    torch.testing.assert_close(norms, T([0.7, 0.7]), atol=3.0 / 2**10, rtol=0)
