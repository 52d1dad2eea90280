"""Collectives used by the trainer's updater: averaging, broadcasting, gradient synchronisation.

Every function is the identity in a single process. Tensors are flattened per dtype and device into
buckets of at most ``BUCKET_BYTES`` (as DDP's reducer does), so a call issues few collectives and
never copies all gradients of a large model at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

#: Largest flattened bucket per collective (DDP's default bucket size); a bigger tensor is its own bucket.
BUCKET_BYTES = 25 * 2**20


def world_size() -> int:
    """Number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _by_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


def _buckets(tensors: Sequence[Tensor], limit: int = BUCKET_BYTES) -> list[list[Tensor]]:
    """Consecutive runs of same-dtype, same-device ``tensors`` of at most ``limit`` bytes each."""
    buckets: list[list[Tensor]] = []
    for group in _by_dtype(tensors).values():
        size = limit
        for t in group:
            nbytes = t.numel() * t.element_size()
            if size + nbytes > limit:
                buckets.append([])
                size = 0
            buckets[-1].append(t)
            size += nbytes
    return buckets


def all_reduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average ``tensors`` across processes, in place."""
    size = world_size()
    if size == 1 or not tensors:
        return
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= size
        for t, chunk in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(chunk.view_as(t))


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every process the buffers (BatchNorm statistics) of process ``src``, like DDP does.

    Other processes get new buffer tensors instead of in-place copies, so a graph that saved the
    old buffers for its backward pass (BatchNorm does) stays valid: safe right after a forward pass.
    """
    if world_size() == 1:
        return
    named = list(module.named_buffers(remove_duplicate=False))  # every owner of a shared buffer
    unique = list({id(b): b for _, b in named}.values())
    if not unique:
        return
    receiving = dist.get_rank() != src
    received: dict[int, Tensor] = {}
    for bucket in _buckets(unique):
        flat = torch.cat([b.reshape(-1) for b in bucket])
        dist.broadcast(flat, src=src)
        if receiving:
            chunks = flat.split([b.numel() for b in bucket])
            received.update({id(b): chunk.view_as(b).clone() for b, chunk in zip(bucket, chunks)})
    if not receiving:
        return
    for name, b in named:
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, received[id(b)])


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
