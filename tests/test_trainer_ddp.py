"""Two-process DDP on CPU (gloo, torchrun): ranks stay identical, and strategies whose update is
exact under data parallelism equal a single-process run on the concatenated batch; ``mtl-train``
runs a recipe on two processes with one set of outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_worker import EVAL_SIZE, same, train_one, vector_data, vector_model

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("ddp_worker.py")
#: Exact under data parallelism with the MLP (no BatchNorm): equal to one process on both batches.
#: The gradient aggregators (one forward, K retained backwards; pcgrad also as one batched backward)
#: aggregate the process-averaged Jacobian, which is the Jacobian of the whole batch.
#: With rep_grad the weights come from the representation gradients of the whole batch.
AGGREGATORS = ["pcgrad", "mgda", "imtl", "upgrad", "aligned_mtl", "gradvac", "graddrop", "cagrad", "nash_mtl",
               "gradnorm", "pcgrad_batched", "mgda_rep_grad", "graddrop_rep_grad"]
EXACT = ["ew", "two_step", "measure_last", "per_task", "sel_update", *AGGREGATORS,
         "sel_update+uw", "pcgrad+dwa"]  # composed with a loss weighting
#: Need BatchNorm connections (batch statistics differ per process): ranks identical only.
RANKS_ONLY = ["conn_strength", "conn_strength_phase2", "conn_strength+uw", "conn_strength+famo"]
NAMES = EXACT + RANKS_ONLY
STEPS, BATCH = 4, 4


def torchrun(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(WORKER.parent)}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    torchrun(str(WORKER), str(out), *NAMES, cwd=out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("name", NAMES)
def test_ranks_hold_identical_parameters_and_strategy_state(ranks, name):
    rank0, rank1 = ranks[0][name], ranks[1][name]
    assert same(rank0["model"], rank1["model"])
    assert same(rank0["strategy"], rank1["strategy"])
    assert rank0["strategy"]["num_steps"] == STEPS
    logged = [entry for entry in rank0["log"] if "loss" in entry]
    assert logged and logged == [entry for entry in rank1["log"] if "loss" in entry]


@pytest.mark.parametrize("name", [n for n in NAMES if n in EXACT])
def test_equals_one_process_on_the_concatenated_batch(ranks, name, tmp_path):
    single = train_one(name, str(tmp_path), batch_size=2 * BATCH, steps=STEPS)
    torch.testing.assert_close(single.model.state_dict(), ranks[0][name]["model"], rtol=1e-5, atol=1e-6)
    # logged losses are the mean over processes (not their sum): the loss of the whole batch
    keys = ["loss", *(f"loss/{t}" for t in single.tasks)]
    logged = [e[k] for e in ranks[0][name]["log"] if "loss" in e for k in keys]
    expected = [e[k] for e in single.state.log_history if "loss" in e for k in keys]
    assert logged == pytest.approx(expected, rel=1e-5)
    if name == "sel_update":
        torch.testing.assert_close(single.strategy.affinity, ranks[0][name]["strategy"]["affinity"], rtol=1e-4, atol=1e-9)
        assert single.strategy.groups == ranks[0][name]["strategy"]["groups"]


def test_conn_strength_ran_both_phases(ranks):
    assert ranks[0]["conn_strength_phase2"]["strategy"]["phase_counts"] == [0, STEPS]
    assert ranks[0]["conn_strength"]["strategy"]["phase_counts"][0] == STEPS  # epoch 0: Phase 1 only


@pytest.mark.parametrize("name", ["sel_update+uw", "pcgrad+dwa", "conn_strength+uw", "conn_strength+famo"])
def test_composed_loss_scaling_state_moved_identically_on_both_ranks(ranks, name):
    states = [rank[name]["strategy"]["loss_scaling"] for rank in ranks]
    assert same(states[0], states[1])
    weighting = states[0]["state"]
    if name.endswith("+dwa"):  # DWA moves its weights off 1 once two epochs have closed
        assert len(weighting["epoch_averages"]) >= 2
    else:  # UW's log-variances and FAMO's logits start at 0: trained by the composed update
        learned = weighting["log_var_state" if name.endswith("+uw") else "logits_state"]["value"]
        assert learned.abs().min() > 0


def test_evaluation_on_two_processes_equals_numpy_on_the_whole_set(ranks):
    model = vector_model()
    model.load_state_dict(ranks[0]["ew"]["model"])
    rows = vector_data(EVAL_SIZE, seed=1)[:]
    with torch.no_grad():
        out = model.eval()(features=rows["features"])["logits"]
    # float64 NumPy from the model's outputs on all 13 examples, each counted once
    accuracy = np.mean(np.argmax(out["a"].double().numpy(), axis=1) == rows["a"].numpy())
    mae = np.mean(np.abs(out["b"].double().numpy().reshape(-1) - rows["b"].double().numpy()))
    for rank in ranks:
        evaluation = rank["ew"]["evaluation"]
        assert evaluation["trainer"]["eval_a/accuracy"] == pytest.approx(accuracy, rel=1e-12)
        assert evaluation["trainer"]["eval_b/mae"] == pytest.approx(mae, rel=1e-6)
        assert evaluation["sharded"] == pytest.approx({"a/accuracy": accuracy, "b/mae": mae}, rel=1e-6)


def test_mtl_train_on_two_processes_writes_one_set_of_outputs(tmp_path):
    out = tmp_path / "run"
    result = torchrun("-m", "mtl_plugins.cli", "quickstart", "strategy={name: ew}", "data.train_size=128",
                      "data.eval_size=64", "training.per_device_train_batch_size=32", "training.logging_steps=1",
                      "--baselines", "skip", "--output-dir", str(out), "--no-progress", cwd=tmp_path)
    assert result.stdout.count("outputs written to") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4  # 128 examples / (2 processes x 32) x 2 epochs
    assert results["environment"]["world_size"] == 2 and results["environment"]["global_train_batch_size"] == 64
    assert "ran as 2 processes on cpu" in result.stdout
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("split") != "validation"]  # the training logs
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"model.safetensors", "loss_curves.png", "config.yaml"} <= {p.name for p in out.iterdir()}


#: Ragged shards (ranks count epochs differently) and per-rank BatchNorm statistics.
LAYOUT_NAMES = ["dwa_epochs@ragged", "two_step@ragged", "sel_update@ragged", "conn_strength_phase2@no_buffers",
                "conn_strength@no_buffers", "conn_strength+uw@no_buffers"]


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_layouts")
    torchrun(str(WORKER), str(out), *LAYOUT_NAMES, cwd=out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_ranks_agree_with_ragged_shards_or_own_batchnorm_statistics(layouts, name):
    rank0, rank1 = layouts[0][name], layouts[1][name]
    own_statistics = name.endswith("@no_buffers")
    # parameters always agree; buffers (BatchNorm statistics) are each rank's own without broadcasting
    params = {k for k in rank0["model"] if not (own_statistics and ("running_" in k or "num_batches" in k))}
    assert same({k: rank0["model"][k] for k in params}, {k: rank1["model"][k] for k in params})
    # the priority timeline (for logs) reads each rank's own statistics; the rest of the state agrees
    state0, state1 = ({k: v for k, v in s["strategy"].items() if not (own_statistics and k == "timeline")}
                      for s in (rank0, rank1))
    assert same(state0, state1)
    if name.startswith("dwa"):
        assert len(state0["epoch_averages"]) == 2  # two epochs closed: the weights moved off 1
    if not own_statistics:  # (those logs hold each rank's own priority shares)
        logs = [[{k: v for k, v in e.items() if k != "epoch"} for e in r["log"] if "loss" in e] for r in (rank0, rank1)]
        assert logs[0] and logs[0] == logs[1]
