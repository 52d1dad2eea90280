"""Gradient-aggregation strategies against the papers' formulas, under DDP and loss scaling."""

import copy
import itertools
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from gloo_group import gloo_group
from scaled_updater import ScaledUpdater
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.hps import HPS
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies import torchjd_adapter
from mtl_plugins.strategies.base import NonFiniteGradientError, Updater
from mtl_plugins.strategies.task_gradients import GRAMIAN_BLOCK, TaskGradients, jacobian_gramian

TASKS = ["a", "b", "c"]
TORCHJD_BACKED = ["imtl", "upgrad", "aligned_mtl"]
WRITTEN_HERE = ["pcgrad", "gradvac", "mgda", "graddrop", "cagrad", "nash_mtl"]
ALL = TORCHJD_BACKED + WRITTEN_HERE
DTYPE = torch.float64


# -- helpers -----------------------------------------------------------------------------------------
def build(name, tasks=("a", "b"), **options):
    return mtl_plugins.build_strategy(name, list(tasks), **options)


def jacobian(k, n, seed):
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def tiny_model(tasks=TASKS, seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    heads = {t: nn.Linear(5, 1) for t in tasks}
    return HPS(tasks, encoder=encoder, heads=heads, losses={t: "mse" for t in tasks}, input_name="x").to(DTYPE)


def make_batch(tasks=TASKS, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DTYPE)
    # targets of different scales and signs so the tasks conflict
    return {"x": x, **{t: (i + 1.0) * torch.randn(n, generator=g, dtype=DTYPE) for i, t in enumerate(tasks)}}


def reference_gradients(model, batch, tasks=TASKS, loss_weights=None):
    """Per-task gradients by plain autograd: (J over the encoder's parameters, {task: head grads})."""
    shared = list(model.encoder.parameters())
    rows, heads = [], {}
    for t in tasks:
        loss = (loss_weights or {}).get(t, 1.0) * model(**batch, task=t).losses[t]
        grads = torch.autograd.grad(loss, shared + list(model.heads[t].parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        heads[t] = grads[len(shared):]
    return torch.stack(rows), heads


def project(g, h):
    """PCGrad's projection of g onto the normal plane of h when they conflict."""
    dot = g @ h
    return g - dot / (h @ h) * h if dot < 0 else g


# -- reference formulas ------------------------------------------------------------------------------
@pytest.mark.parametrize("conflicting", [True, False])
def test_pcgrad_two_tasks_matches_projection_formula(conflicting):
    J = jacobian(2, 7, 1)
    J[1] = (-1.0 if conflicting else 1.0) * J[0] + 0.5 * J[1]
    assert (J[0] @ J[1] < 0) == conflicting
    expected = project(J[0], J[1]) + project(J[1], J[0])
    torch.testing.assert_close(build("pcgrad").aggregate(J), expected, rtol=1e-10, atol=1e-12)


def test_pcgrad_three_tasks_is_one_of_the_random_order_outcomes():
    J = jacobian(3, 4, 2)
    J[2] = -(J[0] + J[1]) + 0.3 * J[2]  # conflicts with both
    outcomes = []
    for i in range(3):
        results = []
        for order in itertools.permutations([j for j in range(3) if j != i]):
            g = J[i].clone()
            for j in order:
                g = project(g, J[j])
            results.append(g)
        outcomes.append(results)
    candidates = [sum(choice) for choice in itertools.product(*outcomes)]
    strategy = build("pcgrad", TASKS)
    for _ in range(5):
        with torchjd_adapter.seeded(int(torch.randint(0, 2**31, (1,), generator=strategy.generator))):
            got = strategy.aggregate(J)
        assert min(float((got - c).norm()) for c in candidates) < 1e-10


@pytest.mark.parametrize("case", ["interior", "first_vertex", "second_vertex"])
def test_mgda_two_tasks_closed_form(case):
    J = jacobian(2, 6, 3)
    if case == "first_vertex":
        J[1] = 3.0 * J[0] + 0.1 * J[1]
    elif case == "second_vertex":
        J[0] = 3.0 * J[1] + 0.1 * J[0]
    g1, g2 = J
    alpha = min(max(float((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2))), 0.0), 1.0)
    if case != "interior":
        assert alpha in (0.0, 1.0)
    expected = alpha * g1 + (1 - alpha) * g2
    torch.testing.assert_close(build("mgda").aggregate(J), expected, rtol=1e-8, atol=1e-10)


def _gramian_cases():
    """Gramians MGDA meets: random, two strongly conflicting tasks, a duplicated task, a zero gradient,
    one task dominating by scale, and a rank-deficient five-task case."""
    cases = []
    for seed, k in [(5, 3), (6, 5), (7, 8)]:
        cases.append(jacobian(k, 30, seed))
    conflict = jacobian(3, 30, 8)
    conflict[1] = -0.9 * conflict[0] + 0.05 * conflict[1]
    duplicate = jacobian(4, 30, 9)
    duplicate[3] = duplicate[1]
    zero = jacobian(3, 30, 10)
    zero[2] = 0.0
    scaled = jacobian(3, 30, 11) * torch.tensor([[1e3], [1.0], [1e-3]], dtype=DTYPE)
    low_rank = jacobian(2, 30, 12)
    low_rank = torch.randn(5, 2, generator=torch.Generator().manual_seed(12), dtype=DTYPE) @ low_rank
    cases += [conflict, duplicate, zero, scaled, low_rank]
    return [J @ J.T for J in cases]


@pytest.mark.parametrize("index", range(8))
@pytest.mark.parametrize("epsilon, max_iters", [(1e-5, 250), (1e-3, 100), (1e-8, 5)])
def test_mgda_weights_equal_torchjds_frank_wolfe(index, epsilon, max_iters):
    from torchjd.aggregation import MGDAWeighting

    gramian = _gramian_cases()[index]
    expected = MGDAWeighting(epsilon=epsilon, max_iters=max_iters)(gramian)
    got = build("mgda", epsilon=epsilon, max_iters=max_iters).gramian_weights(gramian)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    assert float(got.sum()) == pytest.approx(1.0) and bool((got >= 0).all())


def _golden_section(f, lo=0.0, hi=1.0, iterations=200):
    ratio = (5**0.5 - 1) / 2
    a, b = lo, hi
    for _ in range(iterations):
        c, d = b - ratio * (b - a), a + ratio * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return (a + b) / 2


@pytest.mark.parametrize("c", [0.4, 0.9])
def test_cagrad_two_tasks_matches_dual_solution(c):
    J = jacobian(2, 6, 4)
    J[1] = -0.7 * J[0] + 0.6 * J[1]
    g1, g2 = J
    g0 = (g1 + g2) / 2
    sqrt_phi = c * g0.norm()

    def dual(a):
        gw = a * g1 + (1 - a) * g2
        return float(gw @ g0 + sqrt_phi * gw.norm())

    a = _golden_section(dual)
    gw = a * g1 + (1 - a) * g2
    expected = (g0 + sqrt_phi / gw.norm() * gw) / (1 + c**2)  # rescale=1
    torch.testing.assert_close(build("cagrad", c=c).aggregate(J), expected, rtol=1e-6, atol=1e-8)


def test_cagrad_direction_maximises_worst_improvement_in_the_ball():
    c, K, n = 0.5, 3, 4
    J = jacobian(K, n, 5)
    J[2] = -J[0] + 0.4 * J[2]
    d = build("cagrad", TASKS, c=c, rescale=0).aggregate(J)
    g0 = J.mean(0)
    radius = c * g0.norm()
    assert float((d - g0).norm()) <= float(radius) * (1 + 1e-6)
    best = float((J @ d).min())
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(20000, n, generator=gen, dtype=DTYPE)
    u = u / u.norm(dim=1, keepdim=True) * torch.rand(20000, 1, generator=gen, dtype=DTYPE) ** (1 / n)
    samples = g0 + radius * u
    assert float((samples @ J.T).min(dim=1).values.max()) <= best + 1e-9


def test_imtl_matches_paper_closed_form():
    J = jacobian(3, 6, 6)
    units = J / J.norm(dim=1, keepdim=True)
    D = J[0] - J[1:]
    U = units[0] - units[1:]
    rest = J[0] @ U.T @ torch.linalg.inv(D @ U.T)
    alpha = torch.cat([1 - rest.sum().reshape(1), rest])
    got = build("imtl", TASKS).aggregate(J)
    torch.testing.assert_close(got, alpha @ J, rtol=1e-8, atol=1e-10)
    projections = units @ got
    torch.testing.assert_close(projections, projections[0].expand(3))


def test_nash_mtl_solves_the_bargaining_equation_and_clips():
    J = jacobian(3, 8, 7)
    J[1] = -0.5 * J[0] + J[1]
    strategy = build("nash_mtl", TASKS, max_norm=0.0)
    d = strategy.aggregate(J)
    alpha = strategy.last_weights
    G = J @ J.T
    assert bool((alpha > 0).all())
    torch.testing.assert_close(G @ alpha, 1 / alpha, rtol=1e-7, atol=0)
    torch.testing.assert_close(d, alpha @ J)
    assert float(d @ d) == pytest.approx(3.0, rel=1e-7)  # alpha^T G alpha = sum_i alpha_i / alpha_i = K
    clipped = build("nash_mtl", TASKS, max_norm=1.0).aggregate(J)
    torch.testing.assert_close(clipped, d / d.norm())


def test_nash_mtl_converges_on_an_ill_conditioned_low_rank_gramian():
    """Task gradients of norms spread over six decades in a 3-dimensional space: the gradient's
    norm may grow during quadratic convergence, so only the Newton decrement may end it."""
    from mtl_plugins.strategies.aggregators.solvers import nash_weights

    g = torch.Generator().manual_seed(654)
    J = torch.randn(5, 3, generator=g, dtype=DTYPE) * 10 ** (6 * torch.rand(5, 1, generator=g, dtype=DTYPE))
    gramian = J @ J.T
    norm = torch.linalg.matrix_norm(gramian)
    scaled = nash_weights(gramian) * norm.sqrt()
    m = gramian / norm + 1e-10 * torch.eye(5, dtype=DTYPE)
    assert float((m @ scaled - 1 / scaled).norm()) < 1e-10


@pytest.mark.parametrize("k, seed", [(20, 4), (20, 7), (5, 0)])
def test_nash_mtl_weights_reach_float64_resolution(k, seed):
    """On these Gramians of float32 Jacobians, a Newton iteration with a line search near the
    solution stalled at a residual of 1e-9 (no step length shows a decrease in float64)."""
    from mtl_plugins.strategies.aggregators.solvers import nash_weights

    gramian = jacobian_gramian(torch.randn(k, 100_000, generator=torch.Generator().manual_seed(seed)))
    alpha = nash_weights(gramian)
    m = gramian / torch.linalg.matrix_norm(gramian) + 1e-10 * torch.eye(k, dtype=DTYPE)
    scaled = alpha * torch.linalg.matrix_norm(gramian).sqrt()
    assert float((m @ scaled - 1 / scaled).norm()) < 1e-12


def test_upgrad_two_tasks_and_no_conflict_with_any_task():
    J = jacobian(2, 5, 8)
    J[1] = -J[0] + 0.3 * J[1]
    expected = (project(J[0], J[1]) + project(J[1], J[0])) / 2
    torch.testing.assert_close(build("upgrad").aggregate(J), expected, rtol=1e-6, atol=1e-9)
    many = jacobian(4, 3, 9)  # more tasks than dimensions: conflicts everywhere
    d = build("upgrad", ["a", "b", "c", "d"]).aggregate(many)
    assert float((many @ d).min()) >= -1e-9


def _dual_cone_projection(gramian, u):
    """``argmin_v v^T G v`` s.t. ``v >= u`` by enumerating the active sets (G positive definite):
    the free coordinates solve ``(G v)_F = 0``, a solution is feasible and optimal when ``v_F >= u_F``
    and ``(G v)_A >= 0``."""
    k = len(u)
    for free in itertools.chain.from_iterable(itertools.combinations(range(k), r) for r in range(k + 1)):
        fixed = [i for i in range(k) if i not in free]
        v = u.clone()
        if free:
            f, a = list(free), fixed
            v[f] = torch.linalg.solve(gramian[f][:, f], -(gramian[f][:, a] @ u[a]))
        grad = gramian @ v
        if bool((v >= u - 1e-12).all()) and bool((grad[fixed] >= -1e-12).all()):
            return v
    raise AssertionError("no active set satisfies the KKT conditions")


@pytest.mark.parametrize("k, seed", [(3, 0), (4, 1), (5, 2), (6, 3), (8, 4)])
def test_upgrad_projector_equals_active_set_enumeration(k, seed):
    J = jacobian(k, 12, seed)
    J[1:] -= 0.8 * J[0]  # conflicting tasks, so some constraints are active
    gramian = J @ J.T
    U = torch.eye(k, dtype=DTYPE) / k
    got = torchjd_adapter._least_squares_projector()(U, gramian)
    expected = torch.stack([_dual_cone_projection(gramian, u) for u in U])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    assert bool(((J @ (got.sum(0) @ J)) >= -1e-9).all())  # the combination conflicts with no task


def test_upgrad_projector_falls_back_to_bounded_least_squares(monkeypatch):
    import scipy.optimize

    def no_convergence(*args, **kwargs):
        raise RuntimeError("Maximum number of iterations reached.")

    J = jacobian(5, 12, 2)
    J[1:] -= 0.8 * J[0]
    gramian, U = J @ J.T, torch.eye(5, dtype=DTYPE) / 5
    expected = torchjd_adapter._least_squares_projector()(U, gramian)
    monkeypatch.setattr(scipy.optimize, "nnls", no_convergence)
    torch.testing.assert_close(torchjd_adapter._least_squares_projector()(U, gramian), expected, rtol=1e-9, atol=1e-12)


def test_aligned_mtl_equalises_singular_values():
    J = jacobian(3, 6, 10)
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    aligned = S.min() * U @ Vh  # the paper's aligned Jacobian sigma_min U V^T
    torch.testing.assert_close(build("aligned_mtl", TASKS).aggregate(J), aligned.sum(0), rtol=1e-8, atol=1e-10)


def _gradvac_reference(J, targets, beta):
    new_targets = targets.clone()
    rows = []
    for i in range(2):
        j = 1 - i
        g, h = J[i].clone(), J[j]
        phi, target = float(g @ h / (g.norm() * h.norm())), float(targets[i, j])
        if phi < target:
            w = g.norm() * (target * (1 - phi**2) ** 0.5 - phi * (1 - target**2) ** 0.5) / (h.norm() * (1 - target**2) ** 0.5)
            g = g + w * h
        new_targets[i, j] = (1 - beta) * target + beta * phi
        rows.append(g)
    return rows[0] + rows[1], new_targets


@pytest.mark.parametrize("k", [3, 5, 8])
def test_pcgrad_and_gradvac_weights_equal_torchjds(k):
    """Same random draws, same arithmetic: torchjd's weightings as the reference, over three batches
    for GradVac's EMA targets."""
    from torchjd.aggregation import GradVacWeighting, PCGradWeighting

    pcgrad, gradvac = build("pcgrad", [f"t{i}" for i in range(k)]), build("gradvac", [f"t{i}" for i in range(k)], beta=0.3)
    reference = GradVacWeighting(beta=0.3)
    for step in range(3):
        J = jacobian(k, 30, 40 + step)
        J[1:] -= 0.6 * J[0]  # conflicts
        gramian = J @ J.T
        for strategy, weighting in ((pcgrad, PCGradWeighting()), (gradvac, reference)):
            with torchjd_adapter.seeded(step):
                expected = weighting(gramian)
            with torchjd_adapter.seeded(step):
                torch.testing.assert_close(strategy.gramian_weights(gramian), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(gradvac.targets, reference._phi_t, rtol=1e-12, atol=1e-14)


def test_gradvac_matches_paper_update_and_keeps_its_ema_in_the_state():
    beta = 0.5
    first, second = jacobian(2, 6, 11), jacobian(2, 6, 12)
    second[1] = 0.2 * second[0] + second[1]
    strategy = build("gradvac", beta=beta)
    expected_first, targets = _gradvac_reference(first, torch.zeros(2, 2, dtype=DTYPE), beta)
    torch.testing.assert_close(strategy.aggregate(first), expected_first)
    restored = build("gradvac", beta=beta)
    restored.load_state_dict(copy.deepcopy(strategy.state_dict()))
    expected_second, _ = _gradvac_reference(second, targets, beta)
    torch.testing.assert_close(strategy.aggregate(second), expected_second)
    torch.testing.assert_close(restored.aggregate(second), expected_second)


def test_gradvac_loads_the_previous_state_format_and_refuses_another_task_count():
    strategy = build("gradvac", TASKS)
    strategy.load_state_dict({**strategy.state_dict(), "vaccine_state": {"phi": None}})  # before any batch
    assert torch.equal(strategy.targets, torch.zeros(3, 3, dtype=DTYPE))
    phi = torch.rand(3, 3, dtype=torch.float32)
    strategy.load_state_dict({**strategy.state_dict(), "vaccine_state": {"phi": phi}})
    assert strategy.targets.dtype == DTYPE and torch.equal(strategy.targets, phi.double())
    with pytest.raises(ValueError, match=r"EMA targets are \(2, 2\), expected \(3, 3\)"):
        strategy.load_state_dict({**strategy.state_dict(), "vaccine_state": {"phi": torch.zeros(2, 2)}})


def test_pcgrad_skips_a_projection_onto_a_gradient_whose_square_underflows():
    from mtl_plugins.strategies.aggregators.solvers import pcgrad_weights

    gramian = torch.tensor([[1.0, -1e-24], [-1e-24, 0.0]], dtype=DTYPE)  # g_1 ~ 1e-25: G_11 underflows in float32
    torch.testing.assert_close(pcgrad_weights(gramian), torch.tensor([1.0, 1.0], dtype=DTYPE))


def test_graddrop_keeps_one_sign_per_coordinate_with_the_purity_probability():
    J = jacobian(3, 40, 13)
    J[:, 0] = torch.tensor([3.0, 1.0, -4.0 / 3.0], dtype=DTYPE)  # purity P = (1 + 2.667/5.333) / 2 = 0.75
    positive, negative = J.clamp(min=0).sum(0), J.clamp(max=0).sum(0)
    strategy = build("graddrop", TASKS)
    kept_positive = 0
    for _ in range(400):
        with torchjd_adapter.seeded(int(torch.randint(0, 2**31, (1,), generator=strategy.generator))):
            d = strategy.aggregate(J)
        assert bool((torch.isclose(d, positive) | torch.isclose(d, negative)).all())
        kept_positive += bool(torch.isclose(d[0], positive[0]))
    assert kept_positive / 400 == pytest.approx(0.75, abs=0.07)


@pytest.mark.parametrize("seed", range(4))
def test_graddrop_equals_torchjds_graddrop_with_the_same_draws(seed):
    from torchjd.aggregation import GradDrop

    J = jacobian(4, 500, 20 + seed)
    J[:, :20] = 0.0  # zero columns: nothing kept
    J[:, 20:40] = J[:, 20:40].abs()  # one-signed columns: purity 1 or 0
    J[:, 40:60] = -J[:, 40:60].abs()
    J[0, 60:80] = 0.0
    strategy = build("graddrop", ["a", "b", "c", "d"])
    with torchjd_adapter.seeded(seed):
        expected = GradDrop()(J)
    with torchjd_adapter.seeded(seed):
        got = strategy.aggregate(J)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


# -- the strategy step -------------------------------------------------------------------------------
def test_step_writes_aggregate_to_shared_and_each_task_gradient_to_its_head():
    weights = {"a": 2.0, "b": 1.0, "c": 0.5}
    model = tiny_model()
    batch = make_batch()
    J, heads = reference_gradients(model, batch, loss_weights=weights)
    units = J / J.norm(dim=1, keepdim=True)
    rest = J[0] @ (units[0] - units[1:]).T @ torch.linalg.inv((J[0] - J[1:]) @ (units[0] - units[1:]).T)
    direction = torch.cat([1 - rest.sum().reshape(1), rest]) @ J  # IMTL-G, the paper's closed form
    before = copy.deepcopy(model)
    strategy = build("imtl", TASKS, model=model, loss_weights=weights)
    losses = strategy.step(make_closure(model, batch), torch.optim.SGD(model.parameters(), lr=1.0))
    assert set(losses) == set(TASKS)
    change = torch.cat([(p0 - p).reshape(-1) for p0, p in zip(before.encoder.parameters(), model.encoder.parameters())])
    torch.testing.assert_close(change, direction)
    for t in TASKS:
        for p0, p, g in zip(before.heads[t].parameters(), model.heads[t].parameters(), heads[t]):
            torch.testing.assert_close(p0 - p, g)


def test_step_needs_a_model_with_shared_parameters():
    batch = make_batch()
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="model="):
        build("cagrad", TASKS).step(make_closure(model, batch), optimizer)
    with pytest.raises(TypeError, match="get_share_params"):
        build("cagrad", TASKS, model=nn.Linear(2, 2)).step(make_closure(model, batch), optimizer)


def test_libmtl_aliases_and_bad_options():
    for alias, name in [("PCGrad", "pcgrad"), ("CAGrad", "cagrad"), ("MGDA", "mgda"), ("Nash_MTL", "nash_mtl"),
                        ("IMTL", "imtl"), ("Aligned_MTL", "aligned_mtl"), ("UPGrad", "upgrad"),
                        ("GradDrop", "graddrop"), ("GradVac", "gradvac")]:
        assert build(alias).name == name
    with pytest.raises(ValueError, match="c must be non-negative"):
        build("cagrad", c=-1.0)
    with pytest.raises(ValueError, match="beta must be in"):
        build("gradvac", beta=2.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        build("nash_mtl", update_weights_every=0)
    with pytest.raises(TypeError, match="scale_mode"):
        build("aligned_mtl", scale_mode="max")


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_through_weights_only_checkpoint(name, tmp_path):
    model = tiny_model()
    strategy = build(name, TASKS, model=model, seed=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        strategy.step(make_closure(model, make_batch(seed=step)), optimizer)
    torch.save(strategy.state_dict(), tmp_path / "state.pt")
    twin_model = copy.deepcopy(model)
    twin = build(name, TASKS, model=twin_model, seed=99)
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for m, s in ((model, strategy), (twin_model, twin)):
        s.step(make_closure(m, make_batch(seed=7)), torch.optim.SGD(m.parameters(), lr=0.05))
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


# -- loss scaling ------------------------------------------------------------------------------------
def _train(name, scale, steps=3):
    model = tiny_model()
    strategy = build(name, TASKS, model=model)
    updater = ScaledUpdater(torch.optim.SGD(model.parameters(), lr=0.05), scale)
    for step in range(steps):
        strategy.step(make_closure(model, make_batch(seed=step)), updater)
    return model, strategy, updater


@pytest.mark.parametrize("name", ALL)
def test_loss_scale_does_not_change_the_update(name):
    reference, _, _ = _train(name, 1.0)
    scaled, _, _ = _train(name, 2.0**12)
    for p, q in zip(reference.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_scale_invariant_aggregator_would_differ_without_unscaling():
    """Nash-MTL's direction does not grow with the gradients: feeding it scaled gradients changes the step."""
    J = jacobian(3, 8, 14)
    strategy = build("nash_mtl", TASKS, max_norm=0.0)
    torch.testing.assert_close(strategy.aggregate(1024.0 * J), strategy.aggregate(J))


def test_overflow_skips_the_step_and_leaves_the_state_untouched():
    model, strategy, updater = _train("gradvac", float("inf"), steps=1)
    assert updater.skipped == 1
    for p, q in zip(tiny_model().parameters(), model.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(strategy.state_dict()["vaccine_state"]["phi"], torch.zeros(3, 3, dtype=DTYPE))  # targets not updated


def _task_gradients(jacobian, specific):
    return TaskGradients(torch.ones(len(jacobian), dtype=torch.float64), jacobian, specific)


def test_read_flags_a_non_finite_jacobian_row_or_task_specific_gradient():
    J = jacobian(3, 10, 30).float()
    head = torch.ones(4)
    assert _task_gradients(J, [head, None]).read(TASKS).finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = J.clone()
        broken[1, 7] = bad
        assert not _task_gradients(broken, [head]).read(TASKS).finite
        broken_head = head.clone()
        broken_head[2] = bad
        assert not _task_gradients(J, [None, broken_head]).read(TASKS).finite


def test_read_recomputes_an_overflowing_gramian_of_finite_gradients_in_float64():
    J = jacobian(3, 10, 31)
    J[0] *= 1e25  # finite in float32; its squares (1e50) are not
    host = _task_gradients(J.float(), []).read(TASKS)
    assert host.finite
    reference = J.float().double() @ J.float().double().T
    torch.testing.assert_close(host.gramian, reference, rtol=1e-12, atol=0.0)



def test_gramian_of_a_long_jacobian_is_blocked_on_cpu_and_accurate():
    g = torch.Generator().manual_seed(3)
    J = torch.randn(4, 5 * GRAMIAN_BLOCK + 123, generator=g) + 0.5  # blocked, with a short last block
    reference = J.double() @ J.double().T
    blocked = jacobian_gramian(J)
    assert blocked.dtype == torch.float64
    torch.testing.assert_close(blocked, reference, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(jacobian_gramian(J, exact=True), reference, rtol=1e-12, atol=0.0)
    short = J[:, : GRAMIAN_BLOCK]
    torch.testing.assert_close(jacobian_gramian(short), short.double() @ short.double().T, rtol=1e-5, atol=0.0)

class SqrtModel(nn.Module):
    """Shared weight at 0 under a square root: finite losses, NaN gradients."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, dtype=DTYPE))

    def get_share_params(self):
        return iter([self.w])


def test_non_finite_gradient_without_loss_scaling_is_an_error():
    model = SqrtModel()
    strategy = build("pcgrad", model=model)

    def closure(task=None):
        return {t: model.w.abs().sqrt().sum() + 1.0 for t in ("a", "b")}

    with pytest.raises(FloatingPointError, match="non-finite gradients"):
        strategy.step(closure, torch.optim.SGD(model.parameters(), lr=0.1))


class SqrtHeadModel(nn.Module):
    """Shared ``w``; task ``a``'s head has an infinite gradient at 0 with a finite loss, ``b``'s is smooth."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=DTYPE))
        self.heads = nn.ParameterDict({t: nn.Parameter(torch.zeros(2, dtype=DTYPE)) for t in ("a", "b")})

    def get_share_params(self):
        return iter([self.w])


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "cagrad"])
def test_non_finite_head_gradient_names_only_that_task(name):
    model = SqrtHeadModel()
    strategy = build(name, model=model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def closure(task=None):
        shared = (model.w**2).sum()
        return {"a": shared + model.heads["a"].abs().sqrt().sum(), "b": shared + (model.heads["b"] ** 2).sum()}

    with pytest.raises(NonFiniteGradientError, match=r"non-finite gradients for tasks \['a'\]") as error:
        strategy.step(closure, torch.optim.SGD(model.parameters(), lr=0.1))
    assert error.value.tasks == ["a"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- distributed ---------------------------------------------------------------------------------------
class RecordingUpdater(Updater):
    def __init__(self, optimizer, averages_gradients):
        super().__init__(optimizer)
        self.averages_gradients, self.reduced = averages_gradients, []

    def reduce_(self, tensors):
        self.reduced.append([tuple(t.shape) for t in tensors])


@pytest.mark.parametrize("averages_gradients", [False, True])
def test_gradients_are_reduced_once(averages_gradients):
    model = tiny_model()
    updater = RecordingUpdater(torch.optim.SGD(model.parameters(), lr=0.1), averages_gradients)
    build("pcgrad", TASKS, model=model).step(make_closure(model, make_batch()), updater)
    shared = sum(p.numel() for p in model.encoder.parameters())
    jacobian_reductions = [shapes for shapes in updater.reduced if shapes[0] == (len(TASKS), shared)]
    assert len(jacobian_reductions) == (0 if averages_gradients else 1)



class AllReduceUpdater(Updater):
    """Plain backward per process; ``reduce_`` averages across processes (gloo)."""

    def reduce_(self, tensors):
        for t in tensors:
            dist.all_reduce(t)
            t /= dist.get_world_size()


class BackwardAveragingUpdater(Updater):
    """Averages every gradient across processes right after backward, as the Trainer's updater does;
    ``reduce_`` of gradients is then redundant and refused."""

    averages_gradients = True

    def backward(self, loss, retain_graph=False):
        loss.backward(retain_graph=retain_graph)
        for p in self.params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()

    def reduce_(self, tensors):
        raise AssertionError("gradients were already averaged by backward")


UPDATERS = {"reduce": AllReduceUpdater, "backward": BackwardAveragingUpdater}


def _ddp_worker(rank, world_size, init_file, out_dir, name, steps, averaging):
    torch.set_num_threads(1)
    with gloo_group(rank, world_size, init_file):
        model = tiny_model()
        strategy = mtl_plugins.build_strategy(name, TASKS, model=model)
        updater = UPDATERS[averaging](torch.optim.SGD(model.parameters(), lr=0.1))
        for step in range(steps):
            strategy.step(make_closure(model, make_batch(seed=100 * step + rank)), updater)
        torch.save([p.detach() for p in model.parameters()], f"{out_dir}/rank{rank}.pt")


def _single_process(name, steps, world_size, average_first=True):
    """Aggregate the process-averaged Jacobian (or, as a control, average per-process aggregates)."""
    model = tiny_model()
    strategy = build(name, TASKS, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(steps):
        parts = [reference_gradients(model, make_batch(seed=100 * step + r)) for r in range(world_size)]
        if average_first:
            direction = strategy.aggregate(sum(J for J, _ in parts) / world_size)
        else:
            direction = sum(strategy.aggregate(J) for J, _ in parts) / world_size
        offset = 0
        for p in model.encoder.parameters():
            p.grad = direction[offset : offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()
        for t in TASKS:
            for p, *grads in zip(model.heads[t].parameters(), *(h[t] for _, h in parts)):
                p.grad = sum(grads) / world_size
        optimizer.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.slow
@pytest.mark.parametrize("averaging", list(UPDATERS))
@pytest.mark.parametrize("name", ["cagrad"])
def test_ddp_ranks_aggregate_the_averaged_jacobian(name, averaging, tmp_path):
    steps, world_size = 3, 2
    torch.multiprocessing.spawn(_ddp_worker, nprocs=world_size, join=True,
                                args=(world_size, str(tmp_path / "init"), str(tmp_path), name, steps, averaging))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for p, q in zip(*ranks):
        assert torch.equal(p, q)
    expected = _single_process(name, steps, world_size)
    for p, q in zip(ranks[0], expected):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)
    control = _single_process(name, steps, world_size, average_first=False)
    assert max(float((p - q).abs().max()) for p, q in zip(expected, control)) > 1e-6


# -- optional dependency -------------------------------------------------------------------------------
def _hide_torchjd(monkeypatch):
    for module in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "torchjd", None)


@pytest.mark.parametrize("name", TORCHJD_BACKED)
def test_missing_torchjd_names_the_extra_at_build_time(name, monkeypatch):
    _hide_torchjd(monkeypatch)
    with pytest.raises(ImportError, match=re.escape(f"strategy {name!r} needs torchjd") + ".*"
                       + re.escape('pip install "mtl-plugins[baselines]"')):
        build(name)


@pytest.mark.parametrize("name", WRITTEN_HERE)
def test_strategies_written_here_build_and_step_without_torchjd(name, monkeypatch):
    _hide_torchjd(monkeypatch)
    model = tiny_model()
    before = copy.deepcopy(model)
    build(name, TASKS, model=model).step(make_closure(model, make_batch()), torch.optim.SGD(model.parameters(), lr=0.1))
    assert not torch.equal(before.encoder[0].weight, model.encoder[0].weight)


def test_incompatible_torchjd_version_is_reported(monkeypatch):
    monkeypatch.setattr(torchjd_adapter.metadata, "version", lambda name: "0.19.2")
    with pytest.raises(ImportError, match=re.escape(">=0.18,<0.19, found 0.19.2")):
        build("imtl")


def test_import_and_listing_do_not_need_torchjd():
    code = (
        "import sys; sys.modules['torchjd'] = None\n"
        "import mtl_plugins\n"
        "names = mtl_plugins.available_strategies()\n"
        "print(all(n in names for n in ['pcgrad', 'cagrad', 'nash_mtl', 'upgrad', 'gradvac']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"
