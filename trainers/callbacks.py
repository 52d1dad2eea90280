"""Trainer callbacks: training logs as JSON lines, and a quiet progress bar."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback


class LogRecorder(TrainerCallback):
    """Keeps every training log (``{"step": ..., "loss": ..., "loss/<task>": ...}``) in ``records``
    and every evaluation during training (``{"step": ..., "split": "validation", "eval_loss": ...,
    "eval_<task>/<metric>": ...}``) in ``evaluations``; on the main process, appends both to the
    JSON-lines file ``path`` if given. ``details`` (when set) adds fields to each training record."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        #: Called at each training log for more fields of the record (see ``MultiTaskTrainer.last_strategy_log``).
        self.details: Callable[[], Mapping[str, Any]] | None = None
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True
        if self.path is not None and state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs:
            return
        if "loss" in logs:
            record = {"step": state.global_step, **logs}
            if self.details is not None:  # e.g. the strategy's full state, whatever the logs carry
                record.update({k: v for k, v in self.details().items() if k not in record})
            self.records.append(record)
        elif "eval_loss" in logs and self.training:
            record = {"step": state.global_step, "split": "validation", **logs}
            self.evaluations.append(record)
        else:
            return
        if self.path is not None and state.is_world_process_zero:
            with self.path.open("a") as file:
                file.write(json.dumps(record) + "\n")


class LossProgress(ProgressCallback):
    """The Trainer's progress bar with the latest training loss as its postfix (logs are not printed:
    they go to the JSON-lines log and the ``report_to`` integrations) and ``label`` as its description
    (e.g. ``single-task baseline 2/5: right``)."""

    def __init__(self, label: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.label = label

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.label and self.training_bar is not None:
            self.training_bar.set_description(self.label, refresh=False)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)


class ScaledStepOutcome(TrainerCallback):
    """Marks the Trainer's own optimizer step as skipped when the fp16 grad scaler lowered its scale
    during it: accelerate's ``step_was_skipped`` misses the skip of fused optimizers (their step always
    runs), which would advance the lr scheduler over a step that was not applied."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.scale: float | None = None

    def _scaler(self):
        scaler = getattr(self.trainer.accelerator, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        scaler = self._scaler()
        self.scale = scaler.get_scale() if scaler is not None else None

    def on_optimizer_step(self, args, state, control, **kwargs):
        scaler = self._scaler()
        if self.scale is not None and scaler is not None and scaler.get_scale() < self.scale:
            self.trainer.optimizer._is_overflow = True  # read by accelerator.optimizer_step_was_skipped
        self.scale = None
