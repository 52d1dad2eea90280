"""Task metrics (streaming, by task kind) and Delta_m."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..tasks import TaskSpec
from .classification import TaskMetric
from .delta_m import delta_m
from .dense import DENSE_KINDS, dense_metric

#: Task kind -> factory ``factory(spec)`` of a streaming metric with ``update(logits, target)`` and
#: ``compute() -> float`` (the spec's main metric).
METRIC_FACTORIES: dict[str, Callable[[TaskSpec], Any]] = {
    "classification": lambda spec: TaskMetric("classification"),
    "regression": lambda spec: TaskMetric("regression", scale=spec.metric_scale),
}
METRIC_FACTORIES.update({kind: (lambda spec: dense_metric(spec.kind, spec.num_outputs, spec.metric)) for kind in DENSE_KINDS})


def task_metric(spec: TaskSpec) -> Any:
    """A fresh streaming metric for a task of ``spec.kind``."""
    if spec.kind not in METRIC_FACTORIES:
        raise ValueError(f"no metric for task kind {spec.kind!r}; known kinds: {sorted(METRIC_FACTORIES)}")
    return METRIC_FACTORIES[spec.kind](spec)


__all__ = ["DENSE_KINDS", "METRIC_FACTORIES", "TaskMetric", "delta_m", "dense_metric", "task_metric"]
