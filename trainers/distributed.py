"""Collectives used by the trainer's updater: averaging, broadcasting, gradient synchronisation.

Every function is the identity in a single process. Tensors are flattened per dtype and device so
that each call issues one collective per dtype, whatever the number of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _by_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` across processes, in place."""
    size = world_size()
    if size == 1 or not tensors:
        return
    for group in _by_dtype(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= size
        for t, chunk in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(chunk.view_as(t))


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every process the buffers (BatchNorm statistics) of process ``src``, like DDP does.

    Other processes get new buffer tensors instead of in-place copies, so a graph that saved the
    old buffers for its backward pass (BatchNorm does) stays valid: safe right after a forward pass.
    """
    if world_size() == 1:
        return
    named = list(module.named_buffers())
    if not named:
        return
    rank = dist.get_rank()
    for group in _by_dtype([b for _, b in named]).values():
        ids = {id(b) for b in group}
        names = [name for name, b in named if id(b) in ids]
        flat = torch.cat([b.reshape(-1) for b in group])
        dist.broadcast(flat, src=src)
        if rank == src:
            continue
        for name, b, chunk in zip(names, group, flat.split([b.numel() for b in group])):
            owner, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(owner), leaf, chunk.view_as(b).clone())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Process ``src``'s ``value`` (any picklable object) on every process."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def average_gradients_(params: Sequence[Tensor]) -> None:
    """Average ``.grad`` across processes like DDP's reducer does after a backward pass.

    A parameter without a gradient on every process keeps ``grad = None`` (so optimizers leave it
    alone); one with a gradient on some processes only counts zeros for the others.
    """
    if world_size() == 1:
        return
    device = next((p.grad.device for p in params if p.grad is not None), params[0].device if params else "cpu")
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    used = [p for p, count in zip(params, present.tolist()) if count > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean_([p.grad for p in used])
