"""Gradient Vaccine (Wang et al. 2021, LibMTL ``GradVac``), torchjd's Gramian weighting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ...registry import register_strategy
from .. import torchjd_adapter as tjd
from .base import JacobianMode, TorchJDWeighting


@register_strategy("gradvac", aliases=("GradVac",))
class GradVac(TorchJDWeighting):
    """Gradient Vaccine (Wang et al. 2021): pushes each pair's cosine similarity up to an EMA target
    (decay ``beta``, 0.01 in the paper); the corrected gradients are summed. The EMA targets are
    saved as ``state_dict()["vaccine_state"]``."""

    method = "gradvac"

    def __init__(self, tasks: Sequence[str], *, model: nn.Module | None = None,
                 loss_weights: dict[str, float] | None = None, seed: int = 0,
                 jacobian: JacobianMode = "auto", beta: float = 0.01):
        super().__init__(tasks, model=model, loss_weights=loss_weights, seed=seed, jacobian=jacobian)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac: beta must be in [0, 1], got {beta}")
        self.build_weighting(beta=beta)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vaccine_state": tjd.weighting_state(self.weighting)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        tjd.load_weighting_state(self.weighting, state["vaccine_state"])
