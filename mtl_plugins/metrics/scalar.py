"""Metrics of per-example tasks: accuracy (classification) and mean absolute error (regression)."""

from __future__ import annotations

from torch import Tensor
from torchmetrics import MeanAbsoluteError, MeanMetric

from .base import TaskMetric


class AccuracyMetric(TaskMetric):
    """Fraction of examples whose arg-max logit is the label."""

    names = ("accuracy",)
    label, counted = "classification", "example"

    def __init__(self, main: str | None = None, sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        # a mean of 0/1 hits: torchmetrics' Accuracy divides in float32
        self.hits = self.library(MeanMetric, nan_strategy="disable")

    def update(self, logits: Tensor, target: Tensor) -> None:
        """``logits``: ``[B, C]``; ``target``: ``[B]`` class ids."""
        if logits.dim() != 2 or target.shape != logits.shape[:1]:
            raise ValueError(f"classification: logits must be [B, C] and targets [B], got {tuple(logits.shape)} "
                             f"and {tuple(target.shape)}")
        self.hits.update((logits.argmax(dim=1) == target).double())
        self.count += target.numel()

    def values(self) -> dict[str, float]:
        return {"accuracy": float(self.hits.compute())}


class MeanAbsoluteErrorMetric(TaskMetric):
    """Mean absolute error, multiplied by ``scale`` (to report it in user units)."""

    names = ("mae",)
    label, counted = "regression", "example"

    def __init__(self, scale: float = 1.0, main: str | None = None, sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        self.scale = scale
        self.error = self.library(MeanAbsoluteError)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: one value per target element (``[B]`` or ``[B, 1]``); ``target``: ``[B]``."""
        if prediction.numel() != target.numel():
            raise ValueError(f"regression: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} "
                             "differ in size")
        self.error.update(prediction.reshape(target.shape).double(), target.double())
        self.count += target.numel()

    def values(self) -> dict[str, float]:
        return {"mae": float(self.error.compute()) * self.scale}
