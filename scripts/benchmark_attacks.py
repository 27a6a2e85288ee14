#!/usr/bin/env python
"""Benchmark (not a test): the cost of one step of ``amat_monai.attacks.pgd`` and a side-by-side comparison with
torchattacks' ``PGDL2``, on a 2D MONAI UNet with a per-pixel cross-entropy loss.

Measured in ONE run, rotating the contenders' order every round and reporting medians of CPU time (one thread;
CPU time is much less disturbed than wall time by other jobs on a shared machine):

* ``pgd_step_over_fwd_bwd``: time of one PGD step (``pgd`` with ``--steps`` steps, divided by the steps)
  over one forward pass plus one input-gradient backward pass (the floor an attack step cannot go below);
* ``pgd_vs_torchattacks_time``: our ``pgd`` over ``torchattacks.PGDL2``, same eps, steps, step size, ``[0, 1]``
  clamp, eval mode, fixed start (both from ``x``) and random start; ours computes the per-sample loss its API
  needs (``F.cross_entropy(reduction="none")`` averaged per sample), torchattacks a batch-mean CE, so
  ``..._same_loss`` also times ours with that batch-mean CE;
* ``pgd_vs_torchattacks_loss``: final per-pixel CE of our adversarial images over torchattacks' (>= 1 means ours
  is at least as strong), for the fixed start (deterministic) and the random start (same seed; both draw their
  start from the global generator in the same order, so the starts coincide).

torchattacks is a benchmark-only dependency: ``pip install --no-deps torchattacks`` (never torchvision). Its
package ``__init__`` imports scipy for other attacks; only ``attack.py`` and ``attacks/pgdl2.py`` are loaded here.
torchattacks computes ``nn.CrossEntropyLoss()`` on the logits: on ``[B, C, H, W]`` logits with ``[B, H, W]``
labels that is exactly the per-pixel CE averaged over pixels and samples, and after the per-sample L2
normalisation of the gradient it gives the same steps as our per-sample sum.

Usage::

    OMP_NUM_THREADS=1 python scripts/benchmark_attacks.py            # full
    OMP_NUM_THREADS=1 python scripts/benchmark_attacks.py --quick    # a short run
    OMP_NUM_THREADS=1 python scripts/benchmark_attacks.py --profile  # also a torch.profiler table of one pgd call
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from monai.networks.nets import UNet

from amat_monai.attacks import pgd


def load_pgdl2():
    """torchattacks' ``PGDL2`` class without running the package ``__init__`` (which needs scipy)."""
    spec = importlib.util.find_spec("torchattacks")
    if spec is None:
        raise SystemExit("torchattacks is not installed: pip install --no-deps torchattacks")
    if "torchattacks" not in sys.modules:
        pkg = types.ModuleType("torchattacks")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchattacks"] = pkg
    from torchattacks.attacks.pgdl2 import PGDL2

    return PGDL2


def per_pixel_ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over pixels of the cross-entropy, ``[B]``."""
    return F.cross_entropy(pred, y, reduction="none").flatten(1).mean(dim=1)


def batch_mean_ce(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """torchattacks' loss, ``nn.CrossEntropyLoss()`` (mean over pixels and samples), repeated to shape ``[B]``."""
    return F.cross_entropy(pred, y).expand(pred.shape[0])


def per_pixel_ce_gather(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:func:`per_pixel_ce` written as ``-log_softmax`` gathered at the label: same values, cheaper backward."""
    return -pred.log_softmax(1).gather(1, y[:, None]).flatten(1).mean(dim=1)


def timed(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loss_timing(batch: int, shape, rounds: int, repeats: int = 10) -> dict:
    """CPU ms of forward + backward of the loss alone on ``[B, 3, H, W]`` logits, for ways to get per-sample CE."""
    torch.manual_seed(0)
    logits = torch.randn(batch, 3, *shape)
    y = torch.randint(0, 3, (batch, *shape))
    variants = {
        "batch_mean_ce (torchattacks)": lambda p: F.cross_entropy(p, y),
        "per_sample_ce reduction=none (ours)": lambda p: per_pixel_ce(p, y).sum(),
        "per_sample_ce log_softmax+gather": lambda p: per_pixel_ce_gather(p, y).sum(),
    }
    times = {k: [] for k in variants}
    for _ in range(3 * rounds):
        for name, fn in variants.items():
            p = logits.clone().requires_grad_(True)
            t0 = time.process_time()
            for _ in range(repeats):
                torch.autograd.grad(fn(p), p)
            times[name].append((time.process_time() - t0) / repeats * 1e3)
    result = {k: statistics.median(v) for k, v in times.items()}
    for name, ms in result.items():
        print(f"{name:40s} {ms:8.3f} ms")
    print(json.dumps(result))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shape", type=int, nargs=2, default=(56, 40))
    p.add_argument("--steps", type=int, default=None, help="PGD steps (default 10, quick 5)")
    p.add_argument("--eps", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=None, help="rotating rounds (default 12, quick 3)")
    p.add_argument("--seeds", type=int, default=None, help="random-start seeds for the loss ratio (default 5, quick 2)")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one pgd call")
    p.add_argument("--loss-timing", action="store_true",
                   help="only time forward + backward of per-sample CE formulations against the batch-mean CE")  # fmt: skip
    args = p.parse_args(argv)
    steps = args.steps or (5 if args.quick else 10)
    rounds = args.rounds or (3 if args.quick else 12)
    seeds = args.seeds or (2 if args.quick else 5)
    alpha = 4.0 * args.eps / steps
    if args.loss_timing:
        return loss_timing(args.batch, args.shape, rounds)
    PGDL2 = load_pgdl2()

    torch.manual_seed(0)
    net = UNet(2, 1, 3, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2).eval()
    h, w = args.shape
    x = torch.rand(args.batch, 1, h, w)
    y = torch.randint(0, 3, (args.batch, h, w))
    for param in net.parameters():
        param.requires_grad_(True)

    def fwd_bwd():  # as many forward + input-gradient backward passes as the attack has steps
        for _ in range(steps):
            xg = x.clone().requires_grad_(True)
            loss = per_pixel_ce(net(xg), y).sum()
            torch.autograd.grad(loss, xg)

    def ours(random_start: bool, seed: int = 0, loss_fn=per_pixel_ce):
        torch.manual_seed(seed)
        return pgd(net, loss_fn, x, y, args.eps, steps=steps, step_size=alpha, random_start=random_start,
                   clamp=(0.0, 1.0), train_mode=False)  # fmt: skip

    def theirs(random_start: bool, seed: int = 0):
        torch.manual_seed(seed)
        return PGDL2(net, eps=args.eps, alpha=alpha, steps=steps, random_start=random_start)(x, y)

    contenders = {
        "fwd_bwd": lambda r: fwd_bwd(),
        "ours_fixed": lambda r: ours(False),
        "theirs_fixed": lambda r: theirs(False),
        "ours_random": lambda r: ours(True, r),
        "theirs_random": lambda r: theirs(True, r),
        # the loss torchattacks computes (batch-mean CE; the per-sample values are then meaningless, the steps
        # are the same): isolates the attack loop from the cost of a per-sample loss
        "ours_random_mean_ce": lambda r: ours(True, r, batch_mean_ce),
        "ours_random_gather_ce": lambda r: ours(True, r, per_pixel_ce_gather),
    }
    for fn in contenders.values():  # warm-up (allocator, first-call overheads)
        fn(0)
    times = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            times[name].append(timed(lambda: contenders[name](r)))
    med = {k: statistics.median(v) for k, v in times.items()}

    def final_loss(xa):
        with torch.no_grad():
            return float(per_pixel_ce(net(xa), y).mean())

    if True:  # torchattacks needs grad mode on: no torch.no_grad() around the attacks
        clean = final_loss(x)
        fixed = (final_loss(ours(False)), final_loss(theirs(False)))
        rnd_ours, rnd_theirs, start_diff = [], [], []
        for s in range(seeds):
            a, b = ours(True, 100 + s), theirs(True, 100 + s)
            rnd_ours.append(final_loss(a))
            rnd_theirs.append(final_loss(b))
            start_diff.append(float((a - b).abs().max()))

    per_step = {k: v / steps for k, v in med.items()}
    result = {
        "device": "cpu",
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "network": "monai UNet 2D (16,32,64,128), 2 res units, instance norm, eval mode",
        "input": [args.batch, 1, h, w],
        "eps": args.eps,
        "steps": steps,
        "step_size": alpha,
        "rounds": rounds,
        "fwd_bwd_s": med["fwd_bwd"] / steps,
        "pgd_step_s": per_step["ours_random"],
        "torchattacks_step_s": per_step["theirs_random"],
        "pgd_step_over_fwd_bwd": per_step["ours_random"] / per_step["fwd_bwd"],
        "pgd_step_over_fwd_bwd_fixed_start": per_step["ours_fixed"] / per_step["fwd_bwd"],
        "torchattacks_step_over_fwd_bwd": per_step["theirs_random"] / per_step["fwd_bwd"],
        "pgd_vs_torchattacks_time": med["ours_random"] / med["theirs_random"],
        "pgd_vs_torchattacks_time_fixed_start": med["ours_fixed"] / med["theirs_fixed"],
        "pgd_vs_torchattacks_time_same_loss": med["ours_random_mean_ce"] / med["theirs_random"],
        "pgd_vs_torchattacks_time_gather_ce": med["ours_random_gather_ce"] / med["theirs_random"],
        "clean_loss": clean,
        "pgd_vs_torchattacks_loss": statistics.mean(rnd_ours) / statistics.mean(rnd_theirs),
        "pgd_vs_torchattacks_loss_fixed_start": fixed[0] / fixed[1],
        "loss_ours_fixed": fixed[0],
        "loss_torchattacks_fixed": fixed[1],
        "loss_ours_random_mean": statistics.mean(rnd_ours),
        "loss_torchattacks_random_mean": statistics.mean(rnd_theirs),
        "max_abs_diff_adv_random_same_seed": max(start_diff),
    }

    def spread(a: str, b: str) -> list[float]:  # min and max of the per-round ratios
        ratios = [x / y for x, y in zip(times[a], times[b])]
        return [min(ratios), max(ratios)]

    result["pgd_step_over_fwd_bwd_range"] = spread("ours_random", "fwd_bwd")
    result["pgd_vs_torchattacks_time_range"] = spread("ours_random", "theirs_random")
    result["pgd_vs_torchattacks_time_same_loss_range"] = spread("ours_random_mean_ce", "theirs_random")
    result["pgd_vs_torchattacks_time_gather_ce_range"] = spread("ours_random_gather_ce", "theirs_random")
    print(f"CPU: {result['cpu']}, {result['threads']} thread(s); input {result['input']}, {steps} steps, "
          f"eps {args.eps}")  # fmt: skip
    print(f"{'measure':44s} {'value':>12s}")
    rows = [
        ("forward + input-gradient backward (s)", per_step["fwd_bwd"]),
        ("our pgd, per step, random start (s)", per_step["ours_random"]),
        ("our pgd, per step, fixed start (s)", per_step["ours_fixed"]),
        ("torchattacks PGDL2, per step, random (s)", per_step["theirs_random"]),
        ("torchattacks PGDL2, per step, fixed (s)", per_step["theirs_fixed"]),
        ("pgd step / (fwd + bwd)        goal <= 1.10", result["pgd_step_over_fwd_bwd"]),
        ("pgd / torchattacks time       goal <= 1.0", result["pgd_vs_torchattacks_time"]),
        ("  same, fixed start", result["pgd_vs_torchattacks_time_fixed_start"]),
        ("  same, with torchattacks' batch-mean CE", result["pgd_vs_torchattacks_time_same_loss"]),
        ("  same, per-sample CE via log_softmax+gather", result["pgd_vs_torchattacks_time_gather_ce"]),
        ("pgd / torchattacks final loss goal >= 1.0", result["pgd_vs_torchattacks_loss"]),
        ("  same, fixed start", result["pgd_vs_torchattacks_loss_fixed_start"]),
        ("clean loss", clean),
        ("max |x_adv ours - theirs|, same seed", result["max_abs_diff_adv_random_same_seed"]),
    ]
    for name, value in rows:
        print(f"{name:44s} {value:12.4f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ours(True, 0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
