"""Streaming metrics for classification (accuracy) and scalar regression (mean absolute error)."""

from __future__ import annotations

import torch
from torch import Tensor


class TaskMetric:
    """Accumulates one task's metric over batches without storing predictions."""

    def __init__(self, kind: str, scale: float = 1.0):
        if kind not in ("classification", "regression"):
            raise ValueError(f"unknown task kind {kind!r}; expected 'classification' or 'regression'")
        self.kind, self.scale = kind, scale
        self.total = torch.zeros((), dtype=torch.float64)
        self.count = 0

    @property
    def name(self) -> str:
        return "accuracy" if self.kind == "classification" else "mae"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    def update(self, logits: Tensor, target: Tensor) -> None:
        if self.kind == "classification":
            self.total += (logits.argmax(dim=1) == target).sum().double().cpu()
        else:
            self.total += ((logits.reshape(target.shape).double() - target.double()).abs().sum() * self.scale).cpu()
        self.count += target.numel()

    def compute(self) -> float:
        if self.count == 0:
            raise ValueError("no examples seen")
        return float(self.total / self.count)
