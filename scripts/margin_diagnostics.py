"""How AMAT's margins moved during a run: per-epoch margin quantiles and grown / shrunk / unchanged rates, split by
sample kind, from the ``margins.json`` history that :class:`amat_monai.handlers.AdaptiveMarginHandler` writes
(``history_path``; the bundles write it to ``<output_dir>/margins.json``).

    python scripts/margin_diagnostics.py --history reproduce_runs/hippocampus-margins/runs/AMAT-B/margins.json \\
        --bundle bundles/hippocampus_seg --dataset-dir $AMAT_DATA_DIR/Task04_Hippocampus \\
        --override 'train_slices="foreground"'

With ``--bundle`` and ``--dataset-dir`` the training slices of a segmentation bundle are split by how many
foreground structures their label holds (one- vs two-structure slices), read through the bundle's own
training data set and the run's ``split.json`` (next to ``margins.json``). Without them every sample is of one
kind. Whether a condition leaves AMAT room to grow before training is in ``xi.json``'s ``feasibility``
(``amat-monai calibrate``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amat_monai.workflows import build_workflow, common_overrides, parse_overrides  # noqa: E402


def sample_kinds(bundle: str, dataset_dir: str, split_file: Path, overrides: list[str]) -> dict[str, str]:
    """``{sample_id: "1 structure" | "2 structures" | ...}`` for the training slices of a segmentation bundle."""
    ovr = {**common_overrides(dataset_dir, split_file.parent), "split_file": str(split_file), **parse_overrides(overrides)}
    workflow = build_workflow(bundle, ["train.json"], "train", **ovr)
    workflow.initialize()
    kinds = {}
    for item in workflow.parser.get_parsed_content("train#dataset"):
        label = np.asarray(item["label"])
        n = len(set(np.unique(label).tolist()) - {0})
        kinds[str(item["sample_id"])] = f"{n} structure{'s' if n != 1 else ''}"
    return kinds


def epoch_table(history: dict, kinds: dict[str, str] | None) -> list[str]:
    """Markdown rows: per epoch and kind, margin quantiles and the share of margins grown / shrunk / unchanged."""
    ids = history["samples"]["ids"]
    per_epoch = [np.asarray(m, dtype=float) for m in history["samples"]["margins_per_epoch"]]
    init = float(history["settings"]["init"])
    labels = np.asarray([kinds.get(i, "unknown") if kinds else "all" for i in ids])
    rows = ["| epoch | kind | n | q10 | median | q90 | grown | shrunk | unchanged |", "|---|---|---|---|---|---|---|---|---|"]
    previous = np.full(len(ids), init)
    for epoch, margins in enumerate(per_epoch, start=1):
        for kind in sorted(set(labels)):
            sel = labels == kind
            m, p = margins[sel], previous[sel]
            q10, q50, q90 = np.percentile(m, [10, 50, 90])
            rows.append(f"| {epoch} | {kind} | {sel.sum()} | {q10:.2f} | {q50:.2f} | {q90:.2f} | "
                        f"{np.mean(m > p + 1e-9):.1%} | {np.mean(m < p - 1e-9):.1%} | {np.mean(np.abs(m - p) <= 1e-9):.1%} |")
        previous = margins
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", required=True, help="margins.json written by the AMAT handler")
    parser.add_argument("--bundle", default=None, help="a segmentation bundle, to split slices by structure count")
    parser.add_argument("--dataset-dir", default=None)
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON",
                        help="config overrides of the run (e.g. train_slices)")
    args = parser.parse_args(argv)
    history_path = Path(args.history)
    if not history_path.is_file():
        raise SystemExit(f"--history: no such file {history_path}")
    history = json.loads(history_path.read_text())
    kinds = None
    if args.bundle and args.dataset_dir:
        kinds = sample_kinds(args.bundle, args.dataset_dir, history_path.parent / "split.json", args.override)
    settings = history["settings"]
    print(f"{len(history['samples']['ids'])} samples; {json.dumps(settings)}\n")
    print("\n".join(epoch_table(history, kinds)))
    outcomes = [o for o in history["samples"]["last_outcome"] if o]
    print("\nlast visit: " + ", ".join(f"{k} {outcomes.count(k) / len(outcomes):.1%}" for k in ("grown", "shrunk", "frozen")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
