"""Gradient Vaccine (Wang et al. 2021, LibMTL ``GradVac``): Gramian weights solved here (:func:`~.solvers.gradvac_weights`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ...registry import register_strategy
from .base import GradientAggregation, JacobianMode
from .solvers import gradvac_weights


@register_strategy("gradvac", aliases=("GradVac",))
class GradVac(GradientAggregation):
    """Gradient Vaccine (Wang et al. 2021): pushes each pair's cosine similarity up to an EMA target
    (decay ``beta``, 0.01 in the paper); the corrected gradients are summed. The EMA targets are
    saved as ``state_dict()["vaccine_state"]``."""

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", beta: float = 0.01):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        #: K x K EMA targets ``phi_hat`` (float64), zero before the first batch.
        self.targets = torch.zeros(len(tasks), len(tasks), dtype=torch.float64)

    def gramian_weights(self, gramian: Tensor) -> Tensor:
        weights, self.targets = gradvac_weights(gramian, self.targets, self.beta)
        return weights

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vaccine_state": {"phi": self.targets.clone()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        phi = state["vaccine_state"]["phi"]
        k = len(self.tasks)
        if phi is not None and tuple(phi.shape) != (k, k):
            raise ValueError(f"gradvac: the state's EMA targets are {tuple(phi.shape)}, expected ({k}, {k}) for {k} tasks")
        self.targets = torch.zeros(k, k, dtype=torch.float64) if phi is None else phi.detach().to("cpu", torch.float64).clone()
