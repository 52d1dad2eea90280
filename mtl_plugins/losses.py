"""Per-task loss functions by name."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy over labelled positions (class dim 1)."""
    return F.cross_entropy(logits, target.long(), ignore_index=ignore_index)


def mse(prediction: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(prediction.reshape(target.shape), target.to(prediction.dtype))


def l1(prediction: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(prediction.reshape(target.shape), target.to(prediction.dtype))


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse, "l1": l1}


def get_loss(name_or_fn: str | LossFn) -> LossFn:
    """A loss function from its name (``cross_entropy``, ``mse``, ``l1``) or the function itself."""
    if callable(name_or_fn):
        return name_or_fn
    if name_or_fn not in LOSSES:
        raise ValueError(f"unknown loss {name_or_fn!r}; available: {', '.join(sorted(LOSSES))}")
    return LOSSES[name_or_fn]
