"""PNG plots written at the end of a run (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(records: Sequence[Mapping[str, float]], tasks: Sequence[str], path: str | Path,
                     evaluations: Sequence[Mapping[str, float]] = ()) -> Path:
    """Per-task training loss against step, one panel per task, and a last panel with the total
    training loss and the validation loss (``evaluations``: ``{"step", "eval_loss"}``) when there is one."""
    if not records:
        raise ValueError("no training logs to plot (max_steps < logging_steps?)")
    plt = _pyplot()
    panels = len(tasks) + (1 if evaluations else 0)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, task in zip(axes[0], tasks):
        ax.plot(steps, [r[f"loss/{task}"] for r in records], marker="." if len(steps) < 20 else None)
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss")
    if evaluations:
        ax = axes[0][-1]
        ax.plot(steps, [r["loss"] for r in records], label="train")
        ax.plot([e["step"] for e in evaluations], [e["eval_loss"] for e in evaluations], marker="o", label="validation")
        ax.set_title("total loss")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_heatmap(matrix, labels: Sequence[str], path: str | Path, title: str, xlabel: str = "", ylabel: str = "",
                 colorbar_label: str = "", note: str = "") -> Path:
    """An annotated square heatmap (e.g. an inter-task affinity matrix) with a labelled colour bar and
    an optional note under it."""
    import numpy as np

    plt = _pyplot()
    values = np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(labels), 0.8 + 0.8 * len(labels)))
    bound = float(np.abs(values).max()) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-bound, vmax=bound)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    if len(labels) <= 12:
        for (i, j), v in np.ndenumerate(values):
            ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=7)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=ax, label=colorbar_label or None)
    if note:
        fig.text(0.01, 0.01, note, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.08 if note else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_series(x: Sequence[float], series: Mapping[str, Sequence[float]], path: str | Path, title: str, ylabel: str,
                integer: bool = False) -> Path:
    """Line plot of one or more series against ``x`` (e.g. number of groups over steps); ``integer``:
    whole-number ticks on both axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    if integer:
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for label, values in series.items():
        ax.plot(x, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_priority(timeline: Sequence[Mapping], tasks: Sequence[str], path: str | Path) -> Path:
    """Task priority of ``conn_strength``: the overall share of channels each task has top priority on
    over training (left) and the per-layer shares at the last point (right).

    ``timeline`` holds points ``{"step", "overall": [K shares], "layers": {layer: [K shares]}}``.
    """
    plt = _pyplot()
    final = timeline[-1]["layers"]
    names = list(final)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.2 + 0.18 * len(names)))
    steps = [point["step"] for point in timeline]
    for k, task in enumerate(tasks):
        left.plot(steps, [point["overall"][k] for point in timeline], label=task, marker="." if len(steps) < 30 else None)
    left.set_xlabel("step")
    left.set_ylabel("share of channels (top-priority task)")
    left.set_title("task priority, all connected layers")
    switch = next((p["step"] for p in timeline if p.get("phase") == 2), None)
    if switch is not None:
        left.axvline(switch, color="grey", linestyle="--", linewidth=1, label=f"Phase 1 -> 2 (step {switch})")
    left.legend(fontsize=7)
    start = [0.0] * len(names)
    for k, task in enumerate(tasks):
        widths = [final[n][k] for n in names]
        right.barh(range(len(names)), widths, left=start, label=task)
        start = [s + w for s, w in zip(start, widths)]
    right.set_yticks(range(len(names)), names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("share of channels")
    right.legend(fontsize=7, loc="lower right")
    right.set_title(f"priority per layer at step {timeline[-1]['step']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
