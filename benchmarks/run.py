"""``python -m benchmarks.run``: measure and write the benchmark report (Markdown, PNG plots, JSON).

Sections (``--sections``, all by default):

* ``cost``: time per batch and peak memory of every strategy against its floor and one EW step
  (:mod:`benchmarks.cost`), on CPU or ``--device cuda``;
* ``libmtl``: the gradient aggregators side by side with the work LibMTL's weightings do (one
  forward, K retained backwards, aggregation, step), with ``jacobian="batched"`` and ``rep_grad=True``
  against the default (:mod:`benchmarks.side_by_side`);
* ``scaling``: grouping and bookkeeping cost for K = 2..40 tasks (:mod:`benchmarks.scaling`);
* ``quality``: Delta_m (mean and 95% t interval over seeds, paired differences to ``ew``) and per-task
  metrics on MultiDigits, rooms and the text recipe
  (:mod:`benchmarks.quality`).

The report goes to ``docs/benchmarks/`` (``README.md``, ``results.json``, plots); sections not run,
and quality benchmarks left out of ``--benchmarks``, keep their previous numbers from
``results.json``. ``--quick`` is a smoke run of every section and ``--only`` restricts the
strategies; both write to ``runs/`` unless ``--out`` is given, so the
published report only ever holds complete runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .composition import composition_benchmark
from .quality import SAME_ARCHITECTURE_EW, Benchmark

SECTIONS = ("cost", "libmtl", "scaling", "quality")
DOCS = Path("docs/benchmarks")


@dataclass
class Settings:
    """How much of each section to run."""

    cost_repeats: int
    cost_strategies: list[str] | None  # None: every registered strategy
    scaling_tasks: list[int]
    scaling_repeats: int
    scaling_aggregators: list[str] | None  # None: every gradient aggregator
    side_repeats: int = 15
    side_aggregators: list[str] | None = None  # None: every gradient aggregator
    side_models: list[str] = field(default_factory=lambda: ["cnn", "resnet"])
    benchmarks: list[Benchmark] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


TEXT_NOTE = ("Subset: fine-tuning MiniLM takes minutes per run on a CPU, so the text recipe runs with reviews "
             "truncated to 64 tokens (the recipe uses 96), for `ew`, `sel_update` (warm-up 20 batches) and the "
             "loss weighting `uw` only, every seed compared with the single-task baselines of the first seed.")


#: Strategies every quality benchmark runs at least (the issue's list; MultiDigits runs all of them).
CORE_STRATEGIES = ("ew", "sel_update", "conn_strength", "pcgrad", "cagrad", "nash_mtl", "aligned_mtl", "imtl", "uw",
                   "dwa", "famo")
#: Single-task baselines: twice the multi-task schedule, evaluated every epoch on the validation split,
#: the checkpoint with the lowest validation loss kept (never selected on test).
CONVERGED_BASELINES = ("training.eval_strategy=epoch", "training.save_strategy=epoch",
                       "training.load_best_model_at_end=true", "training.metric_for_best_model=loss",
                       "training.greater_is_better=false", "training.save_total_limit=1")
LENGTH_NOTE = ("Training length: {epochs} epochs for every strategy ({multiple}x the recipe's), fixed in advance "
               "and the same for all methods (not tuned per method); single-task baselines train {baseline} epochs "
               "and keep the epoch with the lowest validation loss. Every run's per-epoch validation metrics are in "
               "its train_log.jsonl under the work folder, to check that they have levelled off.")


def multidigits_benchmark(strategies: Sequence[str], epochs: int = 8) -> Benchmark:
    return Benchmark("multidigits", "quickstart", overrides=(f"training.num_train_epochs={epochs}",),
                     strategies=tuple(strategies),
                     baseline_overrides=(f"training.num_train_epochs={2 * epochs}", *CONVERGED_BASELINES),
                     note=LENGTH_NOTE.format(epochs=epochs, multiple=epochs // 2, baseline=2 * epochs))


#: The learning-rate schedule of the dense paper recipes (NYUD-v2, PASCAL-Context): polynomial decay
#: with power 0.9 to zero over the run, so that a run ends with small steps instead of the recipe's
#: constant rate.
PAPER_SCHEDULE = ("training.lr_scheduler_type=polynomial", "training.lr_scheduler_kwargs={power: 0.9, lr_end: 0.0}")


def rooms_benchmark(strategies: Sequence[str], epochs: int = 10) -> Benchmark:
    return Benchmark("rooms", "dense-quickstart", overrides=(f"training.num_train_epochs={epochs}", *PAPER_SCHEDULE),
                     strategies=tuple(strategies),
                     baseline_overrides=(f"training.num_train_epochs={2 * epochs}", *CONVERGED_BASELINES),
                     note=LENGTH_NOTE.format(epochs=epochs, multiple=epochs // 2, baseline=2 * epochs)
                     + " Learning rate: the dense paper recipes' schedule (polynomial decay, power 0.9, to zero over"
                     " each run, baselines included) instead of the recipe's constant rate: with a constant rate, 6"
                     " epochs still gained 1-2% Delta_m in their last epoch on the validation split."
                     " Delta_m: depth rmse, semseg mIoU, normals mean angle and saliency mIoU."
                     + (f" `{SAME_ARCHITECTURE_EW}`: `ew` on `conn_strength`'s architecture (one BatchNorm per task in"
                        " the backbone), the control that tells its update rule apart from its architecture."
                        if SAME_ARCHITECTURE_EW in strategies else ""))


def full_settings() -> Settings:
    import mtl_plugins

    return Settings(
        cost_repeats=15,
        cost_strategies=None,
        scaling_tasks=[2, 3, 5, 8, 10, 15, 20, 30, 40],
        scaling_repeats=10,
        scaling_aggregators=None,
        benchmarks=[
            multidigits_benchmark(mtl_plugins.available_strategies()),
            rooms_benchmark((*CORE_STRATEGIES, SAME_ARCHITECTURE_EW)),
            composition_benchmark(multidigits_benchmark(()), name="composition"),
            Benchmark("text", "text-quickstart", overrides=("data.max_length=64",),
                      strategies=("ew", "sel_update", "uw"), options={"sel_update": {"warmup_steps": 20}},
                      baseline_seeds="first", note=TEXT_NOTE),
        ],
        seeds=[0, 1, 2, 3, 4],
    )


def quick_settings() -> Settings:
    return Settings(
        cost_repeats=3,
        cost_strategies=["ew", "uw", "pcgrad", "sel_update", "conn_strength"],
        scaling_tasks=[2, 6, 10],
        scaling_repeats=2,
        scaling_aggregators=["pcgrad", "mgda"],
        side_repeats=2,
        side_aggregators=["pcgrad", "mgda"],
        side_models=["cnn"],
        benchmarks=[
            Benchmark("multidigits", "quickstart",
                      overrides=("data.train_size=256", "data.eval_size=200", "training.num_train_epochs=1",
                                 "training.logging_steps=1"),
                      strategies=("ew", "sel_update", "conn_strength"), options={"sel_update": {"warmup_steps": 1}},
                      baseline_overrides=("training.num_train_epochs=2", *CONVERGED_BASELINES),
                      note="Smoke run: 256 training images, one epoch."),
            Benchmark("rooms", "dense-quickstart",
                      overrides=("data.train_size=64", "data.eval_size=32", "data.validation_size=16",
                                 "training.num_train_epochs=1", "training.per_device_train_batch_size=16",
                                 "training.logging_steps=1"),
                      strategies=("ew", "sel_update", "conn_strength"), options={"sel_update": {"warmup_steps": 1}},
                      baseline_overrides=("training.num_train_epochs=2", *CONVERGED_BASELINES),
                      note="Smoke run: 64 training scenes, one epoch."),
            composition_benchmark(Benchmark("multidigits", "quickstart",
                      overrides=("data.train_size=256", "data.eval_size=200", "training.num_train_epochs=1",
                                 "training.logging_steps=1"),
                      options={"sel_update": {"warmup_steps": 1}},
                      baseline_overrides=("training.num_train_epochs=2", *CONVERGED_BASELINES),
                      note="Smoke run: 256 training images, one epoch."),
                      scalings=("ew", "uw"), methods=("sum", "pcgrad", "sel_update")),
        ],
        seeds=[0, 1],
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every section")
    parser.add_argument("--only", nargs="+", metavar="STRATEGY", help="restrict cost and quality to these strategies")
    parser.add_argument("--device", default="cpu", help="device of the cost section: cpu or cuda[:i]")
    parser.add_argument("--out", type=Path, help="report folder (default docs/benchmarks; runs/... with --quick or --only)")
    parser.add_argument("--work-dir", type=Path, help="folder of the quality runs (default runs/benchmarks-work)")
    parser.add_argument("--repeats", type=int, help="timed repeats of each cost case")
    parser.add_argument("--cost-models", nargs="+", default=["cnn"], choices=["cnn", "resnet"])
    parser.add_argument("--side-models", nargs="+", choices=["cnn", "resnet"],
                        help="models of the libmtl section (resnet: ResNet-10 HPS, 4 tasks, batch 32)")
    parser.add_argument("--no-memory", action="store_true", help="libmtl section: skip the peak-memory runs")
    parser.add_argument("--seeds", nargs="+", type=int, help="training seeds of the quality section")
    parser.add_argument("--benchmarks", nargs="+", choices=["multidigits", "rooms", "composition", "text"],
                        help="quality benchmarks to run (composition: update methods x loss scaling on MultiDigits)")
    parser.add_argument("--workers", type=int, default=2, help="parallel training processes of the quality section")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--allocator", choices=("steady", "default"), default="steady",
                        help="steady: keep glibc's heap (no trim) in this process, for every section; "
                             "see benchmarks/allocator.py")
    parser.add_argument("--baselines", choices=["cache", "train"], default="cache",
                        help="single-task baselines from the cache (trained when missing) or retrained")
    parser.add_argument("--reuse-runs", action="store_true",
                        help="quality: read runs whose exact recipe (seed included) already finished in the work "
                             "folder, under any benchmark, instead of training them again")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: redraw the plots and README.md from the report folder's results.json "
                             "(and the quality runs' convergence from --work-dir where their logs are)")
    return parser


def log(message: str) -> None:
    print(message, flush=True)


def choose(names: Sequence[str], only: Sequence[str] | None) -> list[str]:
    return [n for n in names if only is None or n in only]


def cost_section(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import torch

    import mtl_plugins

    from . import cost
    from .measure import __doc__ as measure_doc

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    strategies = choose(settings.cost_strategies or mtl_plugins.available_strategies(), args.only)
    repeats = args.repeats or settings.cost_repeats
    models = {}
    for name in args.cost_models:
        setup = cost.SETUPS[name]()
        rows = cost.run_cost(setup, strategies, repeats, device, log=log)
        models[name] = {"description": f"{setup.description}, {device.type}", "rows": rows}
    memory_note = measure_doc.split("\n\n")[2].replace("\n", " ")
    return {"repeats": repeats, "device": str(device), "models": models, "memory_note": memory_note}


def side_by_side_section(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    import torch

    from . import cost, side_by_side

    device = torch.device(args.device)
    names = choose(settings.side_aggregators or side_by_side.AGGREGATORS, args.only)
    repeats = args.repeats or settings.side_repeats
    setups = {"cnn": cost.multidigits_setup, "resnet": lambda: cost.resnet_setup(num_tasks=4, batch_size=32,
                                                                                 num_batches=2)}
    models = {}
    for name in args.side_models or settings.side_models:
        setup = setups[name]()
        rows = side_by_side.run_side_by_side(setup, names, repeats, device, memory=not args.no_memory, log=log)
        models[name] = {"description": f"{setup.description}, {device.type}", "rows": rows,
                        "summary": side_by_side.summary(rows)}
    return {"repeats": repeats, "device": str(device), "models": models, "threads": args.threads,
            "description": side_by_side.__doc__.split("\n\n", 1)[1].strip()}


def scaling_section(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from . import scaling

    rows = scaling.run_scaling(settings.scaling_tasks, settings.scaling_repeats, settings.scaling_aggregators, log=log)
    return {"rows": rows, "description": scaling.__doc__.split("\n\n", 1)[1].strip()}


def quality_section(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from . import quality

    benchmarks = []
    for bench in settings.benchmarks:
        if args.benchmarks and bench.name not in args.benchmarks:
            continue
        strategies = tuple(choose(bench.strategies, args.only))
        if strategies:
            benchmarks.append(dataclasses.replace(bench, strategies=strategies))
    seeds = args.seeds or settings.seeds
    work_dir = args.work_dir or Path("runs/benchmarks-work")
    return {"summaries": quality.run_quality(benchmarks, seeds, work_dir, args.workers, args.threads,
                                             args.baselines, log=log, reuse=args.reuse_runs)}


RUNNERS = {"cost": cost_section, "libmtl": side_by_side_section, "scaling": scaling_section,
           "quality": quality_section}


def draw(name: str, section: dict[str, Any], out: Path) -> None:
    """Write the PNG plots of a measured section into ``out``, recording their file names in it."""
    from . import convergence, cost, quality, scaling

    if name == "cost":
        for model, entry in section["models"].items():
            entry["plot"] = cost.plot_cost(entry["rows"], out / f"cost_{model}.png", entry["description"]).name
    elif name == "libmtl":
        return
    elif name == "scaling":
        section["plot"] = scaling.plot_scaling(section["rows"], out / "scaling.png").name
    else:
        for summary in section["summaries"]:
            summary["plot"] = quality.plot_quality(summary, out / f"quality_{summary['benchmark']}.png").name
            affinity = quality.plot_affinity(summary, out / f"quality_{summary['benchmark']}_affinity.png")
            summary["affinity_plot"] = affinity.name if affinity is not None else None
            curves = convergence.plot_convergence(summary, out / f"quality_{summary['benchmark']}_convergence.png")
            summary["convergence_plot"] = curves.name if curves is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    import torch

    from . import allocator, environment, report

    torch.set_num_threads(args.threads)
    kept_heap = allocator.keep_heap() if args.allocator == "steady" else None
    settings = quick_settings() if args.quick else full_settings()
    out = args.out or (Path("runs/benchmarks-quick") if args.quick else Path("runs/benchmarks-only") if args.only else DOCS)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    env = environment.describe(args.device, args.threads, allocator.describe(kept_heap))
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"sections": {}}
    if args.render_only:
        if not results["sections"]:
            raise SystemExit(f"--render-only: no results in {results_path}")
        from . import quality

        for summary in results["sections"].get("quality", {}).get("summaries", []):
            quality.add_convergence(summary, args.work_dir or Path("runs/benchmarks-work"))
        for name, section in results["sections"].items():
            draw(name, section, out)
        results_path.write_text(json.dumps(results, indent=1))
        (out / "README.md").write_text(report.render(results))
        log(f"report written to {out / 'README.md'}")
        return 0
    results["environment"] = env
    for name in SECTIONS:
        if name not in args.sections:
            continue
        log(f"section {name}")
        started = time.perf_counter()
        section = RUNNERS[name](args, settings)
        draw(name, section, out)
        section.update(command=command, environment=env, wall_seconds=time.perf_counter() - started,
                       date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))
        if name == "quality" and args.benchmarks:  # the benchmarks not rerun keep their previous numbers
            kept = [s for s in results["sections"].get("quality", {}).get("summaries", [])
                    if s["benchmark"] not in args.benchmarks]
            section["summaries"] = kept + section["summaries"]
        results["sections"][name] = section
        results_path.write_text(json.dumps(results, indent=1))
        (out / "README.md").write_text(report.render(results))
    log(f"report written to {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
