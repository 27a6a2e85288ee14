"""The ``amat-monai`` subcommands: argument checks, bundle overrides, and what they print.

:mod:`amat_monai.cli` only parses; each subcommand's ``handler`` is a function here (``serve`` and ``demo`` live
with what they run: :mod:`amat_monai.label.server`, :mod:`amat_monai.demo`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser

from amat_monai.attack_detection.detector import detector_paths
from amat_monai.checkpoints import atomic_write_text
from amat_monai.data.decathlon import read_case_list
from amat_monai.data.labelled import check_labelled_fraction
from amat_monai.reporting import load_report, metric_tables, plot_runs, report_values
from amat_monai.workflows import (
    build_workflow,
    calibrate,
    config_files,
    device_expression,
    fit_detector,
    parse_overrides,
    run_workflow,
    train,
)

__all__ = ["train_command", "calibrate_command", "evaluate_command", "detector_fit_command",
           "detector_evaluate_command", "compare_command"]


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return parse_overrides(getattr(args, "override", None), allow_expr=getattr(args, "allow_expr", False))


def train_command(args: argparse.Namespace) -> int:
    """``amat-monai train``."""
    ovr = _overrides(args)
    if getattr(args, "resume", False):
        ovr["resume"] = True
    if args.epochs is not None:
        ovr["epochs"] = int(args.epochs)
    if args.eps is not None:
        if args.method not in ("vat", "teat"):
            raise ValueError(f"--eps is for vat and teat, not {args.method}")
        ovr["eps"] = float(args.eps)
    if args.xi is not None:
        if args.method != "amat":
            raise ValueError(f"--xi is for amat, not {args.method}")
        ovr["xi_file"] = str(Path(args.xi).resolve())
    if getattr(args, "condition", None) is not None:
        if args.method != "amat":
            raise ValueError(f"--condition is for amat, not {args.method}")
        ovr["amat_condition"] = args.condition
    if getattr(args, "init_checkpoint", None):
        if not Path(args.init_checkpoint).is_file():
            raise FileNotFoundError(f"--init-checkpoint not found: {args.init_checkpoint}")
        ovr["init_checkpoint"] = str(Path(args.init_checkpoint).resolve())
    if getattr(args, "labelled_fraction", None) is not None:
        ovr["labelled_fraction"] = check_labelled_fraction(args.labelled_fraction)
    ssat = bool(getattr(args, "ssat", False))
    paths = train(
        args.bundle, args.method, args.dataset_dir, args.output_dir, nproc=getattr(args, "nproc", 1),
        max_cases=args.max_cases, device=args.device, ssat=ssat, **ovr,
    )
    print(f"trained {args.method}{' + SSAT' if ssat else ''}: final weights {paths['model']}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    """``amat-monai calibrate``."""
    ovr = _overrides(args)
    if getattr(args, "metric_quantile", None) is not None:
        ovr["xi_metric_quantile"] = float(args.metric_quantile)
    path = calibrate(
        args.bundle, args.dataset_dir, args.output_dir, args.checkpoint, z=args.z, estimator=args.estimator,
        max_cases=args.max_cases, device=args.device, **ovr,
    )
    content = json.loads(Path(path).read_text())
    terms = ", ".join(f"{t['name']} ξ={t['xi']:.4f} (n={t['n']})" for t in content["terms"])
    extra = [f"total ξ={content['total']['xi']:.4f}"]
    if content.get("metric"):
        extra.append(f"{content['metric']['name']} ξ={content['metric']['xi']:.4f}")
    feasibility = content.get("feasibility") or {}
    shares = "; ".join(f"{k} " + " / ".join(f"{v:.1%}" for v in feasibility[k])
                       for k in ("terms", "total", "metric") if k in feasibility)
    print(f"wrote {path}: {terms}, {', '.join(extra)}")
    if shares:
        print(f"training samples passing each condition at ε = {', '.join(f'{e:g}' for e in feasibility['eps'])}: {shares}")
    return 0


#: command-line options -> ids of the ``robust`` section of ``robust_evaluate.json``
_CLI_KEYS = {"attacks": "robust#attacks", "eps": "robust#eps", "steps": "robust#steps", "norm": "robust#norm",
             "restarts": "robust#restarts"}


#: ``--split`` names -> the Decathlon sections of a bundle with ``test_section`` (hippocampus)
_SECTIONS = {"test": "test", "validation": "validation", "train": "training", "all": "all"}
#: ``--split`` names that mean another config id of a bundle with ``test_split`` (named lists: ceph)
_LIST_ALIASES = {"validation": "@validate_split", "train": "@train_split"}


def _case_selection(args: argparse.Namespace, config: dict, split_file: Path | None) -> dict[str, Any]:
    """The overrides that choose the evaluated cases from ``--split`` / ``--cases``.

    A bundle says how it selects its test cases: ``test_section`` (a section of a split of one folder, or
    ``all`` of it; ``test_cases`` lists cases) or ``test_split`` (a named list, e.g. ceph's ``test2``, or a
    text file of ids). The training run's ``split.json`` is used only for the split's own sections.
    """
    split, cases = getattr(args, "split", None), getattr(args, "cases", None)
    if split is not None and cases is not None:
        raise ValueError("give --split or --cases, not both")
    ovr: dict[str, Any] = {}
    if "test_section" in config:
        if cases is not None:
            ovr["test_cases"] = read_case_list(cases)
        elif split is not None:
            if split not in _SECTIONS:
                raise ValueError(f"--split must be one of {', '.join(_SECTIONS)} for {args.bundle}, got {split!r}")
            ovr["test_section"] = _SECTIONS[split]
        if split_file is not None and cases is None and split != "all":
            ovr["split_file"] = str(split_file)
    elif "test_split" in config:
        if cases is not None:
            ovr["test_split"] = str(Path(cases).resolve())
        elif split == "all":
            raise ValueError(f"--split all: {args.bundle} evaluates named lists; name one (e.g. test1, test2) or "
                             "give --cases FILE")
        elif split is not None and split != "test":
            ovr["test_split"] = _LIST_ALIASES.get(split, split)
    elif split is not None or cases is not None:
        raise ValueError(f"{args.bundle}: its configs have neither test_section nor test_split, so --split and "
                         "--cases cannot choose its cases")
    return ovr


def _run_split(checkpoint: Path) -> Path | None:
    """``<run>/split.json`` when the checkpoint lies in ``<run>/models/``: the split the model was trained on."""
    split = checkpoint.resolve().parent.parent / "split.json"
    return split if checkpoint.resolve().parent.name == "models" and split.is_file() else None


def _evaluation_overrides(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """The overrides of an evaluation run (``evaluate``, ``detector evaluate``) on ``names`` of ``args.bundle``."""
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    if not Path(args.dataset_dir).is_dir():
        raise FileNotFoundError(f"--dataset-dir not found: {args.dataset_dir}")
    ovr: dict[str, Any] = {
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "output_dir": str(Path(args.output_dir).resolve()),
        "checkpoint": str(checkpoint.resolve()),
    }
    if args.max_cases is not None:
        ovr["max_cases"] = int(args.max_cases)
    if args.device is not None:
        ovr["device"] = device_expression(args.device)
    config = ConfigParser.load_config_files(config_files(args.bundle, names))
    ovr.update(_case_selection(args, config, _run_split(checkpoint)))
    for option, key in _CLI_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            ovr[key] = value
    ovr.update(_overrides(args))
    return ovr


def evaluate_command(args: argparse.Namespace) -> int:
    """``amat-monai evaluate``: robust evaluation of a bundle's checkpoint on its test split.

    Runs the bundle's ``configs/train.json`` with ``configs/robust_evaluate.json`` merged on top as a MONAI
    ``ConfigWorkflow``, with ``dataset_dir``, ``output_dir``, ``max_cases``, ``device`` and ``checkpoint``
    overridden, and the ``robust`` section overridden by ``--attacks``, ``--eps``, ``--steps``, ``--norm``
    and ``--restarts`` when given. When the checkpoint lies in ``<run>/models/`` and ``<run>/split.json``
    exists, that split file is used, so the test split is the one the model was trained against; ``--split``
    and ``--cases`` choose other cases (see :func:`_case_selection`), ``--max-cases`` keeps the first N of them.
    """
    names = ["train.json", "robust_evaluate.json"]
    workflow = build_workflow(args.bundle, names, "infer", **_evaluation_overrides(args, names))
    results = run_workflow(workflow)
    report = next((r for r in reversed(results or []) if isinstance(r, dict) and "results" in r), None)
    if report is None:
        raise RuntimeError(f"{args.bundle}/configs/robust_evaluate.json: its run list returned no robustness report")
    out = Path(workflow.parser.get_parsed_content("robust#output_dir"))
    print((out / "robustness.md").read_text(), end="")
    sanity = report["sanity"]
    status = {True: "all checks passed", None: "checks skipped"}.get(
        sanity.get("passed"), "FAILED: " + "; ".join(sanity["warnings"])
    )
    print(f"sanity: {status}")
    print(f"wrote {out / 'robustness.json'} ({report['throughput']['samples_per_second']} samples/s)")
    return 0


def detector_fit_command(args: argparse.Namespace) -> int:
    """``amat-monai detector fit``: the attack detectors of a checkpoint, from its clean training and validation
    splits (the run's ``split.json`` when the checkpoint lies in ``<run>/models/``); written next to it."""
    ovr = _overrides(args)
    split = _run_split(Path(args.checkpoint))
    if split is not None:
        ovr.setdefault("split_file", str(split))
    info = fit_detector(args.bundle, args.dataset_dir, args.output_dir, args.checkpoint, max_cases=args.max_cases,
                        device=args.device, **ovr)
    out = ovr.get("detector#output_dir")
    npz = Path(out) / "detector.npz" if out else detector_paths(args.checkpoint)[0]
    rates = ", ".join(f"{k} {v:.1%}" for k, v in info["validation_false_positive_rate"].items())
    layers = ", ".join(f"{layer['name']} ({layer['dim']} features, n={layer['n']})" for layer in info["layers"])
    print(f"wrote {npz} and {npz.with_suffix('.json').name}: layers {layers}; thresholds {info['thresholds']}; "
          f"clean validation flagged: {rates}")
    return 0


def detector_evaluate_command(args: argparse.Namespace) -> int:
    """``amat-monai detector evaluate``: the detectors under the robust evaluator's attacks, noise and the
    adaptive attack; the cases and attack options are those of ``amat-monai evaluate``."""
    names = ["train.json", "robust_evaluate.json", "detector_evaluate.json"]
    ovr = _evaluation_overrides(args, names)
    if getattr(args, "adaptive_weights", None) is not None:
        ovr["detection#adaptive_weights"] = args.adaptive_weights
    if getattr(args, "detector", None) is not None:
        ovr["detection#detector_json"] = str(Path(args.detector).resolve())
    workflow = build_workflow(args.bundle, names, "infer", **ovr)
    run_workflow(workflow)
    out = Path(workflow.parser.get_parsed_content("robust#output_dir"))
    print((out / "detection.md").read_text(), end="")
    print(f"wrote {out / 'detection.json'}, detection.md, attacks/ and adaptive-*/ (per-sample scores in "
          "robustness.csv)")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    """``amat-monai compare RUN_DIR... --output-dir O [--names STD,VAT5,AMAT]``: one table (markdown + CSV) and
    one plot of several models side by side."""
    reports = [load_report(d) for d in args.run_dirs]
    names = args.names or [str(r.get("name") or Path(d).name) for r, d in zip(reports, args.run_dirs)]
    if len(names) != len(reports):
        raise ValueError(f"--names gives {len(names)} names for {len(reports)} run folders")
    tables = metric_tables(reports, names)  # the primary metric, then e.g. detection's mAP@0.5 and per-class mAP
    out = Path(args.output_dir)
    markdown = "\n".join(t.markdown for t in tables)
    atomic_write_text(out / "comparison.md", markdown)
    atomic_write_text(out / "comparison.csv", tables[0].csv)
    for value, table in zip(report_values(reports)[1:], tables[1:]):
        atomic_write_text(out / f"comparison_{value}.csv", table.csv)
    plot_runs(reports, out / "comparison.png", names, values=report_values(reports))
    print(markdown, end="")
    print(f"wrote {out / 'comparison.md'}, comparison*.csv, comparison.png")
    return 0
