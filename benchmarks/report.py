"""The Markdown report (``README.md``) rendered from the runner's ``results.json``."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .composition import render_grid
from .convergence import render_convergence
from .cost import FLOORS, NOTES, ordered

SECTION_ORDER = ("cost", "libmtl", "scaling", "quality")


def num(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def pm(pair: Sequence[float] | None, digits: int = 3) -> str:
    return "n/a" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def provenance(section: Mapping[str, Any]) -> str:
    return f"_Measured {section['date']} by `{section['command']}` ({duration(section['wall_seconds'])})._"


# -- headline --------------------------------------------------------------------------------------
#: Cost cases quoted in the headline, with how they are introduced.
HEADLINE_CASES = {
    "sel_update (grouped)": "`sel_update` batch after warm-up",
    "sel_update (warm-up)": "`sel_update` batch during warm-up",
    "conn_strength (Phase 2)": "`conn_strength` Phase 2",
    "conn_strength (Phase 1)": "`conn_strength` Phase 1",
}


def cost_headline(section: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, model in section["models"].items():
        rows = {r["label"]: r for r in model["rows"]}
        for label, text in HEADLINE_CASES.items():
            if label in rows:
                r = rows[label]
                lines.append(f"{text} ({name}): **{r['ratio']:.2f}x** its floor ({r['floor']}; thread CPU time "
                             f"{r['cpu_ratio']:.2f}x), {r['ratio_ew']:.2f}x one EW step.")
        gradient = [r for r in model["rows"] if r["floor"] == FLOORS["retained"]]
        if gradient:
            lines.append(f"Methods that need per-task gradients on {name} ({len(gradient)}: the aggregators and "
                         f"`gradnorm`): median **{statistics.median(r['ratio'] for r in gradient):.2f}x** "
                         f"their floor ({FLOORS['retained']}), "
                         f"{statistics.median(r['ratio_ew'] for r in gradient):.2f}x one EW step.")
        weightings = [r for r in model["rows"] if r["floor"] == FLOORS["ew_step"] and r["strategy"] != "ew"]
        if weightings:
            ratio = statistics.median(r["ratio"] for r in weightings)
            lines.append(f"Loss weightings on {name} ({len(weightings)} methods): median **{ratio:.2f}x** "
                         f"one EW step.")
    return lines


def scaling_headline(section: Mapping[str, Any]) -> list[str]:
    rows = section["rows"]
    last = rows[-1]
    line = (f"`sel_update` bookkeeping at K = {last['tasks']}: **{last['bookkeeping_ms']:.1f} ms** per batch "
            f"(clustering {last['clustering_ms']:.1f} ms + affinity update {last['affinity_update_ms']:.1f} ms), "
            f"{last['bookkeeping_x_ew']:.2f}x one EW step of the quickstart CNN; planted clusters recovered exactly ")
    failing = [r for r in rows if r["exact"] < 1.0]
    if not failing:
        return [line + f"for every K = {rows[0]['tasks']}..{last['tasks']}."]
    stable = [r["tasks"] for r in rows if r["tasks"] > max(f["tasks"] for f in failing)]
    shares = ", ".join(f"{100 * r['exact']:.0f}% at K = {r['tasks']}" for r in failing)
    tail = f"for every K >= {stable[0]}, " if stable else ""
    return [line + f"{tail}{shares}."]


def quality_headline(section: Mapping[str, Any]) -> list[str]:
    lines = []
    for summary in section["summaries"]:
        entries = {n: e for n, e in summary["strategies"].items() if e["delta_m"] is not None}
        if not entries:
            continue
        best = max(entries, key=lambda n: entries[n]["delta_m"][0])
        shown = [n for n in ("ew", "sel_update", "conn_strength") if n in entries]
        parts = ", ".join(f"`{n}` {pm(entries[n]['delta_m'], 2)}" for n in shown)
        lines.append(f"{summary['benchmark']} Delta_m (%, mean ± 95% CI, {len(summary['seeds'])} seeds): {parts}; "
                     f"best `{best}` {pm(entries[best]['delta_m'], 2)}.")
        lines += [f"{summary['benchmark']}: `{r['method']}` vs `{r['against']}`: {r['verdict']}."
                  for r in summary.get("verdicts", [])]
    return lines


def side_by_side_headline(section: Mapping[str, Any]) -> list[str]:
    lines = []
    for name, model in section["models"].items():
        s = model["summary"]
        lines.append(f"Gradient aggregators on {name}, side by side with LibMTL's work: median **{s['median_x_libmtl']:.2f}x** "
                     f"the LibMTL-style step, {s['median_x_floor']:.2f}x (at most {s['max_x_floor']:.2f}x) one forward "
                     "+ K retained backwards + one step.")
    return lines


HEADLINES = {"libmtl": side_by_side_headline, "cost": cost_headline, "scaling": scaling_headline, "quality": quality_headline}


# -- sections --------------------------------------------------------------------------------------
def render_cost(section: Mapping[str, Any]) -> str:
    parts = ["## Cost per batch against the floor", "", provenance(section), "",
             "Every case runs on the same model, optimizer and batches as its floor and as one EW step, "
             f"alternating with them in one process, {section['repeats']} timed cycles. Times are medians; "
             "ratios are medians of the per-cycle ratios (the runs of one cycle share the machine's load, "
             "and M can change from batch to batch). The floor is "
             "the work the method cannot avoid: one EW step (forward, backward, step) for loss weightings; "
             "one forward, K backward passes through the retained graph (gradients accumulated) and one step "
             "for the gradient aggregators and `gradnorm`; K task forward+backward passes and one step for "
             "`conn_strength` Phase 2 (one forward per task through its task-specific connections); K task steps "
             "for `conn_strength` Phase 1; M group steps x one EW step for `sel_update` (M = K singleton "
             "groups during warm-up, the number of groups after it, 2 for a single group). 'x floor' "
             "is the wall-clock ratio, 'CPU' the same ratio in the calling thread's CPU time "
             "(`time.thread_time`, steadier on a shared machine). 'x EW' compares with one EW step on the "
             "plain model. " + section["memory_note"], ""]
    for model in section["models"].values():
        parts += [f"### {model['description']}", ""]
        header = ["case", "floor", "ms/batch", "floor ms", "x floor", "x floor (CPU)", "x EW", "peak MiB",
                  "EW peak MiB", "notes"]
        rows = []
        for r in ordered(model["rows"]):
            notes = [NOTES.get(r["label"], ""), r.get("note", "")]
            if "group_steps" in r:
                notes.insert(0, f"M = {r['group_steps']:g}")
            rows.append([r["label"], r["floor"], num(r["ms"], 1), num(r["floor_ms"], 1), f"**{r['ratio']:.2f}**",
                         num(r["cpu_ratio"]), num(r["ratio_ew"]), num(r.get("peak_mib"), 1),
                         num(r.get("ew_peak_mib"), 1), "; ".join(n for n in notes if n)])
        parts += [table(header, rows), "", f"![cost ratios]({model['plot']})", ""]
    return "\n".join(parts)


def render_scaling(section: Mapping[str, Any]) -> str:
    rows = section["rows"]
    aggregators = sorted(k[len("aggregate/"): -len("_ms")] for k in rows[0]
                         if k.startswith("aggregate/") and k.endswith("_ms") and not k.endswith("_cpu_ms"))
    parts = ["## Scaling with the number of tasks", "", provenance(section), "", section["description"], "",
             table(["K", "planted", "groups found (min-max)", "exact recovery", "ARI", "clustering ms",
                    "affinity update ms", "bookkeeping x EW", "conn_strength projection ms"],
                   [[r["tasks"], r["planted"], f"{r['groups_found']:g} ({r['min_groups']}-{r['max_groups']})",
                     f"{100 * r['exact']:.0f}%", num(r["ari"]), num(r["clustering_ms"]), num(r["affinity_update_ms"]),
                     num(r["bookkeeping_x_ew"], 3), num(r["projection_ms"])] for r in rows]), ""]
    if aggregators:
        parts += ["Aggregation step of the gradient methods (ms, median; K x 100,000 Jacobian):", "",
                  table(["K", *aggregators], [[r["tasks"], *(num(r[f"aggregate/{a}_ms"], 1) for a in aggregators)]
                                              for r in rows]), ""]
    counterparts = sorted(k[len("torchjd/"): -len("_ms")] for k in rows[0]
                          if k.startswith("torchjd/") and k.endswith("_ms") and not k.endswith("_cpu_ms"))
    if counterparts:
        parts += ["Against torchjd's aggregator for the same method, on the same float32 matrices (ms, median; "
                  "x torchjd: this library's time over torchjd's; torchjd computes the Gramian and the weights "
                  "in float32, this library in float64):", "",
                  table(["K", *(f"{a} {col}" for a in counterparts for col in ("ms", "torchjd ms", "x torchjd"))],
                        [[r["tasks"], *(v for a in counterparts for v in (
                            num(r[f"aggregate/{a}_ms"], 1), num(r[f"torchjd/{a}_ms"], 1),
                            num(r[f"aggregate/{a}_ms"] / r[f"torchjd/{a}_ms"])))] for r in rows]), ""]
    parts += [f"![scaling]({section['plot']})", ""]
    return "\n".join(parts)


def render_benchmark(summary: Mapping[str, Any]) -> str:
    strategies = summary["strategies"]
    if not strategies:
        return "\n".join([f"### {summary['benchmark']}", "", "No run finished.", "",
                          *(f"* {f}" for f in summary.get("failures", [])), ""])
    metrics = list(next(iter(strategies.values()))["metrics"])
    override = f" with `{' '.join(summary['overrides'])}`" if summary["overrides"] else ""
    seeds = ", ".join(str(s) for s in summary["seeds"])
    base_seeds = ", ".join(str(s) for s in summary["baseline_seeds"]) or "none"
    parts = [f"### {summary['benchmark']}", "",
             f"Recipe `{summary['recipe']}`{override}; training seeds {seeds}; single-task baselines from seeds "
             f"{base_seeds}. Metrics: mean ± standard deviation over seeds. Delta_m in % (higher is better): "
             "mean ± half width of the 95% confidence interval (t-distribution, n - 1 degrees of freedom); "
             "'vs ew': the per-seed paired difference of Delta_m to `ew` (same seeds, same data order), "
             "mean ± 95% CI.", ""]
    if summary.get("note"):
        parts += [summary["note"], ""]
    if summary.get("reused_runs"):
        parts += [f"{summary['reused_runs']} of these runs were read from identical finished runs (same recipe, options "
                  "and seed) in the same work folder (`--reuse-runs`) instead of being trained again; the wall time above "
                  "counts only what this command trained.", ""]
    if summary.get("failures"):
        parts += ["Failed runs (left out of the means):", "", *(f"* {f}" for f in summary["failures"]), ""]
    rows = []
    if summary.get("single_task"):
        rows.append(["single-task", *(pm(summary["single_task"].get(m)) for m in metrics), "0 (reference)", "", ""])
    order = sorted(strategies, key=lambda n: -(strategies[n]["delta_m"] or (float("-inf"), 0))[0])
    for name in order:
        e = strategies[name]
        paired = e.get("vs_ew")
        rows.append([f"`{name}`", *(pm(e["metrics"][m]) for m in metrics), f"**{pm(e['delta_m'], 2)}**",
                     pm((paired["mean"], paired["half_width"]), 2) if paired else "", num(e["ms_per_batch"], 0)])
    parts += [table(["strategy", *metrics, "Delta_m (%)", "vs ew", "ms/batch"], rows), ""]
    for row in summary.get("verdicts", []):
        d = row["difference"]
        interval = (f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] over seeds {d['seeds']}" if d
                    else "n/a")
        parts.append(f"* `{row['method']}` vs `{row['against']}`: paired Delta_m difference {interval}: "
                     f"**{row['verdict']}**.")
    parts += [""] if summary.get("verdicts") else []
    same = identical_to_ew(strategies)
    parts += [f"`{name}` gives exactly the results of `ew` on every seed{IDENTICAL_TO_EW.get(name, '')}." for name in same]
    parts += [""] if same else []
    for key, alt in (("plot", "Delta_m"), ("affinity_plot", "sel_update affinity"),
                     ("convergence_plot", "validation convergence")):
        if summary.get(key):
            parts += [f"![{alt}]({summary[key]})", ""]
    parts += render_convergence(summary)
    parts += render_grid(summary)
    parts += render_groups(strategies.get("sel_update"), metrics)
    parts += render_priority(strategies.get("conn_strength"), metrics)
    return "\n".join(parts)


#: Why a strategy can coincide with ``ew``, for the strategies where it is known.
IDENTICAL_TO_EW = {"dwa": ": DWA keeps every weight at 1 during the first two epochs, and the recipe trains two"}


def identical_to_ew(strategies: Mapping[str, Any]) -> list[str]:
    """Strategies whose test metrics equal ``ew``'s on every seed."""
    if "ew" not in strategies:
        return []
    ew = {r["seed"]: r["metrics"] for r in strategies["ew"]["runs"]}
    return [name for name, e in strategies.items()
            if name != "ew" and all(ew.get(r["seed"]) == r["metrics"] for r in e["runs"])]


def render_groups(entry: Mapping[str, Any] | None, metrics: Sequence[str]) -> list[str]:
    if not entry:
        return []
    rows = []
    for run in entry["runs"]:
        extras = run["extras"]
        groups = " ".join("{" + ", ".join(g) + "}" for g in extras["groups"])
        changes = extras["group_count_changes"]
        counts = ", ".join(f"{n} from batch {s}" for s, n in changes[-4:])
        rows.append([run["seed"], groups, counts, extras["clustering_failures"]])
    return ["`sel_update`'s groups at the end of training, and the latest changes of their number:", "",
            table(["seed", "final groups", "number of groups", "clustering failures"], rows), ""]


def render_priority(entry: Mapping[str, Any] | None, metrics: Sequence[str]) -> list[str]:
    if not entry:
        return []
    tasks = [m.split("/")[0] for m in metrics]
    runs = [r for r in entry["runs"] if r["extras"].get("priority")]
    if not runs:
        return []
    shares = [[r["extras"]["priority"][k] for r in runs] for k in range(len(tasks))]
    phase2 = [r["extras"]["phase2_fraction"] for r in runs]
    row = [*(pm((statistics.fmean(s), statistics.stdev(s) if len(s) > 1 else 0.0), 2) for s in shares),
           pm((statistics.fmean(phase2), statistics.stdev(phase2) if len(phase2) > 1 else 0.0), 2)]
    steps = sorted({r["extras"]["priority_step"] for r in runs})
    return [f"`conn_strength`'s task priority at the last logged step ({', '.join(map(str, steps))}): share of "
            "the connected channels whose top-priority task is each task (all connected layers), and the share "
            "of Phase-2 batches over training:", "",
            table([*tasks, "Phase-2 share"], [row]), ""]


def render_quality(section: Mapping[str, Any]) -> str:
    parts = ["## Quality against single-task models", "", provenance(section), "",
             "Each run trains the recipe with one strategy (same data, model and training options; "
             "`conn_strength` on the recipe's model with task-specific connections) and reports the test "
             "metrics; Delta_m is the mean relative change against single-task models trained with the same "
             "recipe on one task each (`ew`). 'ms/batch' is the training time per batch of the run (the "
             "Trainer's loop, single-threaded, with other runs in parallel: a rough figure; see the cost "
             "section for controlled ratios).", ""]
    for summary in section["summaries"]:
        parts += [render_benchmark(summary)]
    return "\n".join(parts)


def interval(bounds: Sequence[float] | None) -> str:
    """``low-high`` with two decimals; empty for a missing interval or nan bounds (too few cycles)."""
    if not bounds or any(math.isnan(b) for b in bounds):
        return ""
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def render_side_by_side(section: Mapping[str, Any]) -> str:
    parts = ["## Side by side with LibMTL's gradient weightings", "", provenance(section), "",
             section["description"].replace("\n", " "), "",
             f"{section['repeats']} timed cycles, torch threads: {section.get('threads', '?')}. 'x LibMTL' and "
             "'x floor' are medians of per-cycle wall-clock ratios, 'x floor 95% CI' the distribution-free "
             "interval of that median (order statistics); peak memory as in the cost section.", ""]
    for model in section["models"].values():
        parts += [f"### {model['description']}", ""]
        header = ["aggregator", "options", "ms/batch", "LibMTL-style ms", "floor ms", "x LibMTL", "x floor",
                  "x floor 95% CI", "LibMTL-style x floor", "peak MiB", "LibMTL-style peak MiB"]
        rows = [[r["strategy"], r["label"], num(r["ours_ms"], 1), num(r["libmtl_ms"], 1), num(r["floor_ms"], 1),
                 f"**{r['x_libmtl']:.2f}**", f"**{r['x_floor']:.2f}**", interval(r.get("x_floor_ci")),
                 num(r["libmtl_x_floor"]),
                 num(r.get("ours_peak_mib"), 1), num(r.get("libmtl_peak_mib"), 1)] for r in model["rows"]]
        parts += [table(header, rows), ""]
    return "\n".join(parts)


RENDERERS = {"libmtl": render_side_by_side, "cost": render_cost, "scaling": render_scaling, "quality": render_quality}


def render(results: Mapping[str, Any]) -> str:
    """The whole report: machine and versions, headline numbers, each measured section, commands."""
    sections = results["sections"]
    environment = results["environment"]
    parts = ["# Benchmarks", "",
             "Regenerated by `python -m benchmarks.run` (see [Reproducing](#reproducing)); raw numbers in "
             "[`results.json`](results.json).", "",
             "## Machine and versions", "",
             table(["", ""], [[k, f"`{v}`" if k not in ("cores", "torch threads") else v] for k, v in environment.items()]),
             ""]
    differing = [name for name in SECTION_ORDER if name in sections and sections[name]["environment"] != environment]
    if differing:
        parts += [f"Sections {', '.join(differing)} were measured in another run; their environment is in "
                  "`results.json`.", ""]
    headline = [line for name in SECTION_ORDER if name in sections for line in HEADLINES[name](sections[name])]
    if headline:
        parts += ["## Headline numbers", "", *(f"* {line}" for line in headline), ""]
    parts += [RENDERERS[name](sections[name]) for name in SECTION_ORDER if name in sections]
    seconds: dict[str, float] = {}
    for name in SECTION_ORDER:
        if name in sections:
            command = sections[name]["command"]
            seconds[command] = seconds.get(command, 0.0) + sections[name]["wall_seconds"]
    parts += ["## Reproducing", "",
              "```bash", *(f"{command}  # {duration(s)}" for command, s in seconds.items()), "```", "",
              "`--sections cost scaling quality` selects sections (the others keep their previous numbers), "
              "`--device cuda` times the cost section on a GPU, `--only NAME ...` restricts the strategies and "
              "`--quick` is a smoke run of every section (both write to `runs/` unless `--out` is given). "
              "The cost of the two papers' methods alone, on the quickstart CNN and on a transformers "
              "ResNet-10, with more repeats:", "",
              "```bash",
              "python -m benchmarks.run --sections cost --only sel_update conn_strength --cost-models cnn resnet --repeats 40",
              "```", "",
              "Run `python -m benchmarks.run --help` for every option.", ""]
    return "\n".join(parts)
