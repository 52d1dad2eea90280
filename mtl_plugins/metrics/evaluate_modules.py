"""The dense metrics as ``evaluate`` modules, so ``evaluate.combine`` works with them.

They are built locally (nothing is loaded from the Hub) and override ``add_batch`` / ``add`` /
``compute`` to update the streaming state of :mod:`mtl_plugins.metrics.dense` instead of writing
every prediction map to an Arrow cache. In a ``torch.distributed`` run, ``compute`` sums the state of
all processes and every rank gets the result.

``evaluate.combine`` hands the same ``predictions`` and ``references`` to every module. For several
tasks, give each module its ``task`` and pass mappings task -> tensor; each module takes its own:

    >>> modules = task_evaluation_modules(task_specs)          # {"semseg": ..., "depth": ...}
    >>> combined = evaluate.combine(modules, force_prefix=True)
    >>> combined.add_batch(predictions=output.logits, references={t: batch[t] for t in modules})
    >>> combined.compute()                                     # {"semseg_miou": ..., "depth_rmse": ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import datasets
import evaluate
import numpy as np
import torch

from ..tasks import TaskSpec
from . import task_metric
from .dense import DenseMetric

_DESCRIPTION = "Streaming dense-prediction metric from mtl_plugins (state summed over batches and processes)."
_INPUTS = """
    predictions: logits (or class ids) of one batch, a tensor or array shaped as the metric expects.
    references: targets of the same batch.
"""


def _batch(values: Any) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], torch.Tensor):
        return torch.stack(list(values))
    return torch.as_tensor(np.asarray(values))


class DenseEvaluationModule(evaluate.Metric):
    """An ``evaluate`` metric wrapping one :class:`~mtl_plugins.metrics.dense.DenseMetric`."""

    def __init__(self, metric: DenseMetric, name: str | None = None, task: str | None = None, **kwargs: Any):
        self._metric = metric
        self._display_name = name or task
        self.task = task
        kwargs.setdefault("keep_in_memory", True)
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("float32"), "references": datasets.Value("float32")}),
        )

    @property
    def name(self) -> str:
        return self._display_name or super().name

    @property
    def metric(self) -> DenseMetric:
        return self._metric

    def _select(self, values: Any, what: str) -> Any:
        if not isinstance(values, Mapping):
            return values
        if self.task is None:
            raise ValueError(f"{what} is a mapping but this module has no task: build it with task=<name>")
        if self.task not in values:
            raise KeyError(f"{what} has no entry for task {self.task!r}; it has {sorted(values)}")
        return values[self.task]

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Update the streaming state with one batch (mappings task -> tensor are accepted)."""
        if predictions is None or references is None:
            raise ValueError("add_batch needs both predictions and references")
        predictions, references = self._select(predictions, "predictions"), self._select(references, "references")
        self._metric.update(_batch(predictions), _batch(references))

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Update the streaming state with one example (no batch dimension)."""
        if prediction is None or reference is None:
            raise ValueError("add needs both prediction and reference")
        prediction, reference = self._select(prediction, "prediction"), self._select(reference, "reference")
        self._metric.update(_batch(prediction)[None], _batch(reference)[None])

    def compute(self, *, predictions=None, references=None, **kwargs) -> dict[str, float]:
        """All metrics of the accumulated batches (plus an optional last batch); then reset."""
        if predictions is not None or references is not None:
            self.add_batch(predictions=predictions, references=references)
        self._metric.sync()
        try:
            return self._metric.compute_all()
        finally:
            self._metric.reset()


def task_evaluation_modules(task_specs: Mapping[str, TaskSpec],
                            tasks: Sequence[str] | None = None) -> dict[str, DenseEvaluationModule]:
    """One module per dense task, named after it: pass to ``evaluate.combine(..., force_prefix=True)``."""
    tasks = list(task_specs) if tasks is None else list(tasks)
    modules = {}
    for t in tasks:
        metric = task_metric(task_specs[t])
        if not isinstance(metric, DenseMetric):
            raise ValueError(f"task {t!r} of kind {task_specs[t].kind!r} has no dense metric")
        modules[t] = DenseEvaluationModule(metric, task=t)
    return modules
