"""The loss scaling x update method grid of the quality section: its strategies, their recipes, its table."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("benchmarks") is None:  # plain `pytest` does not put the repository root on sys.path
    sys.path.insert(0, str(ROOT))

composition = importlib.import_module("benchmarks.composition")
quality = importlib.import_module("benchmarks.quality")


def test_grid_cells_are_the_weighting_alone_the_bare_method_or_the_composed_strategy():
    cells = composition.grid_strategies()
    assert len(cells) == 18 and len(set(cells)) == 18
    assert cells[:6] == ("ew", "pcgrad", "cagrad", "aligned_mtl", "conn_strength", "sel_update")
    assert cells[6:12] == ("uw", "pcgrad+uw", "cagrad+uw", "aligned_mtl+uw", "conn_strength+uw", "sel_update+uw")
    bench = composition.composition_benchmark(quality.Benchmark("multidigits", "quickstart",
                                                                options={"sel_update": {"warmup_steps": 1}}))
    assert bench.name == "composition" and bench.recipe == "quickstart" and bench.strategies == cells
    assert bench.options == {"sel_update": {"warmup_steps": 1}, "sel_update+uw": {"warmup_steps": 1},
                             "sel_update+dwa": {"warmup_steps": 1}}


def test_composed_cells_train_the_method_with_the_loss_scaling():
    base = quality.Benchmark("multidigits", "quickstart").load()
    recipe = quality.strategy_recipe(base, "conn_strength+uw", 3, {"schedule": "phase2"})
    assert recipe["strategy"] == {"name": "conn_strength", "options": {"schedule": "phase2", "loss_scaling": "uw"}}
    assert recipe["model"]["architecture"] == "task_connections" and recipe["training"]["seed"] == 3
    own = quality.strategy_recipe(base, "sel_update+dwa", 0, None)  # the recipe runs sel_update: its options stay
    assert own["strategy"]["options"] == {**base["strategy"]["options"], "loss_scaling": "dwa"}
    jobs = quality.plan_jobs([quality.Benchmark("multidigits", "quickstart", strategies=("uw", "pcgrad+uw"))], [0],
                             Path("unused"), "skip")
    assert {j.strategy: j.args[1]["strategy"]["name"] for j in jobs} == {"uw": "uw", "pcgrad+uw": "pcgrad"}
    assert {j.strategy: j.weight for j in jobs} == {"uw": 1.0, "pcgrad+uw": 5.0}  # pcgrad: one pass per task


def test_a_label_at_an_architecture_trains_on_that_architecture_in_its_own_folder(tmp_path):
    from mtl_plugins.compare import run_folder

    base = quality.Benchmark("multidigits", "quickstart").load()
    control = quality.strategy_recipe(base, "ew@task_connections", 2, None)
    assert control["strategy"] == {"name": "ew", "options": {}} and control["model"]["architecture"] == "task_connections"
    composed = quality.strategy_recipe(base, "pcgrad+uw@task_connections", 0, None)
    assert composed["strategy"] == {"name": "pcgrad", "options": {"loss_scaling": "uw"}}
    assert composed["model"]["architecture"] == "task_connections"
    plain = quality.strategy_recipe(base, "ew", 2, None)
    assert plain["model"].get("architecture", "hps") == "hps"
    # the finished run is found where compare.run_all writes it (a folder name without '@')
    folder = tmp_path / "rooms" / "seed2" / run_folder("ew@task_connections")
    assert folder.name == "ew_task_connections"
    folder.mkdir(parents=True)
    import yaml
    (folder / "config.yaml").write_text(yaml.safe_dump(control))
    for name in ("results.json", "strategy_state.pt"):
        (folder / name).write_text("{}")
    assert quality.finished_run(tmp_path, "ew@task_connections", control, 2) == folder
    assert quality.finished_run(tmp_path, "ew@task_connections", plain, 2) is None


def entry(mean: float, spread: float) -> dict:
    return {"delta_m": (mean, spread), "metrics": {}, "runs": []}


def test_grid_table_lays_out_each_cells_delta_m():
    summary = {"seeds": [0, 1], "strategies": {
        "ew": entry(1.0, 0.5), "pcgrad": entry(2.0, 0.25), "uw": entry(-1.5, 1.0),
        "pcgrad+uw": {**entry(3.0, 0.5), "vs_ew": {"mean": 2.0, "half_width": 0.75}}}}
    lines = composition.render_grid(summary)
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| loss scaling | `sum` | `pcgrad` |"
    assert table[1] == "| `ew` | +1.00 ± 0.50 | +2.00 ± 0.25 |"
    assert table[2] == "| `uw` | -1.50 ± 1.00 | +3.00 ± 0.50 (+2.00 ± 0.75 vs ew) |"
    assert "2 seeds" in lines[0]
    assert composition.render_grid({"seeds": [0], "strategies": {"ew": entry(0.0, 0.0)}}) == []
