"""The base of the gradient aggregators: per-task gradients in, one update direction out.

One step per batch: the per-task gradients (:mod:`~mtl_plugins.strategies.task_gradients`: one
forward pass and K retained backward passes unless the model has task-specific connections;
averaged across processes, unscaled), one host read (losses, finiteness and the Gramian ``J J^T``
together), the aggregator's direction for the shared parameters (task-specific parameters keep
their own task's gradient), written back at the loss scale, and ``updater.step(final=True)``. The
strategies take the model (``model=``, filled in by the runner) to find the shared parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import torchjd_adapter as tjd
from ..base import Closure, Strategy, Updater, as_updater
from ..task_gradients import (
    check_non_finite,
    shares_encoder_forward,
    split_model_parameters,
    task_gradients,
    write_gradients,
)


class GradientAggregation(Strategy):
    """Base of the Jacobian-aggregating strategies: subclasses implement :meth:`aggregate`
    (Jacobian -> direction) or :meth:`gramian_weights` (Gramian -> K weights)."""

    needs_task_forward = True

    def __init__(
        self, tasks: Sequence[str], *, model: nn.Module | None = None,
        loss_weights: dict[str, float] | None = None, seed: int = 0,
    ):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.model = model
        self.last_weights: Tensor | None = None

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        """K weights from the K x K Gramian (float64, CPU)."""
        raise NotImplementedError

    def aggregate(self, jacobian: Tensor, gramian: Tensor | None = None) -> Tensor:
        """The combined direction for the shared parameters (default: weights of the Gramian
        ``J J^T`` times ``J``). ``gramian`` (float64, CPU) saves computing and reading it again."""
        if gramian is None:
            gramian = (jacobian @ jacobian.T).detach().to("cpu", torch.float64)
        weights = self.gramian_weights(gramian)
        self.last_weights = weights
        return weights.to(jacobian) @ jacobian

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        shared, specific = split_model_parameters(self.model, self.name)
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        grads = task_gradients(closure, updater, self.tasks, self.loss_weights, shared, specific,
                               one_forward=shares_encoder_forward(self.model))
        host = grads.read(self.tasks)
        if host.finite:
            with tjd.seeded(seed, grads.jacobian.device):
                direction = self.aggregate(grads.jacobian, host.gramian)
        else:  # fp16 overflow: hand the non-finite sum to the updater, which skips the step
            check_non_finite(grads, updater, self.tasks, self.name)
            direction = grads.jacobian.sum(0)
        write_gradients(shared, direction, specific, grads.specific, float(updater.loss_scale))
        updater.step(final=True)
        self.num_steps += 1
        return dict(zip(self.tasks, host.losses))

    def log_metrics(self) -> dict[str, float]:
        if self.last_weights is None:
            return {}
        return {f"weight/{t}": float(w) for t, w in zip(self.tasks, self.last_weights)}


class TorchJDWeighting(GradientAggregation):
    """A Gramian weighting taken from torchjd (built, and checked installed, at construction);
    subclasses name it in ``method`` and call :meth:`build_weighting` with its options."""

    method = ""

    def build_weighting(self, **options: Any) -> None:
        self.weighting = tjd.gramian_weighting(self.name, self.method, len(self.tasks), **options)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        return self.weighting(gramian)
