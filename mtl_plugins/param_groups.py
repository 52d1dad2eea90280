"""Optimizer parameter groups: shared parameters at ``lr``, task-specific ones at ``lr * lr_ts``."""

from __future__ import annotations

from typing import Any

from torch import nn

from .structure_cache import cached


def _split_every_parameter(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    shared_ids = {id(p) for p in model.get_share_params()}
    every = list(model.parameters())
    return [p for p in every if id(p) in shared_ids], [p for p in every if id(p) not in shared_ids]


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(shared, task_specific) trainable parameters of a model with ``get_share_params()``, in the
    model's parameter order; wrappers with a ``.module`` (DDP, ...) are looked through.

    The split is cached until a module registers a parameter or a submodule
    (:mod:`~mtl_plugins.structure_cache`); which parameters are trainable is read on every call."""
    inner = model
    while not hasattr(inner, "get_share_params") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not hasattr(inner, "get_share_params"):
        raise TypeError(f"{type(model).__name__} has no get_share_params(): cannot split shared/task-specific parameters")
    shared, specific = cached(inner, _split_every_parameter)
    return [p for p in shared if p.requires_grad], [p for p in specific if p.requires_grad]


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
