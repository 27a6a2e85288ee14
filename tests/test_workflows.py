"""``amat_monai.workflows``: the Python API and the ``amat-monai train / calibrate`` command line, on synthetic
data, plus a one-epoch STD and AMAT smoke run on a few real hippocampus cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from amat_monai import cli
from amat_monai.data import make_synthetic_decathlon
from amat_monai.checkpoints import latest_checkpoint
from amat_monai.workflows import calibrate, parse_overrides, train
from conftest import SEG_TINY as TINY

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"


def _override_args(values: dict) -> list[str]:
    args = []
    for k, v in values.items():
        args += ["--override", f"{k}={json.dumps(v)}"]
    return args


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> str:
    return make_synthetic_decathlon(tmp_path_factory.mktemp("wf") / "Task_syn", num_cases=5, seed=3)


def test_parse_overrides():
    assert parse_overrides(["epochs=3", "patch_size=[32, 24]", 'name="plain text"', "flag=true"]) == {
        "epochs": 3, "patch_size": [32, 24], "name": "plain text", "flag": True}
    with pytest.raises(ValueError, match="KEY=JSON"):
        parse_overrides(["epochs"])
    with pytest.raises(ValueError, match="the value is not JSON; a string needs JSON quotes: name='\"plain text\"'"):
        parse_overrides(["name=plain text"])
    with pytest.raises(ValueError, match="MONAI expression"):
        parse_overrides(['nested={"a": ["%configs/other.json#key"]}'])
    assert parse_overrides(['lr="$1e-3 * 2"'], allow_expr=True) == {"lr": "$1e-3 * 2"}


def test_python_api_std_calibrate_amat(task, tmp_path):
    paths = train(BUNDLE, "std", task, tmp_path / "std", epochs=1, device="cpu", **TINY)
    assert Path(paths["model"]).is_file() and Path(paths["split_file"]).is_file()
    assert latest_checkpoint(paths["ckpt_dir"]).endswith("checkpoint_epoch=1.pt")
    xi = calibrate(BUNDLE, task, tmp_path / "std", paths["model"], device="cpu", **TINY)
    assert Path(xi) == tmp_path / "std" / "xi.json"
    amat = train(BUNDLE, "amat", task, tmp_path / "amat", epochs=1, device="cpu", xi_file=xi,
                 init_checkpoint=paths["model"], **TINY)
    state = torch.load(Path(amat["ckpt_dir"]) / "checkpoint_epoch=1.pt", weights_only=False)
    assert len(state["adversarial"]["margins"]["ids"]) > 0


def test_cli_train_and_calibrate(task, tmp_path, capsys):
    common = ["--bundle", str(BUNDLE), "--dataset-dir", task, "--device", "cpu", *_override_args(TINY)]
    assert cli.main(["train", "--method", "std", "--output-dir", str(tmp_path / "std"), "--epochs", "1", *common]) == 0
    model = tmp_path / "std" / "models" / "model.pt"
    assert model.is_file() and f"final weights {model}" in capsys.readouterr().out
    assert cli.main(["calibrate", "--output-dir", str(tmp_path / "std"), "--checkpoint", str(model), "--z", "1",
                     *common]) == 0
    xi = json.loads((tmp_path / "std" / "xi.json").read_text())
    assert all(t["z"] == 1.0 and abs(t["xi"] - (t["mean"] + t["std"])) < 1e-9 for t in xi["terms"])
    assert cli.main(["train", "--method", "vat", "--eps", "1.5", "--output-dir", str(tmp_path / "vat"),
                     "--epochs", "1", *common]) == 0
    assert (tmp_path / "vat" / "models" / "model.pt").is_file()


def test_cli_errors_are_one_line(task, tmp_path, capsys):
    common = ["--bundle", str(BUNDLE), "--dataset-dir", task, "--device", "cpu", "--output-dir", str(tmp_path)]
    missing = tmp_path / "xi.json"
    assert cli.main(["train", "--method", "amat", "--xi", str(missing), *common]) == 2
    err = capsys.readouterr().err
    assert f"ξ file not found: {missing}" in err and err.count("\n") == 1
    assert cli.main(["train", "--method", "std", "--eps", "2", *common]) == 2
    assert "--eps is for vat and teat" in capsys.readouterr().err
    assert cli.main(["calibrate", "--checkpoint", str(tmp_path / "none.pt"), *common]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert cli.main(["train", "--method", "std", "--bundle", str(BUNDLE), "--dataset-dir", str(tmp_path / "no"),
                     "--output-dir", str(tmp_path)]) == 2
    assert "dataset_dir not found" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_hippocampus_std_and_amat_one_epoch(tmp_path, hippocampus_dir):
    small = {"max_cases": 5, "epochs": 1, "device": "cpu", "progress": False, "train_slices": "foreground",
             "network_filters": [8, 16, 32, 64], "attack_steps": 2, "batch_size": 32}
    std = train(BUNDLE, "std", hippocampus_dir, tmp_path / "std", **small)
    split = json.loads(Path(std["split_file"]).read_text())
    assert [len(split[s]) for s in ("training", "validation", "test")] == [3, 1, 1]
    xi = calibrate(BUNDLE, hippocampus_dir, tmp_path / "std", std["model"], **small)
    terms = json.loads(Path(xi).read_text())["terms"]
    assert all(t["n"] > 0 and t["xi"] > 0 for t in terms)
    amat = train(BUNDLE, "amat", hippocampus_dir, tmp_path / "amat", xi_file=xi, delta=1.0, **small)
    state = torch.load(Path(amat["ckpt_dir"]) / "checkpoint_epoch=1.pt", weights_only=False)
    ids = state["adversarial"]["margins"]["ids"]
    assert len(ids) == terms[0]["n"] and all(i.startswith("hippocampus_") for i in ids)


def test_cli_choices_are_the_library_constants():
    from amat_monai import calibration, cli, conditions

    assert cli.ESTIMATORS == calibration.ESTIMATORS and cli.CONDITIONS == conditions.CONDITIONS


def test_method_overlays_are_the_same_file_in_every_bundle():
    """vat / amat / teat / calibrate / ssat.json are said once: byte-identical across bundles, per-bundle numbers in
    train.json (a new bundle copies them as they are)."""
    bundles = sorted(p for p in (Path(__file__).resolve().parents[1] / "bundles").iterdir() if (p / "configs").is_dir())
    assert len(bundles) >= 2
    for name in ("vat.json", "amat.json", "teat.json", "calibrate.json", "ssat.json"):
        first = (bundles[0] / "configs" / name).read_bytes()
        for other in bundles[1:]:
            assert (other / "configs" / name).read_bytes() == first, f"{other.name}/configs/{name} differs from {bundles[0].name}'s"


def test_root_cause_keeps_a_message_raised_from_none():
    from amat_monai.workflows import _root_cause

    def read():
        try:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        except EOFError:
            raise ValueError("cannot read case_004.nii.gz: it is corrupt") from None

    try:
        try:
            read()
        except ValueError as e:
            raise RuntimeError("Failed to instantiate component 'DecathlonSliceDataset'") from e
    except RuntimeError as wrapped:
        root = _root_cause(wrapped)
    assert isinstance(root, ValueError) and "case_004.nii.gz" in str(root)
    try:
        try:
            raise KeyError("inner")
        except KeyError:
            raise RuntimeError("outer")  # an implicit context is followed
    except RuntimeError as e:
        assert isinstance(_root_cause(e), KeyError)
