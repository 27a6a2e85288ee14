"""White-box attacks for any model and any per-sample loss, on 2D ``[B,C,H,W]`` and 3D ``[B,C,D,H,W]`` inputs.

Every attack maximises ``loss_fn(model(x_adv), y)`` summed over samples and loss terms, inside a per-sample
ball ``||x_adv_i - x_i|| <= eps_i`` measured over all channels and pixels of sample ``i``. ``eps`` may be a
float (one radius for the batch, as in VAT) or a ``[B]`` tensor (one radius per sample, as in AMAT).

The attacks only differentiate with respect to the input: parameter ``.grad`` fields are left as they were,
normalisation running statistics are restored afterwards and the model's train/eval mode is put back.

Example::

    x_adv = pgd(net, per_sample_loss, x, y, eps=2.0, steps=20, step_size=0.4)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "LossFn",
    "Observer",
    "AttackResult",
    "pgd",
    "ifgsm",
    "fgsm",
    "random_noise",
    "per_sample_norm",
    "frozen_norm_statistics",
    "per_sample_terms",
    "ATTACKS",
]

#: ``loss_fn(pred, y)`` returns per-sample losses ``[B]`` or per-sample per-term losses ``[B, K]``.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: ``observer(step, delta, losses, pred)`` sees each iterate's perturbation, its ``[B, K]`` losses and the model's
#: output there (all detached).
Observer = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

NORMS = ("l2", "linf")


@dataclass
class AttackResult:
    """What an attack returns when asked for its history.

    Attributes:
        x_adv: the adversarial input, same shape as ``x``.
        losses: ``[T, B, K]`` per-iterate, per-sample, per-term losses; ``losses[t]`` is the loss at the
            iterate the ``t``-th gradient step started from (``t = 0`` is the starting point).
    """

    x_adv: torch.Tensor
    losses: torch.Tensor


def per_sample_terms(losses: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return ``losses`` as ``[B, K]``; raise ``ValueError`` when ``loss_fn`` did not return per-sample values."""
    if losses.dim() == 1:
        losses = losses[:, None]
    if losses.dim() != 2 or losses.shape[0] != batch_size:
        raise ValueError(
            f"loss_fn must return per-sample losses of shape [B] or [B, K] with B={batch_size}, "
            f"got shape {tuple(losses.shape)} (use reduction='none')"
        )
    return losses


def per_sample_norm(delta: torch.Tensor, norm: str = "l2") -> torch.Tensor:
    """Per-sample L2 or L-infinity norm over every non-batch dimension, shape ``[B]``."""
    flat = delta.flatten(1)
    if norm == "l2":
        return flat.norm(p=2, dim=1)
    if norm == "linf":
        return flat.abs().amax(dim=1)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


@contextlib.contextmanager
def frozen_norm_statistics(model: nn.Module) -> Iterator[None]:
    """Leave every normalisation layer's running statistics as they were, so that forward passes made in train
    mode by an attack leave no trace in BatchNorm (or InstanceNorm with ``track_running_stats``).

    The layers get scratch copies of their buffers for the duration and the original tensors back afterwards.
    The originals are never written to, so an autograd graph that saved them (a training forward pass
    waiting for its backward) stays valid.
    """
    swapped = []
    for module in model.modules():
        if getattr(module, "track_running_stats", False):
            for name, buf in list(module._buffers.items()):
                if buf is not None:
                    swapped.append((module, name, buf))
                    module._buffers[name] = buf.detach().clone()
    try:
        yield
    finally:
        for module, name, buf in swapped:
            module._buffers[name] = buf


@contextlib.contextmanager
def _attack_context(model: nn.Module, train_mode: bool | None) -> Iterator[None]:
    # every module's own mode is restored: a wrapper module (left in train mode by default) around a network in
    # eval mode must not put the network back in train mode, where batch norm would use and update batch statistics
    modes = [(m, m.training) for m in model.modules()]
    if train_mode is not None:
        model.train(train_mode)
    try:
        with frozen_norm_statistics(model), torch.enable_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _as_radius(value: float | torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
    """Broadcastable per-sample radius ``[B, 1, ..., 1]`` from a float or a ``[B]`` tensor."""
    batch = x.shape[0]
    radius = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if radius.dim() == 0:
        radius = radius.expand(batch)
    if radius.dim() != 1 or radius.shape[0] != batch:
        raise ValueError(f"{name} must be a float or a [B] tensor with B={batch}, got shape {tuple(radius.shape)}")
    if not torch.isfinite(radius).all() or (radius < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {radius.tolist()}")
    return radius.view(batch, *([1] * (x.dim() - 1)))


def _check_inputs(x: torch.Tensor, y: torch.Tensor, norm: str, clamp: tuple[float, float] | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
        raise ValueError(f"x must be a [B,C,H,W] or [B,C,D,H,W] tensor, got {getattr(x, 'shape', type(x))}")
    if not torch.is_floating_point(x):
        raise ValueError(f"x must be a floating point tensor, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values (NaN or Inf)")
    if not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"y must be a tensor with the same batch size as x ({x.shape[0]}), got {getattr(y, 'shape', type(y))}"
        )
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if clamp is not None and (len(clamp) != 2 or not clamp[0] < clamp[1]):
        raise ValueError(f"clamp must be None or (low, high) with low < high, got {clamp!r}")


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Project each sample's perturbation onto its ball of radius ``eps``."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    length = per_sample_norm(delta).view_as(eps)
    scale = torch.where(length > eps, eps / length.clamp_min(1e-12), torch.ones_like(length))
    return delta * scale


def _clamp_input(x: torch.Tensor, delta: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    if clamp is None:
        return delta
    return (x + delta).clamp(clamp[0], clamp[1]) - x


def _unit_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit norm; a zero gradient gives a zero step (no NaN)."""
    if norm == "linf":
        return g.sign()
    length = per_sample_norm(g).view(-1, *([1] * (g.dim() - 1)))
    return g / length.clamp_min(1e-12)


def _random_in_ball(x: torch.Tensor, eps: torch.Tensor, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2 * u - 1) * eps
    direction = _unit_direction(torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype), "l2")
    radius = torch.rand(eps.shape, generator=generator, device=x.device, dtype=x.dtype)
    return direction * radius * eps


def pgd(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 10,
    step_size: float | torch.Tensor | None = None,
    norm: str = "l2",
    random_start: bool = True,
    clamp: tuple[float, float] | None = None,
    train_mode: bool | None = None,
    observer: Observer | None = None,
    return_losses: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor | AttackResult:
    """Projected gradient ascent on the loss inside a per-sample L2 or L-infinity ball (Madry et al., 2018).

    Args:
        model: the network; its parameters receive no gradient.
        loss_fn: ``loss_fn(model(x), y)`` -> ``[B]`` or ``[B, K]`` per-sample losses; their sum is ascended.
        x: clean input ``[B,C,H,W]`` or ``[B,C,D,H,W]``.
        y: target with batch size ``B``, passed to ``loss_fn`` as is.
        eps: radius of the ball, a float or a ``[B]`` tensor (0 leaves a sample untouched).
        steps: number of gradient steps (``>= 1``).
        step_size: length of each step, float or ``[B]``; default ``2.5 * eps / steps``.
        norm: ``"l2"`` (over all channels and pixels of a sample) or ``"linf"``.
        random_start: start from a uniformly random point in the ball instead of ``x``.
        clamp: ``None`` (no intensity bound: z-scored images have none) or ``(low, high)``.
        train_mode: run the model in train (``True``) or eval (``False``) mode during the attack;
            ``None`` keeps its current mode. The mode is restored afterwards.
        observer: called as ``observer(t, delta_t, losses_t, pred_t)`` at every iterate, for instance to locate
            where the expand condition is first violated (see :class:`amat_monai.margins.BoundaryTracker`).
        return_losses: return an :class:`AttackResult` with the ``[steps, B, K]`` loss history.
        generator: random generator for the random start (reproducible attacks).

    Returns:
        ``x_adv`` (detached), or an :class:`AttackResult` when ``return_losses`` is set.
    """
    _check_inputs(x, y, norm, clamp)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    x = x.detach()
    eps_b = _as_radius(eps, "eps", x)
    alpha = _as_radius(2.5 * eps_b.flatten() / steps if step_size is None else step_size, "step_size", x)

    delta = _random_in_ball(x, eps_b, norm, generator) if random_start else torch.zeros_like(x)
    delta = _clamp_input(x, delta, clamp)
    history = []
    with _attack_context(model, train_mode):
        for t in range(steps):
            delta.requires_grad_(True)
            pred = model(x + delta)
            losses = per_sample_terms(loss_fn(pred, y), x.shape[0])
            (grad,) = torch.autograd.grad(losses.sum(), delta)
            delta = delta.detach()
            losses = losses.detach()
            if observer is not None:
                observer(t, delta, losses, pred.detach())
            if return_losses:
                history.append(losses)
            delta = _project(delta + alpha * _unit_direction(grad, norm), eps_b, norm)
            delta = _clamp_input(x, delta, clamp)
    x_adv = (x + delta).detach()
    if return_losses:
        return AttackResult(x_adv, torch.stack(history))
    return x_adv


def ifgsm(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    steps: int = 10,
    step_size: float | torch.Tensor | None = None,
    norm: str = "l2",
    clamp: tuple[float, float] | None = None,
    **kwargs,
) -> torch.Tensor | AttackResult:
    """Iterative FGSM (Kurakin et al., 2017): PGD started from ``x`` itself, deterministic.

    ``step_size`` defaults to ``eps / steps``. Other keyword arguments are those of :func:`pgd`.
    """
    if step_size is None:
        step_size = torch.as_tensor(eps) / steps if isinstance(steps, int) and steps > 0 else eps
    return pgd(
        model, loss_fn, x, y, eps, steps=steps, step_size=step_size, norm=norm, random_start=False, clamp=clamp, **kwargs
    )


def fgsm(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: str = "l2",
    clamp: tuple[float, float] | None = None,
    **kwargs,
) -> torch.Tensor | AttackResult:
    """Fast gradient (sign) method (Goodfellow et al., 2015): one step of length ``eps`` from ``x``."""
    kwargs.pop("steps", None)
    kwargs.pop("step_size", None)
    kwargs.pop("random_start", None)
    return pgd(model, loss_fn, x, y, eps, steps=1, step_size=eps, norm=norm, random_start=False, clamp=clamp, **kwargs)


def random_noise(
    model: nn.Module | None,
    loss_fn: LossFn | None,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float | torch.Tensor,
    *,
    norm: str = "l2",
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    **kwargs,
) -> torch.Tensor:
    """Random noise of norm exactly ``eps`` (a random direction on the sphere; random signs for L-infinity).

    The baseline that tells an attack from bad luck: a working attack of the same norm must hurt much more.
    ``model`` and ``loss_fn`` are accepted (and unused) so that every attack has the same signature.
    """
    _check_inputs(x, y, norm, clamp)
    x = x.detach()
    eps_b = _as_radius(eps, "eps", x)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    delta = _unit_direction(noise, norm) * eps_b
    return (x + _clamp_input(x, delta, clamp)).detach()


#: Attacks by name, for configuration files and the command line.
ATTACKS: dict[str, Callable[..., torch.Tensor | AttackResult]] = {
    "pgd": pgd,
    "ifgsm": ifgsm,
    "fgsm": fgsm,
    "noise": random_noise,
}

