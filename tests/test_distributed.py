"""The trainer's collectives on two gloo processes: bucketed averaging, buffers shared by modules."""

from __future__ import annotations

import pytest
import torch
from gloo_group import gloo_group
from torch import nn

from mtl_plugins.trainers import distributed

pytestmark = pytest.mark.slow


def tensors_of(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    return [torch.randn(3, 5, generator=g), torch.randn(7, generator=g, dtype=torch.float64),
            torch.randn(2, 2, 2, generator=g), torch.randn(40, generator=g), torch.randn(1, generator=g)]


class SharedBuffer(nn.Module):
    def __init__(self, rank: int):
        super().__init__()
        self.a, self.b = nn.Module(), nn.Module()
        stats = torch.full((3,), float(rank))
        self.a.register_buffer("stats", stats)
        self.b.register_buffer("stats", stats)  # the same tensor under two owners


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, 2, init_file):
        distributed.BUCKET_BYTES = 64  # several buckets per dtype, one tensor larger than a bucket
        tensors = tensors_of(rank)
        distributed.all_reduce_mean_(tensors)
        module = SharedBuffer(rank)
        distributed.broadcast_buffers(module)
        torch.save({"tensors": tensors, "a": module.a.stats, "b": module.b.stats}, f"{out_dir}/rank{rank}.pt")


def test_bucketed_average_and_shared_buffers(tmp_path):
    assert len(distributed._buckets(tensors_of(0), limit=64)) > 3
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = [(x + y) / 2 for x, y in zip(tensors_of(0), tensors_of(1))]
    for r in ranks:
        for got, want in zip(r["tensors"], expected):
            assert got.dtype == want.dtype
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert torch.equal(r["a"], torch.zeros(3)) and torch.equal(r["b"], torch.zeros(3))  # rank 0's values
