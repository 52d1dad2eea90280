"""Strategy state in Trainer checkpoints (``strategy_state.pt``, loadable with ``weights_only=True``),
and the checks that a checkpoint is complete and fits the model before resuming from it."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_plugins.strategies.base import Strategy

logger = logging.getLogger(__name__)

STRATEGY_STATE_NAME = "strategy_state.pt"
#: Written last by ``Trainer._save_checkpoint``: a checkpoint without it was interrupted.
TRAINER_STATE_NAME = "trainer_state.json"
MODEL_WEIGHTS_NAME = "model.safetensors"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class IncompleteCheckpointError(ValueError):
    """A checkpoint folder lacks a file or holds a truncated / corrupt one."""


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
    payload = read_strategy_state(path)
    if payload["strategy"] != strategy.label or list(payload["tasks"]) != list(strategy.tasks):
        raise ValueError(
            f"checkpoint {str(folder)!r} holds the state of strategy {payload['strategy']!r} for tasks "
            f"{payload['tasks']}, but this trainer runs {strategy.label!r} for tasks {strategy.tasks}"
        )
    strategy.load_state_dict(payload["state"])


def read_strategy_state(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of a ``strategy_state.pt`` file; :class:`IncompleteCheckpointError` names the file
    when it is empty, truncated or not a strategy state."""
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as error:  # torch raises EOFError, RuntimeError, OSError, UnpicklingError
        raise IncompleteCheckpointError(
            f"{str(path)!r} is incomplete or corrupt ({Path(path).stat().st_size} bytes; the save was probably "
            f"interrupted): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(payload, Mapping) or not {"strategy", "tasks", "state"} <= set(payload):
        raise IncompleteCheckpointError(f"{str(path)!r} is not a strategy state (expected keys strategy, tasks, state)")
    return dict(payload)


def incomplete_reason(folder: str | os.PathLike) -> str | None:
    """Why checkpoint ``folder`` cannot be resumed from (a missing, empty or corrupt file), or None."""
    folder = Path(folder)
    trainer_state = folder / TRAINER_STATE_NAME
    if not trainer_state.is_file():
        return f"it has no {TRAINER_STATE_NAME} (written last, so the save was interrupted)"
    try:
        json.loads(trainer_state.read_text())
    except ValueError:
        return f"its {TRAINER_STATE_NAME} is incomplete or corrupt"
    if not (folder / STRATEGY_STATE_NAME).is_file():
        return f"it has no {STRATEGY_STATE_NAME}"
    try:
        read_strategy_state(folder / STRATEGY_STATE_NAME)
    except IncompleteCheckpointError:
        return f"its {STRATEGY_STATE_NAME} is incomplete or corrupt"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that is complete; incomplete newer ones
    (an interrupted save) are skipped with a warning naming them."""
    root = Path(output_dir)
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))] \
        if root.is_dir() else []
    for _, folder in sorted(found, reverse=True):
        reason = incomplete_reason(folder)
        if reason is None:
            return str(folder)
        logger.warning("skipping checkpoint %s: %s", folder, reason)
    return None


def check_model_layout(model: nn.Module, folder: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming the parameters that differ between ``model`` and the weights saved
    in checkpoint ``folder`` (missing, unexpected, or of another shape)."""
    path = Path(folder) / MODEL_WEIGHTS_NAME
    if not path.is_file():
        return  # other weight formats are checked by the Trainer itself
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        saved = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}  # noqa: SIM118 - safe_open is no dict
    current = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    reshaped = {n: (saved[n], current[n]) for n in sorted(set(saved) & set(current)) if saved[n] != current[n]}
    if not (missing or unexpected or reshaped):
        return
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_short(missing)}")
    if unexpected:
        parts.append(f"in the checkpoint but not in the model: {_short(unexpected)}")
    if reshaped:
        parts.append("of another shape (checkpoint vs model): "
                     + ", ".join(f"{n} {a} vs {b}" for n, (a, b) in list(reshaped.items())[:8]))
    raise ValueError(f"checkpoint {str(folder)!r} was saved from a model with another layout (e.g. with/without task "
                     f"connections or head biases); parameters {'; '.join(parts)}")


def _short(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
