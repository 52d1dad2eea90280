"""Values computed from a module tree's structure, cached until any module registers a parameter
or a submodule (seen through torch's global registration hooks)."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn
from torch.nn.modules.module import (
    register_module_module_registration_hook,
    register_module_parameter_registration_hook,
)

T = TypeVar("T")

_version = 0
_entries: weakref.WeakKeyDictionary[nn.Module, dict[Callable[[Any], Any], tuple[int, Any]]] = (
    weakref.WeakKeyDictionary())


def _structure_changed(*_: Any) -> None:
    global _version
    _version += 1


register_module_parameter_registration_hook(_structure_changed)
register_module_module_registration_hook(_structure_changed)


def cached(module: nn.Module, compute: Callable[[nn.Module], T]) -> T:
    """``compute(module)``, computed again only once a module anywhere has registered a parameter or
    a submodule since; ``compute`` must depend on the module tree's structure only."""
    entries = _entries.setdefault(module, {})
    hit = entries.get(compute)
    if hit is None or hit[0] != _version:
        hit = (_version, compute(module))
        entries[compute] = hit
    return hit[1]
