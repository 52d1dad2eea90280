"""Geometric loss strategy (Chennupati et al. 2019, LibMTL ``GLS``), torchjd's scalarizer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from ...registry import register_strategy
from .. import torchjd_adapter as tjd
from .base import LossWeighting, scalarizer_gradients, stack_losses


@register_strategy("gls", aliases=("GLS",))
class GeometricLossStrategy(LossWeighting):
    """GLS (Chennupati et al. 2019): minimise the geometric mean ``(prod_t L_t)^(1/K)``; its gradient
    is ``sum_t GM / (K L_t) * grad L_t``. Losses must be positive."""

    needs_positive_loss_weights = True

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.scalarizer = tjd.scalarizer(self.name, "gls", len(self.tasks))

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        values = stack_losses(losses, self.tasks)
        if bool((values <= 0).any()):
            raise ValueError(f"gls needs positive losses, got {dict(zip(self.tasks, values.tolist()))}")
        return dict(zip(self.tasks, scalarizer_gradients(self.scalarizer, values)[0].tolist()))
