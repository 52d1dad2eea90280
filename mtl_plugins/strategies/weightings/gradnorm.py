"""GradNorm (Chen et al. 2018, LibMTL ``GradNorm``): loss weights trained to balance gradient norms."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ...registry import register_strategy
from ..base import Closure, Strategy, Updater, as_updater
from ..task_gradients import (
    JacobianBuffer,
    shares_encoder_forward,
    split_model_parameters,
    task_gradients,
    write_gradients,
)
from .base import OwnedParameter


@register_strategy("gradnorm", aliases=("GradNorm",))
class GradNorm(Strategy):
    """GradNorm (Chen et al. 2018): weights ``lambda = K softmax(w)`` trained so that each task's
    weighted gradient norm ``lambda_t ||g_t||`` (w.r.t. the shared parameters) approaches
    ``mean_k(lambda_k ||g_k||) * r_t^alpha``, with ``r_t`` the task's loss ratio ``L_t / L_t(0)``
    relative to the mean ratio; ``alpha = 1.5``. ``L(0)`` is the first step's losses.

    Needs the per-task gradients (as the gradient aggregators: one forward and K retained backward
    passes, or one batched backward with ``jacobian="batched"``) and the model (``model=``). ``w`` is
    trained by the strategy's own Adam (``lr``).
    """

    needs_task_forward = True
    # Its finite check sees overflow in the per-task gradients, but not in the gradients written back
    # at the loss scale; the step's reported outcome covers both.
    needs_step_outcome = True

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 alpha: float = 1.5, lr: float = 1e-3, jacobian: Literal["loop", "batched"] = "loop"):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if jacobian not in ("loop", "batched"):
            raise ValueError(f"gradnorm: jacobian must be 'loop' or 'batched', got {jacobian!r}")
        self.jacobian = jacobian
        if alpha < 0:
            raise ValueError(f"gradnorm: alpha must be non-negative, got {alpha}")
        self.model, self.alpha = model, float(alpha)
        self.logits = OwnedParameter(torch.zeros(len(self.tasks), dtype=torch.float64), lr, owner=self.name)
        self.initial_losses: Tensor | None = None
        self.last_weights: list[float] | None = None
        self.jacobian_buffer = JacobianBuffer()

    def task_weights(self) -> Tensor:
        return len(self.tasks) * torch.softmax(self.logits.tensor.detach(), dim=0)

    def balance_gradient(self, norms: Tensor, values: Tensor) -> Tensor:
        """Gradient of ``sum_t |lambda_t ||g_t|| - target_t|`` w.r.t. the logits ``w``."""
        logits = self.logits.tensor
        ratios = values / self.initial_losses
        relative = ratios / ratios.mean()
        with torch.enable_grad():
            weighted = len(self.tasks) * torch.softmax(logits, dim=0) * norms
            target = (weighted.mean() * relative**self.alpha).detach()
            return torch.autograd.grad((weighted - target).abs().sum(), logits)[0]

    def step(self, closure: Closure, optimizer: torch.optim.Optimizer | Updater) -> dict[str, float]:
        updater = as_updater(optimizer)
        shared, specific = split_model_parameters(self.model, self.name)
        weights = self.task_weights()
        grads = task_gradients(closure, updater, self.tasks, self.loss_weights, shared, specific, weights.tolist(),
                               one_forward=shares_encoder_forward(self.model), batched=self.jacobian == "batched",
                               buffer=self.jacobian_buffer)
        static = torch.tensor([self.loss_weights[t] for t in self.tasks], dtype=torch.float64)
        averaged = grads.losses * static.to(grads.losses.device)
        updater.reduce_([averaged])
        host = grads.read(self.tasks, averaged)  # the step's one host read
        values = host.extra[0]
        if not host.finite and updater.loss_scale == 1.0:
            raise FloatingPointError(f"{self.name}: non-finite gradients")
        direction = weights.to(grads.jacobian) @ grads.jacobian
        write_gradients(shared, direction, specific, grads.specific, float(updater.loss_scale))
        stepped = updater.step(final=True) is not False
        if host.finite and stepped:
            if self.initial_losses is None:
                self.initial_losses = values.clone()
            norms = host.gramian.diagonal().clamp(min=0.0).sqrt()
            self.logits.apply(self.balance_gradient(norms, values))
        self.last_weights = weights.tolist()
        self.num_steps += 1
        return dict(zip(self.tasks, host.losses))

    def state_dict(self) -> dict[str, Any]:
        initial = None if self.initial_losses is None else self.initial_losses.clone()
        return {**super().state_dict(), "initial_losses": initial, "weights_state": self.logits.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        initial = state["initial_losses"]
        self.initial_losses = None if initial is None else initial.clone()
        self.logits.load(state["weights_state"])

    def log_metrics(self) -> dict[str, float]:
        return {} if self.last_weights is None else {f"weight/{t}": w for t, w in zip(self.tasks, self.last_weights)}
