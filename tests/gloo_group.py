"""A gloo process group for the tests' spawned workers."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist


@contextmanager
def gloo_group(rank: int, world_size: int, init_file: str) -> Iterator[None]:
    """Run the body in a gloo process group (file rendezvous), destroyed after a barrier.

    ``torch._dynamo`` is imported first: imported after the group exists (creating the first
    optimizer imports it), it keeps references to the group, so ``destroy_process_group`` leaves
    gloo's threads running and the process can abort at exit ("terminate called without an active
    exception", about one worker in ten on torch 2.13). The Trainer's processes import it with
    transformers, before accelerate creates their group."""
    importlib.import_module("torch._dynamo")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()
