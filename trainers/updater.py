"""The accelerate-backed :class:`Updater` that strategies drive inside ``Trainer.training_step``.

Inner steps (``step(final=False)``) happen at once: accelerate's backward (fp16 loss scaling),
gradient clipping at ``max_grad_norm``, the optimizer step (skipped by the grad scaler on an fp16
overflow). The batch's final step (``step(final=True)``) is deferred to the Trainer's own loop,
so the lr scheduler, ``grad_norm`` logging and optimizer callbacks advance once per batch. A
strategy with ``needs_step_outcome`` reads whether that step was applied: its final step is then
taken at once, like an inner step, and the Trainer's own step becomes a no-op.

Distributed training: the strategy runs under DDP's ``no_sync``, so DDP's reducer (which expects
a gradient for every parameter that reaches the forward output) is bypassed. Instead every
backward pass is followed by one all-reduce of the gradients it produced: per-task and per-group
gradients are averaged over processes exactly as DDP would average a full backward, parameters
untouched on every process keep ``grad = None``, and every process takes the same step. After
each forward pass the buffers (BatchNorm statistics) of the main process are given to the others,
as DDP does before its forward passes, so strategy decisions read the same state everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mtl_plugins.strategies.base import Updater

from .distributed import all_reduce_mean_, average_gradients_, broadcast_buffers, broadcast_object


class AcceleratedUpdater(Updater):
    """Drives an ``accelerate`` ``AcceleratedOptimizer`` for one strategy.

    ``accumulation_steps > 1`` (gradient accumulation) is for single-backward strategies only:
    ``zero_grad`` then leaves the accumulating gradients alone and losses are divided by the
    number of accumulated batches, as the Trainer does. ``defer_final=False`` takes the final step
    at once and returns whether it was applied.
    """

    averages_gradients = True  # every backward is followed by one all-reduce of its gradients

    def __init__(self, accelerator: Any, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None,
                 accumulation_steps: int = 1, defer_final: bool = True):
        super().__init__(optimizer, max_grad_norm if max_grad_norm and max_grad_norm > 0 else None)
        self.accelerator = accelerator
        self.accumulation_steps = int(accumulation_steps)
        self.defer_final = bool(defer_final)
        #: Divisor of every backward loss in the current batch (the Trainer's accumulation count).
        self.loss_divisor = 1.0
        #: True when the batch's final step was left to the Trainer's loop.
        self.deferred = False
        #: Gradient norm (before clipping) of the last step taken here, or None.
        self.last_grad_norm: Tensor | None = None
        #: Optimizer steps skipped (fp16 overflow) inside batches.
        self.skipped_steps = 0

    def begin_batch(self, loss_divisor: float = 1.0) -> None:
        """Reset the per-batch state before ``strategy.step``."""
        self.loss_divisor = float(loss_divisor)
        self.deferred = False
        self.last_grad_norm = None

    def zero_grad(self) -> None:
        if self.accumulation_steps > 1:
            return  # the Trainer clears gradients after each optimizer step
        for p in self.params:
            p.grad = None

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        self.accelerator.backward(loss / self.loss_divisor if self.loss_divisor != 1.0 else loss, retain_graph=retain_graph)
        average_gradients_(self.params)

    def step(self, final: bool = False) -> bool:
        if final and self.defer_final:
            self.deferred = True
            return True
        self.deferred = False
        if self.max_grad_norm is not None:
            self.last_grad_norm = self.accelerator.clip_grad_norm_(self.params, self.max_grad_norm)
        elif final:  # the norm the Trainer would have logged for its own step
            self.last_grad_norm = self.accelerator.clip_grad_norm_(self.params, float("inf"))
        self.optimizer.step()
        skipped = bool(getattr(self.optimizer, "step_was_skipped", False))
        self.skipped_steps += int(skipped)
        return not skipped

    def reduce_(self, tensors: Sequence[Tensor]) -> None:
        all_reduce_mean_(list(tensors))

    def agree(self, value: Any) -> Any:
        return broadcast_object(value)

    @property
    def loss_scale(self) -> float:
        scaler = getattr(self.accelerator, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0

    @staticmethod
    def sync_buffers(module: nn.Module) -> None:
        """Give every process the main process's buffers (BatchNorm statistics), like DDP does."""
        broadcast_buffers(module)
