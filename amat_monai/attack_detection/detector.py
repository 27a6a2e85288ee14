"""Detectors of attacked inputs, fitted on clean data only, and their files.

:class:`FeatureDensityDetector` hooks layers of the task network, summarises each layer's output per sample (the
mean and standard deviation of every channel over space), fits a Gaussian with Ledoit–Wolf shrinkage per layer on
clean training samples, and scores an input by its squared Mahalanobis distance per layer, z-scored with the clean
training scores and averaged over layers. No attack is seen while fitting.

:class:`SqueezeDisagreement` is the training-free baseline (feature squeezing, Xu et al. 2018): how much the
network's output probabilities change when the input is median-filtered.

The threshold of either is a quantile of its clean *validation* scores (:func:`threshold_at`), per sample and,
for slices of volumes, per volume (the maximum over a volume's slices).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.layers import median_filter
from monai.transforms import ResizeWithPadOrCrop
from monai.utils import convert_to_tensor
from torch import nn
from tqdm.auto import tqdm

from amat_monai.attack_detection.gaussian import ShrunkGaussian
from amat_monai.checkpoints import atomic_save_npz, atomic_write_text, file_sha256, read_json

logger = logging.getLogger(__name__)

__all__ = ["FeatureDensityDetector", "SqueezeDisagreement", "threshold_at", "per_volume_max", "detector_paths",
           "screen"]


def _plain(t: Any) -> torch.Tensor:
    return convert_to_tensor(t, track_meta=False)


def threshold_at(clean_scores: Sequence[float] | np.ndarray, false_positive_rate: float) -> float:
    """The lowest of ``clean_scores`` above which at most ``false_positive_rate`` of them lie (``score > t`` flags)."""
    scores = np.asarray(clean_scores, dtype=float)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        raise ValueError("no finite clean scores to set a threshold from")
    if not 0.0 < false_positive_rate < 1.0:
        raise ValueError(f"false_positive_rate must lie in (0, 1), got {false_positive_rate}")
    ordered = np.sort(scores)
    return float(ordered[ordered.size - 1 - int(np.floor(false_positive_rate * ordered.size + 1e-9))])


def per_volume_max(scores: Sequence[float], cases: Sequence[Any]) -> dict[Any, float]:
    """The maximum score over each case's slices (a volume is flagged when any of its slices is)."""
    out: dict[Any, float] = {}
    for s, c in zip(scores, cases):
        out[c] = max(out.get(c, -np.inf), float(s))
    return out


def detector_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """Where a checkpoint's detector lives, in the checkpoint's folder: ``detector.npz`` and ``detector.json`` for
    ``model.pt``, ``<name>.detector.npz`` and ``<name>.detector.json`` for ``<name>.pt`` (e.g. ``baselines/std.pt``)."""
    path = Path(checkpoint).resolve()
    prefix = "" if path.stem == "model" else f"{path.stem}."
    return path.parent / f"{prefix}detector.npz", path.parent / f"{prefix}detector.json"


class FeatureDensityDetector(nn.Module):
    """Gaussian density of a network's per-sample layer features, fitted on clean data.

    Args:
        network: the task network; forward hooks on ``layers`` record their outputs on every forward pass.
        layers: names of ``network.named_modules()`` whose outputs are summarised (e.g. DynUNet's
            ``bottleneck`` and ``upsamples.2``).
        statistics: per channel, ``"mean"`` and / or ``"std"`` over the spatial dimensions.

    Call :meth:`fit` (or :meth:`load`) before scoring. ``detector(x)`` runs the network and returns the score per
    sample (higher is more suspicious); :meth:`score_captured` scores the forward pass the network made last,
    which lets an attack add the detector to its loss without a second forward pass.
    """

    kind = "feature_density"

    def __init__(self, network: nn.Module, layers: Sequence[str], statistics: Sequence[str] = ("mean", "std")) -> None:
        super().__init__()
        modules = dict(network.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing or not layers:
            shallow = [n for n in modules if n and n.count(".") <= 1]
            raise ValueError(f"detector layers {missing or list(layers)} are not modules of "
                             f"{type(network).__name__}; its modules include {shallow[:24]}")
        bad = [s for s in statistics if s not in ("mean", "std")]
        if bad or not statistics:
            raise ValueError(f"statistics must be among 'mean', 'std', got {list(statistics)}")
        self.network = network
        self.layers, self.statistics = list(layers), list(statistics)
        self._captured: dict[str, torch.Tensor] = {}
        self._hooks = [modules[name].register_forward_hook(self._recorder(name)) for name in self.layers]
        self.gaussians: dict[str, ShrunkGaussian] = {}
        self.z_location = torch.zeros(len(self.layers))
        self.z_scale = torch.ones(len(self.layers))
        self.thresholds: dict[str, float] = {}
        self.provenance: dict[str, Any] = {}

    def _recorder(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def summarise(self, output: torch.Tensor) -> torch.Tensor:
        """``[B, C, *spatial]`` -> ``[B, C · len(statistics)]``: channel statistics over space."""
        flat = _plain(output).flatten(2).float()
        parts = {"mean": lambda: flat.mean(dim=2), "std": lambda: flat.std(dim=2, unbiased=False)}
        return torch.cat([parts[s]() for s in self.statistics], dim=1)

    def captured_features(self) -> dict[str, torch.Tensor]:
        if set(self._captured) != set(self.layers):
            raise RuntimeError(f"the network's last forward pass did not run through all detector layers "
                               f"{self.layers} (recorded: {sorted(self._captured)})")
        return {name: self.summarise(self._captured[name]) for name in self.layers}

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured = {}
        self.network(x)
        return self.captured_features()

    def _layer_distances(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.gaussians:
            raise RuntimeError("the detector is not fitted: call fit() or FeatureDensityDetector.load()")
        return torch.stack([self.gaussians[name].mahalanobis(feats[name]) for name in self.layers], dim=1)

    def _combine(self, distances: torch.Tensor) -> torch.Tensor:
        z = (distances - self.z_location.to(distances)) / self.z_scale.to(distances)
        return z.mean(dim=1)

    def score_captured(self) -> torch.Tensor:
        """Score of the network's last forward pass, ``[B]`` (differentiable)."""
        return self._combine(self._layer_distances(self.captured_features()))

    def score_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Score of ``x`` given the network's ``output`` for it, just computed (the hooks recorded that pass)."""
        return self.score_captured()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.features(x)
        return self.score_captured()

    @torch.no_grad()
    def fit(self, loader: Iterable, device: torch.device | str = "cpu", image_key: str = "image",
            progress: bool = True) -> FeatureDensityDetector:
        """Fit the Gaussians and the z-scoring on clean samples (e.g. the training split without augmentation)."""
        was_training = self.network.training
        self.network.eval()
        feats: dict[str, list[torch.Tensor]] = {name: [] for name in self.layers}
        try:
            for batch in tqdm(loader, desc="detector: clean features", disable=not progress, leave=False):
                x = _plain(batch[image_key] if isinstance(batch, Mapping) else batch[0]).float().to(device)
                for name, f in self.features(x).items():
                    feats[name].append(f.double().cpu())
        finally:
            self.network.train(was_training)
        if not feats[self.layers[0]]:
            raise ValueError("the detector's fit loader yielded no batches")
        self.gaussians, layer_info = {}, []
        for name in self.layers:
            x = torch.cat(feats[name])
            n, d = x.shape
            if n < 2:
                raise ValueError(f"detector layer {name}: {n} clean sample(s); at least 2 are needed")
            gaussian = ShrunkGaussian.fit(x)
            self.gaussians[name] = gaussian
            if n < 2 * d:
                logger.warning(f"detector layer {name}: {n} clean samples for {d} feature dimensions; the covariance "
                               f"is shrunk towards a multiple of the identity by {gaussian.shrinkage:.3f}")
            layer_info.append({"name": name, "dim": d, "n": n, "shrinkage": gaussian.shrinkage})
        distances = torch.stack([self.gaussians[name].mahalanobis(torch.cat(feats[name]).float())
                                 for name in self.layers], dim=1)
        self.z_location, self.z_scale = distances.mean(dim=0), distances.std(dim=0).clamp_min(1e-8)
        self.provenance["layers"] = layer_info
        return self

    # ------------------------------------------------------------------ files
    def save(self, npz_path: str | os.PathLike, json_path: str | os.PathLike, checkpoint: str | os.PathLike,
             extra: Mapping[str, Any] | None = None) -> None:
        """Write the statistics (``.npz``, arrays only) and the provenance (``.json``) atomically."""
        arrays: dict[str, np.ndarray] = {"z_location": self.z_location.numpy(), "z_scale": self.z_scale.numpy()}
        for i, name in enumerate(self.layers):
            arrays[f"mean_{i}"] = self.gaussians[name].mean.numpy()
            arrays[f"precision_{i}"] = self.gaussians[name].precision.numpy()
        npz_path = Path(npz_path)
        atomic_save_npz(npz_path, **arrays)
        info = {
            "kind": self.kind,
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": file_sha256(checkpoint),
            "layers": self.provenance.get("layers") or [{"name": n} for n in self.layers],
            "statistics": self.statistics,
            "thresholds": self.thresholds,
            "statistics_file": npz_path.name,
            **dict(extra or {}),
        }
        atomic_write_text(json_path, json.dumps(info, indent=2) + "\n")

    @classmethod
    def load(cls, network: nn.Module, npz_path: str | os.PathLike, json_path: str | os.PathLike,
             checkpoint: str | os.PathLike | None = None) -> FeatureDensityDetector:
        """A detector from its files; with ``checkpoint``, refuse one fitted on other weights (SHA-256)."""
        info = read_json(json_path)
        if info.get("kind") != cls.kind:
            raise ValueError(f"{json_path}: not a feature-density detector (kind {info.get('kind')!r})")
        if checkpoint is not None and info.get("checkpoint_sha256") != file_sha256(checkpoint):
            raise ValueError(f"{json_path}: the detector was fitted on another checkpoint (sha256 "
                             f"{str(info.get('checkpoint_sha256'))[:12]}…, {info.get('checkpoint')}), not on "
                             f"{checkpoint}; fit it again with `amat-monai detector fit`")
        detector = cls(network, [layer["name"] for layer in info["layers"]], info.get("statistics", ("mean", "std")))
        with np.load(npz_path, allow_pickle=False) as arrays:
            detector.z_location = torch.from_numpy(arrays["z_location"]).float()
            detector.z_scale = torch.from_numpy(arrays["z_scale"]).float()
            for i, name in enumerate(detector.layers):
                detector.gaussians[name] = ShrunkGaussian(torch.from_numpy(arrays[f"mean_{i}"]).float(),
                                                          torch.from_numpy(arrays[f"precision_{i}"]).float())
        detector.thresholds = {k: float(v) for k, v in (info.get("thresholds") or {}).items()}
        detector.provenance = info
        detector.statistics_sha256 = file_sha256(npz_path)
        return detector


class SqueezeDisagreement(nn.Module):
    """Feature squeezing: the mean absolute change of the output probabilities under a median filter.

    Args:
        network: the task network.
        probabilities: maps the network's output to probabilities (``"softmax"`` over channels for
            segmentation; ``"sigmoid:K"`` for the first ``K`` channels, e.g. landmark heatmaps).
        kernel_size: the median filter's window (pixels).
    """

    kind = "squeeze"

    def __init__(self, network: nn.Module, probabilities: str = "softmax", kernel_size: int = 3) -> None:
        super().__init__()
        if probabilities != "softmax" and not (probabilities.startswith("sigmoid:") and
                                               probabilities.split(":", 1)[1].isdigit()):
            raise ValueError(f"probabilities must be 'softmax' or 'sigmoid:K', got {probabilities!r}")
        self.network, self.probabilities, self.kernel_size = network, probabilities, int(kernel_size)
        self.thresholds: dict[str, float] = {}

    def _probabilities(self, out: torch.Tensor) -> torch.Tensor:
        out = _plain(out).float()
        if self.probabilities == "softmax":
            return out.softmax(dim=1)
        return torch.sigmoid(out[:, : int(self.probabilities.split(":", 1)[1])])

    def score_output(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Score of ``x`` given the network's ``output`` for it (one more pass, on the filtered input)."""
        spatial = x.ndim - 2
        squeezed = median_filter(x, kernel_size=[self.kernel_size] * spatial, spatial_dims=spatial)
        diff = self._probabilities(output) - self._probabilities(self.network(squeezed))
        return diff.abs().flatten(1).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_output(x, self.network(x))


@torch.no_grad()
def screen(detector: FeatureDensityDetector, image: torch.Tensor, slice_dim: int | None = None,
           slice_size: Sequence[int] | None = None, batch_size: int = 32,
           baseline: SqueezeDisagreement | None = None) -> dict[str, Any]:
    """The detector's verdict on one channel-first image (no batch dimension), as MONAI Label serves it.

    Args:
        detector: a fitted detector with ``thresholds["sample"]`` (and ``["volume"]`` for volumes).
        image: ``[C, *spatial]``, preprocessed as the network sees it.
        slice_dim: for a 2D network run over a volume, the spatial axis it slices (a ``SliceInferer``'s
            ``spatial_dim``); each slice is scored and the volume's score is the maximum over its slices.
        slice_size: pad (with 0) or crop each slice, centred, to this size first, as the training slices were
            (default: the ``slice_size`` the detector was fitted with, e.g. the hippocampus bundle's ``patch_size``).
        batch_size: slices scored per forward pass.
        baseline: also give this detector's verdict (e.g. the squeeze baseline, with its thresholds), under
            ``"squeeze"``.

    Returns:
        ``{"score", "threshold", "flag"}``, plus ``"slices": {"axis", "score", "threshold", "flag"}`` (lists over
        the slices) when ``slice_dim`` is given, plus the baseline's verdict in the same form.
    """
    param = next(detector.network.parameters(), None)
    x = _plain(image).float().to(param.device if param is not None else "cpu")
    if slice_dim is None:
        batch = x[None]
    else:
        batch = x.movedim(1 + slice_dim, 0)  # [S, C, *other spatial]
        slice_size = slice_size or detector.provenance.get("slice_size")
        if slice_size is not None:
            resize = ResizeWithPadOrCrop(list(slice_size), mode="constant", value=0.0)
            batch = torch.stack([_plain(resize(s)) for s in batch])

    def verdict(scorer: nn.Module, thresholds: Mapping[str, float]) -> dict[str, Any]:
        scores = torch.cat([scorer(batch[i: i + batch_size]) for i in range(0, batch.shape[0], batch_size)])
        t_sample = float(thresholds["sample"])
        if slice_dim is None:
            return {"score": float(scores[0]), "threshold": t_sample, "flag": bool(scores[0] > t_sample)}
        t_volume, volume = float(thresholds.get("volume", t_sample)), float(scores.max())
        return {"score": volume, "threshold": t_volume, "flag": volume > t_volume,
                "slices": {"axis": slice_dim, "score": [float(v) for v in scores], "threshold": t_sample,
                           "flag": [bool(v > t_sample) for v in scores]}}

    out = verdict(detector, detector.thresholds)
    if baseline is not None:
        out[baseline.kind] = verdict(baseline, baseline.thresholds)
    return out
