"""Equal weighting (LibMTL ``EW``): the summed loss with optional static per-task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ..registry import register_strategy
from .base import WeightingStrategy


@register_strategy("ew", aliases=("EW",))
class EqualWeighting(WeightingStrategy):
    """``L = sum_t w_t L_t`` with static weights ``w_t`` (default 1), one optimizer step per batch."""

    supports_accumulation = True  # one backward of a statically weighted loss, no per-batch state

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return dict(self.loss_weights)
