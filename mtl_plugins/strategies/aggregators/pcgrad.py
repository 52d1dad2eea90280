"""PCGrad (Yu et al. 2020, LibMTL ``PCGrad``), torchjd's Gramian weighting."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...registry import register_strategy
from .base import JacobianMode, TorchJDWeighting


@register_strategy("pcgrad", aliases=("PCGrad",))
class PCGrad(TorchJDWeighting):
    """PCGrad (Yu et al. 2020): each task gradient is projected onto the normal plane of every
    conflicting gradient, in random order; the projected gradients are summed."""

    method = "pcgrad"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto"):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)
        self.build_weighting()
