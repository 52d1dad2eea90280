"""Uncertainty weighting (Kendall et al. 2018, LibMTL ``UW``), torchjd's scalarizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...registry import register_strategy
from .. import torchjd_adapter as tjd
from ..base import Closure, Updater
from .base import LossWeighting, OwnedParameter, scalarizer_gradients, stack_losses


@register_strategy("uw", aliases=("UW",))
class UncertaintyWeighting(LossWeighting):
    """Uncertainty weighting (Kendall et al. 2018): ``sum_t exp(-s_t) L_t / 2 + s_t / 2``.

    The log-variances ``s`` start at 0 and are trained by the strategy's own Adam (``lr``; set it to
    the model's learning rate to match the paper) on ``dL/ds_t = (1 - exp(-s_t) L_t) / 2``.
    """

    needs_step_outcome = True  # the log-variances move only when the model did

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 lr: float = 1e-3):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.scalarizer = tjd.scalarizer(self.name, "uw", len(self.tasks))
        self.log_var = OwnedParameter(torch.zeros(len(self.tasks)), lr, parameter=self.scalarizer.log_var, owner=self.name)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return dict(zip(self.tasks, scalarizer_gradients(self.scalarizer, stack_losses(losses, self.tasks))[0].tolist()))

    def update_log_var(self, values: Tensor) -> None:
        """One Adam step of the log-variances at the (averaged) losses ``values``."""
        self.log_var.apply(scalarizer_gradients(self.scalarizer, values, [self.scalarizer.log_var])[1])

    def after_step(self, closure: Closure, updater: Updater, values: Tensor, stepped: bool) -> None:
        if stepped:
            self.update_log_var(values)

    def backward(self, losses: Mapping[str, Tensor] | Tensor, updater: Updater | None = None, **kwargs: Any):
        """LibMTL contract: backward the weighted loss, then update the log-variances."""
        weights = super().backward(losses, updater, **kwargs)
        if isinstance(losses, Tensor):
            losses = dict(zip(self.tasks, losses.unbind()))
        self.update_log_var(stack_losses(losses, self.tasks))
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_var_state": self.log_var.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.log_var.load(state["log_var_state"])

    def log_metrics(self) -> dict[str, float]:
        metrics = super().log_metrics()
        metrics.update({f"log_var/{t}": float(s) for t, s in zip(self.tasks, self.scalarizer.log_var.detach())})
        return metrics
