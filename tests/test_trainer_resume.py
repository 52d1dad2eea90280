"""Checkpoints carry the strategy state: N steps straight equal N/2 steps + resume + N/2 steps."""

from __future__ import annotations

import logging

import pytest
import torch
from ddp_worker import ARCHITECTURE_FOR, VARIANTS, ddp_args, make_strategy, same, setup, vector_model

import mtl_plugins
from mtl_plugins.trainers import STRATEGY_STATE_NAME, MultiTaskTrainer
from mtl_plugins.trainers.checkpoint import IncompleteCheckpointError

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


# -- incomplete checkpoints and other layouts -----------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_corrupt_strategy_state_is_named(tmp_path, damage):
    build("two_step", tmp_path, steps=4).train()
    path = tmp_path / "checkpoint-4" / STRATEGY_STATE_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    with pytest.raises(IncompleteCheckpointError, match=r"checkpoint-4/strategy_state.pt' is incomplete or corrupt"):
        build("two_step", tmp_path / "again", steps=6).train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


@pytest.mark.parametrize("damage", ["no_trainer_state", "corrupt_strategy_state"])
def test_resume_true_skips_an_interrupted_last_checkpoint(tmp_path, caplog, damage):
    build("two_step", tmp_path, steps=4).train()  # checkpoint-2 and checkpoint-4
    last = tmp_path / "checkpoint-4"
    if damage == "no_trainer_state":
        (last / "trainer_state.json").unlink()
    else:
        (last / STRATEGY_STATE_NAME).write_bytes(b"\x80")
    if damage == "no_trainer_state":
        with pytest.raises(IncompleteCheckpointError, match="checkpoint-4': it has no trainer_state.json"):
            build("two_step", tmp_path / "explicit", steps=6).train(resume_from_checkpoint=str(last))
    again = build("two_step", tmp_path, steps=4)
    with caplog.at_level(logging.WARNING, logger="mtl_plugins.trainers.checkpoint"):
        again.train(resume_from_checkpoint=True)
    assert again.strategy.num_steps == 4  # resumed at step 2, not at the damaged step 4
    assert [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()] and \
        all(str(last) in r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage())


def test_resuming_into_another_layout_names_the_parameters(tmp_path):
    build("two_step", tmp_path, steps=4).train()
    other = build("two_step", tmp_path / "other", steps=6)
    head = other.model.heads["b"]
    other.model.heads["b"] = torch.nn.Linear(head.in_features, head.out_features, bias=False)
    with pytest.raises(ValueError, match=r"another layout.*in the checkpoint but not in the model: heads.b.bias"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    wider = build("two_step", tmp_path / "wider", steps=6)
    wider.model.heads["a"] = torch.nn.Linear(16, 3)
    with pytest.raises(ValueError, match=r"of another shape \(checkpoint vs model\): heads.a.bias \(2,\) vs \(3,\)"):
        wider.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_load_best_model_at_end_restores_the_strategy_state_of_that_checkpoint(tmp_path):
    model, data, tasks = setup("two_step")
    args = ddp_args(str(tmp_path), 8, 6, save_strategy="steps", save_steps=2, eval_strategy="steps", eval_steps=2,
                    load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                               strategy=make_strategy("two_step", model, tasks), tasks=tasks)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-6")  # the highest loss: not the last checkpoint
    saved = torch.load(f"{best}/{STRATEGY_STATE_NAME}", weights_only=True)["state"]
    assert same(trainer.strategy.state_dict(), saved)
    assert trainer.strategy.num_steps == int(best.rsplit("-", 1)[1])
