"""Datasets for recipes: name -> builder returning a :class:`DataBundle`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any

from ..registry import Registry
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


DATASETS = Registry("dataset", arguments=())
Builder = Callable[..., DataBundle]


def register_dataset(name: str, *, aliases: Sequence[str] = ()) -> Callable[[Builder], Builder]:
    """Register a recipe dataset builder ``builder(**options) -> DataBundle`` under ``name``."""
    return DATASETS.register(name, aliases=aliases)


def build_data(name: str, **options: Any) -> DataBundle:
    """Build the recipe dataset ``name``; unknown names and options are errors listing the accepted ones."""
    _load_builtins()
    return DATASETS.build(name, **options)


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
    """Names of every registered recipe dataset."""
    _load_builtins()
    return DATASETS.available()


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        import_module(f"{__name__}.{module}")
