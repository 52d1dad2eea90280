"""Every task's streaming metric in one place, and the evaluation of a model over batches.

:func:`build_metrics` is the one way metrics are built for a set of tasks, whatever their kind:
the runner and :class:`~mtl_plugins.metrics.compute_metrics.ComputeMetrics` (the Trainer's
``compute_metrics``) use it, and so can any training loop::

    metrics = build_metrics(data.task_specs)        # tasks in spec order
    for batch in loader:
        metrics.update(model(**inputs).logits, {t: batch[t] for t in metrics.tasks})
    metrics.compute()                               # {"semseg/miou": ..., "semseg/pixel_acc": ..., ...}

Each process may update with its own shard of the evaluation set: ``compute`` sums the states over
``torch.distributed`` processes (torchmetrics) unless built with ``sync_on_compute=False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..tasks import TaskSpec
from .base import TaskMetric
from .dense import DENSE_KINDS, dense_metric
from .scalar import AccuracyMetric, MeanAbsoluteErrorMetric

#: Task kind -> factory ``factory(spec, sync_on_compute)`` of the task's streaming metric.
METRIC_FACTORIES: dict[str, Callable[[TaskSpec, bool], TaskMetric]] = {
    "classification": lambda spec, sync: AccuracyMetric(main=spec.metric, sync_on_compute=sync),
    "regression": lambda spec, sync: MeanAbsoluteErrorMetric(spec.metric_scale, main=spec.metric, sync_on_compute=sync),
}
METRIC_FACTORIES.update({
    kind: (lambda spec, sync: dense_metric(spec.kind, spec.num_outputs, spec.metric, sync_on_compute=sync))
    for kind in DENSE_KINDS
})


def task_metric(spec: TaskSpec, sync_on_compute: bool = True) -> TaskMetric:
    """A fresh streaming metric for a task of ``spec.kind`` whose main metric is ``spec.metric``."""
    if spec.kind not in METRIC_FACTORIES:
        raise ValueError(f"no metric for task kind {spec.kind!r}; known kinds: {sorted(METRIC_FACTORIES)}")
    return METRIC_FACTORIES[spec.kind](spec, sync_on_compute)


def as_tensor(value: Any) -> Tensor:
    """A tensor from a tensor, a NumPy array or a nested list."""
    return value if isinstance(value, Tensor) else torch.from_numpy(np.asarray(value))


class MultiTaskMetrics(nn.Module):
    """Every task's streaming metric (a module: ``.to(device)`` moves the states).

    ``compute()`` returns ``{"<task>/<metric>": value}`` for all of a task's metrics;
    ``main_metrics()`` only each task's main metric (the one Delta_m uses by default)."""

    def __init__(self, task_specs: Mapping[str, TaskSpec], tasks: Sequence[str] | None = None,
                 sync_on_compute: bool = True):
        super().__init__()
        self.tasks = list(task_specs) if tasks is None else list(tasks)
        missing = [t for t in self.tasks if t not in task_specs]
        if missing or not self.tasks:
            raise ValueError(
                f"no task spec for {missing or 'an empty task list'}; specs given for {sorted(task_specs)}")
        self.specs = {t: task_specs[t] for t in self.tasks}
        self.metrics = nn.ModuleDict({t: task_metric(spec, sync_on_compute) for t, spec in self.specs.items()})

    def update(self, logits: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        """Add one batch: ``logits`` and ``labels`` map task names to tensors (or arrays); other keys are
        ignored. The states follow the device of the predictions."""
        for t in self.tasks:
            if t not in logits:
                raise KeyError(f"no predictions for task {t!r}; got {sorted(logits)}")
            if t not in labels:
                raise KeyError(f"no labels for task {t!r}; got {sorted(labels)}")
        for t in self.tasks:
            prediction = as_tensor(logits[t]).detach()
            metric = self.metrics[t]
            if metric.device != prediction.device:
                metric.to(prediction.device)
            metric.update(prediction, as_tensor(labels[t]).to(prediction.device))

    def reset(self) -> None:
        """Start a new evaluation with the same tasks."""
        for metric in self.metrics.values():
            metric.reset()

    def compute(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for t in self.tasks:
            result.update({f"{t}/{name}": value for name, value in self.metrics[t].compute_all().items()})
        return result

    def main_metrics(self) -> dict[str, float]:
        return {f"{t}/{self.specs[t].metric}": self.metrics[t].compute() for t in self.tasks}

    def higher_is_better(self) -> dict[str, bool]:
        """Direction of each task's main metric, as Delta_m needs it."""
        return {f"{t}/{spec.metric}": spec.higher_is_better for t, spec in self.specs.items()}


def build_metrics(task_specs: Mapping[str, TaskSpec], tasks: Sequence[str] | None = None,
                  sync_on_compute: bool = True) -> MultiTaskMetrics:
    """The streaming metrics of ``tasks`` (default: every task in ``task_specs``), by task kind."""
    return MultiTaskMetrics(task_specs, tasks, sync_on_compute)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[Mapping[str, Any]], task_specs: Mapping[str, TaskSpec],
                     tasks: Sequence[str] | None = None, sync_on_compute: bool = True) -> dict[str, float]:
    """Run ``model`` over ``batches`` (inputs plus one label entry per task) and return every metric.

    The model's output must have ``logits`` (task -> tensor). Each process may pass only its own shard
    of the evaluation set: the result sums over processes (unless ``sync_on_compute=False``)."""
    metrics = build_metrics(task_specs, tasks, sync_on_compute)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            inputs = {k: (v.to(device) if isinstance(v, Tensor) else v)
                      for k, v in batch.items() if k not in metrics.tasks}
            output = model(**inputs)
            logits = output["logits"] if isinstance(output, Mapping) else output.logits
            metrics.update(logits, {t: batch[t] for t in metrics.tasks})
    finally:
        model.train(was_training)
    return metrics.compute()
