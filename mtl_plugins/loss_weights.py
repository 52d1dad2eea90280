"""Static per-task loss weights have one source: the model.

A model declares them as ``loss_weights`` (``HPS(loss_weights=...)``, the ``loss_weight`` of a Hub
model's tasks). A strategy built for a model takes the model's weights, so training weights each
task's loss exactly as the model's reported ``loss`` does; weights given to the strategy as well
must agree with the model's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .registry import STRATEGIES, check_tasks
from .strategies.base import Strategy


def model_loss_weights(model: nn.Module | None, tasks: Sequence[str]) -> dict[str, float] | None:
    """The model's static weight of each task (1.0 for tasks it gives none), or None for a model
    without ``loss_weights``."""
    weights = getattr(model, "loss_weights", None)
    if weights is None:
        return None
    return {t: float(weights.get(t, 1.0)) for t in tasks}


def check_loss_weights(strategy: Strategy, model: nn.Module | None) -> None:
    """Raise ``ValueError`` when ``strategy`` weights the losses differently from ``model``."""
    expected = model_loss_weights(model, strategy.tasks)
    if expected is not None and dict(strategy.loss_weights) != expected:
        raise ValueError(
            f"strategy {strategy.name!r} has loss_weights {dict(strategy.loss_weights)}, but the model's are "
            f"{expected}: static loss weights come from the model; build the strategy for it "
            "(strategy_for_model, or give the strategy's name to MultiTaskTrainer) or give it the model's weights"
        )


def strategy_for_model(strategy: str | Strategy, model: nn.Module | None, tasks: Sequence[str],
                       options: Mapping[str, Any] | None = None) -> Strategy:
    """The strategy that trains ``model`` on ``tasks``.

    By name: built with ``options``, the model's loss weights (``loss_weights`` in ``options`` must
    agree with them) and, for strategies that read the model, ``model``. A ``Strategy`` instance is
    checked: same tasks, same loss weights as the model, no ``options``.
    """
    from . import build_strategy

    tasks = check_tasks(tasks)
    if isinstance(strategy, Strategy):
        if options:
            raise ValueError("strategy_options apply to a strategy given by name, not to a Strategy instance")
        if list(strategy.tasks) != tasks:
            raise ValueError(f"the strategy's tasks {strategy.tasks} differ from the trainer's tasks {tasks}")
        check_loss_weights(strategy, model)
        return strategy
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a registered name or a Strategy instance, got {type(strategy).__name__}")
    options = dict(options or {})
    if "model" in STRATEGIES.accepted_options(strategy) and "model" not in options:
        options["model"] = model
    weights = model_loss_weights(model, tasks)
    if weights is not None and "loss_weights" not in options:
        options["loss_weights"] = weights
    built = build_strategy(strategy, tasks, **options)
    check_loss_weights(built, model)
    return built
