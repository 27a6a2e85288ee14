"""Paper-style comparison tables and plots from robustness.json reports."""

from __future__ import annotations

import csv
import io
import json

import pytest

from amat_monai.cli import main
from amat_monai.reporting import load_report, paper_table, plot_runs


def _report(name: str, clean: float, pgd: list[float], ifgsm: list[float], metric: str = "dice") -> dict:
    results = [{"attack": "pgd", "norm": "l2", "eps": e, "steps": 100, "step_size": 0.04 * e, "restarts": 1,
                "value": v} for e, v in zip((2.0, 6.0, 10.0), pgd)]
    results += [{"attack": "ifgsm", "norm": "l2", "eps": e, "steps": 10, "step_size": 0.4 * e, "restarts": 1,
                 "value": v} for e, v in zip((2.0, 6.0, 10.0), ifgsm)]
    results.insert(0, {"attack": "pgd", "norm": "l2", "eps": 0.0, "steps": 100, "step_size": 0.0, "restarts": 1,
                       "value": clean})
    return {"task": "segmentation", "metric": metric, "higher_is_better": metric == "dice", "name": name,
            "n_samples": 10, "clean": clean, "results": results, "averages": {}, "sanity": {"passed": True}}


# the papers' Hippocampus rows (method doc §7)
STD = _report("STD", 0.7589, [0.5217, 0.0379, 0.0015], [0.6572, 0.5105, 0.3870])
AMAT = _report("AMAT", 0.7845, [0.7525, 0.6752, 0.5580], [0.7587, 0.7280, 0.6968])


def test_paper_table_layout_values_and_bold_best():
    table = paper_table([STD, AMAT])
    assert table.header == ["method", "clean", "PGD2", "PGD6", "PGD10", "PGD avg", "IFGSM2", "IFGSM6", "IFGSM10",
                            "IFGSM avg"]
    # averages over ε > 0 reproduce the papers' avg columns (0.1870 / 0.5182 / 0.6619 / 0.7278)
    assert table.rows[0] == ["STD", "0.7589", "0.5217", "0.0379", "0.0015", "0.1870", "0.6572", "0.5105", "0.3870",
                             "0.5182"]
    assert table.rows[1] == ["AMAT", "**0.7845**", "**0.7525**", "**0.6752**", "**0.5580**", "**0.6619**",
                             "**0.7587**", "**0.7280**", "**0.6968**", "**0.7278**"]
    assert "| STD | 0.7589 | 0.5217 |" in table.markdown and "dice (higher is better)" in table.markdown
    rows = list(csv.reader(io.StringIO(table.csv)))
    assert rows[0] == table.header and rows[2][0] == "AMAT" and float(rows[2][5]) == pytest.approx(0.6619, abs=1e-4)


def test_paper_table_lower_is_better_and_missing_cells():
    a = _report("STD", 1.55, [4.35, 14.30, 38.87], [3.93, 10.91, 35.02], metric="mre")
    b = _report("AMAT", 1.77, [1.89, 2.04, 2.42], [1.89, 2.04, 2.39], metric="mre")
    b["results"] = [r for r in b["results"] if not (r["attack"] == "ifgsm" and r["eps"] == 10.0)]
    table = paper_table([a, b], names=["std", "amat"])
    assert table.rows[0][:2] == ["std", "**1.55**"] and table.rows[1][2] == "**1.89**"  # 2 digits, lower wins
    assert table.rows[1][header_index(table, "IFGSM10")] == "–"
    assert table.rows[1][header_index(table, "IFGSM avg")] == "–"  # an average over other ε is not comparable
    assert table.rows[0][header_index(table, "IFGSM avg")] == "16.62"  # the papers' STD value
    with pytest.raises(ValueError, match="different metrics"):
        paper_table([STD, a])
    with pytest.raises(ValueError, match="names"):
        paper_table([STD, AMAT], names=["one"])


def header_index(table, name: str) -> int:
    return table.header.index(name)


def test_compare_command_writes_table_csv_and_plot(tmp_path, capsys):
    dirs = []
    for report in (STD, AMAT):
        d = tmp_path / report["name"].lower()
        d.mkdir()
        (d / "robustness.json").write_text(json.dumps(report))
        dirs.append(str(d))
    out = tmp_path / "cmp"
    assert main(["compare", *dirs, "--output-dir", str(out), "--names", "STD,AMAT"]) == 0
    md = (out / "comparison.md").read_text()
    assert "| STD | 0.7589 | 0.5217 | 0.0379 | 0.0015 | 0.1870 |" in md
    assert (out / "comparison.csv").read_text().splitlines()[0].startswith("method,clean,PGD2")
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "AMAT" in capsys.readouterr().out

    assert main(["compare", str(tmp_path / "nowhere"), "--output-dir", str(out)]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "robustness.json").write_text("{}")
    with pytest.raises(ValueError, match="missing"):
        load_report(tmp_path / "bad")


def test_plot_runs_single_report(tmp_path):
    plot_runs([STD], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*"))


def _detection(name: str, clean: dict, pgd: list[dict]) -> dict:
    """A detection report: the primary ``map`` and the reported ``map50`` per cell."""
    results = [{"attack": "pgd", "norm": "l2", "eps": e, "steps": 20, "step_size": 0.2 * e, "restarts": 1,
                "value": m["map"], "metrics": m} for e, m in zip((5.0, 10.0), pgd)]
    return {"task": "detection", "metric": "map", "higher_is_better": True, "name": name, "n_samples": 72,
            "clean": clean["map"], "clean_metrics": clean, "reported_metrics": ["map50"], "results": results,
            "averages": {}, "sanity": {"passed": True}}


def test_secondary_values_get_their_own_table_csv_and_panel(tmp_path, capsys):
    from PIL import Image

    runs = {"STD": _detection("STD", {"map": 0.55, "map50": 0.85}, [{"map": 0.10, "map50": 0.20}, {"map": 0.0, "map50": 0.01}]),
            "AMAT": _detection("AMAT", {"map": 0.54, "map50": 0.84}, [{"map": 0.30, "map50": 0.60}, {"map": 0.2, "map50": 0.45}])}
    for name, report in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "robustness.json").write_text(json.dumps(report))
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "STD"), str(tmp_path / "AMAT"), "--output-dir", str(out)]) == 0
    markdown = (out / "comparison.md").read_text()
    assert "map (higher is better)" in markdown and "map50 (higher is better)" in markdown
    assert "| AMAT | 0.8400 | **0.6000** | **0.4500** | **0.5250** |" in markdown.split("map50 (higher")[1]
    rows = list(csv.reader(io.StringIO((out / "comparison_map50.csv").read_text())))
    assert rows[1][:2] == ["STD", "0.85"] and float(rows[1][4]) == pytest.approx(0.105)
    with Image.open(out / "comparison.png") as png:
        assert png.size[0] >= 2 * 600  # two panels side by side (6 inches each at 120 dpi)
    assert "map50" in capsys.readouterr().out
