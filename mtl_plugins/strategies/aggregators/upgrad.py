"""UPGrad (Quinton & Rey 2024), torchjd's Gramian weighting with a scipy dual-cone projector."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...registry import register_strategy
from .base import JacobianMode, TorchJDWeighting


@register_strategy("upgrad", aliases=("UPGrad",))
class UPGrad(TorchJDWeighting):
    """UPGrad (Quinton & Rey 2024): the mean of the task gradients, each projected onto the dual
    cone of all of them (no resulting direction conflicts with any task)."""

    method = "upgrad"
    draws_random = False

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto"):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)
        self.build_weighting()
