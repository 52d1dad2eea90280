"""Type checks of a recipe's options before anything is built: each error names the key, the expected
type and the value given.

``training`` keys are checked against the field annotations of ``MultiTaskTrainingArguments``;
``data`` and ``model.options`` against the signatures of the dataset and model builders. The
built-in ones are read from their sources (torch and transformers are not imported, so the checks
answer at once); builders registered elsewhere are imported. ``strategy.options`` are checked
against the strategy's signature.
"""

from __future__ import annotations

import ast
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from .registry import _matches

#: ``(module, class)`` of the training arguments, base class first: their dataclass fields are the
#: ``training`` keys.
TRAINING_CLASSES = (("transformers", "training_args.py", "TrainingArguments"),
                    ("mtl_plugins.trainers", "arguments.py", "MultiTaskTrainingArguments"))


def _describe(annotation: Any) -> str:
    """``int | None``, ``Sequence[str]``, ``'a' | 'b'``: an annotation as a user reads it."""
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_describe(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = str(annotation).replace("typing.", "").replace("collections.abc.", "")
    return text.replace("NoneType", "None")


class _AnyForUnknown(dict):
    """Names an annotation uses that are not plain types (enums, config classes) read as ``Any``."""

    def __missing__(self, key: str) -> Any:
        return Any


def _annotation(source: str) -> Any:
    names = ("Any", "Literal", "Optional", "Union", "Sequence", "Mapping")
    namespace = _AnyForUnknown({name: getattr(typing, name) for name in names})
    namespace.update({"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list,
                      "tuple": tuple, "None": None})
    try:
        return eval(source, {"__builtins__": {}}, namespace)  # noqa: S307 - annotations of installed sources
    except Exception:  # an annotation this reader does not understand is not checked
        return Any


def _source(package: str, filename: str) -> ast.Module | None:
    """The parsed source of ``filename`` in ``package`` (only the package's parents are imported)."""
    spec = find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return ast.parse(path.read_text()) if path.is_file() else None


def _module_source(module: str) -> ast.Module | None:
    package, _, name = module.rpartition(".")
    return _source(package, f"{name}.py")


@cache
def training_fields() -> dict[str, Any]:
    """``{field: annotation}`` of ``MultiTaskTrainingArguments``, read from the sources."""
    fields: dict[str, Any] = {}
    for package, filename, class_name in TRAINING_CLASSES:
        tree = _source(package, filename)
        if tree is None:
            continue
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                fields[item.target.id] = _annotation(ast.unparse(item.annotation))
    return fields


def check_values(where: str, options: Mapping[str, Any], annotations: Mapping[str, Any], owner: str,
                 open_ended: bool = False) -> None:
    """Raise ``ValueError`` for an option ``annotations`` lacks (listing the accepted ones; allowed
    when ``open_ended``) or whose value does not match its annotation (naming ``<where>.<key>``, the
    type and the value)."""
    for key, value in options.items():
        if key not in annotations and open_ended:
            continue
        if key not in annotations:
            listing = ", ".join(f"{k}: {_describe(a)}" for k, a in annotations.items())
            raise ValueError(f"{where}.{key}: {owner} has no option {key!r}; accepted: {listing or 'none'}")
        if not _matches(value, annotations[key]):
            raise ValueError(f"{where}.{key} should be {_describe(annotations[key])}, got {value!r} "
                             f"({type(value).__name__})")


def check_training(training: Mapping[str, Any]) -> None:
    """The ``training`` section against the training arguments' fields."""
    fields = training_fields()
    if not fields:
        return
    annotations = {k: a for k, a in fields.items() if k != "output_dir"}
    unknown = sorted(set(training) - set(annotations))
    if unknown:
        raise ValueError(f"unknown training options {unknown}; accepted: the TrainingArguments names "
                         "(e.g. max_steps, learning_rate, per_device_train_batch_size) and optim")
    check_values("training", training, annotations, "TrainingArguments")


#: A builder's options: ``{option: annotation}`` and whether it also takes ``**options``.
Options = tuple[dict[str, Any], bool]


def _static_builders(modules: tuple[str, ...], decorator: str) -> dict[str, Options]:
    """The options of the functions decorated ``@<decorator>("name")`` in the sources of ``modules``."""
    builders: dict[str, Options] = {}
    for module in modules:
        tree = _module_source(module)
        for node in tree.body if tree is not None else ():
            if not isinstance(node, ast.FunctionDef):
                continue
            for call in node.decorator_list:
                if (isinstance(call, ast.Call) and getattr(call.func, "id", None) == decorator and call.args
                        and isinstance(call.args[0], ast.Constant)):
                    args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
                    builders[call.args[0].value] = ({
                        a.arg: _annotation(ast.unparse(a.annotation)) if a.annotation else Any for a in args},
                        node.args.kwarg is not None)
    return builders


@cache
def static_datasets() -> dict[str, Options]:
    """The built-in dataset builders' options, from their sources."""
    from . import data

    return _static_builders(tuple(f"{data.__name__}.{m}" for m in data.BUILTIN_MODULES), "register_dataset")


#: The modules whose sources define the built-in recipe models (the core's and the Hub's).
MODEL_MODULES = ("mtl_plugins.models", "mtl_plugins.hub.recipe")


@cache
def static_models() -> dict[str, Options]:
    """The built-in model builders' options (after ``tasks, task_specs``), from their sources."""
    builders = _static_builders(MODEL_MODULES, "register_model")
    return {name: (dict(list(options.items())[2:]), extra) for name, (options, extra) in builders.items()}


def builder_options(builder: Callable[..., Any], skip: int) -> Options:
    """The options of a builder after its first ``skip`` arguments."""
    params = list(inspect.signature(builder).parameters.values())[skip:]
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # unresolvable annotations: names are still checked
        hints = {}
    named = {p.name: hints.get(p.name, Any) for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def check_recipe_types(recipe: Mapping[str, Any], strategy: bool = True) -> None:
    """Check every option of a (layout-checked) recipe: training, data, model and (unless
    ``strategy=False``) strategy; ``ValueError`` names the first bad key."""
    check_training(recipe.get("training", {}))
    check_values("card", recipe.get("card", {}), {"license": str, "datasets": list[str]}, "the model card")
    data = dict(recipe.get("data", {}))
    name = data.pop("dataset", "multidigits")
    options = static_datasets().get(name)
    if options is None:
        from .data import DATASETS, _load_builtins

        _load_builtins()
        try:
            options = builder_options(DATASETS.get(name), 0)
        except ValueError as error:
            raise ValueError(f"data.dataset: {error}") from None
    check_values("data", data, options[0], f"dataset {name!r}", options[1])
    spec = recipe.get("model", {})
    name = spec.get("name", "multidigits_cnn")
    options = static_models().get(name)
    if options is None:
        import mtl_plugins.hub  # noqa: F401  (registers the Hub's recipe models)

        from .models import MODELS

        try:
            options = builder_options(MODELS.get(name), 2)
        except ValueError as error:
            raise ValueError(f"model.name: {error}") from None
    check_values("model.options", spec.get("options", {}), options[0], f"model {name!r}", options[1])
    if not strategy:
        return
    from . import available_strategies
    from .registry import STRATEGIES

    section = recipe.get("strategy", {})
    available_strategies()
    name = STRATEGIES.resolve(section.get("name", "ew"))
    named, _ = builder_options(STRATEGIES.get(name).__init__, 2)  # self, tasks
    if getattr(STRATEGIES.get(name), "accepts_loss_scaling", False):
        from .strategies.base import LossScalingSpec

        named["loss_scaling"] = LossScalingSpec
    named = {k: a for k, a in named.items() if k != "model"}  # given by the runner, not the recipe
    check_values("strategy.options", section.get("options", {}), named, f"strategy {name!r}")


def resume_checkpoint(recipe: Mapping[str, Any], resume: str | bool | None = None) -> str | bool | None:
    """The checkpoint to resume from: ``resume`` (``True``: the last one), else the recipe's
    ``training.resume_from_checkpoint``; a folder that does not exist is an error."""
    if resume is None:
        resume = (recipe.get("training") or {}).get("resume_from_checkpoint")
    if isinstance(resume, (str, Path)) and not Path(resume).is_dir():
        raise ValueError(f"resume_from_checkpoint: checkpoint folder {str(resume)!r} does not exist")
    return resume or None
