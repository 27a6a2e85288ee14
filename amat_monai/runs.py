"""What a training run folder belongs to: its manifest, ``run.json``.

A run folder (``output_dir``) holds checkpoints and a ``split.json`` that only make sense for the run that wrote
them. Without a record of that run, resuming in a folder that holds an older run's checkpoints picked the
highest epoch whoever wrote it, and a ``split.json`` left by a ``max_cases=6`` run was reused on the full data
set. :func:`claim_run_folder`, the first item of every bundle's ``train.json`` run list, prevents both:

* an empty folder gets a ``run.json`` recording the run's identity (method, data set folder, ``max_cases``,
  seed, split fractions, and the method's own settings) and its hash;
* a folder whose ``run.json`` names another identity is refused, naming the fields that differ (a field added to
  the identity after that run started is not compared, with a warning, so that older runs still resume);
* a folder holding checkpoints of the same run is refused unless ``resume`` is set (no silent restart over
  them); with ``resume`` the run continues;
* a folder with checkpoints or a ``split.json`` but no ``run.json`` (an older version's run, or another tool's)
  is refused unless ``resume`` is set, which adopts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from amat_monai.checkpoints import atomic_write_text, checkpoints_newest_first
from amat_monai.distributed import get_rank, is_distributed

__all__ = ["MANIFEST_NAME", "RunFolderError", "identity_sha256", "read_manifest", "claim_run_folder"]

logger = logging.getLogger(__name__)

MANIFEST_NAME = "run.json"

#: identity fields that may legitimately differ on resume: the starting weights matter only before epoch 1
_ONLY_AT_START = ("init_checkpoint",)


class RunFolderError(ValueError):
    """The run folder belongs to another run, or would be overwritten without ``resume``."""


def _canonical(identity: Mapping[str, Any]) -> dict[str, Any]:
    # tuples, paths and numpy scalars become plain JSON values, so a resumed run compares equal to its record
    return json.loads(json.dumps(dict(identity), default=str, sort_keys=True))


def identity_sha256(identity: Mapping[str, Any]) -> str:
    """The hash of a run's identity (its canonical JSON), recorded in ``run.json``."""
    return hashlib.sha256(json.dumps(_canonical(identity), sort_keys=True).encode()).hexdigest()


def read_manifest(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``output_dir/run.json``, or ``None`` when there is none.

    Raises:
        RunFolderError: naming the file when it is not valid JSON with an ``identity``.
    """
    path = Path(output_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("identity"), dict):
            raise ValueError("no 'identity' object")
    except (ValueError, AttributeError) as e:
        raise RunFolderError(f"{path} is not a run manifest ({e}); delete it or use a new output_dir") from None
    return manifest


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Fields of the two identities (nested ones as ``a.b``) that differ, as messages; fields the recorded one lacks
    are not compared (see :func:`_added_since`)."""
    out = []
    for key in sorted(recorded):
        if key in _ONLY_AT_START and current.get(key) is None:
            continue
        there, now = recorded[key], current.get(key, "<absent>")
        if isinstance(there, Mapping) and isinstance(now, Mapping):
            out += _differences(there, now, f"{prefix}{key}.")
        elif there != now:
            out.append(f"{prefix}{key}: {there!r} there, {now!r} now")
    return out


def _added_since(recorded: Mapping[str, Any], current: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Fields this version records that the run's ``run.json`` lacks: added to the identity after the run started, so
    that it still resumes (they were not checked then either)."""
    out = [f"{prefix}{k}" for k in sorted(set(current) - set(recorded))]
    for key in sorted(set(current) & set(recorded)):
        if isinstance(current[key], Mapping) and isinstance(recorded[key], Mapping):
            out += _added_since(recorded[key], current[key], f"{prefix}{key}.")
    return out


def claim_run_folder(
    output_dir: str | os.PathLike,
    identity: Mapping[str, Any],
    resume: bool = False,
    ckpt_dir: str | os.PathLike | None = None,
    split_file: str | os.PathLike | None = None,
) -> str:
    """Check that ``output_dir`` may hold this run and record it there (rank 0 writes ``run.json``).

    Args:
        output_dir: the run folder.
        identity: what makes two runs the same run (JSON values), e.g. method, data set folder, ``max_cases``.
        resume: the run continues from its checkpoints (``resume=true`` / ``amat-monai train --resume``).
        ckpt_dir: where the checkpoints are (default ``output_dir/models``).
        split_file: the run's split file, if it writes one (one outside ``output_dir`` is the user's own).

    Returns:
        the path of ``run.json``.

    Raises:
        RunFolderError: with a message that says what the folder holds and what to do.
    """
    out = Path(output_dir)
    ckpts = checkpoints_newest_first(ckpt_dir if ckpt_dir is not None else out / "models")
    split = Path(split_file) if split_file is not None else None
    current = _canonical(identity)
    manifest = read_manifest(out)
    held = [Path(ckpts[0]).name] if ckpts else []
    if split is not None and split.is_file() and out.resolve() in split.resolve().parents:
        held.append(split.name)  # a hand-made split given from elsewhere belongs to no run
    if manifest is None and held:
        if not resume:
            raise RunFolderError(
                f"{out} already holds {' and '.join(held)} but no {MANIFEST_NAME}: it belongs to an earlier run. "
                "Use a new output_dir, or set resume=true (`amat-monai train --resume`) to continue that run as is"
            )
        logger.warning(f"{out} has no {MANIFEST_NAME} (an older run): resuming it as is and recording this run")
    elif manifest is not None:
        diff = _differences(manifest["identity"], current)
        added = _added_since(manifest["identity"], current)
        if added and not diff:
            logger.warning(f"{out / MANIFEST_NAME} predates the identity fields {', '.join(added)}: they are not checked")
        if diff:
            raise RunFolderError(
                f"{out} holds another run ({out / MANIFEST_NAME}): " + "; ".join(diff)
                + ". Use a new output_dir for this run"
            )
        if ckpts and not resume:
            raise RunFolderError(
                f"{out} holds this run's checkpoint {Path(ckpts[0]).name}: set resume=true "
                "(`amat-monai train --resume`) to continue it, or use a new output_dir to start over"
            )
    path = out / MANIFEST_NAME
    # before the process group exists (the claim comes first), torchrun's RANK tells rank 0
    rank = get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))
    if rank == 0:
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        record = dict(manifest or {"created": now, "identity": current})
        record["identity_sha256"] = identity_sha256(record["identity"])  # the recorded identity, which matched
        record["started"] = [*record.get("started", []), {"time": now, "resume": bool(resume)}]
        atomic_write_text(path, json.dumps(record, indent=2) + "\n")
    return str(path)
