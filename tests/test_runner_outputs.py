"""run_recipe outputs: the Hub model folder with its card, and the papers' Delta_m selection."""

import json
from dataclasses import dataclass

import pytest
import torch
from dense_fixtures import write_taskonomy
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModel

import mtl_plugins.hub  # noqa: F401  (registers the model with AutoModel)
from mtl_plugins import runner
from mtl_plugins.tasks import TaskSpec

TINY_RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 8, 16, 16], "depths": [1, 1, 1, 1],
               "layer_type": "basic"}


def tiny_taskonomy_recipe(root) -> dict:
    return {
        "data": {"dataset": "taskonomy", "root": str(root), "tasks": ["reshading", "principal_curvature"],
                 "image_size": 32, "eval_fraction": 1.0},
        "model": {"name": "hub_multitask", "options": {"backbone_config": TINY_RESNET}},
        "strategy": {"name": "ew"},
        "training": {"max_steps": 2, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 2,
                     "dataloader_num_workers": 0, "logging_steps": 1, "batch_eval_metrics": True},
        "card": {"license": "apache-2.0", "datasets": ["example-org/taskonomy-tiny"]},
    }


@pytest.mark.slow
def test_run_saves_a_hub_model_that_reloads_and_a_card_with_strategy_and_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    write_taskonomy(tmp_path / "data")
    trained = []
    original_fit = runner.fit

    def recording_fit(*args, **kwargs):
        result = original_fit(*args, **kwargs)
        trained.append(result["model"])
        return result

    monkeypatch.setattr(runner, "fit", recording_fit)
    out = tmp_path / "out"
    summary = runner.run_recipe(tiny_taskonomy_recipe(tmp_path / "data"), output_dir=out, baselines="train",
                                progress=False)
    model = trained[0].eval()  # the multi-task run; the others are the single-task baselines
    assert (out / "model.safetensors").is_file() and (out / "model" / "model.safetensors").is_file()
    reloaded = AutoModel.from_pretrained(out / "model").eval()
    assert type(reloaded) is type(model) and reloaded.config.tasks == model.config.tasks
    assert [t["loss"] for t in reloaded.config.tasks] == ["l1", "mse"]
    # one copy of the weights on disk: the flat file is a second name for the Hub folder's file
    assert (out / "model.safetensors").samefile(out / "model" / "model.safetensors")
    flat = load_file(out / "model.safetensors")
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, flat[name]), name
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = model(pixel_values=x).logits, reloaded(pixel_values=x).logits
    assert set(got) == {"reshading", "principal_curvature"}
    for task in got:
        assert torch.equal(got[task], expected[task]), task
    results = json.loads((out / "results.json").read_text())
    assert results == summary and "delta_m" in results
    card = ModelCard.load(out / "model" / "README.md")
    assert card.data.mtl_method == "ew" and "Strategy: `ew`" in card.text
    assert card.data.license == "apache-2.0" and card.data.datasets == ["example-org/taskonomy-tiny"]  # the recipe's
    assert card.data.pipeline_tag == "image-to-image"
    assert card.data.mtl_metrics == pytest.approx(results["test_metrics"])
    assert card.data.mtl_delta_m == pytest.approx(results["delta_m"])
    for name in results["test_metrics"]:
        task, metric = name.split("/")
        assert f"| {task} | {metric} |" in card.text


@dataclass
class Bundle:
    """The part of a DataBundle that the Delta_m selection reads."""

    task_specs: dict


NYUD_SPECS = {
    "semseg": TaskSpec("semantic_segmentation", 40, "masked_cross_entropy", "miou", True),
    "depth": TaskSpec("depth", 1, "depth_l1", "rmse", False),
    "normals": TaskSpec("normals", 3, "normals_l1", "mean_angle", False),
    "edge": TaskSpec("edges", 1, "edge_bce", "loss", False),
}


def test_delta_m_uses_the_papers_selection_when_its_metrics_are_present():
    metrics = {"semseg/miou": 0.44, "depth/rmse": 0.55, "normals/mean_angle": 20.0, "edge/loss": 0.060}
    baseline = {"semseg/miou": 0.40, "depth/rmse": 0.50, "normals/mean_angle": 22.0, "edge/loss": 0.050}
    data = Bundle(NYUD_SPECS)
    selection = runner.higher_is_better(data, "nyud", set(metrics) & set(baseline))
    assert selection == {"depth/rmse": False, "semseg/miou": True, "normals/mean_angle": False}
    # by hand: semseg +10 %, depth -10 %, normals +(2 / 22), edge left out
    expected = 100 * (0.04 / 0.40 - 0.05 / 0.50 + 2.0 / 22.0) / 3
    assert runner.delta_m(metrics, baseline, selection) == pytest.approx(expected)
    with_edge = 100 * (0.04 / 0.40 - 0.05 / 0.50 + 2.0 / 22.0 - 0.010 / 0.050) / 4
    assert runner.delta_m(metrics, baseline, runner.higher_is_better(data)) == pytest.approx(with_edge)


def test_delta_m_falls_back_to_main_metrics_without_a_complete_selection():
    main = {"semseg/miou": True, "depth/rmse": False, "normals/mean_angle": False, "edge/loss": False}
    data = Bundle(NYUD_SPECS)
    assert runner.higher_is_better(data) == main
    # a run on part of the tasks lacks metrics that the selection names
    partial = Bundle({t: NYUD_SPECS[t] for t in ("semseg", "edge")})
    assert runner.higher_is_better(partial, "nyud", {"semseg/miou", "edge/loss"}) == {"semseg/miou": True,
                                                                                      "edge/loss": False}
    # Cityscapes' selection needs metrics beyond the main ones; datasets without one keep the main metrics
    assert runner.higher_is_better(data, "cityscapes", set(main)) == main
    assert runner.higher_is_better(data, "multidigits", set(main)) == main


def test_split_metrics_keeps_every_task_metric_and_each_main_one():
    specs = {"semseg": TaskSpec("semantic_segmentation", 7, "masked_cross_entropy", "miou", True),
             "depth": TaskSpec("depth", 1, "depth_l1", "abs_err", False)}
    data = Bundle(specs)
    data.tasks = ["semseg", "depth"]
    results = {"test_loss": 1.5, "test_depth/rmse": 3.0, "test_depth/abs_err": 2.0, "test_semseg/pixel_acc": 80.0,
               "test_semseg/miou": 40.0, "test_delta_m": 1.0, "test_other/x": 5.0, "test_runtime": 0.1}
    split = runner.split_metrics(results, data)
    assert split["main"] == {"semseg/miou": 40.0, "depth/abs_err": 2.0}
    assert list(split["main"]) == ["semseg/miou", "depth/abs_err"]
    assert split["all"] == {"depth/rmse": 3.0, "depth/abs_err": 2.0, "semseg/pixel_acc": 80.0, "semseg/miou": 40.0}


@pytest.mark.slow
def test_cityscapes_results_keep_every_metric_and_delta_m_uses_the_papers_selection(tmp_path, monkeypatch):
    from dense_fixtures import TINY_CITYSCAPES, write_cityscapes

    from mtl_plugins.config import apply_overrides, load_recipe
    from mtl_plugins.metrics.paper import delta_m_selection

    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    write_cityscapes(tmp_path / "data")
    recipe = apply_overrides(load_recipe("cityscapes-connstr-ew"), [f"data.root={tmp_path / 'data'}", *TINY_CITYSCAPES])
    out = tmp_path / "out"
    summary = runner.run_recipe(recipe, output_dir=out, baselines="train", progress=False)
    results = json.loads((out / "results.json").read_text())
    assert results == summary
    assert set(results["test_metrics"]) == {"semseg/miou", "depth/abs_err"}  # each task's main metric
    every = results["all_test_metrics"]
    assert set(every) == {"semseg/miou", "semseg/pixel_acc", "depth/rmse", "depth/abs_err", "depth/abs_rel"}
    assert all(every[name] == value for name, value in results["test_metrics"].items())
    assert set(results["single_task_metrics"]) == set(every)
    selection = delta_m_selection("cityscapes")
    assert results["delta_m_metrics"] == list(selection)
    single = results["single_task_metrics"]
    expected = 100 * sum((1 if higher else -1) * (every[name] - single[name]) / single[name]
                         for name, higher in selection.items()) / 4
    assert results["delta_m"] == pytest.approx(expected, rel=1e-12)


def test_adam_schedules_decay_to_the_recipes_lr_end(tmp_path):
    # The polynomial schedule reads the optimizer's default lr: with Adam's own default (1e-3) the
    # floor lr_end would be wrong for every other learning rate.
    from transformers import get_scheduler

    opts = {"learning_rate": 2e-5, "lr_scheduler_type": "polynomial",
            "lr_scheduler_kwargs": {"power": 1.0, "lr_end": 1e-6}}
    args, (optimizer_cls, kwargs) = runner.trainer_arguments(opts, tmp_path, progress=False)
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = optimizer_cls([{"params": [weight], "lr": args.learning_rate}], **kwargs)
    scheduler = get_scheduler("polynomial", optimizer, num_warmup_steps=0, num_training_steps=10,
                              scheduler_specific_kwargs=args.lr_scheduler_kwargs)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
