"""Datasets for recipes: name -> builder returning a :class:`DataBundle`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ..tasks import TaskSpec


@dataclass
class DataBundle:
    """What a recipe trains and evaluates on: task names, ``datasets.Dataset`` splits, task specs and
    the tokenizer or image processor that prepared the inputs (saved next to Hugging Face models).

    ``eval`` is the test split, scored once at the end of a run; ``validation`` (when the dataset has
    one) is what training evaluates on: per-epoch metrics, model selection (``load_best_model_at_end``)."""

    tasks: list[str]
    train: Any
    eval: Any
    task_specs: dict[str, TaskSpec]
    processor: Any = None
    validation: Any = None


DATASETS: dict[str, Callable[..., DataBundle]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., DataBundle]], Callable[..., DataBundle]]:
    """Register a recipe dataset builder ``builder(**options) -> DataBundle`` under ``name``."""

    def decorator(builder: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = builder
        return builder

    return decorator


def build_data(name: str, **options: Any) -> DataBundle:
    """Build the recipe dataset ``name``; unknown names list the available ones."""
    _load_builtins()
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**options)


#: Modules whose import registers the built-in dataset builders (imported on first use).
BUILTIN_MODULES = (
    "multidigits",
    "drug_reviews",
    "dense.nyud",
    "dense.pascal_context",
    "dense.taskonomy",
    "dense.cityscapes",
    "dense.rooms",
)


def available_datasets() -> list[str]:
    _load_builtins()
    return sorted(DATASETS)


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        import_module(f"{__name__}.{module}")
