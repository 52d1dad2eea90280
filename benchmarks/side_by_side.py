"""This library's gradient aggregators side by side with the work LibMTL's weightings do.

LibMTL's published algorithm for a gradient weighting (``rep_grad=False``): one forward pass of
every task; a K x n matrix of zeros; for each task a backward of its loss through the retained
graph, the shared parameters' gradients copied into row t of the matrix and cleared; the
weighting's aggregation of that matrix; the combined gradient written into the shared parameters
(the task-specific parameters keep what their task's backward left); one optimizer step.
:func:`libmtl_style_step` is written from that description and uses this library's aggregation
(``strategy.aggregate``), so that only the work around it differs.

Per model and aggregator, alternating in one process on the same model, batches and optimizer:
this library's ``strategy.step`` ("ours"), the LibMTL-style step, and the floor (one forward, K
retained backward passes, one step); ratios per cycle, and peak memory of each. Where an aggregator
offers them, ``jacobian="batched"`` and ``rep_grad=True`` are measured the same way against the
default (``jacobian="loop"``).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

import mtl_plugins
from mtl_plugins.loop import make_closure
from mtl_plugins.registry import STRATEGIES
from mtl_plugins.strategies.task_gradients import split_model_parameters

from .cost import Setup, retained_passes, to_device
from .measure import alternate, paired_ratio, paired_ratio_interval, peak_bytes

AGGREGATORS = ["pcgrad", "mgda", "imtl", "upgrad", "aligned_mtl", "gradvac", "graddrop", "cagrad", "nash_mtl"]


def libmtl_style_step(closure, optimizer: torch.optim.Optimizer, strategy: Any, tasks: Sequence[str],
                      shared: Sequence[torch.Tensor]) -> None:
    """One batch as LibMTL's gradient weightings do it (see the module docstring)."""
    optimizer.zero_grad(set_to_none=True)
    losses = closure()
    rows = shared[0].new_zeros((len(tasks), sum(p.numel() for p in shared)))
    for k, t in enumerate(tasks):
        losses[t].backward(retain_graph=k < len(tasks) - 1)
        torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in shared], out=rows[k])
        for p in shared:
            p.grad = None
    direction = strategy.aggregate(rows)
    offset = 0
    for p in shared:
        p.grad = direction[offset : offset + p.numel()].reshape(p.shape).to(p.dtype)
        offset += p.numel()
    optimizer.step()


def variants(name: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of the options measured against the default for aggregator ``name``."""
    accepted = STRATEGIES.accepted_options(name)
    found = [("jacobian='batched'", {"jacobian": "batched"})]
    if "rep_grad" in accepted:
        found.append(("rep_grad=True", {"rep_grad": True}))
    return found


def measure_aggregator(name: str, setup: Setup, repeats: int, device: torch.device, memory: bool,
                       options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ours, the LibMTL-style step and the floor for one aggregator (with ``options``) on ``setup``."""
    tasks = setup.tasks
    model = copy.deepcopy(setup.model).to(device).train()
    closures = [make_closure(model, to_device(b, device)) for b in setup.batches]
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
    ours = mtl_plugins.build_strategy(name, tasks, model=model, **(options or {}))
    theirs = mtl_plugins.build_strategy(name, tasks, model=model)
    shared, _ = split_model_parameters(model, name)
    runs: dict[str, Callable[[int], Any]] = {
        "ours": lambda i: ours.step(closures[i % len(closures)], optimizer),
        "libmtl": lambda i: libmtl_style_step(closures[i % len(closures)], optimizer, theirs, tasks, shared),
        "floor": lambda i: retained_passes(closures[i % len(closures)], optimizer, tasks),
    }
    samples = alternate(runs, repeats, device)
    row: dict[str, Any] = {
        "strategy": name, "options": dict(options or {}), "tasks": len(tasks), "repeats": repeats,
        **{f"{key}_ms": 1e3 * s.median_wall for key, s in samples.items()},
        "x_libmtl": paired_ratio(samples["ours"].wall, samples["libmtl"].wall),
        "x_floor": paired_ratio(samples["ours"].wall, samples["floor"].wall),
        "libmtl_x_floor": paired_ratio(samples["libmtl"].wall, samples["floor"].wall),
        "cpu_x_floor": paired_ratio(samples["ours"].cpu, samples["floor"].cpu),
        "x_floor_ci": paired_ratio_interval(samples["ours"].wall, samples["floor"].wall),
    }
    if memory:
        for key in ("ours", "libmtl"):
            row[f"{key}_peak_mib"] = peak_bytes(lambda k=key: runs[k](repeats + 2), device) / 2**20
    return row


def run_side_by_side(setup: Setup, names: Sequence[str], repeats: int, device: torch.device, memory: bool = True,
                     with_variants: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows for every aggregator in ``names`` (default options, then each variant) on ``setup``."""
    rows = []
    for name in names:
        cases = [("default", {})] + (variants(name) if with_variants else [])
        for label, options in cases:
            row = {"model": setup.name, "label": label, **measure_aggregator(name, setup, repeats, device, memory, options)}
            log(f"  side-by-side {setup.name} {name} {label}: x{row['x_libmtl']:.2f} LibMTL-style, "
                f"x{row['x_floor']:.2f} floor")
            rows.append(row)
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median ratios of the default rows."""
    default = [r for r in rows if r["label"] == "default"]
    return {"median_x_libmtl": statistics.median(r["x_libmtl"] for r in default),
            "median_x_floor": statistics.median(r["x_floor"] for r in default),
            "max_x_floor": max(r["x_floor"] for r in default)}
