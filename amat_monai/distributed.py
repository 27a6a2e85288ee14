"""Multi-process training (PyTorch distributed, ``torchrun``) for the bundles, and per-sample state kept in sync.

A bundle's ``configs/multi_gpu_train.json`` uses :func:`init_process_group`, :func:`local_device`,
:func:`wrap_ddp` and :func:`rank_zero_handlers`; the adversarial handlers call :func:`sync_margins` /
:func:`sync_ensemble` after each iteration so that every rank holds the full per-sample table (and a checkpoint
written by rank 0 holds every sample's margin, whatever the number of processes that resumes from it);
:func:`launch` starts ``torch.distributed.run`` with the same ConfigWorkflow arguments as a single-process run.

Every function is a no-op (or returns its input) when the process group is not initialised or has one process,
so a config that uses them also runs as a plain single process.

Example::

    torchrun --nproc_per_node=2 -m monai.bundle run \\
        --config_file "['configs/train.json','configs/amat.json','configs/multi_gpu_train.json']"
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "RANK_ZERO_ONLY",
    "is_distributed",
    "get_rank",
    "get_world_size",
    "backend_for",
    "local_device",
    "init_process_group",
    "destroy_process_group",
    "wrap_ddp",
    "unwrap_network",
    "rank_zero_handlers",
    "match_epoch_length",
    "SynchronizedTimeLimit",
    "all_gather_objects",
    "sync_margins",
    "sync_ensemble",
    "build_launch_command",
    "launch",
]

logger = logging.getLogger(__name__)

#: Handler classes (matched by name along the class hierarchy, so optional packages need not be importable) that
#: write files or logs: only rank 0 keeps them. Every other handler (adversarial handlers, learning-rate
#: schedules, validation, checkpoint loading) runs on every rank, since they take part in collectives or change
#: the state every rank must share.
RANK_ZERO_ONLY = (
    "CheckpointSaver",
    "EpochCheckpointSaver",
    "FinalModelSaver",
    "AdversarialStatsHandler",
    "StatsHandler",
    "TensorBoardStatsHandler",
    "TensorBoardImageHandler",
    "MetricsSaver",
    "MetricLogger",
    "ClassificationSaver",
    "MLFlowHandler",
    "ClearMLStatsHandler",
    "ClearMLImageHandler",
    "ProgressBar",
)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed), from ``ignite.distributed``."""
    return idist.get_rank()


def get_world_size() -> int:
    """Number of processes (1 when not distributed), from ``ignite.distributed``."""
    return idist.get_world_size()


def backend_for(device: torch.device | str) -> str:
    """``"nccl"`` for CUDA devices (when available), ``"gloo"`` otherwise."""
    if torch.device(device).type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def local_device(device: torch.device | str | None = None) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for a CUDA request (``None`` means CUDA when available), the
    CPU otherwise. The CUDA device is made current, so that a plain ``"cuda"`` elsewhere in a config means it."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was requested but CUDA is not available; use device 'cpu'")
    if device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    return device


def init_process_group(device: torch.device | str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group described by ``torchrun``'s environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...).

    Picks NCCL for CUDA and gloo for the CPU. Returns whether this process is now in a group: False (and nothing
    done) when the environment names no group, so that the same config runs as a single process.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or not dist.is_available():
        return False
    device = local_device(device)
    kwargs: dict[str, Any] = {"backend": backend_for(device)}
    if timeout_s is not None:
        from datetime import timedelta

        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if kwargs["backend"] == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    logger.info(f"rank {dist.get_rank()}/{dist.get_world_size()} on {device} ({kwargs['backend']})")
    return True


def destroy_process_group() -> None:
    """Leave the process group (after a barrier, so no rank tears it down while another still uses it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(network: nn.Module, device: torch.device | str | None = None, **ddp_kwargs) -> nn.Module:
    """``network`` on this process's device, inside ``DistributedDataParallel`` when distributed.

    Joins the process group first when ``torchrun``'s environment names one, so the config's order of evaluation
    does not matter. With a single process the network itself is returned (no wrapper, same checkpoint keys).
    """
    init_process_group(device)
    device = local_device(device)
    network = network.to(device)
    if not is_distributed():
        return network
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index])
        ddp_kwargs.setdefault("output_device", device.index)
    return nn.parallel.DistributedDataParallel(network, **ddp_kwargs)


def unwrap_network(network: nn.Module) -> nn.Module:
    """The module under a ``DistributedDataParallel`` / ``DataParallel`` wrapper: attacks need input gradients
    only, and must not trigger the wrapper's gradient synchronisation."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def _rank_zero_only(handler: Any) -> bool:
    return any(cls.__name__ in RANK_ZERO_ONLY for cls in type(handler).__mro__)


def rank_zero_handlers(handlers: Sequence[Any] | None) -> list[Any] | None:
    """All ``handlers`` on rank 0; on the other ranks, those that do not write files or logs (see
    :data:`RANK_ZERO_ONLY`). ``None`` stays ``None``."""
    if handlers is None:
        return None
    handlers = [h for h in handlers if h is not None]
    if get_rank() == 0:
        return handlers
    return [h for h in handlers if not _rank_zero_only(h)]


def match_epoch_length(trainer: Any) -> None:
    """Keep a resumed trainer's epochs as long as its own data loader.

    A checkpoint written by ``N`` processes stores ``epoch_length = len(loader) / N``; resumed by another number
    of processes, Ignite would keep that length and cut every epoch short (or long). Attach this right after the
    ``CheckpointLoader``: at ``STARTED`` it sets ``epoch_length`` to ``len(trainer.data_loader)`` and the
    iteration counter to ``epoch * epoch_length`` (same number of completed epochs).
    """
    from ignite.engine import Events

    def _match(engine) -> None:
        try:
            length = len(engine.data_loader)
        except (AttributeError, TypeError):
            return  # an iterable without a length: Ignite's own epoch_length rules apply
        state = engine.state
        if length > 0 and state.epoch_length not in (None, length):
            logger.info(f"resumed at epoch {state.epoch}: epoch length {state.epoch_length} -> {length} iterations")
            state.epoch_length = length
            state.iteration = state.epoch * length

    trainer.add_event_handler(Events.STARTED, _match)


class SynchronizedTimeLimit:
    """Ignite ``TimeLimit`` that every rank obeys at the same iteration (a rank stopping alone would leave the
    others waiting in a collective). Attach at ``ITERATION_COMPLETED``; the clock starts at construction.

    Args:
        limit_sec: stop training after this many seconds (as soon as any rank passes it).
    """

    def __init__(self, limit_sec: float) -> None:
        if limit_sec <= 0:
            raise ValueError(f"limit_sec must be positive, got {limit_sec}")
        self.limit_sec = float(limit_sec)
        self.start = time.time()

    def __call__(self, engine: Any) -> None:
        stop = time.time() - self.start > self.limit_sec
        if is_distributed():
            stop = any(all_gather_objects(stop))
        if stop:
            logger.info(f"time limit of {self.limit_sec:.0f} s reached: stopping training")
            engine.terminate()


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` when not distributed). ``obj`` must be picklable."""
    if not is_distributed():
        return [obj]
    # torch's object gather, not idist.all_gather: that one concatenates tensors and pads them to one size
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def sync_margins(table, ids: Sequence[str], values: torch.Tensor, trained_at: torch.Tensor | None = None) -> None:
    """Give every rank the margins each rank just set for its own batch.

    Call it on every rank, once per iteration, after ``table.set(ids, values, trained_at)``. The updates of all
    ranks are applied in rank order on every rank (its own included, its visit not counted twice), so a sample
    that two ranks saw in the same iteration (``DistributedSampler`` pads the last batches with repeats) ends
    with the same value everywhere. A no-op when not distributed.

    Args:
        table: a :class:`amat_monai.margins.MarginTable`.
        ids: this rank's sample ids for the iteration.
        values: their new margins ``[B]``.
        trained_at: the radii they were trained at (counted as visits on the other ranks).
    """
    if not is_distributed():
        return

    def as_list(t):
        return None if t is None else torch.as_tensor(t).detach().to("cpu", torch.float64).reshape(-1).tolist()

    mine = ([str(i) for i in ids], as_list(values), as_list(trained_at))
    for rank, (rank_ids, rank_values, rank_radii) in enumerate(all_gather_objects(mine)):
        if rank_ids:
            radii = None if rank_radii is None or rank == get_rank() else torch.tensor(rank_radii, dtype=torch.float64)
            table.set(rank_ids, torch.tensor(rank_values, dtype=torch.float64), radii)


def sync_ensemble(ensemble: dict[str, torch.Tensor], ids: Sequence[str]) -> None:
    """Share the per-sample entries of ``ensemble`` (TEAT's temporal ensembles) that each rank just updated.

    Call it on every rank once per iteration after updating ``ensemble[i]`` for this rank's ``ids``; the entries
    are gathered as CPU tensors and written in rank order. A no-op when not distributed.
    """
    if not is_distributed():
        return
    mine = [(str(i), ensemble[str(i)].detach().cpu()) for i in ids]
    for rank_entries in all_gather_objects(mine):
        for key, value in rank_entries:
            ensemble[key] = value


def _check_config_files(config_file: str | Sequence[str]) -> list[str]:
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file)
    if not files:
        raise ValueError("config_file: at least one config file is needed")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"config_file: no such file {f!r}")
    return [os.fspath(f) for f in files]


def build_launch_command(args_file: str, nproc: int, python: str = sys.executable) -> list[str]:
    """The ``torch.distributed.run`` command line that runs ``monai.bundle run`` with an ``args_file`` on
    ``nproc`` local processes (``--standalone``: a free rendezvous port on this machine)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive integer, got {nproc!r}")
    return [
        python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "monai.bundle", "run", "--args_file", args_file,
    ]  # fmt: skip


def launch(
    config_file: str | Sequence[str],
    nproc: int,
    overrides: Mapping[str, Any] | None = None,
    *,
    meta_file: str | Sequence[str] | None = None,
    logging_file: str | None = None,
    workflow_type: str = "train",
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> int:
    """Run a bundle workflow on ``nproc`` local processes with ``torch.distributed.run``.

    The same arguments as ``monai.bundle.ConfigWorkflow(config_file=..., workflow_type=..., **overrides)`` are
    written to a JSON ``args_file`` for ``monai.bundle run`` (so override values keep their JSON types). The
    config files should include the bundle's ``multi_gpu_train.json``.

    Args:
        config_file: the config files, merged in order.
        nproc: number of processes (one per GPU; on the CPU, each uses gloo).
        overrides: ConfigWorkflow overrides, ``{"id#path": value}``.
        meta_file, logging_file, workflow_type: passed to ConfigWorkflow.
        env: extra environment variables for the processes.
        check: raise ``RuntimeError`` when the run fails.

    Returns:
        the exit status of ``torch.distributed.run``.
    """
    files = _check_config_files(config_file)
    args: dict[str, Any] = {"config_file": files, "workflow_type": workflow_type}
    if meta_file is not None:
        args["meta_file"] = meta_file
    if logging_file is not None:
        args["logging_file"] = logging_file
    for key, value in (overrides or {}).items():
        if key in args:
            raise ValueError(f"overrides: {key!r} is a launch argument, not a config override")
        args[key] = value
    with tempfile.TemporaryDirectory(prefix="amat_launch_") as tmp:
        args_file = os.path.join(tmp, "args.json")
        with open(args_file, "w") as f:
            json.dump(args, f, indent=2, default=str)
        cmd = build_launch_command(args_file, nproc)
        logger.info("launching: " + " ".join(cmd))
        returncode, tail = _run_teeing_output(cmd, {**os.environ, **(env or {})})
    if check and returncode != 0:
        raise RuntimeError(
            f"distributed run of {files} on {nproc} processes failed with exit status {returncode}; the last lines "
            "it printed:\n" + "".join(tail)
        )
    return returncode


def _run_teeing_output(cmd: list[str], env: Mapping[str, str], keep: int = 60) -> tuple[int, list[str]]:
    """Run ``cmd``, passing its output (stdout and stderr, merged) on to this process's stderr as it comes; returns
    its exit status and the last ``keep`` lines, so that a failure can say why (a captured test log is cut)."""
    tail: deque[str] = deque(maxlen=keep)
    with subprocess.Popen(cmd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stderr.write(line)
            tail.append(line)
    return proc.returncode, list(tail)
