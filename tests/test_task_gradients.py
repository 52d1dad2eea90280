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
from mtl_plugins.strategies.rep_gradients import shared_encoder
from mtl_plugins.strategies.task_gradients import JacobianBuffer, split_model_parameters, task_gradients

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



def test_the_jacobian_buffer_is_reused_across_batches_and_overwritten_each_time():
    """Every batch's Jacobian equals the reference of that batch although the storage is the same."""
    model, weights = bn_model(), {"a": 1.0, "b": 0.5, "c": 2.0}
    shared, specific = split_model_parameters(model, "test")
    updater = Updater(torch.optim.SGD(model.parameters(), lr=0.1))
    buffer, pointers = JacobianBuffer(), set()
    for seed in range(3):
        data = batch(seed)
        expected, _ = reference(copy.deepcopy(model), data, weights)
        grads = task_gradients(make_closure(model, data), updater, TASKS, weights, shared, specific, buffer=buffer)
        torch.testing.assert_close(grads.jacobian, expected, rtol=1e-12, atol=1e-12)
        pointers.add(grads.jacobian.data_ptr())
        grads.jacobian.fill_(float("nan"))  # what a step leaves in it must not reach the next batch
    assert len(pointers) == 1


def test_the_jacobian_buffer_follows_the_shape_and_dtype_and_is_kept_on_cpu_only():
    buffer, cpu = JacobianBuffer(), torch.empty(1)
    first = buffer.rows(cpu, 3, 10, torch.float32)
    assert buffer.rows(cpu, 3, 10, torch.float32) is first
    wider = buffer.rows(cpu, 3, 11, torch.float32)
    assert wider.shape == (3, 11) and buffer.rows(cpu, 3, 11, torch.float32) is wider
    assert buffer.rows(cpu, 3, 11, torch.float64).dtype == torch.float64 and buffer.matrix.dtype == torch.float64
    other, meta = JacobianBuffer(), torch.empty(1, device="meta")  # stands for a caching-allocator device
    assert other.rows(meta, 3, 10, torch.float32) is not other.rows(meta, 3, 10, torch.float32)
    assert other.matrix is None


@pytest.mark.parametrize("name", [*AGGREGATORS, "gradnorm"])
def test_the_gradients_a_step_leaves_are_not_overwritten_by_the_next_batch(name):
    """``p.grad`` after a step (what a deferred optimizer step or the user reads) is no view of the
    Jacobian the strategy keeps and overwrites at the next batch."""
    model = bn_model()
    strategy = mtl_plugins.build_strategy(name, TASKS, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    left = []
    for seed in range(3):
        strategy.step(make_closure(model, batch(seed)), optimizer)
        grads = [p.grad for p in model.encoder.parameters()]
        left.append((grads, [g.clone() for g in grads]))
    assert strategy.jacobian_buffer.matrix is not None
    for grads, values in left:
        for g, value in zip(grads, values):
            torch.testing.assert_close(g, value, rtol=0, atol=0)


@pytest.mark.parametrize("coefficients", [None, [0.5, -1.0, 3.0]])
def test_a_task_specific_parameter_reached_by_several_tasks_gets_their_weighted_sum(coefficients):
    model, data, weights = bn_model(), batch(), {"a": 1.0, "b": 0.5, "c": 2.0}
    model.heads["c"] = model.heads["a"]  # one head serves tasks a and c: task-specific, reached twice
    shared, specific = split_model_parameters(model, "test")
    _, expected_heads = reference(copy.deepcopy(model), data, weights)
    c = coefficients or [1.0] * len(TASKS)
    updater = Updater(torch.optim.SGD(model.parameters(), lr=0.1))
    grads = task_gradients(make_closure(model, data), updater, TASKS, weights, shared, specific, coefficients)
    by_param = {id(p): g for p, g in zip(specific, grads.specific)}
    for i, p in enumerate(model.heads["a"].parameters()):
        expected = c[0] * expected_heads["a"][i] + c[2] * expected_heads["c"][i]
        torch.testing.assert_close(by_param[id(p)], expected, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # every gradient is held by the result only

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
    """One read of the losses; in a plain loop (no updater checks the gradient) one more per step taken
    for the gradient check, except ``ew``, which reads its loss and gradient norm together."""
    model = bn_model()
    if name == "conn_strength":
        mtl_plugins.build_architecture("task_connections", TASKS, model=model)
        options = {**options, "model": model}
    strategy = mtl_plugins.build_strategy(name, TASKS, **options)
    updater = TrackingUpdater(torch.optim.SGD(model.parameters(), lr=0.05))
    for step in range(3):
        Tracked.reads.clear()
        strategy.step(tracked_closure(make_closure(model, batch(seed=step))), updater)
        checks = 0 if name == "ew" else len(TASKS) if options.get("schedule") == "phase1" else 1
        assert sorted(kind for kind, _ in Tracked.reads) == ["__float__"] * checks + ["tolist"], Tracked.reads


# -- batched Jacobian --------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 2.0**10])
def test_batched_jacobian_equals_the_reference_and_is_unscaled(scale):
    from scaled_updater import ScaledUpdater

    model, data, weights = bn_model(), batch(), {"a": 1.0, "b": 0.5, "c": 2.0}
    expected_J, expected_heads = reference(copy.deepcopy(model), data, weights)
    shared, specific = split_model_parameters(model, "test")
    updater = ScaledUpdater(torch.optim.SGD(model.parameters(), lr=0.1), scale)
    grads = task_gradients(make_closure(model, data), updater, TASKS, weights, shared, specific, batched=True)
    torch.testing.assert_close(grads.jacobian, expected_J, rtol=1e-12, atol=1e-12)
    by_param = {id(p): g for p, g in zip(specific, grads.specific)}
    for t in TASKS:
        for p, g in zip(model.heads[t].parameters(), expected_heads[t]):
            torch.testing.assert_close(by_param[id(p)], g, rtol=1e-12, atol=1e-12)
    assert int(model.encoder[1].num_batches_tracked) == 1


@pytest.mark.parametrize("name", ["pcgrad", "cagrad", "nash_mtl", "gradnorm"])
def test_batched_and_loop_strategies_take_the_same_steps(name):
    models = []
    for jacobian in ("loop", "batched"):
        model = bn_model()
        strategy = mtl_plugins.build_strategy(name, TASKS, model=model, jacobian=jacobian)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for step in range(3):
            strategy.step(make_closure(model, batch(seed=step)), optimizer)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_batched_jacobian_is_refused_with_task_connections():
    model = bn_model()
    mtl_plugins.build_architecture("task_connections", TASKS, model=model)
    strategy = mtl_plugins.build_strategy("pcgrad", TASKS, model=model, jacobian="batched")
    with pytest.raises(ValueError, match="jacobian='batched' needs one forward pass"):
        strategy.step(make_closure(model, batch()), torch.optim.SGD(model.parameters(), lr=0.1))


# -- representation gradients ------------------------------------------------------------------------
def rep_model(seed=0, tasks=("a", "b")):
    torch.manual_seed(seed)
    heads = {t: nn.Linear(3, 1) for t in tasks}
    return HPS(list(tasks), encoder=nn.Sequential(nn.Linear(4, 3), nn.Tanh()), heads=heads,
               losses={t: "mse" for t in tasks}, input_name="x").double()


class RecordingUpdater(Updater):
    """Keeps a copy of the gradients the step applies."""

    def step(self, final=False):
        self.applied = {id(p): p.grad.clone() for p in self.params if p.grad is not None}
        return super().step(final)


def test_rep_grad_mgda_matches_a_hand_computed_representation_space_step():
    model, data = rep_model(), batch()
    data = {k: v for k, v in data.items() if k in ("x", "a", "b")}
    data["b"] = -3.0 * data["b"]  # conflicting tasks, so MGDA's weight is strictly inside (0, 1)
    reference_model = copy.deepcopy(model)
    z = reference_model.encoder(data["x"])
    leaf = z.detach().requires_grad_(True)
    per_sample = [torch.autograd.grad(nn.functional.mse_loss(reference_model.heads[t](leaf).squeeze(-1), data[t]), leaf)[0]
                  for t in ("a", "b")]
    s1, s2 = (g.sum(0) for g in per_sample)  # LibMTL: weights from the batch-summed representation gradients
    gamma = float(((s2 - s1) @ s2) / ((s1 - s2) @ (s1 - s2)))  # two-task min-norm point
    assert 0 < gamma < 1
    combined = gamma * per_sample[0] + (1 - gamma) * per_sample[1]
    expected = torch.autograd.grad(z, list(reference_model.encoder.parameters()), grad_outputs=combined)
    strategy = mtl_plugins.build_strategy("mgda", ["a", "b"], model=model, rep_grad=True)
    updater = RecordingUpdater(torch.optim.SGD(model.parameters(), lr=0.1))
    strategy.step(make_closure(model, data), updater)
    torch.testing.assert_close(strategy.last_weights, torch.tensor([gamma, 1 - gamma], dtype=torch.float64),
                               rtol=1e-6, atol=1e-8)
    for p, g in zip(model.encoder.parameters(), expected):
        torch.testing.assert_close(updater.applied[id(p)], g, rtol=1e-6, atol=1e-9)
    for t in ("a", "b"):  # heads: their own task's gradient
        head_grads = torch.autograd.grad(reference_model(**data, task=t).losses[t], list(reference_model.heads[t].parameters()))
        for p, g in zip(model.heads[t].parameters(), head_grads):
            torch.testing.assert_close(updater.applied[id(p)], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mgda", "imtl", "aligned_mtl", "graddrop"])
def test_rep_grad_steps_do_not_depend_on_the_loss_scale(name):
    from scaled_updater import ScaledUpdater

    results = []
    for scale in (1.0, 2.0**12):
        model = bn_model()
        strategy = mtl_plugins.build_strategy(name, TASKS, model=model, rep_grad=True, seed=3)
        updater = ScaledUpdater(torch.optim.SGD(model.parameters(), lr=0.05), scale)
        for step in range(3):
            strategy.step(make_closure(model, batch(seed=step)), updater)
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_rep_grad_graddrop_keeps_one_sign_per_feature():
    model = rep_model(tasks=TASKS)
    data = batch()
    strategy = mtl_plugins.build_strategy("graddrop", TASKS, model=model, rep_grad=True, seed=5)
    z = model.encoder(data["x"]).detach()
    leaf = z.clone().requires_grad_(True)
    per_sample = torch.stack([torch.autograd.grad(nn.functional.mse_loss(model.heads[t](leaf).squeeze(-1), data[t]), leaf)[0]
                              for t in TASKS])
    combined = strategy.aggregate_representation(per_sample, None, z)
    signed = (per_sample * z.sign()).sum(1)
    for f in range(z.shape[1]):  # each feature keeps the tasks of one sign of the signed batch sum
        positive = [k for k in range(len(TASKS)) if signed[k, f] > 0]
        negative = [k for k in range(len(TASKS)) if signed[k, f] < 0]
        options = [per_sample[positive, :, f].sum(0), per_sample[negative, :, f].sum(0)]
        assert any(torch.allclose(combined[:, f], o) for o in options), f


def test_rep_grad_is_offered_where_libmtl_offers_it():
    model = rep_model()
    for name in ("pcgrad", "cagrad", "gradvac", "nash_mtl", "upgrad"):
        with pytest.raises(TypeError, match="has no option 'rep_grad'"):
            mtl_plugins.build_strategy(name, ["a", "b"], model=model, rep_grad=True)
    with pytest.raises(TypeError, match="needs a model with an `encoder`"):
        shared_encoder(nn.Linear(2, 2), "mgda")
