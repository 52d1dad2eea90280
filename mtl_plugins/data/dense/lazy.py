"""Lazily decoded ``datasets.Dataset``: file references as columns, decoding and transforms on access.

The raw columns are named like the outputs (``pixel_values`` holds the image path, each task's column
its target path), so ``transformers.Trainer``'s unused-column removal, which keeps the model inputs
and ``label_names``, leaves them in place. Nothing is decoded until a row or a batch is read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

Loader = Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
Transform = Callable[[dict[str, np.ndarray], np.random.Generator], dict[str, torch.Tensor]]


def _generator() -> np.random.Generator:
    """A numpy generator seeded from torch's RNG: reproducible under ``torch.manual_seed`` and
    different in every DataLoader worker (torch seeds each worker differently)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))


class BatchTransform:
    """Decode and transform the rows of one batch, stacked (picklable for DataLoader workers)."""

    def __init__(self, names: Sequence[str], load: Loader, transform: Transform):
        self.names, self.load, self.transform = list(names), load, transform

    def __call__(self, batch: dict[str, list]) -> dict[str, torch.Tensor]:
        rng = _generator()
        rows = [dict(zip(self.names, values)) for values in zip(*(batch[n] for n in self.names))]
        samples = [self.transform(self.load(row), rng) for row in rows]
        out = {}
        for key in samples[0]:
            shapes = {tuple(s[key].shape) for s in samples}
            if len(shapes) > 1:
                raise ValueError(
                    f"samples of one batch differ in size for {key!r}: {sorted(shapes)}; "
                    "use a crop/pad size that fits every image or a batch size of 1"
                )
            out[key] = torch.stack([s[key] for s in samples])
        return out


def lazy_dataset(columns: Mapping[str, Sequence[str]], load: Loader, transform: Transform, split: str):
    """A ``datasets.Dataset`` whose rows are ``load``-ed and ``transform``-ed when accessed.

    ``columns`` must include ``pixel_values``; ``load(row)`` returns the sample dict of
    :mod:`~mtl_plugins.data.dense.transforms` and ``transform(sample, rng)`` its tensors. A batch is
    returned stacked (all samples of a batch must have the same size after the transform)."""
    import datasets

    if "pixel_values" not in columns:
        raise ValueError("columns must include 'pixel_values' (the image references)")
    names = list(columns)
    dataset = datasets.Dataset.from_dict({n: list(columns[n]) for n in names}, split=split)
    return dataset.with_transform(BatchTransform(names, load, transform))
