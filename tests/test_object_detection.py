"""The 2D RetinaNet of :mod:`amat_monai.object_detection`: forward and per-sample loss without torchvision, the
padded box format, and the attacks on it."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from amat_monai.attacks import per_sample_norm, pgd
from amat_monai.object_detection import DETECTION_TERMS, DetectionLoss, build_retinanet, pad_boxes, unpad_boxes


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    return build_retinanet(num_classes=3, widths=(8, 16, 32, 64), fpn_channels=16).eval()


def _batch():
    x = torch.rand(3, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    y = pad_boxes([torch.tensor([[10.0, 10, 30, 30], [50, 40, 90, 80]]), torch.tensor([[5.0, 60, 20, 75]]),
                   torch.zeros(0, 4)], [torch.tensor([0, 1]), torch.tensor([2]), torch.zeros(0)])
    return x, y


def test_padded_boxes_round_trip_and_refuse_too_many():
    _, y = _batch()
    assert y.shape == (3, 2, 5) and y[1, 1, 4] == -1 and (y[2, :, 4] == -1).all()
    (b0, l0), (b1, l1), (b2, l2) = unpad_boxes(y)
    assert b0.tolist() == [[10, 10, 30, 30], [50, 40, 90, 80]] and l0.tolist() == [0, 1] and l0.dtype == torch.int64
    assert l1.tolist() == [2] and b2.shape == (0, 4)
    with pytest.raises(ValueError, match="image 0 has 2 boxes, more than max_boxes=1"):
        pad_boxes([torch.zeros(2, 4)], [torch.zeros(2)], max_boxes=1)


def test_forward_and_loss_need_no_torchvision(detector):
    x, y = _batch()
    pred = detector(x)
    assert "torchvision" not in sys.modules
    assert pred.shape[0] == 3 and pred.shape[1] == 3 + 4  # channels: class logits, then box offsets; one column per anchor
    terms = DetectionLoss(detector)(pred, y)
    assert terms.shape == (3, len(DETECTION_TERMS)) and torch.isfinite(terms).all()
    assert (terms[:2] > 0).all()
    # the image without boxes has no matched anchor: no box or foreground loss, only background
    assert terms[2, 0] == 0 and terms[2, 1] == 0 and terms[2, 2] > 0
    assert torch.equal(terms, DetectionLoss(detector)(detector(x), y))  # deterministic: no random sampling


def test_unused_resnet_stages_are_dropped_and_old_checkpoints_still_load():
    detector = build_retinanet(widths=(4, 8, 8, 16), fpn_channels=8, returned_layers=(1, 2))
    names = [n for n, _ in detector.named_parameters()]
    assert not any(".layer3." in n or ".layer4." in n for n in names)  # every parameter feeds the loss (DDP)
    assert any(".layer2." in n for n in names)
    # a state dict that still holds the unused stages (as saved before they were dropped) loads strictly
    state = dict(detector.state_dict())
    state["network.feature_extractor.backbone.layer4.0.conv1.weight"] = torch.zeros(16, 8, 3, 3)
    detector.load_state_dict(state, strict=True)
    state["network.feature_extractor.backbone.layer9.weight"] = torch.zeros(1)  # anything else is still refused
    with pytest.raises(RuntimeError, match="layer9"):
        detector.load_state_dict(state, strict=True)


def test_per_sample_rows_equal_single_image_runs(detector):
    x, y = _batch()
    batch = DetectionLoss(detector)(detector(x), y)
    for i in range(3):
        single = DetectionLoss(detector)(detector(x[i: i + 1]), y[i: i + 1])
        assert torch.allclose(batch[i], single[0], rtol=1e-5, atol=1e-6), i


def test_pgd_respects_per_sample_radii_on_the_detector(detector):
    x, y = _batch()
    loss = DetectionLoss(detector)
    eps = torch.tensor([0.5, 2.0, 1.0])
    x_adv = pgd(detector, loss, x, y, eps, steps=3, step_size=eps / 2, clamp=(0.0, 1.0),
                generator=torch.Generator().manual_seed(0))
    norms = per_sample_norm(x_adv - x, "l2")
    assert (norms <= eps + 1e-4).all() and (norms > 0.25 * eps).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert loss(detector(x_adv), y)[:2].sum() > loss(detector(x), y)[:2].sum()


def test_detect_returns_boxes_labels_and_scores(detector):
    x, _ = _batch()
    detector.box_selector.score_thresh = 0.0  # untrained: keep every candidate to see the format
    try:
        out = detector.detect(detector(x))
    finally:
        detector.box_selector.score_thresh = 0.05
    assert len(out) == 3
    for d in out:
        boxes, labels, scores = d["boxes"], d["labels"], d["labels_scores"]
        assert boxes.shape[1] == 4 and len(boxes) == len(labels) == len(scores) > 0
        # MONAI's box convention: coordinate k runs along spatial dimension k of the [B, C, 96, 128] input
        assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 128).all() and set(labels.tolist()) <= {0, 1, 2}
    with pytest.raises(RuntimeError, match="do not match the anchors"):
        detector.detect(torch.zeros(1, 7, 10))


# ------------------------------------------------------------------ the metric
def _fake_detect(detections):
    return lambda pred: [{"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                          "labels": torch.tensor(lab, dtype=torch.long), "labels_scores": torch.tensor(s)}
                         for b, lab, s in detections]


def _metric_value(detections, truths, classes=("a", "b")):
    from amat_monai.metrics import DetectionMetric

    metric = DetectionMetric(_fake_detect(detections), classes, max_boxes=4, max_detections=5)
    label = pad_boxes([torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b, _ in truths],
                      [torch.tensor(lab) for _, lab in truths], max_boxes=4)
    columns = {k: v.numpy() for k, v in metric.per_sample(torch.zeros(len(truths)), {"label": label}).items()}
    return metric.aggregate(columns, {}), columns


def test_map_of_perfect_predictions_is_one():
    boxes = [[0, 0, 10, 10], [20, 20, 30, 35]]
    summary, columns = _metric_value([(boxes, [0, 1], [0.9, 0.8])], [(boxes, [0, 1])])
    assert summary["map"] == pytest.approx(1.0) and summary["map50"] == pytest.approx(1.0)
    assert summary["map_a"] == pytest.approx(1.0) and columns["map"].tolist() == pytest.approx([1.0])
    assert columns["_detections"].shape == (1, 5, 6) and columns["_truths"].shape == (1, 4, 5)


def test_map_with_a_missed_box_by_hand():
    # one class, two boxes, one found: precision 1 up to recall 0.5, so 51 of COCO's 101 recall points score 1
    summary, _ = _metric_value([([[0, 0, 10, 10]], [0], [0.9])], [([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 0])],
                               classes=("a",))
    assert summary["map"] == pytest.approx(51 / 101)
    # two classes, the class-b box missed: AP 1 for a, 0 for b, mean 0.5
    summary, _ = _metric_value([([[0, 0, 10, 10]], [0], [0.9])], [([[0, 0, 10, 10], [20, 20, 30, 30]], [0, 1])])
    assert summary["map"] == pytest.approx(0.5) and summary["map_b"] == 0.0
    # a box found at IoU 0.6 (10x6 inside the 10x10 truth): AP 1 at the thresholds 0.5, 0.55, 0.6, 0 at the 7 above
    summary, _ = _metric_value([([[0, 0, 10, 6]], [0], [0.9])], [([[0, 0, 10, 10]], [0])], classes=("a",))
    assert summary["map50"] == pytest.approx(1.0) and summary["map"] == pytest.approx(0.3)


def test_map_leaves_classes_without_ground_truth_out_of_the_mean():
    # the image has no class-b box: MONAI's COCOMetric averages b's -1 into its overall value (giving 0); COCO
    # and we leave b out, so a perfect class a gives 1, and no detection at all gives 0, not NaN
    summary, columns = _metric_value([([[0, 0, 10, 10]], [0], [0.9])], [([[0, 0, 10, 10]], [0])])
    assert summary["map"] == pytest.approx(1.0) and np.isnan(summary["map_b"])
    summary, columns = _metric_value([([], [], [])], [([[0, 0, 10, 10]], [0])])
    assert summary["map"] == 0.0 and columns["map"].tolist() == [0.0]


def test_ignite_value_of_a_detection_metric_is_the_data_sets_map():
    from ignite.engine import Engine

    from amat_monai.metrics import DetectionMetric, TaskMetricValue

    # two batches of one image: the first perfect, the second with its one box missed. The data set's mAP pools
    # the detections (AP of 2 boxes, 1 found: 51/101), which is not the mean of the per-image values (0.5)
    detections = iter([[([[0, 0, 10, 10]], [0], [0.9])], [([], [], [])]])
    metric = DetectionMetric(lambda pred: _fake_detect(next(detections))(pred), ("a",), max_boxes=2, max_detections=5)
    batches = [{"label": pad_boxes([torch.tensor([[0.0, 0, 10, 10]])], [torch.tensor([0])], 2)},
               {"label": pad_boxes([torch.tensor([[20.0, 20, 30, 30]])], [torch.tensor([0])], 2)}]
    engine = Engine(lambda e, batch: {"pred": torch.zeros(1)})
    TaskMetricValue(metric).attach(engine, "map")
    assert engine.run(batches).metrics["map"] == pytest.approx(51 / 101)


def test_robust_evaluation_of_a_detector_reports_map(detector, tmp_path):
    from amat_monai.evaluation import robust_evaluate
    from amat_monai.metrics import DetectionMetric

    x, y = _batch()
    loader = [{"image": x, "label": y, "sample_id": ["i0", "i1", "i2"]}]
    report = robust_evaluate(detector, DetectionLoss(detector), loader, DetectionMetric(detector.detect, ("a", "b", "c")),
                             attacks=("pgd",), eps=(1.0,), steps=2, sanity=False, progress=False, output_dir=tmp_path)
    assert report["metric"] == "map" and {"map", "map50", "map75", "map_a"} <= set(report["clean_metrics"])
    header = (tmp_path / "robustness.csv").read_text().splitlines()[0]
    assert ",map," in f"{header}," and "_detections" not in header
    assert report["reported_metrics"] == ["map50", "map75", "map_a", "map_b", "map_c"]
    markdown = (tmp_path / "robustness.md").read_text()
    assert "map (higher is better)" in markdown and "map_c (higher is better)" in markdown
