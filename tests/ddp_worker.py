"""Tiny models, data and test strategies for the trainer tests, and a 2-process DDP worker.

Run by tests/test_trainer_ddp.py as
``python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT STRATEGY...``
(``STRATEGY@LAYOUT`` for a setting of ``LAYOUTS``); each rank trains every listed strategy and
saves its parameters, buffers and strategy state to ``OUT/rank<r>.pt`` (and, for ``ew``, the
metrics of the trained model evaluated on both processes).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import datasets
import torch
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.hps import HPS
from mtl_plugins.registry import STRATEGIES
from mtl_plugins.strategies.base import Strategy, as_updater, losses_to_floats
from mtl_plugins.tasks import TaskSpec

TASKS = ["a", "b"]
SPECS = {"a": TaskSpec("classification", 2, "cross_entropy", "accuracy", True),
         "b": TaskSpec("regression", 1, "mse", "mae", False)}
#: Strategies that need the model converted by an architecture plugin first.
ARCHITECTURE_FOR = {"conn_strength": "task_connections"}
#: Named variants: (registered strategy, options).
VARIANTS = {"conn_strength_phase2": ("conn_strength", {"schedule": "phase2"}),
            "pcgrad_batched": ("pcgrad", {"jacobian": "batched"}),
            "mgda_rep_grad": ("mgda", {"rep_grad": True}),
            "graddrop_rep_grad": ("graddrop", {"rep_grad": True}),
            # composed with a loss weighting (the loss_scaling option)
            "sel_update+uw": ("sel_update", {"loss_scaling": {"name": "uw", "options": {"lr": 0.05}}}),
            "pcgrad+dwa": ("pcgrad", {"loss_scaling": {"name": "dwa", "options": {"steps_per_epoch": 1}}}),
            "conn_strength+famo": ("conn_strength", {"loss_scaling": "famo"}),
            "conn_strength+uw": ("conn_strength", {"loss_scaling": {"name": "uw", "options": {"lr": 0.05}}}),
            "dwa_epochs": ("dwa", {"steps_per_epoch": None})}  # epochs from the trainer
#: Data-parallel settings, as ``STRATEGY@LAYOUT``: (training options, rows of vector data, steps).
#: ``ragged``: 36 rows in batches of 4 are 9 batches, 5 on rank 0 and 4 on rank 1, so the ranks
#: count epochs differently; ``no_buffers``: each rank keeps its own BatchNorm statistics.
LAYOUTS = {"ragged": ({"accelerator_config": {"even_batches": False}}, 36, 12),
           "no_buffers": ({"ddp_broadcast_buffers": False}, 64, 12)}
#: The strategies written in this file.
LOCAL = ("two_step", "measure_last", "per_task")


def vector_data(n: int = 64, seed: int = 0) -> datasets.Dataset:
    """``features`` (n x 6) with a classification task ``a`` and a regression task ``b``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    columns = {"features": x.numpy(), "a": (x[:, 0] + x[:, 2] > 0).long().numpy(),
               "b": (x[:, 1] - 0.5 * x[:, 3]).numpy(), "id": torch.arange(n).numpy()}
    return datasets.Dataset.from_dict(columns).with_format("torch")


def vector_model(seed: int = 0, dropout: float = 0.0) -> HPS:
    """Hard parameter sharing MLP without normalisation (exact under data parallelism)."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(dropout))
    heads = {"a": nn.Linear(16, 2), "b": nn.Linear(16, 1)}
    return HPS(TASKS, encoder=encoder, heads=heads, losses={"a": "cross_entropy", "b": "mse"}, input_name="features")


def digits_setup(strategy: str, size: int = 64, seed: int = 0):
    """A small MultiDigits CNN (with BatchNorm) and data, converted for ``strategy`` if it needs it."""
    from mtl_plugins.data.multidigits import TASKS as DIGIT_TASKS
    from mtl_plugins.data.multidigits import load_multidigits
    from mtl_plugins.models import multidigits_cnn

    tasks = ["left", "right", "sum"]
    torch.manual_seed(seed)
    model = multidigits_cnn(tasks, {t: DIGIT_TASKS[t] for t in tasks}, width=4, hidden=8)
    if strategy in ARCHITECTURE_FOR:
        mtl_plugins.build_architecture(ARCHITECTURE_FOR[strategy], tasks, model=model)
    return model, load_multidigits("train", size, seed, tasks), tasks


def strategy_options(name: str, model: nn.Module) -> dict:
    """Options that make a registered strategy exercise its full behaviour within a few batches."""
    accepted = STRATEGIES.accepted_options(name)
    options = {}
    if "warmup_steps" in accepted:
        options["warmup_steps"] = 1
    if "model" in accepted:
        options["model"] = model
    if "steps_per_epoch" in accepted:
        options["steps_per_epoch"] = 2
    return options


class TwoStep(Strategy):
    """One forward, backward and optimizer step per task on the same batch (the last one final).

    With ``shuffle`` the task order is drawn from the strategy's generator on every batch; with
    ``measure_last`` every step is taken inside and a no-grad forward follows (no final step).
    """

    name = "two_step"

    def __init__(self, tasks: Sequence[str], *, shuffle: bool = False, measure_last: bool = False, seed: int = 0):
        super().__init__(tasks, seed=seed)
        self.shuffle, self.measure_last = shuffle, measure_last
        self.orders: list[list[str]] = []
        self.recorded: list[dict[str, float]] = []
        self.progress_seen: list[float] = []

    def order(self) -> list[str]:
        if not self.shuffle:
            return list(self.tasks)
        return [self.tasks[i] for i in torch.randperm(len(self.tasks), generator=self.generator).tolist()]

    def step(self, closure, optimizer) -> dict[str, float]:
        updater = as_updater(optimizer)
        self.progress_seen.append(self.progress)
        order = self.order()
        first = None
        for i, task in enumerate(order):
            losses = closure()
            if first is None:
                first = dict(zip(self.tasks, losses_to_floats(losses, self.tasks)))
            updater.zero_grad()
            updater.backward(losses[task])
            updater.step(final=(i == len(order) - 1 and not self.measure_last))
        if self.measure_last:
            with torch.no_grad():
                closure()
        self.orders.append(order)
        self.recorded.append(first)
        self.num_steps += 1
        return first

    def state_dict(self) -> dict:
        return {**super().state_dict(), "orders": [list(o) for o in self.orders]}

    def load_state_dict(self, state) -> None:
        super().load_state_dict(state)
        self.orders = [list(o) for o in state["orders"]]


class PerTaskProjection(Strategy):
    """Per-task gradients of every parameter, then PCGrad-style: ``g_b`` loses its component along
    ``g_a`` when they conflict; one step with ``g_a + g_b``. Exercises per-task backward passes."""

    name = "per_task"

    def step(self, closure, optimizer) -> dict[str, float]:
        updater = as_updater(optimizer)
        params = updater.params
        grads = {}
        values = None
        for task in self.tasks:
            losses = closure()
            if values is None:
                values = dict(zip(self.tasks, losses_to_floats(losses, self.tasks)))
            updater.zero_grad()
            updater.backward(losses[task])
            grads[task] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        combined = combine_projection(grads["a"], grads["b"])
        offset = 0
        for p in params:
            p.grad = combined[offset: offset + p.numel()].view_as(p).clone()
            offset += p.numel()
        updater.step(final=True)
        self.num_steps += 1
        return values


def combine_projection(g_a: torch.Tensor, g_b: torch.Tensor) -> torch.Tensor:
    dot = torch.dot(g_a, g_b)
    if dot < 0:
        g_b = g_b - dot / g_a.dot(g_a) * g_a
    return g_a + g_b


def make_strategy(name: str, model: nn.Module, tasks: Sequence[str]) -> Strategy:
    if name == "two_step":
        return TwoStep(tasks, shuffle=True, seed=3)
    if name == "measure_last":
        return TwoStep(tasks, shuffle=True, measure_last=True, seed=3)
    if name == "per_task":
        return PerTaskProjection(tasks)
    registered, extra = VARIANTS.get(name, (name, {}))
    return mtl_plugins.build_strategy(registered, tasks, **{**strategy_options(registered, model), **extra})


def setup(name: str):
    """(model, train data, tasks) for strategy ``name``: the MLP unless it needs task connections."""
    registered = VARIANTS.get(name, (name, {}))[0]
    if registered in ARCHITECTURE_FOR:
        return digits_setup(registered)
    return vector_model(), vector_data(), TASKS


def same(a, b) -> bool:
    """Exact equality of nested states (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def ddp_args(output_dir: str, batch_size: int, steps: int, **overrides):
    from mtl_plugins.trainers import MultiTaskTrainingArguments

    options = dict(output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=steps, optim="sgd",
                   learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=2,
                   save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    options.update(overrides)
    return MultiTaskTrainingArguments(**options)


def train_one(name: str, output_dir: str, batch_size: int, steps: int):
    """Train strategy ``name`` (vector model, or the digits CNN for registered strategies); a name
    ``STRATEGY@LAYOUT`` trains with the data-parallel setting ``LAYOUTS[LAYOUT]``."""
    from mtl_plugins.trainers import MultiTaskTrainer

    name, _, layout = name.partition("@")
    options, rows, layout_steps = LAYOUTS.get(layout, ({}, None, steps))
    model, data, tasks = setup(name)
    if rows is not None and VARIANTS.get(name, (name, {}))[0] not in ARCHITECTURE_FOR:
        data = vector_data(rows)
    strategy = make_strategy(name, model, tasks)
    trainer = MultiTaskTrainer(model=model, args=ddp_args(output_dir, batch_size, layout_steps, **copy.deepcopy(options)),
                               train_dataset=data, strategy=strategy, tasks=tasks)
    trainer.train()
    return trainer


#: Evaluation examples: 13 over 2 processes x batches of 4 pads the last batches with repeats.
EVAL_SIZE = 13


def evaluate_on_every_rank(model: nn.Module, output_dir: str) -> dict:
    """The Trainer's evaluation (batches gathered over processes) and the streaming evaluation of
    this rank's shard only (states summed over processes), of the vector data with seed 1."""
    import torch.distributed as dist

    from mtl_plugins.metrics import evaluate_batches, make_compute_metrics
    from mtl_plugins.trainers import MultiTaskTrainer

    data = vector_data(EVAL_SIZE, seed=1)
    args = ddp_args(output_dir, 4, 1, per_device_eval_batch_size=4, batch_eval_metrics=True)
    trainer = MultiTaskTrainer(model=model, args=args, eval_dataset=data, strategy="ew", tasks=TASKS,
                               compute_metrics=make_compute_metrics(SPECS))
    gathered = trainer.evaluate()
    rows = data[dist.get_rank()::dist.get_world_size()]
    shard = [{k: rows[k][i : i + 4] for k in ("features", *TASKS)} for i in range(0, len(rows["a"]), 4)]
    return {"trainer": gathered, "sharded": evaluate_batches(model, shard, SPECS)}


def main(argv: Sequence[str]) -> None:
    import torch.distributed as dist

    out, names = argv[0], argv[1:]
    results = {}
    for name in names:
        trainer = train_one(name, os.path.join(out, name), batch_size=4, steps=4)
        results[name] = {"model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                         "strategy": trainer.strategy.state_dict(), "log": trainer.state.log_history}
        if name == "ew":
            results[name]["evaluation"] = evaluate_on_every_rank(trainer.model, os.path.join(out, "eval"))
    rank = dist.get_rank()
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
