"""Files that must survive a crash: atomic writes, checkpoints, final weights, resuming, and their hashes.

One module for everything written to or read from disk that a user would hate to lose or to mix up, built on
ignite's ``Checkpoint`` / ``DiskSaver(atomic=True)`` and MONAI's ``CheckpointLoader``:

* :func:`atomic_write_text` / :func:`atomic_torch_save`: through a temporary file and a rename;
* :func:`file_sha256`: the provenance recorded in ``xi.json`` and ``robustness.json``;
* :class:`FinalModelSaver`: the model-zoo ``model.pt`` (a plain state dict) when training completes;
* :func:`checkpoint_dict`, :func:`latest_checkpoint`, :func:`resume_from_latest`: MONAI ``CheckpointSaver``
  checkpoints and resuming from them;
* :func:`load_checkpoint` / :func:`load_weights`: weights from a plain state dict or a full checkpoint, with
  errors that name the file.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader
from torch import nn

from amat_monai.distributed import match_epoch_length, unwrap_network

__all__ = [
    "atomic_write_text",
    "atomic_torch_save",
    "file_sha256",
    "FinalModelSaver",
    "checkpoint_dict",
    "latest_checkpoint",
    "resume_from_latest",
    "load_checkpoint",
    "load_weights",
]

logger = logging.getLogger(__name__)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _disk_saver(folder: Path) -> DiskSaver:
    return DiskSaver(str(folder), atomic=True, create_dir=True, require_empty=False)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through ignite's atomic ``DiskSaver``: a crash never leaves a truncated ``path``."""
    path = Path(path)
    _disk_saver(path.parent)(obj, path.name)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FinalModelSaver(Checkpoint):
    """Write the network's state dict (model-zoo ``model.pt``) atomically when training COMPLETES.

    An ignite ``Checkpoint`` of the network alone (so the file is the plain state dict, DDP unwrapped, written by
    rank 0) on an atomic ``DiskSaver``. Unlike ``CheckpointSaver(save_final=True)``, which also saves when an
    exception is raised, a failed or interrupted run never touches ``path``: the last good weights stay.

    Args:
        network: the trained network.
        path: where ``model.pt`` goes.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike) -> None:
        self.path = Path(path)
        super().__init__({"model": network}, _disk_saver(self.path.parent), filename_pattern=self.path.name,
                         n_saved=None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self._saved.clear()  # the same file every run: never delete it as an "older" checkpoint
        super().__call__(engine)
        logger.info(f"saved the final weights to {self.path}")


def checkpoint_dict(**objects: Any) -> dict[str, Any]:
    """The ``save_dict`` of MONAI's ``CheckpointSaver`` / ``CheckpointLoader``: the given objects minus ``None``
    (``adversarial=None`` for STD), so a VAT / AMAT / TEAT handler's state is checkpointed with the weights."""
    return {k: v for k, v in objects.items() if v is not None}


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The ``checkpoint_epoch=N.pt`` (or ``..._iteration=N.pt``) with the largest N in ``ckpt_dir``, if any."""
    best, best_n = None, -1
    for f in glob.glob(os.path.join(str(ckpt_dir), "*checkpoint_*=*.pt")):
        m = re.search(r"_(?:epoch|iteration)=(\d+)\.pt$", f)
        if m and int(m.group(1)) > best_n:
            best, best_n = f, int(m.group(1))
    return best


def resume_from_latest(trainer: Engine, ckpt_dir: str | os.PathLike, save_dict: Mapping[str, Any]) -> str:
    """Attach a MONAI ``CheckpointLoader`` that restores ``save_dict`` (network, optimizer, trainer state,
    adversarial handler state) from the latest checkpoint in ``ckpt_dir`` when the trainer starts.

    Raises:
        FileNotFoundError: when ``ckpt_dir`` holds no checkpoint.
    """
    path = latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(f"resume=true but {ckpt_dir} holds no checkpoint_epoch=N.pt to resume from")
    CheckpointLoader(load_path=path, load_dict=dict(save_dict), map_location="cpu").attach(trainer)
    match_epoch_length(trainer)  # the checkpoint may come from a run with another number of processes
    logger.info(f"resuming from {path}")
    return path


def load_checkpoint(network: nn.Module, path: str | os.PathLike, device: torch.device | str = "cpu") -> None:
    """Load weights saved by MONAI's ``CheckpointSaver`` (``{"network": state_dict, ...}``) or a plain state dict.

    Raises:
        FileNotFoundError: naming the file when it is missing.
        ValueError: naming the file when it holds no usable state dict, or one that does not fit ``network``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise ValueError(f"cannot read checkpoint {path}: {e}") from None
    if isinstance(state, Mapping):
        for key in ("network", "model", "state_dict", "net"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"checkpoint {path} holds no network state dict (keys: {keys})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    try:
        Checkpoint.load_objects(to_load={"network": network}, checkpoint={"network": state})
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the bundle's network_def: {str(e)[:500]}") from None


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Initialise ``network`` (a DDP wrapper is unwrapped) from a state dict or a full checkpoint (e.g. to
    fine-tune the STD model)."""
    load_checkpoint(unwrap_network(network), path, device="cpu")
    logger.info(f"initialised the network from {path}")
    return network
