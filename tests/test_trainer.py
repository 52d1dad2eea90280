"""MultiTaskTrainer: every strategy through transformers.Trainer, inner steps, accumulation, logging,
evaluation, mixed precision and refusals (single process, CPU)."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from ddp_worker import SPECS, TASKS, TwoStep, ddp_args, make_strategy, same, setup, vector_data, vector_model
from torch import nn
from transformers import TrainerCallback

import mtl_plugins
from mtl_plugins.strategies.base import NonFiniteLossError, Strategy, as_updater
from mtl_plugins.trainers import (
    AcceleratedUpdater,
    MultiTaskTrainer,
    MultiTaskTrainingArguments,
    make_compute_metrics,
)


def make_args(tmp_path, batch_size=8, steps=4, **overrides) -> MultiTaskTrainingArguments:
    return ddp_args(str(tmp_path / "out"), batch_size, steps, **overrides)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batches(data, batch_size):
    """The training batches in dataset order (what train_sampling_strategy='sequential' gives)."""
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        yield {k: v for k, v in rows.items() if k != "id"}


# -- every registered strategy --------------------------------------------------------------------
@pytest.mark.parametrize("name", mtl_plugins.available_strategies())
def test_every_registered_strategy_trains_through_the_trainer(tmp_path, name):
    model, data, tasks = setup(name)
    before = snapshot(model)
    trainer = MultiTaskTrainer(model=model, args=make_args(tmp_path, steps=3, logging_steps=1, learning_rate=0.05),
                               train_dataset=data, strategy=make_strategy(name, model, tasks), tasks=tasks)
    trainer.train()
    assert trainer.state.global_step == 3
    assert trainer.lr_scheduler.last_epoch == 3  # the scheduler advanced once per batch
    after = snapshot(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry in logs:
        assert all(math.isfinite(entry[f"loss/{t}"]) for t in tasks)
    # logs carry the strategy's summary by default; every scalar stays in last_strategy_log
    full = trainer.strategy.log_metrics()
    assert trainer.last_strategy_log.keys() == full.keys()
    assert set(trainer.strategy.summarize_log(full)) <= set(logs[-1])


# -- inner steps and the deferred final step ------------------------------------------------------
def reference_two_step(data, batch_size, lr, lr_ts, max_norm):
    """Plain PyTorch: per batch, one forward/backward/clip/AdamW step per task, in task order."""
    model = vector_model()
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    optimizer = torch.optim.AdamW([{"params": shared, "lr": lr}, {"params": heads, "lr": lr * lr_ts}], weight_decay=0.0)
    for batch in batches(data, batch_size):
        for task in TASKS:
            optimizer.zero_grad(set_to_none=True)
            model(**batch)["losses"][task].backward()
            torch.nn.utils.clip_grad_norm_(shared + heads, max_norm)
            optimizer.step()
    return model


@pytest.mark.parametrize("measure_last", [False, True])
def test_inner_steps_and_final_step_equal_a_plain_loop(tmp_path, measure_last):
    data = vector_data(32)
    model = vector_model()
    strategy = TwoStep(TASKS, measure_last=measure_last)
    args = make_args(tmp_path, batch_size=8, steps=4, optim="adamw_torch", weight_decay=0.0, learning_rate=0.01,
                     lr_ts=3.0, max_grad_norm=0.5, train_sampling_strategy="sequential")
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=strategy)
    trainer.train()
    expected = reference_two_step(data, 8, 0.01, 3.0, 0.5)
    torch.testing.assert_close(snapshot(model), snapshot(expected))
    # per batch: two optimizer steps of the shared parameters, one of each head, one scheduler step
    assert {int(trainer.optimizer.state[p]["step"]) for p in model.encoder.parameters()} == {8}
    assert {int(trainer.optimizer.state[p]["step"]) for p in model.heads.parameters()} == {4}
    assert trainer.lr_scheduler.last_epoch == 4


def test_progress_is_epoch_over_epochs_or_step_over_steps(tmp_path):
    data = vector_data(32)
    by_epoch = TwoStep(TASKS)
    args = make_args(tmp_path, steps=-1, num_train_epochs=2)
    MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, strategy=by_epoch).train()
    assert by_epoch.progress_seen == [0.0] * 4 + [0.5] * 4
    by_step = TwoStep(TASKS)
    args = make_args(tmp_path, steps=8, progress_unit="step")
    MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, strategy=by_step).train()
    assert by_step.progress_seen == [k / 8 for k in range(8)]


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_progress_without_a_dataset_length_counts_steps(tmp_path, caplog, unit):
    strategy = TwoStep(TASKS)
    args = make_args(tmp_path, steps=8, progress_unit=unit)
    trainer = MultiTaskTrainer(model=vector_model(), args=args, train_dataset=vector_data(32).to_iterable_dataset(),
                               strategy=strategy, tasks=TASKS)
    with caplog.at_level(logging.WARNING, logger="mtl_plugins.trainers.trainer"):
        trainer.train()
    assert strategy.progress_seen == [k / 8 for k in range(8)]  # two passes over the data: epochs unknown
    warnings = [r for r in caplog.records if "train dataloader has no length" in r.getMessage()]
    assert len(warnings) == (1 if unit == "epoch" else 0)


def test_strategies_taking_the_epoch_get_it(tmp_path):
    model, data, tasks = setup("conn_strength")
    strategy = mtl_plugins.build_strategy("conn_strength", tasks, model=model, draw="epoch")
    args = make_args(tmp_path, batch_size=16, steps=-1, num_train_epochs=2)
    MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=strategy, tasks=tasks).train()
    assert strategy.epoch == 1 and strategy.drawn_epoch == 1


def test_logs_average_per_task_losses_over_the_window(tmp_path):
    strategy = TwoStep(TASKS)
    args = make_args(tmp_path, steps=4, logging_steps=2, lr_scheduler_type="linear", learning_rate=0.1)
    trainer = MultiTaskTrainer(model=vector_model(), args=args, train_dataset=vector_data(32), strategy=strategy)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logs] == [2, 4]
    for entry, window in zip(logs, (strategy.recorded[0:2], strategy.recorded[2:4])):
        for task in TASKS:
            assert entry[f"loss/{task}"] == pytest.approx(np.mean([r[task] for r in window]), rel=1e-6)
        assert entry["loss"] == pytest.approx(sum(entry[f"loss/{t}"] for t in TASKS), rel=1e-5)
    # the lr of the step that was logged: linear decay advanced once per batch
    assert [entry["learning_rate"] for entry in logs] == pytest.approx([0.1 * (1 - 1 / 4), 0.1 * (1 - 3 / 4)])


def accumulation(route: str) -> dict:
    """Training options that accumulate 2 batches per step (fresh: the Trainer edits the accelerator config)."""
    return {"none": {}, "arguments": {"gradient_accumulation_steps": 2},
            "accelerator_config": {"accelerator_config": {"gradient_accumulation_kwargs": {"num_steps": 2}}}}[route]


def test_gradient_accumulation_equals_a_larger_batch_for_ew(tmp_path):
    data = vector_data(48)
    results = []
    for route in ("none", "arguments", "accelerator_config"):
        model = vector_model()
        args = make_args(tmp_path / route, batch_size=8 if route == "none" else 4, steps=3,
                         train_sampling_strategy="sequential", **accumulation(route))
        trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy="ew")
        trainer.train()
        assert trainer.updater.accumulation_steps == (1 if route == "none" else 2)
        results.append((snapshot(model), trainer.state.log_history[-2]["loss"]))
    for other in results[1:]:
        torch.testing.assert_close(results[0][0], other[0])
        assert results[0][1] == pytest.approx(other[1], rel=1e-5)


# -- evaluation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_eval_metrics", [False, True])
def test_evaluation_gives_per_task_metrics_and_delta_m(tmp_path, batch_eval_metrics):
    model = vector_model()
    train, test = vector_data(32), vector_data(40, seed=1)
    reference = {"a/accuracy": 0.8, "b/mae": 0.5}
    args = make_args(tmp_path, steps=2, per_device_eval_batch_size=16, batch_eval_metrics=batch_eval_metrics)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=train, eval_dataset=test, strategy="ew",
                               compute_metrics=make_compute_metrics(SPECS, reference))
    trainer.train()
    metrics = trainer.evaluate()
    rows = test[:]
    with torch.no_grad():
        out = model.eval()(features=rows["features"])["logits"]
    accuracy = float((out["a"].argmax(1) == rows["a"]).double().mean())
    mae = float((out["b"].reshape(-1).double() - rows["b"].double()).abs().mean())
    assert metrics["eval_a/accuracy"] == pytest.approx(accuracy)
    assert metrics["eval_b/mae"] == pytest.approx(mae, rel=1e-6)
    expected = 100 * ((accuracy - 0.8) / 0.8 - (mae - 0.5) / 0.5) / 2
    assert metrics["eval_delta_m"] == pytest.approx(expected, rel=1e-6)


def test_runner_fit_trains_through_the_trainer_and_reports_test_metrics(tmp_path):
    from mtl_plugins import runner

    recipe = {"data": {"dataset": "multidigits", "tasks": ["left", "sum"], "train_size": 64, "eval_size": 48},
              "model": {"name": "multidigits_cnn", "options": {"width": 4, "hidden": 8}},
              "strategy": {"name": "ew"},
              "training": {"num_train_epochs": 1, "per_device_train_batch_size": 32, "logging_steps": 1,
                           "per_device_eval_batch_size": 20}}
    result = runner.fit(recipe, progress=False, output_dir=tmp_path)
    assert result["steps"] == 2 and [r["step"] for r in result["records"]] == [1, 2]
    assert all(f"loss/{t}" in r for r in result["records"] for t in ("left", "sum"))
    # the Trainer's evaluation equals the metrics computed here, in NumPy float64, from the model's
    # outputs on the whole eval split: accuracy of the arg-max, and the mean absolute error in digit
    # units (the sum target is (left + right) / 18)
    rows = result["data"].eval[:]
    with torch.no_grad():
        out = result["model"].eval()(pixel_values=rows["pixel_values"]).logits
    logits = {t: out[t].double().numpy() for t in ("left", "sum")}
    labels = {t: rows[t].double().numpy() for t in ("left", "sum")}
    accuracy = np.mean(np.argmax(logits["left"], axis=1) == labels["left"])
    mae = np.mean(np.abs(logits["sum"].reshape(-1) - labels["sum"])) * 18.0
    assert result["metrics"] == pytest.approx({"left/accuracy": accuracy, "sum/mae": mae}, rel=1e-6)
    assert not (tmp_path / "checkpoints").exists()
    with pytest.raises(ValueError, match="unknown training options \\['epochs'\\]"):
        runner.training_options({"training": {"epochs": 2}})


def test_reference_metrics_must_name_every_task_metric():
    with pytest.raises(KeyError, match="reference metrics lack \\['b/mae'\\]"):
        make_compute_metrics(SPECS, {"a/accuracy": 0.5})


# -- mixed precision ------------------------------------------------------------------------------
BF16 = ["ew", "two_step", "sel_update", "conn_strength"]


@pytest.mark.parametrize("name", BF16)
def test_bf16_on_cpu_trains_without_nan(tmp_path, name):
    model, data, tasks = setup(name)
    dtypes = []
    model.heads[tasks[0]].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    before = snapshot(model)
    args = make_args(tmp_path, steps=4, bf16=True, learning_rate=0.05)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=make_strategy(name, model, tasks),
                               tasks=tasks)
    trainer.train()
    assert dtypes and set(dtypes) == {torch.bfloat16}  # autocast ran the forward passes in bf16
    assert all(torch.isfinite(p).all() and p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(math.isfinite(e[f"loss/{t}"]) for e in trainer.state.log_history if "loss" in e for t in tasks)


class Overflowing(TwoStep):
    """TwoStep whose step ``(batch, index)`` gets an infinite loss (``mode="overflow"``) or is left
    out entirely (``mode="omit"``, the reference for a skipped step)."""

    def __init__(self, tasks, *, at, mode, measure_last=False):
        super().__init__(tasks, measure_last=measure_last)
        self.at, self.mode, self.results = at, mode, []

    def step(self, closure, optimizer):
        updater = as_updater(optimizer)
        batch = self.num_steps
        for i, task in enumerate(self.tasks):
            final = i == len(self.tasks) - 1 and not self.measure_last
            if (batch, i) == self.at and self.mode == "omit":
                continue
            losses = closure()
            updater.zero_grad()
            scale = math.inf if (batch, i) == self.at else 1.0
            updater.backward(losses[task] * scale)
            self.results.append(updater.step(final=final))
        if self.measure_last:
            with torch.no_grad():
                closure()
        self.num_steps += 1
        return {t: 1.0 for t in self.tasks}


def install_scaler(trainer, init_scale=2.0**8):
    """A CPU GradScaler stands in for the CUDA one that fp16 gets on a GPU."""
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    trainer.accelerator.scaler = scaler
    return scaler


@pytest.mark.parametrize("measure_last, at, optim", [(False, (1, 0), "sgd"), (True, (1, 1), "sgd"), (False, (1, 1), "sgd"),
                                                     (False, (1, 0), "adamw_torch_fused"),
                                                     (False, (1, 1), "adamw_torch_fused")])
def test_fp16_overflow_skips_only_that_step(tmp_path, measure_last, at, optim):
    data = vector_data(32)
    args = make_args(tmp_path, steps=4, fp16=True, train_sampling_strategy="sequential", optim=optim)
    model = vector_model()
    strategy = Overflowing(TASKS, at=at, mode="overflow", measure_last=measure_last)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=strategy)
    scaler = install_scaler(trainer)
    trainer.train()
    assert scaler.get_scale() == 2.0**7  # backed off once
    reference = vector_model()
    args = make_args(tmp_path / "ref", steps=4, train_sampling_strategy="sequential", optim=optim)
    omitted = Overflowing(TASKS, at=at, mode="omit", measure_last=measure_last)
    MultiTaskTrainer(model=reference, args=args, train_dataset=data, strategy=omitted).train()
    torch.testing.assert_close(snapshot(model), snapshot(reference), rtol=0, atol=0)
    deferred_overflow = not measure_last and at[1] == len(TASKS) - 1
    # an inner overflow is reported to the strategy; a deferred final step is skipped by the loop
    assert strategy.results.count(False) == (0 if deferred_overflow else 1)
    # the scheduler follows the batch's last optimizer step: held back once if that one overflowed
    last_step_overflowed = at[1] == len(TASKS) - 1
    assert trainer.lr_scheduler.last_epoch == (3 if last_step_overflowed else 4)


class StepRecorder(TrainerCallback):
    """After every batch: the model, the strategy's learnable weights and the scheduler's count."""

    def __init__(self, trainer):
        self.trainer, self.records = trainer, []

    def on_step_end(self, args, state, control, **kwargs):
        strategy = self.trainer.strategy
        scaling = getattr(strategy, "loss_scaling", None)
        if scaling is not None:  # a composed strategy: the loss weighting's learned weights
            strategy = scaling.weighting
        owned = strategy.log_var if strategy.name == "uw" else getattr(strategy, "logits", None)
        learned = None if owned is None else owned.tensor.detach().clone()
        self.records.append((snapshot(self.trainer.model), learned, self.trainer.lr_scheduler.last_epoch))


def overflow_first_backward(model: nn.Module) -> None:
    """The first backward's gradient of the first encoder weight leaves float32's range, as under a loss
    scale too large for the gradients (a 2**127 scale alone overflowed this batch's gradients with
    accelerate 1.15 but leaves them finite, up to 1e38, with 1.16)."""
    weight = model.encoder[0].weight

    def hook(grad):
        handle.remove()
        return grad * 1e30

    handle = weight.register_hook(hook)


def train_overflowing_first_batch(tmp_path, name, optim="sgd", **strategy_options):
    """Three batches under fp16; the first overflows (huge loss scale), the scaler then backs off to 2**7."""
    args = make_args(tmp_path / name / optim, steps=3, fp16=True, logging_steps=1, optim=optim,
                     train_sampling_strategy="sequential")
    model = vector_model()
    overflow_first_backward(model)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=vector_data(32), strategy=name,
                               strategy_options=strategy_options or None)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-120,
                                                      growth_interval=1000)
    recorder = StepRecorder(trainer)
    trainer.add_callback(recorder)
    start = snapshot(trainer.model)
    trainer.train()
    assert trainer.accelerator.scaler.get_scale() == 2.0**7  # exactly one overflow
    return trainer, start, recorder.records


@pytest.mark.parametrize("name, optim", [("uw", "sgd"), ("famo", "sgd"), ("uw", "adamw_torch"),
                                         ("uw", "adamw_torch_fused"), ("famo", "adamw_torch_fused")])
def test_fp16_overflow_leaves_learned_loss_weights_alone(tmp_path, name, optim):
    # fused optimizers always run their step under the scaler (the kernel skips it): the skip must be
    # read from the scaler, not from accelerate's step_was_skipped
    trainer, start, records = train_overflowing_first_batch(tmp_path, name, optim)
    assert trainer.updater.skipped_steps == 1
    assert trainer.updater.deferred is False  # the final step was taken inside the batch
    zeros = torch.zeros(len(TASKS), dtype=records[0][1].dtype)
    (model_0, learned_0, _), (model_1, learned_1, _), (model_2, learned_2, _) = records
    assert same(model_0, start) and torch.equal(learned_0, zeros)  # overflowed: nothing moved
    assert not same(model_1, model_0) and not torch.equal(learned_1, learned_0)  # normal batches: both move
    assert not same(model_2, model_1) and not torch.equal(learned_2, learned_1)
    # the scheduler steps once per batch whose step was applied, exactly as with a deferred final step
    _, _, deferred = train_overflowing_first_batch(tmp_path, "ew")
    assert [r[2] for r in records] == [r[2] for r in deferred] == [0, 1, 2]
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [math.isfinite(entry["grad_norm"]) for entry in logs] == [False, True, True]
    assert [entry.get("skipped_inner_steps") for entry in logs] == [1, 1, 1]


@pytest.mark.parametrize("name, options", [("pcgrad", {}), ("sel_update", {"warmup_steps": 1})])
@pytest.mark.parametrize("optim", ["sgd", "adamw_torch", "adamw_torch_fused"])
def test_fp16_overflow_leaves_a_composed_loss_scaling_alone(tmp_path, name, options, optim):
    trainer, start, records = train_overflowing_first_batch(tmp_path, name, optim, loss_scaling="uw", **options)
    assert trainer.updater.skipped_steps >= 1
    zeros = torch.zeros(len(TASKS), dtype=records[0][1].dtype)
    (model_0, learned_0, _), (model_1, learned_1, _), (model_2, learned_2, _) = records
    # the overflowed batch: UW did not move; pcgrad's one step was skipped, sel_update's later group
    # step (after the scaler backed off) was applied
    assert torch.equal(learned_0, zeros) and same(model_0, start) == (name == "pcgrad")
    assert not same(model_1, model_0) and not torch.equal(learned_1, learned_0)  # then both move, once a batch
    assert not same(model_2, model_1) and not torch.equal(learned_2, learned_1)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs[0].get("skipped_inner_steps", 0) >= 1


def test_updater_unscales_before_clipping_and_skips_overflow(tmp_path):
    model = vector_model()
    trainer = MultiTaskTrainer(model=model, args=make_args(tmp_path, fp16=True), train_dataset=vector_data(), strategy="ew")
    accelerator = trainer.accelerator
    scaler = install_scaler(trainer, init_scale=2.0**10)
    accelerator.native_amp = True  # accelerate unscales before clipping only with native AMP
    optimizer = accelerator.prepare_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    updater = AcceleratedUpdater(accelerator, optimizer, max_grad_norm=0.01)
    batch = next(batches(vector_data(), 8))

    def inner_step(scale=1.0):
        updater.zero_grad()
        updater.backward(model(**batch)["loss"] * scale)
        return updater.step()

    def expected_after_step():
        copy = vector_model()
        copy.load_state_dict(model.state_dict())
        copy(**batch)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(copy.parameters(), 0.01)
        return {n: p - 0.1 * p.grad for n, p in copy.named_parameters()}

    expected = expected_after_step()
    assert inner_step() is True
    torch.testing.assert_close(dict(model.named_parameters()), expected)
    before = snapshot(model)
    assert inner_step(math.inf) is False
    assert scaler.get_scale() == 2.0**9 and updater.skipped_steps == 1
    torch.testing.assert_close(snapshot(model), before, rtol=0, atol=0)
    expected = expected_after_step()
    assert inner_step() is True
    torch.testing.assert_close(dict(model.named_parameters()), expected)
    assert updater.loss_scale == 2.0**9


# -- refusals -------------------------------------------------------------------------------------
class NeedsTask(Strategy):
    needs_task_forward = True


class NoTaskArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = vector_model()

    def forward(self, features, a=None, b=None):
        return self.inner(features=features, a=a, b=b)


@pytest.mark.parametrize("route", ["arguments", "accelerator_config"])
@pytest.mark.parametrize("strategy", ["two_step", "per_task", "pcgrad", "sel_update", "conn_strength", "dwa"])
def test_gradient_accumulation_with_a_batch_level_strategy_is_refused(tmp_path, strategy, route):
    model, data, tasks = setup(strategy)
    args = make_args(tmp_path, **accumulation(route))
    with pytest.raises(ValueError, match=f"gradient_accumulation_steps=2 cannot be used with strategy '{strategy}'"):
        MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=make_strategy(strategy, model, tasks),
                         tasks=tasks)


def test_single_process_data_parallel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(MultiTaskTrainingArguments, "n_gpu", property(lambda self: 2))
    args = make_args(tmp_path)
    with pytest.raises(ValueError, match="single-process multi-GPU training \\(torch.nn.DataParallel over n_gpu=2"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=vector_data(), strategy="ew")


def test_bad_options_are_refused_with_clear_errors(tmp_path, monkeypatch):
    args = make_args(tmp_path)
    data = vector_data()
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, strategy="nope")
    with pytest.raises(TypeError, match="no option 'warmup_steps'"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, strategy="ew", strategy_options={"warmup_steps": 1})
    with pytest.raises(ValueError, match="no label column for tasks \\['b'\\]"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data.remove_columns("b"), strategy="ew")
    with pytest.raises(ValueError, match="eval_dataset has no label column for tasks \\['a'\\]"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, eval_dataset=data.remove_columns("a"))
    with pytest.raises(ValueError, match="strategy_options apply to a strategy given by name"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, strategy=TwoStep(TASKS),
                         strategy_options={"seed": 1})
    with pytest.raises(ValueError, match="differ from the trainer's tasks"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data, strategy=TwoStep(["a"]), tasks=TASKS)
    with pytest.raises(ValueError, match="has no `task` argument"):
        MultiTaskTrainer(model=NoTaskArgument(), args=args, train_dataset=data, strategy=NeedsTask(TASKS))
    with pytest.raises(ValueError, match="lr_ts=2.0 needs a model with get_share_params"):
        MultiTaskTrainer(model=NoTaskArgument(), args=make_args(tmp_path, lr_ts=2.0), train_dataset=data, tasks=TASKS)
    with pytest.raises(ValueError, match="label_names=\\['a'\\] must be the task names"):
        MultiTaskTrainer(model=vector_model(), args=make_args(tmp_path, label_names=["a"]), train_dataset=data)
    with pytest.raises(ValueError, match="lr_ts must be positive"):
        make_args(tmp_path, lr_ts=0.0)
    with pytest.raises(ValueError, match="progress_unit must be one of"):
        make_args(tmp_path, progress_unit="batch")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="launched on 2 processes, but the training arguments are not distributed"):
        MultiTaskTrainer(model=vector_model(), args=args, train_dataset=data)


def test_non_finite_loss_stops_training_with_a_clear_error(tmp_path):
    data = vector_data(16)
    labels = data[:]["b"].clone()
    labels[3] = float("nan")
    data = data.remove_columns("b").add_column("b", labels.numpy()).with_format("torch")
    trainer = MultiTaskTrainer(model=vector_model(), args=make_args(tmp_path), train_dataset=data, strategy="ew")
    with pytest.raises(NonFiniteLossError, match="non-finite loss for tasks \\['b'\\]"):
        trainer.train()


def test_every_private_transformers_attribute_the_trainer_relies_on_exists(tmp_path):
    import importlib

    from mtl_plugins.trainers.private_api import INSTANCE_ATTRIBUTES, PRIVATE_ATTRIBUTES

    trainer = MultiTaskTrainer(model=vector_model(), args=make_args(tmp_path, steps=1), train_dataset=vector_data(16))
    trainer.train()
    instances = {"transformers.Trainer": trainer, "accelerate.state.GradientState": trainer.accelerator.gradient_state,
                 "accelerate.optimizer.AcceleratedOptimizer": trainer.optimizer}
    for key in PRIVATE_ATTRIBUTES:
        owner, attribute = key.rsplit(".", 1)
        module, name = owner.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(instances[owner], cls)
        target = instances[owner] if key in INSTANCE_ATTRIBUTES else cls
        assert hasattr(target, attribute), key


# -- non-finite gradients without a loss scaler ---------------------------------------------------
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
@pytest.mark.parametrize("name", ["ew", "uw", "two_step", "sel_update"])
def test_infinite_gradient_with_a_finite_loss_stops_before_the_step(tmp_path, name, max_grad_norm):
    model, data, tasks = setup(name)
    model.heads["b"].weight.register_hook(lambda grad: grad * math.inf)  # task b's gradient only
    before = snapshot(model)
    args = make_args(tmp_path, optim="adamw_torch", max_grad_norm=max_grad_norm)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy=make_strategy(name, model, tasks),
                               tasks=tasks)
    with pytest.raises(FloatingPointError, match=r"non-finite gradients? for tasks \['b'\]"):
        trainer.train()
    after = snapshot(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert same({k: v for k, v in after.items() if k.startswith("heads.b")},
                {k: v for k, v in before.items() if k.startswith("heads.b")})
    if name in ("ew", "uw"):  # one step per batch: it was not taken
        assert same(after, before)
        assert not any(trainer.optimizer.state[p] for p in model.parameters())
