"""The ``amat-monai`` command line: a thin layer over the bundles' configs.

Each subcommand parses its arguments here and hands them to the module that implements it, so that the
command line and Python callers run the same code. Errors are printed as one line and exit with status 2
(``--verbose`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser"]

METHODS = ("std", "vat", "amat", "teat")


def _list_of(kind: type, what: str):
    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the comma-separated {what}, got {text!r}")
        return values

    return parse


_floats, _ints, _names = _list_of(float, "numbers"), _list_of(int, "integers"), _list_of(str, "names")


def _common(p: argparse.ArgumentParser, dataset: bool = True) -> None:
    p.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/hippocampus_seg")
    if dataset:
        p.add_argument("--dataset-dir", required=True, help="data set folder (e.g. a Decathlon task folder)")
    p.add_argument("--output-dir", required=True, help="where checkpoints, logs and results go")
    p.add_argument("--max-cases", type=int, default=None, help="use at most this many cases (quick runs)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                   help="extra bundle config override, e.g. --override 'batch_size=16' (repeatable); KEY must be "
                        "a key of the bundle's config and the value JSON")
    p.add_argument("--allow-expr", action="store_true",
                   help="let --override values be MONAI expressions ('$...') or file macros ('%%...'), which run "
                        "Python: only for values you wrote yourself")


# literal copies of amat_monai.calibration.ESTIMATORS and amat_monai.conditions.CONDITIONS, so that `--help` needs
# no torch import (tests/test_workflows.py keeps them equal)
ESTIMATORS = ("mean_std", "median_mad", "huber")
CONDITIONS = ("terms", "total", "metric")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="amat-monai",
        description="Adversarially robust training (STD, VAT, AMAT, TEAT) and robust evaluation of the MONAI bundles "
        "of this project. Each subcommand runs a bundle's configs; `amat-monai SUBCOMMAND --help` says what it writes.",
    )
    parser.add_argument("--verbose", action="store_true", help="on an error, show the full traceback")
    # the same flag after the subcommand; SUPPRESS keeps a subcommand's default from hiding the first one's
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str, writes: str) -> argparse.ArgumentParser:
        # --verbose after the subcommand too; the description says what the subcommand writes
        return sub.add_parser(name, parents=[verbose], help=help, description=f"{help[0].upper()}{help[1:]}. {writes}")

    p = add("train", "train a model with STD, VAT, AMAT or TEAT (optionally with SSAT on unlabelled cases)",
            "Writes OUTPUT_DIR/models/model.pt (final weights), models/checkpoint_epoch=N.pt (to --resume), "
            "run.json (what the folder belongs to), split.json, tensorboard/ and, for AMAT, margins.json.")
    _common(p)
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--eps", type=float, default=None, help="VAT / TEAT noise level (input units)")
    p.add_argument("--xi", default=None, help="xi.json for AMAT (from `amat-monai calibrate`)")
    p.add_argument("--condition", choices=CONDITIONS, default=None,
                   help="AMAT's expand condition: every loss term, the total loss or the task metric (bundle default)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--init-checkpoint", default=None, help="start from these weights (e.g. fine-tune the STD model)")
    p.add_argument("--labelled-fraction", type=float, default=None,
                   help="train on this share of the training cases' labels (a seeded split by case; default all)")
    p.add_argument("--ssat", action="store_true",
                   help="add semi-supervised adversarial training on the unlabelled rest (ssat.json; needs "
                        "--labelled-fraction below 1)")
    p.add_argument("--nproc", type=int, default=1, help="processes for distributed training (torchrun)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output-dir from its newest complete checkpoint")
    p.set_defaults(handler="amat_monai.commands:train_command")

    p = add("calibrate", "compute the AMAT threshold xi from a normally trained model",
            "Writes OUTPUT_DIR/xi.json: the thresholds of each expand condition and the share of training samples "
            "that pass them.")
    _common(p)
    p.add_argument("--checkpoint", required=True, help="the STD model's weights")
    p.add_argument("--z", type=float, default=None, help="xi = location + z * scale (bundle default)")
    p.add_argument("--estimator", choices=ESTIMATORS, default=None,
                   help="location and scale of the loss thresholds (bundle default)")
    p.add_argument("--metric-quantile", type=float, default=None,
                   help="the metric threshold leaves this share of training samples failing (default: the mean score)")
    p.set_defaults(handler="amat_monai.commands:calibrate_command")

    def evaluation_options(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("--checkpoint", required=True)
        p.add_argument("--split", default=None,
                       help="which cases: test (default: the training run's test split when its split.json is beside "
                            "models/), validation, train, or all (every case of --dataset-dir, e.g. another site's "
                            "folder); a bundle of named lists (ceph) takes their names too: test1, test2, test1[:50]")
        p.add_argument("--cases", default=None, metavar="FILE",
                       help="evaluate these cases instead (one case id per line)")
        p.add_argument("--attacks", type=_names, default=None, help="e.g. pgd,ifgsm,fgsm,noise")
        p.add_argument("--eps", type=_floats, default=None, help="noise levels, e.g. 2,6,10")
        p.add_argument("--steps", type=_ints, default=None, help="steps per attack, in the order of --attacks")
        p.add_argument("--norm", choices=("l2", "linf"), default=None)
        p.add_argument("--restarts", type=int, default=None)

    p = add("evaluate", "evaluate a model on clean and attacked inputs",
            "Writes OUTPUT_DIR/robustness.json, robustness.csv (one row per sample and attack), robustness.md and "
            "robustness.png, and prints the table.")
    evaluation_options(p)
    p.set_defaults(handler="amat_monai.commands:evaluate_command")

    p = add("detector", "fit or evaluate the detector that flags attacked inputs",
            "`detector fit` writes models/detector.npz and detector.json next to the checkpoint; `detector evaluate` "
            "writes OUTPUT_DIR/detection.json and detection.md.")
    detector = p.add_subparsers(dest="detector_command", required=True)
    d = detector.add_parser("fit", parents=[verbose], help="fit on the clean training split, threshold on validation",
                            description="Fit the feature-density detector of a checkpoint on its clean training "
                            "split and set the thresholds of it and of the squeeze baseline on the clean validation "
                            "split (no attack is seen). Writes detector.npz (arrays) and detector.json (checkpoint "
                            "sha256, layers, thresholds, validation false-positive rate) next to the checkpoint.")
    _common(d)
    d.add_argument("--checkpoint", required=True, help="the model whose inputs the detector screens")
    d.set_defaults(handler="amat_monai.commands:detector_fit_command")
    d = detector.add_parser("evaluate", parents=[verbose], help="ROC-AUC and detection rates under attack",
                            description="Measure the detectors on clean and attacked test inputs (the attack grid of "
                            "`amat-monai evaluate`, random noise of the same norms, and the adaptive PGD that also "
                            "lowers the detector's score). Writes OUTPUT_DIR/detection.json, detection.md, and the "
                            "per-sample scores in attacks/ and adaptive-W/robustness.csv.")
    evaluation_options(d)
    d.add_argument("--detector", default=None, metavar="JSON",
                   help="the detector's json (default: detector.json beside the checkpoint)")
    d.add_argument("--adaptive-weights", type=_floats, default=None,
                   help="weights of the detector's score in the adaptive attack's loss (bundle default: 1,10)")
    d.set_defaults(handler="amat_monai.commands:detector_evaluate_command")

    p = add("compare", "one table and one plot from several evaluation runs",
            "Writes OUTPUT_DIR/comparison.md, comparison.csv and comparison.png (with a table, a csv and a panel per "
            "secondary value where the reports have them, e.g. detection's map50), and prints the tables.")
    p.add_argument("run_dirs", nargs="+", help="folders holding robustness.json")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--names", type=_names, default=None, help="row names, in the order of the run folders")
    p.set_defaults(handler="amat_monai.commands:compare_command")

    p = add("serve", "serve the bundles from a local MONAI Label server (needs the [label] extra)",
            "Writes nothing but the server's own work folder; labels go back to the client.")
    p.add_argument("--bundles", type=_names, default=None, help="bundle folders to serve (default: all shipped)")
    p.add_argument("--studies", required=True, help="folder of images to label")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(handler="amat_monai.label.server:serve_command")

    p = add("demo", "the embedded demo: synthetic data, STD / VAT / AMAT, robust evaluation",
            "Writes OUTPUT_DIR/data (the synthetic task), runs/ (the models), eval/ and summary.md (the table).")
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
    except KeyboardInterrupt:
        print(f"amat-monai {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; the traceback under --verbose
        if args.verbose:
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        known = isinstance(e, (FileNotFoundError, ValueError, KeyError, RuntimeError, PermissionError))
        kind = "" if known else f"{type(e).__name__}: "
        print(f"amat-monai {args.command}: error: {kind}{message} (--verbose shows the traceback)", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
