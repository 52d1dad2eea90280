"""Streaming metrics for dense prediction, exact across processes.

Every metric keeps its running state as torchmetrics states of sums and counts (its own, and those of
the torchmetrics metrics it holds), so the state of several processes adds up: ``compute`` and
``compute_all`` sum it over ``torch.distributed`` first (see :class:`~mtl_plugins.metrics.base.TaskMetric`)
and every rank then computes the metric of the whole evaluation set. Nothing per image or per pixel
is stored. Values are computed in float64.

Conventions follow the released evaluation code of the ICLR 2025 recipe (InvPT/ATRC lineage) and of
MTI-Net (the CVPR 2024 base code); where they differ, both are available:

* ``SegmentationMetric`` (semantic segmentation, human parts): torchmetrics' multiclass confusion
  matrix over labelled pixels (``ignore_index`` skipped); ``miou`` and ``pixel_acc`` in percent. A
  class absent from both the predictions and the targets has IoU 0 and still counts in the mean, as in
  the released code (``empty_class_iou="zero"``); ``"ignore"`` leaves it out instead.
* ``DepthMetric``: ``rmse`` (square root of the pooled squared error), ``abs_err`` and ``abs_rel``
  (torchmetrics' mean squared, absolute and absolute percentage errors) over valid pixels (target
  finite, positive and not ``ignore_index``); predictions are clamped at 0. ``abs_rel`` divides by
  ``max(target, 1.17e-6)``, torchmetrics' guard, which no valid depth reaches.
* ``NormalsMetric``: angle between the L2-normalised prediction and target in degrees over valid
  pixels (target not ``ignore_index`` and of non-zero norm): ``mean_angle``, ``median_angle``,
  ``rmse_angle`` and ``within_11.25`` / ``within_22.5`` / ``within_30`` (percent, strict ``<``).
  The median comes from a histogram with ``bins_per_degree`` bins per degree (default 100) and linear
  interpolation inside the median's bin, so it is within ``1 / bins_per_degree`` degree of the exact
  median (an exact median would need every angle of the evaluation set).
* ``SaliencyMetric``: ``maxf`` as in the ICLR 2025 code (pixels pooled over the set, thresholds
  0.05..0.95 step 0.05 on the foreground probability, from torchmetrics' binary precision-recall
  curve; F-measure with beta^2 = 0.3, maximum over thresholds) and ``miou`` as in MTI-Net (per-image
  IoU at thresholds ``linspace(0.2, 0.9, 15)``, averaged over images, maximum over thresholds; an
  image with empty target and empty prediction has IoU 1).
* ``EdgeLossMetric``: the class-balanced binary cross-entropy that the released code reports for
  edges (positive weight 0.95), averaged over labelled pixels. The papers' edge score (odsF) needs the
  external SEISM/MATLAB toolbox and is not computed here.
* ``DenseRegressionMetric``: mean absolute (``l1``) or squared (``mse``) error over all target
  elements, as the ICLR 2025 code reports for the Taskonomy tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import (
    MeanAbsoluteError,
    MeanAbsolutePercentageError,
    MeanMetric,
    MeanSquaredError,
)
from torchmetrics.classification import (
    BinaryPrecisionRecallCurve,
    MulticlassConfusionMatrix,
)

from .base import TaskMetric

IGNORE_INDEX = 255


def _label_map(target: Tensor, name: str) -> Tensor:
    """Targets ``[B, H, W]`` or ``[B, 1, H, W]`` as ``[B, H, W]`` int64."""
    if target.dim() == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if target.dim() != 3:
        raise ValueError(f"{name}: target must be [B, H, W] or [B, 1, H, W], got shape {tuple(target.shape)}")
    if target.is_floating_point():
        target = target.round()
    return target.long()


def _dense_target(target: Tensor, channels: int, name: str) -> Tensor:
    """Targets ``[B, C, H, W]`` (or ``[B, H, W]`` when ``C == 1``) as ``[B, C, H, W]`` float."""
    if target.dim() == 3 and channels == 1:
        target = target[:, None]
    if target.dim() != 4 or target.shape[1] != channels:
        raise ValueError(f"{name}: target must be [B, {channels}, H, W], got shape {tuple(target.shape)}")
    return target


def _check_spatial(prediction: Tensor, target: Tensor, name: str) -> None:
    if prediction.shape[0] != target.shape[0] or prediction.shape[-2:] != target.shape[-2:]:
        raise ValueError(
            f"{name}: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in batch or "
            "spatial size; upsample predictions to the target size first"
        )


class SegmentationMetric(TaskMetric):
    """mIoU and pixel accuracy (percent) from a confusion matrix; ``ignore_index`` pixels skipped."""

    names = ("miou", "pixel_acc")
    label, counted = "segmentation", "labelled pixel"

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, empty_class_iou: str = "zero",
                 main: str | None = None, sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if empty_class_iou not in ("zero", "ignore"):
            raise ValueError(f"empty_class_iou must be 'zero' or 'ignore', got {empty_class_iou!r}")
        self.num_classes, self.ignore_index, self.empty_class_iou = num_classes, ignore_index, empty_class_iou
        # exact counts; the IoU is computed here in float64 (torchmetrics' JaccardIndex divides in float32)
        self.confusion = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False,
                                                   sync_on_compute=sync_on_compute)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: logits ``[B, C, H, W]`` or class ids ``[B, H, W]``; ``target``: class ids."""
        target = _label_map(target, "segmentation")
        if prediction.dim() == 4:
            if prediction.shape[1] != self.num_classes:
                raise ValueError(
                    f"segmentation: logits have {prediction.shape[1]} channels, expected {self.num_classes}")
            prediction = prediction.argmax(dim=1)
        _check_spatial(prediction, target, "segmentation")
        valid = target != self.ignore_index
        gt, pred = target[valid], prediction[valid].long()
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(
                f"segmentation: target has labels outside [0, {self.num_classes}) that are not the ignore index "
                f"{self.ignore_index}: {sorted(torch.unique(gt[(gt < 0) | (gt >= self.num_classes)]).tolist())[:10]}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"segmentation: predicted class ids outside [0, {self.num_classes})")
        self.confusion.update(pred, gt)
        self.count += gt.numel()

    def values(self) -> dict[str, float]:
        confusion = self.confusion.compute().double().cpu()  # rows: target, columns: prediction
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        iou = tp[union > 0] / union[union > 0]
        miou = iou.sum() / self.num_classes if self.empty_class_iou == "zero" else iou.mean()
        return {"miou": 100.0 * float(miou), "pixel_acc": 100.0 * float(tp.sum() / confusion.sum())}


class DepthMetric(TaskMetric):
    """Depth errors over valid pixels: ``rmse``, ``abs_err`` (mean absolute) and ``abs_rel``."""

    names = ("rmse", "abs_err", "abs_rel")
    label, counted = "depth", "valid pixel"

    def __init__(self, ignore_index: float | None = IGNORE_INDEX, main: str | None = None,
                 sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        self.ignore_index = ignore_index
        self.rmse = self.library(MeanSquaredError, squared=False)
        self.abs_err = self.library(MeanAbsoluteError)
        self.abs_rel = self.library(MeanAbsolutePercentageError)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction`` and ``target``: ``[B, 1, H, W]`` (or ``[B, H, W]``) depth maps."""
        prediction, target = _dense_target(prediction, 1, "depth prediction"), _dense_target(target, 1, "depth")
        _check_spatial(prediction, target, "depth")
        valid = torch.isfinite(target) & (target > 0)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        gt = target[valid].double()
        pred = prediction[valid].double().clamp(min=0.0)
        for metric in (self.rmse, self.abs_err, self.abs_rel):
            metric.update(pred, gt)
        self.count += gt.numel()

    def values(self) -> dict[str, float]:
        return {name: float(getattr(self, name).compute()) for name in self.names}


class NormalsMetric(TaskMetric):
    """Angular error of surface normals in degrees (see the module docstring for the median)."""

    THRESHOLDS = (11.25, 22.5, 30.0)
    names = ("mean_angle", "median_angle", "rmse_angle", "within_11.25", "within_22.5", "within_30")
    label, counted = "normals", "valid pixel"

    def __init__(self, ignore_index: float | None = IGNORE_INDEX, bins_per_degree: int = 100, main: str | None = None,
                 sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        if bins_per_degree < 1:
            raise ValueError(f"bins_per_degree must be positive, got {bins_per_degree}")
        self.ignore_index, self.bins_per_degree = ignore_index, bins_per_degree
        self.add_state("angle_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squared_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(self.THRESHOLDS), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("histogram", torch.zeros(180 * bins_per_degree, dtype=torch.int64), dist_reduce_fx="sum")

    def angles(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Angles in degrees at the valid pixels (float64)."""
        prediction, target = _dense_target(prediction, 3, "normals prediction"), _dense_target(target, 3, "normals")
        _check_spatial(prediction, target, "normals")
        target = target.double()
        valid = torch.isfinite(target).all(dim=1) & (target.norm(dim=1) > 0)
        if self.ignore_index is not None:
            valid &= (target != self.ignore_index).all(dim=1)
        pred = F.normalize(prediction.double(), dim=1, eps=1e-12)
        gt = F.normalize(target, dim=1, eps=1e-12)
        cosine = (pred * gt).sum(dim=1).clamp(-1.0, 1.0)
        return torch.rad2deg(torch.acos(cosine[valid]))

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction`` and ``target``: ``[B, 3, H, W]``; predictions need not be unit length."""
        angles = self.angles(prediction, target)
        self.angle_sum += angles.sum()
        self.squared_sum += (angles**2).sum()
        self.within += torch.stack([(angles < threshold).sum() for threshold in self.THRESHOLDS])
        bins = (angles * self.bins_per_degree).long().clamp(0, self.histogram.numel() - 1)
        self.histogram += torch.bincount(bins, minlength=self.histogram.numel())
        self.count += angles.numel()

    def median(self) -> float:
        """Median angle from the histogram, within ``1 / bins_per_degree`` degree of the exact one."""
        hist = self.histogram.double().cpu()
        half = float(hist.sum()) / 2.0
        cumulative = hist.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor([half], dtype=torch.float64))[0])
        before = float(cumulative[b - 1]) if b > 0 else 0.0
        fraction = (half - before) / float(hist[b])
        return (b + fraction) / self.bins_per_degree

    def values(self) -> dict[str, float]:
        n = int(self.count)
        result = {
            "mean_angle": float(self.angle_sum) / n,
            "median_angle": self.median(),
            "rmse_angle": math.sqrt(float(self.squared_sum) / n),
        }
        for i, threshold in enumerate(self.THRESHOLDS):
            result[f"within_{threshold:g}"] = 100.0 * float(self.within[i]) / n
        return result


def foreground_probability(prediction: Tensor) -> Tensor:
    """``[B, H, W]`` foreground probability from 2-class logits (softmax) or 1-channel logits (sigmoid)."""
    if prediction.dim() == 4 and prediction.shape[1] == 2:
        return prediction.float().softmax(dim=1)[:, 1]
    if prediction.dim() == 4 and prediction.shape[1] == 1:
        return prediction.float().sigmoid()[:, 0]
    if prediction.dim() == 3:
        return prediction.float().sigmoid()
    raise ValueError(f"saliency: logits must be [B, 2, H, W], [B, 1, H, W] or [B, H, W], got {tuple(prediction.shape)}")


class SaliencyMetric(TaskMetric):
    """Saliency ``maxf`` (pooled, beta^2 = 0.3) and ``miou`` (per image, max over thresholds), percent."""

    names = ("maxf", "miou")
    label, counted = "saliency", "image"

    def __init__(self, ignore_index: int = IGNORE_INDEX, beta_squared: float = 0.3,
                 f_thresholds: Sequence[float] | None = None, iou_thresholds: Sequence[float] | None = None,
                 main: str | None = None, sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        self.ignore_index, self.beta_squared = ignore_index, beta_squared
        f = torch.arange(1, 20, dtype=torch.float64) * 0.05 if f_thresholds is None else f_thresholds
        iou = torch.linspace(0.2, 0.9, 15, dtype=torch.float64) if iou_thresholds is None else iou_thresholds
        self.iou_thresholds = torch.as_tensor(iou, dtype=torch.float64)
        self.curve = self.library(BinaryPrecisionRecallCurve, thresholds=torch.as_tensor(f, dtype=torch.float64),
                                  ignore_index=ignore_index, validate_args=False)
        self.add_state("iou_sum", torch.zeros(len(iou), dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def f_thresholds(self) -> Tensor:
        return self.curve.thresholds

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: logits (see :func:`foreground_probability`); ``target``: ``[B, H, W]`` in {0, 1, ignore}."""
        target = _label_map(target, "saliency")
        prob = foreground_probability(prediction).double()
        _check_spatial(prob, target, "saliency")
        valid = target != self.ignore_index
        if (valid & (target != 0) & (target != 1)).any():
            raise ValueError("saliency: targets must be 0, 1 or the ignore index")
        self.curve.update(prob, target)  # pixels with the ignore index are dropped
        gt = (target == 1) & valid
        iou_thr = self.iou_thresholds.to(prob.device).view(-1, 1, 1, 1)
        mask = (prob[None] > iou_thr) & valid[None]
        intersection = (mask & gt[None]).sum(dim=(2, 3)).double()  # [T, B]
        union = (mask | gt[None]).sum(dim=(2, 3)).double()
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        self.iou_sum += iou.sum(dim=1)
        self.count += target.shape[0]

    def values(self) -> dict[str, float]:
        precision, recall, _ = self.curve.compute()
        precision, recall = precision[:-1].cpu(), recall[:-1].cpu()  # without the curve's closing (1, 0) point
        f = (1 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall)
        return {"maxf": 100.0 * float(f.nan_to_num(0.0).max()),
                "miou": 100.0 * float((self.iou_sum.cpu() / int(self.count)).max())}


class EdgeLossMetric(TaskMetric):
    """Class-balanced binary cross-entropy of edge logits over labelled pixels (the released edge score)."""

    names = ("loss",)
    label, counted = "edges", "labelled pixel"

    def __init__(self, pos_weight: float = 0.95, ignore_index: float = IGNORE_INDEX, main: str | None = None,
                 sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        if not 0.0 < pos_weight < 1.0:
            raise ValueError(f"pos_weight must be in (0, 1), got {pos_weight}")
        self.pos_weight, self.ignore_index = pos_weight, ignore_index
        self.loss = self.library(MeanMetric, nan_strategy="disable")

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: edge logits ``[B, 1, H, W]``; ``target``: ``[B, 1, H, W]`` in {0, 1, ignore}."""
        prediction, target = _dense_target(prediction, 1, "edge prediction"), _dense_target(target, 1, "edges")
        _check_spatial(prediction, target, "edges")
        valid = target != self.ignore_index
        y, x = target[valid].double(), prediction[valid].double()
        w = self.pos_weight
        self.loss.update(w * y * F.softplus(-x) + (1 - w) * (1 - y) * F.softplus(x))
        self.count += y.numel()

    def values(self) -> dict[str, float]:
        return {"loss": float(self.loss.compute())}


class DenseRegressionMetric(TaskMetric):
    """Mean absolute (``l1``) or squared (``mse``) error over every target element."""

    names = ("l1", "mse")
    label, counted = "regression", "target element"

    def __init__(self, ignore_index: float | None = None, main: str | None = None, sync_on_compute: bool = True):
        super().__init__(main, sync_on_compute)
        self.ignore_index = ignore_index
        self.l1 = self.library(MeanAbsoluteError)
        self.mse = self.library(MeanSquaredError)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction`` and ``target`` of the same shape (``[B, H, W]`` targets match ``[B, 1, H, W]``)."""
        if target.dim() == prediction.dim() - 1 and prediction.shape[1] == 1:
            target = target[:, None]
        if prediction.shape != target.shape:
            raise ValueError(
                f"regression: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        valid = torch.isfinite(target)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        pred, gt = prediction[valid].double(), target[valid].double()
        self.l1.update(pred, gt)
        self.mse.update(pred, gt)
        self.count += gt.numel()

    def values(self) -> dict[str, float]:
        return {"l1": float(self.l1.compute()), "mse": float(self.mse.compute())}


#: Dense head kinds (names fixed by the Hub models), and ``dense_regression`` (signed maps with any
#: number of channels scored by L1 / MSE, e.g. the Taskonomy tasks).
DENSE_KINDS = ("semantic_segmentation", "human_parts", "saliency", "depth", "normals", "edges", "dense_regression")


def dense_metric(kind: str, num_outputs: int, metric: str, sync_on_compute: bool = True) -> TaskMetric:
    """The streaming metric of a dense task kind whose main metric is ``metric``."""
    options = {"main": metric, "sync_on_compute": sync_on_compute}
    if kind == "dense_regression" or (metric in DenseRegressionMetric.names and kind in ("depth", "normals", "edges")):
        return DenseRegressionMetric(**options)
    if kind in ("semantic_segmentation", "human_parts"):
        return SegmentationMetric(num_outputs, **options)
    if kind == "saliency":
        return SaliencyMetric(**options)
    if kind == "depth":
        return DepthMetric(**options)
    if kind == "normals":
        return NormalsMetric(**options)
    if kind == "edges":
        return EdgeLossMetric(**options)
    raise ValueError(f"unknown dense task kind {kind!r}; known: {list(DENSE_KINDS)}")
