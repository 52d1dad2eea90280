"""MGDA (Sener & Koltun 2018, LibMTL ``MGDA``), torchjd's Gramian weighting."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ...registry import register_strategy
from .base import JacobianMode, TorchJDWeighting


@register_strategy("mgda", aliases=("MGDA",))
class MGDA(TorchJDWeighting):
    """MGDA (Sener & Koltun 2018): the minimum-norm point of the convex hull of the task gradients
    (Frank-Wolfe; tolerance and iterations of the authors' MinNormSolver)."""

    method = "mgda"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", rep_grad: bool = False,
                 epsilon: float = 1e-5, max_iters: int = 250):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian, rep_grad=rep_grad)
        if not epsilon >= 0:
            raise ValueError(f"mgda: epsilon must be non-negative, got {epsilon}")
        if max_iters < 1:
            raise ValueError(f"mgda: max_iters must be >= 1, got {max_iters}")
        self.build_weighting(epsilon=epsilon, max_iters=max_iters)
