"""A 2D RetinaNet on MONAI's detection stack, shaped for the project's ``(x, y)`` attack and training API.

MONAI's :class:`~monai.apps.detection.networks.retinanet_detector.RetinaNetDetector` returns a dict of batch losses
in train mode and a list of box dicts in eval mode, and needs torchvision for its default matcher and samplers.
The robust-training handlers, the attacks and ξ calibration need instead a network whose forward returns one
tensor and a loss that returns deterministic per-sample terms ``[B, K]``. :class:`PerSampleRetinaNetDetector` is
that subclass:

* ``forward(x)`` returns the raw head outputs, ``[B, num_classes + 4, A]`` (channels: classification logits, then
  box regression; one column per anchor), in train and eval mode alike; :meth:`~PerSampleRetinaNetDetector.detect` turns them
  into boxes (MONAI's box selector: score threshold, top-k, NMS).
* :meth:`~PerSampleRetinaNetDetector.loss_terms` gives per image ``[box regression, classification foreground,
  classification background]``: the RetinaNet loss (smooth-L1 on the encoded offsets of the anchors ATSS matched,
  sigmoid focal loss over all anchors, both normalised by the number of matched anchors), split so that the two
  halves of the focal loss are separate terms. No anchor is sampled at random, so the loss is a deterministic
  function of the input, as the attacks, the margin condition and ξ calibration require.
* Anchor matching uses MONAI's :class:`~monai.apps.detection.utils.ATSS_matcher.ATSSMatcher` only (the stock
  method tests the matcher against torchvision's class, which is not installed beside the CPU torch).

Ground-truth boxes travel as one padded tensor ``[B, M, 5]`` (``x1, y1, x2, y2, label``; rows with label ``-1`` are
padding), see :func:`pad_boxes`, so a batch is ``(image, boxes)`` like any other task's ``(image, label)``. Boxes
follow MONAI's convention: coordinate ``k`` runs along spatial dimension ``k`` of the image tensor. MONAI's default
``PILReader`` loads an image as ``[C, W, H]``, so Pascal VOC's ``(x, y)`` boxes fit it as they are.
:class:`ResNetFPN` is the feature extractor, built from MONAI's ``ResNet`` and ``FeaturePyramidNetwork`` (MONAI's
``resnet_fpn_feature_extractor`` needs torchvision).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.apps.detection.utils.ATSS_matcher import ATSSMatcher
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets.resnet import ResNet
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor
from torch import Tensor, nn

__all__ = ["ResNetFPN", "PerSampleRetinaNetDetector", "DetectionLoss", "pad_boxes", "unpad_boxes", "build_retinanet",
           "DETECTION_TERMS", "PadBoxesd", "detections_json", "DetectBoxesd"]

#: names of the per-sample loss terms, in column order
DETECTION_TERMS = ("box_regression", "cls_foreground", "cls_background")


def pad_boxes(boxes: Sequence[Tensor], labels: Sequence[Tensor], max_boxes: int | None = None) -> Tensor:
    """``[B, M, 5]``: each image's ``x1, y1, x2, y2, label`` rows, padded with label ``-1`` to ``M`` rows."""
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} box tensors for {len(labels)} label tensors")
    m = max([int(b.shape[0]) for b in boxes] + [0]) if max_boxes is None else int(max_boxes)
    out = torch.zeros(len(boxes), m, 5)
    out[..., 4] = -1
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        b, lab = torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4), torch.as_tensor(lab).reshape(-1)
        if b.shape[0] > m:
            raise ValueError(f"image {i} has {b.shape[0]} boxes, more than max_boxes={m}")
        out[i, : b.shape[0], :4] = b
        out[i, : b.shape[0], 4] = lab.float()
    return out


def unpad_boxes(padded: Tensor) -> list[tuple[Tensor, Tensor]]:
    """The inverse of :func:`pad_boxes`: ``(boxes [N, 4], labels [N] int64)`` per image."""
    padded = convert_to_tensor(padded, track_meta=False)
    keep = padded[..., 4] >= 0
    return [(p[k, :4], p[k, 4].long()) for p, k in zip(padded, keep)]


class ResNetFPN(nn.Module):
    """MONAI ``ResNet`` stages feeding a ``FeaturePyramidNetwork`` (plus a max-pooled top level).

    Args:
        in_channels: image channels.
        widths: the four ResNet stages' channels.
        layers: basic blocks per stage.
        returned_layers: stages (1–4) whose outputs feed the pyramid; stage ``k`` has stride ``2 ** (k + 1)``.
        fpn_channels: channels of every pyramid level (``out_channels``, as :class:`RetinaNet` reads it).
        spatial_dims: 2 (the only case tested here).

    The pyramid has ``len(returned_layers) + 1`` levels; the anchor generator's ``feature_map_scales`` must have as
    many entries.
    """

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128),
                 layers: Sequence[int] = (1, 1, 1, 1), returned_layers: Sequence[int] = (1, 2, 3),
                 fpn_channels: int = 32, spatial_dims: int = 2) -> None:
        super().__init__()
        if not returned_layers or any(k not in (1, 2, 3, 4) for k in returned_layers):
            raise ValueError(f"returned_layers must be among 1..4, got {list(returned_layers)}")
        self.backbone = ResNet("basic", list(layers), list(widths), spatial_dims=spatial_dims,
                               n_input_channels=in_channels, conv1_t_size=7, conv1_t_stride=2, feed_forward=False)
        self.returned_layers = sorted(int(k) for k in returned_layers)
        # MONAI's ResNet always builds four stages; those above the last returned one feed nothing, and unused
        # parameters would stop DistributedDataParallel. Checkpoints saved with them still load (their keys are
        # dropped on load).
        self.trimmed = [f"layer{k}" for k in range(self.returned_layers[-1] + 1, 5)]
        for name in self.trimmed:
            setattr(self.backbone, name, nn.Identity())
        self._register_load_state_dict_pre_hook(self.drop_trimmed_keys)
        self.fpn = FeaturePyramidNetwork(spatial_dims, [int(widths[k - 1]) for k in self.returned_layers],
                                         int(fpn_channels), extra_blocks=LastLevelMaxPool(spatial_dims))
        self.out_channels = int(fpn_channels)

    def drop_trimmed_keys(self, state_dict, prefix: str = "", *args) -> None:
        """Remove the keys of the dropped stages from ``state_dict`` (in place; also run on every load)."""
        for key in [k for k in state_dict if any(k.startswith(f"{prefix}backbone.{n}.") for n in self.trimmed)]:
            del state_dict[key]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        b = self.backbone
        x = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        features: OrderedDict[str, Tensor] = OrderedDict()
        for k, stage in enumerate((b.layer1, b.layer2, b.layer3, b.layer4), start=1):
            if k > self.returned_layers[-1]:
                break
            x = stage(x)
            if k in self.returned_layers:
                features[str(k)] = x
        return self.fpn(features)


def _focal(logits: Tensor, target: Tensor, alpha: float, gamma: float) -> Tensor:
    """Elementwise sigmoid focal loss (Lin et al. 2017)."""
    p = torch.sigmoid(logits)
    ce = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return alpha_t * (1 - p_t) ** gamma * ce


class PerSampleRetinaNetDetector(RetinaNetDetector):
    """RetinaNet whose forward returns the head outputs and whose loss is per sample and per term (module doc).

    Args:
        network: a MONAI :class:`RetinaNet` (``use_list_output=False``).
        anchor_generator: e.g. :class:`AnchorGeneratorWithAnchorShape`.
        num_candidates: ATSS candidates per level.
        focal_alpha, focal_gamma: the focal loss's.
        smooth_l1_beta: the box regression loss's transition point (on encoded offsets).
        score_thresh, topk_candidates_per_level, nms_thresh, detections_per_img: the box selector's (inference).
        kwargs: other :class:`RetinaNetDetector` arguments (``size_divisible``...).
    """

    def __init__(self, network: RetinaNet, anchor_generator: AnchorGeneratorWithAnchorShape, num_candidates: int = 4,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, smooth_l1_beta: float = 1.0 / 9.0,
                 score_thresh: float = 0.05, topk_candidates_per_level: int = 1000, nms_thresh: float = 0.5,
                 detections_per_img: int = 100, **kwargs) -> None:
        super().__init__(network, anchor_generator, spatial_dims=2, **kwargs)
        self.proposal_matcher = ATSSMatcher(num_candidates, center_in_gt=False)
        self.set_box_coder_weights((1.0, 1.0, 1.0, 1.0))
        self.set_box_selector_parameters(score_thresh=score_thresh, topk_candidates_per_level=topk_candidates_per_level,
                                         nms_thresh=nms_thresh, detections_per_img=detections_per_img)
        self.focal_alpha, self.focal_gamma, self.smooth_l1_beta = float(focal_alpha), float(focal_gamma), float(smooth_l1_beta)
        self._levels: list[int] | None = None
        self._image_sizes: list[list[int]] | None = None

    # ------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:  # type: ignore[override]
        """Head outputs ``[B, num_classes + 4, A]`` of a ``[B, C, H, W]`` batch; anchors kept for the loss."""
        images = convert_to_tensor(images, track_meta=False)
        if images.ndim != 4:
            raise ValueError(f"the detector takes [B, C, H, W] images, got shape {tuple(images.shape)}")
        self._image_sizes = [list(images.shape[-2:])] * images.shape[0]
        head = self.network(images)
        self.generate_anchors(images, head)
        self._levels = [int(m.shape[2:].numel()) for m in head[self.cls_key]]
        maps = torch.cat([self._reshape_maps(head[self.cls_key]), self._reshape_maps(head[self.box_reg_key])], dim=2)
        return maps.transpose(1, 2)  # channels first, as MONAI's bundle tools read outputs

    def _split(self, pred: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, C + 4, A]`` -> classification logits ``[B, A, C]`` and box regression ``[B, A, 4]``."""
        pred = convert_to_tensor(pred, track_meta=False).transpose(1, 2)
        if self.anchors is None or self._levels is None or pred.shape[1] != self.anchors[0].shape[0]:
            raise RuntimeError("head outputs do not match the anchors of the detector's last forward pass; "
                               "call the detector on the images first")
        return pred[..., : self.num_classes], pred[..., self.num_classes:]

    @torch.no_grad()
    def detect(self, pred: Tensor) -> list[dict[str, Tensor]]:
        """Boxes, labels and scores per image from :meth:`forward`'s output (MONAI's box selector)."""
        logits, regression = self._split(pred.detach())
        anchors = [self.anchors[0]] * pred.shape[0]  # one image size per batch
        return self.postprocess_detections({self.cls_key: logits, self.box_reg_key: regression}, anchors,
                                           self._image_sizes[:1] * pred.shape[0], self._levels)

    # ------------------------------------------------------------------ loss
    def compute_anchor_matched_idxs(self, anchors, targets, num_anchor_locs_per_level):  # type: ignore[override]
        """ATSS matching (MONAI's matcher; no torchvision type check): the matched GT index per anchor, or -1."""
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            boxes = target[self.target_box_key].to(anchors_per_image.device)
            if boxes.numel() == 0:
                matched.append(torch.full((anchors_per_image.shape[0],), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
                continue
            _, idx = self.proposal_matcher(boxes, anchors_per_image, num_anchor_locs_per_level,
                                           self.num_anchors_per_loc)
            matched.append(idx)
        return matched

    def loss_terms(self, pred: Tensor, targets: Tensor) -> Tensor:
        """``[B, 3]``: box regression, classification foreground, classification background, per image.

        Args:
            pred: :meth:`forward`'s output for the batch.
            targets: padded ground truth ``[B, M, 5]`` (:func:`pad_boxes`).
        """
        logits, regression = self._split(pred)
        gts = unpad_boxes(targets)
        if len(gts) != pred.shape[0]:
            raise ValueError(f"{len(gts)} target rows for a batch of {pred.shape[0]}")
        anchors = self.anchors[0]
        dicts = [{self.target_box_key: b.to(pred.device), self.target_label_key: lab.to(pred.device)} for b, lab in gts]
        matched = self.compute_anchor_matched_idxs([anchors] * len(gts), dicts, self._levels)
        rows = []
        for i, (target, idx) in enumerate(zip(dicts, matched)):
            fg = idx >= 0
            n_fg = max(int(fg.sum()), 1)
            cls_target = torch.zeros_like(logits[i])
            if fg.any():
                cls_target[fg, target[self.target_label_key][idx[fg]]] = 1.0
            focal = _focal(logits[i], cls_target, self.focal_alpha, self.focal_gamma).sum(dim=1)
            valid = idx != self.proposal_matcher.BETWEEN_THRESHOLDS
            cls_fg = focal[fg].sum() / n_fg
            cls_bg = focal[valid & ~fg].sum() / n_fg
            if fg.any():
                encoded = self.box_coder.encode_single(target[self.target_box_key][idx[fg]], anchors[fg])
                box = nn.functional.smooth_l1_loss(regression[i][fg], encoded.to(regression.dtype),
                                                   beta=self.smooth_l1_beta, reduction="sum") / n_fg
            else:
                box = regression[i].sum() * 0.0
            rows.append(torch.stack([box, cls_fg, cls_bg]))
        return torch.stack(rows)


class DetectionLoss(nn.Module):
    """``loss(pred, targets)`` -> ``[B, 3]``: the per-sample terms of ``detector`` (the bundles' ``loss_terms``)."""

    term_names = DETECTION_TERMS

    def __init__(self, detector: PerSampleRetinaNetDetector) -> None:
        super().__init__()
        self.detector = [detector]  # a list: not a submodule, so the loss owns no parameters

    def forward(self, pred: Tensor, targets: Tensor) -> Tensor:
        return self.detector[0].loss_terms(pred, targets)


def build_retinanet(num_classes: int = 3, in_channels: int = 3, widths: Sequence[int] = (16, 32, 64, 128),
                    layers: Sequence[int] = (1, 1, 1, 1), returned_layers: Sequence[int] = (1, 2, 3),
                    fpn_channels: int = 32, base_anchor_shapes: Sequence[Sequence[int]] = ((12, 12), (8, 16), (16, 8)),
                    **detector_kwargs) -> PerSampleRetinaNetDetector:
    """A :class:`PerSampleRetinaNetDetector` on :class:`ResNetFPN`.

    The pyramid's levels have strides ``2 ** (k + 1)`` for the returned stages ``k`` and twice the last one for the
    max-pooled top level; ``base_anchor_shapes`` (width, height pairs) are the anchors of the first level, doubled
    at each level above it.
    """
    extractor = ResNetFPN(in_channels, widths, layers, returned_layers, fpn_channels)
    levels = len(extractor.returned_layers) + 1
    anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=[2**i for i in range(levels)],
                                             base_anchor_shapes=[list(s) for s in base_anchor_shapes])
    network = RetinaNet(2, num_classes, anchors.num_anchors_per_location()[0], extractor,
                        size_divisible=2 ** (extractor.returned_layers[-1] + 2))
    return PerSampleRetinaNetDetector(network, anchors, size_divisible=network.size_divisible, **detector_kwargs)


class PadBoxesd(MapTransform):
    """Dictionary transform: ``output_key`` = one image's ground truth as ``[max_boxes, 5]`` rows (:func:`pad_boxes`).

    A fixed row count lets the default collate stack a batch into the ``[B, M, 5]`` label the detection loss takes.

    Args:
        keys: the boxes ``[N, 4]`` and labels ``[N]`` keys, in this order.
        output_key: where the padded rows go (the bundles' ``label``).
        max_boxes: rows per image; an image with more boxes is an error naming it (``id_key``).
    """

    def __init__(self, keys: KeysCollection = ("boxes", "labels"), output_key: str = "label", max_boxes: int = 64,
                 id_key: str = "sample_id") -> None:
        super().__init__(keys)
        if len(self.keys) != 2:
            raise ValueError(f"PadBoxesd takes two keys (boxes, labels), got {list(self.keys)}")
        self.output_key, self.max_boxes, self.id_key = output_key, int(max_boxes), id_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        boxes = torch.as_tensor(np.asarray(d[self.keys[0]], dtype=np.float32)).reshape(-1, 4)
        labels = torch.as_tensor(np.asarray(d[self.keys[1]], dtype=np.int64)).reshape(-1)
        if boxes.shape[0] > self.max_boxes:
            raise ValueError(f"image {d.get(self.id_key, '?')!r} has {boxes.shape[0]} boxes, more than "
                             f"max_boxes={self.max_boxes} (raise max_boxes in the bundle config)")
        d[self.output_key] = pad_boxes([boxes], [labels], self.max_boxes)[0]
        return d


def detections_json(detection: Mapping[str, Tensor], classes: Sequence[str], zoom: Sequence[float] = (1.0, 1.0),
                    digits: int = 1) -> dict[str, Any]:
    """One image's detections (:meth:`PerSampleRetinaNetDetector.detect`) as JSON, in ORIGINAL pixels.

    ``zoom``: the preprocessing's zoom per spatial dimension (x, y); box coordinates are divided by it. Returns
    ``{"boxes": [{"label", "name", "score", "x1", "y1", "x2", "y2"}, ...]}``, highest score first, with 0-based
    half-open pixel corners (the VOC reader's convention).
    """
    scale = torch.tensor([zoom[0], zoom[1], zoom[0], zoom[1]], dtype=torch.float64)
    boxes = detection["boxes"].detach().double().cpu() / scale
    scores = detection["labels_scores"].detach().double().cpu()
    labels = detection["labels"].detach().long().cpu()
    out = []
    for k in torch.argsort(scores, descending=True).tolist():
        label = int(labels[k])
        x1, y1, x2, y2 = (round(float(v), digits) for v in boxes[k])
        out.append({"label": label, "name": classes[label] if 0 <= label < len(classes) else str(label),
                    "score": round(float(scores[k]), 4), "x1": x1, "y1": y1, "x2": x2, "y2": y2})
    return {"boxes": out}


class DetectBoxesd(MapTransform):
    """Dictionary transform for inference: the head output under ``keys`` -> boxes in original pixels.

    Writes ``boxes`` ``[D, 4]``, ``labels`` ``[D]``, ``scores`` ``[D]`` (original pixels) and ``result``, the JSON
    of :func:`detections_json`. ``detector`` must be the network that produced the output (its last forward
    pass set the anchors); an output of one image ``[C + 4, A]`` (decollated) or a batch of one is accepted.

    Args:
        keys: the head output (``pred``).
        detector: the :class:`PerSampleRetinaNetDetector`.
        classes: class names, in label order.
        zoom: the preprocessing's zoom (x, y).
    """

    def __init__(self, keys: KeysCollection = "pred", detector: PerSampleRetinaNetDetector | None = None,
                 classes: Sequence[str] = (), zoom: Sequence[float] = (1.0, 1.0)) -> None:
        super().__init__(keys)
        if detector is None:
            raise ValueError("DetectBoxesd needs the detector network (detector=@network)")
        self.detector, self.classes, self.zoom = detector, list(classes), [float(z) for z in zoom]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = convert_to_tensor(d[key], track_meta=False)
            if pred.ndim == 2:
                pred = pred[None]
            if pred.shape[0] != 1:
                raise ValueError(f"DetectBoxesd decodes one image at a time, got a batch of {pred.shape[0]}")
            detection = self.detector.detect(pred)[0]
            d["result"] = detections_json(detection, self.classes, self.zoom)
            rows = d["result"]["boxes"]
            d["boxes"] = torch.tensor([[r["x1"], r["y1"], r["x2"], r["y2"]] for r in rows]).reshape(-1, 4)
            d["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.int64)
            d["scores"] = torch.tensor([r["score"] for r in rows])
        return d
