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
