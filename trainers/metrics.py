"""``compute_metrics`` for :class:`~mtl_plugins.trainers.MultiTaskTrainer`: per-task metrics and Delta_m."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mtl_plugins.metrics import delta_m, task_metric
from mtl_plugins.tasks import TaskSpec


def _as_tuple(value: Any, n: int, what: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) != n:
        raise ValueError(f"expected {what} for {n} tasks, got {len(values)}")
    return values


def _tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


class MultiTaskMetrics:
    """Each task's main metric (``"<task>/<metric>"``) and, given single-task reference metrics
    with the same names, ``"delta_m"`` (Delta_m in percent, higher is better).

    Predictions and labels arrive in task order, as :meth:`MultiTaskTrainer.prediction_step`
    returns them. Works with ``batch_eval_metrics=True`` too (streaming, nothing stored).
    """

    def __init__(self, task_specs: Mapping[str, TaskSpec], reference: Mapping[str, float] | None = None,
                 tasks: Sequence[str] | None = None):
        self.tasks = list(tasks if tasks is not None else task_specs)
        missing = [t for t in self.tasks if t not in task_specs]
        if missing:
            raise ValueError(f"no task spec for tasks {missing}; specs given for {sorted(task_specs)}")
        self.specs = {t: task_specs[t] for t in self.tasks}
        self.names = {t: f"{t}/{spec.metric}" for t, spec in self.specs.items()}
        self.reference = dict(reference) if reference is not None else None
        if self.reference is not None:
            absent = [n for n in self.names.values() if n not in self.reference]
            if absent:
                raise KeyError(f"reference metrics lack {absent}; they have {sorted(self.reference)}")
        self._running: dict[str, Any] | None = None

    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        if self._running is None:
            self._running = {t: task_metric(spec) for t, spec in self.specs.items()}
        predictions = _as_tuple(eval_pred.predictions, len(self.tasks), "predictions")
        labels = _as_tuple(eval_pred.label_ids, len(self.tasks), "labels")
        for task, prediction, label in zip(self.tasks, predictions, labels):
            self._running[task].update(_tensor(prediction), _tensor(label))
        if compute_result is False:
            return {}
        running, self._running = self._running, None
        return self.summarize({t: m.compute() for t, m in running.items()})

    def summarize(self, values: Mapping[str, float]) -> dict[str, float]:
        """Named per-task metrics plus Delta_m from ``{task: value}``."""
        results = {self.names[t]: float(values[t]) for t in self.tasks}
        if self.reference is not None:
            higher = {self.names[t]: spec.higher_is_better for t, spec in self.specs.items()}
            results["delta_m"] = delta_m(results, self.reference, higher)
        return results


def make_compute_metrics(task_specs: Mapping[str, TaskSpec], reference: Mapping[str, float] | None = None,
                         tasks: Sequence[str] | None = None) -> MultiTaskMetrics:
    """A ``compute_metrics`` callable for ``tasks`` (default: every task in ``task_specs``)."""
    return MultiTaskMetrics(task_specs, reference, tasks)
