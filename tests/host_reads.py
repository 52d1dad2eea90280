"""Counting host reads (device synchronisations) of tensors derived from model losses and gradients."""

from __future__ import annotations

from typing import ClassVar

import torch

from mtl_plugins.strategies.base import Updater

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__", "__format__",
         "__repr__")


class Tracked(torch.Tensor):
    """Marks tensors derived from model losses or gradients; host reads of them are recorded."""

    reads: ClassVar[list[tuple[str, tuple[int, ...]]]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            cls.reads.append((func.__name__, tuple(args[0].shape)))
        return super().__torch_function__(func, types, args, kwargs or {})


def tracked_closure(closure):
    """``closure`` whose losses are :class:`Tracked`."""
    return lambda task=None: {t: v.as_subclass(Tracked) for t, v in closure(task).items()}


class TrackingUpdater(Updater):
    """A plain updater whose backward leaves :class:`Tracked` gradients."""

    def backward(self, loss, retain_graph=False):
        loss.backward(retain_graph=retain_graph)
        for p in self.params:
            if p.grad is not None:
                p.grad = p.grad.as_subclass(Tracked)
