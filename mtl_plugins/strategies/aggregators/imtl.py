"""IMTL-G (Liu et al. 2021, LibMTL ``IMTL``'s gradient part), torchjd's Gramian weighting."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...registry import register_strategy
from .base import JacobianMode, TorchJDWeighting


@register_strategy("imtl", aliases=("IMTL", "IMTL_G", "IMTLG"))
class IMTLG(TorchJDWeighting):
    """IMTL-G (Liu et al. 2021): the combination of the task gradients (weights summing to 1) whose
    projections onto every task's unit gradient are equal."""

    method = "imtl"
    draws_random = False

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", rep_grad: bool = False):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian, rep_grad=rep_grad)
        self.build_weighting()
