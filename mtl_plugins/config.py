"""Recipes: YAML run configurations, bundled by name or given as a path, with ``key=value`` overrides.

A recipe has the sections ``data`` (the dataset builder's options), ``model`` (``name``,
``architecture``, ``options``), ``strategy`` (``name``, ``options``) and ``training``
(TrainingArguments names), plus ``baselines`` and ``output_dir``. :func:`check_recipe` checks that
layout; the options of datasets, models, strategies and training are checked where they are used.
YAML is read with floats in scientific notation (``1e-4``) parsed as numbers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

RECIPE_PACKAGE = "mtl_plugins.recipes"
#: Sections whose value is a mapping; ``None`` (an empty YAML section) reads as an empty one.
SECTIONS = ("data", "model", "strategy", "training", "card")
#: Top-level recipe keys.
TOP_LEVEL_KEYS = (*SECTIONS, "baselines", "output_dir")
#: Keys of the sections with a fixed layout (their ``options`` are free-form). ``card``: the saved
#: model card's ``license`` and ``datasets`` (Hub ids).
SECTION_KEYS = {"model": ("name", "architecture", "options"), "strategy": ("name", "options"),
                "card": ("license", "datasets")}
BASELINE_MODES = ("cache", "train", "skip")


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4`` and ``2E+3`` as floats (YAML 1.1 wants a dot)."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """``text`` parsed as YAML by :class:`RecipeLoader`."""
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def list_recipes() -> list[str]:
    """Names of the bundled recipes."""
    files = resources.files(RECIPE_PACKAGE).iterdir()
    return sorted(f.name[: -len(".yaml")] for f in files if f.name.endswith(".yaml"))


def load_recipe(name_or_path: str | Path) -> dict[str, Any]:
    """A recipe as a dict, from a YAML path or a bundled recipe name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        text = path.read_text()
    else:
        resource = resources.files(RECIPE_PACKAGE) / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise ValueError(f"unknown recipe {str(name_or_path)!r}; bundled recipes: {', '.join(list_recipes())}")
        text = resource.read_text()
    recipe = parse_yaml(text)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {str(name_or_path)!r} is not a YAML mapping")
    return recipe


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str],
                    notes: list[str] | None = None) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML, ``1e-4`` as a float) to a copy of
    ``recipe``. ``strategy=NAME`` is short for ``strategy={name: NAME}`` (the strategy section is
    replaced). ``strategy.name=NAME`` switches the strategy and keeps only the options that ``NAME``
    accepts. What an override drops is said in ``notes`` (one line each) when a list is given."""
    result = copy.deepcopy(recipe)
    notes = [] if notes is None else notes
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if node is result and part == "strategy":
                child = node[part] = _strategy_shorthand(child)
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        value = parse_yaml(raw)
        if node is result and leaf == "strategy":
            value = _strategy_shorthand(value)
            dropped = _options(result.get("strategy"))
            if isinstance(value, dict) and "options" not in value and dropped:
                notes.append(f"{item} replaces the strategy section: dropped the options of "
                             f"{_strategy_shorthand(result['strategy']).get('name')!r}: {_listing(dropped)}")
        elif key == "strategy.name" and value != node.get("name") and _options(node):
            kept, dropped = _split_options(value, node["options"])
            if dropped:
                node["options"] = kept
                notes.append(f"{item}: dropped options that {value!r} does not accept "
                             f"(from {node.get('name')!r}): {_listing(dropped)}")
        node[leaf] = value
    return result


def _options(section: Any) -> dict[str, Any]:
    section = _strategy_shorthand(section)
    options = section.get("options") if isinstance(section, dict) else None
    return options if isinstance(options, dict) else {}


def _listing(options: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items())


def _split_options(strategy: Any, options: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` split into those that ``strategy`` accepts and the others (an unknown name keeps
    them all: its error comes later)."""
    from . import available_strategies
    from .registry import STRATEGIES

    available_strategies()  # registers the built-ins
    try:
        accepted = STRATEGIES.accepted_options(strategy)
    except (ValueError, TypeError):
        return dict(options), {}
    kept = {k: v for k, v in options.items() if k in accepted}
    return kept, {k: v for k, v in options.items() if k not in accepted}


def _strategy_shorthand(value: Any) -> Any:
    """``{"name": value}`` for a strategy given by name alone; any other value unchanged."""
    return {"name": value} if isinstance(value, str) else value


def check_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``recipe`` with its layout checked: known top-level keys, mapping sections (an empty
    one becomes ``{}``), the fixed keys of ``model`` and ``strategy``, a known ``baselines`` mode.
    A strategy given by name alone becomes ``{"name": ...}``."""
    result = copy.deepcopy(dict(recipe))
    _check_keys("recipe", result, TOP_LEVEL_KEYS)
    if "strategy" in result:
        result["strategy"] = _strategy_shorthand(result["strategy"])
    for section in SECTIONS:
        if section in result:
            result[section] = _mapping(section, result[section])
    for section, keys in SECTION_KEYS.items():
        if section in result:
            _check_keys(f"recipe section {section!r}", result[section], keys)
            if "options" in result[section]:
                result[section]["options"] = _mapping(f"{section}.options", result[section]["options"])
    if result.get("baselines", "cache") not in BASELINE_MODES:
        raise ValueError(f"baselines must be one of {', '.join(BASELINE_MODES)}, got {result['baselines']!r}")
    return result


def _mapping(where: str, value: Any) -> dict[str, Any]:
    """``value`` as a section: a dict (``{}`` for None); anything else is an error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"recipe section {where!r} must be a mapping of options, got {value!r}")
    return value


def _check_keys(where: str, mapping: Mapping[str, Any], accepted: Sequence[str]) -> None:
    unknown = sorted(str(k) for k in set(mapping) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; accepted: {', '.join(accepted)}")
