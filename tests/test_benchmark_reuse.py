"""``--reuse-runs``: a quality job whose exact recipe already finished under the work folder is read
from that run, not trained again; anything different is trained."""

from __future__ import annotations

import json

import torch
import yaml

from benchmarks import quality
from benchmarks.run import multidigits_benchmark


def finish(folder, recipe, metrics):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**recipe, "output_dir": str(folder)}))
    (folder / "results.json").write_text(json.dumps({"test_metrics": metrics, "train_seconds": 2.0, "steps": 4}))
    torch.save({"num_steps": 4}, folder / "strategy_state.pt")


def test_identical_finished_runs_are_read_and_others_are_not(tmp_path):
    base = multidigits_benchmark(()).load()
    recipe = quality.strategy_recipe(base, "pcgrad", 3, None)
    finish(tmp_path / "multidigits" / "seed3" / "pcgrad", recipe, {"left/accuracy": 0.9})
    other = quality.strategy_recipe(base, "pcgrad", 3, {"reduction": "mean"})
    incomplete = quality.strategy_recipe(base, "ew", 3, None)
    finish(tmp_path / "multidigits" / "seed3" / "ew", incomplete, {"left/accuracy": 0.5})
    (tmp_path / "multidigits" / "seed3" / "ew" / ".incomplete").touch()

    assert quality.finished_run(tmp_path, "pcgrad", recipe, 3) == tmp_path / "multidigits" / "seed3" / "pcgrad"
    assert quality.finished_run(tmp_path, "pcgrad", quality.strategy_recipe(base, "pcgrad", 4, None), 4) is None
    assert quality.finished_run(tmp_path, "pcgrad", other, 3) is None
    assert quality.finished_run(tmp_path, "ew", incomplete, 3) is None

    folder = str(tmp_path / "composition" / "seed3")
    job = quality.Job("strategy", "composition", 3, "pcgrad", 1.0, ("pcgrad", recipe, folder))
    logged = []
    [(same_job, out)] = quality.run_jobs([job], workers=1, threads=1, log=logged.append, reuse_from=tmp_path)
    assert same_job is job and out["seconds"] == 0.0 and out["reused"].endswith("multidigits/seed3/pcgrad")
    assert out["row"]["left/accuracy"] == 0.9 and out["row"]["ms_per_batch"] == 500.0
    assert any("reused from" in line for line in logged)
