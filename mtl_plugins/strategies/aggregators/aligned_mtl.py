"""Aligned-MTL (Senushkin et al. 2023, LibMTL ``Aligned_MTL``), torchjd's Gramian weighting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

from ...registry import register_strategy
from .base import JacobianMode, TorchJDWeighting


@register_strategy("aligned_mtl", aliases=("Aligned_MTL", "AlignedMTL"))
class AlignedMTL(TorchJDWeighting):
    """Aligned-MTL (Senushkin et al. 2023): the Jacobian's singular values are equalised to the
    smallest one (``scale_mode``) and the aligned gradients summed, as in the authors' code."""

    method = "aligned_mtl"
    draws_random = False

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", rep_grad: bool = False,
                 scale_mode: Literal["min", "median", "rmse"] = "min"):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian, rep_grad=rep_grad)
        self.build_weighting(scale_mode=scale_mode)
