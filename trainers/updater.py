"""The accelerate-backed :class:`Updater` that strategies drive inside ``Trainer.training_step``.

Inner steps (``step(final=False)``) happen at once: accelerate's backward (fp16 loss scaling),
gradient clipping at ``max_grad_norm``, the optimizer step (skipped by the grad scaler on an fp16
overflow). The batch's final step (``step(final=True)``) is deferred to the Trainer's own loop,
so the lr scheduler, ``grad_norm`` logging and optimizer callbacks advance once per batch (its
gradients are clipped here, when it is deferred, and the Trainer's loop reuses that norm). A
strategy with ``needs_step_outcome`` reads whether that step was applied: its final step is then
taken at once, like an inner step, and the Trainer's own step becomes a no-op.

Faults: a step is skipped on an fp16 overflow when the grad scaler lowers its scale (read from the
scaler, since accelerate's ``step_was_skipped`` misses the skip of fused optimizers). Without a
loss scaler, a NaN/infinite gradient norm raises
:class:`~mtl_plugins.strategies.base.NonFiniteGradientError` before any step.

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

from mtl_plugins.strategies.base import Updater, check_gradient_norm, gradient_norm

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
                 accumulation_steps: int = 1, defer_final: bool = True, buffers_shared: bool = True):
        super().__init__(optimizer, max_grad_norm if max_grad_norm and max_grad_norm > 0 else None, check_finite=True)
        self.accelerator = accelerator
        self.accumulation_steps = int(accumulation_steps)
        self.defer_final = bool(defer_final)
        #: False when each process keeps its own buffers (``ddp_broadcast_buffers=False``): strategies
        #: that read BatchNorm statistics take the main process's decisions (``agree``).
        self.buffers_shared = bool(buffers_shared)
        #: Divisor of every backward loss in the current batch (the Trainer's accumulation count).
        self.loss_divisor = 1.0
        #: True when the batch's final step was left to the Trainer's loop.
        self.deferred = False
        #: Gradient norm (before clipping) of the last step taken or deferred here, or None.
        self.last_grad_norm: Tensor | None = None
        #: True when the deferred final step's gradients were clipped here (norm in ``last_grad_norm``).
        self.clipped_deferred = False
        #: Optimizer steps skipped (fp16 overflow) inside batches.
        self.skipped_steps = 0

    def begin_batch(self, loss_divisor: float = 1.0) -> None:
        """Reset the per-batch state before ``strategy.step``."""
        self.loss_divisor = float(loss_divisor)
        self.deferred = False
        self.last_grad_norm = None
        self.clipped_deferred = False

    def zero_grad(self) -> None:
        if self.accumulation_steps > 1:
            return  # the Trainer clears gradients after each optimizer step
        for p in self.params:
            p.grad = None

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        self.accelerator.backward(loss / self.loss_divisor if self.loss_divisor != 1.0 else loss, retain_graph=retain_graph)
        average_gradients_(self.params)

    def step(self, final: bool = False) -> bool:
        scaler = self.scaler
        if final and self.defer_final:
            self.deferred = True
            if self.accumulation_steps == 1:  # the Trainer's loop steps on exactly these gradients
                self.last_grad_norm = self._clip(self.max_grad_norm or float("inf"))
                self.clipped_deferred = True
                norm = self.last_grad_norm
            else:  # accumulating: the Trainer clips the sum later; only check this batch's share
                norm = gradient_norm(self.params) if scaler is None else None
            if scaler is None:
                check_gradient_norm(norm)
            return True
        self.deferred = False
        if self.max_grad_norm is not None:
            self.last_grad_norm = self._clip(self.max_grad_norm)
        elif final:  # the norm the Trainer would have logged for its own step
            self.last_grad_norm = self._clip(float("inf"))
        if scaler is None:  # an fp16 scaler skips non-finite steps itself
            check_gradient_norm(self.last_grad_norm if self.last_grad_norm is not None else gradient_norm(self.params))
            self.optimizer.step()
            skipped = False
        else:
            scale = scaler.get_scale()
            self.optimizer.step()
            skipped = scaler.get_scale() < scale  # backed off: found inf/NaN, whatever the optimizer
            if hasattr(self.optimizer, "_is_overflow"):
                self.optimizer._is_overflow = skipped  # what the Trainer's loop reads for its scheduler
        self.skipped_steps += int(skipped)
        return not skipped

    def _clip(self, max_norm: float) -> Tensor:
        return self.accelerator.clip_grad_norm_(self.params, max_norm)

    def reduce_(self, tensors: Sequence[Tensor]) -> None:
        all_reduce_mean_(list(tensors))

    def agree(self, value: Any) -> Any:
        return broadcast_object(value)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The accelerator's enabled fp16 grad scaler, or None."""
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    @property
    def loss_scale(self) -> float:
        scaler = self.scaler
        return float(scaler.get_scale()) if scaler is not None else 1.0

    @staticmethod
    def sync_buffers(module: nn.Module) -> None:
        """Give every process the main process's buffers (BatchNorm statistics), like DDP does."""
        broadcast_buffers(module)
