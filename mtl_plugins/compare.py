"""``mtl-compare RECIPE [key=value ...] --strategies ew pcgrad cagrad:c=0.5``: one table of strategies.

Runs the recipe once per strategy (same data, model, training options and seed) through
:func:`mtl_plugins.runner.run_recipe` and prints, per strategy, each task's test metric, Delta_m
against the single-task baselines, and the training time per batch. A strategy is given as
``name`` or ``name:key=value,key=value`` (values are YAML); ``METHOD+WEIGHTING``
(``conn_strength+uw``) composes an update method with a loss weighting (its ``loss_scaling``
option). Every name and option is checked before anything trains. The table is also written to
``comparison.md`` and ``comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from . import available_strategies, build_strategy
from .config import apply_overrides, check_recipe, list_recipes, load_recipe
from .recipe_checks import check_recipe_types
from .registry import ARCHITECTURES, STRATEGIES
from .strategies.loss_scaling import LossScaling, split_label

DEFAULT_STRATEGIES = ("ew", "uw", "dwa", "pcgrad", "mgda", "cagrad", "imtl", "nash_mtl")


def parse_strategy(spec: str) -> tuple[str, dict[str, Any]]:
    """``"cagrad:c=0.5,rescale=0"`` -> ``("cagrad", {"c": 0.5, "rescale": 0})``; an update method
    composed with a loss weighting is ``METHOD+WEIGHTING``: ``"conn_strength+uw:schedule=phase2"`` ->
    ``("conn_strength", {"loss_scaling": "uw", "schedule": "phase2"})``."""
    label, _, rest = spec.partition(":")
    if not label:
        raise ValueError(f"strategy {spec!r} has no name; write name or name:key=value,...")
    name, options = split_label(label)
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"strategy {spec!r}: option {item!r} is not of the form key=value")
        if key in options:
            raise ValueError(f"strategy {spec!r}: {key} is given twice (by {label!r} and as an option)")
        options[key] = yaml.safe_load(raw)
    return name, options


def converts_itself(model: Mapping[str, Any]) -> bool:
    """True when a recipe's ``model`` section already builds task-specific connections (the Hub
    model's ``options.task_connections``, as in the ``*-connstr`` recipes)."""
    return (model.get("options") or {}).get("task_connections") is not None


def prepare(recipe: Mapping[str, Any], specs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """Check every strategy spec (names, options, optional dependencies) before training; returns
    ``(label, recipe)`` pairs."""
    if not specs:
        raise ValueError("give at least one strategy to compare")
    available_strategies()  # registers the built-ins
    labels = [s.strip() for s in specs]
    duplicates = sorted({s for s in labels if labels.count(s) > 1})
    if duplicates:
        raise ValueError(f"strategies listed twice: {duplicates}")
    tasks = (recipe.get("data") or {}).get("tasks")
    runs = []
    for spec in labels:
        name, options = parse_strategy(spec)
        canonical = STRATEGIES.resolve(name)
        STRATEGIES.check_options(canonical, options)
        run = {**recipe, "strategy": {"name": canonical, "options": options}}
        if STRATEGIES.get(canonical).needs_task_connections:
            if options.get("loss_scaling") is not None:  # the weighting's name and options, checked now
                LossScaling(options["loss_scaling"], tasks or ["task"], dict.fromkeys(tasks or ["task"], 1.0))
            # conn_strength runs on the recipe's model with task-specific connections
            model = dict(recipe.get("model") or {})
            converts = "model" in ARCHITECTURES.accepted_options(ARCHITECTURES.resolve(model.get("architecture", "hps")))
            if not converts and not converts_itself(model):
                run["model"] = {**model, "architecture": "task_connections"}
        elif tasks:  # builds it once: raises now if an optional dependency is missing
            build_strategy(canonical, tasks, **options)
        runs.append((spec, run))
    return runs


def compare(recipe: Mapping[str, Any], specs: Sequence[str], output_dir: str | Path,
            baselines: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run every strategy; returns one row per strategy (metrics, ``delta_m``, ``ms_per_batch``)."""
    return run_all(prepare(recipe, specs), output_dir, baselines, progress)


def run_folder(label: str) -> str:
    """The folder name of the run labelled ``label`` (characters other than ``A-Za-z0-9_.=+-`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", label)


def run_all(runs: Sequence[tuple[str, Mapping[str, Any]]], output_dir: str | Path,
            baselines: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Run prepared ``(label, recipe)`` pairs (see :func:`prepare`) into ``output_dir/<label>``.

    With single-task baselines, the last row is their reference (``strategy``: ``single-task``)."""
    from .runner import run_recipe

    out = Path(output_dir)
    mode = baselines or runs[0][1].get("baselines", "cache")
    rows, reference = [], None
    for i, (label, run) in enumerate(runs):
        folder = out / run_folder(label)
        # single-task baselines are trained at most once: later runs read them from the cache
        summary = run_recipe(run, output_dir=folder, baselines=mode if i == 0 or mode != "train" else "cache",
                             progress=progress)
        rows.append({
            "strategy": label,
            **summary["test_metrics"],
            "delta_m": summary.get("delta_m"),
            "ms_per_batch": 1000.0 * summary["train_seconds"] / max(int(summary["steps"]), 1),
            "steps": summary["steps"],
        })
        if reference is None and "single_task_metrics" in summary:
            single = summary["single_task_metrics"]
            reference = {"strategy": SINGLE_TASK, **{m: single.get(m) for m in summary["test_metrics"]},
                         "delta_m": 0.0, "ms_per_batch": None, "steps": summary["steps"],
                         "chance": {m: c for m, c in summary.get("chance_metrics", {}).items() if m in single}}
    return rows + ([reference] if reference is not None else [])


#: The label of the single-task reference row.
SINGLE_TASK = "single-task"


def near_chance(rows: Sequence[Mapping[str, Any]], margin: float = 0.2) -> list[str]:
    """Warnings for single-task reference accuracies within ``margin`` of the way from chance
    (``1 / classes``) to 1: Delta_m against such baselines says little."""
    warnings = []
    for row in rows:
        for metric, chance in (row.get("chance") or {}).items():
            value = row.get(metric)
            if value is not None and value < chance + margin * (1.0 - chance):
                warnings.append(f"warning: the single-task baseline of {metric} ({value:.4f}) is near chance "
                                f"({chance:.4f}): train longer (training.max_steps, training.num_train_epochs) "
                                "for a meaningful Delta_m")
    return warnings


def header(recipe_name: str, recipe: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """``recipe quickstart, 30 steps, seed 0, baselines ...``: what the table compares."""
    training = recipe.get("training") or {}
    steps = sorted({int(r["steps"]) for r in rows})
    return (f"recipe {recipe_name}, {'/'.join(map(str, steps))} steps, seed {training.get('seed', 0)}, "
            f"tasks {', '.join(str(t) for t in (recipe.get('data') or {}).get('tasks') or ['all'])}")


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table: strategy, each metric, Delta_m (%), ms per batch."""
    metrics = [k for k in rows[0] if "/" in k]
    table_header = ["strategy", *metrics, "delta_m (%)", "ms/batch"]

    def cell(value: Any, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    body = [[r["strategy"], *(cell(r[m], 4) for m in metrics), cell(r["delta_m"], 2), cell(r["ms_per_batch"], 1)]
            for r in rows]
    widths = [max(len(line[i]) for line in [table_header, *body]) for i in range(len(table_header))]

    def fmt(line: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |"

    return "\n".join([fmt(table_header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, body)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtl-compare",
        description="Train a recipe once per strategy and print one comparison table.",
        epilog="Example: mtl-compare quickstart training.num_train_epochs=1 --strategies ew pcgrad cagrad:c=0.5",
    )
    parser.add_argument("recipe", nargs="?", help="bundled recipe name or path to a YAML recipe")
    parser.add_argument("overrides", nargs="*", help="recipe overrides as dotted key=value (values are YAML)")
    parser.add_argument("--strategies", nargs="+", default=list(DEFAULT_STRATEGIES),
                        help="strategies as name, name:key=value,... or METHOD+WEIGHTING (e.g. conn_strength+uw) "
                             f"(default: {' '.join(DEFAULT_STRATEGIES)}); "
                             "the recipe and key=value overrides may also come after them")
    parser.add_argument("--output-dir", default="runs/compare", help="folder for every run and the table")
    parser.add_argument("--baselines", choices=("cache", "train", "skip"),
                        help="single-task baselines for Delta_m: cached, retrained once, or skipped")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def is_override(item: str) -> bool:
    """True for ``key=value`` (a recipe override), False for ``name`` or ``name:key=value`` (a strategy)."""
    key, sep, _ = item.partition("=")
    return bool(sep) and ":" not in key


def is_recipe(item: str) -> bool:
    return item in list_recipes() or item.endswith((".yaml", ".yml"))


def sort_arguments(args: argparse.Namespace) -> None:
    """Take the recipe and its overrides out of ``--strategies`` (which takes every word after it),
    so that ``--strategies`` may come before the recipe or before the overrides."""
    specs = []
    for item in args.strategies:
        if is_override(item):
            args.overrides.append(item)
        elif args.recipe is None and is_recipe(item):
            args.recipe = item
        else:
            specs.append(item)
    args.strategies = specs


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sort_arguments(args)
    if args.recipe is None:
        parser.print_usage(sys.stderr)
        print("mtl-compare: error: give a recipe (a bundled name or a YAML path)", file=sys.stderr)
        return 2
    notes: list[str] = []
    try:
        recipe = check_recipe(apply_overrides(load_recipe(args.recipe), args.overrides, notes))
        check_recipe_types(recipe, strategy=False)
        runs = prepare(recipe, args.strategies)
    except (ValueError, TypeError, ImportError, FileNotFoundError) as error:
        print(f"mtl-compare: error: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"mtl-compare: note: {note}", file=sys.stderr)
    try:
        rows = run_all(runs, args.output_dir, args.baselines, progress=not args.no_progress)
    except (ValueError, TypeError, KeyError, OSError) as error:
        print(f"mtl-compare: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    lines = [header(args.recipe, recipe, rows), "", format_table(rows), *near_chance(rows)]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    (out / "comparison.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))
    print(f"outputs written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
