import pytest
import torch
from torch import nn

from amat_monai.margins import (
    BoundaryTracker,
    MarginTable,
    bisect_boundary,
    expand,
    satisfies,
    shrink_step,
    shrink_to_boundary,
    update_margins,
)

T = torch.tensor


def test_expand_shrink_and_cap_rules():
    torch.testing.assert_close(expand(T([0.5, 2.0]), 0.5), T([1.0, 2.5]))
    torch.testing.assert_close(expand(T([0.5, 2.0]), 0.5, eps_max=2.2), T([1.0, 2.2]))
    torch.testing.assert_close(shrink_step(T([2.0, 0.7, 0.5]), 0.5), T([1.5, 0.5, 0.5]))
    torch.testing.assert_close(shrink_to_boundary(T([2.0, 2.0, 0.6]), T([1.0, 0.0, 0.2]), 0.5), T([1.5, 1.0, 0.5]))


def test_condition_is_strict_and_needs_every_term():
    losses = T([[0.1, 0.1], [0.3, 0.1], [0.1, 0.6], [0.29, 0.49]])
    assert satisfies(losses, T([0.3, 0.5])).tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="thresholds"):
        satisfies(losses, T([0.3]))


def test_update_on_a_hand_computed_batch():
    margins = T([1.0, 2.0, 0.6], dtype=torch.float64)
    losses = T([[0.1, 0.1], [0.5, 0.1], [0.1, 0.9]])
    xi = T([0.3, 0.5])
    boundary = T([9.9, 1.0, 0.2], dtype=torch.float64)  # the first sample expands: its boundary is ignored
    bisect = update_margins(margins, losses, xi, 0.5, boundary_norm=boundary)
    torch.testing.assert_close(bisect, T([1.5, 1.5, 0.5], dtype=torch.float64))
    step = update_margins(margins, losses, xi, 0.5, shrink="step")
    torch.testing.assert_close(step, T([1.5, 1.5, 0.5], dtype=torch.float64))
    capped = update_margins(T([1.0, 3.0, 0.6], dtype=torch.float64), losses, xi, 0.5, shrink="step", eps_max=1.2)
    torch.testing.assert_close(capped, T([1.2, 1.2, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="boundary_norm"):
        update_margins(margins, losses, xi, 0.5)
    with pytest.raises(ValueError, match="shrink"):
        update_margins(margins, losses, xi, 0.5, shrink="halve")


def test_table_adds_new_ids_at_init_and_round_trips_its_state():
    table = MarginTable(init=0.5)
    torch.testing.assert_close(table.get(["a", "b"]), T([0.5, 0.5]))
    table.set(["b", "c"], T([2.0, 3.0]))
    assert table.as_dict() == {"a": 0.5, "b": 2.0, "c": 3.0}
    assert table.summary() == {"count": 3, "mean": pytest.approx(11 / 6), "min": 0.5, "max": 3.0}
    copy = MarginTable(init=9.0)
    copy.load_state_dict(table.state_dict())
    assert copy.as_dict() == table.as_dict() and copy.init == 0.5
    with pytest.raises(ValueError, match="ids"):
        copy.load_state_dict({"ids": ["a"], "margins": T([1.0, 2.0])})
    with pytest.raises(ValueError, match="margins for"):
        table.set(["a"], T([1.0, 2.0]))


def test_tracker_keeps_the_last_good_and_first_bad_iterates():
    xi = T([1.0])
    tracker = BoundaryTracker(xi)
    deltas = [torch.full((2, 1, 1, 1), float(v)) for v in (1, 2, 3)]
    tracker(0, deltas[0], T([[0.5], [2.0]]))  # sample 1 violates at once: its good point is the clean input
    tracker(1, deltas[1], T([[0.9], [2.0]]))
    tracker(2, deltas[2], T([[1.5], [0.1]]))  # sample 0 crosses between iterates 1 and 2
    assert tracker.crossed.tolist() == [True, True]
    assert tracker.good.flatten().tolist() == [2.0, 0.0]
    assert tracker.bad.flatten().tolist() == [3.0, 1.0]


def test_bisection_finds_the_boundary():
    # With an identity model and loss = ||delta||, the condition loss < xi holds exactly inside the ball of radius xi.
    x = torch.zeros(2, 1, 4, 4)
    direction = torch.ones(1, 4, 4) / 4.0  # unit L2 norm
    bad = torch.stack([direction * 1.0, direction * 3.0])
    xi = T([0.7])
    good = bisect_boundary(nn.Identity(), lambda p, y: p.flatten(1).norm(dim=1), x, x, torch.zeros_like(x), bad, xi)
    norms = good.flatten(1).norm(dim=1)
    assert (norms < 0.7).all()
    torch.testing.assert_close(norms, T([0.7, 0.7]), atol=3.0 / 2**10, rtol=0)
