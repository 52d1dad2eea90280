"""A CPU stand-in for an fp16 GradScaler updater, shared by the strategy tests."""

from __future__ import annotations

import torch

from mtl_plugins.strategies.base import Updater


class ScaledUpdater(Updater):
    """Mimics a GradScaler: backward scales the loss, step unscales ``p.grad`` or skips on inf/NaN."""

    def __init__(self, optimizer: torch.optim.Optimizer, scale: float):
        super().__init__(optimizer)
        self.scale, self.skipped = scale, 0

    @property
    def loss_scale(self) -> float:
        return self.scale

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        (loss * self.scale).backward(retain_graph=retain_graph)

    def step(self, final: bool = False) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.skipped += 1
            return False
        for g in grads:
            g /= self.scale
        self.optimizer.step()
        return True
