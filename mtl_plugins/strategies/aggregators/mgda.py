"""MGDA (Sener & Koltun 2018, LibMTL ``MGDA``): Frank-Wolfe on the Gramian (:func:`.solvers.mgda_weights`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ...registry import register_strategy
from .base import GradientAggregation, JacobianMode
from .solvers import mgda_weights


@register_strategy("mgda", aliases=("MGDA",))
class MGDA(GradientAggregation):
    """MGDA (Sener & Koltun 2018): the minimum-norm point of the convex hull of the task gradients
    (Frank-Wolfe; tolerance and iterations of the authors' MinNormSolver)."""

    draws_random = False

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", rep_grad: bool = False,
                 epsilon: float = 1e-5, max_iters: int = 250):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian, rep_grad=rep_grad)
        if not epsilon >= 0:
            raise ValueError(f"mgda: epsilon must be non-negative, got {epsilon}")
        if max_iters < 1:
            raise ValueError(f"mgda: max_iters must be >= 1, got {max_iters}")
        self.epsilon, self.max_iters = float(epsilon), int(max_iters)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return mgda_weights(gramian, self.epsilon, self.max_iters)
