"""Type checks of recipe options: every error names the key, the expected type and the value, before
any data is built or any heavy library is imported."""

import subprocess
import sys

import pytest

from mtl_plugins import compare, runner
from mtl_plugins.cli import main
from mtl_plugins.config import apply_overrides, check_recipe, list_recipes, load_recipe
from mtl_plugins.recipe_checks import check_recipe_types


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("training.max_steps=ten", "training.max_steps should be int, got 'ten' (str)"),
        ("training.learning_rate=fast", "training.learning_rate should be float, got 'fast' (str)"),
        ("training.num_train_epochs=two", "training.num_train_epochs should be float, got 'two' (str)"),
        ("training.per_device_train_batch_size=8.5", "training.per_device_train_batch_size should be int, got 8.5"),
        ("training.lr_ts=big", "training.lr_ts should be float, got 'big' (str)"),
        ("data.train_size=abc", "data.train_size should be int | None, got 'abc' (str)"),
        ("model.options.width=wide", "model.options.width should be int, got 'wide' (str)"),
        ("model.options.widht=32",
         "model.options.widht: model 'multidigits_cnn' has no option 'widht'; accepted: width: int, hidden: int"),
        ("data.sizee=3", "data.sizee: dataset 'multidigits' has no option 'sizee'; accepted: tasks: "),
        ("strategy.options.warmup_steps=x", "strategy.options.warmup_steps should be int, got 'x' (str)"),
        ("strategy.options.warmup=3", "strategy.options.warmup: strategy 'sel_update' has no option 'warmup'; "
                                      "accepted: affinity_decay: float, warmup_steps: int, "),
        ("card.license=3", "card.license should be str, got 3 (int)"),
        ("card.licence=mit", "recipe section 'card': unknown keys ['licence']; accepted: license, datasets"),
    ],
)
def test_wrong_types_name_the_key_before_any_data_is_built(override, message, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("data was built before the recipe was checked")

    monkeypatch.setattr(runner, "build_datasets", no_data)
    assert main(["quickstart", override, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mtl-train: error: {message}")
    assert "Traceback" not in err and "--traceback" not in err


def test_every_bundled_recipe_passes_the_checks():
    for name in list_recipes():
        check_recipe_types(check_recipe(load_recipe(name)))


def test_options_of_builders_with_extra_keywords_are_still_type_checked():
    recipe = check_recipe(apply_overrides(load_recipe("nyud-ew"), ["data.augment=maybe"]))
    with pytest.raises(ValueError, match="data.augment should be bool, got 'maybe'"):
        check_recipe_types(recipe)
    check_recipe_types(check_recipe(apply_overrides(load_recipe("nyud-ew"), ["data.flip=true"])))  # **options


def test_checks_import_neither_torch_nor_transformers():
    code = ("import sys\nfrom mtl_plugins.config import apply_overrides, check_recipe, load_recipe\n"
            "from mtl_plugins.recipe_checks import check_recipe_types\n"
            "for name, o in [('quickstart', 'model.options.width=w'), ('text-quickstart', 'model.options.pooling=1'),"
            " ('nyud-ew', 'data.train_size=x'), ('quickstart', 'training.max_steps=x')]:\n"
            "    try:\n        check_recipe_types(check_recipe(apply_overrides(load_recipe(name), [o])), strategy=False)\n"
            "    except ValueError as e:\n        print(e)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model.options.width should be int") and lines[1].startswith("model.options.pooling")
    assert lines[2].startswith("data.train_size should be int") and lines[3].startswith("training.max_steps")
    assert lines[4] == "False False"


def test_mtl_compare_reports_a_wrong_type_without_a_traceback(tmp_path, capsys):
    code = compare.main(["quickstart", "training.max_steps=x", "--strategies", "ew", "--output-dir", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("mtl-compare: error: training.max_steps should be int, got 'x' (str)")
    assert "Traceback" not in err
