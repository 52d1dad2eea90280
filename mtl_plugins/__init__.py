"""mtl-plugins: multi-task optimization strategies and architectures as LibMTL-style plugins.

``import mtl_plugins`` is light: the Hugging Face integration (``mtl_plugins.trainers``,
``mtl_plugins.hub``) is imported only when used, and transformers is not imported. It does arrange
that ``transformers.AutoConfig``/``AutoModel.from_pretrained`` load saved multi-task checkpoints
(see ``mtl_plugins.auto_registration``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import auto_registration
from .registry import ARCHITECTURES, STRATEGIES, register_architecture, register_strategy

auto_registration.install()

__version__ = "0.1.0"


def _load_builtins() -> None:
    from . import architectures, strategies  # noqa: F401  (registers the built-ins)


def available_strategies() -> list[str]:
    """Names of every registered strategy."""
    _load_builtins()
    return STRATEGIES.available()


def build_strategy(name: str, tasks: Sequence[str], **options: Any):
    """Build strategy ``name`` (or a LibMTL alias such as ``EW``) for ``tasks``."""
    _load_builtins()
    return STRATEGIES.build(name, tasks, **options)


def available_architectures() -> list[str]:
    """Names of every registered architecture."""
    _load_builtins()
    return ARCHITECTURES.available()


def build_architecture(name: str, tasks: Sequence[str], **options: Any):
    """Build architecture ``name`` (or a LibMTL alias such as ``HPS``) for ``tasks``."""
    _load_builtins()
    return ARCHITECTURES.build(name, tasks, **options)


__all__ = [
    "available_architectures",
    "available_strategies",
    "build_architecture",
    "build_strategy",
    "register_architecture",
    "register_strategy",
]
