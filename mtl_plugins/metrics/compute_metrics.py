"""``compute_metrics`` for ``transformers.Trainer`` (and :class:`~mtl_plugins.trainers.MultiTaskTrainer`).

Use it with ``TrainingArguments(batch_eval_metrics=True)``: each evaluation batch updates the streaming
metrics of :mod:`mtl_plugins.metrics.evaluation` and is dropped. The Trainer gathers every batch's
logits and labels from all processes before calling it, so the metrics do not sum over processes
again. Without ``batch_eval_metrics`` it also accepts the whole evaluation set at once, but then the
Trainer has stored every prediction first. Nothing here imports transformers: ``EvalPrediction`` is
read by its attributes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..tasks import TaskSpec
from .delta_m import delta_m
from .evaluation import build_metrics


def _task_logits(predictions: Any, tasks: Sequence[str]) -> Mapping[str, Any]:
    """Find the task -> logits mapping in what the Trainer passes as ``EvalPrediction.predictions``."""
    if isinstance(predictions, Mapping):
        if all(t in predictions for t in tasks):
            return predictions
        if isinstance(predictions.get("logits"), Mapping):
            return predictions["logits"]
    if isinstance(predictions, (tuple, list)):
        for item in predictions:
            if isinstance(item, Mapping) and all(t in item for t in tasks):
                return item
        if len(predictions) == len(tasks) and not any(isinstance(p, Mapping) for p in predictions):
            return dict(zip(tasks, predictions))
    if len(tasks) == 1 and not isinstance(predictions, (Mapping, tuple, list)):
        return {tasks[0]: predictions}
    raise ValueError(f"cannot find logits for tasks {list(tasks)} in predictions of type {type(predictions).__name__}")


def _task_labels(label_ids: Any, tasks: Sequence[str]) -> Mapping[str, Any]:
    """``EvalPrediction.label_ids``: a mapping, or a tuple in task order (the Trainer's ``label_names``)."""
    if isinstance(label_ids, Mapping):
        return label_ids
    if isinstance(label_ids, (tuple, list)) and len(label_ids) == len(tasks):
        return dict(zip(tasks, label_ids))
    if len(tasks) == 1:
        return {tasks[0]: label_ids}
    raise ValueError(f"labels must be a mapping or one entry per task {list(tasks)} (set label_names to the tasks)")


class ComputeMetrics:
    """Every task metric as ``"<task>/<metric>"`` and, given ``reference`` (single-task numbers with the
    same names), ``delta_m`` over ``delta_m_metrics`` (default: each task's main metric; see
    :func:`mtl_plugins.metrics.paper.delta_m_selection` for the papers' choice)."""

    def __init__(self, task_specs: Mapping[str, TaskSpec], reference: Mapping[str, float] | None = None,
                 tasks: Sequence[str] | None = None, delta_m_metrics: Mapping[str, bool] | None = None):
        self.metrics = build_metrics(task_specs, tasks, sync_on_compute=False)  # the Trainer gathered already
        self.reference = dict(reference) if reference is not None else None
        self.delta_m_metrics = dict(delta_m_metrics) if delta_m_metrics is not None else self.metrics.higher_is_better()
        if self.reference is not None:
            absent = [name for name in self.delta_m_metrics if name not in self.reference]
            if absent:
                raise KeyError(f"reference metrics lack {absent}; they have {sorted(self.reference)}")

    @property
    def tasks(self) -> list[str]:
        return self.metrics.tasks

    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        """Per batch (``compute_result`` False) update; at the last batch (True) return the metrics.
        Called without ``compute_result`` (whole-set mode) it evaluates ``eval_pred`` on its own."""
        if compute_result is None:
            self.metrics.reset()
        logits = _task_logits(eval_pred.predictions, self.tasks)
        self.metrics.update(logits, _task_labels(eval_pred.label_ids, self.tasks))
        if compute_result is False:
            return {}
        try:
            result = self.metrics.compute()
        finally:
            self.metrics.reset()
        if self.reference is not None:
            result["delta_m"] = delta_m(result, self.reference, self.delta_m_metrics)
        return result


def make_compute_metrics(task_specs: Mapping[str, TaskSpec], reference: Mapping[str, float] | None = None,
                         tasks: Sequence[str] | None = None,
                         delta_m_metrics: Mapping[str, bool] | None = None) -> ComputeMetrics:
    """A ``compute_metrics`` callable for ``tasks`` (default: every task in ``task_specs``)."""
    return ComputeMetrics(task_specs, reference, tasks, delta_m_metrics)
