"""Per-batch cost of ``sel_update`` against its floor: one EW step per group step.

A ``sel_update`` batch makes M sequential group steps (forward, backward of the group loss, optimizer
step), M = the number of groups (K during warm-up, 2 for a single group), plus its bookkeeping and,
after warm-up, one affinity-propagation clustering. On the same model and batch, alternating, the
script times one ``ew`` step and one ``sel_update`` batch and reports the median over batches of

    ratio = time(sel_update batch) / (M x time(ew step))          target <= 1.05

for warm-up and post-warm-up batches separately, with the median clustering time.

    OMP_NUM_THREADS=1 python benchmarks/bench_sel_update.py [--batches 60] [--warmup-steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import mtl_plugins
from mtl_plugins.data.multidigits import TASKS as SPECS
from mtl_plugins.data.multidigits import load_multidigits
from mtl_plugins.loop import make_closure
from mtl_plugins.models import multidigits_cnn
from mtl_plugins.strategies import sel_update


def quickstart_batches(count: int, batch_size: int, tasks: list[str]) -> list[dict[str, torch.Tensor]]:
    data = load_multidigits("train", size=count * batch_size, seed=0, tasks=tasks)
    return [data[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tasks = list(SPECS)
    model = multidigits_cnn(tasks, SPECS, width=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    ew = mtl_plugins.build_strategy("ew", tasks)
    sel = mtl_plugins.build_strategy("sel_update", tasks, warmup_steps=args.warmup_steps, affinity_decay=0.01)
    batches = quickstart_batches(args.batches, args.batch_size, tasks)

    clustering: list[float] = []
    choose = sel_update.choose_groups

    def timed_choose(*a, **k):
        start = time.perf_counter()
        result = choose(*a, **k)
        clustering.append(time.perf_counter() - start)
        return result

    sel_update.choose_groups = timed_choose
    for batch in batches[:3]:  # warm the allocator and the kernels
        ew.step(make_closure(model, batch), optimizer)

    rows = {"warmup": [], "grouped": []}
    model.train()
    for i, batch in enumerate(batches):
        closure = make_closure(model, batch)
        phase = "warmup" if sel.num_steps <= sel.warmup_steps else "grouped"
        t_ew = timed(lambda c=closure: ew.step(c, optimizer))
        t_sel = timed(lambda c=closure: sel.step(c, optimizer))
        steps = len(sel.history[-1]["order"])
        rows[phase].append((t_sel / (steps * t_ew), steps, t_ew, t_sel))
    sel_update.choose_groups = choose

    report = {}
    for phase, values in rows.items():
        if not values:
            continue
        ratios = [r[0] for r in values]
        report[phase] = {
            "batches": len(values),
            "median_ratio": round(statistics.median(ratios), 3),
            "median_group_steps": statistics.median(r[1] for r in values),
            "median_ew_step_ms": round(1e3 * statistics.median(r[2] for r in values), 2),
            "median_sel_batch_ms": round(1e3 * statistics.median(r[3] for r in values), 2),
        }
    report["median_clustering_ms"] = round(1e3 * statistics.median(clustering), 2) if clustering else None
    report["final_groups"] = sel.groups
    print(json.dumps(report, indent=2))
    grouped = report.get("grouped", report.get("warmup"))
    print(f"ratio sel_update batch / (group steps x EW step): {grouped['median_ratio']:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
