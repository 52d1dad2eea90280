"""The multi-task model contract that ``HPS`` and the Hub ``MultiTaskModel`` share.

A multi-task model has ``tasks``, a shared module (``shared_module``) that every task reads and one
head per task (``heads``). ``forward(..., task=None, **labels)`` runs every task's path, or one
task's when ``task`` is given (its head and, with task-specific connections, its normalisations),
and returns per-task ``logits`` and, given labels named after the tasks, per-task ``losses`` and
their sum weighted by the model's static ``loss_weights``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from .task_connections import active_task, has_task_connections, task_connection_parameters

F = TypeVar("F")


def check_task_names(tasks: Sequence[str], forward_arguments: Sequence[str], model: str) -> None:
    """Refuse task names taken by an argument of ``model``'s forward: such a task could not pass its labels."""
    taken = [t for t in tasks if t in forward_arguments]
    if taken:
        raise ValueError(f"task name {taken[0]!r} is taken by an argument of {model}.forward "
                         f"({', '.join(forward_arguments)}): rename the task")


class MultiTaskMixin:
    """Task paths, the shared / task-specific parameter split, label checks and the weighted loss sum.

    Subclasses (``nn.Module`` s) provide ``tasks``, ``heads`` (an ``nn.ModuleDict``), ``shared_module``,
    ``loss_weights`` and :meth:`compute_task_loss`.
    """

    tasks: list[str]
    heads: nn.ModuleDict

    @property
    def shared_module(self) -> nn.Module:
        """The module every task reads (encoder or backbone)."""
        raise NotImplementedError

    @property
    def loss_weights(self) -> dict[str, float]:
        """Each task's static loss weight."""
        raise NotImplementedError

    def compute_task_loss(self, task: str, logits: Tensor, labels: Tensor) -> Tensor:
        """The unweighted loss of ``task``."""
        raise NotImplementedError

    # -- LibMTL-style parameter access ---------------------------------------------------------
    def get_share_params(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all tasks (the shared module's, minus task-specific connections)."""
        task_specific = {id(p) for t in self.tasks for p in self.task_specific_parameters(t)}
        return (p for p in self.shared_module.parameters() if id(p) not in task_specific)

    def task_specific_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters that only ``task`` uses: its head and its connections in the shared module, if any."""
        shared = self.shared_module
        params = list(self.heads[task].parameters()) + task_connection_parameters(shared, task)
        own = getattr(shared, "task_specific_parameters", None)
        if callable(own):
            params += list(own(task))
        return list({id(p): p for p in params}.values())

    # -- forward pieces --------------------------------------------------------------------------
    def tasks_to_run(self, task: str | None) -> list[str]:
        """``[task]``, or every task when ``task`` is None; an unknown task is an error."""
        if task is not None and task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; tasks are {self.tasks}")
        return [task] if task is not None else list(self.tasks)

    def collect_labels(self, labels: Mapping[str, Tensor] | None, task_labels: Mapping[str, Any],
                       inputs: str = "model inputs") -> dict[str, Tensor]:
        """The ``labels`` mapping merged with labels given as keyword arguments named after the tasks;
        any other name is an error (``inputs`` describes the inputs the model takes, for the message)."""
        if labels is not None and not isinstance(labels, Mapping):
            raise TypeError(f"labels must map task names to tensors (tasks: {self.tasks}), got {type(labels).__name__}")
        merged = {**(labels or {}), **task_labels}
        unknown = sorted(set(merged) - set(self.tasks))
        if unknown:
            raise TypeError(f"unexpected inputs {unknown}; expected {inputs} and labels named {self.tasks}")
        return merged

    def task_logits(self, run: list[str], features: Callable[[], F], head: Callable[[str, F], Tensor]) -> dict[str, Tensor]:
        """``head(t, features())`` for every task in ``run``: shared features computed once, or per task
        under that task's connections when the shared module has task-specific connections."""
        shared = self.shared_module
        if has_task_connections(shared):
            logits = {}
            for t in run:
                with active_task(shared, t):
                    logits[t] = head(t, features())
            return logits
        computed = features()
        return {t: head(t, computed) for t in run}

    def task_losses(self, run: list[str], logits: Mapping[str, Tensor], labels: Mapping[str, Tensor]
                    ) -> tuple[dict[str, Tensor], Tensor]:
        """Per-task losses of ``run`` and their sum weighted by ``loss_weights``; label errors name the task."""
        missing = [t for t in run if t not in labels]
        if missing:
            raise ValueError(f"missing labels for tasks {missing}; got labels for {sorted(labels)}")
        losses = {}
        for t in run:
            try:
                losses[t] = self.compute_task_loss(t, logits[t], labels[t])
            except ValueError as error:
                raise ValueError(f"task {t!r}: {error}") from error
        weights = self.loss_weights
        return losses, torch.stack([weights[t] * losses[t] for t in run]).sum()
