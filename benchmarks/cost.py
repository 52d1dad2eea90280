"""Cost of one update of every strategy against its floor, on the same model and batches.

Each method is compared with the work it cannot avoid (its *floor*), timed on the same model,
optimizer and batches, alternating with it in the same process:

* one-pass weightings (``ew``, ``uw``, ``dwa``, ...): one EW step (forward, backward, step);
* the gradient aggregators and ``gradnorm`` (each task's gradient, one forward shared by every
  task): one forward pass, K backward passes through the retained graph (gradients accumulated)
  and one optimizer step;
* ``conn_strength`` Phase 2 (task-specific connections: one forward per task): K task
  forward+backward passes, gradients accumulated, and one optimizer step;
* ``conn_strength`` Phase 1: K task steps (forward, backward, step for each task);
* ``sel_update``: M x one EW step, M the number of group steps of the batch (K singleton groups
  during warm-up; the number of groups after it, 2 for a single group).

Ratios are medians of per-cycle ratios (:func:`benchmarks.measure.paired_ratio`). Every case also
reports its time over one EW step on the plain (hard-parameter-sharing) model, and its peak memory
(:func:`benchmarks.measure.peak_bytes`) next to the EW step's.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mtl_plugins
import mtl_plugins.strategies  # noqa: F401  (registers the built-ins)
from mtl_plugins.architectures.task_connections import connected_layers
from mtl_plugins.loop import make_closure
from mtl_plugins.registry import STRATEGIES

from .measure import alternate, paired_ratio, peak_bytes

Batch = dict[str, torch.Tensor]

FLOORS = {
    "ew_step": "1 EW step",
    "retained": "1 fwd + K retained bwd + 1 step",
    "task_passes": "K task fwd+bwd + 1 step",
    "task_steps": "K task steps",
    "group_steps": "M group steps x 1 EW step",
}

#: What explains a case's ratio, shown next to it in the report.
NOTES = {
    "sel_update (warm-up)": "a singleton group's step back-propagates into and updates one head only",
    "sel_update (grouped)": "adds one affinity-propagation clustering and the affinity updates per batch (see Scaling)",
    "famo": "one more forward pass (no gradient) per step: the losses after the update",
}


@dataclass
class Setup:
    """A model (a fresh copy per case), its tasks and the batches every case runs on."""

    name: str
    description: str
    tasks: list[str]
    model: nn.Module
    batches: list[Batch]


def multidigits_setup(batch_size: int = 64, num_batches: int = 8) -> Setup:
    """The quickstart model (MultiDigits CNN, width 32) and real MultiDigits batches."""
    from mtl_plugins.data import build_data
    from mtl_plugins.models import build_model

    data = build_data("multidigits", train_size=batch_size * num_batches, eval_size=10, seed=0)
    torch.manual_seed(0)
    model = build_model("multidigits_cnn", data.tasks, data.task_specs, width=32)
    batches = [data.train[i * batch_size : (i + 1) * batch_size] for i in range(num_batches)]
    params = sum(p.numel() for p in model.parameters())
    return Setup("cnn", f"quickstart MultiDigits CNN (width 32, {params:,} parameters), 5 tasks, batch {batch_size}",
                 list(data.tasks), model, batches)


class PooledResNet(nn.Module):
    """A Hugging Face ResNet-10 (random init, basic blocks, widths 32-256) returning pooled features."""

    def __init__(self):
        super().__init__()
        import transformers

        config = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                           layer_type="basic")
        self.resnet = transformers.ResNetModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x).pooler_output.flatten(1)


def resnet_setup(num_tasks: int = 5, batch_size: int = 16, num_batches: int = 4) -> Setup:
    """HPS over a small transformers ResNet-10 with 10-class heads; random 3x64x64 images."""
    from mtl_plugins.architectures import HPS

    tasks = [f"t{k}" for k in range(num_tasks)]
    torch.manual_seed(0)
    model = HPS(tasks, encoder=PooledResNet(), heads={t: nn.Linear(256, 10) for t in tasks})
    generator = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(batch_size, 3, 64, 64, generator=generator),
                **{t: torch.randint(0, 10, (batch_size,), generator=generator) for t in tasks}}
               for _ in range(num_batches)]
    params = sum(p.numel() for p in model.parameters())
    return Setup("resnet", f"transformers ResNet-10 HPS ({params:,} parameters), {num_tasks} tasks, batch {batch_size}",
                 tasks, model, batches)


SETUPS: dict[str, Callable[[], Setup]] = {"cnn": multidigits_setup, "resnet": resnet_setup}


@dataclass(frozen=True)
class Case:
    """One measured configuration of a strategy; ``floor=None`` picks it from the strategy."""

    label: str
    strategy: str
    options: Mapping[str, Any] = field(default_factory=dict)
    floor: str | None = None
    pre_steps: int = 0


def cases_for(strategy: str, grouped_after: int = 10) -> list[Case]:
    """The cases of one strategy: two phases each for ``sel_update`` and ``conn_strength``."""
    if strategy == "sel_update":
        return [Case("sel_update (warm-up)", strategy, {"warmup_steps": 10**9}, "group_steps"),
                Case("sel_update (grouped)", strategy, {"warmup_steps": grouped_after}, "group_steps",
                     pre_steps=grouped_after + 1)]
    if strategy == "dwa":  # two-batch epochs: the timed steps use DWA's weights, not the first epochs' ones
        return [Case("dwa", strategy, {"steps_per_epoch": 2})]
    if strategy == "conn_strength":
        return [Case("conn_strength (Phase 2)", strategy, {"schedule": "phase2"}, "task_passes"),
                Case("conn_strength (Phase 1)", strategy, {"schedule": "phase1"}, "task_steps")]
    return [Case(strategy, strategy)]


def retained_passes(closure, optimizer: torch.optim.Optimizer, tasks: Sequence[str]) -> None:
    """One forward pass, K task backward passes through the retained graph (gradients summed), one step."""
    optimizer.zero_grad(set_to_none=True)
    losses = closure()
    for k, t in enumerate(tasks):
        losses[t].backward(retain_graph=k < len(tasks) - 1)
    optimizer.step()


def task_passes(closure, optimizer: torch.optim.Optimizer, tasks: Sequence[str]) -> None:
    """K task forward+backward passes (gradients summed) and one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    for t in tasks:
        closure(t)[t].backward()
    optimizer.step()


def task_steps(closure, optimizer: torch.optim.Optimizer, tasks: Sequence[str]) -> None:
    """One forward, backward and optimizer step per task."""
    for t in tasks:
        optimizer.zero_grad(set_to_none=True)
        closure(t)[t].backward()
        optimizer.step()


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def measure_case(case: Case, setup: Setup, repeats: int, device: torch.device, memory: bool = True) -> dict[str, Any]:
    """Median time per batch of ``case`` and of its floor and of an EW step, their ratios, peak memory."""
    tasks = setup.tasks
    batches = [to_device(b, device) for b in setup.batches]
    plain = copy.deepcopy(setup.model).to(device).train()
    model = plain
    connections = STRATEGIES.get(case.strategy).needs_task_connections
    if connections:
        model = copy.deepcopy(setup.model)
        mtl_plugins.build_architecture("task_connections", tasks, model=model)
        model = model.to(device).train()
    options = dict(case.options)
    if "model" in STRATEGIES.accepted_options(case.strategy):
        options["model"] = model
    strategy = mtl_plugins.build_strategy(case.strategy, tasks, **options)
    floor = case.floor or ("ew_step" if not strategy.needs_task_forward
                           else "task_passes" if connections else "retained")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    plain_optimizer = optimizer if plain is model else torch.optim.Adam(plain.parameters(), lr=1e-4)
    closures = [make_closure(model, b) for b in batches]
    plain_closures = [make_closure(plain, b) for b in batches]
    ew = mtl_plugins.build_strategy("ew", tasks)

    def group_steps() -> int:
        return len(strategy.history[-1]["order"]) if case.strategy == "sel_update" else 1

    def method(i: int) -> int:
        strategy.step(closures[i % len(closures)], optimizer)
        return group_steps()

    runs: dict[str, Callable[[int], Any]] = {
        "method": method,
        "ew": lambda i: ew.step(plain_closures[i % len(plain_closures)], plain_optimizer),
    }
    if floor == "retained":
        runs["floor"] = lambda i: retained_passes(closures[i % len(closures)], optimizer, tasks)
    elif floor == "task_passes":
        runs["floor"] = lambda i: task_passes(closures[i % len(closures)], optimizer, tasks)
    elif floor == "task_steps":
        runs["floor"] = lambda i: task_steps(closures[i % len(closures)], optimizer, tasks)
    for i in range(case.pre_steps):
        method(i)
    samples = alternate(runs, repeats, device)
    method_s, ew_s = samples["method"], samples["ew"]
    if floor in ("ew_step", "group_steps"):
        units = [float(u) if floor == "group_steps" else 1.0 for u in method_s.values]
        floor_wall = [u * t for u, t in zip(units, ew_s.wall)]
        floor_cpu = [u * t for u, t in zip(units, ew_s.cpu)]
    else:
        floor_wall, floor_cpu = samples["floor"].wall, samples["floor"].cpu
    row: dict[str, Any] = {
        "label": case.label, "strategy": case.strategy, "floor": FLOORS[floor], "tasks": len(tasks),
        "ms": 1e3 * method_s.median_wall, "floor_ms": 1e3 * statistics.median(floor_wall),
        "ew_ms": 1e3 * ew_s.median_wall,
        "ratio": paired_ratio(method_s.wall, floor_wall),
        "cpu_ratio": paired_ratio(method_s.cpu, floor_cpu),
        "ratio_ew": paired_ratio(method_s.wall, ew_s.wall),
        "cpu_ratio_ew": paired_ratio(method_s.cpu, ew_s.cpu),
        "repeats": repeats,
    }
    if case.strategy == "sel_update":
        row["group_steps"] = statistics.median(method_s.values)
    if connections:
        copies = sum(layer.weight.numel() * layer.weight.element_size() for layer in connected_layers(model))
        row["note"] = f"K copies of connected-layer gradients: {len(tasks) * copies / 2**20:.2f} MiB"
    if memory:
        step = repeats + 2
        row["peak_mib"] = peak_bytes(lambda: method(step), device) / 2**20
        row["ew_peak_mib"] = peak_bytes(lambda: runs["ew"](step), device) / 2**20
    return row


def run_cost(setup: Setup, strategies: Sequence[str], repeats: int, device: torch.device, memory: bool = True,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per case of every strategy in ``strategies``, on ``setup``."""
    rows = []
    for name in strategies:
        for case in cases_for(name):
            row = measure_case(case, setup, repeats, device, memory)
            log(f"  cost {setup.name} {case.label}: {row['ms']:.1f} ms, x{row['ratio']:.2f} floor, "
                f"x{row['ratio_ew']:.2f} EW")
            rows.append({"model": setup.name, **row})
    return rows


def ordered(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows grouped by floor (in the order of :data:`FLOORS`), then by label."""
    floors = list(FLOORS.values())
    return sorted(rows, key=lambda r: (floors.index(r["floor"]), r["label"]))


def plot_cost(rows: Sequence[Mapping[str, Any]], path: Path, title: str) -> Path:
    """Two horizontal bar panels: time over the floor, and time over one EW step."""
    from mtl_plugins.plots import _pyplot

    plt = _pyplot()
    rows = ordered(rows)
    labels = [r["label"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.6 + 0.28 * len(rows)), sharey=True)
    colors = dict(zip(FLOORS.values(), ("tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:red")))
    for ax, key, xlabel in ((axes[0], "ratio", "time / floor"), (axes[1], "ratio_ew", "time / EW step")):
        ax.barh(range(len(rows)), [r[key] for r in rows], color=[colors[r["floor"]] for r in rows])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel(xlabel)
    used = [f for f in colors if any(r["floor"] == f for r in rows)]
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[f]) for f in used], used, title="floor", fontsize=8,
               loc="lower center", ncol=len(used))
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12 if len(rows) < 10 else 0.08, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
