"""MultiTaskConfig / MultiTaskModel: config checks, heads against manual references, losses, parameters, predict."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_hub_fixtures import (
    DENSE_TASKS,
    TEXT_TASKS,
    bert_config,
    convnext_config,
    dense_labels,
    resnet_config,
    swin_config,
    text_batch,
    vit_config,
)

from mtl_plugins.hub import HEAD_KINDS, MultiTaskConfig, MultiTaskModel, resolve_pretrained
from mtl_plugins.losses import balanced_bce, depth_l1, edge_bce, masked_cross_entropy, normals_l1
from mtl_plugins.param_groups import parameter_groups


def dense_model(backbone_config, tasks=DENSE_TASKS, seed=0, **options):
    torch.manual_seed(seed)
    return MultiTaskModel(MultiTaskConfig(backbone_config=backbone_config, tasks=tasks, **options))


# -- configuration -------------------------------------------------------------------------------


def test_config_fills_task_defaults_by_kind():
    config = MultiTaskConfig(backbone_config=convnext_config(), tasks=DENSE_TASKS[2:5])
    assert config.tasks == [
        {"name": "sal", "kind": "saliency", "num_outputs": 1, "loss_weight": 1.0, "ignore_index": 255},
        {"name": "depth", "kind": "depth", "num_outputs": 1, "loss_weight": 1.0, "ignore_index": 255},
        {"name": "normals", "kind": "normals", "num_outputs": 3, "loss_weight": 2.0, "ignore_index": 255},
    ]
    text = MultiTaskConfig(backbone_config=bert_config().to_dict(), tasks=TEXT_TASKS[1:2])
    assert text.backbone_config.model_type == "bert"
    assert text.tasks[0]["ignore_index"] == -100 and text.tasks[0]["num_outputs"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": [{"name": "a", "kind": "panoptic"}]}, "unknown kind 'panoptic'"),
        ({"tasks": [{"name": "a", "kind": "sequence_classification", "num_outputs": 2}]}, "needs a text backbone"),
        ({"tasks": [{"name": "a", "kind": "semantic_segmentation"}]}, "needs a positive integer 'num_outputs'"),
        ({"tasks": [{"name": "a", "kind": "normals", "num_outputs": 2}]}, "'normals' has 3 output"),
        ({"tasks": [{"name": "a", "kind": "depth"}, {"name": "a", "kind": "edges"}]}, "duplicate task names"),
        ({"tasks": [{"name": "a", "kind": "depth", "weight": 2}]}, "unknown keys \\['weight'\\]"),
        ({"tasks": [{"name": "a", "kind": "depth", "loss_weight": -1}]}, "loss_weight must be a non-negative"),
        ({"tasks": [{"name": "a", "kind": "depth"}], "feature_levels": [0, 2]}, "feature_levels must be distinct"),
        ({"tasks": "depth"}, "tasks must be a list of task dicts"),
    ],
)
def test_config_errors_name_the_problem(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MultiTaskConfig(backbone_config=convnext_config(), **kwargs)


def test_config_backbone_errors():
    with pytest.raises(ValueError, match="needs a 'model_type'"):
        MultiTaskConfig(backbone_config={"hidden_size": 8}, tasks=[])
    with pytest.raises(ValueError, match="has no backbone"):
        MultiTaskModel(MultiTaskConfig(tasks=[{"name": "a", "kind": "depth"}]))
    with pytest.raises(ValueError, match="has no tasks"):
        MultiTaskModel(MultiTaskConfig(backbone_config=convnext_config()))
    with pytest.raises(ValueError, match="unknown packaged checkpoint"):
        resolve_pretrained("packaged:nothing")
    t5 = {"model_type": "t5", "vocab_size": 32, "d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2}
    with pytest.raises(ValueError, match="'t5' is an encoder-decoder"):
        MultiTaskConfig(backbone_config=t5, tasks=[{"name": "a", "kind": "regression"}])


def test_default_feature_levels_spread_over_the_stages():
    assert MultiTaskConfig(backbone_config=vit_config(layers=12), tasks=[]).feature_levels == [3, 6, 9, 12]
    assert MultiTaskConfig(backbone_config=vit_config(layers=2), tasks=[]).feature_levels == [1, 2]
    config = MultiTaskConfig(backbone_config=convnext_config(), tasks=[])
    assert config.feature_levels == [1, 2, 3, 4]
    assert config.backbone_config.out_features == ["stage1", "stage2", "stage3", "stage4"]
    chosen = MultiTaskConfig(backbone_config=convnext_config(), tasks=[], feature_levels=[4, 2])
    assert chosen.feature_levels == [2, 4] and chosen.backbone_config.out_indices == [2, 4]


# -- heads against manual references -------------------------------------------------------------


@pytest.mark.parametrize("make_config", [convnext_config, resnet_config, swin_config])
def test_dense_head_is_1x1_conv_on_fused_levels_upsampled_to_input(make_config):
    model = dense_model(make_config()).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = model.backbone(x).feature_maps
    assert len(maps) == 4
    largest = maps[0].shape[-2:]
    fused = torch.cat([F.interpolate(m, size=largest, mode="bilinear", align_corners=False) for m in maps], dim=1)
    logits = model(pixel_values=x).logits
    for task in DENSE_TASKS:
        conv = model.heads[task["name"]].conv
        manual = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], fused) + conv.bias[None, :, None, None]
        manual = F.interpolate(manual, size=(32, 32), mode="bilinear", align_corners=False)
        assert logits[task["name"]].shape == (2, task.get("num_outputs", HEAD_KINDS[task["kind"]].fixed_outputs), 32, 32)
        torch.testing.assert_close(logits[task["name"]], manual, rtol=1e-5, atol=1e-5)


def test_vit_features_are_patch_tokens_of_chosen_blocks():
    model = dense_model(vit_config(), tasks=DENSE_TASKS[:1], feature_levels=[2, 4]).eval()
    x = torch.randn(1, 3, 32, 32)
    hidden = model.backbone(x, output_hidden_states=True).hidden_states
    maps = [hidden[level][:, 1:].transpose(1, 2).reshape(1, 16, 4, 4) for level in (2, 4)]
    conv = model.heads["seg"].conv
    manual = F.conv2d(torch.cat(maps, dim=1), conv.weight, conv.bias)
    manual = F.interpolate(manual, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model(pixel_values=x).logits["seg"], manual, rtol=1e-5, atol=1e-5)
    # other image sizes interpolate the position embeddings; sizes must be multiples of the patch size
    assert model(pixel_values=torch.randn(1, 3, 48, 40)).logits["seg"].shape == (1, 5, 48, 40)
    with pytest.raises(ValueError, match="not a multiple of the ViT patch size 8"):
        model(pixel_values=torch.randn(1, 3, 30, 32))


def test_text_heads_use_masked_mean_pooling_and_token_states():
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS)).eval()
    batch = text_batch()
    states = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (states * mask).sum(1) / mask.sum(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(logits["sentiment"], model.heads["sentiment"].linear(pooled))
    torch.testing.assert_close(logits["score"], model.heads["score"].linear(pooled))
    torch.testing.assert_close(logits["tags"], model.heads["tags"].linear(states))
    cls_model = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS[:1], pooling="cls")).eval()
    states = cls_model.backbone(input_ids=batch["input_ids"]).last_hidden_state
    torch.testing.assert_close(cls_model(input_ids=batch["input_ids"]).logits["sentiment"],
                               cls_model.heads["sentiment"].linear(states[:, 0]))


def test_pretrained_text_encoder_weights_come_from_the_package_safetensors():
    model = MultiTaskModel(MultiTaskConfig(backbone_pretrained="packaged:all-MiniLM-L6-v2", tasks=TEXT_TASKS[:1]))
    saved = load_file(f"{resolve_pretrained('packaged:all-MiniLM-L6-v2')}/model.safetensors")
    backbone = model.backbone.state_dict()
    assert set(backbone) == {k for k in saved if not k.startswith("pooler.")} - {"embeddings.position_ids"}
    assert all(torch.equal(backbone[k], saved[k]) for k in backbone)
    assert model.config.backbone_config.hidden_size == 384 and model.heads["sentiment"].linear.in_features == 384


@pytest.mark.parametrize("make_config", [convnext_config, vit_config])
def test_pretrained_vision_backbone_weights_come_from_a_local_checkpoint(tmp_path, make_config):
    from transformers import AutoModel

    torch.manual_seed(0)
    AutoModel.from_config(make_config()).save_pretrained(tmp_path)
    saved = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if not k.startswith("pooler.")}
    model = MultiTaskModel(MultiTaskConfig(backbone_pretrained=str(tmp_path), tasks=DENSE_TASKS[:1]))
    backbone = model.backbone.state_dict()
    # transformers may rename checkpoint keys on load, so tensors are matched by value
    def found(tensor, pool):
        return any(t.shape == tensor.shape and torch.equal(t, tensor) for t in pool.values())

    assert len(saved) > 10 and all(found(v, backbone) for v in saved.values())
    # only the backbone's own per-stage norms (absent from a plain model checkpoint) are new
    assert all(k.startswith("hidden_states_norms.") for k, v in backbone.items() if not found(v, saved))


# -- losses through the model --------------------------------------------------------------------


def test_dense_losses_per_kind_and_weighted_total():
    model = dense_model(convnext_config())
    labels = dense_labels()
    out = model(pixel_values=torch.randn(2, 3, 32, 32), **labels)
    expected = {
        "seg": masked_cross_entropy(out.logits["seg"], labels["seg"]),
        "parts": masked_cross_entropy(out.logits["parts"], labels["parts"]),
        "sal": balanced_bce(out.logits["sal"], labels["sal"]),
        "depth": depth_l1(out.logits["depth"], labels["depth"]),
        "normals": normals_l1(out.logits["normals"], labels["normals"]),
        "edges": edge_bce(out.logits["edges"], labels["edges"]),
    }
    for task, value in expected.items():
        torch.testing.assert_close(out.losses[task], value)
    total = sum(value for task, value in expected.items() if task != "normals") + 2.0 * expected["normals"]
    torch.testing.assert_close(out.loss, total)


def test_text_losses_per_kind():
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS)).eval()
    batch = text_batch()
    out = model(**batch)
    logits = out.logits
    torch.testing.assert_close(out.losses["sentiment"], F.cross_entropy(logits["sentiment"], batch["sentiment"]))
    torch.testing.assert_close(out.losses["score"], F.mse_loss(logits["score"][:, 0], batch["score"]))
    torch.testing.assert_close(out.losses["tags"], F.cross_entropy(logits["tags"].reshape(-1, 4), batch["tags"].reshape(-1)))
    torch.testing.assert_close(out.loss, out.losses["sentiment"] + out.losses["score"] + 0.5 * out.losses["tags"])


def test_labels_mapping_task_path_and_input_errors():
    model = dense_model(convnext_config(), tasks=DENSE_TASKS[:2]).eval()
    x, labels = torch.randn(2, 3, 32, 32), dense_labels()
    full = model(pixel_values=x, labels={"seg": labels["seg"]}, parts=labels["parts"])
    one = model(pixel_values=x, task="parts", labels={"seg": labels["seg"], "parts": labels["parts"]})
    assert set(one.logits) == {"parts"} and set(one.losses) == {"parts"}
    torch.testing.assert_close(one.losses["parts"], full.losses["parts"])
    assert model(pixel_values=x).loss is None and model(pixel_values=x).losses is None
    with pytest.raises(ValueError, match=r"missing labels for tasks \['parts'\]"):
        model(pixel_values=x, seg=labels["seg"])
    with pytest.raises(TypeError, match=r"unexpected inputs \['depth'\]"):
        model(pixel_values=x, depth=labels["depth"])
    with pytest.raises(TypeError, match="labels must map task names to tensors"):
        model(pixel_values=x, labels=labels["seg"])
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        model(pixel_values=x, task="depth")
    with pytest.raises(ValueError, match="vision backbone: pass pixel_values"):
        model(input_ids=torch.ones(2, 3, dtype=torch.long))
    text = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS[:1]))
    with pytest.raises(ValueError, match="text encoder: pass input_ids"):
        text(pixel_values=x)


# -- parameters and predict ----------------------------------------------------------------------


def test_shared_and_task_specific_parameters_partition_the_model():
    model = dense_model(convnext_config(), tasks=DENSE_TASKS[:3])
    shared = {id(p) for p in model.get_share_params()}
    per_task = [{id(p) for p in model.task_specific_parameters(t)} for t in model.tasks]
    assert shared == {id(p) for p in model.backbone.parameters()}
    assert per_task[0] == {id(p) for p in model.heads["seg"].parameters()}
    assert not any(shared & s for s in per_task) and not (per_task[0] & per_task[1])
    assert shared | set().union(*per_task) == {id(p) for p in model.parameters()}
    groups = parameter_groups(model, lr=1e-3, lr_ts=3.0)
    assert [g["lr"] for g in groups] == [1e-3, 3e-3]
    assert {id(p) for p in groups[1]["params"]} == set().union(*per_task)


def test_predict_returns_user_units_and_keeps_training_mode():
    model = dense_model(convnext_config()).train()
    x = torch.randn(2, 3, 32, 32)
    predictions = model.predict({"pixel_values": x, "seg": dense_labels()["seg"]})
    assert model.training
    logits = model.eval()(pixel_values=x).logits
    assert torch.equal(predictions["seg"], logits["seg"].argmax(1)) and predictions["seg"].dtype == torch.long
    torch.testing.assert_close(predictions["sal"], torch.sigmoid(logits["sal"])[:, 0])
    torch.testing.assert_close(predictions["edges"], torch.sigmoid(logits["edges"])[:, 0])
    torch.testing.assert_close(predictions["depth"], logits["depth"][:, 0].clamp_min(0))
    torch.testing.assert_close(predictions["normals"].norm(dim=1), torch.ones(2, 32, 32))
    assert set(model.predict(x, task="depth")) == {"depth"}
    torch.manual_seed(0)
    text = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS)).eval()
    batch = text_batch()
    out = text.predict(batch)
    logits = text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(out["sentiment"], logits["sentiment"].argmax(1))
    torch.testing.assert_close(out["score"], logits["score"][:, 0])
    assert out["tags"].shape == (3, 7) and torch.equal(out["tags"], logits["tags"].argmax(-1))


# -- dense regression (signed maps with any channel count) -----------------------------------------


def test_dense_regression_head_predicts_any_channels_with_l1_or_mse_over_every_pixel(tmp_path):
    tasks = [{"name": "curvature", "kind": "dense_regression", "num_outputs": 2, "loss": "mse"},
             {"name": "reshading", "kind": "dense_regression", "num_outputs": 5},
             {"name": "keypoints", "kind": "dense_regression", "num_outputs": 1, "ignore_index": -1.0}]
    model = dense_model(convnext_config(), tasks=tasks).eval()
    assert [t.get("loss") for t in model.config.tasks] == ["mse", "l1", "l1"]
    assert [t["ignore_index"] for t in model.config.tasks] == [None, None, -1.0]
    x = torch.randn(2, 3, 32, 32)
    maps = model.backbone(x).feature_maps
    largest = maps[0].shape[-2:]
    fused = torch.cat([F.interpolate(m, size=largest, mode="bilinear", align_corners=False) for m in maps], dim=1)
    g = torch.Generator().manual_seed(1)
    labels = {"curvature": torch.randn(2, 2, 32, 32, generator=g), "reshading": torch.randn(2, 5, 32, 32, generator=g),
              "keypoints": torch.randn(2, 1, 32, 32, generator=g)}
    labels["keypoints"][:, :, :8] = -1.0
    out = model(pixel_values=x, **labels)
    for task in tasks:
        conv = model.heads[task["name"]].conv
        manual = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], fused) + conv.bias[None, :, None, None]
        manual = F.interpolate(manual, size=(32, 32), mode="bilinear", align_corners=False)
        assert out.logits[task["name"]].shape == (2, task["num_outputs"], 32, 32)
        torch.testing.assert_close(out.logits[task["name"]], manual, rtol=1e-5, atol=1e-5)
    logits = out.logits
    torch.testing.assert_close(out.losses["curvature"], ((logits["curvature"] - labels["curvature"]) ** 2).mean())
    torch.testing.assert_close(out.losses["reshading"], (logits["reshading"] - labels["reshading"]).abs().mean())
    kept = labels["keypoints"] != -1.0
    torch.testing.assert_close(out.losses["keypoints"], (logits["keypoints"] - labels["keypoints"])[kept].abs().mean())
    predictions = model.predict(x)
    torch.testing.assert_close(predictions["reshading"], logits["reshading"])
    assert (predictions["reshading"] < 0).any()  # signed values are kept as they are
    model.save_pretrained(tmp_path)
    reloaded = MultiTaskModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.tasks == model.config.tasks
    torch.testing.assert_close(reloaded(pixel_values=x, **labels).loss, out.loss)


def test_dense_regression_config_errors_and_recipe_losses():
    from mtl_plugins.data.dense.taskonomy import TASKS
    from mtl_plugins.hub.recipe import head_task
    from mtl_plugins.tasks import TaskSpec

    with pytest.raises(ValueError, match="'dense_regression' trains with one of \\['l1', 'mse'\\], got loss='huber'"):
        MultiTaskConfig(tasks=[{"name": "a", "kind": "dense_regression", "num_outputs": 1, "loss": "huber"}])
    with pytest.raises(ValueError, match="kind 'depth' has a fixed loss"):
        MultiTaskConfig(tasks=[{"name": "a", "kind": "depth", "loss": "mse"}])
    with pytest.raises(ValueError, match="ignore_index must be a number or None"):
        MultiTaskConfig(tasks=[{"name": "a", "kind": "dense_regression", "num_outputs": 1, "ignore_index": "x"}])
    losses = {t: head_task(t, spec, None, 1.0).get("loss") for t, spec in TASKS.items()}
    assert losses == {t: ("mse" if spec.loss == "mse" else None if spec.kind == "normals" else "l1")
                      for t, spec in TASKS.items()}
    assert losses["principal_curvature"] == "mse" and losses["reshading"] == "l1"
    with pytest.raises(ValueError, match="the dense_regression head trains with"):
        head_task("a", TaskSpec("dense_regression", 1, "huber", "l1", False), None, 1.0)


# -- regression heads: ignore value and label shapes ---------------------------------------------


def regression_model(**score_options):
    tasks = [{"name": "score", "kind": "regression", **score_options},
             {"name": "pair", "kind": "regression", "num_outputs": 2}]
    torch.manual_seed(0)
    return MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=tasks)).eval()


def test_regression_labels_equal_to_ignore_index_add_no_loss():
    model = regression_model()
    assert [t["ignore_index"] for t in model.config.tasks] == [-100, -100]
    ids = text_batch()["input_ids"]
    score, pair = torch.tensor([0.5, -100.0, 2.0]), torch.tensor([[1.0, -100.0], [0.0, 1.0], [-100.0, -100.0]])
    out = model(input_ids=ids, score=score, pair=pair)
    s, p = out.logits["score"][:, 0].tolist(), out.logits["pair"].tolist()
    expected_score = ((s[0] - 0.5) ** 2 + (s[2] - 2.0) ** 2) / 2
    expected_pair = ((p[0][0] - 1.0) ** 2 + (p[1][0] - 0.0) ** 2 + (p[1][1] - 1.0) ** 2) / 3
    assert out.losses["score"].item() == pytest.approx(expected_score, rel=1e-5)
    assert out.losses["pair"].item() == pytest.approx(expected_pair, rel=1e-5)
    # ignore_index=None: -100 is an ordinary label
    plain = regression_model(ignore_index=None)
    assert plain.config.tasks[0]["ignore_index"] is None
    loss = plain(input_ids=ids, score=score, pair=pair).losses["score"].item()
    assert loss == pytest.approx(sum((a - b) ** 2 for a, b in zip(s, score.tolist())) / 3, rel=1e-5)


def test_regression_label_shape_errors_name_the_task_and_both_shapes():
    model = regression_model()
    ids = text_batch()["input_ids"]
    with pytest.raises(ValueError, match=r"task 'pair': .*labels of shape \(6,\) do not match predictions of shape \(3, 2\)"):
        model(input_ids=ids, score=torch.zeros(3), pair=torch.zeros(6))
    with pytest.raises(ValueError, match=r"task 'score': .*labels of shape \(1, 3\) do not match predictions of shape \(3, 1\)"):
        model(input_ids=ids, score=torch.zeros(1, 3), pair=torch.zeros(3, 2))
    assert model(input_ids=ids, score=torch.zeros(3, 1), pair=torch.zeros(3, 2)).loss is not None


def test_class_label_errors_name_the_task_the_expected_labels_and_what_came():
    tasks = [{"name": "sentiment", "kind": "sequence_classification", "num_outputs": 3}]
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=tasks)).eval()
    ids = text_batch()["input_ids"]
    with pytest.raises(ValueError, match=r"task 'sentiment': .*labels of shape \(3, 1\) do not match logits of shape "
                                         r"\(3, 3\): expected class indices of shape \(3,\)"):
        model(input_ids=ids, sentiment=torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"task 'sentiment': .*labels \[5\] are outside \[0, 2\]"):
        model(input_ids=ids, sentiment=torch.tensor([0, 5, 2]))


# -- task names that are forward arguments -------------------------------------------------------


def test_forward_argument_names_are_refused_as_task_names():
    import inspect

    from mtl_plugins.hub.configuration import RESERVED_TASK_NAMES

    params = inspect.signature(MultiTaskModel.forward).parameters.values()
    arguments = {p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD}
    assert set(RESERVED_TASK_NAMES) == arguments
    for name in sorted(arguments):
        with pytest.raises(ValueError, match=f"task name '{name}' is taken by an argument of MultiTaskModel.forward"):
            MultiTaskConfig(backbone_config=bert_config(), tasks=[{"name": name, "kind": "regression"}])


# -- reduced precision ---------------------------------------------------------------------------


def test_bfloat16_model_adds_connections_and_predicts_from_float32_inputs():
    from mtl_plugins.architectures.task_connections import has_task_connections

    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=resnet_config(), tasks=DENSE_TASKS[:2]))
    model = model.to(torch.bfloat16).add_task_connections()
    assert model.config.task_connections == {"mode": "batchnorm"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert has_task_connections(model.backbone)
    x = torch.randn(2, 3, 32, 32)
    from_float = model.predict(x)
    from_bf16 = model.predict(x.to(torch.bfloat16))
    assert from_float["seg"].shape == (2, 32, 32) and from_float["parts"].dtype == torch.long
    for task in model.tasks:
        assert torch.equal(from_float[task], from_bf16[task])
    text = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS[:2])).to(torch.bfloat16)
    batch = text_batch()
    out = text.predict({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    assert out["score"].dtype == torch.bfloat16 and out["sentiment"].dtype == torch.long


def test_predict_gives_class_names_when_the_config_has_them():
    from test_hub_fixtures import TEXT_TASKS, bert_config, text_batch

    tasks = [{**TEXT_TASKS[0], "labels": ["negative", "neutral", "positive"]}, TEXT_TASKS[1]]
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(), tasks=tasks))
    batch = {k: v for k, v in text_batch().items() if k in ("input_ids", "attention_mask")}
    ids = model.predict(batch)
    named = model.predict(batch, class_names=True)
    assert named["sentiment"] == [["negative", "neutral", "positive"][i] for i in ids["sentiment"].tolist()]
    assert torch.equal(named["score"], ids["score"])  # no class names: values unchanged
