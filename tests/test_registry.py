import subprocess
import sys

import pytest
import torch

import mtl_plugins
from mtl_plugins.registry import STRATEGIES, Registry
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


# -- option values: finite numbers, each option's own range -----------------------------------------


def _float_options():
    """(strategy, option) for every option of a registered strategy whose annotation admits a float."""
    import typing

    from mtl_plugins.registry import STRATEGIES, _matches

    mtl_plugins.available_strategies()
    found = []
    for name in STRATEGIES.available():
        hints = typing.get_type_hints(STRATEGIES._callable(name))
        for option in STRATEGIES.accepted_options(name):
            if option in hints and _matches(0.5, hints[option]) and option != "loss_weights":
                found.append((name, option))
    return found


@pytest.mark.parametrize("name", mtl_plugins.available_strategies())
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_weight_is_refused_naming_strategy_and_task(name, bad):
    with pytest.raises(ValueError, match=rf"strategy '{name}': option loss_weights\['b'\] must be a finite number"):
        mtl_plugins.build_strategy(name, ["a", "b"], loss_weights={"a": 1.0, "b": bad})


def test_every_float_option_is_listed():
    listed = set(_float_options())
    assert {("cagrad", "c"), ("mgda", "epsilon"), ("nash_mtl", "max_norm"), ("dwa", "temperature"),
            ("gradnorm", "alpha"), ("uw", "lr"), ("famo", "weight_decay")} <= listed


@pytest.mark.parametrize("name, option", _float_options())
@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_non_finite_float_option_is_refused_naming_strategy_and_option(name, option, bad):
    with pytest.raises(ValueError, match=rf"strategy '{name}': option {option} must be a finite number"):
        mtl_plugins.build_strategy(name, ["a", "b"], **{option: bad})
    with pytest.raises(ValueError, match=rf"strategy '{name}': option {option} must be a finite number"):
        STRATEGIES.get(name)(["a", "b"], **{option: bad})  # the class itself, as LibMTL users build it


@pytest.mark.parametrize("name", mtl_plugins.available_strategies())
def test_non_finite_loss_weight_is_refused_by_the_class_itself(name):
    with pytest.raises(ValueError, match=rf"strategy '{name}': option loss_weights\['b'\] must be a finite number"):
        STRATEGIES.get(name)(["a", "b"], loss_weights={"a": 1.0, "b": float("nan")})


def test_non_finite_value_inside_a_nested_option_is_refused():
    with pytest.raises(ValueError, match=r"option loss_scaling\['temperature'\] must be a finite number"):
        mtl_plugins.build_strategy("sel_update", ["a", "b"], loss_scaling={"name": "dwa", "temperature": float("nan")})


@pytest.mark.parametrize("name, options, message", [
    ("cagrad", {"c": -0.1}, "cagrad: c must be non-negative"),
    ("mgda", {"epsilon": -1e-5}, "mgda: epsilon must be non-negative"),
    ("mgda", {"max_iters": 0}, "mgda: max_iters must be >= 1"),
    ("nash_mtl", {"max_norm": -1.0}, "nash_mtl: max_norm must be non-negative"),
    ("dwa", {"temperature": 0.0}, "dwa: temperature must be positive"),
    ("gradnorm", {"alpha": -0.5}, "gradnorm: alpha must be non-negative"),
    ("uw", {"lr": 0.0}, "uw: lr must be positive"),
    ("famo", {"lr": -1.0}, "famo: lr must be positive"),
    ("gradnorm", {"lr": 0.0}, "gradnorm: lr must be positive"),
    ("ew", {"loss_weights": {"a": -1.0}}, "ew: loss_weights must be finite and non-negative"),
    ("famo", {"loss_weights": {"a": 0.0}}, "famo needs positive loss weights"),
    ("gls", {"loss_weights": {"a": 0.0}}, "gls needs positive loss weights"),
    ("sel_update", {"loss_weights": {"a": 0.0}}, "sel_update needs positive loss weights"),
])
def test_out_of_range_option_is_refused_naming_strategy_and_option(name, options, message):
    with pytest.raises(ValueError, match=message):
        mtl_plugins.build_strategy(name, ["a", "b"], **options)


def test_zero_loss_weight_stays_allowed_where_the_method_takes_it():
    assert mtl_plugins.build_strategy("ew", ["a", "b"], loss_weights={"a": 0.0}).loss_weights == {"a": 0.0, "b": 1.0}
