"""The base of every task metric: a torchmetrics ``Metric`` with several named values and a main one."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class TaskMetric(Metric):
    """One task's streaming metric; :meth:`compute_all` returns every value of its kind, by name.

    States are torchmetrics states reduced by sum (``dist_reduce_fx="sum"``), and library metrics held
    as attributes sum theirs, so :meth:`compute` and :meth:`compute_all` give the value of the whole
    evaluation set on every process when each process updates with its own shard. Pass
    ``sync_on_compute=False`` when every process already sees every example (``transformers.Trainer``
    gathers predictions before ``compute_metrics``). ``count`` counts the scored elements: computing
    with none is an error. Values are float64 throughout.
    """

    #: Names :meth:`compute_all` returns; ``main`` is one of them.
    names: tuple[str, ...] = ()
    #: The task kind and what ``count`` counts, for the error raised when it is zero.
    label, counted = "task", "element"
    full_state_update = False

    def __init__(self, main: str | None = None, sync_on_compute: bool = True):
        super().__init__(sync_on_compute=sync_on_compute)
        main = main or self.names[0]
        if main not in self.names:
            raise ValueError(f"{type(self).__name__} has no metric {main!r}; available: {list(self.names)}")
        self.main = main
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def library(self, metric_class: type[Metric], **options) -> Metric:
        """A torchmetrics metric for this one to hold: float64 states, synchronised like this one."""
        return metric_class(sync_on_compute=self.sync_on_compute, **options).set_dtype(torch.float64)

    @property
    def state(self) -> dict[str, Tensor]:
        """The local running sums of this metric's own states."""
        return self.metric_state

    def values(self) -> dict[str, float]:
        """Every value from the (synchronised) state; ``count`` is known to be positive."""
        raise NotImplementedError

    def _checked_values(self) -> dict[str, float]:
        if int(self.count) == 0:
            raise ValueError(f"{self.label}: no {self.counted} seen")
        return self.values()

    def compute(self) -> float:
        """The main metric ``self.main`` (torchmetrics sums the state over processes first)."""
        return self._checked_values()[self.main]

    def compute_all(self) -> dict[str, float]:
        """Every metric of this kind, by name, over every process's updates."""
        already = self._is_synced  # an explicit sync() summed the state already
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self.sync_on_compute and not already,
                               should_unsync=not already):
            count = int(self.count)
            values = self.values() if count else None
        if values is None:
            raise ValueError(f"{self.label}: no {self.counted} seen")
        return values

    def reset(self) -> None:
        """Forget every update, also those of the library metrics this one holds."""
        super().reset()
        for child in self.children():
            if isinstance(child, Metric):
                child.reset()
