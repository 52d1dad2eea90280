"""Selective task group updates: affinity rule (float64 replay), schedule, idle tasks, resume, guards."""

from __future__ import annotations

import copy
import io
import json
import logging
from typing import ClassVar

import numpy as np
import pytest
import torch
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.hps import HPS
from mtl_plugins.grouping import Grouping, choose_groups
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies import sel_update as sel_module
from mtl_plugins.strategies.base import NonFiniteLossError, Updater
from mtl_plugins.strategies.sel_update import SelectiveGroupUpdate, update_affinity

TASKS = ["a", "b", "c", "d"]


# -- fixtures ---------------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> HPS:
    torch.manual_seed(seed)
    heads = {"a": nn.Linear(8, 3), "b": nn.Linear(8, 3), "c": nn.Linear(8, 1), "d": nn.Linear(8, 1)}
    losses = {"a": "cross_entropy", "b": "cross_entropy", "c": "mse", "d": "mse"}
    return HPS(TASKS, encoder=nn.Sequential(nn.Linear(6, 8), nn.Tanh()), heads=heads, losses=losses, input_name="x")


def make_batches(n: int, seed: int = 0, size: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(size, 6, generator=g)
        batches.append({"x": x, "a": (x[:, 0] > 0).long() + (x[:, 1] > 0).long(), "b": (x[:, 2] > 0.3).long() * 2,
                        "c": x[:, 3] - x[:, 4], "d": x[:, :3].sum(1)})
    return batches


def train(strategy, model, optimizer, batches) -> list[dict[str, float]]:
    return [strategy.step(make_closure(model, batch), optimizer) for batch in batches]


class ScriptedLosses:
    """A closure returning prescribed loss values (one row per forward pass), differentiable."""

    def __init__(self, tasks, seed: int = 0, zero_every: int = 0, nan_at: int | None = None):
        self.tasks, self.calls, self.zero_every, self.nan_at = list(tasks), 0, zero_every, nan_at
        self.rng = np.random.default_rng(seed)
        self.param = nn.Parameter(torch.ones(()))
        self.optimizer = torch.optim.SGD([self.param], lr=0.1)

    def __call__(self, task=None):
        assert task is None
        row = self.rng.uniform(0.2, 2.0, size=len(self.tasks))
        if self.zero_every and self.calls % self.zero_every == 0:
            row[self.calls % len(self.tasks)] = 0.0
        if self.nan_at is not None and self.calls == self.nan_at:
            row[1] = float("nan")
        self.calls += 1
        return {t: self.param * 0 + float(v) for t, v in zip(self.tasks, row)}


def cycle_groups(*partitions):
    """A ``choose_groups`` replacement handing out the given partitions in turn (records its calls)."""
    calls: list[list[list[str]]] = []

    def choose(affinity, tasks, previous, *, preference=None, random_state=0, **options):
        calls.append([list(g) for g in previous])
        return Grouping([list(g) for g in partitions[(len(calls) - 1) % len(partitions)]])

    choose.calls = calls
    return choose


# -- independent float64 reference of the affinity rule ---------------------------------------------
def reference_group_update(a, tasks, before, after, group, beta):
    """One group step, written loop by loop from the spec (plain Python floats)."""
    n = len(group)
    for s in group:
        si = tasks.index(s)
        for ti, t in enumerate(tasks):
            if before[ti] <= 0:
                continue
            r_t = (1 - after[ti] / before[ti]) / n
            if t not in group:
                v = r_t
            else:
                if before[si] <= 0:
                    continue
                r_s = (1 - after[si] / before[si]) / n
                if t == s:
                    if r_s < 0:
                        continue
                    v = r_s
                elif r_t * r_s >= 0:
                    v = r_t
                else:
                    v = -max(r_t, r_s)
            a[si][ti] = (1 - beta) * a[si][ti] + beta * v


def replay(history, tasks, beta, attribution, start=None):
    """Replay recorded batches; returns the reference affinity after each record."""
    k = len(tasks)
    a = [[0.0] * k for _ in range(k)] if start is None else [list(map(float, row)) for row in start]
    after_each = []
    for record in history:
        losses, order = record["losses"], record["order"]
        applied = record.get("applied", [True] * len(order))
        if attribution == "paper":  # step j moved the losses from pass j to pass j + 1
            for j in range(len(losses) - 1):
                if applied[j]:
                    reference_group_update(a, tasks, losses[j], losses[j + 1], order[j], beta)
        else:  # released loop: after group j's step, credit (previous pass -> pass j) to group j
            previous = [-1.0] * k  # reset per batch: the first group records nothing
            for j, group in enumerate(order):
                if j == 0 or applied[j - 1]:
                    reference_group_update(a, tasks, previous, losses[j], group, beta)
                previous = losses[j]
        after_each.append(torch.tensor(a, dtype=torch.float64))
    return after_each


# -- the affinity rule ------------------------------------------------------------------------------
def test_update_rule_on_hand_built_losses():
    # group {0, 1}; r = [0.25, -0.125, (no baseline), 0.125]
    before, after = [1.0, 2.0, 0.0, 4.0], [0.5, 2.5, 1.0, 3.0]
    start = torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 4, dtype=torch.float64)
    a = start.clone()
    update_affinity(a, before, after, [0, 1], decay=0.5)
    def ema(old, v):
        return 0.5 * old + 0.5 * v

    expected = start.clone()
    expected[0] = torch.tensor([ema(0.1, 0.25), ema(0.2, -0.25), 0.3, ema(0.4, 0.125)], dtype=torch.float64)
    expected[1] = torch.tensor([ema(0.1, -0.25), 0.2, 0.3, ema(0.4, 0.125)], dtype=torch.float64)  # r_s < 0: no self
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-15)
    reference = start.tolist()
    reference_group_update(reference, TASKS, before, after, ["a", "b"], 0.5)
    torch.testing.assert_close(a, torch.tensor(reference, dtype=torch.float64), rtol=0, atol=1e-15)


def test_update_rule_zero_source_loss_skips_in_group_targets():
    a = torch.zeros(4, 4, dtype=torch.float64)
    update_affinity(a, [0.0, 1.0, 1.0, 1.0], [0.5, 0.5, 1.5, 0.5], [0, 1], decay=1.0)
    # source a has no baseline: only targets outside the group are credited to a's row
    assert a[0].tolist() == [0.0, 0.0, (1 - 1.5) / 2, (1 - 0.5) / 2]
    assert a[1].tolist() == [0.0, 0.25, -0.25, 0.25]  # target a has no baseline, c is outside the group


@pytest.mark.parametrize(("attribution", "measure_last"), [("paper", False), ("paper", True), ("reference", False)])
def test_replay_scripted_losses(monkeypatch, attribution, measure_last):
    """Known loss sequences (zeros included), groups of sizes 1-4: float64 replay of the history."""
    monkeypatch.setattr(sel_module, "choose_groups", cycle_groups([["a", "b", "c"], ["d"]], [["a"], ["b", "c", "d"]],
                                                                  [TASKS], [["a", "d"], ["b", "c"]]))
    strategy = SelectiveGroupUpdate(TASKS, affinity_decay=0.3, warmup_steps=1, attribution=attribution,
                                    measure_last=measure_last, seed=3)
    closure = ScriptedLosses(TASKS, seed=1, zero_every=3)
    for _ in range(12):
        strategy.step(closure, closure.optimizer)
    history = list(strategy.history)
    assert [len(r["losses"]) for r in history] == [len(r["order"]) + measure_last for r in history]
    assert {len(g) for r in history for g in r["order"]} == {1, 2, 3, 4}
    expected = replay(history, TASKS, 0.3, attribution)
    for record, reference in zip(history, expected):
        torch.testing.assert_close(record["affinity"], reference, rtol=0, atol=1e-14)
    torch.testing.assert_close(strategy.affinity, expected[-1], rtol=0, atol=1e-14)
    assert (strategy.affinity != 0).sum() > 8


@pytest.mark.parametrize(("attribution", "measure_last"), [("paper", False), ("paper", True), ("reference", False)])
def test_replay_tiny_model(monkeypatch, attribution, measure_last):
    """A real model with real clustering: the history replays to the same affinity (float64)."""
    calls = []
    real = sel_module.choose_groups

    def spy(affinity, tasks, previous, *, preference=None, random_state=0, **options):
        calls.append((affinity.clone(), random_state))
        return real(affinity, tasks, previous, preference=preference, random_state=random_state, **options)

    monkeypatch.setattr(sel_module, "choose_groups", spy)
    model = tiny_model()
    strategy = mtl_plugins.build_strategy("sel_update", TASKS, affinity_decay=0.2, warmup_steps=3,
                                          attribution=attribution, measure_last=measure_last, seed=0)
    train(strategy, model, torch.optim.Adam(model.parameters(), lr=0.01), make_batches(10))
    history = list(strategy.history)
    assert [r["step"] for r in history] == list(range(10))
    expected = replay(history, TASKS, 0.2, attribution)
    for record, reference in zip(history, expected):
        torch.testing.assert_close(record["affinity"], reference, rtol=0, atol=1e-14)
    assert strategy.affinity.diagonal().gt(0).all()
    # after warm-up every batch regroups from the affinity left by the previous batch
    assert len(calls) == 6 and len({seed for _, seed in calls}) == 6
    for (affinity, seed), previous, record in zip(calls, history[3:], history[4:]):
        assert torch.equal(affinity, previous["affinity"])
        kept = [list(g) for g in dict.fromkeys(map(tuple, previous["order"]))]  # used if clustering fails
        clustered = choose_groups(previous["affinity"], TASKS, kept, random_state=seed).groups
        assert sorted(map(tuple, record["order"])) == sorted(map(tuple, clustered * (2 if len(clustered) == 1 else 1)))
    assert any(len(g) > 1 for r in history[4:] for g in r["order"])


def test_recorded_losses_are_the_sequential_group_steps():
    """Redo every batch by hand on a copy: forward, group loss, zero_grad, backward, step."""
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.2, group_loss_norm=True,
                                    loss_weights={"a": 2.0, "c": 0.5})
    twin = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    twin_optimizer = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    weights = {"a": 2.0, "b": 1.0, "c": 0.5, "d": 1.0}
    for batch in make_batches(6):
        returned = strategy.step(make_closure(model, batch), optimizer)
        record = strategy.history[-1]
        for j, group in enumerate(record["order"]):
            losses = twin(**batch).losses
            assert [float(losses[t].detach()) for t in TASKS] == pytest.approx(record["losses"][j], rel=1e-6)
            twin_optimizer.zero_grad()
            (sum(weights[t] * losses[t] for t in group) / len(group)).backward()
            twin_optimizer.step()
        assert returned == dict(zip(TASKS, record["losses"][0]))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_history_window_is_bounded_and_replays_from_its_first_record():
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.2, history_window=3)
    train(strategy, model, torch.optim.Adam(model.parameters(), lr=0.01), make_batches(7))
    history = list(strategy.history)
    assert [r["step"] for r in history] == [4, 5, 6]
    expected = replay(history[1:], TASKS, 0.2, "paper", start=history[0]["affinity"].tolist())
    torch.testing.assert_close(strategy.affinity, expected[-1], rtol=0, atol=1e-14)


# -- schedule ---------------------------------------------------------------------------------------
def test_warmup_boundary(monkeypatch):
    chooser = cycle_groups([["a", "b"], ["c", "d"]])
    monkeypatch.setattr(sel_module, "choose_groups", chooser)
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=3)
    closure = ScriptedLosses(TASKS)
    for step in range(6):
        strategy.step(closure, closure.optimizer)
        order = strategy.history[-1]["order"]
        if step <= 3:  # counter read before increment <= warmup_steps: warmup_steps + 1 batches
            assert sorted(order) == [[t] for t in TASKS] and not chooser.calls
        else:
            assert sorted(order) == [["a", "b"], ["c", "d"]]
    assert len(chooser.calls) == 2
    assert chooser.calls[0] == [[t] for t in TASKS]  # previous groups handed over at the end of warm-up
    assert closure.calls == 4 * 4 + 2 * 2


def test_random_order_varies_and_is_seeded():
    def orders(seed):
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        np.random.seed(seed + 7)
        strategy = SelectiveGroupUpdate(TASKS, warmup_steps=20, seed=seed)
        closure = ScriptedLosses(TASKS)
        for _ in range(15):
            strategy.step(closure, closure.optimizer)
        return [tuple(g[0] for g in r["order"]) for r in strategy.history]

    first = orders(5)
    assert len(set(first)) > 5
    assert all(sorted(o) == sorted(TASKS) for o in first)
    assert orders(5) == first
    assert orders(6) != first


def test_clustering_is_deterministic_under_seed():
    def run():
        np.random.seed(int(torch.randint(0, 1000, (1,))))  # scramble the global NumPy RNG
        model = tiny_model()
        strategy = SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.2, seed=1)
        train(strategy, model, torch.optim.Adam(model.parameters(), lr=0.01), make_batches(8))
        return [r["order"] for r in strategy.history], strategy.affinity

    (orders, affinity), (orders2, affinity2) = run(), run()
    assert orders == orders2 and torch.equal(affinity, affinity2)


class CountingUpdater(Updater):
    def __init__(self, optimizer, skip=()):
        super().__init__(optimizer)
        self.finals: list[bool] = []
        self.skip = set(skip)

    def step(self, final: bool = False) -> bool:
        self.finals.append(final)
        if len(self.finals) - 1 in self.skip:
            return False
        return super().step(final)


@pytest.mark.parametrize("measure_last", [False, True])
def test_single_group_is_updated_twice(monkeypatch, measure_last):
    monkeypatch.setattr(sel_module, "choose_groups", cycle_groups([TASKS]))
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=0, affinity_decay=0.5, measure_last=measure_last)
    updater = CountingUpdater(torch.optim.SGD(model.parameters(), lr=0.05))
    batch = make_batches(2)
    strategy.step(make_closure(model, batch[0]), updater)
    updater.finals.clear()
    before = strategy.affinity.clone()
    strategy.step(make_closure(model, batch[1]), updater)
    record = strategy.history[-1]
    assert record["order"] == [TASKS, TASKS]
    assert updater.finals == [False, not measure_last]  # final only when no forward pass follows
    assert len(record["losses"]) == 2 + measure_last
    expected = before.tolist()
    for j in range(1 + measure_last):
        reference_group_update(expected, TASKS, record["losses"][j], record["losses"][j + 1], TASKS, 0.5)
    torch.testing.assert_close(strategy.affinity, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


def test_single_task_doubles_its_update():
    model = tiny_model()
    strategy = SelectiveGroupUpdate(["a"], warmup_steps=1)
    updater = CountingUpdater(torch.optim.SGD(model.parameters(), lr=0.05))
    closure = make_closure(model, make_batches(1)[0])
    for _ in range(3):
        strategy.step(lambda task=None: {"a": closure()["a"]}, updater)
    assert [r["order"] for r in strategy.history] == [[["a"], ["a"]]] * 3
    assert len(updater.finals) == 6


def test_skipped_optimizer_step_is_not_measured(monkeypatch):
    monkeypatch.setattr(sel_module, "choose_groups", cycle_groups([["a", "b"], ["c", "d"]]))
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=0, affinity_decay=0.4)
    closure = ScriptedLosses(TASKS, seed=4)
    updater = CountingUpdater(closure.optimizer, skip={0, 5})  # e.g. fp16 overflow steps
    for _ in range(3):
        strategy.step(closure, updater)
    history = list(strategy.history)
    assert [r["applied"] for r in history] == [[False, True, True, True], [True, False], [True, True]]
    expected = replay(history, TASKS, 0.4, "paper")
    torch.testing.assert_close(strategy.affinity, expected[-1], rtol=0, atol=1e-15)
    everything = [{**r, "applied": [True] * len(r["order"])} for r in history]
    assert not torch.equal(expected[-1], replay(everything, TASKS, 0.4, "paper")[-1])


def test_groups_and_order_follow_the_main_process_decision():
    class Agreeing(Updater):
        def agree(self, value):
            return [["a", "b", "c", "d"]], [["a", "b", "c", "d"]] * 2  # what the main process decided

    closure = ScriptedLosses(TASKS)
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=5)
    strategy.step(closure, Agreeing(closure.optimizer))
    assert strategy.groups == [TASKS] and strategy.history[-1]["order"] == [TASKS, TASKS]


# -- idle tasks -------------------------------------------------------------------------------------
class SnapshotUpdater(Updater):
    """Records every parameter before and after each optimizer step."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model, self.snapshots = model, []

    def step(self, final: bool = False) -> bool:
        before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        applied = super().step(final)
        self.snapshots.append((before, {n: p.detach().clone() for n, p in self.model.named_parameters()}))
        return applied


@pytest.mark.parametrize("optimizer_cls", [torch.optim.Adam, torch.optim.AdamW])
def test_idle_tasks_do_not_move_under_adam_with_weight_decay(optimizer_cls):
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=3, affinity_decay=0.2)
    updater = SnapshotUpdater(optimizer_cls(model.parameters(), lr=0.01, weight_decay=0.1), model)
    train(strategy, model, updater, make_batches(8))
    orders = [g for r in strategy.history for g in r["order"]]
    assert len(orders) == len(updater.snapshots) and any(len(g) < 4 for g in orders[16:])
    for group, (before, after) in zip(orders, updater.snapshots):
        for name in before:
            moved = not torch.equal(before[name], after[name])
            if name.startswith("heads."):
                assert moved == (name.split(".")[1] in group), (name, group)
            else:
                assert moved, name  # the shared encoder is updated by every group


def test_idle_tasks_move_under_adamw_when_not_frozen():
    # The released code's zero-filled gradients: once a head has had a gradient, it gets a zero one
    # while idle, so AdamW's momentum and weight decay move it; before its task's first update it has
    # none and stays still (torch 1.13's zero_grad). With SGD and no weight decay a zero gradient
    # moves nothing.
    for optimizer_cls, options, idle_moves in ((torch.optim.AdamW, {"weight_decay": 0.1}, True),
                                               (torch.optim.SGD, {}, False)):
        model = tiny_model()
        strategy = SelectiveGroupUpdate(TASKS, warmup_steps=3, affinity_decay=0.2, freeze_idle_tasks=False)
        updater = SnapshotUpdater(optimizer_cls(model.parameters(), lr=0.01, **options), model)
        train(strategy, model, updater, make_batches(6))
        orders = [g for r in strategy.history for g in r["order"]]
        updated: set[str] = set()
        still_before_first_update = 0
        for group, (before, after) in zip(orders, updater.snapshots):
            for name in before:
                task = name.split(".")[1]
                if name.startswith("heads.") and task not in group:
                    expected = idle_moves and task in updated
                    still_before_first_update += task not in updated
                    assert (not torch.equal(before[name], after[name])) == expected, (optimizer_cls, name)
            updated |= set(group)
        assert still_before_first_update == 2 * (3 + 2 + 1)  # first warm-up batch: weight and bias per head


def test_unfrozen_idle_tasks_follow_torch_1_13_zero_grad():
    # The released loop under torch 1.13: zero_grad() zero-fills the gradients that exist and leaves
    # None alone, so a head has no gradient (Adam skips it) until its task's first update, and a zero
    # one after. Redone step by step on a float64 twin over a few hundred batches.
    batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in make_batches(300, size=8)]
    model = tiny_model().double()
    twin, zero_all = copy.deepcopy(model), copy.deepcopy(model)
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=20, affinity_decay=0.05, attribution="reference",
                                    freeze_idle_tasks=False, seed=2)
    options = {"lr": 0.01, "weight_decay": 1e-2}
    train(strategy, model, torch.optim.Adam(model.parameters(), **options), batches)
    orders = [r["order"] for r in strategy.history]
    assert len(orders) == 300 and any(len(g) < 4 for o in orders[21:] for g in o)

    def redo(net: HPS, zero_grad) -> dict[str, torch.Tensor]:
        optimizer = torch.optim.Adam(net.parameters(), **options)
        first_step: dict[str, torch.Tensor] = {}
        for batch, order in zip(batches, orders):
            for group in order:
                losses = net(**batch).losses
                zero_grad(net)
                sum(losses[t] for t in group).backward()
                optimizer.step()
                if not first_step:
                    first_step = {n: p.detach().clone() for n, p in net.named_parameters()}
        return first_step

    def torch_1_13(net):
        for p in net.parameters():
            if p.grad is not None:
                p.grad.zero_()

    def zero_every_parameter(net):  # the library's former rule
        for p in net.parameters():
            p.grad = torch.zeros_like(p)

    start = dict(tiny_model().double().named_parameters())
    first_step = redo(twin, torch_1_13)
    first_task = orders[0][0][0]
    for name, p in first_step.items():  # the first step moves the shared encoder and one head only
        moved = not torch.equal(p, start[name])
        assert moved == (not name.startswith("heads.") or name.split(".")[1] == first_task), name
    redo(zero_all, zero_every_parameter)
    gap = 0.0
    for (name, p), q, r in zip(model.named_parameters(), twin.parameters(), zero_all.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12, msg=name)
        gap = max(gap, float((p - r).detach().abs().max()))
    assert gap > 1e-4


def test_float32_affinity_follows_the_released_arithmetic(monkeypatch):
    # The released affinity is a float32 tensor updated entry by entry:
    # A[s, t] = (1 - beta) * A[s, t] + beta * v, with v computed in Python floats.
    monkeypatch.setattr(sel_module, "choose_groups", cycle_groups([["a", "b", "c"], ["d"]], [["a"], ["b", "c", "d"]],
                                                                  [TASKS], [["a", "d"], ["b", "c"]]))
    beta = 0.001
    strategy = SelectiveGroupUpdate(TASKS, affinity_decay=beta, warmup_steps=1, attribution="reference",
                                    affinity_dtype="float32", seed=3)
    closure = ScriptedLosses(TASKS, seed=1)
    for _ in range(300):
        strategy.step(closure, closure.optimizer)
    assert strategy.affinity.dtype == torch.float32
    released = torch.zeros(4, 4)
    for record in strategy.history:
        previous = [-1.0] * 4
        for j, group in enumerate(record["order"]):
            after = record["losses"][j]
            for s in group:
                for ti, t in enumerate(TASKS):
                    if previous[ti] <= 0 or (t in group and previous[TASKS.index(s)] <= 0):
                        continue
                    r_t = (1 - after[ti] / previous[ti]) / len(group)
                    r_s = (1 - after[TASKS.index(s)] / previous[TASKS.index(s)]) / len(group)
                    if t not in group:
                        v = r_t
                    elif t == s:
                        if r_t < 0:
                            continue
                        v = r_t
                    else:
                        v = r_t if r_t * r_s >= 0 else -max(r_t, r_s)
                    si = TASKS.index(s)
                    released[si, ti] = (1 - beta) * released[si, ti] + beta * v
            previous = after
    assert torch.equal(strategy.affinity, released)
    float64 = torch.tensor(replay(strategy.history, TASKS, beta, "reference")[-1].tolist(), dtype=torch.float32)
    assert not torch.equal(float64, released)  # float32 arithmetic, not float64 rounded at the end


def test_released_settings_group_call_for_call(monkeypatch):
    # Recorded matrices: every clustering of a run with the released settings gives the groups the
    # released code gives for the same matrix, previous groups and noise seed.
    from released_clustering import partition, released_groups

    calls = []
    real = sel_module.choose_groups

    def spy(affinity, tasks, previous, **options):
        result = real(affinity, tasks, previous, **options)
        calls.append((affinity.clone(), [list(g) for g in previous], options["random_state"], result))
        return result

    monkeypatch.setattr(sel_module, "choose_groups", spy)
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=10, affinity_decay=0.2, attribution="reference",
                                    column_scaling="released", freeze_idle_tasks=False, affinity_dtype="float32",
                                    retry_rule="released")
    train(strategy, model, torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-6), make_batches(160))
    assert len(calls) == 149
    for i, (affinity, previous, seed, result) in enumerate(calls):
        assert affinity.dtype == torch.float32
        assert partition(result.groups) == released_groups(affinity, TASKS, previous, seed)[0], i
    assert sum(r.kept_previous for *_, r in calls) >= 1 and len({len(r.groups) for *_, r in calls}) > 1


def test_zero_filled_gradients_are_refused():
    class ZeroFill(Updater):
        def zero_grad(self):
            self.optimizer.zero_grad(set_to_none=False)

    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=3)
    updater = ZeroFill(torch.optim.Adam(model.parameters(), lr=0.01))
    with pytest.raises(RuntimeError, match="set gradients to None"):
        train(strategy, model, updater, make_batches(1))


# -- resume -----------------------------------------------------------------------------------------
RELEASED_OPTIONS = {"attribution": "reference", "column_scaling": "released", "freeze_idle_tasks": False,
                    "affinity_dtype": "float32", "retry_rule": "released"}


@pytest.mark.parametrize("options", [{}, RELEASED_OPTIONS])
def test_resume_is_exact(options):
    batches = make_batches(10, seed=2)

    def fresh():
        model = tiny_model(seed=1)
        return model, SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.2, seed=4, history_window=6,
                                           **options), \
            torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-3)

    model, strategy, optimizer = fresh()
    train(strategy, model, optimizer, batches)

    model2, strategy2, optimizer2 = fresh()
    train(strategy2, model2, optimizer2, batches[:5])
    buffer = io.BytesIO()
    torch.save({"model": model2.state_dict(), "optimizer": optimizer2.state_dict(), "strategy": strategy2.state_dict()},
               buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    torch.manual_seed(999)  # a different global RNG state must not matter
    model3, strategy3, optimizer3 = fresh()
    model3.load_state_dict(saved["model"])
    optimizer3.load_state_dict(saved["optimizer"])
    strategy3.load_state_dict(saved["strategy"])
    train(strategy3, model3, optimizer3, batches[5:])

    for (name, p), q in zip(model.named_parameters(), model3.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(strategy.affinity, strategy3.affinity)
    assert strategy.groups == strategy3.groups and strategy.num_steps == strategy3.num_steps == 10
    assert strategy.group_count_changes == strategy3.group_count_changes
    assert torch.equal(strategy.generator.get_state(), strategy3.generator.get_state())
    assert strategy3.history.maxlen == 6 and len(strategy3.history) == 6
    for r, r3 in zip(strategy.history, strategy3.history):
        assert r["order"] == r3["order"] and r["losses"] == r3["losses"] and torch.equal(r["affinity"], r3["affinity"])


def test_unfrozen_resume_needs_the_gradient_record():
    state = SelectiveGroupUpdate(TASKS).state_dict()
    del state["gradient_seen"]
    SelectiveGroupUpdate(TASKS).load_state_dict(state)  # frozen idle tasks do not need it
    with pytest.raises(KeyError, match="gradient_seen"):
        SelectiveGroupUpdate(TASKS, freeze_idle_tasks=False).load_state_dict(state)


def test_load_state_dict_rejects_a_different_task_set():
    state = SelectiveGroupUpdate(TASKS[:3]).state_dict()
    with pytest.raises(ValueError, match=r"affinity \(3, 3\), expected a 4 x 4"):
        SelectiveGroupUpdate(TASKS).load_state_dict(state)


# -- guards -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("nan_at", [0, 3])  # first or last forward pass of the batch
def test_non_finite_loss_raises_and_leaves_state_untouched(nan_at):
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=10, affinity_decay=0.5)
    closure = ScriptedLosses(TASKS, nan_at=4 + nan_at)
    strategy.step(closure, closure.optimizer)
    state = copy.deepcopy({k: v for k, v in strategy.state_dict().items() if k != "rng_state"})
    with pytest.raises(NonFiniteLossError, match=r"tasks \['b'\]"):
        strategy.step(closure, closure.optimizer)
    assert torch.equal(strategy.affinity, state["affinity"]) and torch.isfinite(strategy.affinity).all()
    assert strategy.num_steps == 1 and len(strategy.history) == 1 and strategy.groups == state["groups"]


def test_invalid_self_affinity_keeps_groups_and_warns_once(caplog):
    class FlatTask(ScriptedLosses):  # task d's loss never changes: its self-affinity stays 0
        def __call__(self, task=None):
            losses = super().__call__(task)
            losses["d"] = self.param * 0 + 1.0
            return losses

    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.3)
    closure = FlatTask(TASKS)
    with caplog.at_level(logging.WARNING, logger="mtl_plugins.strategies.sel_update"):
        for _ in range(6):
            strategy.step(closure, closure.optimizer)
    assert strategy.affinity[3, 3] == 0
    assert strategy.groups == [[t] for t in TASKS] and strategy.clustering_failures == 3
    warnings = [r for r in caplog.records if "keeping the previous groups" in r.getMessage()]
    assert len(warnings) == 1 and "self-affinity" in warnings[0].getMessage()
    assert strategy.log_metrics()["clustering_failures"] == 3.0


def test_zero_loss_columns_are_never_updated():
    class ZeroTask(ScriptedLosses):
        def __call__(self, task=None):
            losses = super().__call__(task)
            losses["c"] = self.param * 0
            return losses

    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=4, affinity_decay=0.3)
    closure = ZeroTask(TASKS)
    for _ in range(5):
        strategy.step(closure, closure.optimizer)
    assert strategy.affinity[:, 2].eq(0).all() and strategy.affinity[2, [0, 1, 3]].ne(0).any()


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"attribution": "released"}, TypeError, "attribution"),
    ({"affinity_decay": 0.0}, ValueError, "affinity_decay"),
    ({"warmup_steps": -1}, ValueError, "warmup_steps"),
    ({"history_window": 0}, ValueError, "history_window"),
    ({"attribution": "reference", "measure_last": True}, ValueError, "measure_last"),
    ({"loss_weights": {"a": 0.0}}, ValueError, "positive loss weights"),
    ({"preference": float("nan")}, ValueError, "preference"),
    ({"decay": 0.1}, TypeError, "affinity_decay"),
    ({"column_scaling": "paper"}, TypeError, "column_scaling"),
    ({"affinity_dtype": "float16"}, TypeError, "affinity_dtype"),
    ({"retry_rule": "paper"}, TypeError, "retry_rule"),
])
def test_bad_options_are_named(options, error, match):
    with pytest.raises(error, match=match):
        mtl_plugins.build_strategy("sel_update", TASKS, **options)


def test_float64_losses_keep_their_precision():
    # Decreases of a few 1e-9 vanish in float32: the affinity would stay zero.
    param = nn.Parameter(torch.ones((), dtype=torch.float64))
    optimizer = torch.optim.SGD([param], lr=0.0)
    calls = iter(range(100))

    def closure(task=None):
        loss = 1.0 - 3e-9 * next(calls)
        return {t: param * 0 + loss for t in TASKS}

    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=5, affinity_decay=0.5)
    strategy.step(closure, optimizer)
    assert strategy.history[-1]["losses"][1][0] == 1.0 - 3e-9
    # every group step but the batch's last one is measured (paper attribution)
    assert int((strategy.affinity.diagonal() > 0).sum()) == len(TASKS) - 1


def test_missing_task_loss_is_named():
    closure = ScriptedLosses(TASKS)
    strategy = SelectiveGroupUpdate(TASKS)
    with pytest.raises(KeyError, match=r"\['d'\]"):
        strategy.step(lambda task=None: {t: v for t, v in closure().items() if t != "d"}, closure.optimizer)


# -- cost -------------------------------------------------------------------------------------------
class Tracked(torch.Tensor):
    """Marks tensors derived from model losses; host reads of them are counted."""

    reads: ClassVar[list[tuple[str, tuple[int, ...]]]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "__array__",
                    "__format__", "__repr__"):
            cls.reads.append((name, tuple(args[0].shape)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_one_host_read_of_the_losses_per_batch():
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.2, measure_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for batch in make_batches(5):
        closure = make_closure(model, batch)
        Tracked.reads.clear()
        strategy.step(lambda task=None, c=closure: {t: v.as_subclass(Tracked) for t, v in c(task).items()}, optimizer)
        passes = len(strategy.history[-1]["order"]) + 1
        assert Tracked.reads == [("tolist", (passes, 4))]


# -- reporting --------------------------------------------------------------------------------------
def test_log_metrics_and_plots(tmp_path):
    model = tiny_model()
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=2, affinity_decay=0.2)
    train(strategy, model, torch.optim.Adam(model.parameters(), lr=0.01), make_batches(6))
    metrics = strategy.log_metrics()
    assert metrics["num_groups"] == len(strategy.groups)
    for i, group in enumerate(strategy.groups):
        assert all(metrics[f"group/{t}"] == i for t in group)
    assert metrics["affinity/b->c"] == strategy.affinity[1, 2].item()
    assert all(isinstance(v, float) for v in metrics.values())
    json.dumps(metrics)
    steps, counts = strategy.group_count_series()
    assert steps[0] == 0 and steps[-1] == 5 and counts[:2] == [4, 4]
    written = strategy.write_plots(tmp_path)
    assert [p.name for p in written] == ["sel_update_affinity.png", "sel_update_num_groups.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


def test_quickstart_end_to_end_writes_the_plots(tmp_path, monkeypatch):
    from mtl_plugins.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(["quickstart", "training.max_steps=6", "data.train_size=256", "data.eval_size=64",
                 "training.per_device_train_batch_size=32", "training.logging_steps=2",
                 "strategy.options.warmup_steps=2",
                 "--baselines", "skip", "--no-progress", "--output-dir", str(out)])
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    assert {"sel_update_affinity.png", "sel_update_num_groups.png"} <= set(summary["plots"])
    assert (out / "sel_update_affinity.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("num_groups" in r and "affinity/left->sum" in r for r in records)
    state = torch.load(out / "strategy_state.pt", weights_only=True)
    assert state["num_steps"] == 6 and len(state["history"]) == 6


class PoisonedClosure:
    """``make_closure`` whose losses of ``tasks`` are NaN from forward pass ``nan_at`` on."""

    def __init__(self, model, batch, nan_at, tasks):
        self.inner, self.nan_at, self.tasks, self.calls = make_closure(model, batch), nan_at, tasks, 0

    def __call__(self, task=None):
        losses = dict(self.inner(task))
        if self.calls >= self.nan_at:
            losses.update({t: losses[t] * float("nan") for t in self.tasks})
        self.calls += 1
        return losses


def test_nan_loss_stops_before_the_group_step_and_leaves_the_model_alone():
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=0, affinity_decay=0.5, seed=1)
    batches = make_batches(3)
    train(strategy, model, optimizer, batches[:2])
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    moments = copy.deepcopy(optimizer.state_dict())
    affinity = strategy.affinity.clone()
    with pytest.raises(NonFiniteLossError, match=r"batch 2: non-finite loss for tasks \['a', 'b', 'c', 'd'\] in "
                                                  r"forward pass 0 \(before updating group .*not updated"):
        strategy.step(PoisonedClosure(model, batches[2], nan_at=0, tasks=TASKS), optimizer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, params[k]), k
    assert str(optimizer.state_dict()) == str(moments)
    assert torch.equal(strategy.affinity, affinity) and strategy.num_steps == 2


def test_nan_loss_after_a_group_step_keeps_that_step_only():
    model, reference = tiny_model(), tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = SelectiveGroupUpdate(TASKS, warmup_steps=5, seed=1)  # singleton groups
    batch = make_batches(1)[0]
    order = [TASKS[i] for i in torch.randperm(4, generator=torch.Generator().manual_seed(1)).tolist()]
    with pytest.raises(NonFiniteLossError, match=rf"batch 0: non-finite loss for tasks \['{order[1]}'\] in forward "
                                                  r"pass 1 .*1 earlier group steps of this batch were applied"):
        strategy.step(PoisonedClosure(model, batch, nan_at=1, tasks=[order[1]]), optimizer)
    # the reference takes the first group's step only, by hand
    reference(**batch)["losses"][order[0]].backward()
    with torch.no_grad():
        expected = {n: p - 0.1 * p.grad if p.grad is not None else p for n, p in reference.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, expected[n], rtol=0, atol=1e-7)
    assert strategy.num_steps == 0 and not strategy.history


def test_infinite_gradient_in_a_plain_loop_names_the_group_task():
    model = tiny_model()
    model.heads["c"].weight.register_hook(lambda grad: grad * float("inf"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    strategy = SelectiveGroupUpdate(TASKS)  # singleton groups: c's step comes after 0 to 3 others
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"batch 0, group \['c'\] .*non-finite gradient for tasks \['c'\]"):
        strategy.step(make_closure(model, make_batches(1)[0]), optimizer)
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values()) and strategy.num_steps == 0
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("heads.c"))
