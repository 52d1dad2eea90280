"""What a task predicts and how it is scored: the link between datasets, heads, losses and metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """A task's kind (``classification``, ``regression`` or a dense kind), its output size, loss and
    main metric. ``higher_is_better`` refers to ``metric``, which Delta_m uses."""

    kind: str
    num_outputs: int
    loss: str
    metric: str
    higher_is_better: bool
    #: Multiplies regression errors to report them in user units (e.g. digit units).
    metric_scale: float = 1.0
    #: Class names of a classification task, in label order (saved with Hugging Face models).
    labels: tuple[str, ...] | None = None


def select_tasks(tasks: Sequence[str] | None, available: Mapping[str, TaskSpec], dataset: str) -> list[str]:
    """The requested tasks of ``dataset`` (all of them when ``tasks`` is None), checked by name."""
    tasks = list(available) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in available]
    if unknown or not tasks:
        raise ValueError(f"unknown {dataset} tasks {unknown}; available: {list(available)}")
    return tasks
