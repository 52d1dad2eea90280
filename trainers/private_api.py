"""Every private or undocumented transformers / accelerate attribute ``MultiTaskTrainer`` touches, and why.

These are the places a transformers or accelerate upgrade can break silently; check them first
(``tests/test_trainer.py`` checks that each still exists and the trainer tests exercise each).
Keys are ``"<class path>.<attribute>"``; ``INSTANCE_ATTRIBUTES`` are set on the instance, not the class.
"""

from __future__ import annotations

PRIVATE_ATTRIBUTES: dict[str, str] = {
    "transformers.Trainer._prepare_inputs":
        "moves a batch to the device (and through the accelerator) exactly as the Trainer's own "
        "training and prediction steps do; training_step and prediction_step are overridden, so they call it",
    "transformers.Trainer._signature_columns":
        "the columns remove_unused_columns keeps; set to the forward arguments plus the task label columns, "
        "which Trainer would drop because they are keyword labels, not forward parameters",
    "transformers.Trainer._clip_grad_norm":
        "overridden: when a strategy took every optimizer step inside training_step (needs_step_outcome), "
        "the loop must not clip again; returns the norm of the step taken inside",
    "transformers.Trainer._get_grad_norm":
        "overridden for the same reason: the logged grad_norm is the one of the step taken inside the batch",
    "transformers.Trainer._save_checkpoint":
        "overridden to write strategy_state.pt into the checkpoint folder before the Trainer's own files, "
        "so a checkpoint with a trainer state always has the strategy state",
    "transformers.Trainer._get_output_dir":
        "the folder _save_checkpoint writes to (the checkpoint path is built from it as the Trainer does)",
    "transformers.Trainer.current_gradient_accumulation_steps":
        "the micro-batch count of the current accumulation window (smaller at the end of an epoch): the "
        "divisor of the loss under gradient accumulation, as in Trainer.training_step",
    "transformers.Trainer.model_accepts_loss_kwargs":
        "set to False after Trainer.__init__ (which infers it from forward's **kwargs): a multi-task forward "
        "takes labels as keyword arguments and must not receive num_items_in_batch",
    "transformers.Trainer._load_best_model":
        "overridden to restore the strategy state saved with the best checkpoint too (load_best_model_at_end)",
    "accelerate.optimizer.AcceleratedOptimizer._is_overflow":
        "what step_was_skipped (and so the Trainer's scheduler step) reads; set from the grad scaler's scale "
        "after each step, since accelerate misses the skip of fused optimizers on an fp16 overflow",
    "accelerate.state.GradientState._set_sync_gradients":
        "when the strategy already took the batch's last step, the loop's optimizer step must not move "
        "anything: sync_gradients is switched off for that step and restored after train()",
}

#: Entries of :data:`PRIVATE_ATTRIBUTES` that exist on instances only (set in ``__init__`` or the loop).
INSTANCE_ATTRIBUTES = ("transformers.Trainer._signature_columns", "transformers.Trainer.model_accepts_loss_kwargs",
                       "transformers.Trainer.current_gradient_accumulation_steps",
                       "accelerate.optimizer.AcceleratedOptimizer._is_overflow")
