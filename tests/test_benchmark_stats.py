"""Benchmark statistics: t intervals of means and of paired per-seed differences, the summary built on
them, and distribution-free intervals of a median."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("benchmarks") is None:
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import Benchmark, Job, summarize  # noqa: E402 - after the sys.path set-up
from benchmarks.stats import mean_ci, median_ci, paired_difference, verdict  # noqa: E402


@pytest.mark.parametrize("values", [[1.0, 2.0], [3.1, -0.4, 2.2, 5.0, 1.7], list(np.linspace(-2, 7, 11))])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_mean_ci_is_the_t_interval(values, confidence):
    ci = mean_ci(values, confidence)
    low, high = scipy.stats.t.interval(confidence, len(values) - 1, loc=np.mean(values), scale=scipy.stats.sem(values))
    assert ci["mean"] == pytest.approx(np.mean(values))
    assert (ci["low"], ci["high"]) == pytest.approx((low, high))
    assert ci["half_width"] == pytest.approx((high - low) / 2) and ci["n"] == len(values)


@pytest.mark.parametrize("n", [6, 7, 10, 15, 16, 30, 61])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_median_interval_is_the_widest_binomial_order_statistic_pair(n, confidence):
    values = list(np.random.default_rng(n).normal(size=n))
    ordered = sorted(values)
    ci = median_ci(values, confidence)
    tail = (1 - confidence) / 2
    j = max((j for j in range(1, n // 2 + 1) if scipy.stats.binom.cdf(j - 1, n, 0.5) <= tail), default=0)
    if j == 0:
        assert math.isnan(ci["low"]) and math.isnan(ci["coverage"])
        return
    assert (ci["low"], ci["high"]) == (ordered[j - 1], ordered[n - j])
    assert ci["coverage"] == pytest.approx(1 - 2 * scipy.stats.binom.cdf(j - 1, n, 0.5)) and ci["coverage"] >= confidence
    assert ci["median"] == pytest.approx(np.median(values))


def test_median_interval_of_fifteen_cycles_by_hand():
    # P(B(15, 1/2) <= 3) = 576 / 32768 = 0.0176 <= 0.025 < P(B <= 4) = 0.0592: the 4th and 12th values
    ci = median_ci(range(15, 0, -1))
    assert (ci["low"], ci["high"]) == (4.0, 12.0) and ci["coverage"] == pytest.approx(1 - 2 * 576 / 32768)
    assert math.isnan(median_ci([1.0, 2.0, 3.0, 4.0, 5.0])["low"])  # 2 / 32 > 0.025: no 95% interval
    with pytest.raises(ValueError, match="at least one value"):
        median_ci([])


def test_t_interval_of_five_seeds_by_hand():
    # t_{0.975, 4} = 2.7764451...; s of [1, 2, 3, 4, 5] = sqrt(2.5)
    ci = mean_ci([1, 2, 3, 4, 5])
    assert ci["half_width"] == pytest.approx(2.7764451052 * math.sqrt(2.5) / math.sqrt(5), rel=1e-9)
    assert math.isnan(mean_ci([4.0])["half_width"])
    with pytest.raises(ValueError, match="at least one value"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence must be in"):
        mean_ci([1, 2], 1.5)


def test_paired_difference_uses_the_shared_seeds_only():
    method = {0: 5.0, 1: 6.0, 2: 4.0, 3: 9.0}
    ew = {0: 4.0, 1: 4.5, 2: 3.5, 4: 0.0}
    d = paired_difference(method, ew)
    assert d["seeds"] == [0, 1, 2]
    diffs = [1.0, 1.5, 0.5]
    low, high = scipy.stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=scipy.stats.sem(diffs))
    assert (d["mean"], d["low"], d["high"]) == pytest.approx((1.0, low, high))
    assert verdict(d) == "no clear difference"  # 1.0 ± 4.30 * 0.289: the interval reaches -0.24
    assert verdict(paired_difference({0: 2.0, 1: 2.1, 2: 1.9}, {0: 0.0, 1: 0.0, 2: 0.0})) == "better"
    assert paired_difference({0: 1.0}, {0: 0.0}) is None and verdict(None) == "not enough seeds"
    assert verdict({"low": -1.0, "high": -0.1, "half_width": 0.45}) == "worse"
    assert verdict({"low": -1.0, "high": 0.1, "half_width": 0.55}) == "no clear difference"


def test_summary_pairs_every_strategy_with_ew_by_seed():
    bench = Benchmark("toy", "quickstart", strategies=("ew", "sel_update", "pcgrad", "cagrad"))
    seeds = [0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    accuracy = {name: 0.8 + 0.02 * rng.standard_normal(5) + shift
                for name, shift in (("ew", 0.0), ("sel_update", 0.05), ("pcgrad", 0.0), ("cagrad", -0.02))}
    outcomes = []
    for i, seed in enumerate(seeds):
        outcomes.append((Job("baseline", "toy", seed, "single-task", 1.0, ()),
                         {"metrics": {"a/accuracy": 0.8}, "higher_is_better": {"a/accuracy": True}, "seconds": 1.0}))
        for name, values in accuracy.items():
            row = {"a/accuracy": float(values[i]), "ms_per_batch": 1.0}
            outcomes.append((Job("strategy", "toy", seed, name, 1.0, ()), {"row": row, "extras": {}, "seconds": 1.0}))
    summary = summarize(bench, outcomes, seeds)
    delta = {name: 100 * (values - 0.8) / 0.8 for name, values in accuracy.items()}
    for name in accuracy:
        entry = summary["strategies"][name]
        low, high = scipy.stats.t.interval(0.95, 4, loc=delta[name].mean(), scale=scipy.stats.sem(delta[name]))
        assert entry["delta_m"] == pytest.approx((delta[name].mean(), (high - low) / 2))
        if name == "ew":
            assert entry["vs_ew"] is None
            continue
        diffs = delta[name] - delta["ew"]
        low, high = scipy.stats.t.interval(0.95, 4, loc=diffs.mean(), scale=scipy.stats.sem(diffs))
        assert (entry["vs_ew"]["low"], entry["vs_ew"]["high"]) == pytest.approx((low, high))
    rows = {(r["method"], r["against"]): r for r in summary["verdicts"]}
    best_gradient = max(("pcgrad", "cagrad"), key=lambda n: delta[n].mean())
    assert set(rows) == {("sel_update", "ew"), ("sel_update", best_gradient)}
    diffs = delta["sel_update"] - delta[best_gradient]
    assert rows[("sel_update", best_gradient)]["difference"]["mean"] == pytest.approx(diffs.mean())


def test_conn_strength_is_also_compared_with_ew_on_its_own_architecture():
    """``ew@task_connections`` (ew on conn_strength's architecture) is the control that separates the
    update rule from the per-task BatchNorms: conn_strength is paired with it, sel_update is not."""
    control = "ew@task_connections"
    bench = Benchmark("toy", "quickstart", strategies=("ew", "sel_update", "conn_strength", control))
    seeds = [0, 1, 2]
    accuracy = {"ew": [0.80, 0.81, 0.79], "sel_update": [0.82, 0.83, 0.80], "conn_strength": [0.85, 0.84, 0.86],
                control: [0.83, 0.83, 0.82]}
    outcomes = []
    for i, seed in enumerate(seeds):
        outcomes.append((Job("baseline", "toy", seed, "single-task", 1.0, ()),
                         {"metrics": {"a/accuracy": 0.8}, "higher_is_better": {"a/accuracy": True}, "seconds": 1.0}))
        for name, values in accuracy.items():
            row = {"a/accuracy": values[i], "ms_per_batch": 1.0}
            outcomes.append((Job("strategy", "toy", seed, name, 1.0, ()), {"row": row, "extras": {}, "seconds": 1.0}))
    summary = summarize(bench, outcomes, seeds)
    rows = {(r["method"], r["against"]): r for r in summary["verdicts"]}
    assert set(rows) == {("sel_update", "ew"), ("conn_strength", "ew"), ("conn_strength", control)}
    diffs = [100 * (a - b) / 0.8 for a, b in zip(accuracy["conn_strength"], accuracy[control])]
    assert rows[("conn_strength", control)]["difference"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert control not in {r["against"] for r in summary["verdicts"] if r["method"] == "sel_update"}
