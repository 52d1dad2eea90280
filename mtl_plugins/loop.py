"""A plain PyTorch training loop over the strategy protocol (no Trainer needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

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
    *,
    scheduler: Any = None,
    on_step: Callable[[dict[str, float]], None] | None = None,
) -> None:
    """One pass over ``batches``: ``strategy.step`` per batch, then one scheduler step."""
    model.train()
    for batch in batches:
        losses = strategy.step(make_closure(model, batch), optimizer)
        if scheduler is not None:
            scheduler.step()
        if on_step is not None:
            on_step(losses)
