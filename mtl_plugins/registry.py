"""Name -> plugin registries (LibMTL-style, with aliases): strategies, architectures, recipe models
and datasets.

A plugin is a class or a function. Its leading positional arguments are fixed by the registry (the
task list for strategies and architectures; tasks and task specs for models; none for datasets);
keyword options follow. Options are checked against the signature: unknown names (unless it takes
``**options``) and ill-typed values are rejected with an error that names the option and the
accepted ones; NaN or infinite numbers (also inside lists and mappings such as ``loss_weights``) are
rejected naming the option. Ranges are each plugin's own check, where the option is defined.
"""

from __future__ import annotations

import inspect
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T")

#: Options a plugin receives from the caller's context rather than from the user's recipe.
CONTEXT_OPTIONS = ("model",)
#: The option that composes a loss weighting with an update method (``Strategy.set_loss_scaling``).
LOSS_SCALING = "loss_scaling"


def check_tasks(tasks: Sequence[str]) -> list[str]:
    """Validate a task list: non-empty, strings, no duplicates. Returns it as a list."""
    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of task names, got {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty: give at least one task name")
    bad = [t for t in tasks if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"task names must be non-empty strings, got {bad!r}")
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"duplicate task names: {duplicates}")
    return tasks


def _matches(value: Any, annotation: Any) -> bool:
    """Best-effort runtime check of ``value`` against a type annotation."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in get_args(annotation))
    if origin is Literal:
        return value in get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, Sequence, typing.Sequence, tuple):
        return isinstance(value, (list, tuple))
    if origin in (dict, typing.Mapping) or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def non_finite_path(value: Any, path: str) -> str | None:
    """``path`` (extended to the offending entry) if ``value`` holds a NaN or infinite number, else None."""
    if isinstance(value, numbers.Real):
        return None if math.isfinite(value) else path
    if isinstance(value, Mapping):
        return next((bad for k, v in value.items() if (bad := non_finite_path(v, f"{path}[{k!r}]"))), None)
    if isinstance(value, (list, tuple)):
        return next((bad for i, v in enumerate(value) if (bad := non_finite_path(v, f"{path}[{i}]"))), None)
    return None


def _describe(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return "any"
    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


class Registry:
    """A named collection of plugins (classes or functions) with aliases and option checking.

    ``arguments`` names the positional arguments every plugin takes before its options (``tasks``
    first, when given, is checked with :func:`check_tasks`); ``hint`` ends the unknown-name error.
    """

    def __init__(self, kind: str, arguments: Sequence[str] = ("tasks",), hint: str = ""):
        self.kind = kind
        self.arguments = tuple(arguments)
        self.hint = hint
        self._classes: dict[str, Any] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: Sequence[str] = ()) -> Callable[[T], T]:
        """Decorator registering a class or function under ``name`` (and optional aliases)."""

        def decorator(plugin: T) -> T:
            for key in (name, *aliases):
                if key in self._classes or key in self._aliases:
                    raise ValueError(f"{self.kind} {key!r} is already registered")
            self._classes[name] = plugin
            for alias in aliases:
                self._aliases[alias] = name
            plugin.name = name  # type: ignore[attr-defined]
            return plugin

        return decorator

    def available(self) -> list[str]:
        """Canonical names of all registered plugins, sorted."""
        return sorted(self._classes)

    def resolve(self, name: str) -> str:
        """Canonical name for ``name`` or an alias; ``ValueError`` listing the choices if unknown."""
        if name in self._classes:
            return name
        if name in self._aliases:
            return self._aliases[name]
        lowered = {k.lower(): k for k in self._classes} | {k.lower(): v for k, v in self._aliases.items()}
        if isinstance(name, str) and name.lower() in lowered:
            return lowered[name.lower()]
        hint = f" ({self.hint})" if self.hint else ""
        raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.available())}{hint}")

    def get(self, name: str) -> Any:
        return self._classes[self.resolve(name)]

    def _callable(self, name: str) -> Callable[..., Any]:
        """What is called with the options: the class's ``__init__`` or the function itself."""
        plugin = self.get(name)
        return plugin.__init__ if isinstance(plugin, type) else plugin

    def _parameters(self, name: str) -> list[inspect.Parameter]:
        """The plugin's parameters after ``self`` (classes) and the registry's positional arguments."""
        params = list(inspect.signature(self._callable(name)).parameters.values())
        skip = len(self.arguments) + isinstance(self.get(name), type)
        return params[skip:]

    def accepted_options(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword options of a plugin, from its signature (plus ``loss_scaling`` for strategies
        with ``accepts_loss_scaling``)."""
        options = {p.name: p for p in self._parameters(name) if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if getattr(self.get(name), "accepts_loss_scaling", False):
            from .strategies.base import LossScalingSpec

            options[LOSS_SCALING] = inspect.Parameter(LOSS_SCALING, inspect.Parameter.KEYWORD_ONLY, default=None,
                                                      annotation=LossScalingSpec)
        return options

    def check_options(self, name: str, options: dict[str, Any]) -> None:
        """Raise ``TypeError`` naming the bad option and the accepted ones (``ValueError`` for a NaN or
        infinite number)."""
        accepted = self.accepted_options(name)
        open_ended = any(p.kind == p.VAR_KEYWORD for p in self._parameters(name))
        hints = typing.get_type_hints(self._callable(name))
        listing = ", ".join(f"{k}: {_describe(hints.get(k, p.annotation))}" for k, p in accepted.items())
        for key, value in options.items():
            if key not in accepted:
                if open_ended:
                    continue
                raise TypeError(
                    f"{self.kind} {self.resolve(name)!r} has no option {key!r}; accepted options: {listing or 'none'}"
                )
            annotation = hints.get(key, accepted[key].annotation)
            if not _matches(value, annotation):
                raise TypeError(
                    f"{self.kind} {self.resolve(name)!r}: option {key}={value!r} should be {_describe(annotation)}"
                )
            bad = non_finite_path(value, key)
            if bad is not None:
                raise ValueError(f"{self.kind} {self.resolve(name)!r}: option {bad} must be a finite number "
                                 f"(not NaN or infinite), got {value!r}")

    def build(self, name: str, *args: Any, **options: Any) -> Any:
        """Call plugin ``name`` with the registry's positional arguments after checking the options."""
        if len(args) != len(self.arguments):
            raise TypeError(f"building a {self.kind} takes {len(self.arguments)} positional arguments "
                            f"({', '.join(self.arguments) or 'none'}), got {len(args)}")
        if self.arguments[:1] == ("tasks",):
            args = (check_tasks(args[0]), *args[1:])
        self.check_options(name, options)
        plugin = self.get(name)
        scaling = options.pop(LOSS_SCALING, None) if getattr(plugin, "accepts_loss_scaling", False) else None
        built = plugin(*args, **options)
        if scaling is not None:
            built.set_loss_scaling(scaling)
        return built


STRATEGIES = Registry("strategy")
ARCHITECTURES = Registry("architecture")


def register_strategy(name: str, *, aliases: Sequence[str] = ()) -> Callable[[type[T]], type[T]]:
    """Register a :class:`~mtl_plugins.strategies.base.Strategy` subclass under ``name``."""
    return STRATEGIES.register(name, aliases=aliases)


def register_architecture(name: str, *, aliases: Sequence[str] = ()) -> Callable[[type[T]], type[T]]:
    """Register an architecture class (``cls(tasks, **options)``) under ``name``."""
    return ARCHITECTURES.register(name, aliases=aliases)
