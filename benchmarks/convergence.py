"""Has training levelled off? Per-epoch validation metrics of the quality runs, read from their logs.

Every quality run evaluates on the validation split after each epoch (``train_log.jsonl`` in its
folder under the work folder). For a run with E epochs, the *remaining gain* at epoch e is the
Delta_m (%) of the final epoch's validation metrics against epoch e's, over the benchmark's Delta_m
metrics: how much the run still improved after epoch e (0 at e = E; positive: still improving,
negative: it got worse). Per strategy the summary gets the curve (mean over seeds) and the gain of
the last epoch and of the second half of training with their 95% t intervals over seeds; a small
last-epoch gain next to the differences between methods says the training length suffices.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .stats import mean_ci


def validation_history(log: Path) -> list[dict[str, float]]:
    """The validation evaluations of one run's ``train_log.jsonl``, in order: ``{"epoch": e,
    "<task>/<metric>": value, ...}``."""
    rows = []
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("split") != "validation":
            continue
        row = {k.removeprefix("eval_"): float(v) for k, v in entry.items() if k.startswith("eval_") and "/" in k}
        rows.append({"epoch": float(entry.get("epoch", len(rows) + 1)), **row})
    return rows


def remaining_gain(history: list[dict[str, float]], higher_is_better: Mapping[str, bool]) -> list[float]:
    """Delta_m (%) of the last evaluation against each evaluation of ``history``."""
    from mtl_plugins.metrics import delta_m

    final = history[-1]
    return [delta_m(final, row, higher_is_better) for row in history]


def summarize_convergence(summary: dict[str, Any], work_dir: Path, higher_is_better: Mapping[str, bool]) -> None:
    """Add ``convergence`` to every strategy of a quality ``summary`` whose runs left validation logs
    under ``work_dir/<benchmark>/seed<s>/<strategy>/train_log.jsonl``."""
    from mtl_plugins.compare import run_folder

    for name, entry in summary["strategies"].items():
        curves = {}
        for run in entry["runs"]:
            log = work_dir / summary["benchmark"] / f"seed{run['seed']}" / run_folder(name) / "train_log.jsonl"
            history = validation_history(log) if log.exists() else []
            if len(history) >= 2:
                curves[run["seed"]] = remaining_gain(history, higher_is_better)
        lengths = {len(c) for c in curves.values()}
        if not curves or len(lengths) != 1:
            entry["convergence"] = None
            continue
        epochs = lengths.pop()
        last = [c[-2] for c in curves.values()]
        half = [c[epochs // 2 - 1] for c in curves.values()]
        entry["convergence"] = {
            "epochs": epochs, "seeds": sorted(curves),
            "curve": [statistics.fmean(c[e] for c in curves.values()) for e in range(epochs)],
            "last_epoch_gain": mean_ci(last), "second_half_gain": mean_ci(half)}


def render_convergence(summary: Mapping[str, Any]) -> list[str]:
    """The table of remaining gains (empty when no strategy has one)."""
    rows = [(name, e["convergence"]) for name, e in summary["strategies"].items() if e.get("convergence")]
    if not rows:
        return []

    def interval(ci: Mapping[str, float]) -> str:
        return f"{ci['mean']:+.2f} ± {ci['half_width']:.2f}"

    epochs = rows[0][1]["epochs"]
    lines = [f"Convergence on the validation split: the Delta_m (%) of each run's final validation metrics "
             f"against those after epoch {epochs - 1} (gain of the last epoch) and after epoch {epochs // 2} "
             "(gain of the second half), mean ± 95% CI over seeds (positive: still improving).", "",
             "| strategy | last-epoch gain | second-half gain |", "|---|---|---|"]
    lines += [f"| `{name}` | {interval(c['last_epoch_gain'])} | {interval(c['second_half_gain'])} |"
              for name, c in sorted(rows, key=lambda item: -item[1]["last_epoch_gain"]["mean"])]
    return [*lines, ""]


def plot_convergence(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Remaining gain per epoch (mean over seeds), one line per strategy."""
    from mtl_plugins.plots import _pyplot

    rows = [(name, e["convergence"]) for name, e in summary["strategies"].items() if e.get("convergence")]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in rows:
        highlighted = name in ("ew", "sel_update", "conn_strength")
        ax.plot(range(1, c["epochs"] + 1), c["curve"], marker="o", markersize=3, label=name,
                linewidth=2.0 if highlighted else 1.0)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1.0)  # early epochs gain tens of percent, the last ones a few
    ax.set_xlabel("epoch")
    ax.set_ylabel("Delta_m of the final epoch vs this epoch (%)")
    ax.set_title(f"{summary['benchmark']}: validation gain still to come, mean over seeds", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
