"""Built-in strategies; importing this package registers them.

Optional dependencies (torchjd) are imported when a strategy that needs them is built, so every
module here imports with the core dependencies only.
"""

from . import aggregators, conn_strength, ew, sel_update, weightings  # noqa: F401  (registration)
from .base import (
    NonFiniteGradientError,
    NonFiniteLossError,
    Strategy,
    Updater,
    WeightingStrategy,
)

__all__ = ["NonFiniteGradientError", "NonFiniteLossError", "Strategy", "Updater", "WeightingStrategy"]
