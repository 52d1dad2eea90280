"""Fast adaptive multitask optimization (Liu et al. 2023, LibMTL ``FAMO``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ...registry import register_strategy
from ..base import Closure, Updater
from .base import LossWeighting, OwnedParameter, stack_losses


@register_strategy("famo", aliases=("FAMO",))
class FAMO(LossWeighting):
    """FAMO (Liu et al. 2023): ``lambda_t = c z_t / (L_t + eps)``, ``z = softmax(w)``,
    ``c = 1 / sum_t z_t / (L_t + eps)`` (the gradient of ``c sum_t z_t log L_t``).

    The logits ``w`` take one Adam step (``lr`` 0.025, ``weight_decay`` 1e-3, the paper's values)
    along ``J_softmax(w)^T (log L_before - log L_after)``, where ``L_after`` are the batch's losses
    recomputed right after the model's update (one extra forward pass without gradient). The logits
    move only when that update was applied (``needs_step_outcome``: trainers take the final step at
    once instead of deferring it), so no state is carried from one batch to the next. Losses must be
    positive. FAMO reads the losses to the host twice per batch (before and after the update).
    """

    needs_positive_loss_weights = True

    needs_step_outcome = True
    eps = 1e-8

    def __init__(self, tasks: Sequence[str], *, loss_weights: Mapping[str, float] | None = None, seed: int = 0,
                 lr: float = 0.025, weight_decay: float = 1e-3):
        super().__init__(tasks, loss_weights=loss_weights, seed=seed)
        if weight_decay < 0:
            raise ValueError(f"famo: weight_decay must be non-negative, got {weight_decay}")
        self.logits = OwnedParameter(torch.zeros(len(self.tasks), dtype=torch.float64), lr, weight_decay, owner=self.name)

    def _values(self, losses: Mapping[str, Tensor] | Tensor) -> Tensor:
        values = losses if isinstance(losses, Tensor) else stack_losses(losses, self.tasks)
        if bool((values <= 0).any()):
            raise ValueError(f"famo needs positive losses, got {dict(zip(self.tasks, values.tolist()))}")
        return values

    def weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        shifted = self._values(losses) + self.eps
        z = torch.softmax(self.logits.tensor.detach(), dim=0)
        weights = z / shifted / (z / shifted).sum()
        return dict(zip(self.tasks, weights.tolist()))

    def update_logits(self, before: Tensor, after: Tensor) -> None:
        """One Adam step of the logits from the losses before and after a model update."""
        delta = torch.log(self._values(before) + self.eps) - torch.log(self._values(after) + self.eps)
        logits = self.logits.tensor
        with torch.enable_grad():
            grad = torch.autograd.grad(torch.softmax(logits, dim=0), logits, grad_outputs=delta.to(logits))[0]
        self.logits.apply(grad)

    def after_step(self, closure: Closure, updater: Updater, values: Tensor, stepped: bool) -> None:
        """Recompute the batch's losses after the applied update and move the logits."""
        if not stepped:
            return
        with torch.no_grad():
            after = self.mean_losses(closure(), updater)
        self.update_logits(values, after)

    def backward(self, losses: Mapping[str, Tensor] | Tensor, updater: Updater | None = None, **kwargs: Any):
        raise NotImplementedError("famo updates its weights from the losses after the model's step: use step(closure, optimizer)")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "logits_state": self.logits.state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.logits.load(state["logits_state"])
