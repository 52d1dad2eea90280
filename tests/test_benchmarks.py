"""The benchmark runner: its quick mode writes a complete, sane report; its measurements are sound."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("benchmarks") is None:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))

import mtl_plugins
from benchmarks import cost, measure, scaling, side_by_side
from benchmarks.run import main
from mtl_plugins.grouping import choose_groups
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies.task_gradients import split_model_parameters

SECTIONS = ("## Machine and versions", "## Headline numbers", "## Cost per batch against the floor",
            "## Side by side with LibMTL's gradient weightings", "## Scaling with the number of tasks",
            "## Quality against single-task models", "## Reproducing")


def finite_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


@pytest.mark.parametrize("num_tasks", [6, 8, 10, 20])
def test_planted_clusters_are_recovered(num_tasks):
    rng = np.random.default_rng(num_tasks)
    tasks = [str(k) for k in range(num_tasks)]
    for trial in range(5):
        labels = scaling.planted_labels(num_tasks, rng)
        affinity = scaling.planted_affinity(labels, rng, noise=0.1)
        groups = choose_groups(affinity, tasks, [[t] for t in tasks], random_state=trial).groups
        assert len(groups) == scaling.planted_clusters(num_tasks)
        assert scaling.adjusted_rand(groups, labels) == 1.0


def test_adjusted_rand_detects_a_wrong_grouping():
    labels = np.array([0, 0, 1, 1])
    assert scaling.adjusted_rand([["0", "1"], ["2", "3"]], labels) == 1.0
    assert scaling.adjusted_rand([["0", "2"], ["1", "3"]], labels) < 0.5


def test_cost_cases_pick_their_floor():
    setup = cost.multidigits_setup(batch_size=8, num_batches=2)
    rows = {}
    for name in ("uw", "pcgrad", "sel_update"):
        for case in cost.cases_for(name, grouped_after=2):
            rows[case.label] = cost.measure_case(case, setup, repeats=2, device=torch.device("cpu"), memory=False)
    assert rows["uw"]["floor"] == cost.FLOORS["ew_step"]
    assert rows["pcgrad"]["floor"] == cost.FLOORS["retained"]  # one forward shared by the tasks
    assert rows["sel_update (warm-up)"]["group_steps"] == len(setup.tasks)
    assert 2 <= rows["sel_update (grouped)"]["group_steps"] <= len(setup.tasks)
    for row in rows.values():
        for key in ("ms", "floor_ms", "ew_ms", "ratio", "cpu_ratio", "ratio_ew"):
            assert finite_positive(row[key]), (row["label"], key, row[key])


def test_paired_ratio_interval_is_the_median_interval_of_the_per_cycle_ratios():
    floor = [10.0 + (i % 4) for i in range(15)]  # the machine's load moves both runs of a cycle
    ours = [f * (1.0 + 0.01 * i) for i, f in enumerate(floor)]  # per-cycle ratios 1.00 ... 1.14
    low, high = measure.paired_ratio_interval(ours, floor)
    assert (low, high) == pytest.approx((1.03, 1.11))  # the 4th and 12th of 15 ratios
    assert all(math.isnan(b) for b in measure.paired_ratio_interval(ours[:5], floor[:5]))


@pytest.mark.parametrize("name", ["mgda", "cagrad", "imtl"])
def test_libmtl_style_step_takes_the_libraries_step(name):
    """The LibMTL-style reference does the same update as the library's step (only the work differs)."""
    setup = cost.multidigits_setup(batch_size=8, num_batches=1)
    models = [copy.deepcopy(setup.model).double().train() for _ in range(2)]
    batch = {k: v.double() if v.is_floating_point() else v for k, v in setup.batches[0].items()}
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    strategies = [mtl_plugins.build_strategy(name, setup.tasks, model=m) for m in models]
    strategies[0].step(make_closure(models[0], batch), optimizers[0])
    shared, _ = split_model_parameters(models[1], name)
    side_by_side.libmtl_style_step(make_closure(models[1], batch), optimizers[1], strategies[1], setup.tasks, shared)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert any(not torch.equal(p, q) for p, q in zip(models[0].parameters(), setup.model.double().parameters()))


FREED_MIB = """
import sys, torch
sys.path.insert(0, {root!r})
from benchmarks import allocator
kept = allocator.keep_heap() is not None if sys.argv[1] == "steady" else None
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
block = torch.ones(50 << 20)  # 200 MiB
before = rss()
del block
print(kept, before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/statm")
def test_the_steady_allocator_keeps_freed_blocks_in_the_heap():
    """With glibc's defaults a freed 200 MiB tensor goes back to the operating system (and would be
    faulted back in by the next run); with the steady allocator the heap keeps it."""
    import subprocess

    def freed(mode):
        out = subprocess.run([sys.executable, "-c", FREED_MIB.format(root=str(ROOT)), mode],
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0], int(out[1])

    assert freed("default")[1] >= 190
    assert freed("steady") == ("True", 0)


@pytest.mark.slow
def test_quick_run_writes_a_sane_report(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    out, work = tmp_path / "report", tmp_path / "work"
    # the default allocator: the test process's heap is left as it is (the steady one: below)
    assert main(["--quick", "--out", str(out), "--work-dir", str(work), "--allocator", "default"]) == 0

    text = (out / "README.md").read_text()
    positions = [text.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)
    assert "python -m benchmarks.run --quick" in text
    results = json.loads((out / "results.json").read_text())
    for key in ("cpu", "cores", "python", "torch", "transformers", "mtl-plugins"):
        assert results["environment"][key]
    assert results["environment"]["C allocator"] == "default" and "| C allocator | `default` |" in text
    assert all(s["command"].startswith("python -m benchmarks.run") for s in results["sections"].values())
    plots = sorted(p.name for p in out.glob("*.png"))
    assert plots == ["cost_cnn.png", "quality_composition.png", "quality_composition_affinity.png",
                     "quality_multidigits.png", "quality_multidigits_affinity.png", "quality_rooms.png",
                     "quality_rooms_affinity.png", "scaling.png"]
    assert "| `uw` | " in text and "`sel_update+uw`" in text  # the composition grid's table
    assert all(f"]({name})" in text for name in plots)

    rows = results["sections"]["cost"]["models"]["cnn"]["rows"]
    labels = {r["label"] for r in rows}
    assert {"ew", "uw", "pcgrad", "sel_update (warm-up)", "sel_update (grouped)", "conn_strength (Phase 2)"} <= labels
    for row in rows:
        for key in ("ratio", "cpu_ratio", "ratio_ew", "peak_mib", "ew_peak_mib"):
            assert finite_positive(row[key]), (row["label"], key, row[key])

    for row in results["sections"]["scaling"]["rows"]:
        k = row["tasks"]
        assert 1 <= row["min_groups"] <= row["groups_found"] <= row["max_groups"] <= k
        assert finite_positive(row["clustering_ms"]) and finite_positive(row["bookkeeping_x_ew"])
        for name in ("pcgrad", "mgda"):  # the quick run's aggregators, both with a torchjd counterpart
            assert finite_positive(row[f"aggregate/{name}_ms"]) and finite_positive(row[f"torchjd/{name}_ms"])
    assert "Against torchjd's aggregator" in text and "| mgda x torchjd | pcgrad ms |" in text
    assert all(r["exact"] == 1.0 for r in results["sections"]["scaling"]["rows"])  # small K, clear clusters

    summaries = {s["benchmark"]: s for s in results["sections"]["quality"]["summaries"]}
    assert set(summaries) == {"multidigits", "rooms", "composition"}
    assert set(summaries["composition"]["strategies"]) == {"ew", "pcgrad", "sel_update", "uw", "pcgrad+uw",
                                                           "sel_update+uw"}
    rooms = summaries["rooms"]
    assert set(rooms["strategies"]["ew"]["runs"][0]["metrics"]) >= {"depth/rmse", "semseg/miou", "normals/mean_angle",
                                                                    "saliency/miou"}
    assert all(math.isfinite(e["delta_m"][0]) for e in rooms["strategies"].values())
    summary = summaries["multidigits"]
    for entry in (e for s in summaries.values() for n, e in s["strategies"].items() if n != "ew"):
        assert math.isfinite(entry["vs_ew"]["mean"]) and entry["vs_ew"]["seeds"] == [0, 1]
    assert {(r["method"], r["against"]) for r in summary["verdicts"]} == {("sel_update", "ew"), ("conn_strength", "ew")}
    assert "paired Delta_m difference" in text and "95% confidence interval" in text
    tasks = [m.split("/")[0] for m in summary["single_task"]]
    assert set(summary["strategies"]) == {"ew", "sel_update", "conn_strength"}
    for entry in summary["strategies"].values():
        assert entry["seeds"] == 2 and math.isfinite(entry["delta_m"][0]) and entry["delta_m"][1] >= 0
    for run in summary["strategies"]["sel_update"]["runs"]:
        groups = run["extras"]["groups"]
        assert sorted(t for g in groups for t in g) == sorted(tasks) and 1 <= len(groups) <= len(tasks)
    for run in summary["strategies"]["conn_strength"]["runs"]:
        assert sum(run["extras"]["priority"]) == pytest.approx(1.0)
    assert "`sel_update`'s groups" in text and "`conn_strength`'s task priority" in text

    # one section again: the others keep their numbers
    cost_date = results["sections"]["cost"]["date"]
    assert main(["--quick", "--sections", "scaling", "--out", str(out), "--work-dir", str(work)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["sections"]["cost"]["date"] == cost_date and again["sections"]["quality"]
    assert all(heading in (out / "README.md").read_text() for heading in SECTIONS)

    # one quality benchmark again: the other benchmarks keep their numbers
    rooms_before = summaries["rooms"]
    assert main(["--quick", "--sections", "quality", "--benchmarks", "multidigits", "--only", "ew",
                 "--out", str(out), "--work-dir", str(work)]) == 0
    quality = {s["benchmark"]: s for s in json.loads((out / "results.json").read_text())["sections"]["quality"]["summaries"]}
    assert set(quality) == {"multidigits", "rooms", "composition"}
    assert set(quality["multidigits"]["strategies"]) == {"ew"} and quality["rooms"] == rooms_before
