"""The rooms recipes: bundled, mirroring the paper recipes; dense-quickstart end to end; predictions.png."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtl_plugins.cli import main
from mtl_plugins.config import load_recipe
from mtl_plugins.metrics.paper import delta_m_selection
from mtl_plugins.predictions import _colour, can_draw

ROOMS = ["dense-quickstart", "rooms-sel", "rooms-ew", "rooms-connstr", "rooms-connstr-ew"]
TASKS = ["semseg", "depth", "normals", "edge", "saliency"]


def test_rooms_recipes_mirror_the_paper_recipes():
    for name in ROOMS:
        recipe = load_recipe(name)
        assert recipe["data"]["dataset"] == "rooms" and recipe["data"]["tasks"] == TASKS, name
        assert recipe["model"]["name"] == "hub_multitask" and "backbone_config" in recipe["model"]["options"], name
        assert recipe["baselines"] == "cache" and recipe["training"]["batch_eval_metrics"] is True, name
    strategies = {name: load_recipe(name)["strategy"]["name"] for name in ROOMS}
    assert strategies == {"dense-quickstart": "sel_update", "rooms-sel": "sel_update", "rooms-ew": "ew",
                          "rooms-connstr": "conn_strength", "rooms-connstr-ew": "ew"}
    sel, ew = load_recipe("rooms-sel"), load_recipe("rooms-ew")
    assert sel["training"]["lr_ts"] == len(TASKS) and ew["training"]["lr_ts"] == 1
    assert sel["model"] == ew["model"] and sel["data"] == ew["data"]
    assert {k: v for k, v in sel["training"].items() if k != "lr_ts"} == {k: v for k, v in ew["training"].items() if k != "lr_ts"}
    connstr, gd = load_recipe("rooms-connstr"), load_recipe("rooms-connstr-ew")
    assert connstr["model"]["options"]["task_connections"] == {"mode": "batchnorm"}
    assert "task_connections" not in gd["model"]["options"]
    assert connstr["model"]["options"]["loss_weights"] == gd["model"]["options"]["loss_weights"]
    assert connstr["training"] == gd["training"]
    assert set(delta_m_selection("rooms")) == {"depth/rmse", "semseg/miou", "normals/mean_angle", "saliency/miou"}


def test_prediction_pictures_use_the_stated_encodings():
    normals = np.array([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[255.0, 255.0, 255.0], [0.0, -1.0, 0.0]]])
    rgb = _colour("normals", normals, 3, (0, 1))
    np.testing.assert_allclose(rgb[0, 0], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(rgb[0, 1], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(rgb[1, 0], [0.0, 0.0, 0.0])  # ignored
    labels = _colour("semantic_segmentation", np.array([[0.0, 1.0], [255.0, 0.0]]), 8, (0, 1))
    assert (rgb[1, 0] == 0).all() and not np.allclose(labels[0, 0], labels[0, 1]) and np.allclose(labels[0, 0], labels[1, 1])
    assert (labels[1, 0] == 0).all()
    depth = _colour("depth", np.array([[1.0, 3.0], [0.0, 2.0]]), 1, (1.0, 3.0))
    assert (depth[1, 0] == 0).all() and not np.allclose(depth[0, 0], depth[0, 1])
    from mtl_plugins.tasks import TaskSpec

    assert can_draw({"depth": TaskSpec("depth", 1, "depth_l1", "rmse", False)})
    assert not can_draw({"sum": TaskSpec("regression", 1, "mse", "mae", False)})


@pytest.mark.slow
def test_dense_quickstart_end_to_end(tmp_path, monkeypatch, capsys):
    from PIL import Image
    from transformers import AutoModel

    import mtl_plugins.hub  # noqa: F401 - registers the multi-task model with the Auto classes

    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = main(["dense-quickstart", "data.train_size=48", "data.eval_size=20", "data.validation_size=16",
                 "training.num_train_epochs=1",
                 "training.per_device_train_batch_size=16", "strategy.options.warmup_steps=1",
                 "--output-dir", str(out), "--no-progress", "--baselines", "train"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["strategy"] == "sel_update" and results["tasks"] == TASKS
    assert set(results["delta_m_metrics"]) == set(delta_m_selection("rooms"))
    assert np.isfinite(results["delta_m"])
    assert set(results["single_task_metrics"]) >= set(delta_m_selection("rooms"))
    printed = capsys.readouterr().out
    assert '"delta_m"' in printed and '"semseg/miou"' in printed  # per-task test metrics and Delta_m, like quickstart
    with Image.open(out / "predictions.png") as picture:
        width, height = picture.size
    assert width > 2 * height > 0  # one input and 2 x 5 panels per row, 4 rows
    assert "predictions.png" in results["plots"]
    model = AutoModel.from_pretrained(out / "model")
    predicted = model.predict(torch.randn(2, 3, 64, 64))
    assert predicted["semseg"].shape == (2, 64, 64) and predicted["normals"].shape == (2, 3, 64, 64)
    assert model.config.task("semseg")["labels"][:2] == ["floor", "wall"]


def test_every_rooms_recipe_builds_its_model_and_strategy_on_rooms(tmp_path, monkeypatch):
    from mtl_plugins.config import apply_overrides
    from mtl_plugins.runner import build_datasets, build_model, make_strategy

    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path))
    expected = {"rooms-sel": "sel_update", "rooms-ew": "ew", "rooms-connstr": "conn_strength", "rooms-connstr-ew": "ew"}
    for name, strategy in expected.items():
        recipe = apply_overrides(load_recipe(name), ["data.train_size=4", "data.eval_size=2", "data.validation_size=2",
                                                    "data.height=32", "data.width=32"])
        data = build_datasets(recipe)
        model = build_model(recipe, data)
        assert make_strategy(recipe, data.tasks, model).name == strategy
        with torch.no_grad():
            out = model(**data.train[0:4])
        assert set(out.losses) == set(TASKS) and all(torch.isfinite(v) for v in out.losses.values()), name
