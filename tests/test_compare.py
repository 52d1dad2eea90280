"""The comparison command: option parsing, up-front checks, and the table against the runs' results."""

import json
import re
import sys

import pytest
import yaml

from mtl_plugins import compare
from mtl_plugins.config import load_recipe

SMALL = ["data.tasks=[left, right]", "data.train_size=96", "data.eval_size=64", "training.max_steps=2",
         "training.per_device_train_batch_size=32", "model.options.width=4"]


def small_recipe():
    from mtl_plugins.config import apply_overrides

    return apply_overrides(load_recipe("quickstart"), SMALL)


def test_parse_strategy_spec():
    assert compare.parse_strategy("pcgrad") == ("pcgrad", {})
    assert compare.parse_strategy("cagrad:c=0.5,rescale=0") == ("cagrad", {"c": 0.5, "rescale": 0})
    with pytest.raises(ValueError, match="not of the form key=value"):
        compare.parse_strategy("cagrad:c")
    with pytest.raises(ValueError, match="has no name"):
        compare.parse_strategy(":c=1")


def test_prepare_checks_every_strategy_before_training():
    recipe = small_recipe()
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        compare.prepare(recipe, ["ew", "nope"])
    with pytest.raises(TypeError, match="no option 'k'"):
        compare.prepare(recipe, ["cagrad:k=1"])
    with pytest.raises(ValueError, match="listed twice"):
        compare.prepare(recipe, ["ew", "ew"])
    runs = dict(compare.prepare(recipe, ["DWA", "CAGrad:c=0.5"]))
    assert runs["DWA"]["strategy"] == {"name": "dwa", "options": {}}
    assert runs["CAGrad:c=0.5"]["strategy"] == {"name": "cagrad", "options": {"c": 0.5}}


def test_composed_strategies_are_method_plus_weighting():
    assert compare.parse_strategy("conn_strength+uw:schedule=phase2") == (
        "conn_strength", {"loss_scaling": "uw", "schedule": "phase2"})
    with pytest.raises(ValueError, match="write METHOD\\+WEIGHTING"):
        compare.parse_strategy("pcgrad+")
    with pytest.raises(ValueError, match="loss_scaling is given twice"):
        compare.parse_strategy("pcgrad+uw:loss_scaling=dwa")
    runs = dict(compare.prepare(load_recipe("quickstart"), ["pcgrad+dwa", "conn_strength+uw", "sel_update+UW"]))
    assert runs["pcgrad+dwa"]["strategy"] == {"name": "pcgrad", "options": {"loss_scaling": "dwa"}}
    assert runs["conn_strength+uw"]["model"]["architecture"] == "task_connections"
    assert runs["sel_update+UW"]["strategy"] == {"name": "sel_update", "options": {"loss_scaling": "UW"}}
    with pytest.raises(ValueError, match="loss_scaling 'gradnorm' cannot scale"):
        compare.prepare(small_recipe(), ["pcgrad+gradnorm"])
    with pytest.raises(TypeError, match="strategy 'dwa' has no option 'loss_scaling'"):
        compare.prepare(small_recipe(), ["dwa+uw"])
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        compare.prepare(small_recipe(), ["conn_strength+nope"])


def test_missing_extra_stops_before_any_training(monkeypatch, tmp_path, capsys):
    for module in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "torchjd", None)
    code = compare.main(["quickstart", *SMALL, "--strategies", "ew", "imtl", "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert re.search(r"'imtl' needs torchjd.*pip install \"mtl-plugins\[baselines\]\"", capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_table_reports_each_runs_metrics_delta_m_and_time(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    # --strategies before the recipe, overrides after --strategies
    code = compare.main(["--strategies", "ew", "pcgrad", "quickstart", *SMALL, "--baselines", "train",
                         "--output-dir", str(out), "--no-progress"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert stdout.splitlines()[0] == "recipe quickstart, 2 steps, seed 0, tasks left, right"
    lines = [line for line in stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["strategy", "left/accuracy", "right/accuracy", "delta_m (%)", "ms/batch"]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert set(rows) == {"ew", "pcgrad", "single-task"}
    single = json.loads((out / "ew" / "results.json").read_text())["single_task_metrics"]
    assert rows["single-task"][1:] == [f"{single['left/accuracy']:.4f}", f"{single['right/accuracy']:.4f}", "0.00",
                                       "n/a"]
    # two steps leave the 10-class baselines near chance (0.1): the table says so
    for task in ("left", "right"):
        near = single[f"{task}/accuracy"] < 0.1 + 0.2 * 0.9
        assert (f"warning: the single-task baseline of {task}/accuracy" in stdout) == near
    saved = json.loads((out / "comparison.json").read_text())
    for name in ("ew", "pcgrad"):
        result = json.loads((out / name / "results.json").read_text())
        assert result["strategy"] == name
        assert yaml.safe_load((out / name / "config.yaml").read_text())["output_dir"] == str(out / name)
        expected = [f"{result['test_metrics']['left/accuracy']:.4f}", f"{result['test_metrics']['right/accuracy']:.4f}",
                    f"{result['delta_m']:.2f}", f"{1000 * result['train_seconds'] / result['steps']:.1f}"]
        assert rows[name][1:] == expected
        assert next(r for r in saved if r["strategy"] == name)["delta_m"] == result["delta_m"]
    assert (out / "comparison.md").read_text().splitlines()[2] == lines[0]


def test_table_without_baselines_shows_no_delta_m():
    rows = [{"strategy": "ew", "t/accuracy": 0.5, "delta_m": None, "ms_per_batch": 12.345, "steps": 2}]
    table = compare.format_table(rows).splitlines()
    assert [c.strip() for c in table[2].strip("|").split("|")] == ["ew", "0.5000", "n/a", "12.3"]


def test_model_aware_strategy_is_prepared_with_task_connections():
    from mtl_plugins.compare import prepare
    from mtl_plugins.config import load_recipe

    runs = dict(prepare(load_recipe("quickstart"), ["ew", "conn_strength"]))
    assert runs["conn_strength"]["model"]["architecture"] == "task_connections"
    assert runs["conn_strength"]["strategy"] == {"name": "conn_strength", "options": {}}
    assert runs["ew"]["model"]["architecture"] == "hps"


def test_recipes_whose_model_converts_itself_are_not_converted_again():
    runs = dict(compare.prepare(load_recipe("nyud-connstr"), ["conn_strength", "ew"]))
    assert runs["conn_strength"]["model"]["architecture"] == "hps"
    assert runs["conn_strength"]["model"]["options"]["task_connections"] == {"mode": "batchnorm"}
    plain = dict(compare.prepare(load_recipe("nyud-connstr-ew"), ["conn_strength"]))
    assert plain["conn_strength"]["model"]["architecture"] == "task_connections"


@pytest.mark.slow
@pytest.mark.parametrize("recipe_name", ["cityscapes-connstr-ew", "cityscapes-connstr"])
def test_conn_strength_run_on_a_hub_model_saves_a_folder_that_reloads(recipe_name, tmp_path, monkeypatch):
    import torch
    from dense_fixtures import TINY_CITYSCAPES, write_cityscapes
    from transformers import AutoModel

    import mtl_plugins.hub  # noqa: F401  (registers the model with AutoModel)
    from mtl_plugins import runner
    from mtl_plugins.architectures.task_connections import connected_layers
    from mtl_plugins.config import apply_overrides

    write_cityscapes(tmp_path / "data")
    recipe = apply_overrides(load_recipe(recipe_name), [f"data.root={tmp_path / 'data'}", *TINY_CITYSCAPES])
    trained = []
    original_fit = runner.fit
    monkeypatch.setattr(runner, "fit", lambda *a, **k: trained.append(original_fit(*a, **k)) or trained[-1])
    rows = compare.run_all(compare.prepare(recipe, ["conn_strength"]), tmp_path / "out", baselines="skip",
                           progress=False)
    assert rows[0]["steps"] == 2
    model = trained[0]["model"].eval()
    assert model.config.task_connections is not None
    assert all(layer.name.startswith("backbone.") for layer in connected_layers(model))
    reloaded = AutoModel.from_pretrained(tmp_path / "out" / "conn_strength" / "model").eval()
    assert reloaded.config.task_connections == model.config.task_connections
    assert [layer.name for layer in connected_layers(reloaded)] == [layer.name for layer in connected_layers(model)]
    x = torch.randn(2, 3, 16, 32)
    with torch.no_grad():
        expected, got = model(pixel_values=x).logits, reloaded(pixel_values=x).logits
    for task in ("semseg", "depth"):
        assert torch.equal(got[task], expected[task]), task


def test_unknown_recipe_keys_are_an_error(capsys):
    assert compare.main(["quickstart", "strategy.nmae=pcgrad", "--strategies", "ew"]) == 2
    assert "nmae" in capsys.readouterr().err


def test_overrides_after_strategies_are_taken_as_overrides(tmp_path, capsys):
    # a wrong type in an override given after --strategies is reported as the override's error
    assert compare.main(["quickstart", "--strategies", "ew", "cagrad:c=0.5", "training.max_steps=x",
                         "--output-dir", str(tmp_path)]) == 2
    assert "training.max_steps should be int, got 'x'" in capsys.readouterr().err
    args = compare.build_parser().parse_args(["--strategies", "ew", "cagrad:c=0.5", "quickstart", "data.seed=1"])
    compare.sort_arguments(args)
    assert (args.recipe, args.strategies, args.overrides) == ("quickstart", ["ew", "cagrad:c=0.5"], ["data.seed=1"])
    assert compare.main(["--strategies", "ew"]) == 2
    assert "give a recipe" in capsys.readouterr().err


def test_near_chance_warning_reads_each_baseline_against_its_chance_level():
    rows = [{"strategy": "single-task", "a/accuracy": 0.25, "b/accuracy": 0.9, "c/accuracy": 0.55,
             "chance": {"a/accuracy": 0.1, "b/accuracy": 0.5, "c/accuracy": 0.5}}]
    warnings = compare.near_chance(rows)
    # a: 0.25 < 0.1 + 0.2 * 0.9 = 0.28; c: 0.55 < 0.5 + 0.2 * 0.5 = 0.6; b is far above chance
    assert [w.split(" (")[0] for w in warnings] == ["warning: the single-task baseline of a/accuracy",
                                                     "warning: the single-task baseline of c/accuracy"]
