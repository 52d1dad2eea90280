"""PCGrad (Yu et al. 2020, LibMTL ``PCGrad``): Gramian weights solved here (:func:`~.solvers.pcgrad_weights`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...registry import register_strategy
from .base import GradientAggregation, JacobianMode
from .solvers import pcgrad_weights


@register_strategy("pcgrad", aliases=("PCGrad",))
class PCGrad(GradientAggregation):
    """PCGrad (Yu et al. 2020): each task gradient is projected onto the normal plane of every
    conflicting gradient, in random order; the projected gradients are summed."""

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto"):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return pcgrad_weights(gramian)
