"""Detection of attacked inputs on real data (``scripts/reproduce.py --experiment detection``).

    python scripts/reproduce.py --experiment detection --task hippocampus
    python scripts/reproduce.py --experiment detection --report-only

For each task, the shipped STD model (``models/baselines/std.pt``) and the shipped AMAT model (``models/model.pt``):
``amat-monai detector fit`` (clean training split; thresholds at 5 % false positives on the clean validation
split), written next to the model, so that the bundle ships it; then ``amat-monai detector evaluate`` on the test
split: PGD and IFGSM (the cpu protocol's steps), random noise of the same norms, and the adaptive PGD that also
lowers a detector's score, against each detector at two weights; and a check that the bundle's ``inference.json`` path (what MONAI
Label serves) flags clean test images at the rate the thresholds promise. The shipped best-VAT model's detector is
fitted too (not evaluated). The report (``docs/results/<task>/detection/DETECTION.md`` and
``study.json``) is built from the ``detection.json`` files. Stages are resumable: a detector whose json names the
model's sha256 is not fitted again, an evaluation with its ``detection.json`` is not run again.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from amat_monai.attack_detection import detector_paths  # noqa: E402
from amat_monai.checkpoints import atomic_write_text, file_sha256  # noqa: E402
from amat_monai.cli import main as cli_main  # noqa: E402

#: per task: the bundle, data folder, models, evaluation grid (the cpu protocol's) and extra overrides
DETECTION_STUDY: dict[str, dict[str, Any]] = {
    "hippocampus": {
        "bundle": "hippocampus_seg", "data": "Task04_Hippocampus",
        "models": {"STD": "models/baselines/std.pt", "AMAT": "models/model.pt"},
        "eps": [2.0, 6.0, 10.0], "steps": [20, 10], "max_cases": None,
        "override": ["robust_slices=\"all_classes\""],
    },
    "ceph": {
        "bundle": "ceph_landmarks", "data": "isbi2015_ceph",
        "models": {"STD": "models/baselines/std.pt", "AMAT": "models/model.pt"},
        "eps": [0.5, 1.0, 2.0], "steps": [20, 10], "max_cases": 25, "override": [],
    },
}


def _fit(bundle: Path, dataset: Path, model: Path, work: Path, device: str | None) -> None:
    _, js = detector_paths(model)
    if js.is_file() and json.loads(js.read_text()).get("checkpoint_sha256") == file_sha256(model):
        print(f"[detection] {js} is fitted on {model.name}: skipped")
        return
    argv = ["detector", "fit", "--bundle", str(bundle), "--dataset-dir", str(dataset), "--checkpoint", str(model),
            "--output-dir", str(work)] + (["--device", device] if device else [])
    if cli_main(argv) != 0:
        raise RuntimeError(f"amat-monai {' '.join(argv)} failed")


def _evaluate(bundle: Path, dataset: Path, model: Path, out: Path, study: dict[str, Any], device: str | None) -> None:
    result = out / "detection.json"
    if result.is_file() and json.loads(result.read_text()).get("detector", {}).get("checkpoint_sha256") == \
            file_sha256(model):
        print(f"[detection] {result} exists: skipped")
        return
    argv = ["detector", "evaluate", "--bundle", str(bundle), "--dataset-dir", str(dataset), "--checkpoint",
            str(model), "--output-dir", str(out), "--attacks", "pgd,ifgsm",
            "--eps", ",".join(f"{e:g}" for e in study["eps"]), "--steps", ",".join(str(s) for s in study["steps"])]
    argv += ["--max-cases", str(study["max_cases"])] if study["max_cases"] else []
    argv += ["--device", device] if device else []
    for item in study["override"]:
        argv += ["--override", item]
    if cli_main(argv) != 0:
        raise RuntimeError(f"amat-monai {' '.join(argv)} failed")


def _served_images(task: str, dataset: Path, rows_csv: Path) -> list[Path]:
    """The evaluated test images (volumes for hippocampus), as files: what a client would send to the server."""
    import csv

    with open(rows_csv, newline="") as f:
        ids = sorted({r["sample_id"].split(":")[0] for r in csv.DictReader(f) if r["role"] == "clean"})
    if task == "hippocampus":
        return [dataset / "imagesTr" / f"{i}.nii.gz" for i in ids]
    return [dataset / "images" / f"{i}.png" for i in ids]


def served_clean_flags(task: str, bundle: Path, model: Path, images: list[Path]) -> dict[str, Any]:
    """The detector's verdicts on clean test images through the bundle's own ``inference.json`` preprocessing
    (the path MONAI Label serves), so that serving is checked against the thresholds set on the fit's path."""
    import torch
    from monai.bundle import ConfigParser

    from amat_monai.attack_detection import FeatureDensityDetector, screen, squeeze_baseline
    from amat_monai.checkpoints import load_checkpoint

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network_def")
    load_checkpoint(network, model, "cpu")
    network.eval()
    npz, js = detector_paths(model)
    detector = FeatureDensityDetector.load(network, npz, js, model)
    baseline = squeeze_baseline(network, detector.provenance)
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get("inferer", {})
    slice_dim = inferer.get("spatial_dim", 0) if str(inferer.get("_target_", "")).endswith("SliceInferer") else None
    verdicts = {}
    with torch.no_grad():
        for image in images:
            data = preprocessing({"image": str(image)})
            verdicts[image.name] = screen(detector, data["image"], slice_dim, baseline=baseline)

    def summary(vs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        flagged = [name for name, v in vs.items() if v["flag"]]
        return {"n": len(vs), "flagged": flagged, "rate": len(flagged) / max(len(vs), 1),
                "threshold": next(iter(vs.values()))["threshold"] if vs else None,
                "scores": {k: v["score"] for k, v in vs.items()}}

    return {**summary(verdicts), "squeeze": summary({k: v["squeeze"] for k, v in verdicts.items()})}


def run_detection_study(task: str, data_dir: Path, out: Path, device: str | None) -> None:
    study = DETECTION_STUDY[task]
    bundle = ROOT / "bundles" / study["bundle"]
    dataset = data_dir / study["data"]
    if not dataset.is_dir():
        raise FileNotFoundError(f"{task}: data set not found: {dataset} (set AMAT_DATA_DIR or --data-dir)")
    for name, rel in study["models"].items():
        model = bundle / rel
        work = out / f"{task}-detection" / name
        _fit(bundle, dataset, model, work, device)
        _evaluate(bundle, dataset, model, work / "eval", study, device)
        served = served_clean_flags(task, bundle, model, _served_images(task, dataset, work / "eval" / "attacks" /
                                                                               "robustness.csv"))
        atomic_write_text(work / "eval" / "served.json", json.dumps(served, indent=2) + "\n")
    for model in sorted((bundle / "models" / "baselines").glob("vat*.pt")):  # shipped too: its detector ships
        _fit(bundle, dataset, model, out / f"{task}-detection" / model.stem.upper(), device)


def _cell(row: dict[str, Any] | None, volumes: dict[str, Any] | None = None) -> str:
    if row is None or row["auc"] is None or not math.isfinite(row["auc"]):
        return "–"
    text = f"{row['auc']:.3f} / {100 * row['detected_at_threshold']:.0f}"
    if volumes and volumes.get("auc") is not None and math.isfinite(volumes["auc"]):
        text += f" ({volumes['auc']:.3f})"
    return text


def write_detection_report(task: str, out: Path, results_dir: Path) -> str | None:
    """``results_dir/<task>/detection/DETECTION.md`` + ``study.json`` from the evaluations on disk; returns the md."""
    study = DETECTION_STUDY[task]
    reports = {}
    served = {}
    for name in study["models"]:
        path = out / f"{task}-detection" / name / "eval" / "detection.json"
        if path.is_file():
            reports[name] = json.loads(path.read_text())
        if (path.parent / "served.json").is_file():
            served[name] = json.loads((path.parent / "served.json").read_text())
    if not reports:
        return None
    eps = study["eps"]
    lines = [f"Test split: {next(iter(reports.values()))['n_samples']} samples per model "
             f"({'slices holding both structures' if task == 'hippocampus' else 'images'}). Each cell: ROC-AUC of "
             "clean against attacked test inputs / % of attacked inputs flagged at the threshold set for 5 % false "
             "positives on clean validation inputs" + (
                 "; in brackets the ROC-AUC per volume (a volume's score: the maximum over its evaluated slices)"
                 if task == "hippocampus" else "") +
             ". `successful`: only the attacked inputs whose metric the attack worsened by at least "
             f"{next(iter(reports.values()))['success_margin']:g}. `adaptive (against d, weight w)`: PGD on the task "
             "loss minus w × detector d's score (white box against model and detector). `clean flagged`: clean test "
             "inputs above the threshold.", "",
             "| model | detector | attack | " + " | ".join(f"ε {e:g}" for e in eps) + " | clean flagged (%) |",
             "|---|---|---|" + "---|" * len(eps) + "---|"]
    for name, rep in reports.items():
        rows = rep["rows"]
        for detector in ("density", "squeeze"):
            combos = [("pgd", "grid", False), ("ifgsm", "grid", False), ("pgd", "grid", True), ("noise", "grid", False)]
            combos += sorted({("pgd", r["source"], False) for r in rows if r["source"] != "grid"})
            for attack, source, successful in combos:
                by_eps = {r["eps"]: r for r in rows if r["detector"] == detector and r["attack"] == attack
                          and r["source"] == source}
                if not by_eps:
                    continue
                label = {"grid": attack}.get(source, f"{attack} adaptive ({source})") + (
                    " successful" if successful else "")
                cells = [_cell(by_eps[e]["successful"], None) if successful and e in by_eps else
                         _cell(by_eps.get(e), (by_eps.get(e) or {}).get("volume")) for e in eps]
                fp = next(iter(by_eps.values()))["clean_false_positive_rate"]
                lines.append(f"| {name} | {detector} | {label} | " + " | ".join(cells) +
                             f" | {100 * fp:.1f} |")
    clean = ", ".join(f"{n} {r['metric']} {r['clean']:.4f}" for n, r in reports.items())
    lines += ["", f"Clean test {clean}. Commands: `python scripts/reproduce.py --experiment detection --task {task}` "
              "(resumable); per model it runs `amat-monai detector fit` and `amat-monai detector evaluate` "
              f"({', '.join(study['override']) or 'bundle defaults'}; PGD-{study['steps'][0]}, IFGSM-{study['steps'][1]}).", ""]
    unit = "volumes" if task == "hippocampus" else "images"
    for name, v in served.items():
        squeeze = v.get("squeeze")
        extra = f"; the squeeze baseline {len(squeeze['flagged'])} ({100 * squeeze['rate']:.1f} %)" if squeeze else ""
        lines.append(f"Served path ({name}): the bundle's `inference.json` preprocessing and "
                     f"`amat_monai.attack_detection.screen`, as MONAI Label runs them: the density detector flags "
                     f"{len(v['flagged'])} of the {v['n']} clean test {unit} ({100 * v['rate']:.1f} %; threshold "
                     f"{v['threshold']:.3f}){extra}.")
    md = "\n".join(lines + [""])
    folder = results_dir / task / "detection"
    atomic_write_text(folder / "DETECTION.md", md)
    atomic_write_text(folder / "study.json", json.dumps({"detection": reports, "served": served}, indent=2) + "\n")
    return md
