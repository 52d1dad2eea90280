"""Hugging Face ``Trainer`` integration: :class:`MultiTaskTrainer` runs every strategy.

Importing this package imports ``transformers``; ``import mtl_plugins`` alone does not.
"""

from mtl_plugins.metrics.compute_metrics import make_compute_metrics

from .arguments import MultiTaskTrainingArguments
from .callbacks import LogRecorder, LossProgress
from .checkpoint import STRATEGY_STATE_NAME, load_strategy_state, save_strategy_state
from .trainer import MultiTaskTrainer
from .updater import AcceleratedUpdater

__all__ = [
    "STRATEGY_STATE_NAME",
    "AcceleratedUpdater",
    "LogRecorder",
    "LossProgress",
    "MultiTaskTrainer",
    "MultiTaskTrainingArguments",
    "load_strategy_state",
    "make_compute_metrics",
    "save_strategy_state",
]
