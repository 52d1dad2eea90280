"""Hard parameter sharing (LibMTL ``HPS``): one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..losses import LossFn, get_loss
from ..outputs import MultiTaskOutput
from ..registry import register_architecture
from .task_connections import (
    active_task,
    has_task_connections,
    task_connection_parameters,
)


@register_architecture("hps", aliases=("HPS",))
class HPS(nn.Module):
    """Shared ``encoder`` followed by ``heads[task]``.

    ``forward(x, task=None, **labels)`` returns a :class:`MultiTaskOutput` with ``logits`` for the
    requested tasks and, when labels are given (as keyword arguments named after the tasks or as a
    ``labels`` mapping), per-task ``losses`` and their weighted sum ``loss``. With ``task`` set, only
    that task's path runs (its head and, with task-specific connections, its normalisations).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        losses: Mapping[str, str | Callable] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        input_name: str = "pixel_values",
    ):
        super().__init__()
        self.tasks = list(tasks)
        missing = [t for t in self.tasks if t not in heads]
        if missing:
            raise ValueError(f"no head for tasks {missing}; heads given for {sorted(heads)}")
        extra = sorted(set(heads) - set(self.tasks))
        if extra:
            raise ValueError(f"heads given for unknown tasks {extra}; tasks are {self.tasks}")
        self.encoder = encoder
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        losses = dict(losses or {})
        self.loss_fns: dict[str, LossFn] = {t: get_loss(losses.get(t, "cross_entropy")) for t in self.tasks}
        self.loss_weights = {t: float((loss_weights or {}).get(t, 1.0)) for t in self.tasks}
        self.input_name = input_name

    # -- LibMTL-style parameter access ---------------------------------------------------------
    def get_share_params(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all tasks (the encoder's, minus task-specific connections)."""
        task_specific = {id(p) for t in self.tasks for p in self.task_specific_parameters(t)}
        return (p for p in self.encoder.parameters() if id(p) not in task_specific)

    def task_specific_parameters(self, task: str) -> list[nn.Parameter]:
        """Parameters that only ``task`` uses: its head and its encoder connections, if any."""
        params = list(self.heads[task].parameters()) + task_connection_parameters(self.encoder, task)
        task_params = getattr(self.encoder, "task_specific_parameters", None)
        if callable(task_params):
            params += list(task_params(task))
        return list({id(p): p for p in params}.values())

    def zero_grad_share_params(self) -> None:
        for p in self.get_share_params():
            p.grad = None

    # -- forward ----------------------------------------------------------------------------
    def _task_context(self, task: str):
        return active_task(self.encoder, task) if has_task_connections(self.encoder) else nullcontext()

    def _split_inputs(self, x: Any, labels: Mapping[str, Tensor] | None, kwargs: dict[str, Any]):
        if x is None:
            if self.input_name not in kwargs:
                raise ValueError(f"missing model input {self.input_name!r}")
            x = kwargs.pop(self.input_name)
        labels = dict(labels or {})
        for task in self.tasks:
            if task in kwargs:
                labels[task] = kwargs.pop(task)
        if kwargs:
            raise TypeError(f"unexpected inputs {sorted(kwargs)}; expected {self.input_name!r} and labels named {self.tasks}")
        return x, labels

    def forward(
        self, x: Tensor | None = None, *, task: str | None = None, labels: Mapping[str, Tensor] | None = None, **kwargs: Any
    ) -> MultiTaskOutput:
        x, labels = self._split_inputs(x, labels, kwargs)
        if task is not None and task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; tasks are {self.tasks}")
        run = [task] if task is not None else self.tasks
        logits: dict[str, Tensor] = {}
        per_task_encoder = has_task_connections(self.encoder)
        shared = None if per_task_encoder else self.encoder(x)
        for t in run:
            if per_task_encoder:
                with self._task_context(t):
                    logits[t] = self.heads[t](self.encoder(x))
            else:
                logits[t] = self.heads[t](shared)
        output = MultiTaskOutput(logits=logits)
        if labels:
            missing = [t for t in run if t not in labels]
            if missing:
                raise ValueError(f"missing labels for tasks {missing}; got labels for {sorted(labels)}")
            losses = {t: self.loss_fns[t](logits[t], labels[t]) for t in run}
            output["losses"] = losses
            output["loss"] = torch.stack([self.loss_weights[t] * losses[t] for t in run]).sum()
        return output
