"""The quality section's convergence check: remaining validation gain per epoch, from run logs."""

from __future__ import annotations

import json

import pytest

from benchmarks.convergence import remaining_gain, render_convergence, summarize_convergence, validation_history

SELECTION = {"a/accuracy": True, "b/rmse": False}


def write_log(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 1, "loss": 3.0}]  # a training entry: skipped
    for epoch, (acc, rmse) in enumerate(rows, 1):
        lines.append({"step": 10 * epoch, "split": "validation", "eval_loss": 1.0, "eval_a/accuracy": acc,
                      "eval_b/rmse": rmse, "eval_runtime": 0.1, "epoch": float(epoch)})
    lines.append({"split": "test", "eval_a/accuracy": 0.0, "eval_b/rmse": 9.0})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


def test_history_keeps_validation_entries_and_the_gain_is_delta_m_against_each_epoch(tmp_path):
    log = tmp_path / "train_log.jsonl"
    write_log(log, [(0.5, 2.0), (0.8, 1.0), (0.8, 1.0 / 1.01)])
    history = validation_history(log)
    assert [h["epoch"] for h in history] == [1.0, 2.0, 3.0]
    assert history[0] == {"epoch": 1.0, "a/accuracy": 0.5, "b/rmse": 2.0}
    gains = remaining_gain(history, SELECTION)
    final = history[-1]
    expected = [100 * ((final["a/accuracy"] - h["a/accuracy"]) / h["a/accuracy"]
                       - (final["b/rmse"] - h["b/rmse"]) / h["b/rmse"]) / 2 for h in history]
    assert gains == pytest.approx(expected)
    assert gains[-1] == 0.0 and gains[0] > gains[1] > 0


def test_summary_gets_per_strategy_gains_with_intervals_over_seeds(tmp_path):
    plateau = [(0.5, 2.0), (0.7, 1.5), (0.8, 1.0), (0.8, 1.0)]
    rising = [(0.2, 4.0), (0.3, 3.5), (0.4, 3.0), (0.6, 2.0)]
    for seed in (0, 1):
        write_log(tmp_path / "bench" / f"seed{seed}" / "flat" / "train_log.jsonl", plateau)
        write_log(tmp_path / "bench" / f"seed{seed}" / "slow" / "train_log.jsonl",
                  [(a + 0.01 * seed, r) for a, r in rising])
    runs = [{"seed": 0}, {"seed": 1}]
    summary = {"benchmark": "bench", "strategies": {"flat": {"runs": runs}, "slow": {"runs": runs},
                                                    "missing": {"runs": runs}}}
    summarize_convergence(summary, tmp_path, SELECTION)
    flat, slow = summary["strategies"]["flat"]["convergence"], summary["strategies"]["slow"]["convergence"]
    assert summary["strategies"]["missing"]["convergence"] is None
    assert flat["epochs"] == 4 and flat["seeds"] == [0, 1]
    assert flat["last_epoch_gain"]["mean"] == 0.0
    assert slow["last_epoch_gain"]["mean"] > 20 and slow["last_epoch_gain"]["half_width"] > 0
    assert slow["second_half_gain"]["mean"] > slow["last_epoch_gain"]["mean"]
    table = "\n".join(render_convergence(summary))
    assert table.index("`slow`") < table.index("`flat`")  # largest remaining gain first
    assert "after epoch 3" in table and "after epoch 2" in table
