"""Dense metrics against independent numpy references, and exact reduction across 2 processes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gloo_group import gloo_group

from mtl_plugins.metrics import task_metric
from mtl_plugins.metrics.dense import (
    DenseRegressionMetric,
    DepthMetric,
    EdgeLossMetric,
    NormalsMetric,
    SaliencyMetric,
    SegmentationMetric,
)
from mtl_plugins.tasks import TaskSpec

IGNORE = 255


# ---------------------------------------------------------------- numpy references (written here)

def ref_segmentation(preds, gts, num_classes, empty="zero"):
    tp, fp, fn = np.zeros(num_classes), np.zeros(num_classes), np.zeros(num_classes)
    correct = total = 0
    for pred, gt in zip(preds, gts):
        valid = gt != IGNORE
        for c in range(num_classes):
            tp[c] += np.sum((gt == c) & (pred == c) & valid)
            fp[c] += np.sum((gt != c) & (pred == c) & valid)
            fn[c] += np.sum((gt == c) & (pred != c) & valid)
        correct += np.sum((pred == gt) & valid)
        total += np.sum(valid)
    union = tp + fp + fn
    if empty == "zero":
        iou = np.array([tp[c] / union[c] if union[c] > 0 else 0.0 for c in range(num_classes)])
    else:
        iou = np.array([tp[c] / union[c] for c in range(num_classes) if union[c] > 0])
    return {"miou": 100 * iou.mean(), "pixel_acc": 100 * correct / total}


def ref_depth(preds, gts):
    p = np.concatenate([x.ravel() for x in preds]).astype(np.float64)
    g = np.concatenate([x.ravel() for x in gts]).astype(np.float64)
    valid = (g != IGNORE) & (g > 0)
    p, g = np.maximum(p[valid], 0.0), g[valid]
    return {"rmse": np.sqrt(np.mean((p - g) ** 2)), "abs_err": np.mean(np.abs(p - g)), "abs_rel": np.mean(np.abs(p - g) / g)}


def ref_angles(preds, gts):
    out = []
    for pred, gt in zip(preds, gts):  # [B, 3, H, W]
        pred, gt = np.moveaxis(pred, 1, -1).astype(np.float64), np.moveaxis(gt, 1, -1).astype(np.float64)
        valid = np.all(gt != IGNORE, axis=-1) & (np.linalg.norm(gt, axis=-1) > 0)
        p = pred[valid] / np.linalg.norm(pred[valid], axis=-1, keepdims=True)
        g = gt[valid] / np.linalg.norm(gt[valid], axis=-1, keepdims=True)
        out.append(np.degrees(np.arccos(np.clip(np.sum(p * g, axis=-1), -1, 1))))
    return np.concatenate(out)


def ref_saliency(probs, gts):
    f_thr = np.arange(1, 20) * 0.05
    tp, pp, ap = np.zeros(19), np.zeros(19), np.zeros(19)
    iou_thr = np.linspace(0.2, 0.9, 15)
    ious = []
    for prob, gt in zip(probs, gts):
        for b in range(prob.shape[0]):
            valid = gt[b] != IGNORE
            g = (gt[b] == 1) & valid
            for k, t in enumerate(f_thr):
                p = (prob[b] >= t) & valid
                tp[k] += np.sum(p & g)
                pp[k] += np.sum(p)
                ap[k] += np.sum(g)
            row = []
            for t in iou_thr:
                p = (prob[b] > t) & valid
                union = np.sum(p | g)
                row.append(1.0 if union == 0 else np.sum(p & g) / union)
            ious.append(row)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / pp, tp / ap
        f = 1.3 * precision * recall / (0.3 * precision + recall)
    return {"maxf": 100 * np.nanmax(np.where(np.isnan(f), 0, f)), "miou": 100 * np.max(np.mean(ious, axis=0))}


def ref_edge_loss(logits, gts, w=0.95):
    x = np.concatenate([a.ravel() for a in logits]).astype(np.float64)
    y = np.concatenate([a.ravel() for a in gts]).astype(np.float64)
    valid = y != IGNORE
    x, y = x[valid], y[valid]
    s = 1.0 / (1.0 + np.exp(-x))
    return np.mean(-w * y * np.log(s) - (1 - w) * (1 - y) * np.log(1 - s))


# ---------------------------------------------------------------- random data with ignore regions

def seg_batches(seed=0, classes=5, batches=3, shape=(2, 9, 11)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        logits = torch.randn(shape[0], classes, *shape[1:], generator=g)
        target = torch.randint(0, classes, shape, generator=g)
        target[torch.rand(shape, generator=g) < 0.2] = IGNORE
        out.append((logits, target))
    return out


def depth_batches(seed=1, batches=3, shape=(2, 1, 8, 10)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        pred = torch.randn(shape, generator=g) + 2.0  # some negative predictions (clamped)
        target = torch.rand(shape, generator=g) * 5 + 0.5
        target[torch.rand(shape, generator=g) < 0.15] = 0.0
        target[torch.rand(shape, generator=g) < 0.15] = IGNORE
        out.append((pred, target))
    return out


def normal_batches(seed=2, batches=3, shape=(2, 3, 8, 10)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        target = torch.nn.functional.normalize(torch.randn(shape, generator=g), dim=1)
        pred = target + 0.6 * torch.randn(shape, generator=g)  # errors spread over 0..180 degrees
        holes = torch.rand(shape[0], 1, *shape[2:], generator=g)
        target = torch.where(holes < 0.1, torch.full_like(target, IGNORE), target)
        target = torch.where((holes > 0.1) & (holes < 0.2), torch.zeros_like(target), target)
        out.append((pred, target))
    return out


def saliency_batches(seed=3, batches=3, shape=(3, 8, 10), channels=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        logits = 2 * torch.randn(shape[0], channels, *shape[1:], generator=g)
        target = (torch.rand(shape, generator=g) < 0.4).long()
        target[torch.rand(shape, generator=g) < 0.1] = IGNORE
        out.append((logits, target))
    # an image whose target is empty and whose prediction is empty at every threshold: IoU 1
    logits = torch.full((1, channels, *shape[1:]), -20.0)
    if channels == 2:
        logits[:, 0] = 20.0
    out.append((logits, torch.zeros((1, *shape[1:]), dtype=torch.long)))
    return out


def edge_batches(seed=4, batches=3, shape=(2, 1, 8, 10)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        logits = 3 * torch.randn(shape, generator=g)
        target = (torch.rand(shape, generator=g) < 0.1).float()
        target[torch.rand(shape, generator=g) < 0.1] = IGNORE
        out.append((logits, target))
    return out


def feed(metric, batches):
    for prediction, target in batches:
        metric.update(prediction, target)
    return metric


# ---------------------------------------------------------------- metrics vs references

@pytest.mark.parametrize("empty", ["zero", "ignore"])
def test_segmentation_matches_numpy(empty):
    batches = seg_batches(classes=6)
    for _, target in batches:  # class 5 never labelled; predictions may still produce it
        target[target == 5] = IGNORE
    batches = [(logits[:, :5], t) for logits, t in batches]  # and never predicted: an empty class
    batches = [(torch.cat([lg, torch.full_like(lg[:, :1], -1e9)], 1), t) for lg, t in batches]
    got = feed(SegmentationMetric(6, empty_class_iou=empty), batches).compute_all()
    expected = ref_segmentation([lg.argmax(1).numpy() for lg, _ in batches], [t.numpy() for _, t in batches], 6, empty)
    assert got == pytest.approx(expected, abs=1e-9)
    if empty == "zero":  # the released convention counts the empty class as IoU 0
        assert got["miou"] == pytest.approx(ref_segmentation([lg.argmax(1).numpy() for lg, _ in batches],
                                                             [t.numpy() for _, t in batches], 6, "ignore")["miou"] * 5 / 6)


def test_segmentation_accepts_class_ids_and_channel_dim_targets():
    batches = seg_batches()
    a = feed(SegmentationMetric(5), batches).compute_all()
    b = feed(SegmentationMetric(5), [(lg.argmax(1), t[:, None].float()) for lg, t in batches]).compute_all()
    assert a == b


def test_segmentation_rejects_labels_out_of_range_and_bad_shapes():
    logits, target = seg_batches()[0]
    target[0, 0, 0] = 7
    with pytest.raises(ValueError, match="outside"):
        SegmentationMetric(5).update(logits, target)
    with pytest.raises(ValueError, match="channels"):
        SegmentationMetric(4).update(logits, target.clamp(max=3))
    with pytest.raises(ValueError, match="spatial"):
        SegmentationMetric(5).update(logits[..., :-1], target.clamp(max=4))


def test_depth_matches_numpy():
    batches = depth_batches()
    got = feed(DepthMetric(), batches).compute_all()
    assert got == pytest.approx(ref_depth([p.numpy() for p, _ in batches], [t.numpy() for _, t in batches]), rel=1e-12)


def test_normals_match_numpy_median_within_bin():
    batches = normal_batches()
    metric = feed(NormalsMetric(), batches)
    got = metric.compute_all()
    angles = ref_angles([p.numpy() for p, _ in batches], [t.numpy() for _, t in batches])
    assert metric.state["count"] == angles.size
    assert got["mean_angle"] == pytest.approx(angles.mean(), rel=1e-10)
    assert got["rmse_angle"] == pytest.approx(np.sqrt(np.mean(angles**2)), rel=1e-10)
    for t in (11.25, 22.5, 30):
        assert got[f"within_{t:g}"] == pytest.approx(100 * np.mean(angles < t), rel=1e-12)
    assert abs(got["median_angle"] - np.median(angles)) <= 1 / metric.bins_per_degree
    coarse = feed(NormalsMetric(bins_per_degree=1), batches).compute_all()["median_angle"]
    assert abs(coarse - np.median(angles)) <= 1.0


def test_normals_prediction_scale_does_not_matter():
    batches = normal_batches()
    a = feed(NormalsMetric(), batches).compute_all()
    b = feed(NormalsMetric(), [(3.7 * p, t) for p, t in batches]).compute_all()
    assert a == pytest.approx(b, rel=1e-6)  # float32 rounding of the scaled predictions only


@pytest.mark.parametrize("channels", [1, 2])
def test_saliency_matches_numpy(channels):
    batches = saliency_batches(channels=channels)
    got = feed(SaliencyMetric(), batches).compute_all()
    if channels == 2:
        probs = [torch.softmax(lg.double(), 1)[:, 1].numpy() for lg, _ in batches]
    else:
        probs = [torch.sigmoid(lg.double())[:, 0].numpy() for lg, _ in batches]
    assert got == pytest.approx(ref_saliency(probs, [t.numpy() for _, t in batches]), abs=1e-9)


def test_edge_loss_matches_numpy():
    batches = edge_batches()
    got = feed(EdgeLossMetric(), batches).compute()
    assert got == pytest.approx(ref_edge_loss([lg.numpy() for lg, _ in batches], [t.numpy() for _, t in batches]), rel=1e-10)


def test_regression_l1_and_mse():
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 3, 4, 5, generator=g)) for _ in range(3)]
    got = feed(DenseRegressionMetric(main="mse"), batches)
    diff = np.concatenate([(p.double() - t.double()).numpy().ravel() for p, t in batches])
    assert got.compute() == pytest.approx(np.mean(diff**2), rel=1e-10)
    assert got.compute_all()["l1"] == pytest.approx(np.mean(np.abs(diff)), rel=1e-10)


def test_task_metric_dispatches_dense_kinds_by_main_metric():
    assert isinstance(task_metric(TaskSpec("semantic_segmentation", 40, "cross_entropy", "miou", True)), SegmentationMetric)
    assert isinstance(task_metric(TaskSpec("depth", 1, "l1", "rmse", False)), DepthMetric)
    assert isinstance(task_metric(TaskSpec("depth", 2, "mse", "mse", False)), DenseRegressionMetric)
    assert task_metric(TaskSpec("dense_regression", 3, "l1", "l1", False)).main == "l1"
    assert task_metric(TaskSpec("saliency", 2, "balanced_cross_entropy", "maxf", True)).main == "maxf"
    with pytest.raises(ValueError, match="no metric 'accuracy'"):
        task_metric(TaskSpec("normals", 3, "normals_l1", "accuracy", False))


def test_compute_without_process_group_is_repeatable_and_reset_forgets():
    batches = depth_batches()
    metric = feed(DepthMetric(), batches[:2])
    before = metric.compute_all()
    metric.sync()  # no process group: nothing to sum
    assert metric.compute_all() == before and metric.compute() == before["rmse"]
    metric.update(*batches[2])  # computing does not end the evaluation: updates keep adding
    assert metric.compute_all() == pytest.approx(ref_depth([p.numpy() for p, _ in batches],
                                                           [t.numpy() for _, t in batches]), rel=1e-12)
    metric.reset()
    with pytest.raises(ValueError, match="no valid pixel"):
        metric.compute()


# ---------------------------------------------------------------- two processes (gloo, CPU)

def all_metrics():
    return {
        "semseg": (lambda: SegmentationMetric(5), seg_batches(batches=4)),
        "depth": (DepthMetric, depth_batches(batches=4)),
        "normals": (NormalsMetric, normal_batches(batches=4)),
        "sal": (SaliencyMetric, saliency_batches(batches=3)),
        "edge": (EdgeLossMetric, edge_batches(batches=4)),
    }


def _worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, init_file):
        results = {}
        for name, (make, batches) in all_metrics().items():
            metric = feed(make(), batches[rank::world])  # each process sees its own shard
            metric.sync()
            results[name] = metric.compute_all()
        torch.save(results, f"{out_file}.{rank}")


@pytest.mark.slow
def test_two_process_reduction_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    single = {name: feed(make(), batches).compute_all() for name, (make, batches) in all_metrics().items()}
    for rank in range(2):
        reduced = torch.load(tmp_path / f"out.{rank}")
        for name, values in single.items():
            for key, value in values.items():
                assert math.isclose(reduced[name][key], value, rel_tol=1e-12, abs_tol=1e-12), (rank, name, key)
