"""Trainer callbacks: training logs as JSON lines, and a progress bar that prints only the losses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class LogRecorder(TrainerCallback):
    """Keeps every training log (``{"step": ..., "loss": ..., "loss/<task>": ...}``) in ``records``
    and, on the main process, appends it to the JSON-lines file ``path`` if given."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.path is not None and state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        record = {"step": state.global_step, **logs}
        self.records.append(record)
        if self.path is not None and state.is_world_process_zero:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


class LossProgress(ProgressCallback):
    """The Trainer's progress bar, printing the losses of each log (not every strategy metric)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        shown = {k: v for k, v in (logs or {}).items() if k.split("/")[0] in ("loss", "eval_loss", "train_loss", "epoch")}
        return super().on_log(args, state, control, logs=shown, **kwargs)
