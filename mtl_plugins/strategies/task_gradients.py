"""Per-task gradients of one batch: the K x n Jacobian of the shared parameters and the task-specific sums.

As in LibMTL with ``rep_grad=False``: each task's gradient w.r.t. ``model.get_share_params()`` is
one row of a K x n Jacobian ``J``. Task-specific parameters receive their own task's gradient.

:func:`task_gradients` works through the updater:

1. ``updater.zero_grad()``, then **one forward pass** (``closure()``) where the task paths share the
   encoder's forward (any model without task-specific connections), and for each task ``t``
   ``updater.backward(w_t * L_t, retain_graph=True)`` through the retained graph (the last one frees
   it); the shared parameters' gradients are copied into row t of the Jacobian (on CPU a buffer
   the strategy keeps from batch to batch, :class:`JacobianBuffer`) and cleared after each. BatchNorm
   statistics are then updated once per batch, as by an EW step. A model with task-specific
   connections has one encoder path per task, so each task gets its own forward
   (``closure(task=t)``) and ordinary backward. Either way every backward is the updater's (loss
   scaling, distributed averaging);
2. the Jacobian (and the task-specific gradients) are averaged across processes, by
   ``updater.reduce_`` unless the updater's backward already averaged each gradient
   (``updater.averages_gradients``, as the Trainer's updater does), so every process aggregates the
   same matrix;
3. the gradients are divided by ``updater.loss_scale`` (several aggregators are not
   scale-equivariant); :func:`write_gradients` multiplies the combined direction back by the loss
   scale, because ``updater.step`` unscales what it finds in ``p.grad``.

Nothing is read to the host while the gradients are computed: :meth:`TaskGradients.read` reads the
losses, the Gramian ``J J^T`` and the task-specific gradients' sum (finiteness) in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..architectures.task_connections import has_task_connections
from ..param_groups import split_parameters
from ..structure_cache import cached
from .base import (
    Closure,
    NonFiniteGradientError,
    Updater,
    check_finite_losses,
    check_losses,
    non_finite_gradient_tasks,
    to_host,
)


def split_model_parameters(model: nn.Module | None, strategy: str) -> tuple[list[Tensor], list[Tensor]]:
    """(shared, task-specific) trainable parameters of ``model`` (:func:`~mtl_plugins.param_groups.split_parameters`);
    errors name ``strategy``."""
    if model is None:
        raise ValueError(
            f"strategy {strategy!r} aggregates the shared parameters' Jacobian: build it with "
            "model=<a model with get_share_params()> (the runner passes it)"
        )
    try:
        shared, specific = split_parameters(model)
    except TypeError:
        raise TypeError(f"strategy {strategy!r} needs a model with get_share_params(); got {type(model).__name__}") from None
    if not shared:
        raise ValueError(f"strategy {strategy!r}: the model has no trainable shared parameters")
    return shared, specific


#: Columns per block of :func:`jacobian_gramian` on CPU.
GRAMIAN_BLOCK = 1 << 15


def jacobian_gramian(matrix: Tensor, exact: bool = False) -> Tensor:
    """``M M^T`` in float64, on ``M``'s device.

    On CPU a long ``M`` is multiplied in blocks of :data:`GRAMIAN_BLOCK` columns, each block's
    float32 product added in float64: at 1.2M columns this is about twice as fast as one product
    (the blocks stay in cache) and its relative error is about 100x smaller. ``exact``: every block
    is converted to float64 first (for products that overflow float32), on any device.
    """
    k, n = matrix.shape
    if not exact and (matrix.device.type != "cpu" or n <= 2 * GRAMIAN_BLOCK):
        return (matrix @ matrix.T).to(torch.float64)
    products = matrix.new_zeros((k, k), dtype=torch.float64)
    for block in matrix.split(GRAMIAN_BLOCK, dim=1):
        block = block.to(torch.float64) if exact else block
        products += block @ block.T
    return products


def shares_encoder_forward(model: nn.Module | None) -> bool:
    """True when every task's path runs the same encoder forward (no task-specific connections), so
    one forward pass serves every task's gradient."""
    return model is not None and not cached(model, has_task_connections)


@dataclass
class HostValues:
    """What a step reads of its :class:`TaskGradients` (float64, CPU), in one transfer."""

    losses: list[float]
    finite: bool
    gramian: Tensor
    extra: list[Tensor]


@dataclass
class TaskGradients:
    """Per-task losses and gradients of one batch, averaged across processes and unscaled."""

    #: K: each task's loss as computed on this process (detached, on the model's device).
    losses: Tensor
    #: K x n: row t is task t's gradient w.r.t. the shared parameters, flattened.
    jacobian: Tensor
    #: For each task-specific parameter, ``sum_t c_t grad_t`` (None if no task reached it).
    specific: list[Tensor | None]

    def finite_flag(self) -> Tensor:
        """1.0 (on the device) when the Jacobian and every task-specific gradient are finite (max and
        min propagate NaN and inf, without a copy of the Jacobian)."""
        bounds = [b for g in (self.jacobian, *(g for g in self.specific if g is not None)) for b in (g.amax(), g.amin())]
        return torch.isfinite(torch.stack([b.to(torch.float64) for b in bounds])).all().to(torch.float64)

    def specific_total(self) -> Tensor:
        """The sum of every task-specific gradient (float64, on the device): non-finite if any entry is."""
        sums = [g.sum(dtype=torch.float64) for g in self.specific if g is not None]
        return torch.stack(sums).sum() if sums else self.losses.new_zeros(())

    def read(self, tasks: Sequence[str], *extra: Tensor) -> HostValues:
        """Losses, finiteness, Gramian ``J J^T`` and ``extra`` tensors, read to the host in one transfer;
        raises :class:`NonFiniteLossError` for a NaN/inf loss.

        Finiteness is read from the Gramian (a NaN or inf in row t makes ``G_tt`` non-finite) and
        the task-specific gradients' sum, so no pass over J is added. Only when one of them is
        non-finite (fp16 overflow, or finite gradients whose products overflow) the gradients
        themselves are checked, in a second read, and a finite Jacobian's Gramian is recomputed
        in float64."""
        losses, total, products, *rest = to_host(self.losses, self.specific_total(), jacobian_gramian(self.jacobian), *extra)
        values = check_finite_losses(losses.tolist(), tasks)
        finite = math.isfinite(float(total) + float(products.sum()))  # NaN/inf propagate into the sum
        if not finite and bool(self.finite_flag() == 1.0):
            finite, products = True, jacobian_gramian(self.jacobian, exact=True).cpu()
        return HostValues(values, finite, products, rest)


class JacobianBuffer:
    """The K x n Jacobian's storage, kept from batch to batch by one strategy on CPU.

    On CPU a K x n matrix freed at every batch is returned to the operating system by the C
    allocator and faulted back in page by page at the next one (on the 1.2M-parameter ResNet-10 HPS
    with K=4, about 10% of the batch time with glibc's defaults); the kept matrix is reallocated
    only when the shape or dtype changes, and whatever a step reads of it is valid until the next
    batch. Other devices get a new matrix per batch, once the first task's gradients are ready:
    their caching allocator reuses the block without that cost, and it is free for other work
    (evaluation) between batches. Either way the matrix exists during the backward passes, as
    LibMTL's does, so peak memory is at most LibMTL's: at most K x n floats more than holding each
    task's gradients until the last backward and assembling them then.
    """

    def __init__(self) -> None:
        self.matrix: Tensor | None = None

    def rows(self, like: Tensor, k: int, n: int, dtype: torch.dtype) -> Tensor:
        """A K x n matrix of ``dtype`` on ``like``'s device (its contents are overwritten)."""
        if like.device.type != "cpu":
            return like.new_empty((k, n), dtype=dtype)
        m = self.matrix
        if m is None or m.shape != (k, n) or m.dtype != dtype:
            self.matrix = m = like.new_empty((k, n), dtype=dtype)
        return m


def task_gradients(
    closure: Closure,
    updater: Updater,
    tasks: Sequence[str],
    loss_weights: dict[str, float],
    shared: Sequence[Tensor],
    specific: Sequence[Tensor],
    coefficients: Sequence[float] | None = None,
    *,
    one_forward: bool = True,
    batched: bool = False,
    buffer: JacobianBuffer | None = None,
) -> TaskGradients:
    """Per-task gradients through the updater; see the module docstring.

    ``one_forward``: one forward pass and K backward passes through the retained graph (else one
    forward and backward per task). ``batched`` (with ``one_forward``): the K backward passes as one
    batched vector-Jacobian product (:func:`batched_task_gradients`). ``coefficients`` weight each
    task's contribution to the task-specific sums (default 1). ``buffer``: the Jacobian's storage,
    reused across batches on CPU (default: a new matrix; the batched path allocates its own).
    """
    if batched:
        if not one_forward:
            raise ValueError("the batched Jacobian needs one forward pass shared by every task")
        return batched_task_gradients(closure, updater, tasks, loss_weights, shared, specific, coefficients)
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in shared) else torch.float32
    # Memory as LibMTL's loop: the K x n Jacobian and one task's gradients at a time. Without
    # coefficients, autograd itself sums the task-specific gradients in ``p.grad``, as one backward
    # of the summed loss would.
    specific_sum: list[Tensor | None] = [None] * len(specific)
    losses: list[Tensor] = []
    updater.zero_grad()  # the last step's gradients are not kept alive through the forward pass
    if one_forward:
        all_losses = closure()
        check_losses(all_losses, tasks)
    buffer = buffer or JacobianBuffer()
    for k, task in enumerate(tasks):
        if one_forward:
            loss = all_losses[task]
        else:
            task_losses = closure(task=task)
            check_losses(task_losses, [task])
            loss = task_losses[task]
        weight = loss_weights[task]
        updater.backward(loss if weight == 1.0 else weight * loss, retain_graph=one_forward and k < len(tasks) - 1)
        losses.append(loss.detach())
        if k == 0:  # after the first backward: on CPU the kept matrix, elsewhere a new one
            jacobian = buffer.rows(shared[0], len(tasks), sum(p.numel() for p in shared), dtype)
        torch.cat([p.new_zeros(p.numel(), dtype=dtype) if p.grad is None else p.grad.reshape(-1) for p in shared],
                  out=jacobian[k])
        for p in shared:
            p.grad = None
        if coefficients is not None:
            for i, p in enumerate(specific):
                if p.grad is not None:
                    g = float(coefficients[k]) * p.grad.to(dtype)
                    specific_sum[i] = g if specific_sum[i] is None else specific_sum[i] + g
                    p.grad = None
    if coefficients is None:
        specific_sum = [None if p.grad is None else p.grad.to(dtype) for p in specific]
        for p in specific:
            p.grad = None
    present = [g for g in specific_sum if g is not None]
    if not updater.averages_gradients:
        updater.reduce_([jacobian, *present])
    scale = float(updater.loss_scale)
    if scale != 1.0:
        jacobian /= scale
        for g in present:
            g /= scale
    return TaskGradients(torch.stack([v.reshape(()) for v in losses]).to(torch.float64), jacobian, specific_sum)


def batched_task_gradients(
    closure: Closure,
    updater: Updater,
    tasks: Sequence[str],
    loss_weights: dict[str, float],
    shared: Sequence[Tensor],
    specific: Sequence[Tensor],
    coefficients: Sequence[float] | None = None,
) -> TaskGradients:
    """One forward pass and the K vector-Jacobian products as one batched backward
    (``torch.autograd.grad(..., is_grads_batched=True)``, as torchjd does).

    It bypasses ``updater.backward``, so the updater's contract is kept here: the losses are
    multiplied by ``updater.loss_scale`` (as a scaled backward would) and the gradients averaged by
    ``updater.reduce_`` and unscaled. It holds K copies of the activation gradients at once.
    """
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in shared) else torch.float32
    losses = closure()
    check_losses(losses, tasks)
    scale = float(updater.loss_scale)
    total = torch.stack([loss_weights[t] * losses[t].reshape(()) for t in tasks])
    identity = torch.eye(len(tasks), dtype=total.dtype, device=total.device) * scale
    params = [*shared, *specific]
    grads = torch.autograd.grad(total, params, grad_outputs=identity, is_grads_batched=True, allow_unused=True)
    k = len(tasks)
    jacobian = torch.cat([(g if g is not None else p.new_zeros((k, *p.shape))).reshape(k, -1).to(dtype)
                          for p, g in zip(shared, grads[: len(shared)])], dim=1)
    weights = torch.tensor([1.0] * k if coefficients is None else [float(c) for c in coefficients], dtype=dtype)
    specific_sum = [None if g is None else torch.tensordot(weights.to(g.device), g.to(dtype), dims=1)
                    for g in grads[len(shared):]]
    present = [g for g in specific_sum if g is not None]
    updater.reduce_([jacobian, *present])
    if scale != 1.0:
        jacobian /= scale
        for g in present:
            g /= scale
    values = torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in tasks])
    return TaskGradients(values, jacobian, specific_sum)


def write_gradients(
    shared: Sequence[Tensor], direction: Tensor, specific: Sequence[Tensor],
    specific_grads: Sequence[Tensor | None], scale: float,
) -> None:
    """Store ``direction`` (shared) and ``specific_grads`` in ``p.grad``, multiplied by ``scale``."""
    offset = 0
    for p in shared:
        chunk = direction[offset : offset + p.numel()]
        p.grad = (chunk if scale == 1.0 else chunk * scale).reshape(p.shape).to(p.dtype)  # a view when possible
        offset += p.numel()
    for p, g in zip(specific, specific_grads):
        p.grad = None if g is None else (g if scale == 1.0 else g * scale).to(p.dtype)


def check_non_finite(grads: TaskGradients, updater: Updater, tasks: Sequence[str], strategy: str,
                     closure: Closure, params: Sequence[Tensor]) -> None:
    """Without loss scaling a non-finite gradient is an error naming the tasks whose gradient is
    non-finite (their shared rows, else their task-specific parameters, found on a fresh forward
    pass); with loss scaling, the updater skips the step."""
    if updater.loss_scale == 1.0:
        bad = [t for t, row in zip(tasks, grads.jacobian) if not bool(torch.isfinite(row).all())]
        bad = bad or non_finite_gradient_tasks(closure, tasks, params)
        raise NonFiniteGradientError(f"{strategy}: non-finite gradients for tasks {bad or list(tasks)}: the optimizer "
                                     "step was not taken and the model was not updated", tasks=bad or None)
