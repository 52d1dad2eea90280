"""Phase-2 cost of ``conn_strength`` against its floor: K task forward+backward passes and one step.

For each model, both updates run on the same model and batch, alternating, and the script reports
the median time per batch over repeats and their ratio (target <= 1.10), in wall-clock time and in
the thread's CPU time (steadier on a shared machine; run with one thread), and peak CPU memory of one
update from the torch profiler's memory timeline (with the size of the per-task gradient copies the
method needs: K x the connected layers' weights).

    OMP_NUM_THREADS=1 python benchmarks/bench_conn_strength.py [--repeats 40] [--models cnn resnet]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import mtl_plugins
from mtl_plugins.architectures import HPS
from mtl_plugins.architectures.task_connections import connected_layers
from mtl_plugins.loop import make_closure


def multidigits_model(tasks: list[str]) -> tuple[nn.Module, dict]:
    """The quickstart model (MultiDigits CNN, width 32) with a batch of 64."""
    from mtl_plugins.data.multidigits import TASKS as SPECS
    from mtl_plugins.models import multidigits_cnn

    model = multidigits_cnn(tasks, SPECS, width=32)
    batch = {"pixel_values": torch.randn(64, 1, 12, 20)}
    for t in tasks:
        spec = SPECS[t]
        batch[t] = torch.randint(0, spec.num_outputs, (64,)) if spec.loss == "cross_entropy" else torch.rand(64)
    return model, batch


class PooledResNet(nn.Module):
    """A Hugging Face ResNet (random init) returning pooled features."""

    def __init__(self):
        super().__init__()
        import transformers

        config = transformers.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                                           layer_type="basic")
        self.resnet = transformers.ResNetModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x).pooler_output.flatten(1)


def resnet_model(tasks: list[str]) -> tuple[nn.Module, dict]:
    """HPS over a small transformers ResNet-10, 10-class heads, batch of 16 images 3x64x64."""
    heads = {t: nn.Linear(256, 10) for t in tasks}
    model = HPS(tasks, encoder=PooledResNet(), heads=heads)
    batch = {"pixel_values": torch.randn(16, 3, 64, 64), **{t: torch.randint(0, 10, (16,)) for t in tasks}}
    return model, batch


MODELS = {"cnn": multidigits_model, "resnet": resnet_model}


def floor_step(closure, optimizer, tasks) -> None:
    """K forward+backward passes (gradients summed) and one optimizer step: what Phase 2 cannot avoid."""
    optimizer.zero_grad(set_to_none=True)
    for t in tasks:
        closure(t)[t].backward()
    optimizer.step()


def peak_bytes(run) -> int:
    """Peak CPU memory (bytes, all categories) during ``run()``, from the profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(row) for row in sizes)


def bench(name: str, repeats: int, num_tasks: int) -> dict:
    tasks = [f"t{k}" for k in range(num_tasks)] if name == "resnet" else ["left", "right", "left_odd", "right_large", "sum"][:num_tasks]
    torch.manual_seed(0)
    model, batch = MODELS[name](tasks)
    mtl_plugins.build_architecture("task_connections", tasks, model=model)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    strategy = mtl_plugins.build_strategy("conn_strength", tasks, model=model, schedule="phase2")
    closure = make_closure(model, batch)
    runs = {"phase2": lambda: strategy.step(closure, optimizer), "floor": lambda: floor_step(closure, optimizer, tasks)}
    for run in runs.values():  # warm-up (allocations, optimizer state)
        for _ in range(3):
            run()
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            start, start_cpu = time.perf_counter(), time.thread_time()
            run()
            cpu[key].append(time.thread_time() - start_cpu)
            wall[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in wall.items()}
    cpu_medians = {k: statistics.median(v) for k, v in cpu.items()}
    peaks = {k: peak_bytes(run) for k, run in runs.items()}
    connected = sum(layer.weight.numel() * layer.weight.element_size() for layer in connected_layers(model))
    return {
        "model": name, "tasks": num_tasks, "params": sum(p.numel() for p in model.parameters()),
        "connected_layers": len(connected_layers(model)),
        "phase2_ms": round(1e3 * medians["phase2"], 2), "floor_ms": round(1e3 * medians["floor"], 2),
        "ratio": round(medians["phase2"] / medians["floor"], 3),
        "cpu_phase2_ms": round(1e3 * cpu_medians["phase2"], 2), "cpu_floor_ms": round(1e3 * cpu_medians["floor"], 2),
        "cpu_ratio": round(cpu_medians["phase2"] / cpu_medians["floor"], 3),
        "peak_MiB": {k: round(v / 2**20, 2) for k, v in peaks.items()},
        "per_task_copies_MiB": round(num_tasks * connected / 2**20, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        print(json.dumps(bench(name, args.repeats, args.tasks)))


if __name__ == "__main__":
    main()
