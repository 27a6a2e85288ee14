import json

import pytest
import torch

from amat_monai.conditions import LossTermsCondition, MetricCondition, TotalLossCondition, make_condition
from amat_monai.landmarks import LandmarkGridError, landmark_targets
from amat_monai.losses import SegmentationLoss
from amat_monai.metrics import PresentClassDice

T = torch.tensor


def _logits(classes: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Confident logits ``[B, C, H, W]`` whose argmax is ``classes`` ``[B, H, W]``."""
    return 10.0 * torch.nn.functional.one_hot(classes, num_classes).permute(0, 3, 1, 2).float()


def test_present_class_dice_lets_a_perfect_one_structure_slice_pass():
    label = torch.zeros(2, 8, 8, dtype=torch.long)
    label[0, 2:5, 2:5] = 1  # one structure only
    label[1, 2:5, 2:5], label[1, 5:7, 5:7] = 1, 2  # both
    pred = label.clone()
    pred[1, 5:7, 5:7] = 0  # slice 1 misses structure 2 entirely: Dice (1 + 0) / 2
    dice = PresentClassDice()(_logits(pred), label[:, None])
    torch.testing.assert_close(dice, T([1.0, 0.5]))
    # the soft Dice loss term averages over both classes: the perfect one-structure slice scores about 0.5
    soft = SegmentationLoss()(_logits(label), label[:, None])[:, 0]
    assert soft[0] > 0.45 and soft[1] < 0.05
    condition = MetricCondition(PresentClassDice(), threshold=0.8)
    assert condition(_logits(label), label[:, None], None).tolist() == [True, True]
    assert condition(_logits(pred), label[:, None], None).tolist() == [True, False]


def test_present_class_dice_on_a_slice_without_foreground():
    label = torch.zeros(2, 4, 4, dtype=torch.long)
    pred = label.clone()
    pred[1, 0, 0] = 2  # a false positive on an empty slice
    torch.testing.assert_close(PresentClassDice()(_logits(pred), label[:, None]), T([1.0, 0.0]))


def test_loss_conditions_on_hand_computed_losses():
    losses = T([[0.1, 0.1], [0.3, 0.1], [0.1, 0.6], [0.29, 0.49]])
    terms = LossTermsCondition(T([0.3, 0.5]), ["dice", "ce"])
    assert terms(None, None, losses).tolist() == [True, False, False, True]  # strict, every term
    assert LossTermsCondition(T([0.3, 0.5]), terms=[1])(None, None, losses).tolist() == [True, True, False, True]
    assert TotalLossCondition(0.5)(None, None, losses).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="thresholds"):
        LossTermsCondition(T([0.3]))(None, None, losses)
    with pytest.raises(ValueError, match="condition_terms"):
        LossTermsCondition(T([0.3, 0.5]), terms=[2])


def test_landmark_grid_error_in_pixels():
    points = T([[[10.0, 12.0]], [[20.0, 8.0]]])
    target = torch.stack([landmark_targets(p, (32, 32), radius=4.0) for p in points])
    moved = torch.stack([landmark_targets(p + T([3.0, 4.0]), (32, 32), radius=4.0) for p in points])
    logits = lambda t: torch.cat([20 * t[:, :1] - 10, t[:, 1:]], dim=1)  # noqa: E731 - heatmap as logits
    error = LandmarkGridError(radius=4.0)
    torch.testing.assert_close(error(logits(target), target), T([0.0, 0.0]), atol=0.05, rtol=0)
    torch.testing.assert_close(error(logits(moved), target), T([5.0, 5.0]), atol=0.05, rtol=0)
    assert not MetricCondition(error, threshold=2.0)(logits(moved), target, None).any()


def test_make_condition_reads_each_threshold_from_xi_json(tmp_path):
    xi_file = tmp_path / "xi.json"
    xi_file.write_text(json.dumps({"xi": [0.3, 0.5], "terms": [{"name": "dice"}, {"name": "ce"}],
                                   "total": {"xi": 0.7}, "metric": {"name": "dice_present", "xi": 0.8}}))
    terms = make_condition("terms", str(xi_file), SegmentationLoss())
    assert terms.names == ["dice", "ce"] and terms.thresholds.tolist() == [0.3, 0.5]
    assert make_condition("total", str(xi_file)).thresholds.tolist() == [0.7]
    metric = make_condition("metric", str(xi_file), score_fn=PresentClassDice())
    assert metric.thresholds.tolist() == [-0.8]  # higher-is-better scores are negated into a badness
    with pytest.raises(ValueError, match="score function"):
        make_condition("metric", str(xi_file))
    with pytest.raises(ValueError, match="condition must be"):
        make_condition("loss", str(xi_file))
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"xi": [0.3, 0.5]}))
    with pytest.raises(ValueError, match="old.json has no 'total' threshold"):
        make_condition("total", str(old))
