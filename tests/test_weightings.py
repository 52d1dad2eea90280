"""Loss-weighting strategies against the papers' formulas (float64 references written here)."""

import copy
import re
import sys

import pytest
import torch
from scaled_updater import ScaledUpdater
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.hps import HPS
from mtl_plugins.loop import make_closure
from mtl_plugins.strategies.base import Updater

TASKS = ["a", "b", "c"]
K = len(TASKS)
DTYPE = torch.float64
ALL = ["uw", "gls", "rlw", "dwa", "famo", "gradnorm"]


def build(name, tasks=TASKS, **options):
    return mtl_plugins.build_strategy(name, list(tasks), **options)


def as_losses(values):
    return {t: torch.tensor(float(v), dtype=DTYPE) for t, v in zip(TASKS, values)}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    heads = {t: nn.Linear(5, 1) for t in TASKS}
    return HPS(TASKS, encoder=encoder, heads=heads, losses={t: "mse" for t in TASKS}, input_name="x").to(DTYPE)


def make_batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DTYPE)
    return {"x": x, **{t: (i + 1.0) * torch.randn(n, generator=g, dtype=DTYPE) for i, t in enumerate(TASKS)}}


def options_for(name, model):
    return {"model": model} if name == "gradnorm" else {"steps_per_epoch": 2} if name == "dwa" else {}


def adam_first_step(grad, lr, eps=1e-8):
    """Adam's first update from zero moments (bias-corrected): -lr * g / (|g| + eps)."""
    return -lr * grad / (grad.abs() + eps)


class TwoRankUpdater(Updater):
    """One process of two: ``reduce_`` averages the loss vector with the other process's fixed losses."""

    def __init__(self, optimizer, other):
        super().__init__(optimizer)
        self.other = torch.as_tensor(other, dtype=DTYPE)

    def reduce_(self, tensors):
        for t in tensors:
            if t.shape == self.other.shape:
                t.copy_((t + self.other.to(t)) / 2)


# -- DWA -------------------------------------------------------------------------------------------------
def test_dwa_temperature_rule_over_epochs():
    temperature, steps_per_epoch = 2.0, 3
    strategy = build("dwa", temperature=temperature, steps_per_epoch=steps_per_epoch)
    gen = torch.Generator().manual_seed(0)
    epochs = [0.5 + torch.rand(steps_per_epoch, K, generator=gen, dtype=DTYPE) for _ in range(4)]
    averages = [e.mean(0) for e in epochs]
    for index, epoch in enumerate(epochs):
        for values in epoch:
            weights = strategy.weights(as_losses(values))
            got = torch.tensor([weights[t] for t in TASKS], dtype=DTYPE)
            if index < 2:
                expected = torch.ones(K, dtype=DTYPE)
            else:
                rates = averages[index - 1] / averages[index - 2]
                expected = K * torch.exp(rates / temperature) / torch.exp(rates / temperature).sum()
            torch.testing.assert_close(got, expected)


def test_dwa_epochs_from_the_trainer_progress_signal():
    temperature = 2.0
    strategy = build("dwa", temperature=temperature)
    gen = torch.Generator().manual_seed(1)
    epochs = [0.5 + torch.rand(n, K, generator=gen, dtype=DTYPE) for n in (2, 3, 2, 4)]  # uneven epochs
    averages = [e.mean(0) for e in epochs]
    for index, epoch in enumerate(epochs):
        for values in epoch:
            strategy.set_progress(0.1 * index, epoch=index)
            weights = strategy.weights(as_losses(values))
            got = torch.tensor([weights[t] for t in TASKS], dtype=DTYPE)
            if index < 2:
                expected = torch.ones(K, dtype=DTYPE)
            else:
                rates = averages[index - 1] / averages[index - 2]
                expected = K * torch.softmax(rates / temperature, 0)
            torch.testing.assert_close(got, expected)


def test_dwa_needs_to_know_where_epochs_end():
    with pytest.raises(ValueError, match="where epochs end"):
        build("dwa").weights(as_losses([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
        build("dwa", steps_per_epoch=0)


# -- GLS -------------------------------------------------------------------------------------------------
def test_gls_weights_and_step_follow_the_geometric_mean_gradient():
    values = torch.tensor([0.5, 2.0, 3.5], dtype=DTYPE)
    gm = values.prod() ** (1 / K)
    got = build("gls").weights(as_losses(values))
    torch.testing.assert_close(torch.tensor([got[t] for t in TASKS], dtype=DTYPE), gm / (K * values))

    model, batch = tiny_model(), make_batch()
    reference = copy.deepcopy(model)
    losses = reference(**batch).losses
    objective = torch.stack([losses[t] for t in TASKS]).prod() ** (1 / K)  # (prod L_t)^(1/K)
    grads = torch.autograd.grad(objective, list(reference.parameters()))
    before = copy.deepcopy(model)
    build("gls").step(make_closure(model, batch), torch.optim.SGD(model.parameters(), lr=1.0))
    for p0, p, g in zip(before.parameters(), model.parameters(), grads):
        torch.testing.assert_close(p0 - p, g)


def test_gls_rejects_non_positive_losses():
    with pytest.raises(ValueError, match="gls needs positive losses"):
        build("gls").weights(as_losses([1.0, 0.0, 2.0]))


def test_weights_use_losses_averaged_across_processes():
    model, batch = tiny_model(), make_batch()
    with torch.no_grad():
        local = torch.stack([v for v in model(**batch).losses.values()])
    other = torch.tensor([0.2, 5.0, 1.0], dtype=DTYPE)
    strategy = build("gls")
    strategy.step(make_closure(model, batch), TwoRankUpdater(torch.optim.SGD(model.parameters(), lr=0.0), other))
    mean = (local + other) / 2
    torch.testing.assert_close(torch.tensor(strategy.last_weights, dtype=DTYPE), mean.prod() ** (1 / K) / (K * mean))


# -- UW --------------------------------------------------------------------------------------------------
def _constant_closure(values, parameter):
    def closure(task=None):
        return {t: float(v) * (1.0 + 0.0 * parameter.sum()) for t, v in zip(TASKS, values)}

    return closure


def test_uw_weights_and_log_variance_update():
    lr = 0.01
    values = torch.tensor([0.5, 2.0, 4.0], dtype=DTYPE)
    strategy = build("uw", lr=lr)
    torch.testing.assert_close(torch.tensor(list(strategy.weights(as_losses(values)).values()), dtype=DTYPE),
                               torch.full((K,), 0.5, dtype=DTYPE))
    parameter = nn.Parameter(torch.zeros(2, dtype=DTYPE))
    strategy.step(_constant_closure(values, parameter), torch.optim.SGD([parameter], lr=0.1))
    grad = 0.5 * (1 - torch.exp(-torch.zeros(K, dtype=DTYPE)) * values)  # d/ds [exp(-s) L / 2 + s / 2]
    log_var = adam_first_step(grad, lr)
    torch.testing.assert_close(strategy.scalarizer.log_var.detach().to(DTYPE), log_var, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(list(strategy.weights(as_losses(values)).values()), dtype=DTYPE),
                               0.5 * torch.exp(-log_var), rtol=1e-6, atol=1e-7)


def test_uw_log_variances_converge_to_log_of_the_losses():
    values = torch.tensor([0.5, 2.0, 4.0], dtype=DTYPE)
    strategy = build("uw", lr=0.05)
    parameter = nn.Parameter(torch.zeros(2, dtype=DTYPE))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    for _ in range(600):
        strategy.step(_constant_closure(values, parameter), optimizer)
    torch.testing.assert_close(strategy.scalarizer.log_var.detach().to(DTYPE), torch.log(values), atol=0.1, rtol=0)


def test_uw_libmtl_backward_also_trains_the_log_variances():
    strategy = build("uw", lr=0.01)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=DTYPE, requires_grad=True)
    assert strategy.backward(losses) == pytest.approx([0.5] * K)
    assert losses.grad.tolist() == pytest.approx([0.5] * K)
    # d/ds = (1 - L) / 2 at s = 0; Adam's first step moves by lr against its sign
    assert strategy.scalarizer.log_var.detach().tolist() == pytest.approx([-0.01, 0.01, 0.01], rel=1e-4)


# -- RLW -------------------------------------------------------------------------------------------------
def test_rlw_weights_are_softmax_of_standard_normals():
    strategy = build("rlw", seed=1)
    draws = torch.tensor([list(strategy.weights(as_losses([1.0, 1.0, 1.0])).values()) for _ in range(3000)],
                         dtype=DTYPE)
    assert bool((draws > 0).all())
    torch.testing.assert_close(draws.sum(1), torch.ones(3000, dtype=DTYPE))
    logs = torch.log(draws)
    assert float((logs[:, 0] - logs[:, 1]).var()) == pytest.approx(2.0, rel=0.1)  # z_a - z_b ~ N(0, 2)
    assert draws.mean(0).tolist() == pytest.approx([1 / K] * K, abs=0.02)


def test_rlw_draws_follow_the_seed_and_the_saved_state():
    first, second = build("rlw", seed=5), build("rlw", seed=5)
    losses = as_losses([1.0, 2.0, 3.0])
    assert first.weights(losses) == second.weights(losses)
    state = copy.deepcopy(first.state_dict())
    expected = first.weights(losses)
    assert expected != build("rlw", seed=6).weights(losses)
    restored = build("rlw", seed=0)
    restored.load_state_dict(state)
    assert restored.weights(losses) == expected


# -- FAMO ------------------------------------------------------------------------------------------------
def test_famo_weights_and_logit_update():
    lr, decay = 0.025, 1e-3
    model, first = tiny_model(), make_batch(seed=0)
    strategy = build("famo", lr=lr, weight_decay=decay)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    closure = make_closure(model, first)
    with torch.no_grad():
        before = torch.stack([v for v in closure().values()])
    strategy.step(closure, optimizer)
    torch.testing.assert_close(torch.tensor(strategy.last_weights, dtype=DTYPE),
                               (1 / (before + 1e-8)) / (1 / (before + 1e-8)).sum())  # z uniform at start
    with torch.no_grad():
        after = torch.stack([v for v in closure().values()])  # the batch's losses after the model's update
    # the logits moved within the same step: no update is left pending for the next batch
    z = torch.full((K,), 1 / K, dtype=DTYPE)
    delta = torch.log(before + 1e-8) - torch.log(after + 1e-8)
    grad = (torch.diag(z) - torch.outer(z, z)) @ delta  # softmax Jacobian^T delta (weight decay of w=0 is 0)
    logits = adam_first_step(grad, lr)
    torch.testing.assert_close(strategy.logits.tensor.detach(), logits, rtol=1e-6, atol=1e-9)
    zs = torch.softmax(logits, 0)
    values = torch.tensor([0.3, 1.5, 0.9], dtype=DTYPE)
    expected = zs / values / (zs / values).sum()
    got = strategy.weights(as_losses(values))
    torch.testing.assert_close(torch.tensor([got[t] for t in TASKS], dtype=DTYPE), expected, rtol=1e-6, atol=0)


def test_famo_refuses_the_single_backward_contract_and_bad_losses():
    with pytest.raises(NotImplementedError, match="step"):
        build("famo").backward(torch.ones(K, dtype=DTYPE))
    with pytest.raises(ValueError, match="famo needs positive losses"):
        build("famo").weights(as_losses([1.0, -1.0, 2.0]))


# -- GradNorm --------------------------------------------------------------------------------------------
def _gradnorm_reference(logits, norms, values, initial, alpha):
    """d/dw sum_t |lambda_t n_t - mean(lambda n) r_t^alpha|, lambda = K softmax(w), target held fixed."""
    z = torch.softmax(logits, 0)
    lam = K * z
    ratios = values / initial
    r = ratios / ratios.mean()
    target = (lam * norms).mean() * r**alpha
    sign = torch.sign(lam * norms - target)
    dlam = K * (torch.diag(z) - torch.outer(z, z))  # dlam_t / dw_k = K z_t (delta_tk - z_k)
    return dlam.T @ (sign * norms)


def test_gradnorm_balance_gradient_matches_formula():
    strategy = build("gradnorm", alpha=1.5)
    with torch.no_grad():
        strategy.logits.tensor.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=DTYPE))
    strategy.initial_losses = torch.tensor([2.0, 1.0, 0.5], dtype=DTYPE)
    norms, values = torch.tensor([1.0, 4.0, 0.5], dtype=DTYPE), torch.tensor([1.0, 0.9, 0.1], dtype=DTYPE)
    expected = _gradnorm_reference(strategy.logits.tensor.detach().clone(), norms, values, strategy.initial_losses, 1.5)
    torch.testing.assert_close(strategy.balance_gradient(norms, values), expected)


def test_gradnorm_step_weights_gradients_and_trains_weights():
    lr = 0.01
    model, batch = tiny_model(), make_batch()
    shared = list(model.encoder.parameters())
    rows, heads = [], {}
    for t in TASKS:
        grads = torch.autograd.grad(model(**batch, task=t).losses[t], shared + list(model.heads[t].parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(shared)]]))
        heads[t] = grads[len(shared):]
    J = torch.stack(rows)
    before = copy.deepcopy(model)
    strategy = build("gradnorm", model=model, lr=lr)
    strategy.step(make_closure(model, batch), torch.optim.SGD(model.parameters(), lr=1.0))
    change = torch.cat([(p0 - p).reshape(-1) for p0, p in zip(before.encoder.parameters(), model.encoder.parameters())])
    torch.testing.assert_close(change, J.sum(0))  # lambda = 1 at the start
    for t in TASKS:
        for p0, p, g in zip(before.heads[t].parameters(), model.heads[t].parameters(), heads[t]):
            torch.testing.assert_close(p0 - p, g)
    values = strategy.initial_losses
    grad = _gradnorm_reference(torch.zeros(K, dtype=DTYPE), J.norm(dim=1), values, values, 1.5)
    torch.testing.assert_close(strategy.logits.tensor.detach(), adam_first_step(grad, lr))


# -- shared behaviour ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["uw", "gradnorm", "famo", "gls"])
def test_loss_scale_does_not_change_the_update(name):
    results = []
    for scale in (1.0, 2.0**12):
        model = tiny_model()
        strategy = build(name, **options_for(name, model))
        updater = ScaledUpdater(torch.optim.SGD(model.parameters(), lr=0.05), scale)
        for step in range(3):
            strategy.step(make_closure(model, make_batch(seed=step)), updater)
        results.append(list(model.parameters()))
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_through_weights_only_checkpoint(name, tmp_path):
    model = tiny_model()
    strategy = build(name, seed=3, **options_for(name, model))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        strategy.step(make_closure(model, make_batch(seed=step)), optimizer)
    torch.save(strategy.state_dict(), tmp_path / "state.pt")
    twin_model = copy.deepcopy(model)
    twin = build(name, seed=99, **options_for(name, twin_model))
    twin.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for _ in range(2):
        for m, s in ((model, strategy), (twin_model, twin)):
            s.step(make_closure(m, make_batch(seed=7)), torch.optim.SGD(m.parameters(), lr=0.05))
    assert strategy.log_metrics() == twin.log_metrics()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_strategies_reading_the_step_outcome_say_so():
    flagged = {name for name in ALL if build(name, **options_for(name, tiny_model())).needs_step_outcome}
    assert flagged == {"uw", "famo", "gradnorm"}


def learned_state(strategy):
    """A copy of the strategy's learnable weights (value and Adam state)."""
    owned = strategy.log_var if strategy.name == "uw" else strategy.logits
    return copy.deepcopy(owned.state())


@pytest.mark.parametrize("name", ["uw", "famo", "gradnorm"])
def test_learned_weights_move_only_when_the_model_step_is_applied(name):
    model = tiny_model()
    strategy = build(name, **options_for(name, model))
    batch = make_batch()
    overflowing = ScaledUpdater(torch.optim.SGD(model.parameters(), lr=0.05), float("inf"))
    before, weights = copy.deepcopy(model.state_dict()), learned_state(strategy)
    strategy.step(make_closure(model, batch), overflowing)
    assert overflowing.skipped == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    skipped = learned_state(strategy)
    assert torch.equal(skipped["value"], weights["value"]) and skipped["optimizer"]["state"] == {}  # no Adam step
    strategy.step(make_closure(model, batch), ScaledUpdater(torch.optim.SGD(model.parameters(), lr=0.05), 2.0**8))
    assert not torch.equal(learned_state(strategy)["value"], weights["value"])


def test_libmtl_aliases():
    for alias, name in [("UW", "uw"), ("DWA", "dwa"), ("RLW", "rlw"), ("GLS", "gls"), ("FAMO", "famo"),
                        ("GradNorm", "gradnorm")]:
        assert build(alias).name == name


@pytest.mark.parametrize("name", ["uw", "gls", "rlw"])
def test_missing_torchjd_names_the_extra(name, monkeypatch):
    for module in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, "torchjd", None)
    with pytest.raises(ImportError, match=re.escape('pip install "mtl-plugins[baselines]"')):
        build(name)
    for written_here in ("dwa", "famo", "gradnorm"):
        assert build(written_here).name == written_here


def test_own_optimizer_rejects_bad_learning_rate():
    for name in ("uw", "famo", "gradnorm"):
        with pytest.raises(ValueError, match="lr must be positive"):
            build(name, lr=0.0)
