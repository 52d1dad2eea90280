"""The base of the loss weightings: one backward pass of ``sum_t lambda_t L_t`` with adaptive ``lambda_t``.

Each step reads the batch's losses, averages them across processes (``updater.reduce_``) and
computes the weights from those averages, so every process applies the same weights and keeps the
same strategy state. The static ``loss_weights`` multiply the losses before the method sees them.

Learnable weights (``uw``'s log-variances, ``famo``'s logits, ``gradnorm``'s weights) are an
:class:`OwnedParameter`: owned by the strategy and trained by its own small Adam optimizer (option
``lr``) inside ``step``, right after the model's update, and only when that update was applied (an
fp16 overflow skips it: ``needs_step_outcome`` asks trainers to take the final step at once and
report it); they are saved by ``state_dict()``. Nothing needs adding to the model's optimizer.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..base import (
    Closure,
    Updater,
    WeightingStrategy,
    as_updater,
    check_finite_losses,
    check_losses,
    checked_step,
    to_host,
)


def stack_losses(losses: Mapping[str, Tensor | float], tasks: Sequence[str]) -> Tensor:
    """The losses of ``tasks`` as one float64 CPU vector (detached)."""
    return torch.stack([torch.as_tensor(losses[t]).detach().reshape(()).to(torch.float64).cpu() for t in tasks])


class OwnedParameter:
    """A strategy-owned tensor trained by its own Adam; ``state()``/``load()`` for checkpoints."""

    def __init__(self, value: Tensor, lr: float, weight_decay: float = 0.0, *, parameter: nn.Parameter | None = None,
                 owner: str = "strategy"):
        if not lr > 0:
            raise ValueError(f"{owner}: lr must be positive, got {lr}")
        self.tensor = parameter if parameter is not None else nn.Parameter(value.clone())
        self.optimizer = torch.optim.Adam([self.tensor], lr=lr, weight_decay=weight_decay)

    def apply(self, grad: Tensor) -> None:
        """One Adam step along ``grad``."""
        self.tensor.grad = grad.detach().to(self.tensor)
        self.optimizer.step()
        self.tensor.grad = None

    def state(self) -> dict[str, Any]:
        """A copy of the value and of the Adam state."""
        return {"value": self.tensor.detach().clone(), "optimizer": copy.deepcopy(self.optimizer.state_dict())}

    def load(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.tensor.copy_(state["value"])
        self.optimizer.load_state_dict(state["optimizer"])


class LossWeighting(WeightingStrategy):
    """Base of the loss-based weightings: :meth:`weights` sees the process-averaged losses."""

    #: True when :meth:`weights` moves the strategy's state (DWA's epoch sums, RLW's generator): the
    #: state is then saved before each step and restored if the step is refused for a non-finite gradient.
    weights_move_state: bool = False

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        self.last_weights: list[float] | None = None

    def mean_losses(self, losses: Mapping[str, Tensor], updater: Updater) -> Tensor:
        """The (statically weighted) losses averaged across processes, float64 on CPU."""
        device = losses[self.tasks[0]].device
        values = torch.stack([self.loss_weights[t] * losses[t].detach().reshape(()).to(torch.float64) for t in self.tasks])
        values = values.to(device)
        updater.reduce_([values])
        return values.cpu()

    def after_step(self, closure: Closure, updater: Updater, values: Tensor, stepped: bool) -> None:
        """Hook after the model update (learnable weights update here)."""

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        losses = closure()
        check_losses(losses, self.tasks)
        raw = torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in self.tasks])
        averaged = raw * torch.tensor([self.loss_weights[t] for t in self.tasks], dtype=torch.float64).to(raw.device)
        updater.reduce_([averaged])
        raw, values = to_host(raw, averaged)  # the losses' host read, before the weights exist
        observed = check_finite_losses(raw.tolist(), self.tasks)
        before = self.state_dict() if self.weights_move_state else None
        weights = self.weights(dict(zip(self.tasks, values)))
        updater.zero_grad()
        updater.backward(sum(float(weights[t]) * self.loss_weights[t] * losses[t] for t in self.tasks))
        # a step refused for a non-finite gradient was not applied: neither is it to the weighting
        restore = None if before is None else functools.partial(self.load_state_dict, before)
        stepped = checked_step(updater, closure, self.tasks, f"{self.name}: ", on_error=restore)
        self.last_weights = [float(weights[t]) for t in self.tasks]
        self.after_step(closure, updater, values, stepped is not False)
        self.num_steps += 1
        return dict(zip(self.tasks, observed))

    def log_metrics(self) -> dict[str, float]:
        return {} if self.last_weights is None else {f"weight/{t}": w for t, w in zip(self.tasks, self.last_weights)}


def scalarizer_gradients(scalarizer: nn.Module, values: Tensor, params: Sequence[Tensor] = ()) -> tuple[Tensor, ...]:
    """Derivatives of ``scalarizer(values)`` w.r.t. ``values`` (the task weights) and ``params``.

    ``uw``, ``gls`` and ``rlw`` use torchjd's scalarizers (extra ``baselines``) this way, so the model
    receives exactly the scalarizer's gradient.
    """
    values = values.detach().to(torch.float64).requires_grad_(True)
    with torch.enable_grad():
        total = scalarizer(values)
        return tuple(g.detach() for g in torch.autograd.grad(total, [values, *params]))
