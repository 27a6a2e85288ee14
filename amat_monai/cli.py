"""The ``amat-monai`` command line: a thin layer over the bundles' configs.

Each subcommand parses its arguments here and hands them to the module that implements it, so that the
command line and Python callers run the same code. Errors are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

METHODS = ("std", "vat", "amat", "teat")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/hippocampus_seg")
    if dataset:
        p.add_argument("--dataset-dir", required=True, help="data set folder (e.g. a Decathlon task folder)")
    p.add_argument("--output-dir", required=True, help="where checkpoints, logs and results go")
    p.add_argument("--max-cases", type=int, default=None, help="use at most this many cases (quick runs)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="extra bundle config override, e.g. --override 'batch_size=16' (repeatable)")


# literal copies of amat_monai.calibration.ESTIMATORS and amat_monai.conditions.CONDITIONS, so that `--help` needs
# no torch import (tests/test_workflows.py keeps them equal)
ESTIMATORS = ("mean_std", "median_mad", "huber")
CONDITIONS = ("terms", "total", "metric")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amat-monai", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model with STD, VAT, AMAT or TEAT")
    _common(p)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--eps", type=float, default=None, help="VAT / TEAT noise level (input units)")
    p.add_argument("--xi", default=None, help="xi.json for AMAT (from `amat-monai calibrate`)")
    p.add_argument("--condition", choices=CONDITIONS, default=None,
                   help="AMAT's expand condition: every loss term, the total loss or the task metric (bundle default)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--init-checkpoint", default=None, help="start from these weights (e.g. fine-tune the STD model)")
    p.add_argument("--nproc", type=int, default=1, help="processes for distributed training (torchrun)")
    p.set_defaults(handler="amat_monai.commands:train_command")

    p = sub.add_parser("calibrate", help="compute the AMAT threshold xi from a normally trained model")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="the STD model's weights")
    p.add_argument("--z", type=float, default=None, help="xi = location + z * scale (bundle default)")
    p.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="location and scale of the loss thresholds (bundle default)")
    p.add_argument("--metric-quantile", type=float, default=None,
                   help="the metric threshold leaves this share of training samples failing (default: the mean score)")
    p.set_defaults(handler="amat_monai.commands:calibrate_command")

    p = sub.add_parser("evaluate", help="evaluate a model on clean and attacked inputs")
    _common(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--attacks", type=_names, default=None, help="e.g. pgd,ifgsm,fgsm,noise")
    p.add_argument("--eps", type=_floats, default=None, help="noise levels, e.g. 2,6,10")
    p.add_argument("--steps", type=_ints, default=None, help="steps per attack, in the order of --attacks")
    p.add_argument("--norm", choices=("l2", "linf"), default=None)
    p.add_argument("--restarts", type=int, default=None)
    p.set_defaults(handler="amat_monai.commands:evaluate_command")

    p = sub.add_parser("compare", help="one table and one plot from several evaluation runs")
    p.add_argument("run_dirs", nargs="+", help="folders holding robustness.json")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--names", type=_names, default=None, help="row names, in the order of the run folders")
    p.set_defaults(handler="amat_monai.commands:compare_command")

    p = sub.add_parser("serve", help="serve the bundles from a local MONAI Label server (needs the [label] extra)")
    p.add_argument("--bundles", type=_names, default=None, help="bundle folders to serve (default: all shipped)")
    p.add_argument("--studies", required=True, help="folder of images to label")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(handler="amat_monai.label.server:serve_command")

    p = sub.add_parser("demo", help="the embedded demo: synthetic data, STD / VAT / AMAT, robust evaluation")
    p.add_argument("--output-dir", default="demo_runs")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.set_defaults(handler="amat_monai.demo:demo_command")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, func_name = args.handler.split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        result = handler(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"amat-monai {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
