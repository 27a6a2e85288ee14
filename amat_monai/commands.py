"""The ``amat-monai`` subcommands: argument checks, bundle overrides, and what they print.

:mod:`amat_monai.cli` only parses; each subcommand's ``handler`` is a function here (``serve`` and ``demo`` live
with what they run: :mod:`amat_monai.label.server`, :mod:`amat_monai.demo`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from amat_monai.checkpoints import atomic_write_text
from amat_monai.reporting import load_report, paper_table, plot_runs
from amat_monai.workflows import build_workflow, calibrate, parse_overrides, run_workflow, train

__all__ = ["train_command", "calibrate_command", "evaluate_command", "compare_command"]


def train_command(args: argparse.Namespace) -> int:
    """``amat-monai train``."""
    ovr = parse_overrides(getattr(args, "override", None))
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
    paths = train(
        args.bundle, args.method, args.dataset_dir, args.output_dir, nproc=getattr(args, "nproc", 1),
        max_cases=args.max_cases, device=args.device, **ovr,
    )
    print(f"trained {args.method}: final weights {paths['model']}")
    return 0


def calibrate_command(args: argparse.Namespace) -> int:
    """``amat-monai calibrate``."""
    ovr = parse_overrides(getattr(args, "override", None))
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


def evaluate_command(args: argparse.Namespace) -> int:
    """``amat-monai evaluate``: robust evaluation of a bundle's checkpoint on its test split.

    Runs the bundle's ``configs/train.json`` with ``configs/robust_evaluate.json`` merged on top as a MONAI
    ``ConfigWorkflow``, with ``dataset_dir``, ``output_dir``, ``max_cases``, ``device`` and ``checkpoint``
    overridden, and the ``robust`` section overridden by ``--attacks``, ``--eps``, ``--steps``, ``--norm``
    and ``--restarts`` when given. When the checkpoint lies in ``<run>/models/`` and ``<run>/split.json``
    exists, that split file is used, so the test split is the one the model was trained against.
    """
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
        ovr["device"] = f"$torch.device('{args.device}')"
    split = checkpoint.resolve().parent.parent / "split.json"
    if checkpoint.resolve().parent.name == "models" and split.is_file():
        ovr["split_file"] = str(split)
    for option, key in _CLI_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            ovr[key] = value
    ovr.update(parse_overrides(getattr(args, "override", None)))
    workflow = build_workflow(args.bundle, ["train.json", "robust_evaluate.json"], "infer", **ovr)
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


def compare_command(args: argparse.Namespace) -> int:
    """``amat-monai compare RUN_DIR... --output-dir O [--names STD,VAT5,AMAT]``: one table (markdown + CSV) and
    one plot of several models side by side."""
    reports = [load_report(d) for d in args.run_dirs]
    names = args.names or [str(r.get("name") or Path(d).name) for r, d in zip(reports, args.run_dirs)]
    if len(names) != len(reports):
        raise ValueError(f"--names gives {len(names)} names for {len(reports)} run folders")
    table = paper_table(reports, names)
    out = Path(args.output_dir)
    atomic_write_text(out / "comparison.md", table.markdown)
    atomic_write_text(out / "comparison.csv", table.csv)
    plot_runs(reports, out / "comparison.png", names)
    print(table.markdown, end="")
    print(f"wrote {out / 'comparison.md'}, comparison.csv, comparison.png")
    return 0
