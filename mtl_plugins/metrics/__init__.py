"""Task metrics (streaming, by task kind, exact across processes) and Delta_m.

* :func:`build_metrics` (``task_specs``, ``tasks``) -> :class:`MultiTaskMetrics`: every task's metric,
  ``update(logits, labels)`` per batch and ``compute()`` -> ``{"<task>/<metric>": value}``;
  :func:`evaluate_batches` runs a model over batches with it.
* :func:`make_compute_metrics` / :class:`ComputeMetrics`: the same metrics as a ``compute_metrics``
  for ``transformers.Trainer`` (with ``batch_eval_metrics=True``), plus Delta_m against a reference.
* :func:`task_metric` (one task's metric), :mod:`.dense` and :mod:`.scalar` (the metrics by kind),
  :func:`delta_m` and :mod:`.paper` (the papers' metric selection and numbers).

The metrics are torchmetrics ``Metric`` s. torchmetrics is imported when a metric is first built, not
by ``import mtl_plugins.metrics`` (importing torchmetrics imports transformers when it is installed).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .delta_m import delta_m

if TYPE_CHECKING:
    from .base import TaskMetric
    from .compute_metrics import ComputeMetrics, make_compute_metrics
    from .dense import DENSE_KINDS, dense_metric
    from .evaluation import (
        METRIC_FACTORIES,
        MultiTaskMetrics,
        build_metrics,
        evaluate_batches,
        task_metric,
    )

_LAZY = {
    "ComputeMetrics": "compute_metrics", "make_compute_metrics": "compute_metrics",
    "TaskMetric": "base", "DENSE_KINDS": "dense", "dense_metric": "dense",
    "METRIC_FACTORIES": "evaluation", "MultiTaskMetrics": "evaluation", "build_metrics": "evaluation",
    "evaluate_batches": "evaluation", "task_metric": "evaluation",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DENSE_KINDS", "METRIC_FACTORIES", "ComputeMetrics", "MultiTaskMetrics", "TaskMetric", "build_metrics",
           "delta_m", "dense_metric", "evaluate_batches", "make_compute_metrics", "task_metric"]
