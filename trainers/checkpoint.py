"""Strategy state in Trainer checkpoints: ``strategy_state.pt``, loadable with ``weights_only=True``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch

from mtl_plugins.strategies.base import Strategy

STRATEGY_STATE_NAME = "strategy_state.pt"


def _serialised_state(strategy: Strategy) -> bytes:
    """``strategy.state_dict()`` (with its name and tasks) as ``torch.save`` bytes, checked to load
    back with ``weights_only=True``."""
    payload = {"strategy": strategy.label, "tasks": list(strategy.tasks), "state": strategy.state_dict()}
    buffer = io.BytesIO()
    try:
        torch.save(payload, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the reason
        raise TypeError(
            f"strategy {strategy.label!r} state cannot be checkpointed safely (only tensors, numbers, strings, "
            f"lists, tuples and dicts are allowed): {error}"
        ) from error
    return buffer.getvalue()


def check_checkpointable(strategy: Strategy) -> None:
    """Raise ``TypeError`` now if ``strategy``'s state could not be saved in a checkpoint and loaded
    back with ``weights_only=True`` (rather than at the first checkpoint, hours into a run)."""
    _serialised_state(strategy)


def save_strategy_state(strategy: Strategy, folder: str | os.PathLike) -> Path:
    """Write ``strategy.state_dict()`` (with its name and tasks) into ``folder``; returns the file."""
    path = Path(folder) / STRATEGY_STATE_NAME
    data = _serialised_state(strategy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # a checkpoint never holds a partly written state
    return path


def load_strategy_state(strategy: Strategy, folder: str | os.PathLike) -> None:
    """Restore ``strategy`` from the ``strategy_state.pt`` in checkpoint ``folder``."""
    path = Path(folder) / STRATEGY_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(folder)!r} has no {STRATEGY_STATE_NAME}: it was not written by MultiTaskTrainer, "
            "so the strategy state cannot be restored"
        )
    payload = torch.load(path, weights_only=True)
    if payload["strategy"] != strategy.label or list(payload["tasks"]) != list(strategy.tasks):
        raise ValueError(
            f"checkpoint {str(folder)!r} holds the state of strategy {payload['strategy']!r} for tasks "
            f"{payload['tasks']}, but this trainer runs {strategy.label!r} for tasks {strategy.tasks}"
        )
    strategy.load_state_dict(payload["state"])
