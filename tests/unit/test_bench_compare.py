"""bench.compare's arithmetic that takes ddml's ratio to the in-process best apart (pure: no processes)."""

from __future__ import annotations

import math

import pytest

from bench.compare import Point, median_best, median_point, where_it_goes


def _ddml(req_per_s: float, split: dict[str, float]) -> Point:
    return Point("ddml", 64, req_per_s, 180.0, 300.0, 0, sum(split.values()), 15.0, dict(split))


def test_where_it_goes_factors_multiply_to_the_ratio():
    # ddml: 334 req/s on 1.83 cores; the best: 392 inputs/s on 2.0 cores (5.10 ms an input).
    ddml = _ddml(334.0, {"gateway": 0.08, "broker": 0.04, "worker": 1.71})
    best = {"items_per_s": 392.0, "cpu_cores": 2.0, "cpu_ms_per_input": 2.0 * 1000 / 392.0}
    line = where_it_goes(ddml, best)
    cores_factor = float(line.split("(×")[1].split(")")[0])
    cpu_factor = float(line.split("(×")[2].split(";")[0])
    assert cores_factor == pytest.approx(1.83 / 2.0, abs=0.006)  # printed to 2 decimals
    assert cores_factor * cpu_factor == pytest.approx(334.0 / 392.0, abs=0.01)
    assert "gateway 0.24" in line and "broker 0.12" in line and "worker 5.12" in line
    assert "the worker +0.02 ms beyond it" in line


def test_where_it_goes_says_nothing_without_figures():
    ddml = _ddml(334.0, {"gateway": 0.08, "broker": 0.04, "worker": 1.71})
    assert where_it_goes(ddml, {"items_per_s": 392.0}) == ""  # a best measured before it reported its CPU
    assert where_it_goes(_ddml(334.0, {}), {"cpu_cores": 2.0, "cpu_ms_per_input": 5.1}) == ""


def test_medians_keep_the_split_and_the_best_cpu():
    points = [_ddml(300.0, {"gateway": 0.1, "worker": 1.7}), _ddml(340.0, {"gateway": 0.3, "worker": 1.5}),
              _ddml(320.0, {"gateway": 0.2, "worker": 1.6})]
    merged = median_point(points)
    assert merged.cpu_split == pytest.approx({"gateway": 0.2, "worker": 1.6})
    runs = [{"lanes": 2, "closed": {64: {"items_per_s": r, "p50_ms": 1.0, "p99_ms": 2.0, "cpu_cores": c,
                                         "cpu_ms_per_input": c * 1000 / r}}}
            for r, c in ((380.0, 1.9), (400.0, 2.0), (390.0, 1.95))]
    best = median_best(runs)["closed"][64]
    assert best["cpu_cores"] == pytest.approx(1.95)
    assert best["cpu_ms_per_input"] == pytest.approx(1.95 * 1000 / 390.0, rel=0.02)
    old = median_best([{"lanes": 2, "closed": {64: {"items_per_s": 1.0, "p50_ms": 1.0, "p99_ms": 1.0}}}])
    assert math.isnan(old["closed"][64]["cpu_cores"])


def test_only_ddml_is_split_by_process():
    from bench.compare import Running, split_meter

    assert split_meter(Running("naive-1", "http://127.0.0.1:1", "/predict"))() == {}
