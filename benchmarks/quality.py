"""Quality: test metrics and Delta_m of strategies on recipes, over seeds, against single-task models.

Every (benchmark, strategy, seed) is one run of :func:`mtl_plugins.compare.run_all` (the recipe's
data, model and training options; ``training.seed`` = the seed, which also fixes the data order, so
strategies with one seed see the same batches; ``conn_strength`` on the recipe's model with
task-specific connections). Single-task baselines (``ew`` on one task, the same recipe plus the
benchmark's ``baseline_overrides``, e.g. a longer schedule keeping the epoch of lowest validation
loss) come from :func:`mtl_plugins.runner.single_task_baselines` and its cache, for every seed or for
the first seed only (then every seed is compared with them). Runs are independent jobs spread over
worker processes, one torch thread each.

Per strategy the summary gives Delta_m as mean ± half width of the 95% t interval over seeds, and
the paired per-seed difference to ``ew`` with its interval (:mod:`benchmarks.stats`); ``verdicts``
compare ``sel_update`` and ``conn_strength`` with ``ew`` and with the best gradient baseline.

From each run's saved strategy state the report shows ``sel_update``'s learned groups and affinity
and ``conn_strength``'s Phase-2 share and task priority (share of channels whose top-priority task
is each task, over all connected layers).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from .stats import mean_ci, paired_difference, verdict


@dataclass(frozen=True)
class Benchmark:
    """A recipe (bundled name or path) with overrides, the strategies run on it, and how."""

    name: str
    recipe: str
    overrides: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    baseline_seeds: str = "each"  # "each" seed or the "first" one only
    note: str = ""
    #: Overrides of the single-task baselines only (e.g. a longer schedule with model selection on
    #: the validation split: ``training.load_best_model_at_end=true``).
    baseline_overrides: tuple[str, ...] = ()

    def load(self) -> dict[str, Any]:
        from mtl_plugins.config import apply_overrides, load_recipe

        return apply_overrides(load_recipe(self.recipe), list(self.overrides))


def strategy_recipe(base: Mapping[str, Any], strategy: str, seed: int, options: Mapping[str, Any] | None) -> dict[str, Any]:
    """``base`` with ``strategy`` (the recipe's own options if it already runs it) and ``training.seed``;
    a strategy that needs task-specific connections gets the ``task_connections`` architecture.
    ``METHOD+WEIGHTING`` (``conn_strength+uw``) runs ``METHOD`` with the loss scaling ``WEIGHTING``;
    ``LABEL@ARCHITECTURE`` (``ew@task_connections``) runs ``LABEL`` on that architecture."""
    from mtl_plugins import strategies  # noqa: F401  (registers the built-ins)
    from mtl_plugins.registry import STRATEGIES
    from mtl_plugins.strategies.loss_scaling import split_label

    strategy, _, architecture = strategy.partition("@")
    method, composed = split_label(strategy)
    recipe = copy.deepcopy(dict(base))
    own = recipe.get("strategy") or {}
    chosen = dict(own.get("options") or {}) if own.get("name") == method else dict(options or {})
    recipe["strategy"] = {"name": method, "options": {**chosen, **composed}}
    recipe["training"] = {**recipe.get("training", {}), "seed": seed}
    if architecture or STRATEGIES.get(method).needs_task_connections:
        recipe["model"] = {**recipe.get("model", {}), "architecture": architecture or "task_connections"}
    return recipe


def init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def strategy_extras(name: str, state: Mapping[str, Any]) -> dict[str, Any]:
    """What the report shows of a strategy's final state (sel_update groups, conn_strength priority)."""
    if name == "sel_update":
        counts = state.get("group_count_changes", [])
        return {"groups": state["groups"], "affinity": state["affinity"].tolist(),
                "group_count_changes": [list(c) for c in counts],
                "clustering_failures": int(state.get("clustering_failures", 0))}
    if name == "conn_strength":
        phases = list(state.get("phase_counts", [0, 0]))
        timeline = state.get("timeline") or []
        return {"phase_counts": phases, "phase2_fraction": phases[1] / max(1, sum(phases)),
                "priority": timeline[-1]["overall"] if timeline else None,
                "priority_step": timeline[-1]["step"] if timeline else None,
                "priority_layers": timeline[-1]["layers"] if timeline else None}
    return {}


def run_strategy_job(label: str, recipe: Mapping[str, Any], folder: str) -> dict[str, Any]:
    """One training run (in a worker); returns compare's row, the strategy extras and the wall time."""
    import torch

    from mtl_plugins.compare import run_all, run_folder

    started = time.perf_counter()
    row = run_all([(label, recipe)], folder, baselines="skip", progress=False)[0]
    run_dir = Path(folder) / run_folder(label)
    state = torch.load(run_dir / "strategy_state.pt", weights_only=True)
    (run_dir / "model.safetensors").unlink(missing_ok=True)
    return {"row": row, "extras": strategy_extras(recipe["strategy"]["name"], state),
            "seconds": time.perf_counter() - started}


def finished_run(work_dir: Path, label: str, recipe: Mapping[str, Any], seed: int) -> Path | None:
    """The folder of a finished run of exactly ``recipe`` (same strategy, options, data, model and
    training, seed included) under any benchmark of ``work_dir``, or None."""
    import yaml

    from mtl_plugins.compare import run_folder

    wanted = {k: v for k, v in recipe.items() if k != "output_dir"}
    for folder in sorted(work_dir.glob(f"*/seed{seed}/{run_folder(label)}")):
        done = all((folder / name).is_file() for name in ("config.yaml", "results.json", "strategy_state.pt"))
        if not done or (folder / ".incomplete").exists():
            continue
        saved = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        saved.pop("output_dir", None)
        if saved == wanted:
            return folder
    return None


def reused_job(label: str, recipe: Mapping[str, Any], folder: Path) -> dict[str, Any]:
    """What :func:`run_strategy_job` returns, read from the finished run in ``folder``."""
    import json

    import torch

    results = json.loads((folder / "results.json").read_text())
    row = {"strategy": label, **results["test_metrics"], "delta_m": results.get("delta_m"),
           "ms_per_batch": 1000.0 * results["train_seconds"] / max(int(results["steps"]), 1), "steps": results["steps"]}
    state = torch.load(folder / "strategy_state.pt", weights_only=True)
    return {"row": row, "extras": strategy_extras(recipe["strategy"]["name"], state), "seconds": 0.0,
            "reused": str(folder)}


def run_baseline_job(recipe: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """Single-task metrics of ``recipe``'s tasks and which metrics are higher-is-better (in a worker)."""
    from mtl_plugins.runner import build_datasets, higher_is_better, single_task_baselines

    started = time.perf_counter()
    data = build_datasets(recipe)
    metrics = single_task_baselines(recipe, data.tasks, mode, progress=False)
    main = {f"{t}/{spec.metric}" for t, spec in data.task_specs.items()}  # what a strategy run reports
    selection = higher_is_better(data, (recipe.get("data") or {}).get("dataset"), main & set(metrics))
    return {"metrics": metrics, "higher_is_better": selection, "tasks": data.tasks,
            "seconds": time.perf_counter() - started}


@dataclass
class Job:
    kind: str  # "strategy" or "baseline"
    benchmark: str
    seed: int
    strategy: str
    weight: float  # expected relative cost, to start the longest jobs first
    args: tuple


def plan_jobs(benchmarks: Sequence[Benchmark], seeds: Sequence[int], work_dir: Path, baselines: str) -> list[Job]:
    """Every run to do, longest expected first."""
    from mtl_plugins.registry import STRATEGIES

    jobs = []
    for bench in benchmarks:
        base = bench.load()
        tasks = len((base.get("data") or {}).get("tasks") or ()) or 1
        scale = 1.0 if bench.name == "multidigits" else 8.0
        for seed in seeds:
            for name in bench.strategies:
                recipe = strategy_recipe(base, name, seed, bench.options.get(name))
                method = recipe["strategy"]["name"]
                passes = tasks if STRATEGIES.get(method).needs_task_forward or method == "sel_update" else 1
                folder = work_dir / bench.name / f"seed{seed}"
                jobs.append(Job("strategy", bench.name, seed, name, scale * passes, (name, recipe, str(folder))))
            if baselines != "skip" and (bench.baseline_seeds == "each" or seed == seeds[0]):
                from mtl_plugins.config import apply_overrides

                recipe = apply_overrides(strategy_recipe(base, "ew", seed, {}), list(bench.baseline_overrides))
                recipe["output_dir"] = str(work_dir / bench.name / f"seed{seed}" / "single-task")
                jobs.append(Job("baseline", bench.name, seed, "single-task", scale * tasks, (recipe, baselines)))
    return sorted(jobs, key=lambda j: -j.weight)


def run_jobs(jobs: Sequence[Job], workers: int, threads: int, log: Callable[[str], None] = print,
             reuse_from: Path | None = None) -> list[tuple[Job, dict]]:
    """Run the jobs in ``workers`` spawned processes; returns (job, result) pairs in job order. With
    ``reuse_from`` (the work folder), a strategy job whose exact recipe already finished there is read
    from that run instead of trained again."""
    results: dict[int, dict] = {}
    if reuse_from is not None:
        for i, job in enumerate(jobs):
            folder = finished_run(reuse_from, job.args[0], job.args[1], job.seed) if job.kind == "strategy" else None
            if folder is not None:
                results[i] = reused_job(job.args[0], job.args[1], folder)
                log(f"  quality: {job.benchmark} {job.strategy} seed {job.seed} reused from {folder}")
    jobs_to_run = [(i, job) for i, job in enumerate(jobs) if i not in results]
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=init_worker,
                             initargs=(threads,)) as pool:
        futures = {}
        for i, job in jobs_to_run:
            function = run_strategy_job if job.kind == "strategy" else run_baseline_job
            futures[pool.submit(function, *job.args)] = i
        for done, future in enumerate(as_completed(futures), 1):
            i, job = futures[future], jobs[futures[future]]
            try:
                results[i] = future.result()
                outcome = f"{results[i]['seconds']:.0f} s"
            except Exception as error:  # one failed run must not lose the others
                results[i] = {"error": f"{type(error).__name__}: {error}", "seconds": 0.0}
                outcome = f"failed: {results[i]['error']}"
            log(f"  quality [{done}/{len(jobs_to_run)}] {job.benchmark} {job.strategy} seed {job.seed}: {outcome}")
    return [(job, results[i]) for i, job in enumerate(jobs)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [float(v) for v in values]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(benchmark: Benchmark, outcomes: Sequence[tuple[Job, dict]], seeds: Sequence[int]) -> dict[str, Any]:
    """Per strategy: mean and std over seeds of every metric, Delta_m and ms per batch; extras."""
    from mtl_plugins.metrics import delta_m

    mine = [(job, out) for job, out in outcomes if job.benchmark == benchmark.name and "error" not in out]
    failures = [f"{job.strategy} seed {job.seed}: {out['error']}" for job, out in outcomes
                if job.benchmark == benchmark.name and "error" in out]
    baselines = {job.seed: out for job, out in mine if job.kind == "baseline"}
    reference_seed = {s: (s if benchmark.baseline_seeds == "each" else seeds[0]) for s in seeds}
    strategies: dict[str, dict[str, Any]] = {}
    for job, out in mine:
        if job.kind != "strategy":
            continue
        entry = strategies.setdefault(job.strategy, {"runs": []})
        row = out["row"]
        metrics = {k: v for k, v in row.items() if "/" in k}
        base = baselines.get(reference_seed[job.seed])
        delta = delta_m(metrics, base["metrics"], base["higher_is_better"]) if base else None
        entry["runs"].append({"seed": job.seed, "metrics": metrics, "delta_m": delta,
                              "ms_per_batch": row["ms_per_batch"], "extras": out["extras"]})
    for entry in strategies.values():
        runs = entry["runs"]
        entry["metrics"] = {k: mean_std([r["metrics"][k] for r in runs]) for k in runs[0]["metrics"]}
        deltas = [r["delta_m"] for r in runs if r["delta_m"] is not None]
        # mean ± half width of the 95% t interval over seeds (the std is kept in delta_m_ci)
        ci = mean_ci(deltas) if deltas else None
        entry["delta_m_ci"] = ({**ci, "std": mean_std(deltas)[1]} if ci else None)
        entry["delta_m"] = (ci["mean"], ci["half_width"] if ci["n"] > 1 else 0.0) if ci else None
        entry["ms_per_batch"] = statistics.fmean(r["ms_per_batch"] for r in runs)
        entry["seeds"] = len(runs)
    per_seed = {name: {r["seed"]: r["delta_m"] for r in e["runs"] if r["delta_m"] is not None}
                for name, e in strategies.items()}
    for name, entry in strategies.items():
        entry["vs_ew"] = paired_difference(per_seed[name], per_seed["ew"]) if "ew" in per_seed and name != "ew" else None
    verdicts = compare_methods(strategies, per_seed)
    single = None
    if baselines:
        names = list(next(iter(baselines.values()))["metrics"])
        single = {k: mean_std([b["metrics"][k] for b in baselines.values()]) for k in names}
    selection = next(iter(baselines.values()))["higher_is_better"] if baselines else None
    return {"benchmark": benchmark.name, "recipe": benchmark.recipe, "overrides": list(benchmark.overrides),
            "note": benchmark.note, "seeds": list(seeds), "baseline_seeds": sorted(baselines), "failures": failures,
            "strategies": strategies, "single_task": single, "verdicts": verdicts, "delta_m_metrics": selection}


#: ``ew`` on ``conn_strength``'s architecture: tells its update rule apart from its extra per-task BatchNorms.
SAME_ARCHITECTURE_EW = "ew@task_connections"

#: Strategies that combine per-task gradients (the "gradient baselines" the methods are compared with).
GRADIENT_BASELINES = ("pcgrad", "cagrad", "mgda", "nash_mtl", "imtl", "aligned_mtl", "upgrad", "graddrop",
                      "gradvac", "gradnorm")


def compare_methods(strategies: Mapping[str, Any], per_seed: Mapping[str, Mapping[int, float]]) -> list[dict[str, Any]]:
    """``sel_update`` and ``conn_strength`` against ``ew``, against the gradient baseline with the best
    mean Delta_m and, for ``conn_strength``, against ``ew`` on its own architecture (``SAME_ARCHITECTURE_EW``,
    where run): paired per-seed difference of Delta_m with its 95% t interval, and the verdict."""
    gradient = [n for n in GRADIENT_BASELINES if strategies.get(n, {}).get("delta_m")]
    best = max(gradient, key=lambda n: strategies[n]["delta_m"][0]) if gradient else None
    rows = []
    for method in ("sel_update", "conn_strength"):
        if method not in per_seed:
            continue
        for other in ("ew", best, SAME_ARCHITECTURE_EW if method == "conn_strength" else None):
            if other is None or other not in per_seed:
                continue
            difference = paired_difference(per_seed[method], per_seed[other])
            rows.append({"method": method, "against": other, "difference": difference, "verdict": verdict(difference)})
    return rows


def plot_quality(summary: Mapping[str, Any], path: Path) -> Path:
    """Two panels per strategy: Delta_m (mean and 95% t interval over seeds) and the paired per-seed
    difference of Delta_m to ``ew`` (mean and 95% t interval)."""
    from mtl_plugins.plots import _pyplot

    plt = _pyplot()
    items = [(name, e) for name, e in summary["strategies"].items() if e["delta_m"] is not None]
    items.sort(key=lambda item: -item[1]["delta_m"][0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.9 + 0.3 * max(len(items), 1)), sharey=True)
    colours = ["tab:orange" if n in ("sel_update", "conn_strength") else "tab:blue" for n, _ in items]
    rows = range(len(items))
    left.barh(rows, [e["delta_m"][0] for _, e in items], xerr=[e["delta_m"][1] for _, e in items], color=colours)
    differences = [e.get("vs_ew") for _, e in items]
    right.barh(rows, [d["mean"] if d else 0.0 for d in differences],
               xerr=[d["half_width"] if d else 0.0 for d in differences], color=colours)
    for ax in (left, right):
        ax.axvline(0.0, color="black", linewidth=0.8)
    left.set_yticks(list(rows), [n for n, _ in items], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("Delta_m vs single-task (%), mean, 95% CI")
    right.set_xlabel("Delta_m - Delta_m(ew), paired by seed, 95% CI")
    fig.suptitle(f"{summary['benchmark']}: {len(summary['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_affinity(summary: Mapping[str, Any], path: Path) -> Path | None:
    """``sel_update``'s final affinity matrix, averaged over seeds."""
    from mtl_plugins.plots import plot_heatmap

    entry = summary["strategies"].get("sel_update")
    if not entry:
        return None
    matrices = [np.asarray(r["extras"]["affinity"]) for r in entry["runs"]]
    tasks = [k.split("/")[0] for k in entry["runs"][0]["metrics"]]
    return plot_heatmap(np.mean(matrices, axis=0), tasks, path,
                        title=f"affinity, {len(matrices)} seeds",
                        xlabel="target task", ylabel="source task")


def delta_m_metrics(summary: Mapping[str, Any]) -> dict[str, bool]:
    """The metrics a quality summary's Delta_m averages (recorded, or derived from its recipe)."""
    if summary.get("delta_m_metrics"):
        return dict(summary["delta_m_metrics"])
    from mtl_plugins.config import apply_overrides, load_recipe
    from mtl_plugins.runner import build_datasets, higher_is_better

    recipe = apply_overrides(load_recipe(summary["recipe"]), list(summary["overrides"]))
    data = build_datasets(recipe)
    available = next(iter(summary["strategies"].values()))["runs"][0]["metrics"]
    return higher_is_better(data, (recipe.get("data") or {}).get("dataset"), set(available))


def add_convergence(summary: dict[str, Any], work_dir: Path) -> None:
    """Per-epoch validation convergence of the summary's runs (:mod:`benchmarks.convergence`), where
    their logs are still in ``work_dir``."""
    from .convergence import summarize_convergence

    if summary["strategies"] and (work_dir / summary["benchmark"]).is_dir():
        summarize_convergence(summary, work_dir, delta_m_metrics(summary))


def run_quality(benchmarks: Sequence[Benchmark], seeds: Sequence[int], work_dir: Path, workers: int = 2,
                threads: int = 1, baselines: str = "cache", log: Callable[[str], None] = print,
                reuse: bool = False) -> list[dict[str, Any]]:
    """Run every benchmark's strategies over ``seeds``; one summary per benchmark. ``reuse``: read
    runs whose exact recipe already finished in ``work_dir`` (any benchmark) instead of training them."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    jobs = plan_jobs(benchmarks, seeds, work_dir, baselines)
    outcomes = run_jobs(jobs, workers, threads, log, reuse_from=work_dir if reuse else None)
    summaries = []
    for bench in benchmarks:
        summary = summarize(bench, outcomes, seeds)
        summary["wall_seconds"] = sum(out["seconds"] for job, out in outcomes if job.benchmark == bench.name)
        summary["reused_runs"] = sum("reused" in out for job, out in outcomes if job.benchmark == bench.name)
        add_convergence(summary, work_dir)
        summaries.append(summary)
    return summaries
