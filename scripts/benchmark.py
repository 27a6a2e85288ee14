#!/usr/bin/env python
"""Benchmark (not a test): what adversarial training with amat-monai costs, measured side by side in ONE run.

On the segmentation bundle's network (``bundles/hippocampus_seg`` ``network_def``: MONAI DynUNet 2D, filters
16-32-64-128, 3 classes) and its data shapes (1×56×40 slices, batch 32), with synthetic tensors (no data
needed). Contenders alternate in every round; medians are reported. Prints a table and, last, one JSON line:

* ``amat_over_vat_epoch_time``: one AMAT epoch over one VAT epoch, same PGD steps (goal <= 1.05); AMAT
  shrinks the samples that fail halfway to their boundary, interpolated from the attack's own iterates (``xi``
  is set so that about half of them fail, as around AMAT's steady state); ``amat_step_shrink_over_vat_epoch_time``
  is AMAT with the step-back shrink rule;
* ``pgd_step_over_fwd_bwd``: one PGD step over one forward + input-gradient backward (goal <= 1.10);
* ``pgd_vs_torchattacks_time`` / ``pgd_vs_torchattacks_loss``: our ``pgd`` against torchattacks' ``PGDL2`` on
  this network with per-pixel CE and a ``[0, 1]`` clamp (goals <= 1.0 / >= 1.0), random start (same seed);
* ``peak_rss_amat_over_vat``: peak resident memory of a process training one AMAT epoch over one training a
  VAT epoch (goal <= 1.10), each in its own fresh process; ``..._increment_...`` subtracts a process that
  builds the same network and data but does not train;
* ``robust_eval_samples_per_s``: test slices per second through ``amat_monai.evaluation.robust_evaluate``
  for one PGD cell (``--eval-steps`` steps, one ε, no sanity cells);
* ``ddp2_over_single_epoch_time``: one AMAT epoch on 2 gloo processes (batch 16 each) over 1 process (batch
  32), same global batch, each process single-threaded, launched with ``torch.distributed.run``.

Usage::

    OMP_NUM_THREADS=1 python scripts/benchmark.py --quick
    OMP_NUM_THREADS=1 python scripts/benchmark.py
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from ignite.engine import Events
from monai.data import DistributedSampler
from monai.engines import SupervisedTrainer
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from amat_monai import distributed as D  # noqa: E402
from amat_monai.attacks import pgd  # noqa: E402
from amat_monai.handlers import AdaptiveMarginHandler, FixedMarginHandler  # noqa: E402
from amat_monai.losses import MeanLoss, SegmentationLoss  # noqa: E402

SHAPE = (56, 40)
BATCH = 32
DELTA = 1.0  # the bundle's AMAT delta
EPS = 2.0  # a VAT radius of the papers' grid


def bundle_network() -> torch.nn.Module:
    """The hippocampus bundle's ``network_def`` (1 input channel, 3 classes), seeded."""
    from monai.bundle import ConfigParser

    torch.manual_seed(0)
    config = ROOT / "bundles" / "hippocampus_seg" / "configs" / "train.json"
    if config.is_file():
        parser = ConfigParser()
        parser.read_config(str(config))
        parser["in_channels"], parser["num_classes"] = 1, 3
        return parser.get_parsed_content("network_def", instantiate=True)
    from monai.networks.nets import DynUNet

    return DynUNet(2, 1, 3, [3] * 4, [1, 2, 2, 2], [2, 2, 2], filters=[16, 32, 64, 128], norm_name="instance")


def synthetic_items(n: int, seed: int = 0) -> list[dict]:
    """Slices with two structures (classes 1 and 2) plus noise, z-scored intensities, stable ids."""
    g = torch.Generator().manual_seed(seed)
    h, w = SHAPE
    items = []
    for i in range(n):
        label = torch.zeros(1, h, w, dtype=torch.long)
        r, c = int(torch.randint(8, h - 24, (1,), generator=g)), int(torch.randint(6, w - 20, (1,), generator=g))
        label[:, r : r + 10, c : c + 8] = 1
        label[:, r + 10 : r + 18, c + 2 : c + 12] = 2
        image = 0.8 * label.float() + 0.5 * torch.randn(1, h, w, generator=g)
        image = (image - image.mean()) / image.std()
        items.append({"image": image, "label": label, "sample_id": f"case{i // 16}:{i % 16}",
                      "case": f"case{i // 16}", "slice": i % 16})  # fmt: skip
    return items


def calibrated_xi(net: torch.nn.Module, items: list[dict], steps: int) -> list[float]:
    """Median adversarial loss per term at radius ``DELTA``: about half the samples fail (and get bisected)."""
    terms = SegmentationLoss()
    x = torch.stack([i["image"] for i in items])
    y = torch.stack([i["label"] for i in items])
    net.train()
    x_adv = pgd(net, terms, x, y, DELTA, steps=steps, step_size=4 * DELTA / steps, train_mode=True)
    with torch.no_grad():
        losses = terms(net(x_adv), y)
    return losses.median(dim=0).values.tolist()


def make_handler(kind: str, steps: int, xi: list[float]):
    common = {"steps": steps, "step_size_factor": 4.0}
    if kind == "vat":
        return FixedMarginHandler(SegmentationLoss(), eps=EPS, **common)
    # "amat": the default boundary (interpolated from the attack's iterates, no extra forward pass)
    shrink = "step" if kind == "amat_step" else "halfway"
    return AdaptiveMarginHandler(SegmentationLoss(), xi=xi, delta=DELTA, shrink=shrink, log_every=0,
                                 freeze_clean_failures=False, **common)


def train_epoch(net0: torch.nn.Module, items: list[dict], kind: str, steps: int, xi: list[float],
                batch: int = BATCH, sampler=None, epochs: int = 1, clock=time.process_time) -> tuple[list[float], object]:  # fmt: skip
    """Train ``epochs`` epochs of ``kind`` from a copy of ``net0``; returns each epoch's seconds (CPU time of this
    single-threaded process by default: robust to other jobs on a shared machine) and the handler."""
    net = D.wrap_ddp(copy.deepcopy(net0), "cpu")
    handler = make_handler(kind, steps, xi)
    loader = DataLoader(items, batch_size=batch, shuffle=False, sampler=sampler)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3), loss_function=MeanLoss(SegmentationLoss()),
        train_handlers=[handler], decollate=False,
    )  # fmt: skip
    times: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: times.append(-clock()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: times.__setitem__(-1, times[-1] + clock()))
    trainer.run()
    return times, handler


def paired_range(num: list[float], den: list[float]) -> list[float]:
    """Min and max of the per-round ratios (each round measures both side by side): the noise around a median."""
    ratios = [a / b for a, b in zip(num, den)]
    return [min(ratios), max(ratios)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so that it measures what follows (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss`, from ``/proc/self/status``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


# -- child processes ----------------------------------------------------------------------------------------
def rss_child(kind: str, n_batches: int, steps: int, xi: list[float]) -> None:
    net0 = bundle_network()
    items = synthetic_items(n_batches * BATCH)
    process_peak_before = peak_rss_mb()  # imports and setup
    reset = reset_peak_rss()
    if kind != "base":
        train_epoch(net0, items, kind, steps, xi)
    print(json.dumps({"kind": kind, "peak_rss_mb": peak_rss_mb(), "setup_peak_rss_mb": process_peak_before,
                      "train_peak_rss_mb": vm_hwm_mb() if reset else float("nan")}))  # fmt: skip


def ddp_worker(out_file: str, n_batches: int, steps: int, xi: list[float]) -> None:
    D.init_process_group("cpu")
    world = D.get_world_size()
    net0 = bundle_network()
    items = synthetic_items(n_batches * BATCH)
    sampler = DistributedSampler(items, shuffle=False, even_divisible=True) if world > 1 else None
    times, _ = train_epoch(net0, items, "amat", steps, xi, batch=BATCH // world, sampler=sampler, epochs=2,
                           clock=time.perf_counter)  # wall time: the processes run in parallel
    if D.get_rank() == 0:
        Path(out_file).write_text(json.dumps({"world": world, "epoch_s": times}))
    D.destroy_process_group()


def run_child(args: list[str], env_extra: dict | None = None, torchrun: int | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    prefix = [sys.executable]
    if torchrun:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    proc = subprocess.run(prefix + [str(Path(__file__).resolve()), *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


# -- main ---------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a short run: fewer batches, steps and rounds")
    p.add_argument("--steps", type=int, default=None, help="PGD steps in training (default 20 as the authors, quick 3)")
    p.add_argument("--batches", type=int, default=None, help="batches of 32 per epoch (default 2)")
    p.add_argument("--rss-steps", type=int, default=3, help="PGD steps in the peak-memory processes (memory does not grow with steps)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3, quick 2)")
    p.add_argument("--eval-steps", type=int, default=None, help="PGD steps of the robust-evaluation cell (default 20, quick 5)")
    p.add_argument("--ddp-steps", type=int, default=None, help="PGD steps in the DDP comparison (default 5, quick 2)")
    p.add_argument("--skip-ddp", action="store_true")
    p.add_argument("--epoch-only", action="store_true", help="only the AMAT / VAT epoch-time comparison")
    p.add_argument("--attack-only", action="store_true", help="only the attack-step and torchattacks comparison")
    p.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--ddp-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--xi", type=float, nargs="*", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    steps = args.steps or (3 if args.quick else 20)
    n_batches = args.batches or 2
    rounds = args.rounds or (2 if args.quick else 3)
    eval_steps = args.eval_steps or (5 if args.quick else 20)
    ddp_steps = args.ddp_steps or (2 if args.quick else 5)
    if args.rss_child:
        return rss_child(args.rss_child, n_batches, steps, args.xi)
    if args.ddp_worker:
        return ddp_worker(args.ddp_worker, n_batches, ddp_steps, args.xi)

    import benchmark_attacks as ba

    t_start = time.time()
    net0 = bundle_network()
    items = synthetic_items(n_batches * BATCH)
    xi = calibrated_xi(copy.deepcopy(net0), items, steps)
    res: dict = {"cpu": ba.cpu_model(), "threads": torch.get_num_threads(), "steps": steps,
                 "samples_per_epoch": len(items), "batch": BATCH, "input": [BATCH, 1, *SHAPE], "xi": xi}  # fmt: skip

    if not args.attack_only:
        # 1. epoch time, VAT vs AMAT (bisect) vs AMAT (step shrink), alternating
        for kind in ("vat", "amat", "amat_step"):  # warm-up: allocator, first-call overheads (first epochs run slower)
            train_epoch(net0, items, kind, steps, xi)
        epoch = {"vat": [], "amat": [], "amat_step": []}
        shrunk = []
        names = list(epoch)
        for r in range(rounds):
            for kind in names[r % 3 :] + names[: r % 3]:  # rotate who goes first
                times, handler = train_epoch(net0, items, kind, steps, xi)
                epoch[kind].append(times[0])
                if kind == "amat":
                    shrunk.append(sum(v < 2 * DELTA for v in handler.table.as_dict().values()) / len(items))
        med = {k: statistics.median(v) for k, v in epoch.items()}
        res.update({f"epoch_s_{k}": v for k, v in med.items()})
        res["amat_over_vat_epoch_time"] = med["amat"] / med["vat"]
        res["amat_step_shrink_over_vat_epoch_time"] = med["amat_step"] / med["vat"]
        res["amat_fraction_shrunk"] = statistics.mean(shrunk)
        res["amat_over_vat_epoch_time_range"] = paired_range(epoch["amat"], epoch["vat"])
        res["amat_step_shrink_over_vat_epoch_time_range"] = paired_range(epoch["amat_step"], epoch["vat"])
        if args.epoch_only:
            print(json.dumps({k: v for k, v in res.items() if k.startswith(("epoch_s", "amat_", "steps", "threads"))}))
            return res

    # 2. attack step cost and torchattacks, on this network in eval mode, per-pixel CE, inputs in [0, 1]
    PGDL2 = ba.load_pgdl2()
    net = copy.deepcopy(net0).eval()
    x = torch.rand(BATCH, 1, *SHAPE)
    y = torch.stack([i["label"][0] for i in items[:BATCH]])
    alpha = 4 * EPS / steps

    def fwd_bwd():  # as many forward + input-gradient backward passes as the attack has steps
        for _ in range(steps):
            xg = x.clone().requires_grad_(True)
            torch.autograd.grad(ba.per_pixel_ce(net(xg), y).sum(), xg)

    def ours(seed, loss_fn=ba.per_pixel_ce_gather):  # the per-sample CE as SegmentationLoss computes it
        torch.manual_seed(seed)
        return pgd(net, loss_fn, x, y, EPS, steps=steps, step_size=alpha, clamp=(0.0, 1.0), train_mode=False)

    def theirs(seed):
        torch.manual_seed(seed)
        return PGDL2(net, eps=EPS, alpha=alpha, steps=steps, random_start=True)(x, y)

    contenders = {"fwd_bwd": lambda r: fwd_bwd(), "ours": ours, "theirs": theirs,
                  "ours_mean_ce": lambda r: ours(r, ba.batch_mean_ce)}  # fmt: skip
    for fn in contenders.values():
        fn(0)
    t = {k: [] for k in contenders}
    loss_o, loss_t = [], []
    names = list(contenders)
    for r in range(2 * rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            t0 = time.process_time()
            out = contenders[name](r)
            t[name].append(time.process_time() - t0)
            if name in ("ours", "theirs"):
                with torch.no_grad():
                    (loss_o if name == "ours" else loss_t).append(float(ba.per_pixel_ce(net(out), y).mean()))
    m = {k: statistics.median(v) for k, v in t.items()}
    res["fwd_bwd_s"] = m["fwd_bwd"] / steps
    res["pgd_step_s"] = m["ours"] / steps
    res["pgd_step_over_fwd_bwd"] = m["ours"] / m["fwd_bwd"]
    res["pgd_vs_torchattacks_time"] = m["ours"] / m["theirs"]
    res["pgd_vs_torchattacks_time_same_loss"] = m["ours_mean_ce"] / m["theirs"]
    res["pgd_vs_torchattacks_loss"] = statistics.mean(loss_o) / statistics.mean(loss_t)
    res["pgd_step_over_fwd_bwd_range"] = paired_range(t["ours"], t["fwd_bwd"])
    res["pgd_vs_torchattacks_time_range"] = paired_range(t["ours"], t["theirs"])
    res["pgd_vs_torchattacks_time_same_loss_range"] = paired_range(t["ours_mean_ce"], t["theirs"])
    if args.attack_only:
        print(json.dumps({k: v for k, v in res.items() if k.startswith(("pgd_", "fwd_", "steps", "threads"))}))
        return res

    # 3. robust evaluation throughput (one PGD cell, one eps, no sanity cells)
    try:
        from amat_monai.evaluation import robust_evaluate

        test_items = synthetic_items(BATCH * (1 if args.quick else 2), seed=1)
        loader = DataLoader(test_items, batch_size=BATCH, shuffle=False)
        robust_evaluate(net, SegmentationLoss(), loader, attacks=("pgd",), eps=(EPS,), steps=1, sanity=False,
                        progress=False)  # warm-up  # fmt: skip
        t0 = time.process_time()
        robust_evaluate(net, SegmentationLoss(), loader, attacks=("pgd",), eps=(EPS,), steps=eval_steps,
                        sanity=False, progress=False)  # fmt: skip
        res["robust_eval_samples_per_s"] = len(test_items) / (time.process_time() - t0)
        res["robust_eval_how"] = (f"amat_monai.evaluation.robust_evaluate, PGD-{eval_steps} at eps {EPS}, clean + 1 cell, "
                                  "per CPU second of one thread")  # fmt: skip
    except ImportError:
        t0 = time.process_time()
        ours(0)
        res["robust_eval_samples_per_s"] = BATCH / (time.process_time() - t0) * steps / eval_steps
        res["robust_eval_how"] = f"pgd alone, PGD-{eval_steps}"

    # 4. peak RSS, each in a fresh process, alternating
    rss = {"base": [], "vat": [], "amat": []}
    for r in range(rounds):
        for kind in (["vat", "amat", "base"] if r % 2 == 0 else ["amat", "vat", "base"]):
            out = run_child(["--rss-child", kind, "--batches", str(n_batches), "--steps", str(args.rss_steps),
                             "--xi", *map(str, xi)])  # fmt: skip
            rss[kind].append(json.loads(out.strip().splitlines()[-1]))
    mp = {k: statistics.median(r["peak_rss_mb"] for r in v) for k, v in rss.items()}  # whole process
    mr = {k: statistics.median(r["train_peak_rss_mb"] for r in v) for k, v in rss.items()}  # since setup
    res.update({f"peak_rss_mb_{k}": v for k, v in mp.items()})
    res.update({f"train_peak_rss_mb_{k}": v for k, v in mr.items()})
    res["peak_rss_amat_over_vat"] = mp["amat"] / mp["vat"]
    res["train_peak_rss_amat_over_vat"] = mr["amat"] / mr["vat"]
    res["train_peak_rss_increment_amat_over_vat"] = (mr["amat"] - mr["base"]) / max(mr["vat"] - mr["base"], 1e-9)

    # 5. DDP: 2 gloo processes × batch 16 against 1 process × batch 32 (second epoch timed: the first warms up)
    if not args.skip_ddp:
        ddp = {1: [], 2: []}
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(max(1, rounds - 1)):
                for world in ((2, 1) if r % 2 == 0 else (1, 2)):
                    out_file = os.path.join(tmp, f"ddp{world}_{r}.json")
                    run_child(["--ddp-worker", out_file, "--batches", str(n_batches), "--ddp-steps", str(ddp_steps),
                               "--xi", *map(str, xi)], torchrun=world)  # fmt: skip
                    ddp[world].append(json.loads(Path(out_file).read_text())["epoch_s"][-1])
        res["ddp_epoch_s_1proc"] = statistics.median(ddp[1])
        res["ddp_epoch_s_2proc"] = statistics.median(ddp[2])
        res["ddp2_over_single_epoch_time"] = res["ddp_epoch_s_2proc"] / res["ddp_epoch_s_1proc"]
        res["ddp_steps"] = ddp_steps
    res["wall_s"] = time.time() - t_start

    rows = [
        ("VAT epoch (s)", res["epoch_s_vat"], ""),
        ("AMAT epoch, bisect shrink (s)", res["epoch_s_amat"], ""),
        ("AMAT epoch, step shrink (s)", res["epoch_s_amat_step"], ""),
        ("amat_over_vat_epoch_time", res["amat_over_vat_epoch_time"], "<= 1.05"),
        ("amat_step_shrink_over_vat_epoch_time", res["amat_step_shrink_over_vat_epoch_time"], ""),
        ("AMAT samples shrunk (fraction)", res["amat_fraction_shrunk"], ""),
        ("forward + input-grad backward (s)", res["fwd_bwd_s"], ""),
        ("pgd step (s)", res["pgd_step_s"], ""),
        ("pgd_step_over_fwd_bwd", res["pgd_step_over_fwd_bwd"], "<= 1.10"),
        ("pgd_vs_torchattacks_time", res["pgd_vs_torchattacks_time"], "<= 1.0"),
        ("pgd_vs_torchattacks_time_same_loss", res["pgd_vs_torchattacks_time_same_loss"], ""),
        ("pgd_vs_torchattacks_loss", res["pgd_vs_torchattacks_loss"], ">= 1.0"),
        ("process peak RSS base/VAT/AMAT (MB)", f"{mp['base']:.0f} / {mp['vat']:.0f} / {mp['amat']:.0f}", ""),
        ("peak_rss_amat_over_vat", res["peak_rss_amat_over_vat"], "<= 1.10"),
        ("training peak RSS base/VAT/AMAT (MB)", f"{mr['base']:.0f} / {mr['vat']:.0f} / {mr['amat']:.0f}", ""),
        ("train_peak_rss_amat_over_vat", res["train_peak_rss_amat_over_vat"], "<= 1.10"),
        ("train_peak_rss_increment_amat_over_vat", res["train_peak_rss_increment_amat_over_vat"], ""),
        ("robust_eval_samples_per_s", res["robust_eval_samples_per_s"], ""),
    ]
    if "ddp2_over_single_epoch_time" in res:
        rows += [
            ("AMAT epoch, 1 proc x batch 32 (s)", res["ddp_epoch_s_1proc"], ""),
            ("AMAT epoch, 2 procs x batch 16 (s)", res["ddp_epoch_s_2proc"], ""),
            ("ddp2_over_single_epoch_time", res["ddp2_over_single_epoch_time"], ""),
        ]
    print(f"CPU: {res['cpu']}, {res['threads']} thread(s); {len(items)} slices of 1x{SHAPE[0]}x{SHAPE[1]} per epoch, "
          f"batch {BATCH}, {steps} PGD steps, {rounds} rounds")  # fmt: skip
    print(f"{'measure':40s} {'value':>16s} {'goal':>8s}")
    for name, value, goal in rows:
        v = f"{value:16.4f}" if isinstance(value, float) else f"{value:>16s}"
        spread = res.get(f"{name}_range")
        extra = f"   per-round {spread[0]:.3f} .. {spread[1]:.3f}" if spread else ""
        print(f"{name:40s} {v} {goal:>8s}{extra}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
