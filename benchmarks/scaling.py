"""Grouping and bookkeeping cost as the number of tasks K grows, on synthetic inputs.

For each K, with ``c = max(2, round(K / 4))`` planted clusters (at most K):

* **sel_update grouping**: a K x K affinity matrix with planted clusters (scaled affinity about
  +0.6 within a cluster, -0.3 across, Gaussian noise of standard deviation 0.15, random positive
  self-affinities) is clustered by ``mtl_plugins.grouping.choose_groups``; the groups found are
  compared with the planted ones (number of groups, adjusted Rand index ARI);
* **sel_update affinity update**: the EMA updates of one batch, one ``update_affinity`` per group
  step over the planted groups (synthetic losses); with the clustering, the bookkeeping
  ``sel_update`` adds to each batch;
* **conn_strength projection**: Phase 2's combination (``combine_flat``) of K gradients of one
  64-channel 3x3 convolution (64 x 576 each) with random top-priority tasks;
* **gradient aggregators**: each aggregator's ``aggregate`` of a random K x n Jacobian
  (n = 100,000), the work it adds to the K backward passes; where torchjd's aggregator for the
  same method runs without extra solvers (PCGrad, GradVac, MGDA: :func:`torchjd_counterparts`),
  torchjd's on the same matrix, what a user would call instead.

All of them alternate in one process with one EW step of the quickstart CNN (5 tasks, batch 64),
the yardstick of the "x EW" column; medians over the repeats (one random matrix each).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import mtl_plugins
from mtl_plugins.grouping import choose_groups
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies.aggregators import GradientAggregation
from mtl_plugins.strategies.conn_strength import combine_flat
from mtl_plugins.strategies.sel_update import update_affinity

from .cost import multidigits_setup
from .measure import alternate

JACOBIAN_COLUMNS = 100_000
CHANNELS, CHANNEL_SIZE = 64, 64 * 9


def planted_clusters(num_tasks: int) -> int:
    return min(num_tasks, max(2, round(num_tasks / 4)))


def planted_affinity(labels: np.ndarray, rng: np.random.Generator, within: float = 0.6, across: float = -0.3,
                     noise: float = 0.15) -> np.ndarray:
    """An affinity matrix (row = source, column = target) whose scaled form has the planted clusters."""
    num_tasks = len(labels)
    same = labels[:, None] == labels[None, :]
    scaled = np.where(same, within, across) + noise * rng.standard_normal((num_tasks, num_tasks))
    self_affinity = rng.uniform(0.5, 2.0, num_tasks)
    affinity = scaled * self_affinity[None, :]
    np.fill_diagonal(affinity, self_affinity)
    return affinity


def planted_labels(num_tasks: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.arange(num_tasks) % planted_clusters(num_tasks)
    rng.shuffle(labels)
    return labels


def adjusted_rand(groups: Sequence[Sequence[str]], labels: np.ndarray) -> float:
    from sklearn.metrics import adjusted_rand_score

    found = np.empty(len(labels), dtype=int)
    for g, group in enumerate(groups):
        for task in group:
            found[int(task)] = g
    return float(adjusted_rand_score(labels, found))


def affinity_update_batch(affinity: torch.Tensor, groups: Sequence[Sequence[int]], rng: np.random.Generator) -> None:
    """The EMA updates of one batch: one per group step, losses falling by up to 5%."""
    num_tasks = affinity.shape[0]
    before = rng.uniform(0.5, 2.0, num_tasks)
    for group in groups:
        after = before * (1 - rng.uniform(-0.02, 0.05, num_tasks))
        update_affinity(affinity, before.tolist(), after.tolist(), list(group), 0.001)
        before = after


def aggregator_names() -> list[str]:
    """Registered strategies that aggregate the per-task Jacobian."""
    from mtl_plugins.registry import STRATEGIES

    return [n for n in mtl_plugins.available_strategies() if issubclass(STRATEGIES.get(n), GradientAggregation)]


def torchjd_counterparts(strategies: Mapping[str, GradientAggregation]) -> dict[str, Any]:
    """torchjd's aggregator for each of ``strategies`` whose weights are computed here and that
    torchjd offers without extra solvers, built with the strategy's own options; {} without torchjd."""
    try:
        from torchjd import aggregation
    except ImportError:
        return {}
    factories = {"pcgrad": lambda s: aggregation.PCGrad(), "gradvac": lambda s: aggregation.GradVac(beta=s.beta),
                 "mgda": lambda s: aggregation.MGDA(epsilon=s.epsilon, max_iters=s.max_iters)}
    return {name: factories[name](strategy) for name, strategy in strategies.items() if name in factories}


def measure_tasks(num_tasks: int, repeats: int, aggregators: Sequence[str], ew_run: Callable[[int], Any],
                  seed: int = 0) -> dict[str, Any]:
    """One row: median ms of each bookkeeping operation for ``num_tasks`` tasks, groups found."""
    rng = np.random.default_rng(seed + num_tasks)
    tasks = [str(k) for k in range(num_tasks)]
    cases = []
    for _ in range(max(repeats, 1)):
        labels = planted_labels(num_tasks, rng)
        cases.append((labels, planted_affinity(labels, rng)))
    planted = [[k for k in range(num_tasks) if labels[k] == c] for labels in [cases[0][0]] for c in np.unique(labels)]
    found: list[tuple[np.ndarray, list[list[str]]]] = []
    affinity = torch.rand(num_tasks, num_tasks, dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(num_tasks, CHANNELS, CHANNEL_SIZE, generator=generator)
    top = torch.randint(0, num_tasks, (CHANNELS,), generator=generator)
    jacobian = torch.randn(num_tasks, JACOBIAN_COLUMNS, generator=generator)
    strategies = {name: mtl_plugins.build_strategy(name, tasks) for name in aggregators}
    counterparts = torchjd_counterparts(strategies)

    def cluster(i: int) -> None:
        labels, matrix = cases[i % len(cases)]
        grouping = choose_groups(matrix, tasks, [[t] for t in tasks], random_state=i)
        found.append((labels, grouping.groups))

    runs: dict[str, Callable[[int], Any]] = {
        "ew_step": ew_run,
        "clustering": cluster,
        "affinity_update": lambda i: affinity_update_batch(affinity, planted, rng),
        "projection": lambda i: combine_flat(grads, top),
        **{f"aggregate/{name}": (lambda i, s=strategies[name]: s.aggregate(jacobian)) for name in aggregators},
        **{f"torchjd/{name}": (lambda i, a=aggregator: a(jacobian)) for name, aggregator in counterparts.items()},
    }
    samples = alternate(runs, repeats, torch.device("cpu"), warmup=1)
    timed = [groups for _, groups in found[-repeats:]]
    scores = [adjusted_rand(groups, labels) for labels, groups in found[-repeats:]]
    row: dict[str, Any] = {
        "tasks": num_tasks,
        "repeats": repeats,
        "planted": planted_clusters(num_tasks),
        "groups_found": float(np.median([len(g) for g in timed])),
        "min_groups": min(len(g) for g in timed),
        "max_groups": max(len(g) for g in timed),
        "ari": float(np.mean(scores)),
        "exact": float(np.mean([s == 1.0 for s in scores])),
    }
    for key, sample in samples.items():
        row[f"{key}_ms"] = 1e3 * sample.median_wall
        row[f"{key}_cpu_ms"] = 1e3 * sample.median_cpu
    row["bookkeeping_ms"] = row["clustering_ms"] + row["affinity_update_ms"]
    row["bookkeeping_x_ew"] = row["bookkeeping_ms"] / row["ew_step_ms"]
    return row


def run_scaling(task_counts: Sequence[int], repeats: int, aggregators: Sequence[str] | None = None,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per K in ``task_counts`` (see the module docstring)."""
    setup = multidigits_setup()
    model = setup.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    ew = mtl_plugins.build_strategy("ew", setup.tasks)
    closures = [make_closure(model, b) for b in setup.batches]
    names = aggregator_names() if aggregators is None else list(aggregators)
    rows = []
    for k in task_counts:
        row = measure_tasks(k, repeats, names, lambda i: ew.step(closures[i % len(closures)], optimizer))
        log(f"  scaling K={k}: {row['groups_found']:g} groups (planted {row['planted']}), "
            f"clustering {row['clustering_ms']:.1f} ms, affinity update {row['affinity_update_ms']:.2f} ms")
        rows.append(row)
    return rows


def plot_scaling(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Left: ms per batch of each operation against K (log scale); right: groups found vs planted."""
    from mtl_plugins.plots import _pyplot

    plt = _pyplot()
    ks = [r["tasks"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.4))
    own = {"clustering": "sel_update clustering", "affinity_update": "sel_update affinity update",
           "projection": "conn_strength projection"}
    for key, label in own.items():
        left.plot(ks, [r[f"{key}_ms"] for r in rows], "-", marker="o", markersize=4, linewidth=2.5, label=label)
    aggregators = sorted(k[: -len("_ms")] for k in rows[0] if k.startswith("aggregate/") and k.endswith("_ms")
                         and not k.endswith("_cpu_ms"))
    for key in aggregators:
        left.plot(ks, [r[f"{key}_ms"] for r in rows], ":", marker=".", linewidth=1, label=key.replace("aggregate/", ""))
    left.plot(ks, [r["ew_step_ms"] for r in rows], "k--", label="EW step (CNN, K=5)")
    left.set_yscale("log")
    left.set_xlabel("number of tasks K")
    left.set_ylabel("ms (median)")
    left.set_title("bookkeeping per batch")
    left.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    right.plot(ks, [r["planted"] for r in rows], "k--", label="planted clusters")
    right.errorbar(ks, [r["groups_found"] for r in rows],
                   yerr=[[r["groups_found"] - r["min_groups"] for r in rows],
                         [r["max_groups"] - r["groups_found"] for r in rows]],
                   fmt="o", label="groups found (median, range)")
    right.set_xlabel("number of tasks K")
    right.set_ylabel("groups")
    right.set_title("affinity-propagation grouping of planted clusters")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

