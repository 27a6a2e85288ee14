"""Files that must survive a crash: atomic writes, checkpoints, final weights, resuming, and their hashes.

One module for everything written to or read from disk that a user would hate to lose or to mix up, built on
ignite's ``Checkpoint`` and MONAI's ``CheckpointLoader``:

* :func:`atomic_write_text` / :func:`atomic_torch_save`: through a temporary file, fsync and a rename;
  :func:`remove_stale_tmp` cleans up after a killed writer;
* :func:`read_json`: a JSON file, or an error that names it; :func:`file_sha256`: the provenance recorded in ``xi.json`` and ``robustness.json``;
* :class:`FinalModelSaver`: the model-zoo ``model.pt`` (a plain state dict) when training completes;
* :class:`EpochCheckpointSaver` (MONAI ``CheckpointSaver`` files, written atomically, rotated only after the
  new one is complete), :func:`checkpoint_dict`, :func:`resume_from_latest` (skips an incomplete checkpoint);
* :func:`load_checkpoint` / :func:`load_weights`: weights from a plain state dict or a full checkpoint, with
  errors that name the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader
from torch import nn

from amat_monai.distributed import match_epoch_length, unwrap_network

__all__ = [
    "atomic_write_text",
    "atomic_torch_save",
    "atomic_save_npz",
    "read_json",
    "file_sha256",
    "remove_stale_tmp",
    "SafeDiskSaver",
    "FinalModelSaver",
    "EpochCheckpointSaver",
    "checkpoint_dict",
    "checkpoints_newest_first",
    "latest_checkpoint",
    "checkpoint_problem",
    "resume_from_latest",
    "load_checkpoint",
    "fit_problem",
    "load_weights",
    "frozen_teacher",
]

logger = logging.getLogger(__name__)


_TMP_SUFFIX = ".tmp"


def _tmp_prefix(name: str) -> str:
    # the writer's pid in the name tells a crashed writer's leftover from a file being written right now
    return f".{name}.{os.getpid()}."


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str) -> None:
    """Write ``path`` through a temporary file in its folder, fsync, rename, fsync the folder.

    A crash at any moment leaves either the old ``path`` or the new one, never a truncated file; the temporary
    file of a killed writer is removed by :func:`remove_stale_tmp` later.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path.name), suffix=_TMP_SUFFIX)
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; others may need to read a shared run folder
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a crash leaves the old file intact."""
    _atomic_write(path, lambda f: f.write(text), "w")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically: a crash never leaves a truncated ``path``."""
    _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def atomic_save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """``numpy.savez`` of plain arrays atomically (read back with ``np.load(path, allow_pickle=False)``)."""
    _atomic_write(path, lambda f: np.savez(f, **arrays), "wb")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_tmp(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files that killed writers left in ``folder``; returns their names.

    Only files named as :func:`atomic_torch_save` / :func:`atomic_write_text` name them
    (``.<name>.<pid>.<random>.tmp``) and whose writer process is gone are touched.
    """
    removed = []
    for f in Path(folder).glob(f".*{_TMP_SUFFIX}") if Path(folder).is_dir() else []:
        m = re.fullmatch(r"\..+\.(\d+)\.[^.]+\.tmp", f.name)
        if m and not _pid_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f.name)
    if removed:
        logger.info(f"removed {len(removed)} temporary file(s) of interrupted saves in {folder}: {removed}")
    return removed


class SafeDiskSaver(BaseSaveHandler):
    """An ignite save handler that writes atomically and removes an older checkpoint only after the new one is
    complete.

    ignite's ``Checkpoint`` asks its handler to remove the file it rotates out *before* it saves the new one, and
    MONAI's ``CheckpointSaver`` writes in place: a kill during the save of epoch N left no complete checkpoint at
    all. Here a removal is queued and carried out once the new file is on disk.
    """

    def __init__(self, dirname: str | os.PathLike) -> None:
        self.dirname = Path(dirname)
        self._pending: list[str] = []

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        atomic_torch_save(checkpoint, self.dirname / filename)
        for old in self._pending:
            if old != filename:
                (self.dirname / old).unlink(missing_ok=True)
        self._pending.clear()

    def remove(self, filename: str) -> None:
        self._pending.append(filename)


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """The parsed content of a JSON file.

    Raises:
        FileNotFoundError: ``"<what> not found: <path>"``.
        ValueError: naming the file and the position, when it is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class FinalModelSaver(Checkpoint):
    """Write the network's state dict (model-zoo ``model.pt``) atomically when training COMPLETES.

    An ignite ``Checkpoint`` of the network alone (so the file is the plain state dict, DDP unwrapped, written by
    rank 0) on a :class:`SafeDiskSaver`. Unlike ``CheckpointSaver(save_final=True)``, which also saves when an
    exception is raised, a failed or interrupted run never touches ``path``: the last good weights stay.

    Args:
        network: the trained network.
        path: where ``model.pt`` goes.
    """

    def __init__(self, network: nn.Module, path: str | os.PathLike) -> None:
        self.path = Path(path)
        super().__init__({"model": network}, SafeDiskSaver(self.path.parent), filename_pattern=self.path.name,
                         n_saved=None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self._saved.clear()  # the same file every run: never delete it as an "older" checkpoint
        super().__call__(engine)
        logger.info(f"saved the final weights to {self.path}")


_CHECKPOINT_NAME = re.compile(r"checkpoint_(epoch|iteration)=(\d+)\.pt")


class EpochCheckpointSaver(Checkpoint):
    """The training checkpoint (network, optimizer, trainer, adversarial state) every ``save_interval`` epochs,
    written so that a kill at any moment leaves a complete one.

    The files are named as MONAI's ``CheckpointSaver`` names them (``checkpoint_epoch=N.pt``), so MONAI's
    ``CheckpointLoader`` and :func:`resume_from_latest` read them. Differences: each file is written atomically
    (temporary file, fsync, rename), the older one is removed only after the newer one is complete, and the
    checkpoints a resumed run finds in ``save_dir`` take part in the rotation (they are not left behind).

    Args:
        save_dir: the folder (``<run>/models``).
        save_dict: the objects to save (see :func:`checkpoint_dict`).
        save_interval: save every this many epochs (or iterations with ``epoch_level=False``).
        n_saved: how many checkpoints to keep (``None``: all).
        epoch_level: count epochs (default) or iterations.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        n_saved: int | None = 1,
        epoch_level: bool = True,
    ) -> None:
        if save_interval < 1:
            raise ValueError(f"save_interval must be >= 1, got {save_interval}")
        self.save_dir = Path(save_dir)
        self.save_interval = int(save_interval)
        self.epoch_level = bool(epoch_level)
        unit = "epoch" if epoch_level else "iteration"
        super().__init__(
            dict(save_dict),
            SafeDiskSaver(self.save_dir),
            filename_prefix="",
            score_function=lambda engine: getattr(engine.state, unit),
            score_name=unit,
            n_saved=n_saved,
            filename_pattern="checkpoint_{score_name}={score}.{ext}",
        )

    def attach(self, engine: Engine) -> None:
        remove_stale_tmp(self.save_dir)
        found = checkpoints_newest_first(self.save_dir)
        keep = found if self.n_saved is None else found[: self.n_saved]
        if all(checkpoint_problem(f) is None for f in keep):
            for old in found[len(keep):]:  # a save killed before its rotation left these behind
                Path(old).unlink()
                logger.info(f"removed {old}: newer complete checkpoints are kept")
        for path in reversed(keep):  # oldest first, as ignite keeps them
            n = int(_CHECKPOINT_NAME.fullmatch(Path(path).name).group(2))
            self._saved.append(Checkpoint.Item(n, Path(path).name))
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.save_interval), self)


def checkpoint_dict(**objects: Any) -> dict[str, Any]:
    """The ``save_dict`` of :class:`EpochCheckpointSaver` / MONAI's ``CheckpointLoader``: the given objects minus
    ``None`` (``adversarial=None`` for STD), so a VAT / AMAT / TEAT handler's state is checkpointed with the
    weights."""
    return {k: v for k, v in objects.items() if v is not None}


def checkpoints_newest_first(ckpt_dir: str | os.PathLike) -> list[str]:
    """The ``checkpoint_epoch=N.pt`` (or ``..._iteration=N.pt``) files in ``ckpt_dir``, largest N first."""
    found = []
    for f in Path(ckpt_dir).glob("checkpoint_*=*.pt") if Path(ckpt_dir).is_dir() else []:
        m = _CHECKPOINT_NAME.fullmatch(f.name)
        if m:
            found.append((int(m.group(2)), str(f)))
    return [f for _, f in sorted(found, reverse=True)]


def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str | None:
    """The checkpoint with the largest N in ``ckpt_dir``, if any (complete or not: see :func:`checkpoint_problem`)."""
    found = checkpoints_newest_first(ckpt_dir)
    return found[0] if found else None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` is not a complete ``torch.save`` file (empty, truncated, not a zip archive, a bad CRC), or
    ``None`` when it is. Reads the archive's index and checksums, unpickles nothing."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            return "it is empty (0 bytes)"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        return None if bad is None else f"its member {bad} fails its checksum"
    except zipfile.BadZipFile:
        return "it is truncated or not a torch checkpoint"
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"


def resume_from_latest(trainer: Engine, ckpt_dir: str | os.PathLike, save_dict: Mapping[str, Any]) -> str:
    """Attach a MONAI ``CheckpointLoader`` that restores ``save_dict`` (network, optimizer, trainer state,
    adversarial handler state) from the newest complete checkpoint in ``ckpt_dir`` when the trainer starts.

    A checkpoint that is empty or truncated (e.g. written by an older version that saved in place and was
    killed) is reported and skipped, and the one before it is used.

    Raises:
        FileNotFoundError: when ``ckpt_dir`` holds no complete checkpoint.
    """
    remove_stale_tmp(ckpt_dir)
    skipped = []
    for path in checkpoints_newest_first(ckpt_dir):
        problem = checkpoint_problem(path)
        if problem is None:
            break
        logger.warning(f"skipping checkpoint {path}: {problem}")
        skipped.append(f"{Path(path).name} ({problem})")
    else:
        detail = f"; unusable: {', '.join(skipped)}" if skipped else ""
        raise FileNotFoundError(f"resume: {ckpt_dir} holds no complete checkpoint_epoch=N.pt to resume from{detail}")
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
        problem = checkpoint_problem(path) or str(e).strip().splitlines()[0][:300]
        raise ValueError(f"cannot read checkpoint {path}: {problem}") from None
    if isinstance(state, Mapping):
        for key in ("network", "model", "state_dict", "net"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"checkpoint {path} holds no network state dict (keys: {keys})")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    mismatch = fit_problem(network, state)
    if mismatch:
        raise ValueError(f"checkpoint {path} does not fit the bundle's network ({mismatch})")
    Checkpoint.load_objects(to_load={"network": network}, checkpoint={"network": state})


def fit_problem(network: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """Why ``state`` cannot be loaded strictly into ``network``, in one line (which network, which shapes), or
    ``None`` when it fits."""
    own = network.state_dict()
    state = dict(state)
    for prefix, module in network.named_modules():  # keys a module drops on load (e.g. unused ResNet stages)
        if hasattr(module, "drop_trimmed_keys"):
            module.drop_trimmed_keys(state, f"{prefix}." if prefix else "")
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if not (missing or unexpected or shapes):
        return None
    parts = [f"the network is a {type(network).__name__} with {len(own)} tensors, the checkpoint has {len(state)}"]
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensors differ in shape, e.g. {k}: checkpoint {list(state[k].shape)}, "
                     f"network {list(own[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} not in the network, e.g. {unexpected[0]}")
    return "; ".join(parts)


def frozen_teacher(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """A frozen copy of ``network`` (a DDP wrapper is unwrapped) with the weights of ``path``, in eval mode and on
    the network's device: e.g. the STD model that makes the pseudo-labels of semi-supervised training."""
    teacher = copy.deepcopy(unwrap_network(network))
    load_weights(teacher, path)
    return teacher.eval().requires_grad_(False)


def load_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Initialise ``network`` (a DDP wrapper is unwrapped) from a state dict or a full checkpoint (e.g. to
    fine-tune the STD model)."""
    load_checkpoint(unwrap_network(network), path, device="cpu")
    logger.info(f"initialised the network from {path}")
    return network
