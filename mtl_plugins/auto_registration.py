"""Make ``AutoConfig``/``AutoModel`` load ``mtl_multitask`` checkpoints without importing transformers.

``install()`` (called by ``import mtl_plugins``) registers a stand-in for ``MultiTaskConfig`` with
``AutoConfig`` as soon as ``transformers.models.auto.configuration_auto`` exists: right away when it
is already imported, otherwise through an import hook that runs right after that module executes.
Registering the stand-in imports nothing. The first time the stand-in is used (``from_dict``,
``from_pretrained``, a call, any attribute), it imports ``mtl_plugins.hub``, which registers the real
``MultiTaskConfig`` and ``MultiTaskModel`` (replacing the stand-in), and forwards to the real class.

Importing ``mtl_plugins.hub`` is deferred to that first use on purpose: it imports
``transformers.modeling_utils``, and ``modeling_utils`` itself imports ``configuration_auto``
halfway through its own execution, so importing the hub from the hook could meet a half-built
``transformers.modeling_utils``. It also keeps ``AutoTokenizer`` and friends as fast as without
``mtl_plugins``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

#: The module that defines ``AutoConfig`` and its model-type mapping.
CONFIG_AUTO_MODULE = "transformers.models.auto.configuration_auto"
#: ``MultiTaskConfig.model_type``, written into every saved multi-task ``config.json``.
MODEL_TYPE = "mtl_multitask"


def _real_config_class() -> type:
    """Import ``mtl_plugins.hub`` (registering the real classes) and return ``MultiTaskConfig``."""
    from mtl_plugins.hub import MultiTaskConfig

    return MultiTaskConfig


class _ForwardingMeta(type):
    """Metaclass of the stand-in: attribute look-ups, calls and type checks go to the real class."""

    def __getattr__(cls, name: str) -> Any:
        return getattr(_real_config_class(), name)

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return _real_config_class()(*args, **kwargs)

    def __instancecheck__(cls, instance: Any) -> bool:
        return isinstance(instance, _real_config_class())

    def __subclasscheck__(cls, subclass: type) -> bool:
        return issubclass(subclass, _real_config_class())


class LazyMultiTaskConfig(metaclass=_ForwardingMeta):
    """Stand-in for ``mtl_plugins.hub.MultiTaskConfig`` in ``AutoConfig``'s mapping until first use."""


def register(config_auto: ModuleType) -> None:
    """Register the stand-in with ``config_auto.AutoConfig`` unless ``MODEL_TYPE`` is already known.

    Idempotent, and it never replaces the real ``MultiTaskConfig`` once ``mtl_plugins.hub`` registered it.
    """
    if MODEL_TYPE not in config_auto.CONFIG_MAPPING:
        config_auto.AutoConfig.register(MODEL_TYPE, LazyMultiTaskConfig, exist_ok=True)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the wrapped loader, then ``register`` on the freshly executed module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module looks untouched afterwards
        self.loader.exec_module(module)
        register(module)


class ConfigAutoFinder(importlib.abc.MetaPathFinder):
    """Finds ``CONFIG_AUTO_MODULE`` through the other finders and wraps its loader with ``_RegisteringLoader``."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
                  ) -> ModuleSpec | None:
        if fullname != CONFIG_AUTO_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Arrange the ``AutoConfig`` registration without importing transformers. Safe to call repeatedly."""
    config_auto = sys.modules.get(CONFIG_AUTO_MODULE)
    if config_auto is not None and hasattr(config_auto, "AutoConfig"):
        register(config_auto)
    if not any(type(finder).__name__ == ConfigAutoFinder.__name__ for finder in sys.meta_path):
        sys.meta_path.insert(0, ConfigAutoFinder())
