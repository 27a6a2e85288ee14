import csv
import math

import numpy as np
import pytest

from amat_monai.comparison import (curve_gap, curve_value, frontier, load_case_scores, paired_bootstrap, read_case_scores,
                                   save_case_scores)


def _write(path, rows):
    fields = ["sample_id", "case", "attack", "eps", "role", "dice"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(dict(zip(fields, r)))


def _model(path, clean, pgd):
    """Two cases: case a has two slices, case b one; per-slice values given per case."""
    rows = []
    for case, slices in (("a", 2), ("b", 1)):
        for s in range(slices):
            rows.append((f"{case}:{s}", case, "clean", 0.0, "clean", clean[case]))
            for eps, value in pgd[case].items():
                rows.append((f"{case}:{s}", case, "pgd", eps, "grid", value))
        rows.append((f"{case}:9", case, "pgd", 99.0, "sanity", 0.0))  # not a grid cell: ignored
    _write(path, rows)
    return read_case_scores(path, "dice")


def test_case_scores_average_over_slices_then_noise_levels(tmp_path):
    scores = _model(tmp_path / "m.csv", {"a": 0.8, "b": 0.5}, {"a": {2.0: 0.6, 6.0: 0.4}, "b": {2.0: 0.3, 6.0: 0.0}})
    assert scores.cases == ["a", "b"]
    s = scores.summary()
    assert s["clean"] == pytest.approx((0.8 * 2 + 0.5) / 3)
    assert s["pgd"] == pytest.approx(((0.6 * 2 + 0.3) / 3 + (0.4 * 2 + 0.0) / 3) / 2)
    # case b drawn twice, case a never: the summary is case b's
    assert scores.summary(np.array([0.0, 2.0])) == pytest.approx({"clean": 0.5, "pgd": 0.15})


def test_saved_case_scores_bootstrap_as_the_csv_they_came_from(tmp_path):
    a = _model(tmp_path / "a.csv", {"a": 0.8, "b": 0.5}, {"a": {2.0: 0.6, 6.0: 0.4}, "b": {2.0: 0.3, 6.0: 0.0}})
    b = _model(tmp_path / "b.csv", {"a": 0.7, "b": 0.6}, {"a": {2.0: 0.5, 6.0: 0.5}, "b": {2.0: 0.4, 6.0: 0.1}})
    save_case_scores(b, tmp_path / "b.json", "dice")
    b_loaded = load_case_scores(tmp_path / "b.json", "dice")
    assert b_loaded.cases == ["a", "b"] and b_loaded.summary() == b.summary()
    assert b_loaded.cells[("clean", 0.0)][1].tolist() == [2, 1]  # the slice counts survive
    assert paired_bootstrap({"a": a, "b": b_loaded}, "a", "b", resamples=50) == \
        paired_bootstrap({"a": a, "b": b}, "a", "b", resamples=50)
    with pytest.raises(ValueError, match="of 'dice', not of 'mre'"):
        load_case_scores(tmp_path / "b.json", "mre")


def test_curve_interpolates_and_never_extrapolates():
    pts = [(0.8, 0.2), (0.7, 0.6)]
    assert curve_value(pts, 0.75) == pytest.approx(0.4)
    assert math.isnan(curve_value(pts, 0.9))
    assert curve_gap({"clean": 0.75, "pgd": 0.5}, [{"clean": 0.8, "pgd": 0.2}, {"clean": 0.7, "pgd": 0.6}], "pgd") == \
        pytest.approx(0.1)


def test_the_curve_is_vats_frontier_dominated_arms_dropped():
    # (0.78, 0.56) is beaten on both by (0.782, 0.60): the line runs 0.782 -> 0.77 -> 0.758, not through it
    pts = [(0.781, 0.22), (0.778, 0.56), (0.770, 0.625), (0.758, 0.654), (0.782, 0.597)]
    assert frontier(pts) == [(0.758, 0.654), (0.770, 0.625), (0.782, 0.597)]
    assert curve_value(pts, 0.776) == pytest.approx(0.611)  # halfway between 0.770 and 0.782
    assert math.isnan(curve_value(pts, 0.785))
    # errors (lower is better): (2.0, 3.0) is beaten on both by (1.9, 2.5)
    errors = [(1.7, 6.7), (1.9, 2.5), (2.0, 3.0), (2.2, 2.3)]
    assert frontier(errors, higher_is_better=False) == [(1.7, 6.7), (1.9, 2.5), (2.2, 2.3)]
    assert curve_value(errors, 2.05, higher_is_better=False) == pytest.approx(2.4)


def test_paired_bootstrap_of_a_uniform_gain(tmp_path):
    base = {"a": {2.0: 0.5}, "b": {2.0: 0.3}}
    models = {
        "VAT": _model(tmp_path / "v.csv", {"a": 0.7, "b": 0.7}, base),
        "AMAT": _model(tmp_path / "m.csv", {"a": 0.7, "b": 0.7}, {c: {2.0: v[2.0] + 0.1} for c, v in base.items()}),
    }
    out = paired_bootstrap(models, "AMAT", "VAT", resamples=200)
    # the same gain on every case: every resample gives exactly 0.1, so the interval is that point
    assert out["pgd"]["estimate"] == pytest.approx(0.1)
    assert out["pgd"]["low"] == pytest.approx(0.1) and out["pgd"]["high"] == pytest.approx(0.1)
    assert out["clean"]["estimate"] == pytest.approx(0.0)


def test_bootstrap_interval_covers_a_case_dependent_difference(tmp_path):
    models = {
        "VAT": _model(tmp_path / "v.csv", {"a": 0.7, "b": 0.7}, {"a": {2.0: 0.5}, "b": {2.0: 0.5}}),
        "AMAT": _model(tmp_path / "m.csv", {"a": 0.7, "b": 0.7}, {"a": {2.0: 0.7}, "b": {2.0: 0.2}}),
    }
    out = paired_bootstrap(models, "AMAT", "VAT", resamples=500)["pgd"]
    # per-case differences +0.2 (two slices) and -0.3 (one slice): resamples range from -0.3 to +0.2
    assert out["estimate"] == pytest.approx((0.2 * 2 - 0.3) / 3)
    assert out["low"] == pytest.approx(-0.3) and out["high"] == pytest.approx(0.2)


def test_models_on_different_cases_are_refused(tmp_path):
    a = _model(tmp_path / "a.csv", {"a": 0.7, "b": 0.7}, {"a": {2.0: 0.5}, "b": {2.0: 0.5}})
    b = read_case_scores(tmp_path / "a.csv", "dice", case_key="sample_id")
    with pytest.raises(ValueError, match="different cases"):
        paired_bootstrap({"x": a, "y": b}, "x", "y", resamples=2)
