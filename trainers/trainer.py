"""``MultiTaskTrainer``: a ``transformers.Trainer`` that trains a multi-task model with any strategy.

The private transformers / accelerate attributes it relies on are listed, with the reason for each,
in :mod:`mtl_plugins.trainers.private_api`.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length
from transformers.training_args import ParallelMode

from mtl_plugins.loss_weights import strategy_for_model
from mtl_plugins.param_groups import parameter_groups
from mtl_plugins.registry import check_tasks
from mtl_plugins.strategies.base import NonFiniteGradientError, Strategy, name_gradient_tasks

from .arguments import MultiTaskTrainingArguments
from .callbacks import ScaledStepOutcome
from .checkpoint import (
    TRAINER_STATE_NAME,
    IncompleteCheckpointError,
    check_checkpointable,
    check_model_layout,
    last_complete_checkpoint,
    load_strategy_state,
    save_strategy_state,
)
from .distributed import all_reduce_mean_
from .updater import AcceleratedUpdater

logger = logging.getLogger(__name__)


def heatmap_image(matrix: Any, cell: int = 16) -> Any:
    """An RGB uint8 image (H x W x 3) of ``matrix`` in a diverging colour map symmetric about 0,
    each entry a ``cell`` x ``cell`` square."""
    import numpy as np
    from matplotlib import colormaps

    values = np.asarray(matrix, dtype=float)
    bound = float(np.abs(values).max()) or 1.0
    rgb = colormaps["RdBu_r"]((values / bound + 1.0) / 2.0)[..., :3]
    return (np.kron(rgb, np.ones((cell, cell, 1))) * 255).round().astype(np.uint8)


def _resolve_tasks(model: nn.Module | None, tasks: Sequence[str] | None, strategy: Any) -> list[str]:
    if tasks is None:
        tasks = getattr(strategy, "tasks", None) or getattr(model, "tasks", None)
    if tasks is None:
        raise ValueError("give tasks=[...]: the model has no `tasks` attribute to take them from")
    return check_tasks(tasks)


def _missing_columns(dataset: Any, tasks: list[str]) -> list[str]:
    columns = getattr(dataset, "column_names", None)
    return [] if columns is None else [t for t in tasks if t not in columns]


class MultiTaskTrainer(Trainer):
    """Trains a multi-task model whose forward returns per-task ``losses`` with a strategy.

    Every training batch is handed to ``strategy.step(closure, updater)``: ``closure(task=None)``
    runs a fresh forward pass on the batch and ``updater`` (an :class:`AcceleratedUpdater`) applies
    the strategy's backward passes and inner optimizer steps; the batch's final step is left to the
    Trainer's loop (taken at once for strategies with ``needs_step_outcome``), so scheduler and logs
    advance once per batch. ``trainer.strategy`` is the live strategy. Labels are dataset columns
    named after the tasks (``label_names = tasks``).

    Args:
        strategy: a registered strategy name (built with ``strategy_options``) or a ``Strategy``.
        tasks: task names; default the strategy's or the model's ``tasks``.
        Other arguments are those of ``transformers.Trainer``. With
        :class:`MultiTaskTrainingArguments`, ``lr_ts`` scales the task-specific learning rate.
    """

    def __init__(self, model: nn.Module | None = None, args: TrainingArguments | None = None,
                 train_dataset: Any = None, eval_dataset: Any = None, *, strategy: str | Strategy = "ew",
                 strategy_options: Mapping[str, Any] | None = None, tasks: Sequence[str] | None = None,
                 **kwargs: Any):
        if model is None:
            raise ValueError("MultiTaskTrainer needs a model (model_init is not supported)")
        self.tasks = _resolve_tasks(model, tasks, strategy)
        self.strategy = strategy_for_model(strategy, model, self.tasks, strategy_options)
        args = args if args is not None else MultiTaskTrainingArguments(output_dir="trainer_output")
        self._check_compatible(model, args, train_dataset, eval_dataset)
        # Per-task losses are batch means: the token averaging of causal LM losses does not apply.
        args.average_tokens_across_devices = False
        # DDP's reducer is bypassed (see updater.py), so it need not search for unused parameters.
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = False
        args.label_names = list(self.tasks)
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("MultiTaskTrainer supports single-process and DDP training, not DeepSpeed or FSDP")
        self._check_accumulation()
        self.add_callback(ScaledStepOutcome(self))
        if self.args.save_strategy != "no":
            check_checkpointable(self.strategy)
        self.model_accepts_loss_kwargs = False  # the model's forward gets the batch only
        self._signature_columns = self._input_columns(model)
        self.updater: AcceleratedUpdater | None = None
        self._task_loss_sum = torch.zeros(len(self.tasks), dtype=torch.float64)
        self._task_loss_count = 0
        #: The strategy's whole ``log_metrics()`` at the latest training log.
        self.last_strategy_log: dict[str, float] = {}
        #: False when the train dataloader has no length, so epoch-based progress is impossible.
        self._epochs_known = True

    # -- set-up checks ------------------------------------------------------------------------
    def _check_compatible(self, model: nn.Module, args: TrainingArguments, train_dataset: Any,
                          eval_dataset: Any) -> None:
        name = self.strategy.name
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise ValueError(
                f"launched on {launched} processes, but the training arguments are not distributed, so each "
                "process would train its own model; on a machine without GPUs set use_cpu=True"
            )
        if args.n_gpu > 1 and args.parallel_mode != ParallelMode.DISTRIBUTED:
            raise ValueError(
                f"single-process multi-GPU training (torch.nn.DataParallel over n_gpu={args.n_gpu} GPUs) is not "
                "supported: it gathers each task's scalar loss into a vector, one value per GPU. Launch one process "
                "per GPU (torchrun or accelerate launch) or expose a single GPU (CUDA_VISIBLE_DEVICES)"
            )
        self._check_accumulation(args)
        if args.label_names is not None and list(args.label_names) != self.tasks:
            raise ValueError(f"label_names={args.label_names} must be the task names {self.tasks} (or unset)")
        if self.strategy.needs_task_forward and "task" not in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"strategy {name!r} runs task-specific forward passes (model(..., task=t)), but "
                f"{type(model).__name__}.forward has no `task` argument"
            )
        lr_ts = getattr(args, "lr_ts", 1.0)
        if lr_ts != 1.0 and not hasattr(model, "get_share_params"):
            raise ValueError(f"lr_ts={lr_ts} needs a model with get_share_params() to find task-specific parameters")
        datasets = {"train_dataset": train_dataset}
        if isinstance(eval_dataset, Mapping):
            datasets.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
        else:
            datasets["eval_dataset"] = eval_dataset
        for label, dataset in datasets.items():
            missing = _missing_columns(dataset, self.tasks)
            if missing:
                raise ValueError(
                    f"{label} has no label column for tasks {missing}: label columns are named after the "
                    f"tasks; its columns are {dataset.column_names}"
                )

    def _check_accumulation(self, args: TrainingArguments | None = None) -> None:
        """Refuse gradient accumulation for strategies that work on each batch as a whole.

        Called before and after ``Trainer.__init__``: the accelerator config
        (``gradient_accumulation_kwargs={"num_steps": n}``) sets the effective count only there.
        """
        steps = (args or self.args).gradient_accumulation_steps
        if steps > 1 and not self.strategy.supports_accumulation:
            raise ValueError(
                f"gradient_accumulation_steps={steps} cannot be used with strategy {self.strategy.name!r}: it works "
                "on each batch as a whole (several optimizer steps, per-task gradients or loss weights updated per "
                "batch), which accumulation would split. Use gradient_accumulation_steps=1 (and no num_steps in "
                "accelerator_config.gradient_accumulation_kwargs) and a larger per_device_train_batch_size."
            )

    def _input_columns(self, model: nn.Module) -> list[str]:
        """Dataset columns kept by ``remove_unused_columns``: forward arguments, inputs and task labels."""
        params = inspect.signature(model.forward).parameters.values()
        names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        names += [n for n in (getattr(model, "input_name", None), getattr(model, "main_input_name", None)) if n]
        return list(dict.fromkeys(names + self.tasks + ["label", "label_ids"]))

    # -- optimizer ------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Shared parameters at ``learning_rate``, task-specific ones at ``learning_rate * lr_ts``.

        ``weight_decay`` applies to every parameter, as in the papers' released configs (the plain
        Trainer exempts biases and LayerNorm weights). Models without ``get_share_params()`` get
        the Trainer's default groups.
        """
        opt_model = self.model if model is None else model
        if self.optimizer is None and hasattr(opt_model, "get_share_params"):
            groups = parameter_groups(opt_model, self.args.learning_rate, getattr(self.args, "lr_ts", 1.0),
                                      self.args.weight_decay)
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            for group in groups:
                group.pop("name", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return super().create_optimizer(model)

    # -- training -------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None,
              ignore_keys_for_eval: list[str] | None = None, **kwargs: Any):
        """``Trainer.train``; resuming also restores the strategy state saved with the checkpoint.

        ``resume_from_checkpoint=True`` takes the newest complete checkpoint of ``output_dir``, skipping
        (with a warning) any whose save was interrupted; a checkpoint saved from a model with another
        layout is refused with the parameters that differ."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"no complete checkpoint found in output directory {self.args.output_dir!r}")
        if resume_from_checkpoint:
            if not (Path(resume_from_checkpoint) / TRAINER_STATE_NAME).is_file():
                raise IncompleteCheckpointError(
                    f"cannot resume from checkpoint {str(resume_from_checkpoint)!r}: it has no {TRAINER_STATE_NAME} "
                    "(written last, so its save was interrupted)")
            check_model_layout(self.model, resume_from_checkpoint)
            load_strategy_state(self.strategy, resume_from_checkpoint)  # names a missing or corrupt state file
        self.updater = None
        self._task_loss_sum.zero_()
        self._task_loss_count = 0
        try:
            return super().train(resume_from_checkpoint=resume_from_checkpoint or None, trial=trial,
                                 ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)
        finally:
            self.accelerator.gradient_state._set_sync_gradients(True)  # see training_step

    def get_train_dataloader(self):
        """``Trainer.get_train_dataloader``; notes whether epochs can be counted (the loader has a length)."""
        dataloader = super().get_train_dataloader()
        self._epochs_known = has_length(dataloader)
        if not self._epochs_known and self._progress_unit() == "epoch":
            logger.warning(
                "the train dataloader has no length, so the number of epochs is unknown: training progress given "
                "to the strategy is global_step / max_steps (set progress_unit='step' to silence this warning)"
            )
        return dataloader

    def _progress_unit(self) -> str:
        return getattr(self.args, "progress_unit", "epoch")

    def training_progress(self) -> float:
        """Progress in [0, 1] given to the strategy: 0-based epoch / epochs, or step / max_steps (also
        when the train dataloader has no length, since the epochs cannot be counted then)."""
        if self._progress_unit() == "step" or not self._epochs_known:
            return min(1.0, self.state.global_step / max(self.state.max_steps, 1))
        epochs = max(self.state.num_train_epochs, 1)
        return min(1.0, math.floor(self.state.epoch or 0.0) / epochs)

    def _get_updater(self) -> AcceleratedUpdater:
        if self.updater is None or self.updater.optimizer is not self.optimizer:
            self.updater = AcceleratedUpdater(self.accelerator, self.optimizer, self.args.max_grad_norm,
                                              self.args.gradient_accumulation_steps,
                                              defer_final=not self.strategy.needs_step_outcome,
                                              buffers_shared=self.args.ddp_broadcast_buffers is not False)
        return self.updater

    def _closure(self, model: nn.Module, inputs: dict[str, Any]):
        def closure(task: str | None = None) -> Mapping[str, Tensor]:
            with self.compute_loss_context_manager():
                output = model(**inputs) if task is None else model(**inputs, task=task)
            if self.args.ddp_broadcast_buffers is not False:
                AcceleratedUpdater.sync_buffers(model)
            losses = output.get("losses") if isinstance(output, Mapping) else getattr(output, "losses", None)
            if losses is None:
                raise ValueError(f"{type(self.model).__name__} returned no per-task 'losses' for the batch")
            return losses

        return closure

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """One batch through ``strategy.step``; returns the batch's weighted loss for logging."""
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        missing = [t for t in self.tasks if t not in inputs]
        if missing:
            raise ValueError(f"the training batch has no labels for tasks {missing}; it has {sorted(inputs)}")
        updater = self._get_updater()
        divisor = self.current_gradient_accumulation_steps if self.args.gradient_accumulation_steps > 1 else 1
        updater.begin_batch(divisor)
        progress, epoch = self.training_progress(), math.floor(self.state.epoch or 0.0)
        if not self.accelerator.even_batches:
            # Ragged shards: each process counts epochs over its own number of batches, so every
            # strategy gets the main process's progress and epoch (else epoch-based state diverges).
            progress, epoch = updater.agree((progress, epoch))
        self.strategy.set_progress(progress, epoch=epoch)
        closure = self._closure(model, inputs)
        with self.accelerator.no_sync(model):
            try:
                losses = self.strategy.step(closure, updater)
            except NonFiniteGradientError as error:
                raise name_gradient_tasks(error, closure, self.tasks, updater.params,
                                          f"{self.strategy.name} at step {self.state.global_step}: ") from error
        if not updater.deferred:
            # No final step is left: the loop's optimizer step must not move anything.
            updater.zero_grad()
            self.accelerator.gradient_state._set_sync_gradients(False)
        values = torch.tensor([float(losses[t]) for t in self.tasks], dtype=torch.float64)
        self._task_loss_sum += values
        self._task_loss_count += 1
        weights = torch.tensor([self.strategy.loss_weights[t] for t in self.tasks], dtype=torch.float64)
        return ((values * weights).sum() / divisor).to(device=self.args.device, dtype=torch.float32)

    def _norm_taken_inside(self) -> bool:
        """True when the updater already clipped (or stepped) this batch: its norm is the one to log."""
        return self.updater is not None and (not self.updater.deferred or self.updater.clipped_deferred)

    def _clip_grad_norm(self, model: nn.Module):
        if self._norm_taken_inside():
            return self.updater.last_grad_norm
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        if grad_norm is None and self._norm_taken_inside():
            return self.updater.last_grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    # -- logging --------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs also get per-task losses (``loss/<task>``, averaged like ``loss``) and the
        strategy's ``log_metrics()``, summarised (``strategy.summarize_log``) unless
        ``args.strategy_log="full"``; the whole of them is kept in ``last_strategy_log``."""
        if "loss" in logs and self._task_loss_count > 0:
            window = (self._task_loss_sum / self._task_loss_count).to(self.args.device, torch.float32)
            all_reduce_mean_([window])
            logs.update({f"loss/{task}": value for task, value in zip(self.tasks, window.tolist())})
            self.last_strategy_log = self.strategy.log_metrics()
            full = getattr(self.args, "strategy_log", "summary") == "full"
            logs.update(self.last_strategy_log if full else self.strategy.summarize_log(self.last_strategy_log))
            self._log_images()
            if self.updater is not None and self.updater.skipped_steps:
                logs["skipped_inner_steps"] = self.updater.skipped_steps
            self._task_loss_sum.zero_()
            self._task_loss_count = 0
        super().log(logs, start_time)

    def _log_images(self) -> None:
        """The strategy's matrices as heatmap images for TensorBoard (when it reports there)."""
        writers = [cb.tb_writer for cb in self.callback_handler.callbacks
                   if isinstance(cb, TensorBoardCallback) and getattr(cb, "tb_writer", None) is not None]
        images = self.strategy.log_images() if writers and self.is_world_process_zero() else {}
        for name, matrix in images.items():
            image = heatmap_image(matrix)
            for writer in writers:
                writer.add_image(name, image, self.state.global_step, dataformats="HWC")

    # -- evaluation -----------------------------------------------------------------------------
    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        """Loss, per-task logits and per-task labels, both as tuples in task order."""
        inputs = self._prepare_inputs(inputs)
        present = [t for t in self.tasks if t in inputs]
        if present and len(present) != len(self.tasks):
            missing = [t for t in self.tasks if t not in inputs]
            raise ValueError(f"the evaluation batch has no labels for tasks {missing}")
        with torch.no_grad(), self.compute_loss_context_manager():
            output = model(**inputs)
        if not isinstance(output, Mapping):
            raise ValueError(f"{type(self.model).__name__} must return a mapping with 'logits' (and 'loss' given labels)")
        loss = output.get("loss") if present else None
        loss = loss.detach().mean() if loss is not None else None
        if prediction_loss_only:
            return loss, None, None
        logits = output.get("logits")
        if not isinstance(logits, Mapping):
            raise ValueError(f"{type(self.model).__name__} must return 'logits' as a mapping task -> tensor")
        labels = tuple(inputs[t] for t in self.tasks) if present else None
        return loss, tuple(logits[t].detach() for t in self.tasks), labels

    # -- sharing --------------------------------------------------------------------------------
    def _hub_model(self) -> nn.Module:
        model = self.accelerator.unwrap_model(self.model)
        if not (callable(getattr(model, "push_to_hub", None)) and hasattr(getattr(model, "config", None), "task_names")):
            raise ValueError(
                f"push_to_hub needs a Hugging Face multi-task model (mtl_plugins.hub.MultiTaskModel, the recipe "
                f"model 'hub_multitask'); {type(model).__name__} has no Hub config. Save it with "
                "safetensors.torch.save_model(model, 'model.safetensors') instead"
            )
        return model

    def card_metrics(self) -> dict[str, float]:
        """The latest evaluation's per-task metrics (``"<task>/<metric>"``), from the log history."""
        for entry in reversed(self.state.log_history):
            metrics = {}
            for key, value in entry.items():
                prefix, _, name = key.partition("_")
                if prefix in ("eval", "test") and name.split("/")[0] in self.tasks and "/" in name:
                    metrics[name] = float(value)
            if metrics:
                return metrics
        return {}

    def create_model_card(self, license: str | None = None, dataset: str | list[str] | None = None,
                          **kwargs: Any) -> None:
        """Write the project's model card (tasks, method and settings, metrics, groups or priority
        statistics, usage) to ``output_dir/README.md``; the Trainer's generic arguments are ignored."""
        if not self.is_world_process_zero():
            return
        from mtl_plugins.hub.card import build_model_card, card_fields_from_strategy

        model = self._hub_model()
        datasets = [dataset] if isinstance(dataset, str) else dataset
        card = build_model_card(model.config, repo_id=self.args.hub_model_id, metrics=self.card_metrics(),
                                license=license, datasets=datasets,
                                tokenizer_included=hasattr(self.processing_class, "tokenize"),
                                **card_fields_from_strategy(self.strategy))
        os.makedirs(self.args.output_dir, exist_ok=True)
        card.save(os.path.join(self.args.output_dir, "README.md"))

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None,
                    **card_fields: Any) -> Any:
        """Upload the trained model with its tokenizer or image processor (``processing_class``) and
        the project's model card (strategy, settings, latest evaluation metrics) to
        ``args.hub_model_id`` (default: the output folder's name). ``card_fields`` (``delta_m``,
        ``datasets``, ``license``, ...) go to the card. Only the main process uploads."""
        model = self._hub_model()
        if not self.is_world_process_zero():
            return None
        repo_id = self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir))
        card_fields.setdefault("metrics", self.card_metrics())
        return model.push_to_hub(repo_id, strategy=self.strategy, processor=self.processing_class,
                                 commit_message=commit_message or "End of training", token=token or self.args.hub_token,
                                 revision=revision, private=self.args.hub_private_repo if private is None else private,
                                 **card_fields)

    # -- checkpoints ----------------------------------------------------------------------------
    def _load_best_model(self) -> None:
        """``Trainer._load_best_model``, and the strategy state saved with that checkpoint."""
        super()._load_best_model()
        load_strategy_state(self.strategy, self.state.best_model_checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Write the strategy state first, so a checkpoint with a trainer state is always complete."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        if self.args.should_save:
            save_strategy_state(self.strategy, folder)
        super()._save_checkpoint(model, trial)
