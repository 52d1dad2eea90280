import subprocess
import sys

import pytest
import torch

import mtl_plugins
from mtl_plugins.registry import Registry
from mtl_plugins.strategies.base import Strategy


def test_builtin_names_and_libmtl_aliases():
    assert "ew" in mtl_plugins.available_strategies()
    assert "hps" in mtl_plugins.available_architectures()
    assert mtl_plugins.build_strategy("EW", ["a", "b"]).name == "ew"


def test_unknown_strategy_lists_available_names():
    with pytest.raises(ValueError, match="unknown strategy 'nope'.*ew"):
        mtl_plugins.build_strategy("nope", ["a"])
    with pytest.raises(ValueError, match="unknown architecture 'nope'.*hps"):
        mtl_plugins.build_architecture("nope", ["a"])


def test_unknown_option_names_accepted_ones():
    with pytest.raises(TypeError, match="no option 'lr'.*loss_weights.*seed"):
        mtl_plugins.build_strategy("ew", ["a", "b"], lr=0.1)


def test_ill_typed_option_is_rejected():
    with pytest.raises(TypeError, match="seed='3' should be int"):
        mtl_plugins.build_strategy("ew", ["a", "b"], seed="3")


@pytest.mark.parametrize("tasks, error", [([], ValueError), (["a", "a"], ValueError), ("ab", TypeError), ([1], TypeError)])
def test_bad_task_lists(tasks, error):
    with pytest.raises(error):
        mtl_plugins.build_strategy("ew", tasks)


def test_loss_weights_for_unknown_task():
    with pytest.raises(ValueError, match="unknown tasks \\['c'\\]"):
        mtl_plugins.build_strategy("ew", ["a", "b"], loss_weights={"c": 1.0})


def test_register_custom_strategy_and_duplicate_name():
    registry = Registry("strategy")

    @registry.register("mine", aliases=("Mine2",))
    class Mine(Strategy):
        def __init__(self, tasks, *, factor: float = 1.0):
            super().__init__(tasks)
            self.factor = factor

    assert registry.available() == ["mine"]
    assert registry.build("Mine2", ["x"], factor=2).factor == 2
    with pytest.raises(ValueError, match="already registered"):
        registry.register("mine")(Mine)


def test_import_is_light():
    code = "import sys, mtl_plugins; mtl_plugins.available_strategies(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_strategy_state_round_trip_restores_rng():
    strategy = mtl_plugins.build_strategy("ew", ["a", "b"], seed=3)
    state = strategy.state_dict()
    first = torch.rand(3, generator=strategy.generator)
    strategy.load_state_dict(state)
    assert torch.equal(first, torch.rand(3, generator=strategy.generator))


def test_core_imports_neither_trainer_nor_hub_nor_transformers():
    core = ["strategies", "architectures", "data", "metrics", "losses", "grouping", "models", "loop", "param_groups",
            "loss_weights", "pretrained"]
    code = ("import importlib, sys\n"
            f"for name in {core!r}: importlib.import_module('mtl_plugins.' + name)\n"
            "import mtl_plugins.data, mtl_plugins.models\n"
            "mtl_plugins.data.available_datasets(); mtl_plugins.available_architectures()\n"
            "print(sorted(m for m in sys.modules if m.startswith(('mtl_plugins.trainers', 'mtl_plugins.hub', "
            "'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_models_and_datasets_share_the_registry_errors_and_aliases():
    from mtl_plugins.data import DATASETS, available_datasets, build_data
    from mtl_plugins.models import MODELS, available_models, build_model

    assert isinstance(MODELS, Registry) and isinstance(DATASETS, Registry)
    assert "multidigits_cnn" in available_models() and "multidigits" in available_datasets()
    with pytest.raises(ValueError, match="unknown model 'nope'; available: .*multidigits_cnn.*mtl_plugins.hub"):
        build_model("nope", ["a"], {})
    with pytest.raises(TypeError, match="model 'multidigits_cnn' has no option 'depth'; accepted options: width: int"):
        build_model("multidigits_cnn", ["left"], {}, depth=3)
    with pytest.raises(TypeError, match="option width='wide' should be int"):
        build_model("multidigits_cnn", ["left"], {}, width="wide")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; available: .*multidigits"):
        build_data("mnist")
    with pytest.raises(TypeError, match="dataset 'multidigits' has no option 'size'; accepted options: tasks"):
        build_data("multidigits", size=3)


def test_function_plugins_with_fixed_arguments_and_open_options():
    registry = Registry("model", arguments=("tasks", "task_specs"))

    @registry.register("pair", aliases=("Pair",))
    def pair(tasks, task_specs, *, scale: float = 1.0, **extra):
        return tasks, task_specs, scale, extra

    assert registry.build("PAIR", ["a"], {"a": 1}, scale=2, colour="red") == (["a"], {"a": 1}, 2, {"colour": "red"})
    with pytest.raises(TypeError, match="scale='big' should be float"):
        registry.build("pair", ["a"], {}, scale="big")
    with pytest.raises(TypeError, match=r"takes 2 positional arguments \(tasks, task_specs\), got 1"):
        registry.build("pair", ["a"])
    with pytest.raises(ValueError, match="duplicate task names"):
        registry.build("pair", ["a", "a"], {})
