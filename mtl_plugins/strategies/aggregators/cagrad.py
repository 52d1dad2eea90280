"""CAGrad (Liu et al. 2021, LibMTL ``CAGrad``), solved here (:func:`~.solvers.cagrad_weights`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from ...registry import register_strategy
from .base import GradientAggregation, JacobianMode
from .solvers import cagrad_weights


@register_strategy("cagrad", aliases=("CAGrad",))
class CAGrad(GradientAggregation):
    """CAGrad (Liu et al. 2021): the direction within ``c ||g0||`` of the average gradient ``g0``
    that maximises the worst task's improvement. ``c = 0.4`` and ``rescale = 1`` as in the authors'
    NYUv2 setting."""

    draws_random = False

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto",
                 c: float = 0.4, rescale: Literal[0, 1, 2] = 1):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)
        if c < 0:
            raise ValueError(f"cagrad: c must be non-negative, got {c}")
        self.c, self.rescale = float(c), int(rescale)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return cagrad_weights(gramian, self.c, self.rescale)
