"""Recipes: YAML run configurations, bundled by name or given as a path, with ``key=value`` overrides."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

RECIPE_PACKAGE = "mtl_plugins.recipes"


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
    recipe = yaml.safe_load(text)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {str(name_or_path)!r} is not a YAML mapping")
    return recipe


def apply_overrides(recipe: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to a copy of ``recipe``."""
    result = copy.deepcopy(recipe)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return result
