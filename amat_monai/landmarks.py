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

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = [
    "map_coordinates",
    "landmark_targets",
    "split_channels",
    "decode_landmarks",
    "radial_errors_mm",
    "landmark_summary",
    "LandmarkTargetsd",
    "DecodeLandmarksd",
    "SDR_RADII_MM",
]

#: Successful-detection radii (mm) of the ISBI 2015 challenge.
SDR_RADII_MM = (2.0, 2.5, 3.0, 4.0)


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


def radial_errors_mm(
    pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, spacing_mm: float | Sequence[float]
) -> torch.Tensor:
    """Euclidean distances ``[..., K]`` in mm between ``(x, y)`` points ``[..., K, 2]`` on the same grid."""
    p = torch.as_tensor(np.asarray(pred, dtype=np.float64)) if not isinstance(pred, torch.Tensor) else pred.double()
    t = torch.as_tensor(np.asarray(target, dtype=np.float64)) if not isinstance(target, torch.Tensor) else target.double()
    if p.shape != t.shape or p.shape[-1] != 2:
        raise ValueError(f"pred and target must both be [..., K, 2], got {tuple(p.shape)} and {tuple(t.shape)}")
    spacing = torch.as_tensor(spacing_mm, dtype=torch.float64).reshape(-1).to(p.device)
    return ((p - t.to(p.device)) * spacing).norm(dim=-1)


def landmark_summary(errors_mm: torch.Tensor, radii_mm: Sequence[float] = SDR_RADII_MM) -> dict[str, float]:
    """MRE (mean and std, mm) and successful detection rates (error ≤ r mm) from radial errors ``[N, K]``."""
    e = torch.as_tensor(errors_mm, dtype=torch.float64).flatten()
    if e.numel() == 0:
        raise ValueError("no radial errors to summarise")
    out = {"mre_mm": float(e.mean()), "sd_mm": float(e.std()) if e.numel() > 1 else 0.0}
    for r in radii_mm:
        out[f"sdr_{r:g}mm"] = float((e <= r).double().mean())
    return out


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


class DecodeLandmarksd(MapTransform):
    """Dictionary transform: decode ``[3K, H, W]`` maps into landmark coordinates (for inference / MONAI Label).

    Writes ``<key>_landmarks`` (``[K, 2]`` original pixels, x/y), ``<key>_landmarks_mm`` (the same in mm) and a
    JSON-ready ``result`` dict ``{"landmarks": [{"id", "x", "y", "x_mm", "y_mm"}, ...], "unit": ...}``.
    The original grid size comes from ``original_size_key`` (default: the network grid itself).

    Args:
        keys: the maps to decode (``pred``).
        radius: the targets' disc radius.
        original_size_key: key of the original size ``(H, W)``.
        spacing_key: key of the pixel spacing in mm (``default_spacing`` when absent).
        default_spacing: spacing used when the data carries none.
        heatmap_activation: see :func:`decode_landmarks`.
        names: optional landmark names for the result.
    """

    def __init__(
        self,
        keys: KeysCollection = "pred",
        radius: float = 10.0,
        original_size_key: str = "original_size",
        spacing_key: str = "spacing",
        default_spacing: float = 0.1,
        heatmap_activation: str | None = "sigmoid",
        names: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.radius = float(radius)
        self.original_size_key = original_size_key
        self.spacing_key = spacing_key
        self.default_spacing = float(default_spacing)
        self.heatmap_activation = heatmap_activation
        self.names = list(names) if names else None

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            maps = torch.as_tensor(d[key])
            grid = tuple(maps.shape[-2:])
            pts = decode_landmarks(maps.detach().cpu(), self.radius, self.heatmap_activation)
            original = d.get(self.original_size_key, grid)
            coords = map_coordinates(pts.double(), grid, original)
            spacing = float(torch.as_tensor(d.get(self.spacing_key, self.default_spacing)).reshape(-1)[0])
            d[f"{key}_landmarks"] = coords
            d[f"{key}_landmarks_mm"] = coords * spacing
            names = self.names or [str(i + 1) for i in range(coords.shape[0])]
            d["result"] = {
                "unit": "pixel (original grid) and mm",
                "spacing_mm": spacing,
                "landmarks": [
                    {"id": names[i], "x": float(x), "y": float(y), "x_mm": float(x) * spacing, "y_mm": float(y) * spacing}
                    for i, (x, y) in enumerate(coords.tolist())
                ],
            }
        return d
