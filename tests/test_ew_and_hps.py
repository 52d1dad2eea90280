import copy

import pytest
import torch
from ddp_worker import same
from torch import nn

import mtl_plugins
from mtl_plugins.architectures import HPS
from mtl_plugins.loop import make_closure, train_epoch
from mtl_plugins.param_groups import parameter_groups, split_parameters
from mtl_plugins.strategies.base import NonFiniteLossError
from mtl_plugins.structure_cache import cached

TASKS = ["reg", "cls"]


def tiny_model(seed=0):
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    heads = {"reg": nn.Linear(4, 1), "cls": nn.Linear(4, 3)}
    return HPS(TASKS, encoder=encoder, heads=heads, losses={"reg": "mse", "cls": "cross_entropy"}, input_name="x")


def batch(seed=1, n=5):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 3, generator=g), "reg": torch.randn(n, generator=g),
            "cls": torch.randint(0, 3, (n,), generator=g)}


def test_hps_shapes_losses_and_share_params():
    model = tiny_model()
    out = model(**batch())
    assert out.logits["reg"].shape == (5, 1) and out.logits["cls"].shape == (5, 3)
    assert set(out.losses) == set(TASKS)
    assert torch.allclose(out.loss, out.losses["reg"] + out.losses["cls"])
    share = {id(p) for p in model.get_share_params()}
    assert share == {id(p) for p in model.encoder.parameters()}
    only_cls = model(**batch(), task="cls")
    assert set(only_cls.logits) == {"cls"} and set(only_cls.losses) == {"cls"}
    assert model(batch()["x"]).losses is None


def test_hps_errors_name_the_problem():
    model = tiny_model()
    b = batch()
    with pytest.raises(ValueError, match=r"missing labels for tasks \['cls'\]"):
        model(x=b["x"], reg=b["reg"])
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        model(**b, task="depth")
    with pytest.raises(TypeError, match="unexpected inputs \\['depth'\\]"):
        model(**b, depth=b["reg"])
    with pytest.raises(ValueError, match=r"no head for tasks \['cls'\]"):
        HPS(TASKS, encoder=nn.Identity(), heads={"reg": nn.Identity()})


def test_ew_step_matches_hand_computed_sgd_update():
    model = tiny_model()
    reference = tiny_model()
    weights = {"reg": 2.0, "cls": 0.5}
    strategy = mtl_plugins.build_strategy("ew", TASKS, loss_weights=weights)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    b = batch()
    losses = strategy.step(make_closure(model, b), optimizer)

    out = reference(**b)
    total = 2.0 * out.losses["reg"] + 0.5 * out.losses["cls"]
    grads = torch.autograd.grad(total, list(reference.parameters()))
    for p, p0, g in zip(model.parameters(), reference.parameters(), grads):
        assert torch.allclose(p, p0 - 0.1 * g, atol=1e-6)
    assert losses == pytest.approx({t: out.losses[t].item() for t in TASKS})


def test_libmtl_backward_contract_with_tensor_losses():
    model = tiny_model()
    strategy = mtl_plugins.build_strategy("EW", TASKS, loss_weights={"reg": 3.0})
    out = model(**batch())
    weights = strategy.backward(torch.stack([out.losses["reg"], out.losses["cls"]]))
    assert weights == [3.0, 1.0]
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        strategy.backward(torch.ones(3))


def test_non_finite_loss_is_an_error_and_no_step_is_taken():
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    strategy = mtl_plugins.build_strategy("ew", TASKS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    def closure(task=None):
        losses = dict(model(**batch()).losses)
        losses["reg"] = losses["reg"] * float("nan")
        return losses

    with pytest.raises(NonFiniteLossError, match="reg"):
        strategy.step(closure, optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_plain_pytorch_loop_reduces_every_loss():
    model = tiny_model()
    strategy = mtl_plugins.build_strategy("ew", TASKS)
    optimizer = torch.optim.Adam(parameter_groups(model, lr=0.05, lr_ts=2.0))
    b = batch(n=32)
    start = {t: v.item() for t, v in model(**b).losses.items()}
    train_epoch(model, strategy, [b] * 40, optimizer)
    end = {t: v.item() for t, v in model(**b).losses.items()}
    assert all(end[t] < 0.7 * start[t] for t in TASKS)
    assert strategy.num_steps == 40


def test_parameter_groups_scale_task_specific_lr():
    model = tiny_model()
    groups = parameter_groups(model, lr=0.1, lr_ts=2.0, weight_decay=1e-4)
    assert [g["lr"] for g in groups] == [0.1, pytest.approx(0.2)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for h in model.heads.values() for p in h.parameters()}
    with pytest.raises(ValueError, match="lr_ts"):
        parameter_groups(model, lr=0.1, lr_ts=0)



def test_split_parameters_follows_freezing_new_modules_and_replaced_parameters():
    model = tiny_model()
    shared, specific = split_parameters(model)
    assert [id(p) for p in shared] == [id(p) for p in model.encoder.parameters()] and len(specific) == 4
    model.encoder[0].bias.requires_grad_(False)
    assert split_parameters(model)[0] == [model.encoder[0].weight]
    model.heads["reg"].extra = nn.Linear(1, 1)
    assert len(split_parameters(model)[1]) == 6
    model.encoder[0].weight = nn.Parameter(torch.zeros(4, 3))
    assert split_parameters(model)[0][0] is model.encoder[0].weight


def test_structure_cache_computes_again_only_after_a_registration():
    model, calls = tiny_model(), []

    def count_modules(module):
        calls.append(1)
        return len(list(module.modules()))

    before = cached(model, count_modules)
    assert cached(model, count_modules) == before and len(calls) == 1
    model.encoder[0].weight.requires_grad_(False)  # not a structural change
    cached(model, count_modules)
    assert len(calls) == 1
    model.encoder.append(nn.Tanh())
    assert cached(model, count_modules) == before + 1 and len(calls) == 2

def test_infinite_gradient_in_a_plain_loop_stops_ew_before_the_step():
    model = tiny_model()
    model.heads["cls"].weight.register_hook(lambda grad: grad * float("inf"))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(FloatingPointError, match=r"ew: non-finite gradient for tasks \['cls'\]: the optimizer step "
                                                 r"was not taken"):
        mtl_plugins.build_strategy("ew", TASKS).step(make_closure(model, batch()), optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())) and not optimizer.state


@pytest.mark.parametrize("name, options", [("uw", {}), ("dwa", {"steps_per_epoch": 1}), ("gls", {}), ("rlw", {}),
                                           ("famo", {})])
def test_infinite_gradient_in_a_plain_loop_stops_a_loss_weighting_and_keeps_its_state(name, options):
    """Plain loop, no checking updater: the weighting stops before the step, names the task, and its
    own state (DWA's epoch sums, RLW's generator, UW's log-variances, FAMO's logits) is as before."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    strategy = mtl_plugins.build_strategy(name, TASKS, **options)
    for seed in (1, 2, 3):  # a few good batches first, so DWA has epoch averages and every state has moved
        strategy.step(make_closure(model, batch(seed=seed)), optimizer)
    state = strategy.state_dict()
    before = [p.detach().clone() for p in model.parameters()]
    hook = model.heads["cls"].weight.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(FloatingPointError, match=rf"{name}: non-finite gradient for tasks \['cls'\]: the optimizer "
                                                 r"step was not taken"):
        strategy.step(make_closure(model, batch(seed=4)), optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    hook.remove()
    # the weighting continues exactly as a copy that never saw the bad batch
    twin = mtl_plugins.build_strategy(name, TASKS, **options)
    twin.load_state_dict(state)
    for candidate in (strategy, twin):
        twin_model = copy.deepcopy(model)  # its parameters are the ones before the bad batch
        candidate.step(make_closure(twin_model, batch(seed=5)), torch.optim.SGD(twin_model.parameters(), lr=0.1))
    assert strategy.last_weights == twin.last_weights
    assert same(strategy.state_dict(), twin.state_dict())


def test_loss_weightings_that_move_their_state_in_weights_say_so():
    """``step`` saves the state before ``weights()`` only where ``weights_move_state`` says it moves."""
    from mtl_plugins.registry import STRATEGIES
    from mtl_plugins.strategies.weightings.base import LossWeighting

    losses = {t: torch.tensor(0.5 + i) for i, t in enumerate(TASKS)}
    checked = []
    for name in mtl_plugins.available_strategies():
        if not issubclass(STRATEGIES.get(name), LossWeighting):
            continue
        strategy = mtl_plugins.build_strategy(name, TASKS, **({"steps_per_epoch": 1} if name == "dwa" else {}))
        before = strategy.state_dict()
        for _ in range(3):  # DWA needs two closed epochs before its state stops being its start
            strategy.weights(losses)
        assert (not same(strategy.state_dict(), before)) == type(strategy).weights_move_state, name
        checked.append(name)
    assert {"dwa", "rlw", "uw", "famo", "gls"} <= set(checked)


def test_hps_label_errors_name_the_task_the_expected_labels_and_what_came():
    model, b = tiny_model(), batch()
    with pytest.raises(ValueError, match=r"task 'cls': .*labels of shape \(5, 1\) do not match logits of shape "
                                         r"\(5, 3\): expected class indices of shape \(5,\)"):
        model(x=b["x"], reg=b["reg"], cls=b["cls"].unsqueeze(1))
    with pytest.raises(ValueError, match=r"task 'cls': .*labels \[3\] are outside \[0, 2\]"):
        model(x=b["x"], reg=b["reg"], cls=torch.tensor([0, 1, 3, 2, 0]))


@pytest.mark.parametrize("name", ["task", "labels", "x", "pixel_values"])
def test_task_names_taken_by_forward_arguments_are_refused(name):
    with pytest.raises(ValueError, match=f"task name '{name}' is taken by an argument of HPS.forward"):
        HPS([name, "b"], encoder=nn.Identity(), heads={name: nn.Identity(), "b": nn.Identity()})
    with pytest.raises(ValueError, match="task name 'images' is taken by an argument of HPS.forward"):
        HPS(["images"], encoder=nn.Identity(), heads={"images": nn.Identity()}, input_name="images")
