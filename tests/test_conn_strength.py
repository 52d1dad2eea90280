import copy
import io
import json

import pytest
import torch
import torch.distributed as dist
from gloo_group import gloo_group
from torch import nn

import mtl_plugins
from mtl_plugins.architectures import HPS
from mtl_plugins.architectures.task_connections import TaskBatchNorm
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies.base import Updater
from mtl_plugins.strategies.conn_strength import combine_task_gradients, priority_shares

TASKS = ["a", "b", "c", "d"]


# -- an independent float64 implementation of the spec, step by step ------------------------------


def reference_layer(grads, strength):
    """Spec, Phase 2 step 2, for one layer: loops over tasks and channels. Returns (gradient, #projections)."""
    num_tasks, channels = strength.shape
    top = [max(range(num_tasks), key=lambda t: (strength[t, p].item(), -t)) for p in range(channels)]
    if len(set(top)) == 1:  # degenerate: plain sum
        return sum(grads[t] for t in range(num_tasks)), 0
    g = [grads[t].clone() for t in range(num_tasks)]
    projections = 0
    for i in range(num_tasks):
        rows = [p for p in range(channels) if top[p] == i]
        if not rows:
            continue
        gi = g[i][rows].flatten()
        norm2 = float(gi @ gi)
        if norm2 == 0.0:
            continue
        for j in range(num_tasks):
            if j == i:
                continue
            gj = g[j][rows].flatten()
            dot = float(gi @ gj)
            if dot < 0:
                g[j][rows] = (gj - dot / norm2 * gi).reshape(g[j][rows].shape)
                projections += 1
    return sum(g), projections


def reference_strength(weight, norms):
    """S^_p^tau = gamma^2/(var+1e-5) sum_q W[p,q]^2, normalised over channels (one row per norm)."""
    weight = weight.detach().double()
    s = torch.stack([(weight[p] ** 2).sum() for p in range(weight.shape[0])])
    rows = []
    for norm in norms:
        raw = norm.weight.detach().double() ** 2 / (norm.running_var.double() + 1e-5) * s
        rows.append(raw / raw.sum())
    return torch.stack(rows)


@pytest.mark.parametrize("num_tasks", [2, 3, 5])
def test_combination_matches_the_spec_on_random_gradients(num_tasks):
    g = torch.Generator().manual_seed(num_tasks)
    for trial in range(6):
        channels = 7
        grads = torch.randn(num_tasks, channels, 3, 2, 2, dtype=torch.float64, generator=g)
        grads[1] = -0.7 * grads[0] + 0.3 * grads[1]  # strong conflicts between tasks 0 and 1
        strength = torch.rand(num_tasks, channels, dtype=torch.float64, generator=g)
        if trial == 1:  # zero-norm group: task 0's gradient vanishes on its own channels
            grads[0][strength.argmax(0) == 0] = 0.0
        if trial == 2:  # a task without channels (empty group)
            strength[-1] = -1.0
        expected, projections = reference_layer(grads, strength)
        got = combine_task_gradients(grads, strength)
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)
        if trial == 0:
            assert projections > 0 and not torch.allclose(got, grads.sum(0))


def test_degenerate_priority_is_the_plain_sum():
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 5, 4, dtype=torch.float64, generator=g)
    grads[2] = -grads[0]
    strength = torch.rand(3, 5, dtype=torch.float64, generator=g)
    strength[1] += 2.0  # task 1 is the top task of every channel
    assert torch.equal(combine_task_gradients(grads, strength), grads.sum(0))
    strength[0, 0] = 10.0  # one channel to task 0: the layer is no longer degenerate
    got = combine_task_gradients(grads, strength)
    assert torch.allclose(got, reference_layer(grads, strength)[0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got, grads.sum(0))


def test_exact_ties_give_the_channel_to_the_lowest_task_index():
    # 5 tasks with exact ties of 2 to 5 tasks on every channel: the top task is the lowest tied index
    # (the reference's rule), whatever the device's argmax or topk would pick.
    g = torch.Generator().manual_seed(4)
    grads = torch.randn(5, 12, 3, dtype=torch.float64, generator=g)
    grads[2] = -0.8 * grads[1] + 0.2 * grads[2]
    strength = torch.rand(5, 12, dtype=torch.float64, generator=g)
    for p in range(12):
        tied = torch.randperm(5, generator=g)[: 2 + p % 4]
        strength[tied, p] = 1.5
    expected, projections = reference_layer(grads, strength)
    assert projections > 0
    assert torch.allclose(combine_task_gradients(grads, strength), expected, rtol=1e-12, atol=1e-12)
    top = [min(t for t in range(5) if strength[t, p] == 1.5) for p in range(12)]
    assert priority_shares(strength).tolist() == [top.count(t) / 12 for t in range(5)]


def incomplete_norm_model():
    """make_model with a BatchNorm without affine parameters after the first conv."""
    torch.manual_seed(2)
    encoder = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                            nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    heads = {t: nn.Linear(8, 3 if t in ("b", "d") else 1) for t in TASKS}
    losses = {t: "cross_entropy" if t in ("b", "d") else "mse" for t in TASKS}
    model = HPS(TASKS, encoder=encoder, heads=heads, losses=losses).double()
    mtl_plugins.build_architecture("task_connections", TASKS, model=model)
    g = torch.Generator().manual_seed(2)
    for norm in [*model.encoder[1].norms.values(), *model.encoder[4].norms.values()]:  # per-task values
        c = norm.num_features
        norm.running_var = torch.rand(c, generator=g, dtype=torch.float64) + 0.3
        if norm.weight is not None:
            norm.weight.data = torch.randn(c, generator=g, dtype=torch.float64)
    return model


@pytest.mark.parametrize("incomplete_norms", ["extend", "released"])
def test_norms_without_affine_parameters(incomplete_norms):
    # extend: strength with gamma = 1 and projection; released: the released core finds no BatchNorm
    # weight by name, so that conv gets the plain sum of the task gradients.
    model = incomplete_norm_model()
    batch = make_batch(2, dtype=torch.float64)
    per_task = per_task_reference(model, batch)
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="phase2",
                                          incomplete_norms=incomplete_norms)
    updater = Recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    strategy.step(make_closure(model, batch), updater)
    got = updater.grads[0]
    for name, norm in (("encoder.0.weight", model.encoder[1]), ("encoder.3.weight", model.encoder[4])):
        grads = torch.stack([per_task[t][name] for t in TASKS])
        weight = dict(model.named_parameters())[name].detach()
        s = torch.stack([(weight[p] ** 2).sum() for p in range(weight.shape[0])])
        rows = []
        for t in TASKS:
            n = norm.norms[t]
            gamma2 = n.weight.detach() ** 2 if n.weight is not None else torch.ones_like(s)
            raw = gamma2 / (n.running_var + 1e-5) * s
            rows.append(raw / raw.sum())
        projected, projections = reference_layer(grads, torch.stack(rows))
        assert projections > 0, name
        plain = incomplete_norms == "released" and name == "encoder.0.weight"
        expected = grads.sum(0) if plain else projected
        assert torch.allclose(got[name], expected, rtol=1e-10, atol=1e-12), name
        assert not torch.allclose(got[name], projected if plain else grads.sum(0)), name


def test_combination_rejects_mismatched_strength():
    with pytest.raises(ValueError, match=r"strength must have shape \(2, 3\)"):
        combine_task_gradients(torch.zeros(2, 3, 4), torch.zeros(3, 2))


# -- the strategy on a converted model -----------------------------------------------------------------


class Recorder(Updater):
    """Records the gradients at each optimizer step and how the strategy drives the updater."""

    def __init__(self, optimizer, model):
        super().__init__(optimizer)
        self.model = model
        self.calls: list = []
        self.grads: list[dict[str, torch.Tensor]] = []
        self.states: list[dict[str, torch.Tensor]] = []

    def zero_grad(self):
        self.calls.append("zero_grad")
        super().zero_grad()

    def backward(self, loss):
        self.calls.append("backward")
        super().backward(loss)

    def step(self, final=False):
        self.calls.append(("step", final))
        self.grads.append({n: (p.grad.clone() if p.grad is not None else None) for n, p in self.model.named_parameters()})
        applied = super().step(final)
        self.states.append({k: v.clone() for k, v in self.model.state_dict().items()})
        return applied


def make_model(dtype=torch.float32, seed=0, tasks=TASKS):
    torch.manual_seed(seed)
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    encoder = nn.Sequential(block(2, 6), block(6, 8), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(32, 10), nn.BatchNorm1d(10), nn.Tanh())
    heads = {t: nn.Linear(10, 3 if t in ("b", "d") else 1) for t in tasks}
    losses = {t: "cross_entropy" if t in ("b", "d") else "mse" for t in tasks}
    model = HPS(tasks, encoder=encoder, heads=heads, losses=losses).to(dtype)
    mtl_plugins.build_architecture("task_connections", tasks, model=model)
    return model


def make_batch(seed=1, n=6, dtype=torch.float32, tasks=TASKS):
    g = torch.Generator().manual_seed(seed)
    batch = {"pixel_values": torch.randn(n, 2, 5, 5, generator=g, dtype=dtype)}
    for t in tasks:
        batch[t] = torch.randint(0, 3, (n,), generator=g) if t in ("b", "d") else torch.randn(n, generator=g, dtype=dtype)
    return batch


def randomize_connections(model, seed):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, TaskBatchNorm):
            for norm in m.norms.values():
                c = norm.num_features
                norm.weight.data = (torch.rand(c, generator=g, dtype=norm.weight.dtype) + 0.2) * torch.where(
                    torch.rand(c, generator=g) < 0.5, -1.0, 1.0).to(norm.weight.dtype)
                norm.bias.data = torch.randn(c, generator=g, dtype=norm.bias.dtype)
                norm.running_var = torch.rand(c, generator=g, dtype=norm.running_var.dtype) + 0.3
                norm.running_mean = torch.randn(c, generator=g, dtype=norm.running_mean.dtype) * 0.1


#: (conv weight, per-task norm) pairs of make_model, written out by hand for the reference.
PAIRS = [("encoder.0.0.weight", (0, 1)), ("encoder.1.0.weight", (1, 1)), ("encoder.4.weight", (5,))]


def norms_of(model, path):
    module = model.encoder[path[0]] if len(path) == 1 else model.encoder[path[0]][path[1]]
    return module


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phase2_gradient_matches_a_float64_reference(seed):
    model = make_model(torch.float64, seed=seed)
    randomize_connections(model, seed)
    weights = {"a": 1.0, "b": 0.7, "c": 1.3, "d": 0.0}  # task d's gradient is zero everywhere
    with torch.no_grad():
        # layer 0: task d on top of half the channels (a zero-norm group)
        model.encoder[0][1].norms["d"].weight[:3] = 5.0
        # layer 2 (linear): identical strengths for all tasks (frozen statistics), so the first task
        # is the top task of every channel: the degenerate case
        for t in TASKS:
            model.encoder[5].norms[t].load_state_dict(model.encoder[5].norms["a"].state_dict())
            model.encoder[5].norms[t].momentum = 0.0
    batch = make_batch(seed, dtype=torch.float64)
    reference = copy.deepcopy(model)

    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="phase2", loss_weights=weights)
    updater = Recorder(torch.optim.SGD(model.parameters(), lr=0.1), model)
    losses = strategy.step(make_closure(model, batch), updater)
    assert strategy.last_phase == 2
    assert updater.calls == ["zero_grad"] + ["backward"] * 4 + [("step", True)]
    got = updater.grads[0]

    # reference: per-task gradients by autograd, one forward per task (same order, same BN statistics)
    params = dict(reference.named_parameters())
    per_task = {}
    for t in TASKS:
        out = reference(**batch, task=t)
        assert out.losses[t].item() == pytest.approx(losses[t], rel=1e-6)  # reported as float32
        g = torch.autograd.grad(weights[t] * out.losses[t], list(params.values()), allow_unused=True)
        per_task[t] = {n: torch.zeros_like(p) if gi is None else gi for (n, p), gi in zip(params.items(), g)}
    expected = {n: sum(per_task[t][n] for t in TASKS) for n in params}
    projections = {}
    for name, path in PAIRS:
        norm = norms_of(reference, path)
        strength = reference_strength(params[name], [norm.norms[t] for t in TASKS])
        expected[name], projections[name] = reference_layer(torch.stack([per_task[t][name] for t in TASKS]), strength)
    top0 = reference_strength(params["encoder.0.0.weight"], [reference.encoder[0][1].norms[t] for t in TASKS]).argmax(0)
    assert (top0 == 3).any()  # the zero-gradient task owns channels of layer 0
    assert projections["encoder.4.weight"] == 0  # degenerate layer
    assert projections["encoder.0.0.weight"] + projections["encoder.1.0.weight"] > 0
    for n in params:
        assert got[n] is not None, n
        assert torch.allclose(got[n], expected[n], rtol=1e-10, atol=1e-12), n
    assert any(not torch.allclose(got[n], sum(per_task[t][n] for t in TASKS)) for n, _ in PAIRS)  # projected


class ReducingRecorder(Updater):
    """Records every ``reduce_`` (the tensors, cloned) and scales the tensors by ``factor`` in place."""

    def __init__(self, optimizer, averages_gradients, factor=0.5):
        super().__init__(optimizer)
        self.averages_gradients, self.factor = averages_gradients, factor
        self.reduced: list[list[torch.Tensor]] = []
        self.grads: dict[str, torch.Tensor] = {}

    def reduce_(self, tensors):
        self.reduced.append([t.clone() for t in tensors])
        for t in tensors:
            t.mul_(self.factor)

    def step(self, final=False):
        self.grads = {id(p): p.grad.clone() for p in self.params if p.grad is not None}
        return super().step(final)


def per_task_reference(model, batch):
    """Each task's float64 gradient of every parameter, by autograd on a copy (same BN statistics)."""
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    grads = {}
    for t in TASKS:
        g = torch.autograd.grad(reference(**batch, task=t).losses[t], list(params.values()), allow_unused=True)
        grads[t] = {n: torch.zeros_like(p) if gi is None else gi for (n, p), gi in zip(params.items(), g)}
    return grads


@pytest.mark.parametrize("averages_gradients", [False, True])
def test_phase2_reduces_the_gradients_it_reads_unless_backward_averaged_them(averages_gradients):
    model = make_model(torch.float64, seed=3)
    randomize_connections(model, 3)
    batch = make_batch(3, dtype=torch.float64)
    per_task = per_task_reference(model, batch)
    plain = copy.deepcopy(model)
    plain_updater = ReducingRecorder(torch.optim.SGD(plain.parameters(), lr=0.1), averages_gradients=True)
    mtl_plugins.build_strategy("conn_strength", TASKS, model=plain, schedule="phase2").step(
        make_closure(plain, batch), plain_updater)

    updater = ReducingRecorder(torch.optim.SGD(model.parameters(), lr=0.1), averages_gradients)
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="phase2")
    strategy.step(make_closure(model, batch), updater)
    unreduced = [plain_updater.grads[id(p)] for p in plain.parameters()]
    got = [updater.grads[id(p)] for p in model.parameters()]
    if averages_gradients:
        assert updater.reduced == []
        for g, expected in zip(got, unreduced):
            assert torch.equal(g, expected)
        return
    assert len(updater.reduced) == 1
    [tensors] = updater.reduced
    for tensor, (name, _) in zip(tensors, PAIRS):  # first the connected layers' per-task gradients [K, C, D]
        expected = torch.stack([per_task[t][name].reshape(per_task[t][name].shape[0], -1) for t in TASKS])
        assert torch.allclose(tensor, expected, rtol=1e-10, atol=1e-12), name
    connected = {id(layer.weight) for layer in strategy.layers}
    others = [p for p in model.parameters() if id(p) not in connected]
    assert len(tensors) == len(PAIRS) + len(others)
    names = {id(p): n for n, p in model.named_parameters()}
    for tensor, p in zip(tensors[len(PAIRS):], others):  # then every other parameter's summed gradient
        expected = sum(per_task[t][names[id(p)]] for t in TASKS)
        assert torch.allclose(tensor, expected, rtol=1e-10, atol=1e-12), names[id(p)]
    # the step uses the reduced gradients: halved everywhere (the combination is scale-equivariant)
    for g, expected in zip(got, unreduced):
        assert torch.allclose(g, 0.5 * expected, rtol=1e-10, atol=1e-14)
    assert any(not torch.allclose(g, expected) for g, expected in zip(got, unreduced))


class AllReduceUpdater(Updater):
    """Plain backward per process; ``reduce_`` averages across processes (gloo)."""

    def reduce_(self, tensors):
        for t in tensors:
            dist.all_reduce(t)
            t /= dist.get_world_size()


def frozen_statistics_model():
    """make_model with BatchNorm running statistics that stay put: a plain loop does not sync buffers,
    and the connection strength reads the running variances."""
    model = make_model(seed=5)
    randomize_connections(model, 5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.0
    return model


def _ddp_phase2_worker(rank, world_size, init_file, out_dir, steps):
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, init_file):
        model = frozen_statistics_model()
        strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="phase2")
        updater = AllReduceUpdater(torch.optim.Adam(model.parameters(), lr=0.05))
        for step in range(steps):
            strategy.step(make_closure(model, make_batch(seed=100 * step + rank)), updater)
        torch.save([p.detach() for p in model.parameters()], f"{out_dir}/rank{rank}.pt")


@pytest.mark.slow
def test_phase2_keeps_processes_identical_with_a_reducing_updater(tmp_path):
    steps, world_size = 3, 2
    torch.multiprocessing.spawn(_ddp_phase2_worker, nprocs=world_size, join=True,
                                args=(world_size, str(tmp_path / "init"), str(tmp_path), steps))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for p, q in zip(*ranks):
        assert torch.equal(p, q)
    alone = frozen_statistics_model()  # rank 0's batches only: the other rank's data must have counted
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=alone, schedule="phase2")
    optimizer = torch.optim.Adam(alone.parameters(), lr=0.05)
    for step in range(steps):
        strategy.step(make_closure(alone, make_batch(seed=100 * step)), optimizer)
    assert any(not torch.allclose(p, q) for p, q in zip(ranks[0], alone.parameters()))


def snapshot_task(state, task):
    return {k: v for k, v in state.items() if f"heads.{task}." in k or f"norms.{task}." in k}


def test_phase1_updates_one_task_at_a_time():
    model = make_model()
    randomize_connections(model, 4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    warm = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="phase2")
    warm.step(make_closure(model, make_batch(3)), optimizer)  # every parameter now has Adam momentum
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="phase1")
    updater = Recorder(optimizer, model)
    seen = []
    closure = make_closure(model, make_batch(5))
    strategy.step(lambda task=None: seen.append(task) or closure(task), updater)
    assert strategy.last_phase == 1 and seen == TASKS
    assert updater.calls == ["zero_grad", "backward", ("step", False)] * 3 + ["zero_grad", "backward", ("step", True)]
    for k, task in enumerate(TASKS):
        prior = updater.states[k - 1] if k else before
        now = updater.states[k]
        for other in TASKS:  # heads, per-task norms and their running statistics
            changed = [n for n, v in snapshot_task(now, other).items() if not torch.equal(v, prior[n])]
            if other == task:
                assert changed, f"task {task}'s head and connections should move at its own step"
            else:
                assert not changed, f"the step of task {task} changed task {other}: {changed}"
        assert not torch.equal(now["encoder.0.0.weight"], prior["encoder.0.0.weight"])  # shared layers move


@pytest.mark.parametrize("schedule", ["phase1", "phase2"])
def test_infinite_gradient_in_a_plain_loop_stops_before_the_step_naming_the_task(schedule):
    """No checking updater: Phase 1 stops at the bad task's own step (earlier tasks' steps stay, and the
    error says so); Phase 2 stops before its one step, the model untouched."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule=schedule)
    bad = TASKS[1]
    hook = model.heads[bad].weight.register_hook(lambda grad: grad * float("inf"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = (rf"non-finite gradient for tasks \['{bad}'\]: its Phase 1 step was not taken and the Phase 1 steps "
               rf"of \['{TASKS[0]}'\] earlier in this batch were taken" if schedule == "phase1" else
               rf"non-finite gradient for tasks \['{bad}'\]: the optimizer step was not taken and the model was not "
               r"updated")
    with pytest.raises(FloatingPointError, match="conn_strength: " + message) as raised:
        strategy.step(make_closure(model, make_batch(5)), optimizer)
    hook.remove()
    assert raised.value.tasks == [bad]
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    moved = [n for n, v in after.items() if not torch.equal(v, before[n])]
    if schedule == "phase2":
        assert not [n for n in moved if "running" not in n and "num_batches" not in n]  # the naming pass updates BN stats
    else:
        assert "encoder.0.0.weight" in moved and not [n for n in moved if n.startswith(f"heads.{bad}.")]


def test_mixing_schedule_runs_phase2_with_probability_progress():
    model = make_model()
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, seed=3)
    for progress in (0.0, 0.25, 0.7):
        strategy.set_progress(progress)
        phases = [strategy.choose_phase() for _ in range(4000)]
        fraction = phases.count(2) / len(phases)
        assert abs(fraction - progress) < 4 * (progress * (1 - progress) / 4000) ** 0.5 + 1e-9
    sequential = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="sequential", switch_point=0.4)
    for progress, phase in ((0.0, 1), (0.39, 1), (0.4, 2), (0.9, 2)):
        sequential.set_progress(progress)
        assert sequential.choose_phase() == phase


def test_epoch_draw_keeps_one_phase_per_epoch():
    model = make_model()
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, draw="epoch", seed=1)
    strategy.set_progress(0.5)
    with pytest.raises(ValueError, match="draw='epoch' needs the current epoch"):
        strategy.choose_phase()
    epochs, per_epoch, counts = 400, 5, [0] * 4
    for e in range(epochs):
        phases = set()
        for b in range(per_epoch):
            strategy.set_progress((e * per_epoch + b) / (epochs * per_epoch), epoch=e)
            phases.add(strategy.choose_phase())
        assert len(phases) == 1
        counts[e * 4 // epochs] += phases.pop() == 2
    # the epoch's threshold is e/E at its first batch: Phase 2 fraction rises with the epochs
    expected = [0.125, 0.375, 0.625, 0.875]
    assert all(abs(c / (epochs // 4) - x) < 0.15 for c, x in zip(counts, expected))
    derived = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, draw="epoch", epochs=4, seed=1)
    drawn = []
    for step in range(40):
        derived.set_progress(step / 40)
        assert derived.epoch == step // 10
        drawn.append(derived.choose_phase())
    assert all(len(set(drawn[i : i + 10])) == 1 for i in range(0, 40, 10))
    assert set(drawn[:10]) == {1}  # progress 0 at the first epoch: Phase 1


def train(strategy, model, optimizer, steps, start=0, total=12):
    phases = []
    for step in range(start, start + steps):
        strategy.set_progress(step / total)
        strategy.step(make_closure(model, make_batch(100 + step)), optimizer)
        phases.append(strategy.last_phase)
    return phases


def test_determinism_under_seed_and_exact_resume():
    runs = []
    for _ in range(2):
        model = make_model(seed=7)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, seed=11)
        runs.append((train(strategy, model, optimizer, 12), model.state_dict()))
    assert runs[0][0] == runs[1][0] and {1, 2} <= set(runs[0][0])
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    other_seed = [mtl_plugins.build_strategy("conn_strength", TASKS, model=make_model(seed=7), seed=s) for s in (11, 12)]
    draws = []
    for s in other_seed:
        s.set_progress(0.5)
        draws.append([s.choose_phase() for _ in range(30)])
    assert draws[0] != draws[1]

    model = make_model(seed=7)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, seed=11)
    first = train(strategy, model, optimizer, 6)
    strategy.log_metrics()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "strategy": strategy.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = make_model(seed=99)
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer = torch.optim.Adam(resumed_model.parameters(), lr=0.01)
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed = mtl_plugins.build_strategy("conn_strength", TASKS, model=resumed_model, seed=0)
    resumed.load_state_dict(saved["strategy"])
    assert resumed.num_steps == 6 and resumed.phase_counts == strategy.phase_counts and len(resumed.timeline) == 1
    second = train(resumed, resumed_model, resumed_optimizer, 6, start=6)
    assert first + second == runs[0][0]
    assert all(torch.equal(resumed_model.state_dict()[k], runs[0][1][k]) for k in runs[0][1])


def test_observables_strength_priority_logs_and_plot(tmp_path):
    model = make_model()
    randomize_connections(model, 2)
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model, max_timeline=8)
    strengths = strategy.connection_strength(model)
    assert list(strengths) == ["encoder.0.0", "encoder.1.0", "encoder.4"]
    for name, path in zip(strengths, PAIRS):
        norm = norms_of(model, path[1])
        expected = reference_strength(dict(model.named_parameters())[path[0]], [norm.norms[t] for t in TASKS])
        assert strengths[name].shape == (4, expected.shape[1])
        assert torch.allclose(strengths[name].double(), expected, rtol=1e-5)
    metrics = strategy.log_metrics()
    shares = [metrics[f"priority/encoder.1.0/{t}"] for t in TASKS]
    top = strengths["encoder.1.0"].argmax(0)
    assert shares == pytest.approx([(top == k).float().mean().item() for k in range(4)])
    assert sum(metrics[f"priority/{t}"] for t in TASKS) == pytest.approx(1.0)
    assert "phase" not in metrics  # no step yet
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(20):
        strategy.set_progress(step / 20)
        strategy.step(make_closure(model, make_batch(step)), optimizer)
        metrics = strategy.log_metrics()
        assert metrics["phase"] == strategy.last_phase
        assert len(strategy.timeline) <= 8 and strategy.timeline[-1]["step"] == step + 1
    assert metrics["phase2_fraction"] == strategy.phase_counts[1] / 20
    json.dumps(metrics)
    [path] = strategy.write_plots(tmp_path)
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_bad_configuration_is_rejected():
    model = make_model()
    with pytest.raises(TypeError, match="needs the model"):
        mtl_plugins.build_strategy("conn_strength", TASKS)
    plain = HPS(["a"], encoder=nn.Linear(2, 2), heads={"a": nn.Linear(2, 1)})
    with pytest.raises(ValueError, match="task-specific connections"):
        mtl_plugins.build_strategy("conn_strength", ["a"], model=plain)
    with pytest.raises(ValueError, match="has connections for tasks"):
        mtl_plugins.build_strategy("conn_strength", ["a", "b"], model=model)
    with pytest.raises(TypeError, match="schedule"):
        mtl_plugins.build_strategy("conn_strength", TASKS, model=model, schedule="alternate")
    with pytest.raises(ValueError, match="switch_point"):
        mtl_plugins.build_strategy("conn_strength", TASKS, model=model, switch_point=1.5)
    with pytest.raises(TypeError, match="incomplete_norms"):
        mtl_plugins.build_strategy("conn_strength", TASKS, model=model, incomplete_norms="ignore")
    strategy = mtl_plugins.build_strategy("conn_strength", TASKS, model=model)
    with pytest.raises(KeyError, match="no loss for 'a'"):
        strategy.step(lambda task=None: {}, torch.optim.SGD(model.parameters(), lr=0.1))


def test_quickstart_runs_end_to_end_with_task_connections(tmp_path):
    from mtl_plugins.cli import main

    out = tmp_path / "run"
    code = main(["quickstart", "strategy={name: conn_strength}", "model.architecture=task_connections",
                 "data.train_size=600", "training.max_steps=20", "training.logging_steps=5",
                 "--baselines", "skip", "--output-dir", str(out), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "results.json").read_text())
    assert summary["strategy"] == "conn_strength" and summary["steps"] == 20
    assert "conn_strength_priority.png" in summary["plots"] and (out / "conn_strength_priority.png").exists()
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("split") != "validation"]  # the training logs
    assert all("priority/left" in r and r["phase"] in (1.0, 2.0) for r in records)
    state = torch.load(out / "strategy_state.pt", weights_only=True)
    assert state["num_steps"] == 20 and sum(state["phase_counts"]) == 20
    from safetensors.torch import load_file

    assert any(".norms.sum." in key for key in load_file(str(out / "model.safetensors")))
