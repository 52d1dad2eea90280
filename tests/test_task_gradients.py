"""Per-task gradients from one forward pass against K task forwards and a plain autograd reference."""

import copy

import pytest
import torch
from host_reads import Tracked, TrackingUpdater, tracked_closure
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.hps import HPS
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies.base import Updater
from mtl_plugins.strategies.task_gradients import split_model_parameters, task_gradients

TASKS = ["a", "b", "c"]
AGGREGATORS = ["pcgrad", "mgda", "imtl", "upgrad", "aligned_mtl", "gradvac", "graddrop", "cagrad", "nash_mtl"]


def bn_model(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh())
    heads = {t: nn.Linear(6, 1) for t in TASKS}
    return HPS(TASKS, encoder=encoder, heads=heads, losses={t: "mse" for t in TASKS}, input_name="x").double()


def batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return {"x": x, **{t: (i + 1.0) * torch.randn(n, generator=g, dtype=torch.float64) for i, t in enumerate(TASKS)}}


def reference(model, data, weights):
    """Each task's gradient by its own forward and plain autograd: (J of the encoder, task -> head grads)."""
    shared = list(model.encoder.parameters())
    rows, heads = [], {}
    for t in TASKS:
        loss = weights[t] * model(**data, task=t).losses[t]
        grads = torch.autograd.grad(loss, shared + list(model.heads[t].parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        heads[t] = grads[len(shared):]
    return torch.stack(rows), heads


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("one_forward", [True, False])
def test_one_forward_gradients_equal_task_forwards(train, one_forward):
    model, data, weights = bn_model(), batch(), {"a": 1.0, "b": 0.5, "c": 2.0}
    with torch.no_grad():  # non-trivial running statistics, so eval mode uses them
        model.encoder[1].running_mean.uniform_(-1, 1)
        model.encoder[1].running_var.uniform_(0.5, 2)
    model.train(train)
    expected_J, expected_heads = reference(copy.deepcopy(model), data, weights)
    shared, specific = split_model_parameters(model, "test")
    updater = Updater(torch.optim.SGD(model.parameters(), lr=0.1))
    before = model.encoder[1].running_mean.clone()
    grads = task_gradients(make_closure(model, data), updater, TASKS, weights, shared, specific, one_forward=one_forward)
    torch.testing.assert_close(grads.jacobian, expected_J, rtol=1e-12, atol=1e-12)
    by_param = {id(p): g for p, g in zip(specific, grads.specific)}
    for t in TASKS:
        for p, g in zip(model.heads[t].parameters(), expected_heads[t]):
            torch.testing.assert_close(by_param[id(p)], g, rtol=1e-12, atol=1e-12)
    bn = model.encoder[1]
    if train:  # BatchNorm statistics: one momentum update per batch on the one-forward path
        expected_passes = 1 if one_forward else len(TASKS)
        assert int(bn.num_batches_tracked) == expected_passes
        features = data["x"] @ model.encoder[0].weight.T + model.encoder[0].bias
        once = 0.9 * before + 0.1 * features.mean(0)
        if one_forward:
            torch.testing.assert_close(bn.running_mean, once.detach(), rtol=1e-12, atol=1e-12)
        else:
            assert not torch.allclose(bn.running_mean, once.detach())
    else:
        assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("name", AGGREGATORS + ["gradnorm"])
def test_each_step_reads_the_host_once(name):
    model = bn_model()
    strategy = mtl_plugins.build_strategy(name, TASKS, model=model)
    updater = TrackingUpdater(torch.optim.SGD(model.parameters(), lr=0.05))
    for step in range(2):
        passes = []
        model.register_forward_hook(lambda *args, p=passes: p.append(1)) if step == 0 else None
        Tracked.reads.clear()
        strategy.step(tracked_closure(make_closure(model, batch(seed=step))), updater)
        assert len(Tracked.reads) == 1 and Tracked.reads[0][0] == "tolist", Tracked.reads
        if step == 0:
            assert len(passes) == 1  # one forward pass for every task's gradient
    assert int(model.encoder[1].num_batches_tracked) == 2


@pytest.mark.parametrize("name, options", [("ew", {}), ("uw", {}), ("gls", {}), ("rlw", {}),
                                           ("dwa", {"steps_per_epoch": 1}), ("conn_strength", {"schedule": "phase1"}),
                                           ("conn_strength", {"schedule": "phase2"})])
def test_weightings_and_conn_strength_read_the_host_once(name, options):
    model = bn_model()
    if name == "conn_strength":
        mtl_plugins.build_architecture("task_connections", TASKS, model=model)
        options = {**options, "model": model}
    strategy = mtl_plugins.build_strategy(name, TASKS, **options)
    updater = TrackingUpdater(torch.optim.SGD(model.parameters(), lr=0.05))
    for step in range(3):
        Tracked.reads.clear()
        strategy.step(tracked_closure(make_closure(model, batch(seed=step))), updater)
        assert len(Tracked.reads) == 1 and Tracked.reads[0][0] == "tolist", Tracked.reads
