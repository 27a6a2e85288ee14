"""Fault injection: a real AMAT training process is killed (SIGKILL) in the middle of saving a checkpoint or the
final ``model.pt``, at a precise moment, and then resumed.

Each scenario names the save to interrupt (the epoch-N checkpoint or the final model) and the moment:
``write@f`` (after a fraction f of the bytes of the temporary file), ``rename`` (the temporary file complete,
not yet renamed) or ``renamed`` (renamed, the older checkpoint not yet removed). The child process makes that
moment last (it sleeps there and says so in a marker file) so that the kill lands in it. After every kill:

* every ``checkpoint_epoch=N.pt`` and ``model.pt`` in the folder is complete (the kill never leaves a
  truncated file under a real name), and a ``model.pt`` written before is byte for byte unchanged (unless the
  kill came after the new one was renamed into place: then it is the complete new one);
* ``--resume`` continues from the newest complete checkpoint, with exactly the margins stored in it, cleans up
  the killed writer's temporary file, and ends with one checkpoint and a final ``model.pt``;
* when no checkpoint was complete yet, resuming says so, and starting over in the same folder works.

Twenty scenarios kill once, four kill the resumed run again (28 kills in all). ``AMAT_FAULT_KILLS`` (default 4)
sets how many scenarios run; the closing note of the issue ran all of them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amat_monai.checkpoints import checkpoint_problem, checkpoints_newest_first, file_sha256
from amat_monai.data import make_synthetic_decathlon
from amat_monai.workflows import calibrate, train
from conftest import PROJECT_ROOT, SEG_TINY

BUNDLE = PROJECT_ROOT / "bundles" / "hippocampus_seg"
EPOCHS = 3
SETTINGS = {**SEG_TINY, "epochs": EPOCHS, "seed": 1}

#: runs in the child: train AMAT with the bundle, but make one chosen moment of one chosen save last 60 s
CHILD = r'''
import json, os, sys, time
from pathlib import Path
import torch
import amat_monai.checkpoints as ck
from amat_monai.workflows import train

args = json.loads(sys.argv[1])
target, phase, marker = args.pop("target"), args.pop("phase"), Path(args.pop("marker"))

def hold(where):
    marker.write_text(where)
    time.sleep(60)  # the parent kills us here

def is_target(path):
    return Path(path).name.split(".pt")[0].lstrip(".") == target

real_save, real_replace = torch.save, os.replace

def save(obj, f, *a, **k):
    if phase.startswith("write@") and hasattr(f, "name") and is_target(f.name):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *a, **k)
        data = buf.getvalue()
        cut = int(len(data) * float(phase.split("@")[1]))
        f.write(data[:cut])
        f.flush()
        hold(f"{f.name}: {cut} of {len(data)} bytes")
    return real_save(obj, f, *a, **k)

def replace(src, dst):
    if phase == "rename" and is_target(dst):
        hold(f"{src} complete, not renamed")
    real_replace(src, dst)
    if phase == "renamed" and is_target(dst):
        hold(f"{dst} renamed, older not removed")

torch.save, os.replace = save, replace
train(args.pop("bundle"), "amat", args.pop("data"), args.pop("out"), **args)
'''


def _scenarios() -> list[tuple[tuple[str, str], ...]]:
    """Each scenario is the kills of one run folder, in order (a resumed run can be killed again)."""
    phases = ["write@0.5", "renamed", "rename", "write@0.1", "write@0.9"]
    grid = [((f"checkpoint_epoch={n}", p),) for p in phases for n in (2, 1, 3)]
    grid += [(("model", p),) for p in phases]
    twice = [
        (("checkpoint_epoch=2", "write@0.5"), ("checkpoint_epoch=3", "rename")),
        (("checkpoint_epoch=1", "renamed"), ("checkpoint_epoch=2", "write@0.9")),
        (("checkpoint_epoch=2", "rename"), ("model", "write@0.5")),
        (("checkpoint_epoch=3", "write@0.1"), ("model", "renamed")),
    ]
    # the four CI runs first: mid-write of epoch 2, after the first rename, the final save, no checkpoint yet
    first = [(("checkpoint_epoch=2", "write@0.5"),), (("checkpoint_epoch=1", "renamed"),), (("model", "rename"),),
             (("checkpoint_epoch=1", "write@0.5"),)]
    return first + [s for s in grid if s not in first] + twice


KILLS = int(os.environ.get("AMAT_FAULT_KILLS", "4"))
SCENARIOS = _scenarios()[:KILLS]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A synthetic task, an STD model and its ξ: what an AMAT run starts from."""
    root = tmp_path_factory.mktemp("faults")
    data = make_synthetic_decathlon(root / "Task_faults", num_cases=5, seed=4)
    std = train(BUNDLE, "std", data, root / "std", device="cpu", **{**SETTINGS, "epochs": 1})
    xi = calibrate(BUNDLE, data, root / "std", std["model"], device="cpu", **SEG_TINY)
    return {"data": data, "xi": xi, "init": std["model"]}


def _amat_args(prepared, out: Path, resume: bool, epochs: int = EPOCHS) -> dict:
    return {"bundle": str(BUNDLE), "data": prepared["data"], "out": str(out), "device": "cpu",
            "xi_file": prepared["xi"], "init_checkpoint": prepared["init"], "resume": resume,
            **{**SETTINGS, "epochs": epochs}}


def _run_child(args: dict, target: str | None = None, phase: str = "", marker: Path | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess | str:
    """Run the child; with a ``target``, SIGKILL it once it holds at the chosen moment and return what it said."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(PROJECT_ROOT))
    marker = marker or Path(args["out"]).with_name("marker.txt")
    marker.unlink(missing_ok=True)
    payload = json.dumps({**args, "target": target or "<none>", "phase": phase, "marker": str(marker)})
    proc = subprocess.Popen([sys.executable, "-c", CHILD, payload], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if target is None:
        out, _ = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, out[-3000:]
        return subprocess.CompletedProcess(proc.args, 0, out)
    deadline = time.monotonic() + timeout
    while not marker.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"the child ended before reaching {target} {phase}:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"{target} {phase} not reached in {timeout} s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def _adversarial_state(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["adversarial"]


def _assert_complete(models: Path) -> None:
    for f in [*checkpoints_newest_first(models), *([str(models / "model.pt")] if (models / "model.pt").exists() else [])]:
        assert checkpoint_problem(f) is None, f"{f}: {checkpoint_problem(f)}"


def _name(kills) -> str:
    return "+".join(f"{t}-{p}" for t, p in kills)


@pytest.mark.parametrize("kills", SCENARIOS, ids=[_name(k) for k in SCENARIOS])
def test_kill_during_a_save_then_resume(prepared, tmp_path, kills):
    out = tmp_path / "amat"
    models = out / "models"
    if kills[0][0] == "model":  # a finished 2-epoch run whose model.pt must survive the killed final save of epoch 3
        _run_child(_amat_args(prepared, out, resume=False, epochs=EPOCHS - 1))
    resumed_from = []  # (epoch, the margin history stored in the checkpoint a run resumed from)
    for target, phase in kills:
        model_before = file_sha256(models / "model.pt") if (models / "model.pt").exists() else None
        complete = checkpoints_newest_first(models)
        if complete:
            stored = _adversarial_state(complete[0])
            resumed_from.append((len(stored["margins_per_epoch"]), stored["margins_per_epoch"]))
            # the table a run resumes from is the one its history ends with
            assert stored["margins_per_epoch"][-1] == [round(v, 4) for v in stored["margins"]["margins"].tolist()]
        said = _run_child(_amat_args(prepared, out, resume=bool(complete)), target, phase)

        _assert_complete(models)
        model_after = file_sha256(models / "model.pt") if (models / "model.pt").exists() else None
        renamed_model = target == "model" and phase == "renamed"
        assert (model_after != model_before) == renamed_model, f"model.pt {model_before} -> {model_after}: {said}"
        leftovers = [f.name for f in models.glob(".*.tmp")]
        assert bool(leftovers) == (phase != "renamed"), said  # the killed writer's temporary file
        if not checkpoints_newest_first(models):  # killed writing the very first checkpoint: nothing to resume
            assert target == "checkpoint_epoch=1" and phase != "renamed"
            with pytest.raises(AssertionError, match="holds no complete checkpoint"):
                _run_child(_amat_args(prepared, out, resume=True))

    complete = checkpoints_newest_first(models)
    if complete:
        stored = _adversarial_state(complete[0])
        resumed_from.append((len(stored["margins_per_epoch"]), stored["margins_per_epoch"]))
    finished = _run_child(_amat_args(prepared, out, resume=bool(complete))).stdout
    if complete:
        assert f"resuming from {complete[0]}" in finished
    _assert_complete(models)
    assert [Path(f).name for f in checkpoints_newest_first(models)] == [f"checkpoint_epoch={EPOCHS}.pt"]
    assert (models / "model.pt").is_file() and not list(models.glob(".*.tmp"))
    final = _adversarial_state(checkpoints_newest_first(models)[0])
    assert len(final["margins_per_epoch"]) == EPOCHS
    # every resumed run started from exactly the stored margin table: the history only ever grew from it
    for epoch, history in resumed_from:
        assert final["margins_per_epoch"][:epoch] == history
