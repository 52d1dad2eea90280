"""Loss scaling composed with the update methods: float64 step-by-step references (weights applied to the
losses, then the method), ``ew`` scaling equal to the bare method, skipped steps, options and reporting."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from ddp_worker import same
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.hps import HPS
from mtl_plugins.architectures.task_connections import TaskBatchNorm
from mtl_plugins.loop import make_closure
from mtl_plugins.loss_weights import strategy_for_model
from mtl_plugins.strategies.base import Updater

TASKS = ["a", "b", "c"]
STATIC = {"a": 2.0, "b": 0.5, "c": 1.0}  # the model's static loss weights
LR = 0.1


# -- independent float64 references of the weightings (Kendall et al. 2018; Chennupati et al. 2019) --
class ReferenceUW:
    """``sum_t exp(-s_t) x_t / 2 + s_t / 2`` on the statically weighted losses ``x``; weights
    ``exp(-s_t) / 2``; ``s`` takes one Adam step (betas 0.9/0.999, eps 1e-8) per batch on
    ``(1 - exp(-s_t) x_t) / 2``."""

    def __init__(self, k: int, lr: float):
        self.s, self.m, self.v, self.t, self.lr = [0.0] * k, [0.0] * k, [0.0] * k, 0, lr

    def weights(self, x: list[float]) -> list[float]:
        return [math.exp(-s) / 2 for s in self.s]

    def update(self, x: list[float]) -> None:
        self.t += 1
        for i, (s, xi) in enumerate(zip(self.s, x)):
            g = (1 - math.exp(-s) * xi) / 2
            self.m[i] = 0.9 * self.m[i] + 0.1 * g
            self.v[i] = 0.999 * self.v[i] + 0.001 * g * g
            m_hat, v_hat = self.m[i] / (1 - 0.9**self.t), self.v[i] / (1 - 0.999**self.t)
            self.s[i] = s - self.lr * m_hat / (math.sqrt(v_hat) + 1e-8)


class ReferenceGLS:
    """Geometric mean ``(prod_t x_t)^(1/K)``: weights ``GM / (K x_t)``, no state."""

    def weights(self, x: list[float]) -> list[float]:
        gm = math.exp(sum(math.log(v) for v in x) / len(x))
        return [gm / (len(x) * v) for v in x]

    def update(self, x: list[float]) -> None:
        pass


def reference_weighting(name: str, k: int = len(TASKS)):
    return ReferenceUW(k, LR) if name == "uw" else ReferenceGLS()


def scaling(name: str) -> dict:
    return {"name": "uw", "options": {"lr": LR}} if name == "uw" else name


def tolerance(weighting: str) -> dict[str, float]:
    """UW's log-variances are float32 (torchjd's parameter): its weights agree to float32 precision."""
    return {"rtol": 1e-6, "atol": 1e-9} if weighting == "uw" else {"rtol": 1e-10, "atol": 1e-12}


def log_var(strategy) -> list[float]:
    return strategy.loss_scaling.weighting.scalarizer.log_var.detach().double().tolist()


# -- models and data (float64) --------------------------------------------------------------------
def mlp(tasks=TASKS, seed: int = 0) -> HPS:
    torch.manual_seed(seed)
    heads = {t: nn.Linear(5, 1) for t in tasks}
    return HPS(tasks, encoder=nn.Sequential(nn.Linear(4, 5), nn.Tanh()), heads=heads,
               losses={t: "mse" for t in tasks}, input_name="x", loss_weights={t: STATIC[t] for t in tasks}).double()


def connected(seed: int = 0) -> HPS:
    """A shared Linear + BatchNorm encoder with per-task BatchNorms (task-specific connections)."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(4, 6, bias=False), nn.BatchNorm1d(6), nn.Tanh())
    model = HPS(TASKS, encoder=encoder, heads={t: nn.Linear(6, 1) for t in TASKS}, losses={t: "mse" for t in TASKS},
                input_name="x", loss_weights=STATIC).double()
    mtl_plugins.build_architecture("task_connections", TASKS, model=model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # distinct per-task scales, so that each task leads some channels
        for m in model.modules():
            if isinstance(m, TaskBatchNorm):
                for norm in m.norms.values():
                    norm.weight.copy_(torch.rand(6, generator=g, dtype=torch.float64) * 1.5 + 0.2)
    return model


def batches(n: int, seed: int = 0, tasks=TASKS) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        # b opposes a on the shared features: their gradients conflict
        labels = {"a": x[:, 0] + x[:, 1], "b": -x[:, 0] - x[:, 1] + 0.3 * x[:, 2], "c": x[:, 3] * 2}
        out.append({"x": x, **{t: labels[t] for t in tasks}})
    return out


def build(name: str, model: nn.Module, tasks=TASKS, **options):
    """The strategy for ``model``, with the model's static loss weights."""
    return strategy_for_model(name, model, tasks, options)


def summed(grads):
    present = [g for g in grads if g is not None]
    return sum(present) if present else None


def sgd_step(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None]) -> None:
    with torch.no_grad():
        for n, p in params.items():
            if grads.get(n) is not None:
                p -= LR * grads[n]


def task_grads(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    params = dict(model.named_parameters())
    return dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))


def weighted_losses(model: nn.Module, batch, tasks=TASKS) -> tuple[list[float], list[float]]:
    """(raw per-task losses, statically weighted ones) of one forward pass, without gradient."""
    with torch.no_grad():
        losses = model(**batch).losses
    raw = [float(losses[t]) for t in tasks]
    return raw, [STATIC[t] * v for t, v in zip(tasks, raw)]


# -- an aggregator ---------------------------------------------------------------------------------
@pytest.mark.parametrize("jacobian", ["loop", "batched"])
@pytest.mark.parametrize("weighting", ["uw", "gls"])
def test_pcgrad_with_loss_scaling_equals_the_step_by_step_reference(weighting, jacobian):
    tasks = ["a", "b"]  # two tasks: PCGrad's projection does not depend on its random order
    model, data = mlp(tasks), batches(3, tasks=tasks)
    reference = copy.deepcopy(model)
    strategy = build("pcgrad", model, tasks, jacobian=jacobian, loss_scaling=scaling(weighting))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ref_weighting = reference_weighting(weighting, len(tasks))
    params = dict(reference.named_parameters())
    shared = [n for n in params if n.startswith("encoder.")]
    conflicts = 0
    for batch in data:
        strategy.step(make_closure(model, batch), optimizer)

        _, x = weighted_losses(reference, batch, tasks)
        lam = ref_weighting.weights(x)
        grads = {t: task_grads(reference, lam[k] * STATIC[t] * reference(**batch).losses[t]) for k, t in enumerate(tasks)}
        g_a, g_b = (torch.cat([grads[t][n].reshape(-1) for n in shared]) for t in tasks)
        dot = float(g_a @ g_b)
        if dot < 0:  # PCGrad: each gradient loses its component along the other
            conflicts += 1
            g_a, g_b = g_a - dot / (g_b @ g_b) * g_b, g_b - dot / (g_a @ g_a) * g_a
        direction, update, offset = g_a + g_b, {}, 0
        for n in shared:
            update[n] = direction[offset:offset + params[n].numel()].view_as(params[n])
            offset += params[n].numel()
        for n in params:  # heads: their own task's gradient
            update.setdefault(n, summed([grads[t][n] for t in tasks]))
        sgd_step(params, update)
        ref_weighting.update(x)

    assert conflicts > 0
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, params[n], **tolerance(weighting))
    assert strategy.loss_scaling.weighting.num_steps == len(data)
    if weighting == "uw":
        assert log_var(strategy) == pytest.approx(ref_weighting.s, abs=1e-6)


# -- sel_update -----------------------------------------------------------------------------------
def test_sel_update_group_steps_use_the_scaled_losses_and_the_weighting_moves_once_per_batch():
    model, data = mlp(), batches(3)
    reference = copy.deepcopy(model)
    strategy = build("sel_update", model, warmup_steps=10, loss_scaling=scaling("uw"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ref_weighting = ReferenceUW(len(TASKS), LR)
    params = dict(reference.named_parameters())
    for batch in data:
        strategy.step(make_closure(model, batch), optimizer)
        record = strategy.history[-1]
        assert len(record["order"]) == len(TASKS)  # warm-up: one group step per task

        raw, x = weighted_losses(reference, batch)
        lam = ref_weighting.weights(x)  # fixed for every group step of the batch
        passes = []
        for group in record["order"]:
            losses = reference(**batch).losses
            passes.append([losses[t].item() for t in TASKS])
            loss = sum(lam[TASKS.index(t)] * STATIC[t] * losses[t] for t in group)
            sgd_step(params, task_grads(reference, loss))
        ref_weighting.update(x)  # once, from the batch's losses before its first group step

        # the affinity reads the per-task losses L_t, as without scaling
        torch.testing.assert_close(torch.tensor(record["losses"]), torch.tensor(passes), rtol=1e-6, atol=0)
        assert passes[0] == pytest.approx(raw, rel=1e-6)
        assert log_var(strategy) == pytest.approx(ref_weighting.s, abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, params[n], **tolerance("uw"))
    assert strategy.loss_scaling.weighting.num_steps == len(data)
    assert max(abs(s) for s in ref_weighting.s) > 0.1  # the weights did move


# -- conn_strength, both phases ---------------------------------------------------------------------
def reference_phase2(reference, batch, lam, params):
    """Phase 2 by the spec: per-task gradients of the scaled losses, projected per channel group of the
    connected layer's top-priority tasks, summed; one step."""
    grads = {}
    for k, t in enumerate(TASKS):
        loss = reference(**batch, task=t).losses[t]
        grads[t] = task_grads(reference, lam[k] * STATIC[t] * loss)
    weight = params["encoder.0.weight"]
    norms = reference.encoder[1].norms
    rows = weight.detach().pow(2).sum(1)
    strength = torch.stack([norms[t].weight.detach() ** 2 / (norms[t].running_var + 1e-5) * rows for t in TASKS])
    top = (strength / strength.sum(1, keepdim=True)).argmax(0)
    assert len(set(top.tolist())) > 1  # several tasks lead channels: projections can happen
    per_task = [grads[t]["encoder.0.weight"].clone() for t in TASKS]
    for i in range(len(TASKS)):
        channels = (top == i).nonzero().flatten()
        if len(channels) == 0:
            continue
        gi = per_task[i][channels].flatten()
        for j in range(len(TASKS)):
            gj = per_task[j][channels].flatten()
            dot = float(gi @ gj)
            if j != i and dot < 0 and float(gi @ gi) > 0:
                per_task[j][channels] = (gj - dot / (gi @ gi) * gi).view(len(channels), -1)
    update = {n: summed([grads[t][n] for t in TASKS]) for n in params}
    update["encoder.0.weight"] = sum(per_task)
    sgd_step(params, update)


@pytest.mark.parametrize("weighting", ["uw", "gls"])
@pytest.mark.parametrize("schedule", ["phase1", "phase2"])
def test_conn_strength_with_loss_scaling_equals_the_step_by_step_reference(schedule, weighting):
    model, data = connected(), batches(3, seed=4)
    reference = copy.deepcopy(model)
    strategy = build("conn_strength", model, schedule=schedule, loss_scaling=scaling(weighting))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    ref_weighting = reference_weighting(weighting)
    params = dict(reference.named_parameters())
    for batch in data:
        strategy.step(make_closure(model, batch), optimizer)

        # the weighting reads every task's loss before the first (single-task) forward pass: one
        # forward pass without gradient (it updates each task's BatchNorm statistics, as here)
        _, x = weighted_losses(reference, batch)
        lam = ref_weighting.weights(x)
        if schedule == "phase1":  # one step per task, each with the batch's fixed weight
            for k, t in enumerate(TASKS):
                loss = reference(**batch, task=t).losses[t]
                sgd_step(params, task_grads(reference, lam[k] * STATIC[t] * loss))
        else:
            reference_phase2(reference, batch, lam, params)
        ref_weighting.update(x)  # once per batch
    assert strategy.phase_counts == ([3, 0] if schedule == "phase1" else [0, 3])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, params[n], **tolerance(weighting))
    for name, buffer in model.named_buffers():
        torch.testing.assert_close(buffer, dict(reference.named_buffers())[name], **tolerance(weighting))
    if weighting == "uw":
        assert log_var(strategy) == pytest.approx(ref_weighting.s, abs=1e-6)


# -- static weights 1 -------------------------------------------------------------------------------
@pytest.mark.parametrize("name, options", [("pcgrad", {}), ("cagrad", {}), ("sel_update", {"warmup_steps": 1}),
                                           ("conn_strength", {"schedule": "mixed"})])
def test_ew_loss_scaling_equals_the_bare_method_exactly(name, options):
    factory = connected if name == "conn_strength" else mlp
    runs = []
    for extra in ({}, {"loss_scaling": "ew"}):
        model = factory().float()
        strategy = build(name, model, **options, **extra)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        for i, batch in enumerate(batches(4, seed=2)):
            strategy.set_progress(i / 4)
            batch = {k: v.float() for k, v in batch.items()}
            strategy.step(make_closure(model, batch), optimizer)
        runs.append((model, strategy))
    (bare, bare_strategy), (scaled, scaled_strategy) = runs
    assert same(bare.state_dict(), scaled.state_dict())
    state = scaled_strategy.state_dict()
    assert state.pop("loss_scaling")["name"] == "ew"
    assert same(bare_strategy.state_dict(), state)
    assert scaled_strategy.label == f"{name}+ew" and not scaled_strategy.needs_step_outcome


@pytest.mark.parametrize("name", ["pcgrad", "sel_update"])
def test_direct_construction_with_loss_scaling_equals_the_registry(name):
    from mtl_plugins.registry import STRATEGIES

    runs = []
    for direct in (False, True):
        model = mlp().float()
        options = {"loss_weights": STATIC, "loss_scaling": scaling("uw")}
        options |= {"warmup_steps": 1} if name == "sel_update" else {"model": model}
        strategy = STRATEGIES.get(name)(TASKS, **options) if direct else mtl_plugins.build_strategy(name, TASKS, **options)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for batch in batches(3, seed=4):
            strategy.step(make_closure(model, {k: v.float() for k, v in batch.items()}), optimizer)
        runs.append((model, strategy))
    (registry_model, registry_strategy), (direct_model, direct_strategy) = runs
    assert direct_strategy.label == f"{name}+uw"
    assert same(direct_model.state_dict(), registry_model.state_dict())
    assert same(direct_strategy.state_dict(), registry_strategy.state_dict())
    assert log_var(direct_strategy) != [0.0] * len(TASKS)


def test_direct_construction_refuses_loss_scaling_on_a_loss_weighting():
    from mtl_plugins.registry import STRATEGIES

    with pytest.raises(TypeError, match="'uw' takes no loss_scaling"):
        STRATEGIES.get("uw")(TASKS, loss_scaling="dwa")


# -- skipped steps, options, reporting -------------------------------------------------------------
class SkippingUpdater(Updater):
    """Skips every optimizer step (an fp16 overflow) while ``skip`` is set."""

    skip = False

    def step(self, final: bool = False) -> bool:
        if self.skip:
            return False
        return super().step(final)


@pytest.mark.parametrize("name", ["sel_update", "pcgrad"])
def test_learned_weights_stay_unchanged_on_a_skipped_step(name):
    model = mlp()
    strategy = build(name, model, warmup_steps=10, loss_scaling=scaling("uw")) if name == "sel_update" else \
        build(name, model, loss_scaling=scaling("uw"))
    assert strategy.needs_step_outcome  # trainers take (and report) the final step at once
    updater = SkippingUpdater(torch.optim.SGD(model.parameters(), lr=LR))
    data = batches(2)
    strategy.step(make_closure(model, data[0]), updater)
    moved = strategy.state_dict()["loss_scaling"]
    updater.skip = True
    parameters = copy.deepcopy(model.state_dict())
    strategy.step(make_closure(model, data[1]), updater)
    assert same(model.state_dict(), parameters)
    assert same(strategy.state_dict()["loss_scaling"]["state"]["log_var_state"], moved["state"]["log_var_state"])
    assert log_var(strategy) != [0.0] * len(TASKS)


def test_options_are_checked():
    model = mlp()
    with pytest.raises(ValueError, match="loss_scaling 'gradnorm' cannot scale.*loss weightings: dwa, ew, famo, gls, rlw, uw"):
        build("pcgrad", model, loss_scaling="gradnorm")
    with pytest.raises(ValueError, match="'cagrad' cannot scale the losses \\(it is not a loss weighting\\)"):
        build("pcgrad", model, loss_scaling="cagrad")
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        build("sel_update", model, loss_scaling="nope")
    with pytest.raises(ValueError, match="take no 'loss_weights'"):
        build("sel_update", model, loss_scaling={"name": "uw", "options": {"loss_weights": {"a": 1.0}}})
    with pytest.raises(ValueError, match="unknown keys \\['lr'\\]"):
        build("sel_update", model, loss_scaling={"name": "uw", "lr": 0.1})
    with pytest.raises(TypeError, match="option lr='fast' should be float"):
        build("sel_update", model, loss_scaling={"name": "uw", "options": {"lr": "fast"}})
    with pytest.raises(TypeError, match="option loss_scaling=3 should be"):
        build("sel_update", model, loss_scaling=3)
    with pytest.raises(TypeError, match="strategy 'uw' has no option 'loss_scaling'"):
        build("uw", model, loss_scaling="dwa")
    assert "loss_scaling" in mtl_plugins.registry.STRATEGIES.accepted_options("nash_mtl")


def test_card_log_and_state_name_both_parts():
    from mtl_plugins.hub.card import card_fields_from_strategy

    model, batch = mlp(), batches(1)[0]
    strategy = build("sel_update", model, warmup_steps=10, loss_scaling={"name": "dwa", "options": {"temperature": 1.5}})
    strategy.set_progress(0.0, epoch=0)
    strategy.step(make_closure(model, batch), torch.optim.SGD(model.parameters(), lr=LR))
    fields = card_fields_from_strategy(strategy)
    assert fields["method"] == "sel_update"
    assert fields["loss_scaling"] == {"name": "dwa", "options": {"temperature": 1.5},
                                      "weights": {t: 1.0 for t in TASKS}}  # DWA: 1 in the first two epochs
    assert "task_groups" in fields
    metrics = strategy.log_metrics()
    assert metrics["loss_scaling/weight/a"] == 1.0 and "num_groups" in metrics
    assert strategy.label == "sel_update+dwa"
    assert strategy.state_dict()["loss_scaling"]["state"]["epoch_batches"] == 1


def test_model_card_names_the_method_and_the_loss_scaling():
    from test_hub_card import text_config

    from mtl_plugins.hub.card import build_model_card

    card = build_model_card(text_config(), method="conn_strength",
                            loss_scaling={"name": "uw", "options": {"lr": 0.01}, "weights": {"a": 0.4}})
    assert card.data.mtl_method == "conn_strength" and card.data.mtl_loss_scaling["name"] == "uw"
    assert "uw" in card.data.tags and "conn_strength" in card.data.tags
    assert "weighted by `uw` before `conn_strength` used them" in card.text


def test_resume_restores_both_states():
    model, data = mlp(), batches(4)
    strategy = build("sel_update", model, warmup_steps=1, loss_scaling=scaling("uw"))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for batch in data[:2]:
        strategy.step(make_closure(model, batch), optimizer)
    saved, saved_model = copy.deepcopy(strategy.state_dict()), copy.deepcopy(model.state_dict())
    for batch in data[2:]:
        strategy.step(make_closure(model, batch), optimizer)

    resumed_model = mlp()
    resumed_model.load_state_dict(saved_model)
    resumed = build("sel_update", resumed_model, warmup_steps=1, loss_scaling=scaling("uw"))
    resumed.load_state_dict(saved)
    optimizer = torch.optim.SGD(resumed_model.parameters(), lr=LR)
    for batch in data[2:]:
        resumed.step(make_closure(resumed_model, batch), optimizer)
    assert same(resumed.state_dict(), strategy.state_dict()) and same(resumed_model.state_dict(), model.state_dict())
    other = build("sel_update", mlp(), warmup_steps=1, loss_scaling="dwa")
    with pytest.raises(ValueError, match="holds loss scaling 'uw'.*with 'dwa'"):
        other.load_state_dict(saved)
    with pytest.raises(KeyError, match="missing \\['loss_scaling'\\]"):
        build("sel_update", mlp(), warmup_steps=1, loss_scaling="dwa").load_state_dict(
            build("sel_update", mlp()).state_dict())


def test_recipe_and_trainer_options(tmp_path):
    from ddp_worker import ddp_args, vector_data, vector_model

    from mtl_plugins.config import load_recipe
    from mtl_plugins.recipe_checks import check_recipe_types
    from mtl_plugins.trainers import MultiTaskTrainer

    recipe = load_recipe("quickstart")
    recipe["strategy"] = {"name": "conn_strength", "options": {"loss_scaling": {"name": "uw"}}}
    check_recipe_types(recipe)
    recipe["strategy"]["options"]["loss_scaling"] = 1.5
    with pytest.raises(ValueError, match="loss_scaling"):
        check_recipe_types(recipe)

    trainer = MultiTaskTrainer(model=vector_model(), args=ddp_args(str(tmp_path), 8, 3), train_dataset=vector_data(),
                               strategy="sel_update", strategy_options={"warmup_steps": 1, "loss_scaling": "uw"})
    trainer.train()
    assert trainer.strategy.label == "sel_update+uw" and not trainer.updater.deferred
    assert trainer.strategy.loss_scaling.weighting.num_steps == 3
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert logged and "loss_scaling/log_var/a" in logged[0]
