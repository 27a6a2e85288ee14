"""scripts/reproduce.py end to end on a small synthetic Decathlon task (the `smoke` protocol): every stage runs,
the results agree with the per-model JSON, a second run redoes nothing (the studies share that stage record), and
--ship writes loadable weights."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from amat_monai.checkpoints import file_sha256
from amat_monai.data import make_synthetic_decathlon

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["STD", "VAT5", "VAT10", "VAT15", "AMAT", "AMAT-Dice"]


def _run(tmp: Path, *extra: str) -> str:
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--protocol", "smoke", "--task", "hippocampus",
           "--data-dir", str(tmp / "data"), "--output-dir", str(tmp / "runs"), "--results",
           str(tmp / "docs" / "RESULTS.md"), "--device", "cpu", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_reproduce_smoke_protocol_resumes_and_ships(tmp_path):
    make_synthetic_decathlon(tmp_path / "data" / "Task04_Hippocampus", num_cases=10, seed=1)
    first = _run(tmp_path)
    assert first.count("running") == len(METHODS) * 2 + 1  # train + evaluate per model, one calibration

    results = (tmp_path / "docs" / "RESULTS.md").read_text()
    stages = json.loads((tmp_path / "runs" / "hippocampus" / "stages.json").read_text())
    assert set(stages) == {"calibrate", *(f"train {m}" for m in METHODS), *(f"evaluate {m}" for m in METHODS)}
    for name in METHODS:
        report = json.loads((tmp_path / "docs" / "results" / "hippocampus" / name / "robustness.json").read_text())
        assert report["metric"] == "dice" and report["n_samples"] > 0
        row = next(line for line in results.splitlines() if line.startswith(f"| {name} |"))
        # the first "| NAME |" row is ours (the paper's table follows), and its clean cell is the JSON's value
        assert row.split("|")[2].strip().strip("*") == f"{report['clean']:.4f}"
    assert "| 0.7845 |" in results  # the paper's AMAT clean value sits beside ours
    assert "AMAT PGD average" in results and "AMAT clean" in results and "AMAT-Dice IFGSM average" in results

    second = _run(tmp_path, "--ship", "--bundles", str(tmp_path / "bundles"))
    assert "running" not in second and second.count("done before") == len(METHODS) * 2 + 1
    models = tmp_path / "bundles" / "hippocampus_seg" / "models"
    # the AMAT variant with the best PGD + IFGSM averages, shipped byte for byte (the evaluation's sha256)
    reports = {m: json.loads((tmp_path / "docs" / "results" / "hippocampus" / m / "robustness.json").read_text())
               for m in ("AMAT", "AMAT-Dice")}
    best = max(reports, key=lambda m: reports[m]["averages"]["pgd"] + reports[m]["averages"]["ifgsm"])
    assert reports[best]["checkpoint_sha256"] == file_sha256(models / "model.pt")
    state = torch.load(models / "model.pt", weights_only=True)
    trained = torch.load(tmp_path / "runs" / "hippocampus" / "runs" / best / "models" / "model.pt", weights_only=True)
    assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state)
    assert (models / "baselines" / "std.pt").is_file() and len(list((models / "baselines").glob("vat*.pt"))) == 1
    assert json.loads((models / "xi.json").read_text())["terms"][0]["name"] == "dice"


def test_margin_study_smoke_runs_every_stage_and_reports(tmp_path):
    make_synthetic_decathlon(tmp_path / "data" / "Task04_Hippocampus", num_cases=10, seed=1)
    earlier = tmp_path / "bundles" / "hippocampus_seg" / "models"  # what an earlier --ship left
    (earlier / "baselines").mkdir(parents=True)
    (earlier / "detector.json").write_text(json.dumps({"checkpoint_sha256": "of the earlier model.pt"}))
    (earlier / "detector.npz").write_text("")
    (earlier / "baselines" / "vat99.pt").write_text("")
    _run(tmp_path, "--experiment", "margins", "--ship", "--bundles", str(tmp_path / "bundles"))
    work = tmp_path / "runs" / "hippocampus-margins"
    stages = json.loads((work / "stages.json").read_text())
    trained = [k.removeprefix("train ") for k in stages if k.startswith("train ")]
    assert trained[:5] == ["STD", "VAT5", "VAT10", "AMAT-A", "AMAT-C"] and len(trained) == 8
    assert trained[6].endswith("-reach")  # the best of the others with the larger Δ
    assert trained[7].endswith("-init")  # ... then with every margin starting at the best VAT's ε
    best_vat_eps = float(max((m for m in trained if m.startswith("VAT")), key=lambda m: _robust(work / "val" / m))[3:])
    assert json.loads((work / "runs" / trained[7] / "margins.json").read_text())["settings"]["init"] == best_vat_eps
    assert {f"validate {m}" for m in trained} | {f"test {m}" for m in trained} <= set(stages)
    study = json.loads((tmp_path / "docs" / "results" / "hippocampus" / "margins" / "study.json").read_text())
    assert study["best_amat_on_validation"] in trained and study["best_vat_on_test"] in ("VAT5", "VAT10")
    xi = json.loads((work / "xi" / "mean" / "xi.json").read_text())
    assert xi["metric"]["name"] == "dice_present" and xi["feasibility"]["eps"] == [0.0, 5.0]
    for name, c in study["comparisons"].items():
        assert c["pgd"]["low"] <= c["pgd"]["estimate"] <= c["pgd"]["high"], name
    history = json.loads((work / "runs" / study["best_amat_on_validation"] / "margins.json").read_text())
    assert len(history["epochs"]) == 1 and sum(history["epochs"][0]["outcomes"].values()) == len(history["samples"]["ids"])
    results = (tmp_path / "docs" / "RESULTS.md").read_text()
    assert "AMAT margin study" in results and "The paper's claim for" in results
    claim_row = next(line for line in results.splitlines() if line.startswith("| hippocampus (dice) |"))
    assert f"| {study['best_amat_on_validation']} | {study['best_vat_on_test']} |" in claim_row
    assert ("**holds**" if study["claim_holds"] else "**does not hold**") in claim_row
    assert (tmp_path / "docs" / "results" / "hippocampus" / "margins" / "pareto.png").is_file()
    # where the chosen model's margins failed the fair-chance check, the claim is judged again on the most robust
    # model (on validation) whose margins passed it, in its own row
    passing = [m for m, f in study.get("fair_chance_other_models", {}).items() if f["passes"]]
    if not study["fair_chance"]["passes"] and passing:
        fair_model = max(passing, key=lambda m: _robust(work / "val" / m))
        assert study["fair_chance_claim"]["model"] == fair_model
        assert f"| {fair_model} (the most robust with a fair chance) | {study['best_vat_on_test']} |" in results
    else:
        assert "fair_chance_claim" not in study
    # --ship: the models chosen on validation, the evaluated files byte for byte, with the ξ AMAT trained with
    models = tmp_path / "bundles" / "hippocampus_seg" / "models"
    vat = study["best_vat_on_validation"]
    for shipped, name in ((models / "model.pt", study["best_amat_on_validation"]), (models / "baselines" / "std.pt", "STD"),
                          (models / "baselines" / f"{vat.lower()}.pt", vat)):
        report = json.loads((work / "test" / name / "robustness.json").read_text())
        assert file_sha256(shipped) == report["checkpoint_sha256"] == file_sha256(work / "runs" / name / "models" / "model.pt")
    assert not any((earlier / f).exists() for f in ("detector.json", "detector.npz", "baselines/vat99.pt"))  # stale
    xi = json.loads((models / "xi.json").read_text())
    assert xi["checkpoint"] == "models/baselines/std.pt" and xi["checkpoint_sha256"] == file_sha256(models / "baselines" / "std.pt")
    trained_with = json.loads((work / "runs" / study["best_amat_on_validation"] / "run.json").read_text())["identity"]
    assert xi["metric"] == json.loads(Path(trained_with["xi_file"]).read_text())["metric"]

    # --restore: an empty folder rebuilt from the committed reports, per-case scores and shipped weights goes on
    # without training or testing, and reports the same comparisons (bootstrapped again from the committed scores)
    committed = tmp_path / "docs" / "results" / "hippocampus" / "margins"
    assert {p.parent.name for p in (committed / "test").glob("*/case_scores.json")} == set(trained)
    again = _run(tmp_path, "--experiment", "margins", "--restore", "--bundles", str(tmp_path / "bundles"),
                 "--output-dir", str(tmp_path / "restored"))
    assert ": running" not in again, again
    restudy = json.loads((committed / "study.json").read_text())
    for key in ("best_amat_on_validation", "best_vat_on_test", "comparisons", "claim_holds", "fair_chance"):
        assert restudy[key] == study[key], key
    # the other models' fair-chance checks (their margin histories are not committed) come from the committed summary
    assert restudy.get("fair_chance_other_models") == study.get("fair_chance_other_models")
    assert restudy.get("fair_chance_claim") == study.get("fair_chance_claim")
    # a study committed before per-case scores were (here: STD's and both VATs'): the shipped VAT's test runs again
    # (later models are compared with it case by case), with the same result
    other_vat = next(m for m in ("VAT5", "VAT10") if m != vat)
    for name in ("STD", "VAT5", "VAT10"):
        (committed / "test" / name / "case_scores.json").unlink()
    again = _run(tmp_path, "--experiment", "margins", "--restore", "--bundles", str(tmp_path / "bundles"),
                 "--output-dir", str(tmp_path / "restored-older"))
    assert again.count(": running") == 1 and f"test {vat}: running" in again, again
    retested = json.loads((tmp_path / "restored-older" / "hippocampus-margins" / "test" / vat / "robustness.json").read_text())
    first = json.loads((work / "test" / vat / "robustness.json").read_text())
    assert retested["clean"] == pytest.approx(first["clean"]) and retested["averages"] == pytest.approx(first["averages"])
    # --complete-intervals: the models of VAT's curve still without them are tested again (the VAT that was not shipped
    # trained again first), so that every comparison, VAT's curve included, has its bootstrap interval
    again = _run(tmp_path, "--experiment", "margins", "--complete-intervals", "--output-dir", str(tmp_path / "restored-older"))
    ran = [line.split(": running")[0].removeprefix("[reproduce] ") for line in again.splitlines() if ": running" in line]
    # the VAT trained again is validated again unless training gave the same weights (bit-reproducible)
    assert [r for r in ran if r != f"validate {other_vat}"] == [f"train {other_vat}", "test STD", f"test {other_vat}"], again
    assert {p.parent.name for p in (committed / "test").glob("*/case_scores.json")} == set(trained)
    completed = json.loads((committed / "study.json").read_text())["comparisons"]
    assert set(completed) == {m for m in trained if m.startswith("AMAT")}
    for name, c in completed.items():  # an interval wherever the curve spans the model's clean value
        assert math.isnan(c["curve_pgd"]["estimate"]) or c["curve_pgd"]["low"] <= c["curve_pgd"]["estimate"], name

    # weights that changed since they were evaluated (here: the init arm's replaced by STD's) are evaluated again
    init = trained[7]
    (work / "runs" / init / "models" / "model.pt").write_bytes((work / "runs" / "STD" / "models" / "model.pt").read_bytes())
    again = _run(tmp_path, "--experiment", "margins")
    assert f"validate {init}: evaluated other weights" in again and f"test {init}: evaluated other weights" in again
    for split in ("val", "test"):
        report = json.loads((work / split / init / "robustness.json").read_text())
        assert report["checkpoint_sha256"] == file_sha256(work / "runs" / "STD" / "models" / "model.pt"), split


def _robust(folder: Path) -> float:
    averages = json.loads((folder / "robustness.json").read_text())["averages"]
    return averages["pgd"] + averages["ifgsm"]


def test_stages_recorded_with_absolute_paths_survive_a_moved_folder(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from reproduce import Stages

    old, new = tmp_path / "old" / "task-margins", tmp_path / "new" / "task-margins"
    (new / "runs").mkdir(parents=True)
    (new / "runs" / "model.pt").write_text("weights")
    (new / "stages.json").write_text(json.dumps({"train STD": {"output": str(old / "runs" / "model.pt"), "seconds": 1}}))
    ran = []
    out = Stages(new / "stages.json").run("train STD", str(new / "runs" / "model.pt"), lambda: ran.append(1))
    assert not ran and Path(out) == new / "runs" / "model.pt"  # found below the moved folder: not run again


def _start(worker: Path, folder: Path, name: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(worker), str(folder), name], stdout=subprocess.PIPE, text=True)


def _wait_for(path: Path, process: subprocess.Popen, deadline: float, failure: str) -> None:
    while not path.exists():
        assert time.monotonic() < deadline and process.poll() is None, failure
        time.sleep(0.05)


def test_a_stage_another_process_is_running_is_waited_for_and_not_run_twice(tmp_path):
    """Two processes share a study folder: the second waits for the first's stage, then skips it."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT / 'scripts')!r})
from reproduce import Stages
folder = Path(sys.argv[1])
def slow():
    (folder / "started").write_text("")
    while not (folder / "release").exists():  # held until the second process is waiting for this stage
        time.sleep(0.05)
    (folder / "model.pt").write_text(sys.argv[2])
    return str(folder / "model.pt")
print(Stages(folder / "stages.json").run("train STD", str(folder / "model.pt"), slow))
Stages(folder / "stages.json").run("calibrate " + sys.argv[2], str(folder / sys.argv[2]),
                                   lambda: (folder / sys.argv[2]).write_text("") or str(folder / sys.argv[2]))
""")
    first, deadline = _start(worker, tmp_path, "first"), time.monotonic() + 60
    _wait_for(tmp_path / "started", first, deadline, "the first worker did not start its stage")
    second = _start(worker, tmp_path, "second")
    first_line = second.stdout.readline()
    (tmp_path / "release").write_text("")
    rest = second.stdout.read()
    assert first.wait(timeout=120) == 0 and second.wait(timeout=120) == 0
    assert "another process is running it, waiting" in first_line
    assert "train STD: done before" in rest  # found finished once the first process let go
    assert (tmp_path / "model.pt").read_text() == "first"  # the stage ran once, in the first process
    records = json.loads((tmp_path / "stages.json").read_text())
    assert set(records) == {"train STD", "calibrate first", "calibrate second"}  # both processes' records kept


def test_ssat_study_smoke_runs_every_stage_and_reports(tmp_path):
    make_synthetic_decathlon(tmp_path / "data" / "Task04_Hippocampus", num_cases=10, seed=1)
    _run(tmp_path, "--experiment", "ssat")
    work = tmp_path / "runs" / "hippocampus-ssat"
    arms = ["STD-50%-s0", "AMAT-50%-s0", "SSAT-50%-s0", "AMAT+SSAT-50%-s0"]
    variants = ["AMAT+SSAT-50%-s0-w3", "AMAT+SSAT-50%-s0-w3-fg"]  # SSAT's settings, chosen on validation
    stages = json.loads((work / "stages.json").read_text())
    assert set(stages) == {*(f"train {a}" for a in [*arms[:3], *variants]), "calibrate STD-50%-s0",
                           *(f"validate {a}" for a in ["AMAT-50%-s0", *variants]), *(f"test {a}" for a in arms)}
    summary = json.loads((tmp_path / "docs" / "results" / "hippocampus" / "ssat" / "ssat.json").read_text())
    chosen = summary["variant"]["chosen"]
    identity = json.loads((work / "runs" / f"AMAT+SSAT-50%-s0-{chosen}" / "run.json").read_text())["identity"]
    assert identity["labelled_fraction"] == 0.5 and identity["ssat"]["eps"] == [0.0, 10.0]
    tested = json.loads((work / "test" / "AMAT+SSAT-50%-s0" / "robustness.json").read_text())["checkpoint_sha256"]
    assert tested == file_sha256(work / "runs" / f"AMAT+SSAT-50%-s0-{chosen}" / "models" / "model.pt")
    ssat_identity = json.loads((work / "runs" / "SSAT-50%-s0" / "run.json").read_text())["identity"]["ssat"]
    assert ssat_identity["confidence_threshold"] == summary["variant"]["settings"].get("ssat_confidence_threshold")
    # STD-50 % trains for the study's own epochs (the protocol's is 1)
    assert (work / "runs" / "STD-50%-s0" / "models" / "checkpoint_epoch=2.pt").is_file()
    state = torch.load(work / "runs" / "SSAT-50%-s0" / "models" / "checkpoint_epoch=1.pt", weights_only=False)
    assert state["ssat"]["draws"] == state["trainer"]["iteration"] > 0
    report = (tmp_path / "docs" / "results" / "hippocampus" / "SSAT.md").read_text()
    assert all(f"| {a} |" in report for a in arms) and "| AMAT+SSAT-50% | 1 |" in report
    assert "Semi-supervised adversarial training (SSAT)" in (tmp_path / "docs" / "RESULTS.md").read_text()

    # another session, without the runs: the finished seed comes back from the committed reports, nothing runs
    restored = _run(tmp_path, "--experiment", "ssat", "--restore", "--output-dir", str(tmp_path / "elsewhere"))
    assert f"restored {len(stages)} stages" in restored and "running" not in restored
    assert not (tmp_path / "elsewhere" / "hippocampus-ssat" / "runs").exists()  # no model trained again
    again = json.loads((tmp_path / "docs" / "results" / "hippocampus" / "ssat" / "ssat.json").read_text())
    assert again["arms"] == summary["arms"] and again["variant"] == summary["variant"]
    assert (tmp_path / "docs" / "results" / "hippocampus" / "SSAT.md").read_text() == report


def test_ssat_restore_puts_back_only_whole_seeds_run_with_the_current_settings(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from ssat_study import restore_ssat_study, ssat_settings

    study = {**ssat_settings("hippocampus", "smoke"), "seeds": [0, 1]}
    committed = tmp_path / "results" / "hippocampus" / "ssat"
    finished = ["test/STD-50%-s0", "test/AMAT-50%-s0", "test/SSAT-50%-s0", "test/AMAT+SSAT-50%-s0",
                "val/AMAT-50%-s0", "val/AMAT+SSAT-50%-s0-w3", "val/AMAT+SSAT-50%-s0-w3-fg",
                "test/STD-50%-s1", "test/AMAT-50%-s1"]  # the second seed was cut short
    for report in finished:
        (committed / report).mkdir(parents=True)
        (committed / report / "robustness.json").write_text("{}")
    records = {f"{'test' if r.startswith('test') else 'validate'} {r.split('/')[1]}": {"output": f"{r}/robustness.json",
                                                                                       "seconds": 1.0} for r in finished}
    records.update({"train STD-50%-s0": {"output": "runs/STD-50%-s0/models/model.pt", "seconds": 2.0},
                    "train STD-50%-s1": {"output": "runs/STD-50%-s1/models/model.pt", "seconds": 2.0}})
    (committed / "ssat.json").write_text(json.dumps({"study": study, "stages": records}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("ssat_study.ssat_settings", lambda task, protocol: study)
        done = restore_ssat_study("hippocampus", "smoke", tmp_path / "work", tmp_path / "results")
        assert sorted(done) == sorted(k for k in records if "-s0" in k)  # the first seed, its training's time too
        assert not (tmp_path / "work" / "test" / "STD-50%-s1").exists()  # runs again with its seed's other arms
        with pytest.raises(SystemExit, match="already holds a study"):
            restore_ssat_study("hippocampus", "smoke", tmp_path / "work", tmp_path / "results")
        patch.setattr("ssat_study.ssat_settings", lambda task, protocol: {**study, "labelled_fraction": 0.3})
        with pytest.raises(SystemExit, match="other settings"):
            restore_ssat_study("hippocampus", "smoke", tmp_path / "other", tmp_path / "results")


def test_ssat_variant_is_the_most_robust_within_the_clean_tolerance_else_the_cleanest():
    sys.path.insert(0, str(ROOT / "scripts"))
    from ssat_study import choose_variant

    def report(clean, pgd, ifgsm, higher=True):
        return {"clean": clean, "averages": {"pgd": pgd, "ifgsm": ifgsm}, "higher_is_better": higher}

    amat = report(0.72, 0.60, 0.60)
    val = {"w3": report(0.64, 0.70, 0.70), "w1": report(0.715, 0.62, 0.61), "w0.3": report(0.73, 0.61, 0.61)}
    assert choose_variant(val, amat, tolerance=0.01) == "w1"  # w3 is the most robust but 0.08 below AMAT's clean
    assert choose_variant(val, amat, tolerance=0.1) == "w3"
    assert choose_variant({"w3": val["w3"], "w1": report(0.70, 0.9, 0.9)}, amat, tolerance=0.01) == "w1"  # cleanest
    mm = report(2.0, 2.5, 2.5, higher=False)  # landmarks: lower is better, the tolerance in mm
    assert choose_variant({"a": report(2.05, 2.3, 2.3, False), "b": report(2.2, 2.1, 2.1, False)}, mm, 0.1) == "a"


def test_ssat_claim_counts_a_lower_mre_as_a_gain():
    sys.path.insert(0, str(ROOT / "scripts"))
    from ssat_study import judge_claim

    def arm(clean, pgd, pgd_spread):
        return {"clean": {"mean": clean, "spread": 0.0}, "pgd": {"mean": pgd, "spread": pgd_spread}}

    # Dice: +0.03 PGD avg over AMAT-20 % (spreads 0.004), the gap to AMAT-100 % is 0.05, clean 0.02 lower
    dice = judge_claim(arm(0.70, 0.63, 0.004), arm(0.72, 0.60, 0.002), 0.65, tolerance=0.01, higher_is_better=True)
    assert dice["gain"] == pytest.approx(0.03) and dice["gap_to_100"] == pytest.approx(0.05)
    assert dice["checks"] == {"gain_above_seed_spread": True, "closes_half_the_gap_to_amat_100": True,
                              "clean_within_tolerance": False} and not dice["holds"]
    # MRE in mm: 7.04 -> 6.81 under PGD and 6.45 -> 6.32 clean are gains; AMAT-100 % at 2.51 leaves a gap of 4.53
    mre = judge_claim(arm(6.32, 6.81, 0.36), arm(6.45, 7.04, 0.73), 2.51, tolerance=0.1, higher_is_better=False)
    assert mre["gain"] == pytest.approx(0.23) and mre["gap_to_100"] == pytest.approx(4.53)
    assert mre["clean_gain"] == pytest.approx(0.13)
    assert mre["checks"] == {"gain_above_seed_spread": False, "closes_half_the_gap_to_amat_100": False,
                             "clean_within_tolerance": True}
    both_good = judge_claim(arm(6.5, 4.0, 0.2), arm(6.45, 7.04, 0.73), 2.51, tolerance=0.1, higher_is_better=False)
    assert both_good["holds"]  # 3.04 mm better (> 0.73, > half of 4.53), clean 0.05 mm worse (within 0.1)


def test_two_processes_share_independent_stages_instead_of_queueing(tmp_path):
    """Within run_independent, the second process puts off the stage the first is running and does the next one."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(ROOT / 'scripts')!r})
from reproduce import Stages
folder, me = Path(sys.argv[1]), sys.argv[2]
stages = Stages(folder / "stages.json")
def job(name, hold=False):
    def run():
        (folder / f"{{name}} started").write_text(me)
        while hold and not (folder / "release").exists():  # held until the test lets go
            time.sleep(0.05)
        (folder / name).write_text(me)
        return str(folder / name)
    return lambda: stages.run(f"validate {{name}}", str(folder / name), run)
print(stages.run_independent({{"a": job("a", hold=True), "b": job("b")}}))
""")
    first, deadline = _start(worker, tmp_path, "first"), time.monotonic() + 60
    _wait_for(tmp_path / "a started", first, deadline, "the first worker did not start its stage")
    second = _start(worker, tmp_path, "second")
    # b is done by the second process while the first still holds a
    _wait_for(tmp_path / "b", second, deadline, "the second worker did not run b")
    (tmp_path / "release").write_text("")
    out = second.stdout.read()
    assert first.wait(timeout=120) == 0 and second.wait(timeout=120) == 0
    assert "validate a: another process is running it, put off" in out and "'b':" in out.splitlines()[-1]
    assert (tmp_path / "a").read_text() == "first" and (tmp_path / "b").read_text() == "second"  # each ran once
    assert "validate b: done before" in first.stdout.read()
