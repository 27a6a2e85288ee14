"""The embedded demo: ``amat-monai demo`` (``make demo``) on a fresh clone, no data, no arguments.

It generates a small synthetic Decathlon task (two adjacent, equally bright structures told apart by shape and
by a faint texture on one of them), then, with the ``bundles/hippocampus_seg`` configs and a smaller network:
trains STD, calibrates ξ on the STD model, fine-tunes VAT at two ε and AMAT, and evaluates every model on the
clean test slices and under white-box L2 PGD-20 and IFGSM-10 attacks
(:func:`amat_monai.evaluation.robust_evaluate`). It prints one comparison table (whatever order it measured)
and writes a picture of an attacked test slice with every model's prediction, and the robustness curves.
Everything runs on the CPU in a few minutes; the settings are in :data:`DEMO_SETTINGS`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from amat_monai.checkpoints import atomic_write_text, latest_checkpoint, load_checkpoint
from amat_monai.data import make_synthetic_decathlon
from amat_monai.attacks import pgd
from amat_monai.evaluation import robust_evaluate
from amat_monai.reporting import plot_runs, save_figure
from amat_monai.workflows import calibrate, train

__all__ = ["DEMO_SETTINGS", "BUNDLE", "run_demo", "demo_command"]

#: the hippocampus bundle shipped with the project
BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "hippocampus_seg"

DEMO_SETTINGS: dict[str, Any] = {
    # equally bright structures told apart by shape (small and round against large and stretched) and by a faint
    # texture on the round one (see amat_monai.data.synthetic): a normally trained network leans on the texture.
    # Measured on the generated cases (z-scored as the bundle loads them): the checkerboard's amplitude is about
    # 0.3 over the ~20 voxels the round structure has in a slice, so an L2 of about 1.3 erases it (between the
    # two smallest evaluated ε); the structures stand 2.9 above the background, and erasing one takes about 14
    "data": {"num_cases": 24, "seed": 0, "shape_range": ((18, 24), (26, 32), (18, 24)), "texture": 0.1,
             "noise": 0.1, "shapes": ((0.7, 0.7), (1.1, 1.7))},
    # overrides of the bundle's train.json shared by every run (a smaller network and patch than the bundle's)
    "bundle": {
        "patch_size": [32, 24],
        "network_filters": [8, 16, 32],
        "network_kernels": [[3, 3], [3, 3], [3, 3]],
        "network_strides": [[1, 1], [2, 2], [2, 2]],
        "train_slices": "foreground",
        "eval_slices": "all_classes",
        "split_fractions": [0.7, 0.1],
        "batch_size": 32,
        "val_interval": 10,
        "tensorboard": False,
    },
    "std": {"epochs": 30, "learning_rate": 0.01},
    # VAT and AMAT fine-tune the STD model (the bundle's default is a fresh network) to fit the time budget
    "adversarial": {"epochs": 15, "learning_rate": 0.003, "attack_steps": 5},
    # AMAT as the hippocampus margin study chose it (docs/results/hippocampus/MARGINS.md): the slice's hard Dice
    # against the STD model's 3 % quantile, +Δ and no shrink
    "calibrate": {"z": 1.0, "xi_metric_quantile": 0.03},
    "vat": {"eps": [1.0, 3.0]},
    "amat": {"delta": 0.75, "amat_eps_max": 5.0, "amat_shrink": "none"},
    "eval": {"attacks": ("pgd", "ifgsm"), "eps": (1.0, 2.0, 4.0), "steps": (20, 10)},
}


def _threads() -> None:
    # sized for 2 shared CPU cores: on a busy machine one thread is several times faster than two contending
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def _bundle_parser(dataset_dir: str, out: Path, device: str, overrides: dict):
    """The hippocampus bundle's train.json with the demo's overrides, on the STD run's split."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    for key, value in {
        **overrides,
        "bundle_root": str(BUNDLE),
        "dataset_dir": dataset_dir,
        "output_dir": str(out / "runs" / "std"),  # reuse the STD run's split file
        "device": f"$torch.device('{device}')",
    }.items():
        parser[key] = value
    return parser


def _network(parser, model: str, device: str) -> torch.nn.Module:
    network = parser.get_parsed_content("network_def", instantiate=True, lazy=False)
    load_checkpoint(network, model, device)
    return network.to(device).eval()


def _evaluate(name: str, model: str, dataset_dir: str, out: Path, device: str, overrides: dict, ev: dict) -> dict:
    parser = _bundle_parser(dataset_dir, out, device, overrides)
    return robust_evaluate(
        _network(parser, model, device),
        parser.get_parsed_content("loss_terms"),
        parser.get_parsed_content("test#dataloader"),
        attacks=ev["attacks"],
        eps=ev["eps"],
        steps=list(ev["steps"]),
        task="segmentation",
        device=device,
        output_dir=str(out / "eval" / name),
        checkpoint=model,
        name=name,
        progress=True,
    )


def _dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean Dice of classes 1 and 2 of one slice."""
    scores = []
    for c in (1, 2):
        p, t = pred == c, label == c
        scores.append(2 * (p & t).sum().item() / max(p.sum().item() + t.sum().item(), 1))
    return sum(scores) / len(scores)


def _typical_slice(models: dict[str, str], out: Path, eps: float) -> str:
    """The evaluated test slice that looks most like the table: the one whose PGD Dice at ``eps`` is, over all
    models together, closest (squared distance) to each model's mean over the slices (from ``robustness.csv``)."""
    values: dict[str, dict[str, float]] = {}
    for name in models:
        with open(out / "eval" / name / "robustness.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["attack"] == "pgd" and float(r["eps"]) == eps and r["dice"]]
        values[name] = {r["sample_id"]: float(r["dice"]) for r in rows}
    means = {name: sum(v.values()) / len(v) for name, v in values.items()}
    common = set.intersection(*(set(v) for v in values.values()))
    return min(sorted(common), key=lambda sid: sum((values[n][sid] - means[n]) ** 2 for n in models))


def _picture(models: dict[str, str], dataset_dir: str, out: Path, device: str, overrides: dict, ev: dict) -> Path:
    """``demo.png``: a typical test slice (:func:`_typical_slice`), its label, the PGD perturbation against STD,
    and every model's prediction on the slice attacked against that model (white-box, the middle ε of the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parser = _bundle_parser(dataset_dir, out, device, overrides)
    dataset = parser.get_parsed_content("test#dataset")
    loss_terms = parser.get_parsed_content("loss_terms")
    eps = float(ev["eps"][len(ev["eps"]) // 2])
    sample_id = _typical_slice(models, out, eps)
    item = next(dataset[i] for i in range(len(dataset)) if dataset[i]["sample_id"] == sample_id)
    x = torch.as_tensor(item["image"]).float()[None].to(device)
    y = torch.as_tensor(item["label"]).long()[None].to(device)
    attacked = {}
    for name, path in models.items():
        network = _network(parser, path, device)
        x_adv = pgd(network, loss_terms, x, y, eps, steps=int(ev["steps"][0]), norm="l2", train_mode=False,
                    generator=torch.Generator(device=device).manual_seed(0))
        with torch.no_grad():
            attacked[name] = (x_adv, network(x_adv).argmax(1)[0].cpu(), network(x).argmax(1)[0].cpu())
    label = y[0, 0].cpu()
    std_adv, _, std_clean = attacked["STD"]
    columns = max(4, len(models))
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 4.8))
    for ax in axes.ravel():
        ax.axis("off")
    panels = [(x[0, 0].cpu(), f"test slice {sample_id}", "gray"), (label, "label", "viridis"),
              (std_clean, f"STD, clean: Dice {_dice(std_clean, label):.2f}", "viridis"),
              ((std_adv - x)[0, 0].cpu(), f"PGD perturbation vs STD (L2 ε={eps:g})", "coolwarm")]
    for ax, (image, title, cmap) in zip(axes[0], panels):
        ax.imshow(image.numpy(), cmap=cmap, vmin=0 if cmap == "viridis" else None, vmax=2 if cmap == "viridis" else None)
        ax.set_title(title, fontsize=7)
    for ax, (name, (_, pred, _)) in zip(axes[1], attacked.items()):
        ax.imshow(pred.numpy(), cmap="viridis", vmin=0, vmax=2)
        ax.set_title(f"{name} under PGD: Dice {_dice(pred, label):.2f}", fontsize=7)
    fig.tight_layout()
    path = out / "demo.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def _table(reports: dict[str, dict], cfg: dict) -> str:
    header = ["method", "clean"]
    for attack in cfg["attacks"]:
        header += [f"{attack.upper()}{e:g}" for e in cfg["eps"]] + [f"{attack.upper()} avg"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, report in reports.items():
        values = {(r["attack"], float(r["eps"])): r["value"] for r in report["results"]}
        row = [name, f"{report['clean']:.4f}"]
        for attack in cfg["attacks"]:
            vals = [values.get((attack, float(e)), float("nan")) for e in cfg["eps"]]
            row += [f"{v:.4f}" for v in vals] + [f"{sum(vals) / len(vals):.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _merged(settings: dict[str, Any] | None) -> dict[str, Any]:
    merged = {k: dict(v) for k, v in DEMO_SETTINGS.items()}
    for key, value in (settings or {}).items():
        merged[key].update(value)
    return merged


def run_demo(output_dir: str | os.PathLike = "demo_runs", device: str | None = None,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole demo; returns ``{"table", "seconds", "reports", "xi", "figure", "curves"}`` and writes
    ``summary.md``, ``demo.png`` (an attacked test slice and each model's prediction) and ``curves.png``.

    ``settings`` updates sections of :data:`DEMO_SETTINGS` (e.g. ``{"vat": {"eps": [1, 2]}}``).
    """
    _threads()
    cfg = _merged(settings)
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(output_dir).resolve()
    data = out / "data" / "Task_synthetic"
    marker = out / "data" / "settings.json"
    wanted = json.dumps(cfg["data"], sort_keys=True, default=list)
    if not (data / "dataset.json").is_file() or not marker.is_file() or marker.read_text() != wanted:
        print(f"[demo] generating a synthetic Decathlon task in {data}", flush=True)
        shutil.rmtree(data, ignore_errors=True)
        make_synthetic_decathlon(data, **cfg["data"])
        atomic_write_text(marker, wanted)
    common = dict(cfg["bundle"])
    runs = out / "runs"
    if runs.exists():  # the demo retrains every model: an earlier demo's runs are replaced, not resumed
        shutil.rmtree(runs)
    models = {}
    std, adv, calibration = cfg["std"], cfg["adversarial"], cfg["calibrate"]
    steps = 3 + len(cfg["vat"]["eps"])
    print(f"[demo] 1/{steps} training STD ({std['epochs']} epochs)", flush=True)
    models["STD"] = train(BUNDLE, "std", data, runs / "std", device=device, **common, **std)["model"]
    print(f"[demo] 2/{steps} calibrating ξ on the clean training slices", flush=True)
    xi = calibrate(BUNDLE, data, runs / "std", models["STD"], device=device, **calibration, **common)
    adv = {**adv, "init_checkpoint": models["STD"]}
    for i, eps in enumerate(cfg["vat"]["eps"]):
        print(f"[demo] {3 + i}/{steps} training VAT (ε = {eps:g}; {adv['epochs']} epochs from the STD model)",
              flush=True)
        models[f"VAT{eps:g}"] = train(BUNDLE, "vat", data, runs / f"vat{eps:g}", device=device, eps=eps, **common,
                                      **adv)["model"]
    delta = cfg["amat"]["delta"]
    print(f"[demo] {steps}/{steps} training AMAT (Δ = {delta:g}; {adv['epochs']} epochs from the STD model)",
          flush=True)
    models["AMAT"] = train(BUNDLE, "amat", data, runs / "amat", device=device, xi_file=xi,
                           **cfg["amat"], **common, **adv)["model"]
    ev = cfg["eval"]
    print(f"[demo] evaluating on the test slices: clean, PGD-{ev['steps'][0]} and IFGSM-{ev['steps'][1]} (L2)",
          flush=True)
    reports = {name: _evaluate(name, path, str(data), out, device, common, ev) for name, path in models.items()}
    seconds = time.perf_counter() - start
    table = _table(reports, ev)
    xi_content = json.loads(Path(xi).read_text())
    figure = _picture(models, str(data), out, device, common, ev)
    curves = out / "curves.png"
    plot_runs(list(reports.values()), curves, list(reports))

    margins = torch.load(latest_checkpoint(runs / "amat" / "models"), weights_only=True)["adversarial"]["margins"]
    m = torch.as_tensor(margins["margins"], dtype=torch.float64)
    n = next(iter(reports.values()))["n_samples"]
    failed = {k: r["sanity"]["warnings"] for k, r in reports.items() if r["sanity"].get("passed") is False}
    sanity = "all passed" if not failed else "; ".join(f"{k}: {', '.join(w)}" for k, w in failed.items())
    condition = cfg["amat"].get("amat_condition", "metric")
    threshold = xi_content["metric"]["xi"] if condition == "metric" else xi_content["total"]["xi"]
    kernels = f" ({torch.backends.cpu.get_cpu_capability()} kernels)" if str(device) == "cpu" else ""
    notes = (
        f"Dice (Average Dice Index over {n} synthetic test slices that contain both structures; higher is better). "
        f"The two structures are equally bright; one is small, round and carries a faint voxel checkerboard "
        f"(amplitude {cfg['data']['texture']:g} of the contrast), the other is large, stretched and smooth. "
        f"Attacks: white-box L2, ε in z-scored intensity units over the whole {common['patch_size'][0]}x"
        f"{common['patch_size'][1]} input; PGD {ev['steps'][0]} steps (random start), IFGSM {ev['steps'][1]} steps. "
        f"Training: STD {std['epochs']} clean epochs; VAT and AMAT fine-tune the STD model for {adv['epochs']} "
        f"epochs with {adv['attack_steps']}-step L2 PGD on [x; x_adv]; AMAT Δ = {delta:g}, condition {condition!r}, "
        f"shrink {cfg['amat'].get('amat_shrink', 'halfway')!r} "
        f"(ξ = {threshold:.4f} from the STD model), final margins mean {m.mean():.2f}, max {m.max():.2f} over "
        f"{m.numel()} training slices. Evaluator sanity checks: {sanity}. "
        f"Wall time {seconds:.0f} s on {device}{kernels} with {torch.get_num_threads()} thread(s). Seeded: every run on "
        "one machine gives this table; a CPU with other vector kernels rounds differently, and the training drifts."
    )
    summary = f"{table}\n\n{notes}\n"
    atomic_write_text(out / "summary.md", summary)
    print("\n" + summary, flush=True)
    print(f"[demo] wrote {out / 'summary.md'}, {figure} (an attacked test slice and every model's prediction) and "
          f"{curves} (the robustness curves)", flush=True)
    return {"table": table, "seconds": seconds, "reports": reports, "xi": xi, "figure": str(figure),
            "curves": str(curves)}


def demo_command(args: argparse.Namespace) -> int:
    """``amat-monai demo``."""
    run_demo(getattr(args, "output_dir", "demo_runs"), getattr(args, "device", None))
    return 0
