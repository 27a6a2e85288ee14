"""A Gaussian with Ledoit–Wolf shrinkage and its Mahalanobis distance, in torch (float64 while fitting)."""

from __future__ import annotations

import torch

__all__ = ["ledoit_wolf", "ShrunkGaussian"]


def ledoit_wolf(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean, shrunk covariance and shrinkage intensity of the rows of ``x`` (``[n, d]``).

    The covariance is ``(1 - s) · S + s · (tr S / d) · I`` with ``S`` the maximum-likelihood covariance and ``s``
    the intensity of Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance
    matrices", which minimises the expected Frobenius error; it stays invertible when ``n < d``.
    """
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"ledoit_wolf needs an [n, d] matrix with n >= 2 rows, got shape {tuple(x.shape)}")
    x = x.double()
    n, d = x.shape
    mean = x.mean(dim=0)
    xc = x - mean
    cov = xc.T @ xc / n
    scale = torch.trace(cov) / d  # the target's variance
    # distance of S to the target, and the variance of S's entries around their mean (both per dimension)
    dispersion = ((cov - scale * torch.eye(d, dtype=x.dtype, device=x.device)) ** 2).sum() / d
    squares = xc**2
    variance = ((squares.T @ squares).sum() / n - (cov**2).sum()) / (n * d)
    variance = torch.minimum(variance, dispersion)
    shrinkage = 0.0 if float(dispersion) == 0.0 else float(variance / dispersion)
    shrunk = (1.0 - shrinkage) * cov + shrinkage * scale * torch.eye(d, dtype=x.dtype, device=x.device)
    return mean, shrunk, shrinkage


class ShrunkGaussian:
    """A Gaussian fitted with :func:`ledoit_wolf`; :meth:`mahalanobis` is differentiable in its input.

    Args:
        mean: ``[d]``.
        precision: ``[d, d]``, the inverse covariance.
        shrinkage: the intensity used when fitting (kept for the provenance record).
    """

    def __init__(self, mean: torch.Tensor, precision: torch.Tensor, shrinkage: float = 0.0) -> None:
        if mean.ndim != 1 or precision.shape != (mean.numel(), mean.numel()):
            raise ValueError(f"mean [d] and precision [d, d] expected, got {tuple(mean.shape)} and "
                             f"{tuple(precision.shape)}")
        self.mean, self.precision, self.shrinkage = mean, precision, float(shrinkage)

    @classmethod
    def fit(cls, x: torch.Tensor) -> ShrunkGaussian:
        mean, cov, shrinkage = ledoit_wolf(x)
        # eigh instead of inv: the spectrum is floored at a tiny multiple of its largest value
        values, vectors = torch.linalg.eigh(cov)
        values = values.clamp_min(values.max().clamp_min(1e-30) * 1e-10)
        precision = (vectors / values) @ vectors.T
        return cls(mean.float(), precision.float(), shrinkage)

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def mahalanobis(self, x: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance ``(x - μ)ᵀ P (x - μ)`` of each row of ``x`` (``[n, d]`` -> ``[n]``)."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of dimension {self.dim} expected, got shape {tuple(x.shape)}")
        diff = x - self.mean.to(x)
        return ((diff @ self.precision.to(x)) * diff).sum(dim=1)
