"""CUDA fast paths for a network, each a switch: bf16 autocast, channels-last memory format, ``torch.compile``.

They change how the network runs, not what it is: the module keeps its class, parameters and ``state_dict``
keys (checkpoints stay interchangeable), its outputs come back in float32 (losses, attack gradients and AMAT's
threshold tests stay in full precision), and attacks, which call the same module, get the same fast paths.
On the CPU every switch is a no-op: bf16 autocast and channels-last do not speed up these small
convolutional networks there, and ``torch.compile`` would only add compilation time.

Example (a bundle config)::

    "network": "$amat_monai.acceleration.accelerate(@network_def, @device, autocast=True, channels_last=True)"
"""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

__all__ = ["accelerate", "enable_autocast", "to_channels_last", "is_accelerated"]

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float32 else out
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out


def _memory_format(x: torch.Tensor) -> torch.memory_format | None:
    return {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())


def _fast_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs):
    """``forward`` of an accelerated module: channels-last input, autocast on the input's device type."""
    plain = type(self).forward
    if getattr(self, "_amat_channels_last", False) and isinstance(x, torch.Tensor):
        fmt = _memory_format(x)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
    dtype = getattr(self, "_amat_autocast_dtype", None)
    if dtype is None or not isinstance(x, torch.Tensor) or x.device.type not in self._amat_autocast_devices:
        return plain(self, x, *args, **kwargs)
    with torch.autocast(device_type=x.device.type, dtype=dtype):
        out = plain(self, x, *args, **kwargs)
    return _to_float32(out)


def _install_forward(network: nn.Module) -> None:
    # an instance attribute bound to the module: deepcopy rebinds it to the copy; the class is unchanged
    network.forward = types.MethodType(_fast_forward, network)


def is_accelerated(network: nn.Module) -> bool:
    """Whether :func:`enable_autocast` or :func:`to_channels_last` changed ``network``'s forward pass."""
    return isinstance(network.__dict__.get("forward"), types.MethodType) and (
        network.__dict__["forward"].__func__ is _fast_forward
    )


def enable_autocast(network: nn.Module, dtype: str | torch.dtype = "bf16", device_types=("cuda",)) -> nn.Module:
    """Run ``network``'s forward pass under ``torch.autocast(dtype)`` for inputs on ``device_types``, returning
    float32 outputs. In place; returns ``network``."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"autocast dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        dtype = _DTYPES[dtype]
    network._amat_autocast_dtype = dtype
    network._amat_autocast_devices = tuple(device_types)
    _install_forward(network)
    return network


def to_channels_last(network: nn.Module) -> nn.Module:
    """Store 4D/5D parameters and buffers channels-last and feed inputs channels-last (cuDNN's fastest
    convolution layout with tensor cores). In place; returns ``network``."""
    for tensor in list(network.parameters()) + list(network.buffers()):
        fmt = _memory_format(tensor)
        if fmt is not None:
            tensor.data = tensor.data.contiguous(memory_format=fmt)
    network._amat_channels_last = True
    if not hasattr(network, "_amat_autocast_devices"):
        network._amat_autocast_dtype = None
        network._amat_autocast_devices = ()
    _install_forward(network)
    return network


def accelerate(
    network: nn.Module,
    device: torch.device | str | None = None,
    *,
    autocast: bool | str = False,
    channels_last: bool = False,
    compile: bool = False,
    compile_kwargs: dict | None = None,
) -> nn.Module:
    """``network`` on ``device`` with the requested CUDA fast paths (each a no-op on any other device).

    Args:
        network: the network.
        device: where it runs (default: where its parameters are).
        autocast: ``True``/``"bf16"`` (bfloat16, needs no gradient scaling) or ``"fp16"``: mixed precision for
            the training, evaluation and attack passes.
        channels_last: channels-last memory format for weights and inputs.
        compile: ``torch.compile`` the module in place (``nn.Module.compile``; ``state_dict`` keys unchanged).
            Shapes vary (attack batch ``B``, training batch ``2B``, bisection subsets), so it compiles with
            ``dynamic=True`` unless ``compile_kwargs`` says otherwise.
        compile_kwargs: extra ``torch.compile`` arguments.
    """
    if device is None:
        param = next(network.parameters(), None)
        device = param.device if param is not None else "cpu"
    device = torch.device(device)
    network = network.to(device)
    switches = {"autocast": autocast, "channels_last": channels_last, "compile": compile}
    requested = [name for name, on in switches.items() if on]
    if device.type != "cuda":
        if requested:
            logger.info(f"fast paths {requested} are for CUDA only; running plain on {device}")
        return network
    if channels_last:
        to_channels_last(network)
    if autocast:
        enable_autocast(network, "bf16" if autocast is True else autocast)
    if compile:
        network.compile(**{"dynamic": True, **(compile_kwargs or {})})
    return network
