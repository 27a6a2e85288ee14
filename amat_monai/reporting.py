"""Paper-style tables and robustness curves from ``robustness.json`` reports.

One report gives one row: ``| method | clean | PGD2 | PGD6 | PGD10 | PGD avg | IFGSM2 | ... | IFGSM avg |``
(method doc §7 layout); several reports (STD, VAT_ε, AMAT) give the side-by-side table of the papers.
``amat-monai compare RUN_DIR... --output-dir O`` (:mod:`amat_monai.commands`) writes ``comparison.md``,
``comparison.csv`` and ``comparison.png``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Table", "load_report", "paper_table", "metric_tables", "report_values", "plot_runs", "save_figure"]


@dataclass
class Table:
    """A rendered table: ``header`` and ``rows`` of strings, as markdown and as CSV (full precision)."""

    header: list[str]
    rows: list[list[str]]
    markdown: str
    csv: str


def load_report(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``robustness.json`` of a run folder (or the file itself), with a clear error when missing or invalid."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / "robustness.json"
    if not path.is_file():
        raise FileNotFoundError(f"no robustness.json in {run_dir} (run `amat-monai evaluate` first)")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    missing = [k for k in ("metric", "higher_is_better", "clean", "results") if k not in report]
    if missing:
        raise ValueError(f"{path} is not a robustness report: missing {missing}")
    return report


def _label(row: Mapping[str, Any]) -> str:
    name = str(row["attack"])
    base = "Noise" if name == "noise" else name.upper()
    return base if row.get("norm", "l2") == "l2" else f"{base}-Linf"


def _columns(reports: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, float | None]]:
    """``(header, attack label, eps or None for the average)`` in order of first appearance; ε = 0 rows are
    left out (they are a sanity check, equal to clean)."""
    by_attack: dict[str, list[float]] = {}
    for report in reports:
        for row in report["results"]:
            if float(row["eps"]) > 0:
                eps_list = by_attack.setdefault(_label(row), [])
                if float(row["eps"]) not in eps_list:
                    eps_list.append(float(row["eps"]))
    cols = []
    for label, eps_list in by_attack.items():
        cols += [(f"{label}{e:g}", label, e) for e in sorted(eps_list)]
        cols.append((f"{label} avg", label, None))
    return cols


def _value(report: Mapping[str, Any], label: str, eps: float, value: str | None = None) -> float | None:
    rows = [r for r in report["results"] if _label(r) == label and float(r["eps"]) == eps]
    v = (rows[0]["value"] if value is None else rows[0].get("metrics", {}).get(value)) if rows else None
    return float(v) if v is not None and math.isfinite(float(v)) else None


def _clean(report: Mapping[str, Any], value: str | None = None) -> float | None:
    v = report["clean"] if value is None else report.get("clean_metrics", {}).get(value)
    return float(v) if v is not None and math.isfinite(float(v)) else None


def report_values(reports: Sequence[Mapping[str, Any]]) -> list[str | None]:
    """``None`` (the primary metric) and the other values every report lists in ``reported_metrics``."""
    shared = [v for v in reports[0].get("reported_metrics", []) if all(v in r.get("reported_metrics", []) for r in reports)]
    return [None, *shared]


def _attack_settings(reports: Sequence[Mapping[str, Any]]) -> str:
    """``PGD 100 steps, step 4ε/100, 1 restart; IFGSM ...`` from the reports' ε > 0 rows."""
    by_label: dict[str, list[str]] = {}
    for report in reports:
        for r in report["results"]:
            eps, steps, step = float(r["eps"]), r.get("steps"), r.get("step_size")
            if eps <= 0 or r["attack"] == "noise" or not steps or step is None:
                text = "random noise of norm ε" if r["attack"] == "noise" else None
            elif r["attack"] == "fgsm":
                text = "one step of length ε"
            else:
                text = f"{steps} steps, step {float(step) / eps * steps:.3g}ε/{steps}"
                text += ", random start" if r.get("random_start") else ""
            if text is None:
                continue
            text += f", {r.get('restarts', 1)} restart(s)" if r.get("restarts", 1) > 1 else ""
            options = by_label.setdefault(_label(r), [])
            if text not in options:
                options.append(text)
    return "; ".join(f"{label} {' / '.join(opts)}" for label, opts in by_label.items())


def paper_table(reports: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None,
                value: str | None = None) -> Table:
    """The papers' table: one row per report, clean then each attack's ε columns and its average.

    The average of an attack is the mean of its values over the table's ε columns ("–" when the run lacks
    one of them, so that averages over different ε sets are never compared). With several reports, the best
    value of each column is in bold. Values use the report's ``digits`` (4 for Dice, 2 for MRE). ``value``
    tabulates another summary value of the reports (one of their ``reported_metrics``, e.g. ``"map50"``) instead
    of the primary metric.
    """
    if not reports:
        raise ValueError("no reports to tabulate")
    metrics = {(r["metric"], bool(r["higher_is_better"])) for r in reports}
    if len(metrics) > 1:
        raise ValueError(f"reports use different metrics {sorted(metrics)}; compare runs of one task only")
    names = list(names) if names else [str(r.get("name") or f"run{i}") for i, r in enumerate(reports)]
    if len(names) != len(reports):
        raise ValueError(f"{len(names)} names for {len(reports)} runs")
    metric, higher = next(iter(metrics))
    metric = metric if value is None else value
    digits = int(reports[0].get("digits", 4 if higher else 2))
    cols = _columns(reports)
    header = ["method", "clean"] + [c[0] for c in cols]
    values = []
    for report in reports:
        row: list[float | None] = [_clean(report, value)]
        for _, label, eps in cols:
            if eps is not None:
                row.append(_value(report, label, eps, value))
                continue
            # the average over the table's ε columns of this attack; undefined when one of them is missing
            cells = [_value(report, label, e, value) for _, lab, e in cols if lab == label and e is not None]
            row.append(sum(cells) / len(cells) if cells and None not in cells else None)
        values.append(row)

    best = []
    for j in range(len(header) - 1):
        column = [v[j] for v in values if v[j] is not None]
        best.append((max(column) if higher else min(column)) if len(column) > 1 else None)

    def fmt(v: float | None, j: int) -> str:
        if v is None:
            return "–"
        text = f"{v:.{digits}f}"
        return f"**{text}**" if best[j] is not None and v == best[j] else text

    rows = [[name] + [fmt(v, j) for j, v in enumerate(vals)] for name, vals in zip(names, values)]
    if value is not None:  # a secondary table: the attack settings and warnings are the primary table's
        lines = [f"{metric} ({'higher' if higher else 'lower'} is better)", "", "| " + " | ".join(header) + " |",
                 "|" + "---|" * len(header), *("| " + " | ".join(row) + " |" for row in rows)]
        return Table(header=header, rows=rows, markdown="\n".join(lines) + "\n", csv=_csv(header, names, values))
    arrow = "higher is better" if higher else "lower is better"
    lines = [
        f"{metric} ({arrow}); n = {', '.join(str(r.get('n_samples', '?')) for r in reports)} samples",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    settings = _attack_settings(reports)
    if settings:
        lines += ["", f"Attacks ({reports[0]['results'][0].get('norm', 'l2').upper()}): {settings}."]
    warn = [f"- {n}: sanity checks failed: {'; '.join(r['sanity']['warnings'])}" for n, r in zip(names, reports)
            if r.get("sanity", {}).get("passed") is False]
    if warn:
        lines += ["", *warn]
    return Table(header=header, rows=rows, markdown="\n".join(lines) + "\n", csv=_csv(header, names, values))


def _csv(header: list[str], names: Sequence[str], values: list[list[float | None]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for name, vals in zip(names, values):
        writer.writerow([name] + ["" if v is None else repr(float(v)) for v in vals])
    return buffer.getvalue()


def metric_tables(reports: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None) -> list[Table]:
    """:func:`paper_table` of the primary metric, then one per value of :func:`report_values`."""
    return [paper_table(reports, names, value) for value in report_values(reports)]


def plot_runs(
    reports: Sequence[Mapping[str, Any]], path: str | os.PathLike, names: Sequence[str] | None = None,
    values: Sequence[str | None] = (None,),
) -> None:
    """Metric against ε, one line per attack (and per run: colour = run, line style = attack), clean at ε = 0;
    one panel per entry of ``values`` (``None``: the primary metric; else a summary value such as ``"map50"``).
    Written atomically (PNG, matplotlib Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(names) if names else [str(r.get("name") or f"run{i}") for i, r in enumerate(reports)]
    styles = ["-", "--", ":", "-."]
    values = list(values) or [None]
    cols = min(len(values), 3)
    rows = -(-len(values) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    try:
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        for ax in axes.ravel()[len(values):]:
            ax.axis("off")
        for ax, value in zip(axes.ravel(), values):
            for i, (name, report) in enumerate(zip(names, reports)):
                labels = list(dict.fromkeys(_label(r) for r in report["results"]))
                for j, label in enumerate(labels):
                    eps = sorted({float(r["eps"]) for r in report["results"] if _label(r) == label and float(r["eps"]) > 0})
                    pts = [(0.0, _clean(report, value))] + [(e, _value(report, label, e, value)) for e in eps]
                    pts = [(x, y) for x, y in pts if y is not None]
                    if not pts:
                        continue
                    xs, ys = zip(*pts)
                    legend = label if len(reports) == 1 else f"{name} {label}"
                    ax.plot(xs, ys, styles[j % len(styles)], marker="o", color=colors[i % len(colors)], label=legend)
            metric = reports[0]["metric"] if value is None else value
            ax.set_xlabel(f"ε ({reports[0]['results'][0].get('norm', 'l2').upper()} norm of the noise)")
            ax.set_ylabel(metric + (" (higher is better)" if reports[0]["higher_is_better"] else " (lower is better)"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, path)
    finally:
        plt.close(fig)


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    """Save a matplotlib figure as PNG through a temporary file and a rename (a crash leaves no half file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
