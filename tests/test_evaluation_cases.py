"""``amat-monai evaluate`` on any cases: ``--split``, ``--cases`` and ``--max-cases``, on synthetic folders.

A model is trained on a 6-case synthetic task with ``--max-cases 6``; it is then evaluated on its own test split
with fewer and more cases than it was trained with, on a second synthetic site it never saw (``--split all``),
and on a case list. The ceph bundle evaluates the challenge's second test list by name (``--split test2``).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from amat_monai import cli
from amat_monai.data import make_synthetic_ceph, make_synthetic_decathlon
from conftest import PROJECT_ROOT, SEG_TINY

SEG = PROJECT_ROOT / "bundles" / "hippocampus_seg"
CEPH = PROJECT_ROOT / "bundles" / "ceph_landmarks"
QUICK = ["--attacks", "pgd", "--eps", "1", "--steps", "2"]


def _overrides(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--override", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcases")
    task = Path(make_synthetic_decathlon(root / "Task_site_a", num_cases=8, seed=6))
    run = root / "std"
    assert cli.main(["train", "--method", "std", "--bundle", str(SEG), "--dataset-dir", str(task), "--output-dir",
                     str(run), "--epochs", "1", "--max-cases", "6", "--device", "cpu", *_overrides(SEG_TINY)]) == 0
    return task, run / "models" / "model.pt", json.loads((run / "split.json").read_text())


def _evaluate(task: Path, model: Path, out: Path, *extra: str, bundle: Path = SEG, tiny: dict = SEG_TINY) -> dict:
    assert cli.main(["evaluate", "--bundle", str(bundle), "--dataset-dir", str(task), "--checkpoint", str(model),
                     "--output-dir", str(out), "--device", "cpu", *QUICK, *_overrides(tiny), *extra]) == 0
    return out


def _cases(out: Path) -> set[str]:
    """The cases of the clean rows of the evaluator's per-sample CSV (slices are named ``case:slice``)."""
    with open(out / "robustness.csv", newline="") as f:
        return {row["sample_id"].split(":")[0] for row in csv.DictReader(f) if row["role"] == "clean"}


@pytest.mark.parametrize("max_cases", [None, 1, 4, 20])
def test_the_training_split_with_fewer_or_more_cases(trained, tmp_path, max_cases):
    task, model, split = trained
    extra = [] if max_cases is None else ["--max-cases", str(max_cases)]
    report = _evaluate(task, model, tmp_path / "ev", *extra)
    assert _cases(report) == set(split["test"][: max_cases or None])


def test_split_all_on_a_folder_the_model_never_saw(trained, tmp_path, capsys):
    _, model, split = trained
    other = Path(make_synthetic_decathlon(tmp_path / "Task_site_b", num_cases=3, seed=11, name="siteb"))
    report = _evaluate(other, model, tmp_path / "ev", "--split", "all")
    assert _cases(report) == {"siteb_000", "siteb_001", "siteb_002"}
    # without --split all the training run's split names cases this folder does not have
    assert cli.main(["evaluate", "--bundle", str(SEG), "--dataset-dir", str(other), "--checkpoint", str(model),
                     "--output-dir", str(tmp_path / "ev2"), "--device", "cpu", *QUICK, *_overrides(SEG_TINY)]) == 2
    err = capsys.readouterr().err
    assert "names 6 cases that are not in the data set" in err and "--split all" in err


def test_split_validation_train_and_a_case_list(trained, tmp_path, capsys):
    task, model, split = trained
    assert _cases(_evaluate(task, model, tmp_path / "val", "--split", "validation")) == set(split["validation"])
    assert _cases(_evaluate(task, model, tmp_path / "tr", "--split", "train", "--max-cases", "2")) == set(
        split["training"][:2])
    listed = tmp_path / "cases.txt"
    listed.write_text("# two cases\nsynthetic_007\n\nsynthetic_000\n")
    assert _cases(_evaluate(task, model, tmp_path / "list", "--cases", str(listed))) == {"synthetic_000", "synthetic_007"}


def test_bad_split_and_unknown_case_are_named(trained, tmp_path, capsys):
    task, model, _ = trained
    base = ["evaluate", "--bundle", str(SEG), "--dataset-dir", str(task), "--checkpoint", str(model),
            "--output-dir", str(tmp_path / "ev"), "--device", "cpu", *QUICK]
    assert cli.main([*base, "--split", "tset"]) == 2
    assert "--split must be one of test, validation, train, all" in capsys.readouterr().err
    listed = tmp_path / "cases.txt"
    listed.write_text("synthetic_000\nhippocampus_999\n")
    assert cli.main([*base, "--cases", str(listed), *_overrides(SEG_TINY)]) == 2
    err = capsys.readouterr().err
    assert "1 listed case(s) are not in" in err and "hippocampus_999" in err and str(task / "dataset.json") in err


def test_ceph_split_test2_names_the_official_list(tmp_path, capsys):
    from test_ceph_bundle import TINY as CEPH_TINY

    data = make_synthetic_ceph(tmp_path / "ceph", num_train=4, num_test=2, seed=2)
    (data / "test2.txt").write_text("001\n003\n")  # the challenge's second test list has the same layout
    tiny = {k: v for k, v in CEPH_TINY.items() if k != "test_split"}
    run = tmp_path / "std"
    assert cli.main(["train", "--method", "std", "--bundle", str(CEPH), "--dataset-dir", str(data), "--output-dir",
                     str(run), "--epochs", "1", "--device", "cpu", *_overrides(tiny)]) == 0
    report = _evaluate(data, run / "models" / "model.pt", tmp_path / "ev", "--split", "test2", bundle=CEPH, tiny=tiny)
    assert _cases(report) == {"001", "003"}
    assert cli.main(["evaluate", "--bundle", str(CEPH), "--dataset-dir", str(data), "--checkpoint",
                     str(run / "models" / "model.pt"), "--output-dir", str(tmp_path / "ev3"), "--device", "cpu",
                     *QUICK, *_overrides(tiny), "--split", "test3"]) == 2
    err = capsys.readouterr().err
    assert f"split list not found: {data / 'test3.txt'}" in err and "['test1', 'test2', 'train']" in err
