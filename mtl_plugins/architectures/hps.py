"""Hard parameter sharing (LibMTL ``HPS``): one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..losses import LossFn, get_loss
from ..outputs import MultiTaskOutput
from ..registry import register_architecture
from .base import MultiTaskMixin, check_task_names


@register_architecture("hps", aliases=("HPS",))
class HPS(MultiTaskMixin, nn.Module):
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
        unknown = sorted(set(loss_weights or {}) - set(self.tasks))
        if unknown:
            raise ValueError(f"loss_weights names unknown tasks {unknown}; tasks are {self.tasks}")
        self._loss_weights = {t: float((loss_weights or {}).get(t, 1.0)) for t in self.tasks}
        self.input_name = input_name
        check_task_names(self.tasks, ("x", input_name, "task", "labels"), "HPS")

    @property
    def shared_module(self) -> nn.Module:
        return self.encoder

    @property
    def loss_weights(self) -> dict[str, float]:
        return dict(self._loss_weights)

    def compute_task_loss(self, task: str, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss_fns[task](logits, labels)

    def forward(
        self, x: Tensor | None = None, *, task: str | None = None, labels: Mapping[str, Tensor] | None = None, **kwargs: Any
    ) -> MultiTaskOutput:
        if x is None:
            if self.input_name not in kwargs:
                raise ValueError(f"missing model input {self.input_name!r}")
            x = kwargs.pop(self.input_name)
        labels = self.collect_labels(labels, kwargs, repr(self.input_name))
        run = self.tasks_to_run(task)
        output = MultiTaskOutput(logits=self.task_logits(run, lambda: self.encoder(x), lambda t, h: self.heads[t](h)))
        if labels:
            output["losses"], output["loss"] = self.task_losses(run, output["logits"], labels)
        return output
