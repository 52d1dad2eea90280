"""Checkpoints carry the strategy state: N steps straight equal N/2 steps + resume + N/2 steps."""

from __future__ import annotations

import pytest
import torch
from ddp_worker import ARCHITECTURE_FOR, VARIANTS, ddp_args, make_strategy, same, setup, vector_model

import mtl_plugins
from mtl_plugins.trainers import STRATEGY_STATE_NAME, MultiTaskTrainer

#: Resumed in the quick run: the test strategy, the baseline and the strategies with the most state.
QUICK = ["ew", "two_step", "famo", "uw", "dwa", "rlw", "gradnorm", "sel_update", "conn_strength", "sel_update+uw"]
EVERY = ["two_step", *mtl_plugins.available_strategies(), "sel_update+uw", "pcgrad+dwa", "conn_strength+famo"]
RESUMED = [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in EVERY]


def build(name: str, output_dir, steps: int = 6):
    model, data, tasks = setup(name)
    if VARIANTS.get(name, (name,))[0] not in ARCHITECTURE_FOR:
        model = vector_model(dropout=0.3)  # dropout: the resumed run must restore the torch RNG too
    args = ddp_args(str(output_dir), 8, steps, optim="adamw_torch", learning_rate=0.01, lr_scheduler_type="linear",
                    save_strategy="steps", save_steps=steps // 2, progress_unit="step")
    return MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=make_strategy(name, model, tasks),
                            tasks=tasks)


@pytest.mark.parametrize("name", RESUMED)
def test_resumed_run_continues_exactly(tmp_path, name):
    straight = build(name, tmp_path)
    straight.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / STRATEGY_STATE_NAME).is_file() and (tmp_path / "checkpoint-6" / STRATEGY_STATE_NAME).is_file()
    saved = torch.load(checkpoint / STRATEGY_STATE_NAME, weights_only=True)
    assert saved["strategy"] == straight.strategy.label and saved["state"]["num_steps"] > 0

    resumed = build(name, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    assert same(resumed.model.state_dict(), straight.model.state_dict())
    assert same(resumed.strategy.state_dict(), straight.strategy.state_dict())
    assert resumed.strategy.log_metrics() == straight.strategy.log_metrics()


def test_resume_true_takes_the_last_checkpoint_and_checks_the_strategy(tmp_path):
    straight = build("two_step", tmp_path, steps=4)
    straight.train()
    again = build("two_step", tmp_path, steps=6)
    again.train(resume_from_checkpoint=True)
    assert again.state.global_step == 6 and again.strategy.num_steps == 6
    other = build("ew", tmp_path, steps=6)
    with pytest.raises(ValueError, match="holds the state of strategy 'two_step'.*runs 'ew'"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    (tmp_path / "checkpoint-4" / STRATEGY_STATE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="has no strategy_state.pt"):
        build("two_step", tmp_path / "again", steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_state_that_cannot_be_checkpointed_is_refused_before_training(tmp_path):
    model, data, tasks = setup("ew")
    strategy = make_strategy("ew", model, tasks)
    state_dict = strategy.state_dict
    strategy.state_dict = lambda: {**state_dict(), "callback": lambda: None}  # not loadable with weights_only=True
    args = ddp_args(str(tmp_path), 8, 4, save_strategy="steps", save_steps=2)
    with pytest.raises(TypeError, match="'ew' state cannot be checkpointed safely"):
        MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=strategy, tasks=tasks)
    args = ddp_args(str(tmp_path), 8, 4)  # save_strategy="no": nothing is ever saved
    MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=strategy, tasks=tasks).train()
