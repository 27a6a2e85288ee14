"""What a user sees when something is wrong: one line that names the file or argument, no traceback.

Every case is run through the command line (``amat_monai.cli.main``) exactly as a user would, on a synthetic
task, and the printed message is checked. Also: run folders (``run.json``), resuming past an incomplete
checkpoint, stale temporary files, and the order in which a checkpoint rotation writes and removes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from amat_monai import cli
from amat_monai.checkpoints import (
    SafeDiskSaver,
    atomic_torch_save,
    checkpoint_problem,
    remove_stale_tmp,
    resume_from_latest,
)
from amat_monai.data import make_synthetic_decathlon
from amat_monai.runs import RunFolderError, claim_run_folder
from conftest import PROJECT_ROOT, SEG_TINY

BUNDLE = PROJECT_ROOT / "bundles" / "hippocampus_seg"


def _overrides(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--override", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    return Path(make_synthetic_decathlon(tmp_path_factory.mktemp("err") / "Task_err", num_cases=5, seed=5))


@pytest.fixture(scope="module")
def std_run(task, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("std") / "std"
    assert cli.main(["train", "--method", "std", "--bundle", str(BUNDLE), "--dataset-dir", str(task),
                     "--output-dir", str(out), "--epochs", "1", "--device", "cpu", *_overrides(SEG_TINY)]) == 0
    assert cli.main(["calibrate", "--bundle", str(BUNDLE), "--dataset-dir", str(task), "--output-dir", str(out),
                     "--checkpoint", str(out / "models" / "model.pt"), "--device", "cpu", *_overrides(SEG_TINY)]) == 0
    return out


def _fails(capsys, argv: list[str]) -> str:
    """Run the command line, expect exit status 2, and return its one-line error message."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _train(task: Path, out: Path, *extra: str, method: str = "std") -> list[str]:
    return ["train", "--method", method, "--bundle", str(BUNDLE), "--dataset-dir", str(task), "--output-dir",
            str(out), "--epochs", "1", "--device", "cpu", *_overrides(SEG_TINY), *extra]


def _copy_task(task: Path, dst: Path) -> Path:
    shutil.copytree(task, dst)
    return dst


# ---- files that cannot be read ----------------------------------------------------------------------------
def test_truncated_image_names_the_file(task, tmp_path, capsys):
    bad = _copy_task(task, tmp_path / "Task_bad")
    for f in (bad / "imagesTr").glob("*.nii.gz"):
        f.write_bytes(f.read_bytes()[:200])
    msg = _fails(capsys, _train(bad, tmp_path / "run"))
    assert msg.startswith("amat-monai train: error: cannot read ") and str(bad / "imagesTr") in msg
    assert ".nii.gz: it is corrupt, truncated or not an image" in msg


def test_invalid_dataset_json_names_the_file(task, tmp_path, capsys):
    bad = _copy_task(task, tmp_path / "Task_bad")
    (bad / "dataset.json").write_text('{"labels": {')
    msg = _fails(capsys, _train(bad, tmp_path / "run"))
    assert f"{bad / 'dataset.json'} is not valid JSON" in msg


def test_text_file_as_checkpoint_names_the_file(task, tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    msg = _fails(capsys, ["evaluate", "--bundle", str(BUNDLE), "--dataset-dir", str(task), "--checkpoint", str(text),
                          "--output-dir", str(tmp_path / "ev"), "--device", "cpu", *_overrides(SEG_TINY)])
    assert msg == f"amat-monai evaluate: error: cannot read checkpoint {text}: it is truncated or not a torch " \
                  "checkpoint (--verbose shows the traceback)"


def test_weights_of_another_network_say_which_shapes(task, std_run, tmp_path, capsys):
    other = {**SEG_TINY, "network_filters": [4, 8, 16]}  # the same bundle built narrower
    msg = _fails(capsys, ["evaluate", "--bundle", str(BUNDLE), "--dataset-dir", str(task), "--checkpoint",
                          str(std_run / "models" / "model.pt"), "--output-dir", str(tmp_path / "ev"), "--device", "cpu",
                          *_overrides(other)])
    assert "does not fit the bundle's network (the network is a DynUNet with" in msg
    assert "tensors differ in shape, e.g. input_block.conv1.conv.weight: checkpoint [8, 1, 3, 3], network [4, 1, 3, 3]" in msg
    assert len(msg) < 600


@pytest.mark.parametrize("content,expected", [
    ('{"xi": [0.5, ', "is not valid JSON"),
    ('{"xi": "large"}', "'xi' must be a number or a list of numbers, got 'large'"),
    ('{"xi": [0.5, 0.6, 0.7], "terms": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}',
     "holds 3 thresholds ['a', 'b', 'c'] but the loss has 2 terms ['dice', 'ce']"),
])
def test_bad_xi_file_is_named_before_training(task, std_run, tmp_path, capsys, content, expected):
    xi = tmp_path / "xi.json"
    xi.write_text(content)
    out = tmp_path / "amat"
    msg = _fails(capsys, _train(task, out, "--xi", str(xi), "--condition", "terms", method="amat"))
    assert str(xi) in msg and expected in msg
    assert not (out / "models").exists()  # refused while building the handler, before any iteration


def test_all_zero_image_is_warned_about(task, tmp_path, capfd):
    blank = _copy_task(task, tmp_path / "Task_blank")
    import nibabel as nib
    first = sorted((blank / "imagesTr").glob("*.nii.gz"))
    for f in first:
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image(0 * img.get_fdata(), img.affine), str(f))
    assert cli.main(_train(blank, tmp_path / "run")) == 0  # it trains, but says so in the log
    warning = f"WARNING - {first[0]}: channel(s) [0] are constant (every voxel [0.0]); the case carries no image"
    assert warning in capfd.readouterr().out  # the bundle logs to stdout


# ---- arguments ----------------------------------------------------------------------------------------------
def test_override_typo_suggests_the_key(task, tmp_path, capsys):
    msg = _fails(capsys, _train(task, tmp_path / "run", "--override", "bacth_size=2"))
    assert "unknown key 'bacth_size'" in msg and "did you mean 'batch_size'?" in msg


def test_override_value_must_be_json(task, tmp_path, capsys):
    msg = _fails(capsys, _train(task, tmp_path / "run", "--override", "learning_rate=1e-3x"))
    assert "--override learning_rate=1e-3x: the value is not JSON" in msg


def test_override_expression_needs_allow_expr(task, tmp_path, capsys):
    expr = "learning_rate=\"$float('1e-3')\""
    msg = _fails(capsys, _train(task, tmp_path / "run", "--override", expr))
    assert "is a MONAI expression or macro, which runs code" in msg and "--allow-expr" in msg
    assert cli.main(_train(task, tmp_path / "run", "--override", expr, "--allow-expr")) == 0


def test_device_cuda_without_cuda(task, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    msg = _fails(capsys, _train(task, tmp_path / "run", "--device", "cuda"))
    assert "--device cuda: no CUDA device is available" in msg and "use --device cpu" in msg


@pytest.mark.parametrize("option,value", [("--attacks", ","), ("--eps", ","), ("--steps", "x")])
def test_empty_or_bad_lists_are_argument_errors(task, tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as e:
        cli.main(["evaluate", "--bundle", str(BUNDLE), "--dataset-dir", str(task), "--checkpoint", "m.pt",
                  "--output-dir", str(tmp_path), option, value])
    assert e.value.code == 2
    assert f"argument {option}: expected" in capsys.readouterr().err


def test_verbose_shows_the_traceback(task, tmp_path):
    with pytest.raises(KeyError, match="bacth_size"):
        cli.main(_train(task, tmp_path / "run", "--override", "bacth_size=2", "--verbose"))


# ---- run folders ----------------------------------------------------------------------------------------------
def test_a_finished_run_is_not_restarted_without_resume(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train(task, out)) == 0
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["identity"]["method"] == "std" and manifest["identity"]["max_cases"] is None
    msg = _fails(capsys, _train(task, out))
    assert "holds this run's checkpoint checkpoint_epoch=1.pt: set resume=true (`amat-monai train --resume`)" in msg
    assert cli.main([*_train(task, out, "--resume"), "--epochs", "2"]) == 0
    assert sorted(f.name for f in (out / "models").glob("checkpoint_*")) == ["checkpoint_epoch=2.pt"]
    assert [s["resume"] for s in json.loads((out / "run.json").read_text())["started"]] == [False, True]


def test_a_folder_of_another_run_is_refused(task, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train(task, out, "--max-cases", "4")) == 0
    msg = _fails(capsys, _train(task, out, "--resume"))  # the same folder on the whole data set
    assert "holds another run" in msg and "max_cases: 4 there, None now" in msg
    msg = _fails(capsys, _train(task, out, "--max-cases", "4", "--method", "vat", "--eps", "1"))
    assert "method: 'std' there, 'vat' now" in msg


def test_identity_fields_added_after_a_run_started_do_not_stop_it_resuming(tmp_path, caplog):
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    (out / "models" / "checkpoint_epoch=1.pt").write_bytes(b"")
    older = {"method": "amat", "delta": 5.0, "ssat": {"weight": 3.0}}
    (out / "run.json").write_text(json.dumps({"identity": older}))
    now = {**older, "init": None, "ssat": {"weight": 3.0, "confidence_over": "all"}}
    with caplog.at_level(logging.WARNING, logger="amat_monai.runs"):
        claim_run_folder(out, now, resume=True)
    assert "predates the identity fields init, ssat.confidence_over" in caplog.text
    with pytest.raises(RunFolderError, match=r"holds another run .*: ssat\.weight: 3\.0 there, 1\.0 now"):
        claim_run_folder(out, {**now, "ssat": {"weight": 1.0, "confidence_over": "all"}}, resume=True)
    with pytest.raises(RunFolderError, match="delta: 5.0 there, '<absent>' now"):  # a field dropped since is a change
        claim_run_folder(out, {"method": "amat", "ssat": {"weight": 3.0}}, resume=True)


def test_a_leftover_split_without_manifest_is_not_reused(task, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "split.json").write_text(json.dumps({"training": ["a"], "validation": ["b"], "test": ["c"]}))
    msg = _fails(capsys, _train(task, out))
    assert "already holds split.json but no run.json: it belongs to an earlier run" in msg


def test_a_hand_made_split_outside_the_folder_is_used(task, tmp_path):
    from amat_monai.data import load_datalist, split_cases

    split = tmp_path / "my_split.json"
    split.write_text(json.dumps(split_cases([c["case"] for c in load_datalist(task)], seed=3)))
    assert cli.main(_train(task, tmp_path / "run", "--override", f"split_file={json.dumps(str(split))}")) == 0
    assert not (tmp_path / "run" / "split.json").exists()


# ---- checkpoints --------------------------------------------------------------------------------------------
def test_resume_skips_an_incomplete_newer_checkpoint(tmp_path, caplog):
    from ignite.engine import Engine

    net = torch.nn.Linear(2, 1)
    atomic_torch_save({"network": net.state_dict()}, tmp_path / "checkpoint_epoch=1.pt")
    (tmp_path / "checkpoint_epoch=2.pt").write_bytes(b"")  # what an in-place save killed by a signal left
    (tmp_path / "checkpoint_epoch=3.pt").write_bytes(b"PK\x03\x04 half an archive")
    with caplog.at_level(logging.WARNING, logger="amat_monai.checkpoints"):
        path = resume_from_latest(Engine(lambda e, b: None), tmp_path, {"network": net})
    assert path == str(tmp_path / "checkpoint_epoch=1.pt")
    warned = [r.message for r in caplog.records]
    assert f"skipping checkpoint {tmp_path / 'checkpoint_epoch=3.pt'}: it is truncated or not a torch checkpoint" in warned
    assert f"skipping checkpoint {tmp_path / 'checkpoint_epoch=2.pt'}: it is empty (0 bytes)" in warned
    (tmp_path / "checkpoint_epoch=1.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"holds no complete checkpoint.*checkpoint_epoch=3.pt \(it is truncated"):
        resume_from_latest(Engine(lambda e, b: None), tmp_path, {"network": net})


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f".model.pt.{dead}.abcd1234.tmp"
    live = tmp_path / f".model.pt.{os.getpid()}.efgh5678.tmp"  # a save in progress in this process
    other = tmp_path / ".notes.tmp"
    for f in (stale, live, other):
        f.write_bytes(b"x")
    assert remove_stale_tmp(tmp_path) == [stale.name]
    assert not stale.exists() and live.exists() and other.exists()


def test_rotation_removes_the_older_checkpoint_only_after_the_newer_is_complete(tmp_path):
    saver = SafeDiskSaver(tmp_path)
    saver({"v": torch.ones(1)}, "checkpoint_epoch=1.pt")
    saver.remove("checkpoint_epoch=1.pt")  # what ignite's Checkpoint asks before saving epoch 2
    assert (tmp_path / "checkpoint_epoch=1.pt").is_file()
    with pytest.raises(RuntimeError):
        saver({"v": _Unpicklable()}, "checkpoint_epoch=2.pt")  # a save that fails half way
    assert (tmp_path / "checkpoint_epoch=1.pt").is_file() and not (tmp_path / "checkpoint_epoch=2.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    saver({"v": torch.zeros(1)}, "checkpoint_epoch=2.pt")
    assert not (tmp_path / "checkpoint_epoch=1.pt").exists()
    assert checkpoint_problem(tmp_path / "checkpoint_epoch=2.pt") is None
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "checkpoint_epoch=2.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


# ---- help -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["train"], ["calibrate"], ["evaluate"], ["compare"], ["serve"], ["demo"]])
def test_help_is_plain_text_and_names_the_outputs(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([*command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for markup in ("``", ":class:", ":func:", ":mod:", ":meth:"):
        assert markup not in text, (command, markup)
    assert ("SUBCOMMAND --help` says what it writes" if not command else ". Writes ") in text


# ---- semi-supervised training -----------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--ssat"], "ssat needs unlabelled cases: give labelled_fraction below 1"),
    (["--labelled-fraction", "1.5"], "labelled_fraction must lie in (0, 1], got 1.5"),
    (["--ssat", "--labelled-fraction", "0.5", "--override", "ssat_wieght=1.0"], "did you mean 'ssat_weight'?"),
])
def test_semi_supervised_settings_are_named(task, tmp_path, capsys, extra, expected):
    assert expected in _fails(capsys, _train(task, tmp_path / "run", *extra, method="vat"))


def test_ssat_trains_from_the_command_line(task, tmp_path, capsys):
    argv = _train(task, tmp_path / "run", "--ssat", "--labelled-fraction", "0.5", "--eps", "1.0", method="vat")
    assert cli.main(argv) == 0 and "trained vat + SSAT" in capsys.readouterr().out
    assert "ssat" in torch.load(tmp_path / "run" / "models" / "checkpoint_epoch=1.pt", weights_only=False)
