"""Landmark detection by heatmap + offset regression (Yao et al., MICCAI 2020; method doc §6).

For each of ``K`` landmarks the network predicts one heatmap channel and two offset channels, in this channel
order: ``[heatmap_1..K, offset_x_1..K, offset_y_1..K]`` (``3K`` channels). Inside a disc of radius ``R`` around
landmark ``l`` the targets are

* heatmap ``exp(-d² / 2R²)`` (``d`` the distance from the pixel to ``l``), 0 outside the disc;
* offsets ``(l - p) / R`` for pixel ``p`` (x and y separately), 0 outside the disc.

Decoding (:func:`decode_landmarks`): the ``⌊πR²⌋`` pixels of highest heatmap each vote at ``p + R·offset``; the
landmark is the weighted mean of the votes that fall in the most voted grid cell and its neighbours (sub-pixel).

Coordinates are ``(x, y)`` = (column, row) pairs. Images are resized with pixel centres aligned (MONAI / PyTorch
``align_corners=False`` convention), so a point maps between a grid of size ``(H0, W0)`` and one of size
``(H1, W1)`` as ``x1 = (x0 + 0.5)·W1/W0 − 0.5`` (and likewise for ``y``). The stored (quarter-size) images of the
ISBI 2015 data set sit between the original grid and the network grid; mapping original ↔ network directly is the
same affine map as going through the stored grid, so only the original and network sizes matter.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_tensor

from amat_monai.metrics import TaskMetricValue
from amat_monai.transforms import SaveResultd

__all__ = [
    "map_coordinates",
    "landmark_targets",
    "split_channels",
    "decode_landmarks",
    "LandmarkDecoder",
    "LandmarkGridError",
    "LandmarkErrorMetric",
    "LandmarkTargetsd",
    "DecodeLandmarksd",
    "SaveLandmarksd",
    "landmark_mask",
    "ISBI2015_LANDMARKS",
]


def _size_pair(size: Sequence[int] | torch.Tensor, name: str) -> tuple[float, float]:
    values = [float(v) for v in torch.as_tensor(size).reshape(-1).tolist()]
    if len(values) != 2 or min(values) <= 0:
        raise ValueError(f"{name} must be (H, W) with positive entries, got {size!r}")
    return values[0], values[1]


def map_coordinates(
    points: torch.Tensor | np.ndarray, from_size: Sequence[int], to_size: Sequence[int]
) -> torch.Tensor | np.ndarray:
    """Map ``(x, y)`` points ``[..., 2]`` from a grid of size ``from_size = (H, W)`` to one of size ``to_size``.

    Pixel centres are aligned: ``x' = (x + 0.5)·W'/W − 0.5``. Works on numpy arrays and tensors alike.
    """
    h0, w0 = _size_pair(from_size, "from_size")
    h1, w1 = _size_pair(to_size, "to_size")
    if points.shape[-1] != 2:
        raise ValueError(f"points must have shape [..., 2] (x, y), got {tuple(points.shape)}")
    scale = np.array([w1 / w0, h1 / h0], dtype=np.float64)
    if isinstance(points, torch.Tensor):
        s = torch.as_tensor(scale, dtype=points.dtype if points.is_floating_point() else torch.float64)
        return (points + 0.5) * s.to(points.device) - 0.5
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


def landmark_targets(landmarks: torch.Tensor | np.ndarray, spatial_size: Sequence[int], radius: float) -> torch.Tensor:
    """Heatmap and offset targets ``[3K, H, W]`` for landmarks ``[K, 2]`` given in the target grid's pixels.

    A landmark outside the grid simply produces (part of) a disc that is clipped, or nothing.
    """
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    pts = torch.as_tensor(np.asarray(landmarks, dtype=np.float32))
    if pts.dim() != 2 or pts.shape[1] != 2:
        raise ValueError(f"landmarks must have shape [K, 2] (x, y), got {tuple(pts.shape)}")
    h, w = (int(v) for v in spatial_size)
    ys = torch.arange(h, dtype=torch.float32).view(1, h, 1)
    xs = torch.arange(w, dtype=torch.float32).view(1, 1, w)
    dx = pts[:, 0].view(-1, 1, 1) - xs  # landmark - pixel
    dy = pts[:, 1].view(-1, 1, 1) - ys
    d2 = dx**2 + dy**2
    inside = (d2 <= radius**2).float()
    heat = torch.exp(-d2 / (2 * radius**2)) * inside
    return torch.cat([heat, dx / radius * inside, dy / radius * inside], dim=0)


def split_channels(pred: torch.Tensor, num_landmarks: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(heatmaps, offset_x, offset_y)``, each ``[B, K, H, W]``, from a ``[B, 3K, H, W]`` map."""
    channels = pred.shape[1]
    if channels % 3 or (num_landmarks is not None and channels != 3 * num_landmarks):
        expected = "a multiple of 3" if num_landmarks is None else str(3 * num_landmarks)
        raise ValueError(f"landmark maps need {expected} channels (heatmaps, offsets x, offsets y), got {channels}")
    k = channels // 3
    return pred[:, :k], pred[:, k : 2 * k], pred[:, 2 * k :]


@torch.no_grad()
def decode_landmarks(
    pred: torch.Tensor,
    radius: float,
    heatmap_activation: str | None = "sigmoid",
    num_votes: int | None = None,
    window: int = 1,
) -> torch.Tensor:
    """Landmark positions ``[B, K, 2]`` (x, y; sub-pixel, network-grid pixels) by heatmap voting with offsets.

    Args:
        pred: ``[B, 3K, H, W]`` maps (or ``[3K, H, W]``, giving ``[K, 2]``).
        radius: the disc radius ``R`` the targets were made with (offsets are in units of ``R``).
        heatmap_activation: ``"sigmoid"`` for logits, ``None`` for maps already in [0, 1] (e.g. the targets).
        num_votes: voters per landmark; default ``⌊πR²⌋``.
        window: votes within this many cells (Chebyshev distance) of the most voted cell are averaged.
    """
    single = pred.dim() == 3
    if single:
        pred = pred[None]
    if pred.dim() != 4:
        raise ValueError(f"pred must be [B, 3K, H, W], got {tuple(pred.shape)}")
    heat, off_x, off_y = split_channels(pred.float())
    if heatmap_activation == "sigmoid":
        heat = torch.sigmoid(heat)
    elif heatmap_activation is not None:
        raise ValueError(f"heatmap_activation must be 'sigmoid' or None, got {heatmap_activation!r}")
    b, k, h, w = heat.shape
    n = min(h * w, num_votes or max(1, int(math.pi * radius**2)))
    score, idx = heat.flatten(2).topk(n, dim=2)  # [B, K, n]
    py, px = (idx // w).float(), (idx % w).float()
    vx = px + radius * off_x.flatten(2).gather(2, idx)
    vy = py + radius * off_y.flatten(2).gather(2, idx)
    cx = vx.round().clamp(0, w - 1).long()
    cy = vy.round().clamp(0, h - 1).long()
    weight = score.clamp_min(1e-12)  # every voter counts, however faint
    hist = torch.zeros(b, k, h * w, dtype=weight.dtype, device=weight.device)
    hist.scatter_add_(2, cy * w + cx, weight)
    best = hist.argmax(dim=2, keepdim=True)  # [B, K, 1]
    by, bx = best // w, best % w
    near = ((cx - bx).abs() <= window) & ((cy - by).abs() <= window)
    wn = weight * near
    total = wn.sum(dim=2).clamp_min(1e-12)
    out = torch.stack([(wn * vx).sum(dim=2) / total, (wn * vy).sum(dim=2) / total], dim=-1)
    return out[0] if single else out


def _original_sizes(batch: Mapping[str, Any], key: str, n: int, default: Sequence[int] | None) -> torch.Tensor:
    """``[B, 2]`` original (H, W) sizes from a collated batch (or one default size for all)."""
    if key in batch:
        sizes = torch.as_tensor(np.asarray(batch[key]) if not isinstance(batch[key], torch.Tensor) else batch[key])
    elif default is not None:
        sizes = torch.as_tensor(default)
    else:
        raise KeyError(f"batch has no original image size under {key!r} (keys: {sorted(batch)})")
    sizes = sizes.double().reshape(-1, 2)
    return sizes.expand(n, 2) if sizes.shape[0] == 1 else sizes


class LandmarkDecoder:
    """``decoder(pred, batch) -> [B, K, 2]`` landmark coordinates (x, y) in ORIGINAL pixel units.

    The decode function of :class:`amat_monai.metrics.LandmarkMetric`: heatmap voting on the network grid
    (:func:`decode_landmarks`), then each sample's coordinates mapped to its original grid, read from the
    batch under ``original_size_key`` (or ``original_size`` when the batch has none).

    Args:
        radius: the targets' disc radius (network-grid pixels).
        original_size_key: batch key of the per-sample original size ``(H, W)``.
        original_size: fallback original size.
        heatmap_activation: see :func:`decode_landmarks`.
    """

    def __init__(
        self,
        radius: float = 10.0,
        original_size_key: str = "original_size",
        original_size: Sequence[int] | None = None,
        heatmap_activation: str | None = "sigmoid",
    ) -> None:
        self.radius = float(radius)
        self.original_size_key = original_size_key
        self.original_size = original_size
        self.heatmap_activation = heatmap_activation

    def __call__(self, pred: torch.Tensor, batch: Mapping[str, Any] | None = None) -> torch.Tensor:
        pred = convert_to_tensor(pred, track_meta=False)
        pts = decode_landmarks(pred.detach(), self.radius, self.heatmap_activation).double().cpu()
        grid = torch.tensor(pred.shape[-2:], dtype=torch.float64)
        sizes = _original_sizes(batch or {}, self.original_size_key, pts.shape[0], self.original_size)
        scale = (sizes / grid).flip(-1)  # (W0/W, H0/H) per sample: x first
        return (pts + 0.5) * scale[:, None, :] - 0.5


class LandmarkGridError:
    """Per-image mean radial error on the network grid, in grid pixels: ``score(pred, target) -> [B]``.

    The score function of AMAT's ``"metric"`` expand condition for landmarks (:mod:`amat_monai.conditions`):
    the true landmarks are decoded from the heatmap + offset targets themselves, so the trainer's batch is
    enough (no original sizes or spacings needed).

    Args:
        radius: the targets' disc radius ``R`` (network-grid pixels).
    """

    name = "radial_error_px"
    higher_is_better = False

    def __init__(self, radius: float = 10.0) -> None:
        self.radius = float(radius)

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = convert_to_tensor(pred, track_meta=False)
        target = convert_to_tensor(target, track_meta=False)
        found = decode_landmarks(pred.detach(), self.radius)
        true = decode_landmarks(target.to(pred.device), self.radius, heatmap_activation=None)
        return (found - true).norm(dim=-1).mean(dim=-1)


class LandmarkErrorMetric(TaskMetricValue):
    """Ignite metric: the mean of a :class:`~amat_monai.metrics.LandmarkMetric` value (``"mre"``, ``"sdr_2"``...)
    over the data set (:class:`~amat_monai.metrics.TaskMetricValue`; evaluators with ``decollate=False``)."""

    def __init__(self, task_metric: Any, value: str = "mre", pred_key: str = "pred") -> None:
        super().__init__(task_metric, value, pred_key)


class LandmarkTargetsd(MapTransform):
    """Dictionary transform: ``label`` = heatmap/offset targets ``[3K, H, W]`` from landmarks in original pixels.

    Args:
        keys: the key holding landmarks ``[K, 2]`` (x, y) in ORIGINAL pixel units.
        image_key: the (already resized) image ``[C, H, W]``: its size is the target grid.
        original_size_key: key of the original grid size ``(H, W)`` the landmarks refer to.
        label_key: where the targets go.
        radius: disc radius ``R`` in target-grid pixels.
    """

    def __init__(
        self,
        keys: KeysCollection = "landmarks",
        image_key: str = "image",
        original_size_key: str = "original_size",
        label_key: str = "label",
        radius: float = 10.0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.original_size_key = original_size_key
        self.label_key = label_key
        self.radius = float(radius)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            grid = tuple(d[self.image_key].shape[-2:])
            if self.original_size_key not in d:
                raise KeyError(f"LandmarkTargetsd needs the original grid size under {self.original_size_key!r}")
            pts = map_coordinates(np.asarray(d[key], dtype=np.float64), d[self.original_size_key], grid)
            d[self.label_key] = landmark_targets(pts, grid, self.radius)
        return d


#: The 19 landmarks of the ISBI 2015 challenge, in the order of the annotation files.
ISBI2015_LANDMARKS = (
    "sella", "nasion", "orbitale", "porion", "subspinale", "supramentale", "pogonion", "menton", "gnathion",
    "gonion", "lower incisal incision", "upper incisal incision", "upper lip", "lower lip", "subnasale",
    "soft tissue pogonion", "posterior nasal spine", "anterior nasal spine", "articulare",
)


def landmark_mask(points: torch.Tensor, spatial_size: Sequence[int], radius: float) -> torch.Tensor:
    """``[1, H, W]`` label map with a disc of ``radius`` pixels around each point, valued ``k + 1`` for point ``k``."""
    h, w = (int(v) for v in spatial_size)
    ys = torch.arange(h, dtype=torch.float64).view(h, 1)
    xs = torch.arange(w, dtype=torch.float64).view(1, w)
    mask = torch.zeros(h, w, dtype=torch.uint8)
    for k, (x, y) in enumerate(torch.as_tensor(points, dtype=torch.float64).tolist()):
        mask[(xs - x) ** 2 + (ys - y) ** 2 <= radius**2] = k + 1
    return mask[None]


class DecodeLandmarksd(MapTransform):
    """Dictionary transform for inference (and MONAI Label): decode ``[3K, H, W]`` maps into coordinates.

    Writes ``landmarks`` (``[K, 2]``, x/y in original pixels), ``landmarks_mm`` (the same times the spacing) and
    ``result``, a JSON-ready dict ``{"landmarks": [{"id", "name", "x", "y", "x_mm", "y_mm"}, ...], ...}`` that
    MONAI Label returns as the inference result. With ``mask_radius`` the maps under ``keys`` are replaced by a
    ``[1, H, W]`` label map with a small disc per landmark (value ``k + 1``), which viewers can display.

    The original grid is, in this order: the item's ``original_size_key`` entry, ``original_size``, or the size
    of the image as loaded (``image_key``'s ``spatial_shape`` metadata, which MONAI's readers give x first).

    Args:
        keys: the maps to decode (``pred``).
        radius: the targets' disc radius (network-grid pixels).
        original_size: original grid ``(H, W)`` the coordinates are reported on (ISBI 2015: 2400×1935).
        spacing: mm per original pixel, used when the item has no ``spacing_key`` entry.
        names: landmark names for the result.
        mask_radius: replace the maps by a landmark label map with discs of this radius; ``None`` keeps them.
        heatmap_activation: see :func:`decode_landmarks`.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        radius: float = 10.0,
        original_size: Sequence[int] | None = None,
        spacing: float = 0.1,
        names: Sequence[str] | None = None,
        mask_radius: float | None = None,
        heatmap_activation: str | None = "sigmoid",
        image_key: str = "image",
        original_size_key: str = "original_size",
        spacing_key: str = "spacing",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.radius = float(radius)
        self.original_size = original_size
        self.spacing = float(spacing)
        self.names = list(names) if names else None
        self.mask_radius = mask_radius
        self.heatmap_activation = heatmap_activation
        self.image_key = image_key
        self.original_size_key = original_size_key
        self.spacing_key = spacing_key

    def _original(self, d: Mapping, grid: tuple[int, int]) -> Sequence[int]:
        if self.original_size_key in d:
            return d[self.original_size_key]
        if self.original_size is not None:
            return self.original_size
        meta = getattr(d.get(self.image_key), "meta", None) or {}
        shape = meta.get("spatial_shape")
        if shape is None:
            return grid
        # MONAI's readers report the loaded size x first (PIL: width, height); our grids are (H, W)
        return [int(v) for v in np.asarray(shape).reshape(-1)[:2][::-1]]

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            maps = d[key]
            maps = convert_to_tensor(maps, track_meta=False)
            grid = tuple(int(v) for v in maps.shape[-2:])
            pts = decode_landmarks(maps.detach().cpu(), self.radius, self.heatmap_activation).double()
            original = self._original(d, grid)
            coords = map_coordinates(pts, grid, original)
            spacing = float(np.asarray(d.get(self.spacing_key, self.spacing), dtype=np.float64).reshape(-1)[0])
            names = self.names or [f"landmark {i + 1}" for i in range(coords.shape[0])]
            if len(names) != coords.shape[0]:
                raise ValueError(f"got {len(names)} landmark names for {coords.shape[0]} landmarks")
            d["landmarks"] = coords
            d["landmarks_mm"] = coords * spacing
            d["result"] = {
                "landmarks": [
                    {"id": i + 1, "name": names[i], "x": x, "y": y, "x_mm": x * spacing, "y_mm": y * spacing}
                    for i, (x, y) in enumerate(coords.tolist())
                ],
                "unit": "pixels of the original grid (x right, y down) and mm",
                "original_size": [int(v) for v in torch.as_tensor(original).reshape(-1).tolist()],
                "spacing_mm": spacing,
            }
            if self.mask_radius is not None:
                mask = landmark_mask(pts, grid, self.mask_radius)
                meta = getattr(d[key], "meta", None)
                d[key] = MetaTensor(mask, meta=dict(meta)) if meta is not None else mask
        return d


class SaveLandmarksd(SaveResultd):
    """Write each item's ``result`` (from :class:`DecodeLandmarksd`) to ``<output_dir>/<name>_landmarks.json``,
    atomically; ``<name>`` is the image file's stem."""

    def __init__(self, keys: KeysCollection = "result", output_dir: str = "./eval", image_key: str = "image",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, output_dir, "_landmarks", image_key, allow_missing_keys)
