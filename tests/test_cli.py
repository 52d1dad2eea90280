import json

import pytest
import yaml

from mtl_plugins.cli import main
from mtl_plugins.config import apply_overrides, check_recipe, list_recipes, load_recipe
from mtl_plugins.metrics import delta_m

TINY = ["data.train_size=128", "data.eval_size=64", "training.per_device_train_batch_size=32", "training.logging_steps=1"]


def test_list_shows_recipes_and_strategies(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "quickstart" in out and "ew" in out and "hps" in out


def test_overrides_parse_yaml_values():
    recipe = apply_overrides({"a": {"b": 1}}, ["a.b=2.5", "a.c=[x, y]", "d.e=true"])
    assert recipe == {"a": {"b": 2.5, "c": ["x", "y"]}, "d": {"e": True}}
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(ValueError, match="not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_overrides_read_scientific_notation_as_floats():
    recipe = apply_overrides(load_recipe("quickstart"), ["training.learning_rate=1e-4", "strategy.options.beta=2.5E+3",
                                                         "data.x=[1e-3, -2e5]", "data.name='1e-4'", "data.y=1e"])
    assert recipe["training"]["learning_rate"] == 1e-4 and isinstance(recipe["training"]["learning_rate"], float)
    assert recipe["strategy"]["options"]["beta"] == 2500.0
    assert recipe["data"]["x"] == [0.001, -200000.0]
    assert recipe["data"]["name"] == "1e-4" and recipe["data"]["y"] == "1e"  # quoted or not a number: strings


def test_strategy_name_alone_is_short_for_a_strategy_section():
    assert apply_overrides(load_recipe("quickstart"), ["strategy=ew"])["strategy"] == {"name": "ew"}
    recipe = apply_overrides({"strategy": "famo"}, ["strategy.options.gamma=0.01"])
    assert recipe["strategy"] == {"name": "famo", "options": {"gamma": 0.01}}
    assert check_recipe({"strategy": "ew", "training": None})["strategy"] == {"name": "ew"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training=3", "recipe section 'training' must be a mapping of options, got 3"),
        ("data=[a, b]", "recipe section 'data' must be a mapping of options"),
        ("model.options=7", "recipe section 'model.options' must be a mapping of options, got 7"),
        ("trainng.seed=1",
         r"recipe: unknown keys \['trainng'\]; accepted: data, model, strategy, training, card, baselines, output_dir"),
        ("model.option.width=8",
         r"recipe section 'model': unknown keys \['option'\]; accepted: name, architecture, options"),
        ("strategy.warmup_steps=3",
         r"recipe section 'strategy': unknown keys \['warmup_steps'\]; accepted: name, options"),
        ("baselines=never", "baselines must be one of cache, train, skip, got 'never'"),
    ],
)
def test_recipe_layout_errors_are_clear(override, message, capsys):
    with pytest.raises(ValueError, match=message):
        check_recipe(apply_overrides(load_recipe("quickstart"), [override]))
    assert main(["quickstart", override, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl-train: error: ") and "Traceback" not in err


def test_a_pretrained_backbone_missing_offline_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["quickstart", "model.name=hub_multitask",
                 "model.options={backbone_pretrained: no-such-org/no-such-model}", *TINY,
                 "--baselines", "skip", "--output-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("mtl-train: error: could not load a pretrained model or file "
                               "(model.options.backbone_pretrained=no-such-org/no-such-model): ")
    assert lines[1:] == ["mtl-train: (run again with --traceback for details)"]


def test_unknown_recipe_is_a_clear_error(capsys):
    assert main(["no-such-recipe"]) == 2
    assert "unknown recipe 'no-such-recipe'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        load_recipe("missing.yaml")
    assert "quickstart" in list_recipes()


@pytest.mark.slow
def test_quickstart_end_to_end_on_a_tiny_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    args = ["quickstart", "strategy={name: ew}", "training.num_train_epochs=2", *TINY]
    assert main([*args, "--output-dir", str(out), "--no-progress"]) == 0
    for name in ("config.yaml", "train_log.jsonl", "results.json", "model.safetensors", "loss_curves.png"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["strategy"] == {"name": "ew"} and config["data"]["train_size"] == 128
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("split") != "validation"]  # the training logs
    tasks = config["data"]["tasks"]
    assert records and all(f"loss/{t}" in records[-1] for t in tasks)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 8
    assert set(results["test_metrics"]) == {"left/accuracy", "right/accuracy", "left_odd/accuracy", "right_large/accuracy",
                                            "sum/mae"}
    higher = {k: not k.endswith("mae") for k in results["test_metrics"]}
    assert results["delta_m"] == pytest.approx(delta_m(results["test_metrics"], results["single_task_metrics"], higher))
    # the single-task baselines are cached: a second run reuses them
    cached = list((tmp_path / "cache" / "baselines").glob("*.json"))
    assert len(cached) == 1
    assert main([*args, "--output-dir", str(tmp_path / "run2"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert again["single_task_metrics"] == results["single_task_metrics"]


def test_bad_strategy_option_is_a_clear_error(tmp_path, capsys):
    code = main(["quickstart", "strategy={name: ew, options: {warmup_steps: 3}}", *TINY, "--baselines", "skip",
                 "--output-dir", str(tmp_path), "--no-progress"])
    assert code == 2
    assert "strategy 'ew' has no option 'warmup_steps'" in capsys.readouterr().err


def test_switching_the_strategy_by_name_drops_options_it_does_not_accept():
    notes = []
    recipe = apply_overrides(load_recipe("quickstart"), ["strategy.name=ew"], notes)
    assert recipe["strategy"] == {"name": "ew", "options": {}}
    assert notes == ["strategy.name=ew: dropped options that 'ew' does not accept (from 'sel_update'): warmup_steps=20"]
    # options given after the switch are the new strategy's; accepted ones are kept
    notes = []
    recipe = apply_overrides({"strategy": {"name": "sel_update", "options": {"warmup_steps": 5, "affinity_decay": 0.1}}},
                             ["strategy.name=cagrad", "strategy.options.c=0.5"], notes)
    assert recipe["strategy"] == {"name": "cagrad", "options": {"c": 0.5}}
    assert notes[0].endswith("warmup_steps=5, affinity_decay=0.1")
    # the same name, or an unknown one (reported later), keeps every option
    for name in ("sel_update", "nope"):
        notes = []
        recipe = apply_overrides(load_recipe("quickstart"), [f"strategy.name={name}"], notes)
        assert recipe["strategy"]["options"] == {"warmup_steps": 20} and notes == []


def test_strategy_shorthand_says_which_options_it_drops():
    notes = []
    assert apply_overrides(load_recipe("quickstart"), ["strategy=ew"], notes)["strategy"] == {"name": "ew"}
    assert notes == ["strategy=ew replaces the strategy section: dropped the options of 'sel_update': warmup_steps=20"]
    notes = []
    apply_overrides(load_recipe("quickstart"), ["strategy={name: ew, options: {}}"], notes)
    assert notes == []  # options given explicitly: nothing is dropped behind the user's back


def test_help_example_switching_the_strategy_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    code = main(["quickstart", "strategy.name=ew", "training.num_train_epochs=1", *TINY, "training.max_steps=2",
                 "--baselines", "skip", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "mtl-train: note: strategy.name=ew: dropped options that 'ew' does not accept" in err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["strategy"] == "ew"


def test_run_folder_keeps_the_provenance_of_the_run_that_succeeded(tmp_path, capsys):
    out = tmp_path / "run"
    common = [*TINY, "training.max_steps=2", "--baselines", "skip", "--output-dir", str(out), "--no-progress"]
    assert main(["quickstart", "strategy.options.warmup_steps=1", *common]) == 0
    assert (out / "sel_update_affinity.png").is_file() and (out / "sel_update_num_groups.png").is_file()
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["output_dir"] == str(out) and config["strategy"]["name"] == "sel_update"
    # a successful run of another strategy replaces every output: no plot of the earlier one stays
    assert main(["quickstart", "strategy=ew", *common]) == 0
    assert not (out / "sel_update_affinity.png").exists() and not (out / "sel_update_num_groups.png").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["strategy"] == "ew" and sorted(p.name for p in out.iterdir()) == results["outputs"]
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # a failed run leaves the folder as it was
    capsys.readouterr()
    assert main(["quickstart", "strategy=ew", "data.tasks=[left, rigth]", *common]) == 2
    assert "rigth" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (out / ".incomplete").exists()


def test_results_record_how_the_run_ran(tmp_path, capsys):
    from importlib.metadata import version

    import torch

    out = tmp_path / "run"
    assert main(["quickstart", "strategy=ew", *TINY, "training.max_steps=1", "--baselines", "skip",
                 "--output-dir", str(out), "--no-progress"]) == 0
    environment = json.loads((out / "results.json").read_text())["environment"]
    assert environment["world_size"] == 1 and environment["device"] == "cpu"
    assert environment["threads"] == torch.get_num_threads() and environment["mixed_precision"] == "no"
    assert environment["global_train_batch_size"] == 32
    assert environment["versions"]["torch"] == version("torch") and environment["versions"]["mtl-plugins"]
    stdout = capsys.readouterr().out
    assert f"ran as 1 process on cpu, {torch.get_num_threads()} CPU thread" in stdout


def test_resume_continues_from_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["strategy=ew", *TINY, "training.save_strategy=steps", "training.save_steps=1", "--baselines", "skip",
              "--output-dir", str(out), "--no-progress"]
    assert main(["quickstart", "training.max_steps=2", *common]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]

    def logged_steps():
        lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        return [r["step"] for r in lines if r.get("split") != "validation"]

    assert logged_steps() == [1, 2]
    # the last checkpoint (step 2) continues to step 3: only step 3 is trained and logged
    assert main(["quickstart", "training.max_steps=3", *common, "--resume"]) == 0
    assert logged_steps() == [3] and json.loads((out / "results.json").read_text())["steps"] == 3
    # a named checkpoint
    assert main(["quickstart", "training.max_steps=2", *common, "--resume", str(out / "checkpoints" / "checkpoint-1")]) == 0
    assert logged_steps() == [2]
    capsys.readouterr()


@pytest.mark.parametrize("args", [["--resume", "/nonexistent"], ["training.resume_from_checkpoint=/nonexistent"]])
def test_resuming_from_a_missing_checkpoint_is_an_error(args, tmp_path, capsys):
    assert main(["quickstart", *TINY, "--output-dir", str(tmp_path / "run"), "--no-progress", *args]) == 2
    assert capsys.readouterr().err.startswith(
        "mtl-train: error: resume_from_checkpoint: checkpoint folder '/nonexistent' does not exist")
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoints_says_how_to_save_them(tmp_path, capsys):
    assert main(["quickstart", "strategy=ew", *TINY, "training.max_steps=1", "--baselines", "skip",
                 "--output-dir", str(tmp_path / "run"), "--no-progress", "--resume"]) == 2
    assert "nothing to resume: no checkpoint in" in capsys.readouterr().err


def test_progress_bars_say_which_model_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTL_PLUGINS_CACHE", str(tmp_path / "cache"))
    assert main(["quickstart", "strategy=ew", "data.tasks=[left, right]", *TINY, "training.max_steps=1",
                 "--baselines", "train", "--output-dir", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "multi-task (ew)" in err
    assert "single-task baseline 1/2: left" in err and "single-task baseline 2/2: right" in err
    assert err.index("multi-task (ew)") < err.index("single-task baseline 1/2") < err.index("single-task baseline 2/2")


def test_training_evaluates_on_validation_and_scores_test_once(tmp_path, monkeypatch, capsys):
    from mtl_plugins.trainers import MultiTaskTrainer

    evaluated = []
    original = MultiTaskTrainer.evaluate

    def recording_evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        evaluated.append((metric_key_prefix, len(eval_dataset if eval_dataset is not None else self.eval_dataset)))
        return original(self, eval_dataset, ignore_keys, metric_key_prefix)

    monkeypatch.setattr(MultiTaskTrainer, "evaluate", recording_evaluate)
    out = tmp_path / "run"
    assert main(["quickstart", "strategy=ew", *TINY, "data.validation_size=40", "training.num_train_epochs=2",
                 "training.save_strategy=epoch", "training.load_best_model_at_end=true",
                 "training.metric_for_best_model=left/accuracy", "--baselines", "skip", "--output-dir", str(out),
                 "--no-progress"]) == 0
    assert evaluated == [("eval", 40), ("eval", 40), ("test", 64)]
    results = json.loads((out / "results.json").read_text())
    epochs = results["epochs"]
    assert [row["epoch"] for row in epochs] == [1.0, 2.0] and [row["step"] for row in epochs] == [4, 8]
    lines = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    validation = [r for r in lines if r.get("split") == "validation"]
    training = [r for r in lines if r.get("split") != "validation"]
    for row, logged in zip(epochs, validation):
        assert row["validation_loss"] == logged["eval_loss"]
        assert row["validation_left/accuracy"] == logged["eval_left/accuracy"]
        # the mean of the training logs of that epoch (logging_steps=1: one per step)
        window = [r["loss"] for r in training if row["step"] - 4 < r["step"] <= row["step"]]
        assert row["train_loss"] == pytest.approx(sum(window) / 4)
    stdout = capsys.readouterr().out
    assert "per epoch (validation split):" in stdout
    assert stdout.split("per epoch (validation split):\n")[1].split()[:4] == ["epoch", "step", "train_loss",
                                                                             "validation_loss"]


def test_run_files_have_the_usual_mode_and_cpu_runs_do_not_pin_memory(tmp_path, capsys):
    import os
    import warnings

    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["quickstart", "strategy=ew", *TINY, "training.max_steps=1", "--baselines", "skip",
                     "--output-dir", str(out), "--no-progress"]) == 0
    assert not [w for w in caught if "pin_memory" in str(w.message)]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
