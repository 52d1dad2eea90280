"""Streaming metrics for dense prediction, exact across processes.

Every metric keeps its running state as a few tensors of sums and counts, so the state of several
processes adds up: :meth:`DenseMetric.sync` all-reduces it (``torch.distributed``, SUM) and every
rank then computes the metric of the whole evaluation set. Nothing per image or per pixel is stored.

Conventions follow the released evaluation code of the ICLR 2025 recipe (InvPT/ATRC lineage) and of
MTI-Net (the CVPR 2024 base code); where they differ, both are available:

* ``SegmentationMetric`` (semantic segmentation, human parts): confusion matrix over labelled pixels
  (``ignore_index`` skipped); ``miou`` and ``pixel_acc`` in percent. A class absent from both the
  predictions and the targets has IoU 0 and still counts in the mean, as in the released code
  (``empty_class_iou="zero"``); ``"ignore"`` leaves it out instead.
* ``DepthMetric``: ``rmse`` (square root of the pooled squared error), ``abs_err`` and ``abs_rel``
  over valid pixels (target finite, positive and not ``ignore_index``); predictions are clamped at 0.
* ``NormalsMetric``: angle between the L2-normalised prediction and target in degrees over valid
  pixels (target not ``ignore_index`` and of non-zero norm): ``mean_angle``, ``median_angle``,
  ``rmse_angle`` and ``within_11.25`` / ``within_22.5`` / ``within_30`` (percent, strict ``<``).
  The median comes from a histogram with ``bins_per_degree`` bins per degree (default 100) and linear
  interpolation inside the median's bin, so it is within ``1 / bins_per_degree`` degree of the exact
  median (an exact median would need every angle of the evaluation set).
* ``SaliencyMetric``: ``maxf`` as in the ICLR 2025 code (pixels pooled over the set, thresholds
  0.05..0.95 step 0.05 on the foreground probability, F-measure with beta^2 = 0.3, maximum over
  thresholds) and ``miou`` as in MTI-Net (per-image IoU at thresholds ``linspace(0.2, 0.9, 15)``,
  averaged over images, maximum over thresholds; an image with empty target and empty prediction has
  IoU 1).
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

IGNORE_INDEX = 255


class DenseMetric:
    """Base class: named state tensors that add up over batches and processes."""

    #: Names :meth:`compute_all` returns; ``main`` must be one of them.
    names: tuple[str, ...] = ()
    #: Whether a higher value is better, per name.
    higher_is_better: dict[str, bool] = {}

    def __init__(self, main: str | None = None):
        main = main or self.names[0]
        if main not in self.names:
            raise ValueError(f"{type(self).__name__} has no metric {main!r}; available: {list(self.names)}")
        self.main = main
        self._state: dict[str, Tensor] = {}
        self._synced = False

    def _add_state(self, name: str, value: Tensor) -> None:
        self._state[name] = value

    @property
    def state(self) -> dict[str, Tensor]:
        """The running sums (a view: do not modify)."""
        return self._state

    def reset(self) -> None:
        """Forget every update (and a previous :meth:`sync`)."""
        for value in self._state.values():
            value.zero_()
        self._synced = False

    def _prepare(self, device: torch.device) -> None:
        if self._synced:
            raise RuntimeError(f"{type(self).__name__} was synchronised already: call reset() before new updates")
        for name, value in self._state.items():
            if value.device != device:
                self._state[name] = value.to(device)

    def sync(self, group=None) -> None:
        """Sum the state of every process (``torch.distributed`` all-reduce); no-op without a process
        group or with one process. Calling it twice does not count twice."""
        if self._synced:
            return
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            backend = dist.get_backend(group)
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
            for name, value in self._state.items():
                reduced = value.to(device) if device is not None else value
                dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
                self._state[name] = reduced
        self._synced = True

    def compute_all(self) -> dict[str, float]:
        """Every metric of this kind, by name."""
        raise NotImplementedError

    def compute(self) -> float:
        """The main metric (``self.main``)."""
        return self.compute_all()[self.main]

    def update(self, prediction: Tensor, target: Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


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


class SegmentationMetric(DenseMetric):
    """mIoU and pixel accuracy (percent) from a confusion matrix; ``ignore_index`` pixels skipped."""

    names = ("miou", "pixel_acc")
    higher_is_better = {"miou": True, "pixel_acc": True}

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX, empty_class_iou: str = "zero",
                 main: str | None = None):
        super().__init__(main)
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if empty_class_iou not in ("zero", "ignore"):
            raise ValueError(f"empty_class_iou must be 'zero' or 'ignore', got {empty_class_iou!r}")
        self.num_classes, self.ignore_index, self.empty_class_iou = num_classes, ignore_index, empty_class_iou
        self._add_state("confusion", torch.zeros(num_classes, num_classes, dtype=torch.int64))

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: logits ``[B, C, H, W]`` or class ids ``[B, H, W]``; ``target``: class ids."""
        target = _label_map(target, "segmentation")
        if prediction.dim() == 4:
            if prediction.shape[1] != self.num_classes:
                raise ValueError(f"segmentation: logits have {prediction.shape[1]} channels, expected {self.num_classes}")
            prediction = prediction.argmax(dim=1)
        _check_spatial(prediction, target, "segmentation")
        self._prepare(target.device)
        valid = target != self.ignore_index
        gt, pred = target[valid], prediction[valid].long()
        if gt.numel() and (gt.min() < 0 or gt.max() >= self.num_classes):
            raise ValueError(
                f"segmentation: target has labels outside [0, {self.num_classes}) that are not the ignore index "
                f"{self.ignore_index}: {sorted(torch.unique(gt[(gt < 0) | (gt >= self.num_classes)]).tolist())[:10]}"
            )
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"segmentation: predicted class ids outside [0, {self.num_classes})")
        counts = torch.bincount(gt * self.num_classes + pred, minlength=self.num_classes**2)
        self._state["confusion"] += counts.reshape(self.num_classes, self.num_classes)

    def class_iou(self) -> Tensor:
        """IoU per class (NaN where a class is absent from both predictions and targets)."""
        confusion = self._state["confusion"].double().cpu()
        tp = confusion.diag()
        union = confusion.sum(0) + confusion.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def compute_all(self) -> dict[str, float]:
        confusion = self._state["confusion"].double().cpu()
        total = confusion.sum()
        if total == 0:
            raise ValueError("segmentation: no labelled pixel seen")
        iou = self.class_iou()
        miou = iou.nan_to_num(0.0).mean() if self.empty_class_iou == "zero" else iou[~iou.isnan()].mean()
        return {"miou": 100.0 * float(miou), "pixel_acc": 100.0 * float(confusion.diag().sum() / total)}


class DepthMetric(DenseMetric):
    """Depth errors over valid pixels: ``rmse``, ``abs_err`` (mean absolute) and ``abs_rel``."""

    names = ("rmse", "abs_err", "abs_rel")
    higher_is_better = {"rmse": False, "abs_err": False, "abs_rel": False}

    def __init__(self, ignore_index: float | None = IGNORE_INDEX, main: str | None = None):
        super().__init__(main)
        self.ignore_index = ignore_index
        for name in ("squared", "absolute", "relative"):
            self._add_state(name, torch.zeros((), dtype=torch.float64))
        self._add_state("count", torch.zeros((), dtype=torch.int64))

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction`` and ``target``: ``[B, 1, H, W]`` (or ``[B, H, W]``) depth maps."""
        prediction, target = _dense_target(prediction, 1, "depth prediction"), _dense_target(target, 1, "depth")
        _check_spatial(prediction, target, "depth")
        self._prepare(target.device)
        valid = torch.isfinite(target) & (target > 0)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        gt = target[valid].double()
        pred = prediction[valid].double().clamp(min=0.0)
        error = pred - gt
        self._state["squared"] += (error**2).sum()
        self._state["absolute"] += error.abs().sum()
        self._state["relative"] += (error.abs() / gt).sum()
        self._state["count"] += gt.numel()

    def compute_all(self) -> dict[str, float]:
        n = int(self._state["count"])
        if n == 0:
            raise ValueError("depth: no valid pixel seen")
        s = {k: float(v) for k, v in self._state.items()}
        return {"rmse": math.sqrt(s["squared"] / n), "abs_err": s["absolute"] / n, "abs_rel": s["relative"] / n}


class NormalsMetric(DenseMetric):
    """Angular error of surface normals in degrees (see the module docstring for the median)."""

    THRESHOLDS = (11.25, 22.5, 30.0)
    names = ("mean_angle", "median_angle", "rmse_angle", "within_11.25", "within_22.5", "within_30")
    higher_is_better = {"mean_angle": False, "median_angle": False, "rmse_angle": False,
                        "within_11.25": True, "within_22.5": True, "within_30": True}

    def __init__(self, ignore_index: float | None = IGNORE_INDEX, bins_per_degree: int = 100, main: str | None = None):
        super().__init__(main)
        if bins_per_degree < 1:
            raise ValueError(f"bins_per_degree must be positive, got {bins_per_degree}")
        self.ignore_index, self.bins_per_degree = ignore_index, bins_per_degree
        self._add_state("angle_sum", torch.zeros((), dtype=torch.float64))
        self._add_state("squared_sum", torch.zeros((), dtype=torch.float64))
        self._add_state("within", torch.zeros(len(self.THRESHOLDS), dtype=torch.int64))
        self._add_state("histogram", torch.zeros(180 * bins_per_degree, dtype=torch.int64))
        self._add_state("count", torch.zeros((), dtype=torch.int64))

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
        self._prepare(angles.device)
        self._state["angle_sum"] += angles.sum()
        self._state["squared_sum"] += (angles**2).sum()
        for i, threshold in enumerate(self.THRESHOLDS):
            self._state["within"][i] += (angles < threshold).sum()
        bins = (angles * self.bins_per_degree).long().clamp(0, self._state["histogram"].numel() - 1)
        self._state["histogram"] += torch.bincount(bins, minlength=self._state["histogram"].numel())
        self._state["count"] += angles.numel()

    def median(self) -> float:
        """Median angle from the histogram, within ``1 / bins_per_degree`` degree of the exact one."""
        hist = self._state["histogram"].double().cpu()
        n = float(hist.sum())
        half = n / 2.0
        cumulative = hist.cumsum(0)
        b = int(torch.searchsorted(cumulative, torch.tensor([half], dtype=torch.float64))[0])
        before = float(cumulative[b - 1]) if b > 0 else 0.0
        fraction = (half - before) / float(hist[b])
        return (b + fraction) / self.bins_per_degree

    def compute_all(self) -> dict[str, float]:
        n = int(self._state["count"])
        if n == 0:
            raise ValueError("normals: no valid pixel seen")
        result = {
            "mean_angle": float(self._state["angle_sum"]) / n,
            "median_angle": self.median(),
            "rmse_angle": math.sqrt(float(self._state["squared_sum"]) / n),
        }
        for i, threshold in enumerate(self.THRESHOLDS):
            result[f"within_{threshold:g}"] = 100.0 * float(self._state["within"][i]) / n
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


class SaliencyMetric(DenseMetric):
    """Saliency ``maxf`` (pooled, beta^2 = 0.3) and ``miou`` (per image, max over thresholds), percent."""

    names = ("maxf", "miou")
    higher_is_better = {"maxf": True, "miou": True}

    def __init__(self, ignore_index: int = IGNORE_INDEX, beta_squared: float = 0.3,
                 f_thresholds: Sequence[float] | None = None, iou_thresholds: Sequence[float] | None = None,
                 main: str | None = None):
        super().__init__(main)
        self.ignore_index, self.beta_squared = ignore_index, beta_squared
        f = torch.arange(1, 20, dtype=torch.float64) * 0.05 if f_thresholds is None else torch.tensor(f_thresholds)
        iou = torch.linspace(0.2, 0.9, 15, dtype=torch.float64) if iou_thresholds is None else torch.tensor(iou_thresholds)
        self.f_thresholds, self.iou_thresholds = f.double(), iou.double()
        for name in ("true_positives", "predicted_positives", "actual_positives"):
            self._add_state(name, torch.zeros(len(f), dtype=torch.int64))
        self._add_state("iou_sum", torch.zeros(len(iou), dtype=torch.float64))
        self._add_state("images", torch.zeros((), dtype=torch.int64))

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: logits (see :func:`foreground_probability`); ``target``: ``[B, H, W]`` in {0, 1, ignore}."""
        target = _label_map(target, "saliency")
        prob = foreground_probability(prediction).double()
        _check_spatial(prob, target, "saliency")
        self._prepare(target.device)
        valid = target != self.ignore_index
        bad = valid & (target != 0) & (target != 1)
        if bad.any():
            raise ValueError("saliency: targets must be 0, 1 or the ignore index")
        gt = (target == 1) & valid
        f_thr = self.f_thresholds.to(prob.device).view(-1, 1, 1, 1)
        predicted = (prob[None] >= f_thr) & valid[None]  # [T, B, H, W]
        self._state["true_positives"] += (predicted & gt[None]).sum(dim=(1, 2, 3))
        self._state["predicted_positives"] += predicted.sum(dim=(1, 2, 3))
        self._state["actual_positives"] += gt.sum().expand(len(self.f_thresholds))
        iou_thr = self.iou_thresholds.to(prob.device).view(-1, 1, 1, 1)
        mask = (prob[None] > iou_thr) & valid[None]
        intersection = (mask & gt[None]).sum(dim=(2, 3)).double()  # [T, B]
        union = (mask | gt[None]).sum(dim=(2, 3)).double()
        iou = torch.where(union > 0, intersection / union.clamp(min=1), torch.ones_like(union))
        self._state["iou_sum"] += iou.sum(dim=1)
        self._state["images"] += target.shape[0]

    def compute_all(self) -> dict[str, float]:
        images = int(self._state["images"])
        if images == 0:
            raise ValueError("saliency: no image seen")
        tp = self._state["true_positives"].double().cpu()
        precision = tp / self._state["predicted_positives"].double().cpu()
        recall = tp / self._state["actual_positives"].double().cpu()
        f = (1 + self.beta_squared) * precision * recall / (self.beta_squared * precision + recall)
        return {"maxf": 100.0 * float(f.nan_to_num(0.0).max()),
                "miou": 100.0 * float((self._state["iou_sum"].cpu() / images).max())}


class EdgeLossMetric(DenseMetric):
    """Class-balanced binary cross-entropy of edge logits over labelled pixels (the released edge score)."""

    names = ("loss",)
    higher_is_better = {"loss": False}

    def __init__(self, pos_weight: float = 0.95, ignore_index: float = IGNORE_INDEX, main: str | None = None):
        super().__init__(main)
        if not 0.0 < pos_weight < 1.0:
            raise ValueError(f"pos_weight must be in (0, 1), got {pos_weight}")
        self.pos_weight, self.ignore_index = pos_weight, ignore_index
        self._add_state("loss_sum", torch.zeros((), dtype=torch.float64))
        self._add_state("count", torch.zeros((), dtype=torch.int64))

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction``: edge logits ``[B, 1, H, W]``; ``target``: ``[B, 1, H, W]`` in {0, 1, ignore}."""
        prediction, target = _dense_target(prediction, 1, "edge prediction"), _dense_target(target, 1, "edges")
        _check_spatial(prediction, target, "edges")
        self._prepare(target.device)
        valid = target != self.ignore_index
        y, x = target[valid].double(), prediction[valid].double()
        w = self.pos_weight
        loss = w * y * F.softplus(-x) + (1 - w) * (1 - y) * F.softplus(x)
        self._state["loss_sum"] += loss.sum()
        self._state["count"] += y.numel()

    def compute_all(self) -> dict[str, float]:
        n = int(self._state["count"])
        if n == 0:
            raise ValueError("edges: no labelled pixel seen")
        return {"loss": float(self._state["loss_sum"]) / n}


class DenseRegressionMetric(DenseMetric):
    """Mean absolute (``l1``) or squared (``mse``) error over every target element."""

    names = ("l1", "mse")
    higher_is_better = {"l1": False, "mse": False}

    def __init__(self, ignore_index: float | None = None, main: str | None = None):
        super().__init__(main)
        self.ignore_index = ignore_index
        self._add_state("absolute", torch.zeros((), dtype=torch.float64))
        self._add_state("squared", torch.zeros((), dtype=torch.float64))
        self._add_state("count", torch.zeros((), dtype=torch.int64))

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """``prediction`` and ``target`` of the same shape (``[B, H, W]`` targets match ``[B, 1, H, W]``)."""
        if target.dim() == prediction.dim() - 1 and prediction.shape[1] == 1:
            target = target[:, None]
        if prediction.shape != target.shape:
            raise ValueError(f"regression: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ")
        self._prepare(target.device)
        valid = torch.isfinite(target)
        if self.ignore_index is not None:
            valid &= target != self.ignore_index
        error = prediction[valid].double() - target[valid].double()
        self._state["absolute"] += error.abs().sum()
        self._state["squared"] += (error**2).sum()
        self._state["count"] += error.numel()

    def compute_all(self) -> dict[str, float]:
        n = int(self._state["count"])
        if n == 0:
            raise ValueError("regression: no target element seen")
        return {"l1": float(self._state["absolute"]) / n, "mse": float(self._state["squared"]) / n}


#: Dense head kinds (names fixed by the Hub models), and ``dense_regression`` (signed maps with any
#: number of channels scored by L1 / MSE, e.g. the Taskonomy tasks).
DENSE_KINDS = ("semantic_segmentation", "human_parts", "saliency", "depth", "normals", "edges", "dense_regression")


def dense_metric(kind: str, num_outputs: int, metric: str) -> DenseMetric:
    """The streaming metric of a dense task kind whose main metric is ``metric``."""
    if kind == "dense_regression" or (metric in DenseRegressionMetric.names and kind in ("depth", "normals", "edges")):
        return DenseRegressionMetric(main=metric)
    if kind in ("semantic_segmentation", "human_parts"):
        return SegmentationMetric(num_outputs, main=metric)
    if kind == "saliency":
        return SaliencyMetric(main=metric)
    if kind == "depth":
        return DepthMetric(main=metric)
    if kind == "normals":
        return NormalsMetric(main=metric)
    if kind == "edges":
        return EdgeLossMetric(main=metric)
    raise ValueError(f"unknown dense task kind {kind!r}; known: {list(DENSE_KINDS)}")
