"""GradDrop (Chen et al. 2020, LibMTL ``GradDrop``), torchjd's aggregator."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...registry import register_strategy
from .. import torchjd_adapter as tjd
from .base import GradientAggregation


@register_strategy("graddrop", aliases=("GradDrop",))
class GradDrop(GradientAggregation):
    """GradDrop (Chen et al. 2020): per coordinate, keep only the gradients of one sign, chosen at
    random with the probability of the sign's purity. Applied to the shared parameters' gradients
    (torchjd's form; the paper applies it to activations)."""

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed)
        self.aggregator = tjd.graddrop(self.name)

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        return self.aggregator(jacobian)
