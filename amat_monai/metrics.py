"""Task metrics for robust evaluation: the plug-in interface, segmentation Dice, landmark radial errors and
detection mAP.

The robust evaluator (:mod:`amat_monai.evaluation`) knows nothing about tasks. It asks a :class:`TaskMetric`
for per-sample values of the network output on clean and on attacked inputs, keeps the worst of several
attack restarts per sample (judged by the metric's primary value ``metric.name``), and asks the metric to
aggregate the kept per-sample values into the numbers that are reported.

Writing a metric for a new task means subclassing :class:`TaskMetric` and implementing :meth:`per_sample`
(and, when a plain mean over samples is not the right summary, :meth:`aggregate`). Example, the landmark
metric, given a ``decode(pred, batch) -> [B, K, 2]`` function that returns predicted coordinates in original
pixel units::

    metric = LandmarkMetric(decode=my_decode, target_key="landmarks", spacing=0.1)

Segmentation conventions (hard Dice ``2TP / (2TP + FP + FN)`` of the argmax prediction, per foreground class):

* ``dice`` (primary, the papers' protocol): on slices whose label contains EVERY foreground class, the mean
  over classes; other slices are undefined (NaN) and excluded from the average.
* ``dice_fg``: on slices whose label contains ANY foreground class, the mean over the classes present in the
  label or in the prediction (a class absent from both is excluded; a class predicted but absent from the
  label scores 0). Slices without foreground in the label are NaN (excluded).
* ``dice_3d``: per case (slices regrouped by the batch's ``"case"`` key), TP/FP/FN summed over the case's
  evaluated slices, Dice per class (a class absent from both label and prediction in the whole case is
  excluded), mean over classes, then mean over cases.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from monai.metrics import get_confusion_matrix
from monai.networks.utils import one_hot
from monai.utils import CommonKeys, convert_to_tensor

from amat_monai.distributed import all_gather_objects

__all__ = [
    "TaskMetric",
    "SegmentationMetric",
    "LandmarkMetric",
    "hard_dice_counts",
    "dice_from_counts",
    "PresentClassDice",
    "radial_errors",
    "mean_radial_error",
    "successful_detection_rates",
    "SDR_RADII_MM",
    "coco_map",
    "DetectionMetric",
    "ImageMAP",
    "TaskMetricValue",
]

#: The SDR radii of the ISBI 2015 challenge, in mm.
SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)


class TaskMetric:
    """Interface between a task and the robust evaluator.

    Subclasses set the class attributes and implement :meth:`per_sample`.

    Attributes:
        name: key of the primary value, the one that is reported, plotted and used to keep the worst attack
            restart of each sample (e.g. ``"dice"``, ``"mre"``).
        higher_is_better: ``True`` for Dice-like metrics, ``False`` for errors (MRE).
        meta_keys: batch keys whose per-sample values the evaluator collects and hands to :meth:`aggregate`
            (and writes to the CSV), e.g. ``("case", "slice")``.
        tolerance: slack, in the primary metric's units, of the evaluator's sanity comparisons (a stronger
            attack may be worse than a weaker one by this much before a warning is raised).
        break_fraction: the "very large ε breaks the model" sanity check expects the primary value to fall
            below ``break_fraction * clean`` (higher is better) or rise above ``clean / break_fraction``.
        digits: decimals of the primary value in tables.
        reported: other summary values that the reports tabulate and plot beside the primary one (detection:
            mAP@0.5, mAP@0.75 and per-class mAP).
    """

    name: str = "metric"
    reported: tuple[str, ...] = ()
    higher_is_better: bool = True
    meta_keys: tuple[str, ...] = ()
    tolerance: float = 0.01
    break_fraction: float = 0.1
    digits: int = 4

    def per_sample(self, pred: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per-sample values of one batch.

        Args:
            pred: the network output for the (clean or attacked) input, ``[B, ...]``, exactly what the
                inference path returns (logits; no post-processing applied).
            batch: the collated batch dictionary. ``batch["label"]`` (the evaluator's label key) is the
                prepared label tensor on the evaluation device; the other entries are as collated.

        Returns:
            A dict of ``[B]`` float tensors (any device). It must contain ``self.name``. ``NaN`` marks a value
            that is undefined for that sample (excluded from averages). Keys starting with ``_`` are
            internal (e.g. confusion counts for :meth:`aggregate`), are not written to the CSV, and may be
            ``[B, ...]`` (e.g. a sample's padded boxes).
        """
        raise NotImplementedError

    def aggregate(self, columns: Mapping[str, np.ndarray], meta: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        """Summary values from the per-sample values of a whole test split.

        Args:
            columns: every key returned by :meth:`per_sample`, concatenated over batches, ``[N]`` arrays
                (``[N, ...]`` for internal keys of more dimensions).
            meta: ``"sample_id"`` and each of ``meta_keys``, ``N`` values each (``None`` when a batch lacked it).

        Returns:
            Summary values by name; must contain ``self.name``. The default is the mean over samples of each
            public column, ignoring NaN (``NaN`` when every sample is undefined), plus ``n_<name>``, the number
            of samples that defined the primary value.
        """
        out = {k: _nanmean(v) for k, v in columns.items() if not k.startswith("_")}
        out[f"n_{self.name}"] = float(np.isfinite(np.asarray(columns[self.name], dtype=float)).sum())
        return out

    def is_worse(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Elementwise: is value ``a`` worse than ``b``? (NaN compares as not worse.)"""
        return a < b if self.higher_is_better else a > b


def _nanmean(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


# --------------------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------------------
def hard_dice_counts(pred: torch.Tensor, label: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Per-sample, per-foreground-class confusion counts of the argmax prediction.

    Args:
        pred: logits or probabilities ``[B, C, *spatial]`` (argmax over ``C``), or integer class maps
            ``[B, 1, *spatial]`` when ``num_classes`` is given.
        label: integer labels ``[B, 1, *spatial]`` or ``[B, *spatial]``.
        num_classes: number of classes including background; default ``pred.shape[1]``.

    Returns:
        ``[B, C - 1, 3]`` float counts (TP, FP, FN) for classes ``1 .. C-1``
        (computed with :func:`monai.metrics.get_confusion_matrix`).
    """
    if label.dim() == pred.dim() - 1:
        label = label[:, None]
    if num_classes is None:
        num_classes = pred.shape[1]
        classes = pred.argmax(dim=1, keepdim=True)
    else:
        classes = pred if pred.shape[1] == 1 else pred.argmax(dim=1, keepdim=True)
    if num_classes < 2:
        raise ValueError(f"segmentation needs at least 2 classes (background + foreground), got {num_classes}")
    if label.shape[0] != classes.shape[0] or label.shape[2:] != classes.shape[2:]:
        raise ValueError(f"label shape {tuple(label.shape)} does not match prediction {tuple(pred.shape)}")
    label = torch.as_tensor(label).long()
    if label.min() < 0 or label.max() >= num_classes:
        raise ValueError(
            f"label values must lie in [0, {num_classes - 1}], got [{int(label.min())}, {int(label.max())}]"
        )
    p = one_hot(torch.as_tensor(classes).long(), num_classes, dim=1)
    y = one_hot(label, num_classes, dim=1)
    cm = get_confusion_matrix(p, y, include_background=False)  # [B, C-1, 4] = tp, fp, tn, fn
    return torch.stack([cm[..., 0], cm[..., 1], cm[..., 3]], dim=-1).float()


def dice_from_counts(counts: torch.Tensor) -> torch.Tensor:
    """Dice ``2TP / (2TP + FP + FN)`` from ``[..., 3]`` counts; ``NaN`` where the class is absent from both the
    label and the prediction (``2TP + FP + FN == 0``)."""
    tp, fp, fn = counts.unbind(-1)
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.full_like(denom, float("nan")))


class PresentClassDice:
    """Per-slice hard Dice over the foreground classes present in the slice's label: ``score(logits, label) -> [B]``.

    The score function of AMAT's ``"metric"`` expand condition (:mod:`amat_monai.conditions`). Counting only
    the classes in the label lets a perfectly segmented slice that holds one of two structures score 1, where a
    mean over all classes would cap it at 0.5. A slice whose label has no foreground scores 1 when nothing is
    predicted and 0 otherwise.
    """

    name = "dice_present"
    higher_is_better = True

    def __call__(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        pred = convert_to_tensor(pred, track_meta=False)
        label = convert_to_tensor(label, track_meta=False)
        counts = hard_dice_counts(pred.detach(), label.to(pred.device))  # [B, C-1, 3]
        tp, fp, fn = counts.unbind(-1)
        present = (tp + fn) > 0
        dice = 2 * tp / (2 * tp + fp + fn).clamp_min(1)
        n_present = present.sum(dim=1)
        mean_present = (dice * present).sum(dim=1) / n_present.clamp_min(1)
        empty_ok = (fp.sum(dim=1) == 0).to(dice.dtype)
        return torch.where(n_present > 0, mean_present, empty_ok)


class SegmentationMetric(TaskMetric):
    """Average Dice Index over slices (the papers' protocol) and its variants; see the module docstring.

    Args:
        label_key: batch key of the label.
        case_key: batch key of the case (volume) id, used by ``dice_3d``; ``dice_3d`` is NaN when absent.
        slice_key: batch key of the slice index (written to the CSV).
    """

    name = "dice"
    higher_is_better = True
    tolerance = 0.02  # Dice points: PGD with a random start can trail IFGSM by ~0.01 on small test sets

    def __init__(self, label_key: str = CommonKeys.LABEL, case_key: str = "case", slice_key: str = "slice") -> None:
        self.label_key = label_key
        self.case_key = case_key
        self.meta_keys = (case_key, slice_key)

    def per_sample(self, pred: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        label = batch[self.label_key]
        label = convert_to_tensor(label, track_meta=False)
        pred = convert_to_tensor(pred, track_meta=False)
        counts = hard_dice_counts(pred.detach(), label.to(pred.device))  # [B, C-1, 3]
        dice = dice_from_counts(counts)  # [B, C-1]
        in_label = (counts[..., 0] + counts[..., 2]) > 0  # TP + FN > 0
        all_present = in_label.all(dim=1)
        any_present = in_label.any(dim=1)
        nan = torch.full_like(dice[:, 0], float("nan"))
        out = {
            "dice": torch.where(all_present, dice.mean(dim=1), nan),
            "dice_fg": torch.where(any_present, dice.nanmean(dim=1), nan),
        }
        for c in range(dice.shape[1]):
            out[f"_tp{c + 1}"], out[f"_fp{c + 1}"], out[f"_fn{c + 1}"] = counts[:, c].unbind(-1)
        return out

    def aggregate(self, columns: Mapping[str, np.ndarray], meta: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        out = {
            "dice": _nanmean(columns["dice"]),
            "dice_fg": _nanmean(columns["dice_fg"]),
            "n_dice": float(np.isfinite(np.asarray(columns["dice"], dtype=float)).sum()),
            "n_dice_fg": float(np.isfinite(np.asarray(columns["dice_fg"], dtype=float)).sum()),
        }
        cases = meta.get(self.case_key)
        if cases is None or any(c is None for c in cases):
            out["dice_3d"], out["n_cases"] = float("nan"), float("nan")
            return out
        n_classes = sum(1 for k in columns if k.startswith("_tp"))
        counts = np.stack(
            [np.stack([columns[f"_{k}{c}"] for k in ("tp", "fp", "fn")], axis=-1) for c in range(1, n_classes + 1)],
            axis=1,
        )  # [N, C-1, 3]
        case_ids = np.asarray([str(c) for c in cases])
        per_case = []
        for case in dict.fromkeys(case_ids):  # first-appearance order
            summed = torch.as_tensor(counts[case_ids == case].sum(axis=0))
            per_case.append(float(dice_from_counts(summed).nanmean()))
        out["dice_3d"] = _nanmean(np.asarray(per_case))
        out["n_cases"] = float(len(per_case))
        return out


# --------------------------------------------------------------------------------------------------------
# Landmarks
# --------------------------------------------------------------------------------------------------------
def _coords(name: str, value: torch.Tensor | np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() != 3 or t.shape[-1] != 2:
        raise ValueError(f"{name} must be [B, K, 2] coordinates, got shape {tuple(t.shape)}")
    return t


def radial_errors(
    pred: torch.Tensor | np.ndarray, true: torch.Tensor | np.ndarray, spacing: float | Sequence[float] = 0.1
) -> torch.Tensor:
    """Euclidean distance between predicted and true landmarks, in mm.

    Args:
        pred: predicted coordinates ``[B, K, 2]`` in original pixel units (any consistent axis order).
        true: true coordinates ``[B, K, 2]``, same units and axis order.
        spacing: pixel spacing in mm, one number (isotropic, e.g. 0.1 for ISBI 2015) or one per axis in the
            coordinates' axis order.

    Returns:
        ``[B, K]`` float64 radial errors in mm.
    """
    p, t = _coords("pred", pred), _coords("true", true)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and true {tuple(t.shape)} coordinates differ in shape")
    s = torch.as_tensor(spacing, dtype=torch.float64)
    if s.numel() not in (1, 2) or (s <= 0).any():
        raise ValueError(f"spacing must be one positive number or two (one per axis), got {spacing!r}")
    return ((p - t.to(p.device)) * s.to(p.device)).norm(dim=-1)


def mean_radial_error(errors: torch.Tensor) -> torch.Tensor:
    """Per-sample MRE ``[B]`` from ``[B, K]`` radial errors (mean over landmarks)."""
    return errors.mean(dim=-1)


def successful_detection_rates(
    errors: torch.Tensor, radii: Sequence[float] = SDR_RADII_MM
) -> dict[float, torch.Tensor]:
    """Per-sample successful detection rate ``[B]`` for each radius: the fraction of landmarks whose radial
    error is at most the radius (the ISBI 2015 challenge counts ``error <= r`` as a success)."""
    return {float(r): (errors <= r).double().mean(dim=-1) for r in radii}


class LandmarkMetric(TaskMetric):
    """Mean radial error (mm, primary, lower is better) and SDR at 2 / 2.5 / 3 / 4 mm.

    Args:
        decode: ``decode(pred, batch) -> [B, K, 2]`` predicted coordinates in original pixel units (the
            task's heatmap/offset decoding, including any undoing of the input resize).
        target_key: batch key of the true coordinates ``[B, K, 2]`` in original pixel units (same axis order).
        spacing: pixel spacing in mm, or a batch key holding a per-sample spacing ``[B]`` / ``[B, 2]``.
        radii: SDR radii in mm.

    Per-sample columns: ``mre`` and ``sdr_2``, ``sdr_2.5``, ``sdr_3``, ``sdr_4`` (fractions in [0, 1]).
    Aggregation is the mean over images, which equals the mean over all landmarks of all images since every
    image has ``K`` landmarks.
    """

    name = "mre"
    higher_is_better = False
    tolerance = 0.05  # mm
    digits = 2  # the papers report MRE to 0.01 mm

    def __init__(
        self,
        decode: Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor],
        target_key: str = "landmarks",
        spacing: float | str = 0.1,
        radii: Sequence[float] = SDR_RADII_MM,
    ) -> None:
        self.decode = decode
        self.target_key = target_key
        self.spacing = spacing
        self.radii = tuple(float(r) for r in radii)

    def per_sample(self, pred: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        coords = self.decode(pred.detach(), batch)
        true = batch[self.target_key]
        if isinstance(self.spacing, str):
            spacing = torch.as_tensor(batch[self.spacing], dtype=torch.float64).cpu()
            errors = _coords("pred", coords).cpu() - _coords("true", true).cpu()
            spacing = spacing.view(-1, 1, 1) if spacing.dim() == 1 else spacing.view(-1, 1, 2)
            errors = (errors * spacing).norm(dim=-1)
        else:
            errors = radial_errors(torch.as_tensor(coords).cpu(), torch.as_tensor(true).cpu(), self.spacing)
        out = {"mre": mean_radial_error(errors)}
        for r, rate in successful_detection_rates(errors, self.radii).items():
            out[f"sdr_{r:g}"] = rate
        return out


# --------------------------------------------------------------------------------------------------------
# Object detection
# --------------------------------------------------------------------------------------------------------
class _CocoClassWarnings(logging.Filter):
    """Drops COCOMetric's per-class "no results / no gt found" warnings: per image they are the rule, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("WARNING, no ")


@contextlib.contextmanager
def _without_coco_class_warnings():
    root, quiet = logging.getLogger(), _CocoClassWarnings()
    root.addFilter(quiet)  # COCOMetric logs through the root logger
    try:
        yield
    finally:
        root.removeFilter(quiet)


def coco_map(detections: Sequence[Mapping[str, np.ndarray]], truths: Sequence[Mapping[str, np.ndarray]],
             classes: Sequence[str], max_detections: int = 100) -> dict[str, float]:
    """COCO mAP@0.5:0.95, AP@0.5, AP@0.75 and per-class mAP over images (MONAI's ``matching_batch`` + ``COCOMetric``).

    Args:
        detections: per image ``{"boxes" [D, 4], "labels" [D], "scores" [D]}``.
        truths: per image ``{"boxes" [G, 4], "labels" [G]}``.
        classes: class names, in label order.

    Returns:
        ``{"map", "map50", "map75", "map_<class>"...}``: the overall values are means over the classes that have
        ground truth; a class without ground truth is NaN, and so is everything when no image has a box.
    """
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    if not any(len(t["boxes"]) for t in truths):
        return {"map": float("nan"), "map50": float("nan"), "map75": float("nan"),
                **{f"map_{c}": float("nan") for c in classes}}
    coco = COCOMetric(classes=list(classes), iou_list=(0.5, 0.75), iou_range=(0.5, 0.95, 0.05),
                      max_detection=(max_detections,), verbose=False)
    with _without_coco_class_warnings():
        matched = matching_batch(box_iou, coco.iou_thresholds, [d["boxes"] for d in detections],
                                 [d["labels"] for d in detections], [d["scores"] for d in detections],
                                 [t["boxes"] for t in truths], [t["labels"] for t in truths],
                                 max_detections=max_detections)
        values, _ = coco(matched)
    suffix = f"MaxDet_{max_detections}"

    def per_class(name: str) -> list[float]:
        # COCOMetric marks a class without ground truth -1 (and averages the -1 into its overall value; COCO leaves
        # such classes out of the mean, as done here)
        return [float(values.get(f"{c}_{name}_{suffix}", -1.0)) for c in classes]

    out = {}
    for key, name in (("map", "mAP_IoU_0.50_0.95_0.05"), ("map50", "AP_IoU_0.50"), ("map75", "AP_IoU_0.75")):
        present = [v for v in per_class(name) if v >= 0]
        out[key] = float(np.mean(present)) if present else float("nan")
    out.update({f"map_{c}": v if v >= 0 else float("nan") for c, v in zip(classes, per_class("mAP_IoU_0.50_0.95_0.05"))})
    return out


class DetectionMetric(TaskMetric):
    """mAP@0.5:0.95 over the test images (COCO; also mAP@0.5, mAP@0.75 and per-class mAP).

    Args:
        detect: ``detect(pred) -> [{"boxes", "labels", "labels_scores"}]`` per image, e.g.
            :meth:`amat_monai.object_detection.PerSampleRetinaNetDetector.detect`.
        classes: class names, in label order.
        label_key: the batch key of the padded ground truth ``[B, M, 5]`` (:func:`~amat_monai.object_detection.pad_boxes`).
        max_boxes: ground-truth rows kept per image (an image with more is an error).
        max_detections: detections kept per image (the highest scores), COCO's 100.

    Per sample, ``map`` is the image's own mAP (the attacks' restarts are compared on it); the reported ``map``
    is the data set's, from every image's detections together (:func:`coco_map`).
    """

    name = "map"
    higher_is_better = True
    tolerance = 0.01
    digits = 4

    def __init__(self, detect: Callable[[torch.Tensor], list[dict[str, torch.Tensor]]], classes: Sequence[str],
                 label_key: str = CommonKeys.LABEL, max_boxes: int = 64, max_detections: int = 100) -> None:
        self.detect, self.classes, self.label_key = detect, tuple(classes), label_key
        self.max_boxes, self.max_detections = int(max_boxes), int(max_detections)
        self.reported = ("map50", "map75", *(f"map_{c}" for c in self.classes))

    @staticmethod
    def _unpack(dets: np.ndarray, gts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        keep, real = dets[:, 5] >= 0, gts[:, 4] >= 0
        return ({"boxes": dets[keep, :4], "scores": dets[keep, 4], "labels": dets[keep, 5].astype(int)},
                {"boxes": gts[real, :4], "labels": gts[real, 4].astype(int)})

    def per_sample(self, pred: torch.Tensor, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        from amat_monai.object_detection import unpad_boxes

        detections = self.detect(pred)
        truths = unpad_boxes(batch[self.label_key])
        n = len(detections)
        dets = torch.full((n, self.max_detections, 6), -1.0, dtype=torch.float64)
        gts = torch.full((n, self.max_boxes, 5), -1.0, dtype=torch.float64)
        per_image = torch.full((n,), float("nan"), dtype=torch.float64)
        for i, (d, (boxes, labels)) in enumerate(zip(detections, truths)):
            if boxes.shape[0] > self.max_boxes:
                raise ValueError(f"image {i} has {boxes.shape[0]} ground-truth boxes, more than max_boxes={self.max_boxes}")
            order = torch.argsort(d["labels_scores"], descending=True)[: self.max_detections]
            k = int(order.numel())
            dets[i, :k, :4] = d["boxes"][order].double().cpu()
            dets[i, :k, 4] = d["labels_scores"][order].double().cpu()
            dets[i, :k, 5] = d["labels"][order].double().cpu()
            gts[i, : boxes.shape[0], :4] = boxes.double().cpu()
            gts[i, : boxes.shape[0], 4] = labels.double().cpu()
            det, truth = self._unpack(dets[i].numpy(), gts[i].numpy())
            per_image[i] = coco_map([det], [truth], self.classes, self.max_detections)["map"]
        return {"map": per_image, "_detections": dets, "_truths": gts}

    def aggregate(self, columns: Mapping[str, np.ndarray], meta: Mapping[str, Sequence[Any]]) -> dict[str, float]:
        pairs = [self._unpack(d, g) for d, g in zip(columns["_detections"], columns["_truths"])]
        out = coco_map([p[0] for p in pairs], [p[1] for p in pairs], self.classes, self.max_detections)
        out["map_image_mean"] = _nanmean(columns["map"])
        out["n_map"] = float(len(pairs))
        return out


class ImageMAP:
    """Per-image COCO mAP@0.5:0.95 of a detector's output: ``score(pred, boxes) -> [B]`` (higher is better).

    The score function of AMAT's ``"metric"`` expand condition for detection (:mod:`amat_monai.conditions`), as
    :class:`PresentClassDice` is for segmentation. An image without ground-truth boxes scores NaN, which never
    passes the condition.

    Args:
        metric: the bundle's :class:`DetectionMetric` (its decoding and limits).
    """

    name = "map"
    higher_is_better = True

    def __init__(self, metric: DetectionMetric) -> None:
        self.metric = metric

    def __call__(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.metric.per_sample(pred, {self.metric.label_key: label})["map"]


class TaskMetricValue(Metric):
    """Ignite metric for MONAI evaluators: one aggregated value of a :class:`TaskMetric` over the data set.

    Collects the task metric's per-sample columns of every batch (prediction from ``engine.state.output``, the
    rest from ``engine.state.batch``, so attach it to an evaluator built with ``decollate=False``) and reports
    ``task_metric.aggregate(...)[value]``: the mean over samples for Dice and radial errors, the data set's COCO
    mAP for detection. Under DDP the columns of every rank are gathered first, so each rank reports the value of
    the whole data set.

    Args:
        task_metric: the task's metric.
        value: which aggregated value (default: the metric's primary ``name``).
        pred_key: the key of the prediction in the engine output.
    """

    def __init__(self, task_metric: TaskMetric, value: str | None = None, pred_key: str = "pred") -> None:
        self.task_metric = task_metric
        self.value = value or task_metric.name
        self.pred_key = pred_key
        super().__init__(output_transform=lambda out: out)

    def reset(self) -> None:
        self._columns: list[dict[str, np.ndarray]] = []

    def update(self, output: Any) -> None:
        pred, batch = output
        values = self.task_metric.per_sample(pred, batch)
        self._columns.append({k: torch.as_tensor(v).double().cpu().numpy() for k, v in values.items()})

    def iteration_completed(self, engine: Engine) -> None:
        output, batch = engine.state.output, engine.state.batch
        if isinstance(output, list) or isinstance(batch, list):
            raise TypeError(f"{type(self).__name__} needs whole batches: build the evaluator with decollate=False")
        self.update((output[self.pred_key], batch))

    def compute(self) -> float:
        if not self._columns:
            raise RuntimeError(f"{type(self).__name__} saw no batch")
        parts = [part for rank in all_gather_objects(self._columns) for part in rank]  # every rank's, in rank order
        columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        summary = self.task_metric.aggregate(columns, {})
        if self.value not in summary:
            raise KeyError(f"{type(self.task_metric).__name__} reports no {self.value!r} (it has {sorted(summary)})")
        return float(summary[self.value])
