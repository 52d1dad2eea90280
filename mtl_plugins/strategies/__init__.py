"""Built-in strategies; importing this package registers them."""

from importlib import import_module

from .base import NonFiniteLossError, Strategy, Updater, WeightingStrategy

#: Modules whose import registers built-in strategies (optional dependencies are imported lazily
#: inside the strategies, so every module here imports with the core dependencies only).
BUILTIN_MODULES = ("ew", "sel_update", "conn_strength", "weightings", "aggregators")

for _name in BUILTIN_MODULES:
    try:
        import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as error:  # a module not written yet in this tree
        if error.name != f"{__name__}.{_name}":
            raise

__all__ = ["NonFiniteLossError", "Strategy", "Updater", "WeightingStrategy"]
