"""A plain PyTorch training loop over the strategy protocol (no Trainer needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .loss_weights import check_loss_weights
from .strategies.base import Strategy, Updater


def make_closure(model: nn.Module, batch: Mapping[str, Any]) -> Callable[..., Mapping[str, Tensor]]:
    """``closure(task=None)``: a fresh forward pass on ``batch`` returning per-task losses."""

    def closure(task: str | None = None) -> Mapping[str, Tensor]:
        output = model(**batch, task=task)
        if output.get("losses") is None:
            raise ValueError("the model returned no per-task 'losses': pass labels named after the tasks")
        return output["losses"]

    return closure


def train_epoch(
    model: nn.Module,
    strategy: Strategy,
    batches: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer | Updater,
) -> None:
    """One pass over ``batches``, ``strategy.step`` per batch; the strategy must weight the losses as
    the model does (:func:`~mtl_plugins.loss_weights.strategy_for_model` builds it so)."""
    check_loss_weights(strategy, model)
    model.train()
    for batch in batches:
        strategy.step(make_closure(model, batch), optimizer)
