"""Training arguments of :class:`~mtl_plugins.trainers.MultiTaskTrainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

PROGRESS_UNITS = ("epoch", "step")
STRATEGY_LOGS = ("summary", "full")


@dataclass
class MultiTaskTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the multi-task options.

    ``lr_ts`` scales the learning rate of task-specific parameters (heads, task-specific
    connections): they train at ``learning_rate * lr_ts``, shared parameters at ``learning_rate``.
    ``progress_unit`` sets the training progress given to scheduled strategies: ``"epoch"`` is the
    papers' ``e / E`` with the 0-based epoch ``e`` of ``E`` epochs; ``"step"`` is ``step / max_steps``,
    which is also used (with a warning) when the train dataset has no length, so epochs cannot be counted.
    ``strategy_log`` sets how much of the strategy's state the logs carry: ``"summary"`` (a few scalars;
    matrices such as the affinity as TensorBoard images) or ``"full"`` (every scalar).
    """

    lr_ts: float = field(default=1.0, metadata={"help": "Learning-rate scale of task-specific parameters."})
    progress_unit: str = field(
        default="epoch", metadata={"help": "Training progress given to strategies: 'epoch' (e/E) or 'step'."}
    )
    strategy_log: str = field(
        default="summary",
        metadata={"help": "Strategy scalars in the logs: 'summary' (a few, plus heatmap images in TensorBoard) "
                          "or 'full' (every affinity entry, group id, per-layer priority)."},
    )

    def __post_init__(self):
        if not self.lr_ts > 0:
            raise ValueError(f"lr_ts must be positive, got {self.lr_ts}")
        if self.strategy_log not in STRATEGY_LOGS:
            raise ValueError(f"strategy_log must be one of {STRATEGY_LOGS}, got {self.strategy_log!r}")
        if self.progress_unit not in PROGRESS_UNITS:
            raise ValueError(f"progress_unit must be one of {PROGRESS_UNITS}, got {self.progress_unit!r}")
        super().__post_init__()
