"""Timing and peak memory of updates, shared by every section.

Timing alternates the compared runs inside one process (cycle ``i`` runs each of them once, in an
order rotated by ``i``) so that load from other processes hits all of them alike, and reports
medians. Each sample has the wall-clock time and the calling thread's CPU time
(:func:`time.thread_time`, steadier on a shared machine when torch runs one thread). On CUDA the
device is synchronised before and after each run. On CPU the runner keeps glibc's heap while it
times (:mod:`benchmarks.allocator`), so that no run pays page faults for memory its neighbour freed.

Peak memory is, on CPU, the largest total size of the torch tensors alive during one run (parameters,
gradients, optimizer state, activations, temporaries), from the torch profiler's memory timeline; it
does not count the Python interpreter or allocator caches. On CUDA it is
``torch.cuda.max_memory_allocated`` during the run (the same tensors, as the caching allocator sees
them).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .stats import median_ci

Run = Callable[[int], Any]


@dataclass
class Samples:
    """Per-run measurements of one alternating benchmark: wall and thread-CPU seconds, return values."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(runs: Mapping[str, Run], repeats: int, device: torch.device, warmup: int = 2) -> dict[str, Samples]:
    """Run every ``runs[key](i)`` once per cycle ``i`` (rotated order) for ``warmup`` untimed cycles
    and ``repeats`` timed ones; returns each key's samples."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    keys = list(runs)
    for i in range(warmup):
        for key in keys:
            runs[key](i)
    samples = {key: Samples() for key in keys}
    for i in range(repeats):
        shift = i % len(keys)
        for key in keys[shift:] + keys[:shift]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            value = runs[key](warmup + i)
            synchronize(device)
            samples[key].cpu.append(time.thread_time() - start_cpu)
            samples[key].wall.append(time.perf_counter() - start)
            samples[key].values.append(value)
    return samples


def cycle_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """``numerator[i] / denominator[i]`` per cycle: runs of one cycle share the machine's load."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError(f"paired samples differ in length: {len(numerator)} vs {len(denominator)}")
    return [n / d for n, d in zip(numerator, denominator)]


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over cycles of :func:`cycle_ratios`."""
    return statistics.median(cycle_ratios(numerator, denominator))


def paired_ratio_interval(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """The distribution-free 95% interval (:func:`~benchmarks.stats.median_ci`) of :func:`paired_ratio`
    (nan bounds with fewer than 6 cycles)."""
    interval = median_ci(cycle_ratios(numerator, denominator))
    return [interval["low"], interval["high"]]


def peak_bytes(run: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of live torch tensors during ``run()`` on ``device`` (see the module docstring)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max((sum(row) for row in sizes), default=0)
