"""Optimizer parameter groups: shared parameters at ``lr``, task-specific ones at ``lr * lr_ts``."""

from __future__ import annotations

from typing import Any

from torch import nn


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, task_specific) trainable parameters of a model with ``get_share_params()``, in the
    model's parameter order; wrappers with a ``.module`` (DDP, ...) are looked through."""
    inner = model
    while not hasattr(inner, "get_share_params") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not hasattr(inner, "get_share_params"):
        raise TypeError(f"{type(model).__name__} has no get_share_params(): cannot split shared/task-specific parameters")
    shared_ids = {id(p) for p in inner.get_share_params()}
    shared, specific = [], []
    for p in inner.parameters():
        if p.requires_grad:
            (shared if id(p) in shared_ids else specific).append(p)
    return shared, specific


def parameter_groups(model: nn.Module, lr: float, lr_ts: float = 1.0, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Parameter groups for a torch optimizer.

    ``lr_ts`` scales the task-specific learning rate; the selective-update recipes use
    ``lr_ts = K`` (heads at ``lr * K``), as in the released configs.
    """
    if lr_ts <= 0:
        raise ValueError(f"lr_ts must be positive, got {lr_ts}")
    shared, specific = split_parameters(model)
    groups = [{"params": shared, "lr": lr, "weight_decay": weight_decay, "name": "shared"}]
    if specific:
        groups.append({"params": specific, "lr": lr * lr_ts, "weight_decay": weight_decay, "name": "task_specific"})
    return groups
