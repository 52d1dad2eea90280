"""Streaming multi-task evaluation: the metrics of every task, the Trainer compute_metrics, the papers' Delta_m."""

from __future__ import annotations

import pytest
import torch
from test_dense_metrics import ref_depth, ref_segmentation
from torch import nn
from transformers import EvalPrediction

from mtl_plugins.metrics.compute_metrics import ComputeMetrics
from mtl_plugins.metrics.delta_m import delta_m
from mtl_plugins.metrics.evaluation import build_metrics, evaluate_batches
from mtl_plugins.metrics.paper import delta_m_selection, paper_delta_m, paper_numbers, paper_results
from mtl_plugins.tasks import TaskSpec

SPECS = {
    "semseg": TaskSpec("semantic_segmentation", 4, "cross_entropy", "miou", True),
    "depth": TaskSpec("depth", 1, "l1", "rmse", False),
}


def batches(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append({
            "logits": {"semseg": torch.randn(2, 4, 6, 7, generator=g), "depth": torch.rand(2, 1, 6, 7, generator=g) * 3},
            "labels": {"semseg": torch.randint(0, 4, (2, 6, 7), generator=g),
                       "depth": torch.rand(2, 1, 6, 7, generator=g) * 3 + 0.1},
        })
    return out


def reference(logits, labels):
    """Every metric from the NumPy references of test_dense_metrics (float64, over all batches)."""
    segmentation = ref_segmentation([lg.argmax(1).numpy() for lg in logits["semseg"]],
                                    [t.numpy() for t in labels["semseg"]], 4)
    depth = ref_depth([p.numpy() for p in logits["depth"]], [t.numpy() for t in labels["depth"]])
    return {**{f"semseg/{k}": v for k, v in segmentation.items()}, **{f"depth/{k}": v for k, v in depth.items()}}


def direct(data):
    return reference({t: [b["logits"][t] for b in data] for t in SPECS},
                     {t: [b["labels"][t] for b in data] for t in SPECS})


def test_evaluator_reports_every_metric_and_the_main_ones():
    data = batches()
    evaluator = build_metrics(SPECS)
    for b in data:
        evaluator.update(b["logits"], b["labels"])
    everything = evaluator.compute()
    assert set(everything) == {"semseg/miou", "semseg/pixel_acc", "depth/rmse", "depth/abs_err", "depth/abs_rel"}
    assert everything == pytest.approx(direct(data), rel=1e-12)
    assert evaluator.main_metrics() == {"semseg/miou": everything["semseg/miou"], "depth/rmse": everything["depth/rmse"]}
    with pytest.raises(KeyError, match="no labels for task 'depth'"):
        evaluator.update(data[0]["logits"], {"semseg": data[0]["labels"]["semseg"]})


def test_batch_compute_metrics_streams_and_equals_whole_set():
    data = batches()
    baseline = {"semseg/miou": 20.0, "depth/rmse": 1.5}
    fn = ComputeMetrics(SPECS, reference=baseline)
    for i, b in enumerate(data):
        # the Trainer passes (logits, losses) tuples and labels in label_names order
        pred = EvalPrediction(predictions=(b["logits"], {"semseg": torch.tensor(1.0)}),
                              label_ids=(b["labels"]["semseg"], b["labels"]["depth"]))
        result = fn(pred, compute_result=i == len(data) - 1)
        if i < len(data) - 1:
            assert result == {}
    expected = direct(data)
    assert {k: v for k, v in result.items() if k != "delta_m"} == pytest.approx(expected)
    assert result["delta_m"] == pytest.approx(delta_m(expected, baseline, {"semseg/miou": True, "depth/rmse": False}))
    # whole-set mode (no compute_result): one call on everything, state does not leak between calls
    whole = EvalPrediction(
        predictions={t: torch.cat([b["logits"][t] for b in data]) for t in SPECS},
        label_ids={t: torch.cat([b["labels"][t] for b in data]) for t in SPECS},
    )
    assert fn(whole) == pytest.approx(result)
    assert fn(whole) == pytest.approx(result)


class TinyDense(nn.Module):
    """A 1x1-conv two-task model returning a dict with per-task logits and a loss."""

    def __init__(self):
        super().__init__()
        self.seg = nn.Conv2d(3, 4, 1)
        self.depth = nn.Conv2d(3, 1, 1)

    def forward(self, pixel_values, semseg=None, depth=None):
        logits = {"semseg": self.seg(pixel_values), "depth": self.depth(pixel_values)}
        out = {"logits": logits}
        if semseg is not None:
            out["loss"] = nn.functional.cross_entropy(logits["semseg"], semseg) + (logits["depth"] - depth).abs().mean()
        return out


def test_trainer_batch_eval_metrics_equals_direct_evaluation(tmp_path):
    import datasets
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(1)
    n = 10
    data = {"pixel_values": torch.randn(n, 3, 5, 6, generator=g), "semseg": torch.randint(0, 4, (n, 5, 6), generator=g),
            "depth": torch.rand(n, 1, 5, 6, generator=g) + 0.5}
    dataset = datasets.Dataset.from_dict({k: v.numpy() for k, v in data.items()}).with_format("torch")
    model = TinyDense()
    args = TrainingArguments(str(tmp_path), per_device_eval_batch_size=3, batch_eval_metrics=True, report_to=[],
                             label_names=["semseg", "depth"], use_cpu=True)
    trainer = Trainer(model=model, args=args, eval_dataset=dataset, compute_metrics=ComputeMetrics(SPECS))
    metrics = trainer.evaluate()
    with torch.no_grad():
        logits = model(pixel_values=data["pixel_values"])["logits"]
    expected = reference({t: [logits[t]] for t in SPECS}, {t: [data[t]] for t in SPECS})
    assert {k[len("eval_"):]: v for k, v in metrics.items() if k[len("eval_"):] in expected} == pytest.approx(expected)
    streamed = evaluate_batches(model, [{k: v[i : i + 3] for k, v in data.items()} for i in range(0, n, 3)], SPECS)
    assert streamed == pytest.approx(expected)


def test_shipped_paper_numbers_reproduce_their_delta_m():
    """The NYUD-v2 table's Delta_m column follows from its metrics with the papers' selection."""
    table = paper_results("connection_strength_cvpr2024", "nyud")
    baseline = table["single_task"]
    for method, row in table.items():
        metrics = {k: v for k, v in row.items() if k != "delta_m"}
        assert paper_delta_m("nyud", metrics, baseline) == pytest.approx(row["delta_m"], abs=0.01), method
    pascal = paper_results("connection_strength_cvpr2024", "pascal_context")
    assert set(delta_m_selection("pascal_context")) == {k for k in pascal["single_task"] if k != "delta_m"}
    assert "results" not in paper_numbers()["papers"]["selective_group_updates_iclr2025"]


def test_paper_selection_ignores_other_metrics_and_names_missing_ones():
    baseline = {"depth/rmse": 0.6, "semseg/miou": 40.0, "normals/mean_angle": 20.0, "edge/loss": 0.05}
    better = {"depth/rmse": 0.54, "semseg/miou": 44.0, "normals/mean_angle": 18.0, "edge/loss": 5.0}
    assert paper_delta_m("nyud", better, baseline) == pytest.approx(10.0)
    with pytest.raises(KeyError, match="normals/mean_angle"):
        paper_delta_m("nyud", {"depth/rmse": 0.5, "semseg/miou": 40.0}, baseline)
    with pytest.raises(ValueError, match="known"):
        delta_m_selection("kitti")
