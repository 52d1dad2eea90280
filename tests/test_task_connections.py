import copy

import pytest
import torch
from torch import nn

import mtl_plugins
from mtl_plugins.architectures.task_connections import (
    TaskBatchNorm,
    TaskScaleShift,
    active_task,
    add_task_connections,
    connected_layers,
    has_task_connections,
    layer_strength,
    task_connections,
    top_priority_task,
)

TASKS = ["a", "b", "c"]


class Residual(nn.Module):
    """conv->BN (converted), conv->inplace ReLU->BN and add->BN (both stay shared), linear->BN1d (converted)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.bn_after_relu = nn.BatchNorm2d(4)
        self.bn_after_add = nn.BatchNorm2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 6)
        self.bn_fc = nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.bn1(self.conv1(x))
        h = self.bn_after_relu(self.relu(self.conv2(h)))
        h = self.bn_after_add(h + x[:, :1])
        return self.bn_fc(self.fc(self.pool(h).flatten(1)))


def randomize_norms(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.weight.data = torch.randn(m.num_features, generator=g)
            m.bias.data = torch.randn(m.num_features, generator=g)
            m.running_mean = torch.randn(m.num_features, generator=g)
            m.running_var = torch.rand(m.num_features, generator=g) + 0.5
            m.num_batches_tracked.fill_(7)


def test_plain_cnn_pairs_norms_with_the_layer_feeding_them():
    torch.manual_seed(0)
    model = Residual()
    randomize_norms(model)
    original = copy.deepcopy(model)
    assert add_task_connections(model, TASKS) is model
    assert isinstance(model.bn1, TaskBatchNorm) and model.bn1.source is model.conv1
    assert isinstance(model.bn_fc, TaskBatchNorm) and model.bn_fc.source is model.fc
    # an in-place op or an addition in between: not fed directly by a weight layer, stays shared
    assert type(model.bn_after_relu) is nn.BatchNorm2d and type(model.bn_after_add) is nn.BatchNorm2d
    assert [layer.name for layer in connected_layers(model)] == ["conv1", "fc"]
    for task in TASKS:  # every per-task norm is a copy of the original (parameters and running stats)
        for key, value in original.bn1.state_dict().items():
            assert torch.equal(model.bn1.norms[task].state_dict()[key], value)
    assert len({id(model.bn1.norms[t].weight) for t in TASKS}) == len(TASKS)  # independent copies
    x = torch.randn(5, 3, 6, 6)
    model.eval(), original.eval()
    for task in TASKS:
        with active_task(model, task):
            assert torch.allclose(model(x), original(x))


def test_tasks_are_routed_to_their_own_norms():
    torch.manual_seed(0)
    model = add_task_connections(Residual(), TASKS).eval()
    x = torch.randn(4, 3, 6, 6)
    with active_task(model, "a"):
        before_a = model(x)
    with active_task(model, "b"):
        before_b = model(x)
    with torch.no_grad():
        model.bn1.norms["b"].weight.mul_(3.0)
    with active_task(model, "a"):
        assert torch.equal(model(x), before_a)
    with active_task(model, "b"):
        assert not torch.allclose(model(x), before_b)


def test_using_a_converted_module_outside_active_task_is_an_error():
    model = add_task_connections(Residual(), TASKS)
    x = torch.randn(2, 3, 6, 6)
    with pytest.raises(RuntimeError, match=r"'bn1' used outside active_task\(\)"):
        model(x)
    with pytest.raises(ValueError, match="unknown task 'z'"), active_task(model, "z"):
        pass
    with active_task(model, "a"):
        with active_task(model, "b"):
            assert {c.active for c in task_connections(model)} == {"b"}
        assert {c.active for c in task_connections(model)} == {"a"}
    assert {c.active for c in task_connections(model)} == {None}
    with pytest.raises(ValueError, match="already has task-specific connections"):
        add_task_connections(model, TASKS)


def test_bad_inputs_are_rejected_with_clear_errors():
    with pytest.raises(ValueError, match="cannot contain '.'"):
        add_task_connections(Residual(), ["a.b", "c"])
    with pytest.raises(ValueError, match="no BatchNorm fed directly"):
        add_task_connections(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)), TASKS)
    with pytest.raises(RuntimeError, match="example_input="):
        add_task_connections(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(5, 1)), TASKS)
    converted = add_task_connections(
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 1)), TASKS,
        example_input=torch.randn(2, 1, 4, 4))
    assert isinstance(converted[1], TaskBatchNorm)
    with pytest.raises(TypeError, match="no option 'colour'"):
        mtl_plugins.build_architecture("task_connections", TASKS, model=Residual(), colour=1)


def test_connection_strength_follows_the_formula():
    torch.manual_seed(0)
    model = add_task_connections(Residual(), TASKS)
    randomize_norms(model, seed=3)
    layer = connected_layers(model)[0]
    strength = layer_strength(layer, ["c", "a", "b"]).double()
    w = model.conv1.weight.detach().double()
    for row, task in enumerate(["c", "a", "b"]):
        norm = model.bn1.norms[task]
        raw = [norm.weight[p].double() ** 2 / (norm.running_var[p].double() + 1e-5) * (w[p] ** 2).sum() for p in range(4)]
        expected = torch.stack(raw) / sum(raw)
        assert torch.allclose(strength[row], expected, rtol=1e-5)


def test_transformers_resnet_converts_every_norm_and_keeps_outputs():
    import transformers

    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="bottleneck",
                                       out_features=["stage1", "stage2"])
    for cls in (transformers.ResNetModel, transformers.ResNetBackbone):
        torch.manual_seed(0)
        model = cls(config)
        randomize_norms(model)
        original = copy.deepcopy(model).eval()
        norms = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
        add_task_connections(model, TASKS)
        model.eval()
        converted = {n: m for n, m in model.named_modules() if isinstance(m, TaskBatchNorm)}
        assert sorted(converted) == sorted(norms)  # in a ResNet every BatchNorm follows a convolution
        modules = dict(model.named_modules())
        for name, connection in converted.items():  # the conv of the same ResNetConvLayer/ShortCut
            assert connection.source is modules[name.rsplit(".", 1)[0] + ".convolution"]
        x = torch.randn(2, 3, 32, 32)
        reference = original(x)
        with active_task(model, "b"):
            output = model(x)
        key = "last_hidden_state" if cls is transformers.ResNetModel else "feature_maps"
        assert torch.allclose(torch.as_tensor(output[key][-1] if key == "feature_maps" else output[key]),
                              torch.as_tensor(reference[key][-1] if key == "feature_maps" else reference[key]), atol=1e-5)


def digits_hps():
    from mtl_plugins.data.multidigits import TASKS as SPECS
    from mtl_plugins.models import multidigits_cnn

    torch.manual_seed(0)
    return multidigits_cnn(["left", "right", "sum"], SPECS, width=4, hidden=8)


def test_architecture_plugin_composes_with_hps():
    model = digits_hps()
    tasks = model.tasks
    assert mtl_plugins.build_architecture("task_connections", tasks, model=model) is model
    assert has_task_connections(model.encoder) and len(connected_layers(model)) == 3
    shared = {id(p) for p in model.get_share_params()}
    for task in tasks:
        own = {id(p) for c in task_connections(model) for p in c.task_parameters(task)}
        assert own and not own & shared
        assert own <= {id(p) for p in model.task_specific_parameters(task)}
    conv_ids = {id(layer.weight) for layer in connected_layers(model)}
    assert conv_ids <= shared
    x = torch.randn(6, 1, 12, 20)
    labels = {"left": torch.randint(0, 10, (6,)), "right": torch.randint(0, 10, (6,)), "sum": torch.rand(6)}
    model.eval()
    everything = model(x, **labels)
    with torch.no_grad():
        model.encoder[0][1].norms["right"].bias.add_(1.0)
    after = model(x, **labels)
    assert torch.equal(after.logits["left"], everything.logits["left"])
    assert not torch.allclose(after.logits["right"], everything.logits["right"])
    only = model(x, task="sum", **labels)
    assert set(only.losses) == {"sum"} and torch.allclose(only.losses["sum"], after.losses["sum"])


def test_safetensors_round_trip_keeps_the_per_task_connections(tmp_path):
    from safetensors.torch import load_model, save_model

    model = digits_hps()
    mtl_plugins.build_architecture("task_connections", model.tasks, model=model)
    randomize_norms(model, seed=5)
    save_model(model, str(tmp_path / "model.safetensors"))
    fresh = digits_hps()
    torch.manual_seed(123)
    for p in fresh.parameters():
        p.data.normal_()
    mtl_plugins.build_architecture("task_connections", fresh.tasks, model=fresh)
    load_model(fresh, str(tmp_path / "model.safetensors"))
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    model.eval(), fresh.eval()
    x = torch.randn(3, 1, 12, 20)
    for task in model.tasks:
        assert torch.equal(model(x, task=task).logits[task], fresh(x, task=task).logits[task])
    with pytest.raises(RuntimeError):
        load_model(digits_hps(), str(tmp_path / "model.safetensors"))  # an unconverted model lacks the keys


def test_scale_shift_extension_for_transformer_backbones():
    import transformers

    config = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    original = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    add_task_connections(model, TASKS, example_input=None)
    layers = connected_layers(model)
    assert [layer.name for layer in layers] == names
    assert all(isinstance(layer.connection, TaskScaleShift) for layer in layers)
    ids = torch.randint(0, 30, (2, 5))
    with pytest.raises(RuntimeError, match="outside active_task"):
        model(ids)
    with active_task(model, "a"):  # identity at initialisation
        assert torch.allclose(model(ids).last_hidden_state, original(ids).last_hidden_state, atol=1e-6)
    dense = model.encoder.layer[0].intermediate.dense
    with torch.no_grad():
        dense.task_connection.scale["c"].copy_(torch.linspace(0.5, 2.0, 12))
    with active_task(model, "a"):
        assert torch.allclose(model(ids).last_hidden_state, original(ids).last_hidden_state, atol=1e-6)
    with active_task(model, "c"):
        assert not torch.allclose(model(ids).last_hidden_state, original(ids).last_hidden_state, atol=1e-3)
    layer = next(layer for layer in layers if layer.weight is dense.weight)
    raw = torch.linspace(0.5, 2.0, 12) ** 2 * (dense.weight.detach() ** 2).sum(1)
    assert torch.allclose(layer_strength(layer, ["c"])[0], raw / raw.sum(), rtol=1e-5)


# -- sources the connections cannot handle ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*weight_norm.* is deprecated:FutureWarning")
def test_parametrized_source_weights_are_refused_naming_the_layer():
    from torch.nn.utils import parametrizations, weight_norm

    for wrap in (parametrizations.weight_norm, weight_norm, parametrizations.spectral_norm):
        torch.manual_seed(0)
        encoder = nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                wrap(nn.Conv2d(4, 4, 3, bias=False)), nn.BatchNorm2d(4))
        with pytest.raises(ValueError, match=r"layer '3' \(.*Conv2d\) of Sequential has a computed weight"):
            add_task_connections(encoder, TASKS, example_input=torch.randn(2, 2, 7, 7))
        assert not has_task_connections(encoder)  # nothing was converted
    linear = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), parametrizations.weight_norm(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="layer '2' .* has a computed weight"):
        add_task_connections(linear, TASKS, mode="scale_shift")
    assert not has_task_connections(linear)


def test_a_source_parametrized_after_conversion_is_refused_by_connected_layers():
    from torch.nn.utils.parametrize import register_parametrization

    class Double(nn.Module):
        def forward(self, weight):
            return 2 * weight

    model = add_task_connections(Residual(), TASKS)
    assert len(connected_layers(model)) == 2
    register_parametrization(model.conv1, "weight", Double())
    with pytest.raises(ValueError, match="layer 'conv1' .* has a computed weight"):
        connected_layers(model)


def test_scale_shift_skips_the_out_proj_of_multihead_attention():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    add_task_connections(layer, ["a", "b"], mode="scale_shift")
    assert [c.name for c in connected_layers(layer)] == ["linear1", "linear2"]
    assert not hasattr(layer.self_attn.out_proj, "task_connection")
    assert not any("out_proj.task_connection" in name for name, _ in layer.named_parameters())
    x = torch.randn(2, 3, 8)
    with active_task(layer, "a"):
        reference = layer(x)
    for connection in connected_layers(layer):  # every connection that is kept changes task b's output
        with torch.no_grad():
            connection.connection.scale["b"].fill_(3.0)
        with active_task(layer, "b"):
            assert not torch.allclose(layer(x), reference, atol=1e-4), connection.name
        with torch.no_grad():
            connection.connection.scale["b"].fill_(1.0)
    with pytest.raises(ValueError, match="out_proj does not count"):
        add_task_connections(nn.MultiheadAttention(8, 2), TASKS, mode="scale_shift")


# -- Hub models convert themselves --------------------------------------------------------------------


def hub_model(kind: str):
    from test_hub_fixtures import bert_config, resnet_config

    from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel

    torch.manual_seed(0)
    if kind == "text":
        tasks = [{"name": "a", "kind": "sequence_classification", "num_outputs": 3}, {"name": "b", "kind": "regression"}]
        return MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=tasks))
    tasks = [{"name": "seg", "kind": "semantic_segmentation", "num_outputs": 5}, {"name": "depth", "kind": "depth"}]
    return MultiTaskModel(MultiTaskConfig(backbone_config=resnet_config(), tasks=tasks))


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_plugin_lets_a_hub_model_convert_its_backbone_so_it_saves_and_reloads(kind, tmp_path):
    from transformers import AutoModel

    import mtl_plugins.hub  # noqa: F401  (registers the model with AutoModel)

    model = hub_model(kind)
    assert mtl_plugins.build_architecture("task_connections", model.tasks, model=model) is model
    assert model.config.task_connections is not None  # recorded, so the folder reloads converted
    layers = connected_layers(model)
    assert layers and all(layer.name.startswith("backbone.") for layer in layers)
    assert not has_task_connections(model.heads)
    for connection in task_connections(model):  # trained-looking, task-dependent connections
        for parameter in connection.parameters():
            with torch.no_grad():
                parameter.add_(torch.rand_like(parameter))
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    model.eval()
    assert reloaded.config.task_connections == model.config.task_connections
    assert [layer.name for layer in connected_layers(reloaded)] == [layer.name for layer in layers]
    if kind == "text":
        inputs = {"input_ids": torch.randint(1, 50, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    else:
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        expected, got = model(**inputs).logits, reloaded(**inputs).logits
    for task in model.tasks:  # same weights; kernels may differ in the last bits with the memory layout
        torch.testing.assert_close(got[task], expected[task], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(expected[model.tasks[0]], hub_model(kind).eval()(**inputs).logits[model.tasks[0]])


def test_plugin_passes_options_to_the_model_and_checks_its_tasks():
    model = hub_model("text")
    with pytest.raises(ValueError, match=r"model's tasks are \['a', 'b'\]"):
        mtl_plugins.build_architecture("task_connections", ["a", "c"], model=model)
    mtl_plugins.build_architecture("task_connections", ["b", "a"], model=model, mode="scale_shift")
    assert model.config.task_connections == {"mode": "scale_shift"}

    class SelfConverting(nn.Module):
        tasks = ["a", "b"]

        def __init__(self):
            super().__init__()
            self.received = None

        def add_task_connections(self, mode="auto"):
            self.received = {"mode": mode}

    plain = SelfConverting()
    mtl_plugins.build_architecture("task_connections", ["a", "b"], model=plain, mode="batchnorm")
    assert plain.received == {"mode": "batchnorm"}
    with pytest.raises(TypeError, match=r"does not accept the options \['example_input'\]"):
        mtl_plugins.build_architecture("task_connections", ["a", "b"], model=SelfConverting(),
                                       example_input=torch.zeros(1))


def test_float64_strengths_keep_a_1e9_relative_gap():
    # Two tasks, two channels of equal weight: task b's gamma on channel 0 is 1e-9 larger, so its
    # normalised strength there is ~1e-9 (relatively) larger and b is the top task. In float32 the
    # gap vanishes (a tie, which goes to task a).
    model = add_task_connections(nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2)), ["a", "b"],
                                 example_input=torch.randn(2, 1, 3, 3)).double()
    with torch.no_grad():
        model[0].weight.fill_(0.5)
        model[1].norms["b"].weight[0] = 1 + 1e-9
    layer = connected_layers(model)[0]
    strength = layer_strength(layer)
    assert strength.dtype == torch.float64
    rows = []
    for task in ("a", "b"):
        norm = model[1].norms[task]  # plain float64 arithmetic
        raw = [float(norm.weight[p].detach()) ** 2 / (float(norm.running_var[p]) + 1e-5) * 0.25 for p in range(2)]
        rows.append([r / sum(raw) for r in raw])
    assert rows[1][0] / rows[0][0] - 1 == pytest.approx(1e-9, rel=1e-3)
    torch.testing.assert_close(strength, torch.tensor(rows, dtype=torch.float64), rtol=1e-15, atol=0)
    assert top_priority_task(strength).tolist() == [1, 0]
    float32 = torch.tensor(rows, dtype=torch.float32)
    assert float32[0, 0] == float32[1, 0] and top_priority_task(float32).tolist() == [0, 0]


def test_top_priority_ties_go_to_the_lowest_task_index():
    # Exact ties of 2 to 5 tasks, in columns where the tied tasks are not the first ones.
    g = torch.Generator().manual_seed(0)
    strength = torch.rand(5, 40, generator=g)
    for p in range(40):
        tied = torch.randperm(5, generator=g)[: 2 + p % 4]
        strength[tied, p] = 2.0
    expected = [min(t for t in range(5) if strength[t, p] == strength[:, p].max()) for p in range(40)]
    assert top_priority_task(strength).tolist() == expected
    assert {sum(strength[:, p] == 2.0).item() for p in range(40)} == {2, 3, 4, 5}


def test_norms_without_affine_parameters_are_incomplete():
    model = add_task_connections(nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2, affine=False),
                                               nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2)), ["a", "b"],
                                 example_input=torch.randn(2, 1, 3, 3))
    first, second = connected_layers(model)
    assert not first.connection.complete and second.connection.complete
    factors = first.connection.strength_factors()  # gamma = 1: 1 / (running_var + eps)
    torch.testing.assert_close(factors, torch.full((2, 2), 1 / (1 + 1e-5)))
