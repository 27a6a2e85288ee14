"""Why AMAT's margins grow, or do not: for a trained model and its ``xi.json``, the share of training samples
that meet AMAT's expand condition (every loss term below its ξ_k) under PGD at each ε, for several z
(ξ_k = mean_k + z·std_k, from the statistics ``xi.json`` keeps), and the share that each term alone lets through.

    python scripts/margin_diagnostics.py --bundle bundles/hippocampus_seg \\
        --dataset-dir $AMAT_DATA_DIR/Task04_Hippocampus --max-cases 20 \\
        --checkpoint reproduce_runs/hippocampus/runs/STD/models/model.pt \\
        --xi reproduce_runs/hippocampus/runs/STD/xi.json --eps 0,2.5,5,10 --z 0,1,2 --steps 3

The attack is the training attack (L2 PGD, step 4ε/steps, random start) with the network in eval mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amat_monai.attacks import pgd  # noqa: E402
from amat_monai.workflows import common_overrides, build_workflow, load_weights, parse_overrides  # noqa: E402


def adversarial_losses(network, loss_terms, loader, eps: list[float], steps: int, device) -> dict[float, torch.Tensor]:
    """Per-sample, per-term losses ``[N, K]`` of every training sample after PGD at each ε (ε = 0: clean)."""
    out: dict[float, list[torch.Tensor]] = {e: [] for e in eps}
    for batch in loader:
        x, y = batch["image"].to(device), batch["label"].to(device)
        for e in eps:
            x_adv = x if e == 0 else pgd(network, loss_terms, x, y, e, steps=steps, step_size=4.0 * e / steps)
            with torch.no_grad():
                out[e].append(loss_terms(network(x_adv), y).cpu())
    return {e: torch.cat(v) for e, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--dataset-dir", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--xi", required=True, help="xi.json written by `amat-monai calibrate`")
    parser.add_argument("--eps", default="0,2.5,5,10")
    parser.add_argument("--z", default="0,1,2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-cases", type=int, default=None)
    parser.add_argument("--output-dir", default=None,
                        help="where the split file goes (default: a temporary folder, so nothing is written into the bundle)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=JSON")
    args = parser.parse_args(argv)
    eps = [float(e) for e in args.eps.split(",")]
    zs = [float(z) for z in args.z.split(",")]
    stats = json.loads(Path(args.xi).read_text())["terms"]
    names = [t["name"] for t in stats]

    with tempfile.TemporaryDirectory() as tmp:
        overrides = {**common_overrides(args.dataset_dir, args.output_dir or tmp, args.max_cases, "cpu", args.checkpoint),
                     **parse_overrides(args.override)}
        workflow = build_workflow(args.bundle, ["train.json", "calibrate.json"], "infer", **overrides)
        workflow.initialize()
        network = load_weights(workflow.parser.get_parsed_content("network"), args.checkpoint).eval()
        loss_terms = workflow.parser.get_parsed_content("loss_terms")
        losses = adversarial_losses(network, loss_terms, workflow.parser.get_parsed_content("dataloader"), eps,
                                    args.steps, torch.device("cpu"))

    n = len(next(iter(losses.values())))
    print(f"{n} training samples of {args.dataset_dir}; ξ_k = mean_k + z·std_k from {args.xi}\n")
    print("| ε | z | ξ | all terms below ξ (expand) | " + " | ".join(f"{t} below" for t in names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for z in zs:
        xi = torch.tensor([t["location"] + z * t["scale"] for t in stats])
        for e in eps:
            below = losses[e] < xi
            per_term = " | ".join(f"{below[:, k].float().mean():.1%}" for k in range(len(names)))
            xi_text = ", ".join(f"{v:.4f}" for v in xi.tolist())
            print(f"| {e:g} | {z:g} | {xi_text} | {below.all(dim=1).float().mean():.1%} | {per_term} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
