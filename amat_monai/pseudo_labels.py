"""Pseudo-labels: a network's own clean prediction turned into a training target, with a confidence per sample.

Semi-supervised adversarial training (:class:`amat_monai.handlers.SemiSupervisedAdversarialHandler`) attacks an
unlabelled image against what the model predicts on it, and trains the model to predict the same on the attacked
image. A pseudo-labeller maps the prediction ``[B, C, ...]`` to ``(target, confidence)``: a target in the format the
bundle's loss takes as its label, and a confidence ``[B]`` in [0, 1] by which low-confidence samples can be left
out.

* :class:`ArgmaxPseudoLabel` (segmentation): the argmax map ``[B, 1, H, W]``; confidence, the mean over pixels
  (all of them, or those predicted as foreground) of the highest class probability.
* :class:`LandmarkPseudoLabel` (heatmap + offset landmarks): the decoded landmarks, encoded again as heatmap and
  offset targets ``[B, 3K, H, W]`` (:func:`amat_monai.landmarks.landmark_targets`); confidence, the mean over
  landmarks of the heatmap's peak probability.
* :class:`DetectionPseudoLabel` (RetinaNet boxes): the detections above a score threshold as padded ground truth
  ``[B, M, 5]`` (:func:`amat_monai.object_detection.pad_boxes`); confidence, their mean score (0 without one).
"""

from __future__ import annotations

import torch

from amat_monai.landmarks import decode_landmarks, landmark_targets, split_channels

__all__ = ["ArgmaxPseudoLabel", "LandmarkPseudoLabel", "DetectionPseudoLabel"]


class ArgmaxPseudoLabel:
    """Segmentation pseudo-labels: the argmax over classes of the logits ``[B, C, H, W]`` -> ``[B, 1, H, W]``.

    Args:
        confidence_over: ``"all"``: the confidence is the mean highest class probability over every pixel;
            ``"foreground"``: over the pixels predicted as foreground (class > 0) only, and 0 for a slice predicted
            as background alone. With a confidence threshold this keeps the unlabelled slices that show the
            structures (most slices of a scan show none, and a label-free pool cannot pick them out otherwise).
    """

    def __init__(self, confidence_over: str = "all") -> None:
        if confidence_over not in ("all", "foreground"):
            raise ValueError(f"confidence_over must be 'all' or 'foreground', got {confidence_over!r}")
        self.confidence_over = confidence_over

    @property
    def settings(self) -> dict:
        """What makes two labellers label alike (recorded in an SSAT run's identity)."""
        return {"confidence_over": self.confidence_over}

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pred.dim() < 3:
            raise ValueError(f"segmentation logits must be [B, C, ...], got {tuple(pred.shape)}")
        prob = torch.softmax(pred.float(), dim=1)
        top, label = prob.max(dim=1, keepdim=True)
        if self.confidence_over == "all":
            return label.long(), top.flatten(1).mean(dim=1)
        foreground = (label > 0).flatten(1).float()
        confidence = (top.flatten(1) * foreground).sum(dim=1) / foreground.sum(dim=1).clamp(min=1.0)
        return label.long(), confidence


class LandmarkPseudoLabel:
    """Landmark pseudo-labels: decode ``[B, 3K, H, W]`` maps, then encode the landmarks as targets again.

    Args:
        radius: the disc radius of the bundle's targets (and of its decoder).
    """

    def __init__(self, radius: float) -> None:
        if radius <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        self.radius = float(radius)

    @property
    def settings(self) -> dict:
        """What makes two labellers label alike (recorded in an SSAT run's identity)."""
        return {"radius": self.radius}

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        points = decode_landmarks(pred, self.radius)  # [B, K, 2] on the network grid
        size = pred.shape[-2:]
        target = torch.stack([landmark_targets(p.cpu(), size, self.radius) for p in points]).to(pred.device)
        heat = torch.sigmoid(split_channels(pred.float())[0])
        return target.to(pred.dtype), heat.flatten(2).amax(dim=2).mean(dim=1)


class DetectionPseudoLabel:
    """Detection pseudo-labels: the boxes the detector finds with a score of at least ``score_threshold``.

    Args:
        detector: the bundle's :class:`~amat_monai.object_detection.PerSampleRetinaNetDetector` (its ``detect``
            decodes the head output of the forward pass just made).
        score_threshold: lowest score of a box kept as a pseudo-label.
        max_boxes: rows of the padded target (the bundle's ``max_boxes``).
    """

    def __init__(self, detector, score_threshold: float = 0.5, max_boxes: int = 64) -> None:
        if not 0 <= score_threshold <= 1:
            raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
        self.detector = detector
        self.score_threshold = float(score_threshold)
        self.max_boxes = int(max_boxes)

    @property
    def settings(self) -> dict:
        """What makes two labellers label alike (recorded in an SSAT run's identity; the detector is the model)."""
        return {"score_threshold": self.score_threshold, "max_boxes": self.max_boxes}

    @torch.no_grad()
    def __call__(self, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from amat_monai.object_detection import pad_boxes  # monai.apps.detection is imported only when needed

        boxes, labels, confidence = [], [], []
        for found in self.detector.detect(pred):
            scores = found["labels_scores"]
            keep = torch.nonzero(scores >= self.score_threshold).flatten()
            keep = keep[torch.argsort(scores[keep], descending=True)][: self.max_boxes]
            boxes.append(found["boxes"][keep].float().cpu())
            labels.append(found["labels"][keep].cpu())
            confidence.append(float(scores[keep].mean()) if keep.numel() else 0.0)
        return pad_boxes(boxes, labels, self.max_boxes).to(pred.device), torch.tensor(confidence)
