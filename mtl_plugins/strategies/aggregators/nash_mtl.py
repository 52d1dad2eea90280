"""Nash-MTL (Navon et al. 2022, LibMTL ``Nash_MTL``), solved here (:func:`~.solvers.nash_weights`)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ...registry import register_strategy
from ..task_gradients import jacobian_gramian
from .base import GradientAggregation, JacobianMode
from .solvers import nash_weights


@register_strategy("nash_mtl", aliases=("Nash_MTL", "NashMTL"))
class NashMTL(GradientAggregation):
    """Nash-MTL (Navon et al. 2022): weights solving the bargaining equation ``G alpha = 1/alpha``;
    the direction's norm is clipped to ``max_norm`` (1.0, the authors' default; 0 disables it), and
    the weights are recomputed every ``update_weights_every`` steps (the last ones are saved with
    the state)."""

    draws_random = False

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto",
                 max_norm: float = 1.0, update_weights_every: int = 1):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)
        if max_norm < 0:
            raise ValueError(f"nash_mtl: max_norm must be non-negative, got {max_norm}")
        if update_weights_every < 1:
            raise ValueError(f"nash_mtl: update_weights_every must be >= 1, got {update_weights_every}")
        self.max_norm, self.update_weights_every = float(max_norm), int(update_weights_every)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        if self.last_weights is None or self.num_steps % self.update_weights_every == 0:
            return nash_weights(gramian)
        return self.last_weights

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        if gramian is None:
            gramian = jacobian_gramian(jacobian.detach()).cpu()
        direction = super().aggregate(jacobian, gramian)
        weights = self.last_weights
        norm = math.sqrt(max(float(weights @ gramian @ weights), 0.0))  # ||w^T J||, on the host
        if self.max_norm > 0 and norm > self.max_norm:
            direction = direction * (self.max_norm / norm)
        return direction

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_weights": copy.deepcopy(self.last_weights)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_weights = copy.deepcopy(state["last_weights"])
