"""Multi-task evaluation one batch at a time: a streaming evaluator and a Trainer ``compute_metrics``.

Dense prediction maps are never accumulated: each batch updates running sums and is dropped.

* :class:`MultiTaskEvaluator` and :func:`evaluate_batches` are for a loop that sees its own shard of
  the evaluation set (the runner, or a Trainer subclass); ``sync()`` sums the state over processes.
* :class:`StreamingComputeMetrics` is a ``compute_metrics`` for ``transformers.Trainer`` with
  ``TrainingArguments(batch_eval_metrics=True)``. The Trainer gathers every batch's logits and labels
  from all processes before calling it, so it must not sync again (``sync=False``, the default).
  Without ``batch_eval_metrics`` it also accepts the whole evaluation set at once, but then the
  Trainer has stored every prediction map first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..tasks import TaskSpec
from . import task_metric
from .delta_m import delta_m


def _as_tensor(value: Any) -> Tensor:
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


class MultiTaskEvaluator:
    """Every task's streaming metric. ``compute()`` returns ``{"<task>/<metric>": value}`` for all of a
    task's metrics; ``main_metrics()`` only each task's main metric (the one Delta_m uses)."""

    def __init__(self, task_specs: Mapping[str, TaskSpec], tasks: Sequence[str] | None = None):
        self.tasks = list(task_specs) if tasks is None else list(tasks)
        missing = [t for t in self.tasks if t not in task_specs]
        if missing:
            raise ValueError(f"no task spec for {missing}; specs given for {sorted(task_specs)}")
        self.specs = {t: task_specs[t] for t in self.tasks}
        self.metrics = {t: task_metric(spec) for t, spec in self.specs.items()}

    def update(self, logits: Mapping[str, Any], labels: Mapping[str, Any]) -> None:
        """Add one batch: ``logits`` and ``labels`` map task names to tensors (or arrays)."""
        for t in self.tasks:
            if t not in logits:
                raise KeyError(f"no predictions for task {t!r}; got {sorted(logits)}")
            if t not in labels:
                raise KeyError(f"no labels for task {t!r}; got {sorted(labels)}")
            self.metrics[t].update(_as_tensor(logits[t]).detach(), _as_tensor(labels[t]))

    def sync(self) -> None:
        """Sum every metric's state over the processes of ``torch.distributed`` (no-op when single)."""
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        for t, metric in self.metrics.items():
            if hasattr(metric, "sync"):
                metric.sync()
            elif distributed:
                raise NotImplementedError(f"the metric of task {t!r} ({type(metric).__name__}) cannot sync across processes")

    def reset(self) -> None:
        """Start a new evaluation with the same tasks."""
        self.metrics = {t: task_metric(spec) for t, spec in self.specs.items()}

    def compute(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for t, metric in self.metrics.items():
            values = metric.compute_all() if hasattr(metric, "compute_all") else {self.specs[t].metric: metric.compute()}
            result.update({f"{t}/{name}": value for name, value in values.items()})
        return result

    def main_metrics(self) -> dict[str, float]:
        return {f"{t}/{self.specs[t].metric}": self.metrics[t].compute() for t in self.tasks}

    def higher_is_better(self) -> dict[str, bool]:
        """Direction of each task's main metric, as Delta_m needs it."""
        return {f"{t}/{spec.metric}": spec.higher_is_better for t, spec in self.specs.items()}


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: Iterable[Mapping[str, Any]], task_specs: Mapping[str, TaskSpec],
                     tasks: Sequence[str] | None = None, sync: bool = True) -> dict[str, float]:
    """Run ``model`` over ``batches`` (inputs plus one label entry per task) and return every metric.

    The model's output must have ``logits`` (task -> tensor). With ``sync`` the state is summed over
    processes, so each process may pass only its own shard of the evaluation set."""
    evaluator = MultiTaskEvaluator(task_specs, tasks)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        for batch in batches:
            inputs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items() if k not in evaluator.tasks}
            output = model(**inputs)
            logits = output["logits"] if isinstance(output, Mapping) else output.logits
            evaluator.update(logits, {t: _as_tensor(batch[t]).to(device) for t in evaluator.tasks})
    finally:
        model.train(was_training)
    if sync:
        evaluator.sync()
    return evaluator.compute()


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


class StreamingComputeMetrics:
    """``compute_metrics`` for ``transformers.Trainer``; use it with ``batch_eval_metrics=True``.

    Returns every task metric as ``"<task>/<metric>"`` and, when ``baseline`` (user-given single-task
    numbers) is set, ``delta_m`` over ``delta_m_metrics`` (default: each task's main metric; see
    :func:`mtl_plugins.metrics.paper.delta_m_selection` for the papers' choice)."""

    def __init__(self, task_specs: Mapping[str, TaskSpec], tasks: Sequence[str] | None = None,
                 baseline: Mapping[str, float] | None = None, delta_m_metrics: Mapping[str, bool] | None = None,
                 sync: bool = False):
        self.evaluator = MultiTaskEvaluator(task_specs, tasks)
        self.baseline = dict(baseline) if baseline is not None else None
        self.delta_m_metrics = dict(delta_m_metrics) if delta_m_metrics is not None else self.evaluator.higher_is_better()
        self.sync = sync

    def __call__(self, eval_pred: Any, compute_result: bool | None = None) -> dict[str, float]:
        """Per batch (``compute_result`` False) update; at the last batch (True) return the metrics.
        Called without ``compute_result`` (whole-set mode) it evaluates ``eval_pred`` on its own."""
        if compute_result is None:
            self.evaluator.reset()
        tasks = self.evaluator.tasks
        self.evaluator.update(_task_logits(eval_pred.predictions, tasks), _task_labels(eval_pred.label_ids, tasks))
        if compute_result is False:
            return {}
        if self.sync:
            self.evaluator.sync()
        result = self.evaluator.compute()
        self.evaluator.reset()
        if self.baseline is not None:
            result["delta_m"] = delta_m(result, self.baseline, self.delta_m_metrics)
        return result
