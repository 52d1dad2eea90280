"""Per-task gradients with respect to the shared representation (LibMTL's ``rep_grad=True``).

One forward pass; the encoder's output ``z`` (``B x ...``) is cut from its graph, each task's loss
is back-propagated only through its head, giving the per-sample representation gradients
``dL_t/dz`` (``K x B x ...``) and the heads' gradients; the aggregator combines them into one
representation gradient ``d``, and one backward of ``<z, d>`` through the encoder gives the shared
parameters' gradient. So the encoder is back-propagated once instead of K times.

This is an approximation of aggregating the shared parameters' gradients: the weights are computed
from the representation gradients summed over the batch, as LibMTL does, not from the parameter
Jacobian. Across processes those sums are averaged (``updater.reduce_``), so every process uses the
weights of the whole batch and the averaged parameter gradients equal one process's on the
concatenated batch. Needs a model with an ``encoder`` module whose output is one tensor (e.g. ``HPS``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import Closure, Updater, check_losses
from .task_gradients import TaskGradients


def shared_encoder(model: nn.Module | None, strategy: str) -> nn.Module:
    """The module whose output is the shared representation (``model.encoder``, unwrapping ``.module``)."""
    inner = model
    while inner is not None and not isinstance(getattr(inner, "encoder", None), nn.Module):
        inner = getattr(inner, "module", None)
    if inner is None:
        raise TypeError(f"{strategy}: rep_grad=True needs a model with an `encoder` module whose output is the "
                        f"shared representation (e.g. HPS); got {type(model).__name__}")
    return inner.encoder


@dataclass
class RepresentationTap:
    """The encoder's output of the last forward pass and the detached leaf the heads saw."""

    output: Tensor | None = None
    leaf: Tensor | None = None


@contextmanager
def tap_representation(encoder: nn.Module) -> Iterator[RepresentationTap]:
    """Within the block, the encoder's output is handed to the heads as a detached leaf."""
    tap = RepresentationTap()

    def hook(module: nn.Module, inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise TypeError(f"rep_grad=True needs an encoder returning one tensor, got {type(output).__name__}")
        if tap.output is not None:
            raise RuntimeError("rep_grad=True needs one encoder forward shared by every task (no task-specific "
                               "connections)")
        tap.output, tap.leaf = output, output.detach().requires_grad_(True)
        return tap.leaf

    handle = encoder.register_forward_hook(hook)
    try:
        yield tap
    finally:
        handle.remove()


@dataclass
class RepresentationGradients(TaskGradients):
    """:class:`TaskGradients` whose ``jacobian`` rows are the representation gradients summed over the
    batch (``K x D``, what the weights are computed from); ``per_sample`` keeps them per sample."""

    #: K x B x ...: each task's gradient w.r.t. the representation, unscaled (this process's samples).
    per_sample: Tensor | None = None
    #: The encoder's output (with its graph), for :func:`backward_representation`.
    output: Tensor | None = None


def representation_gradients(
    closure: Closure, updater: Updater, tasks: Sequence[str], loss_weights: dict[str, float],
    encoder: nn.Module, specific: Sequence[Tensor],
) -> RepresentationGradients:
    """One forward pass; per task, a backward through its head only (see the module docstring).
    Task-specific gradients are averaged across processes and unscaled, as for the parameter path."""
    with tap_representation(encoder) as tap:
        losses = closure()
    check_losses(losses, tasks)
    if tap.leaf is None:
        raise RuntimeError("rep_grad=True: the forward pass did not run the model's encoder")
    rows: list[Tensor] = []
    specific_sum: list[Tensor | None] = [None] * len(specific)
    for task in tasks:
        updater.zero_grad()
        tap.leaf.grad = None
        updater.backward(loss_weights[task] * losses[task], retain_graph=True)
        rows.append(tap.leaf.grad.clone() if tap.leaf.grad is not None else torch.zeros_like(tap.leaf))
        for i, p in enumerate(specific):
            if p.grad is not None:
                specific_sum[i] = p.grad.clone() if specific_sum[i] is None else specific_sum[i] + p.grad
    present = [g for g in specific_sum if g is not None]
    per_sample = torch.stack(rows)
    summed = per_sample.reshape(len(tasks), per_sample.shape[1], -1).sum(1)
    updater.reduce_([summed, *([] if updater.averages_gradients else present)])
    scale = float(updater.loss_scale)
    if scale != 1.0:
        for g in (per_sample, summed, *present):
            g /= scale
    values = torch.stack([losses[t].detach().reshape(()).to(torch.float64) for t in tasks])
    return RepresentationGradients(values, summed, specific_sum, per_sample, tap.output)


def backward_representation(grads: RepresentationGradients, direction: Tensor, updater: Updater,
                            shared: Sequence[Tensor]) -> None:
    """Back-propagate the combined representation gradient ``direction`` through the encoder (one
    backward through the updater: scaled, and averaged across processes like any other)."""
    updater.zero_grad()
    updater.backward((grads.output * direction.detach().to(grads.output.dtype)).sum())
    if not updater.averages_gradients:
        updater.reduce_([p.grad for p in shared if p.grad is not None])
