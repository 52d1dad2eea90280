"""Built-in architectures; importing this package registers them."""

from importlib import import_module

from .hps import HPS

for _name in ("task_connections",):
    try:
        _module = import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as error:  # a module not written yet in this tree
        if error.name != f"{__name__}.{_name}":
            raise

__all__ = ["HPS"]
