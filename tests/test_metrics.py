"""Metrics against hand-computed values: hard Dice (including empty classes), 3D Dice, MRE and SDR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice
from monai.networks.utils import one_hot

from amat_monai.metrics import (
    LandmarkMetric,
    SegmentationMetric,
    TaskMetric,
    dice_from_counts,
    hard_dice_counts,
    mean_radial_error,
    radial_errors,
    successful_detection_rates,
)


def _logits(classes: torch.Tensor, num_classes: int = 3) -> torch.Tensor:
    """Logits whose argmax is ``classes`` ([B, H, W])."""
    return one_hot(classes[:, None], num_classes, dim=1) * 5.0


def _masks() -> tuple[torch.Tensor, torch.Tensor]:
    """Four 4x4 slices, 3 classes.

    0: both classes in the label; class 1 TP=1 FP=1 FN=0 (2/3), class 2 TP=1 (1)        -> dice 5/6
    1: only class 1 in the label, missed (FN=1); class 2 absent everywhere                -> dice NaN, fg 0
    2: only class 1 in the label, found (TP=2); class 2 predicted though absent (FP=1)    -> dice NaN, fg 1/2
    3: no foreground in the label; class 1 predicted (FP=1)                               -> both NaN
    """
    label = torch.zeros(4, 4, 4, dtype=torch.long)
    pred = torch.zeros(4, 4, 4, dtype=torch.long)
    label[0, 0, 0], label[0, 1, 1] = 1, 2
    pred[0, 0, 0], pred[0, 0, 1], pred[0, 1, 1] = 1, 1, 2
    label[1, 2, 2] = 1
    label[2, 0, 0:2] = 1
    pred[2, 0, 0:2] = 1
    pred[2, 3, 3] = 2
    pred[3, 2, 2] = 1
    return pred, label


def test_hard_dice_counts_and_dice_by_hand():
    pred, label = _masks()
    counts = hard_dice_counts(_logits(pred), label[:, None])
    expected = torch.tensor(
        [
            [[1, 1, 0], [1, 0, 0]],
            [[0, 0, 1], [0, 0, 0]],
            [[2, 0, 0], [0, 1, 0]],
            [[0, 1, 0], [0, 0, 0]],
        ],
        dtype=torch.float,
    )
    assert torch.equal(counts, expected)
    dice = dice_from_counts(counts)
    assert dice[0].tolist() == pytest.approx([2 / 3, 1.0])
    assert dice[1, 0] == 0 and math.isnan(dice[1, 1])  # class 2 absent from label and prediction: undefined
    assert dice[2].tolist() == [1.0, 0.0]  # class 2 predicted but absent: 0
    assert dice[3, 0] == 0 and math.isnan(dice[3, 1])


def test_hard_dice_matches_monai_compute_dice_where_label_is_not_empty():
    pred, label = _masks()
    ours = dice_from_counts(hard_dice_counts(_logits(pred), label))
    p, y = one_hot(pred[:, None], 3, dim=1), one_hot(label[:, None], 3, dim=1)
    monai = compute_dice(p, y, include_background=False, ignore_empty=True)
    defined = ~torch.isnan(monai)
    assert torch.allclose(ours[defined], monai[defined])
    assert defined.sum() == 4  # MONAI leaves classes with an empty label undefined; so do our per-slice means


def test_segmentation_metric_per_sample_variants():
    pred, label = _masks()
    values = SegmentationMetric().per_sample(_logits(pred), {"label": label[:, None]})
    dice, fg = values["dice"].tolist(), values["dice_fg"].tolist()
    assert dice[0] == pytest.approx(5 / 6) and all(math.isnan(v) for v in dice[1:])
    assert fg[:3] == pytest.approx([5 / 6, 0.0, 0.5]) and math.isnan(fg[3])


def test_segmentation_metric_aggregate_per_slice_and_per_volume():
    pred, label = _masks()
    metric = SegmentationMetric()
    cols = {k: v.numpy() for k, v in metric.per_sample(_logits(pred), {"label": label[:, None]}).items()}
    summary = metric.aggregate(cols, {"case": ["a", "a", "b", "b"], "slice": [0, 1, 0, 1]})
    assert summary["dice"] == pytest.approx(5 / 6) and summary["n_dice"] == 1
    assert summary["dice_fg"] == pytest.approx((5 / 6 + 0 + 0.5) / 3) and summary["n_dice_fg"] == 3
    # case a: class 1 TP=1 FP=1 FN=1 -> 1/2, class 2 TP=1 -> 1; case b: class 1 TP=2 FP=1 -> 4/5, class 2 FP=1 -> 0
    assert summary["dice_3d"] == pytest.approx(((0.5 + 1.0) / 2 + (0.8 + 0.0) / 2) / 2)
    assert summary["n_cases"] == 2
    no_case = metric.aggregate(cols, {"case": [None] * 4})
    assert math.isnan(no_case["dice_3d"])


def test_segmentation_metric_rejects_bad_labels():
    pred, label = _masks()
    with pytest.raises(ValueError, match="label values"):
        hard_dice_counts(_logits(pred), label + 3)
    with pytest.raises(ValueError, match="does not match"):
        hard_dice_counts(_logits(pred), label[:, :2])


def test_default_aggregate_is_nan_mean():
    class M(TaskMetric):
        name = "m"

    summary = M().aggregate({"m": np.array([1.0, np.nan, 3.0]), "_hidden": np.ones(3)}, {})
    assert summary == {"m": 2.0, "n_m": 2.0}


def test_radial_errors_mre_and_sdr_by_hand():
    true = torch.zeros(2, 3, 2)
    pred = torch.tensor([[[0.0, 0.0], [30.0, 40.0], [20.0, 0.0]], [[0.0, 25.0], [0.0, 35.0], [100.0, 0.0]]])
    errors = radial_errors(pred, true, spacing=0.1)  # mm
    assert errors.flatten().tolist() == pytest.approx([0.0, 5.0, 2.0, 2.5, 3.5, 10.0])
    assert mean_radial_error(errors).tolist() == pytest.approx([7 / 3, 16 / 3])
    sdr = successful_detection_rates(errors)
    assert sdr[2.0].tolist() == pytest.approx([2 / 3, 0.0])  # an error of exactly 2 mm counts as a success
    assert sdr[2.5].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert sdr[3.0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert sdr[4.0].tolist() == pytest.approx([2 / 3, 2 / 3])
    # anisotropic spacing, one value per coordinate axis
    assert radial_errors(pred[:1, 1:2], true[:1, 1:2], spacing=(0.1, 0.2)).item() == pytest.approx(math.hypot(3, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        radial_errors(pred, true[:, :2])
    with pytest.raises(ValueError, match=r"\[B, K, 2\]"):
        radial_errors(pred[..., 0], true[..., 0])


def test_landmark_metric_plugs_a_decoder():
    true = torch.zeros(2, 3, 2)
    coords = torch.tensor([[[0.0, 0.0], [30.0, 40.0], [20.0, 0.0]], [[0.0, 25.0], [0.0, 35.0], [100.0, 0.0]]])
    metric = LandmarkMetric(decode=lambda pred, batch: coords, target_key="landmarks", spacing=0.1)
    assert metric.name == "mre" and metric.higher_is_better is False
    values = metric.per_sample(torch.zeros(2, 1), {"landmarks": true})
    assert set(values) == {"mre", "sdr_2", "sdr_2.5", "sdr_3", "sdr_4"}
    assert values["mre"].tolist() == pytest.approx([7 / 3, 16 / 3])
    summary = metric.aggregate({k: v.numpy() for k, v in values.items()}, {})
    assert summary["mre"] == pytest.approx(23 / 6)  # = mean over all 6 landmarks
    assert summary["sdr_2"] == pytest.approx(1 / 3)
    # per-sample spacing from the batch
    per_sample = LandmarkMetric(decode=lambda pred, batch: coords, spacing="spacing")
    values = per_sample.per_sample(torch.zeros(2, 1), {"landmarks": true, "spacing": torch.tensor([0.1, 0.2])})
    assert values["mre"].tolist() == pytest.approx([7 / 3, 32 / 3])
