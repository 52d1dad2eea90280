"""Dynamic weight average (Liu et al. 2019, LibMTL ``DWA``)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...registry import register_strategy
from .base import LossWeighting, stack_losses


@register_strategy("dwa", aliases=("DWA",))
class DynamicWeightAverage(LossWeighting):
    """DWA (Liu et al. 2019): ``lambda_k = K softmax_k(r / T)``, ``r_k = L_k(e-1) / L_k(e-2)`` from the
    average losses of the two previous epochs; weights are 1 during the first two epochs.

    Epochs end where the trainer says (``set_progress(progress, epoch=e)``, as the
    ``MultiTaskTrainer`` calls it) or, when ``steps_per_epoch`` is given, every that many batches.
    ``temperature`` is 2, as in the paper.
    """

    weights_move_state = True

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 temperature: float = 2.0, steps_per_epoch: int | None = None):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if temperature <= 0:
            raise ValueError(f"dwa: temperature must be positive, got {temperature}")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"dwa: steps_per_epoch must be >= 1, got {steps_per_epoch}")
        self.temperature, self.steps_per_epoch = float(temperature), steps_per_epoch
        self.epoch: int | None = None
        self.epoch_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self.epoch_batches = 0
        self.epoch_averages: list[Tensor] = []

    def set_progress(self, progress: float, epoch: int | None = None) -> None:
        """Training progress in [0, 1]; a new ``epoch`` closes the running epoch average."""
        super().set_progress(progress)
        if epoch is None or self.steps_per_epoch is not None:
            return
        if self.epoch is not None and epoch != self.epoch:
            self._close_epoch()
        self.epoch = int(epoch)

    def _close_epoch(self) -> None:
        if self.epoch_batches:
            self.epoch_averages = [*self.epoch_averages, self.epoch_sum / self.epoch_batches][-2:]
        self.epoch_sum, self.epoch_batches = torch.zeros_like(self.epoch_sum), 0

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        """The weights for this batch; records its losses into the running epoch average."""
        if self.steps_per_epoch is None and self.epoch is None:
            raise ValueError(
                "dwa needs to know where epochs end: train with the MultiTaskTrainer (it passes the epoch to "
                "set_progress), call set_progress(progress, epoch=e), or set steps_per_epoch"
            )
        values = stack_losses(losses, self.tasks)
        if len(self.epoch_averages) < 2:
            weights = torch.ones(len(self.tasks), dtype=torch.float64)
        else:
            rates = self.epoch_averages[-1] / self.epoch_averages[-2]
            weights = len(self.tasks) * torch.softmax(rates / self.temperature, dim=0)
        self.epoch_sum = self.epoch_sum + values
        self.epoch_batches += 1
        if self.epoch_batches == self.steps_per_epoch:
            self._close_epoch()
        return dict(zip(self.tasks, weights.tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **copy.deepcopy({
            "epoch": self.epoch, "epoch_sum": self.epoch_sum, "epoch_batches": self.epoch_batches,
            "epoch_averages": self.epoch_averages})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch, self.epoch_batches = state["epoch"], int(state["epoch_batches"])
        self.epoch_sum = state["epoch_sum"].clone()
        self.epoch_averages = [a.clone() for a in state["epoch_averages"]]
