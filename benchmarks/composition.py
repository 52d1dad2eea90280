"""The papers' protocol: update methods on top of loss-scaling schemes, as a quality benchmark.

The CVPR 2024 paper pairs each gradient method with a loss weighting. The grid is loss scaling
(rows: ``ew``, ``uw``, ``dwa``) x update method (columns: ``sum``, ``pcgrad``, ``cagrad``,
``aligned_mtl``, ``conn_strength``, ``sel_update``). Cell (scaling, method) is the composed strategy
``method+scaling`` (the method's ``loss_scaling`` option); the ``sum`` column is the loss weighting
alone (``ew``, ``uw``, ``dwa``), and the ``ew`` row the bare method (``ew`` as loss scaling equals
it exactly). The grid is one :class:`~benchmarks.quality.Benchmark` whose strategies are the cells,
so it runs through the quality section's protocol unchanged (seeds, single-task baselines, Delta_m
statistics); :func:`render_grid` lays its Delta_m out as the paper's table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .quality import Benchmark

#: Rows: loss scaling.
SCALINGS = ("ew", "uw", "dwa")
#: Columns: update methods (``sum``: the summed loss, i.e. the loss weighting alone).
METHODS = ("sum", "pcgrad", "cagrad", "aligned_mtl", "conn_strength", "sel_update")


def cell(scaling: str, method: str) -> str:
    """The strategy of one cell: ``uw`` (sum), ``pcgrad`` (ew row) or ``pcgrad+uw``."""
    if method == "sum":
        return scaling
    return method if scaling == "ew" else f"{method}+{scaling}"


def grid_strategies(scalings: Sequence[str] = SCALINGS, methods: Sequence[str] = METHODS) -> tuple[str, ...]:
    return tuple(cell(s, m) for s in scalings for m in methods)


def composition_benchmark(base: Benchmark, name: str = "composition", scalings: Sequence[str] = SCALINGS,
                          methods: Sequence[str] = METHODS) -> Benchmark:
    """``base`` (recipe, overrides, baselines) with the grid's strategies; ``base.options`` of a method
    apply to every cell of its column."""
    strategies = grid_strategies(scalings, methods)
    options = {label: dict(base.options[label.split("+")[0]]) for label in strategies
               if label.split("+")[0] in base.options}
    note = (f"Loss scaling x update method, as the CVPR 2024 paper's tables: cell (scaling, method) trains "
            f"`method+scaling`, the method with the scaling's weights on the losses (the `sum` column is the "
            f"weighting alone, the `ew` row the bare method). {base.note}").strip()
    return dataclasses.replace(base, name=name, strategies=strategies, options=options, note=note)


def _methods_and_scalings(labels: Sequence[str]) -> tuple[list[str], list[str]]:
    scalings = {"ew"} | {label.split("+")[1] for label in labels if "+" in label}
    methods = {label.split("+")[0] for label in labels if "+" in label}
    methods |= {label for label in labels if label in METHODS}
    return [m for m in METHODS if m in methods or m == "sum"], [s for s in SCALINGS if s in scalings] + sorted(
        scalings - set(SCALINGS))


def render_grid(summary: Mapping[str, Any]) -> list[str]:
    """The paper-style table of a benchmark with composed strategies (none without them): Delta_m per
    (loss scaling, method) cell, and the paired per-seed difference to ``ew`` where the summary has it."""
    strategies = summary["strategies"]
    if not any("+" in label for label in strategies):
        return []
    methods, scalings = _methods_and_scalings(list(strategies))

    def value(label: str) -> str:
        entry: Mapping[str, Any] | None = strategies.get(label)
        if not entry or entry.get("delta_m") is None:
            return "n/a"
        mean, spread = entry["delta_m"]
        text = f"{mean:+.2f} ± {spread:.2f}"
        paired = entry.get("vs_ew")
        if paired:
            text += f" ({paired['mean']:+.2f} ± {paired['half_width']:.2f} vs ew)"
        return text

    rows = [[f"`{s}`", *(value(cell(s, m)) for m in methods)] for s in scalings]
    header = ["loss scaling", *(f"`{m}`" for m in methods)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [f"Delta_m (%) of update method (columns) x loss scaling (rows), {len(summary['seeds'])} seeds, as "
            "in the quality table above (mean ± spread over seeds; in brackets the paired per-seed difference "
            "to `ew` where the protocol reports it). `sum` is the summed loss with the row's weighting alone.",
            "", *lines, ""]
