"""Model cards and push_to_hub (the upload intercepted: no network)."""

import pytest
import torch
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from safetensors.torch import load
from test_hub_fixtures import DENSE_TASKS, TEXT_TASKS, bert_config, convnext_config, resnet_config, vit_config
from torch import nn

import mtl_plugins
from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel, build_model_card
from mtl_plugins.hub.card import card_fields_from_strategy

METRICS = {"sentiment/accuracy": 0.8125, "score/mae": 0.4321}
SETTINGS = {"warmup_steps": 100, "beta": 0.001}


def text_config(**options):
    return MultiTaskConfig(backbone_config=bert_config(), tasks=TEXT_TASKS[:2], **options)


def test_card_metadata_and_text_carry_every_field():
    card = build_model_card(
        text_config(backbone_pretrained="packaged:all-MiniLM-L6-v2"), repo_id="org/drug-mtl", method="sel_update",
        method_settings=SETTINGS, metrics=METRICS, delta_m=3.25, datasets=["drug_reviews"],
        task_groups=[["sentiment"], ["score"]], license="apache-2.0",
    )
    data = card.data.to_dict()
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["datasets"] == ["drug_reviews"] and data["library_name"] == "transformers"
    assert data["license"] == "apache-2.0"
    assert data["tags"] == ["mtl-plugins", "multi-task-learning", "sel_update"]
    assert data["mtl_tasks"] == [
        {"name": "sentiment", "kind": "sequence_classification", "num_outputs": 3, "loss_weight": 1.0},
        {"name": "score", "kind": "regression", "num_outputs": 1, "loss_weight": 1.0},
    ]
    assert data["mtl_method"] == "sel_update" and data["mtl_method_settings"] == SETTINGS
    assert data["mtl_metrics"] == METRICS and data["mtl_delta_m"] == 3.25
    assert data["mtl_task_groups"] == [["sentiment"], ["score"]] and "mtl_priority_stats" not in data
    text = card.text
    assert text.startswith("# drug-mtl")
    assert "| sentiment | sequence_classification | 3 | 1 |" in text
    assert "| warmup_steps | 100 |" in text and "| sentiment | accuracy | 0.8125 |" in text
    assert "Delta_m against single-task models: +3.25%" in text and "- sentiment\n- score" in text
    assert 'AutoModel.from_pretrained("org/drug-mtl")' in text
    assert ModelCard(str(card)).data.to_dict() == data  # the card parses back to the same metadata


def test_card_rejects_metrics_and_groups_that_do_not_fit_the_tasks():
    with pytest.raises(ValueError, match="metrics keys must be '<task>/<metric>'"):
        build_model_card(text_config(), metrics={"rating/accuracy": 0.5})
    with pytest.raises(ValueError, match="must partition the tasks"):
        build_model_card(text_config(), task_groups=[["sentiment"]])
    local = build_model_card(text_config(backbone_pretrained=None))
    assert local.data.base_model is None and "mtl_method" not in local.data.to_dict()


def priority_from_batchnorms(model, tasks):
    """The spec's task priority, from the shared convolutions and their per-task BatchNorms: per layer,
    the share of channels p whose top task argmax_t S^_p^t is t, where S_p^t = gamma_{t,p}^2 /
    (running_var_{t,p} + 1e-5) * sum_q W[p, q]^2, normalised over channels per task."""
    names = {id(m): n for n, m in model.named_modules()}
    stats = {}
    for module in model.modules():
        norms = getattr(module, "norms", None)
        if not isinstance(norms, nn.ModuleDict):
            continue
        conv = module.source
        row_norms = conv.weight.detach().double().pow(2).flatten(1).sum(1)
        strength = torch.stack([norms[t].weight.detach().double() ** 2 / (norms[t].running_var.double() + 1e-5)
                                * row_norms for t in tasks])
        top = (strength / strength.sum(1, keepdim=True)).argmax(0)
        stats[names[id(conv)]] = [float((top == k).double().mean()) for k in range(len(tasks))]
    return stats


def test_card_fields_from_strategies():
    ew = card_fields_from_strategy(mtl_plugins.build_strategy("ew", ["sentiment", "score"], loss_weights={"score": 2.0}))
    assert ew == {"method": "ew", "method_settings": {"loss_weights": {"sentiment": 1.0, "score": 2.0}, "seed": 0}}
    sel = mtl_plugins.build_strategy("sel_update", ["sentiment", "score"], warmup_steps=5)
    sel.groups = [["score", "sentiment"]]
    fields = card_fields_from_strategy(sel)
    assert fields["method"] == "sel_update" and fields["task_groups"] == [["score", "sentiment"]]
    assert fields["method_settings"]["warmup_steps"] == 5 and fields["method_settings"]["affinity_decay"] == 0.001
    assert "- score, sentiment" in build_model_card(text_config(), **fields).text
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=resnet_config(), tasks=DENSE_TASKS[:2])).add_task_connections()
    strategy = mtl_plugins.build_strategy("conn_strength", model.tasks, model=model, schedule="phase2")
    with torch.no_grad():  # distinct per-task BatchNorm scales and variances, so each task leads some channels
        for module in model.modules():
            if isinstance(getattr(module, "norms", None), nn.ModuleDict):
                for norm in module.norms.values():
                    norm.weight.uniform_(0.5, 1.5)
                    norm.running_var.uniform_(0.5, 2.0)
    fields = card_fields_from_strategy(strategy)
    assert fields["method"] == "conn_strength" and fields["method_settings"]["schedule"] == "phase2"
    expected = priority_from_batchnorms(model, model.tasks)
    assert set(fields["priority_stats"]) == set(expected) and len(expected) > 0
    for layer, shares in expected.items():
        assert fields["priority_stats"][layer] == pytest.approx(shares, abs=1e-6)
    assert any(0 < s < 1 for shares in expected.values() for s in shares)  # the oracle is not trivial
    card = build_model_card(model.config, **fields)
    layer, shares = next(iter(fields["priority_stats"].items()))
    assert card.data.mtl_priority_stats == fields["priority_stats"]
    assert f"| {layer} | {shares[0]:.4g} | {shares[1]:.4g} |" in card.text


def test_push_to_hub_sends_weights_config_and_card_in_one_commit(monkeypatch):
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = {"repo_id": repo_id, **kwargs,
                           "files": {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}}
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=convnext_config(), tasks=DENSE_TASKS[:2]))
    result = model.push_to_hub("org/nyud-mtl", private=True, method="ew", metrics={"seg/miou": 0.41}, delta_m=-1.5,
                               datasets=["nyud-v2"], base_model="facebook/convnext-tiny-224")
    assert result == "commit-info"
    assert calls["create_repo"] == ("org/nyud-mtl", {"private": True, "exist_ok": True})
    commit = calls["commit"]
    assert commit["repo_id"] == "org/nyud-mtl" and commit["commit_message"] == "Upload multi-task model"
    assert commit["revision"] is None and commit["create_pr"] is False
    assert sorted(commit["files"]) == ["README.md", "config.json", "model.safetensors"]
    weights = load(commit["files"]["model.safetensors"])
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    card = ModelCard(commit["files"]["README.md"].decode())
    assert card.data.base_model == "facebook/convnext-tiny-224" and card.data.datasets == ["nyud-v2"]
    assert card.data.mtl_method == "ew" and card.data.mtl_metrics == {"seg/miou": 0.41}
    assert card.data.mtl_delta_m == -1.5 and [t["name"] for t in card.data.mtl_tasks] == ["seg", "parts"]
    assert b'"model_type": "mtl_multitask"' in commit["files"]["config.json"]
    calls.clear()
    with pytest.raises(TypeError, match="methd"):
        model.push_to_hub("org/x", methd="ew")
    assert calls == {}  # a bad card field stops before anything is created or uploaded


def intercept_uploads(monkeypatch) -> dict:
    """Replace the Hub calls of push_to_hub; the returned dict receives the uploaded files."""
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo",
                        lambda self, repo_id, **kwargs: RepoUrl(f"https://huggingface.co/{repo_id}"))

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_to_hub_takes_the_training_strategy_for_the_card(monkeypatch):
    calls = intercept_uploads(monkeypatch)
    torch.manual_seed(0)
    model = MultiTaskModel(text_config())
    strategy = mtl_plugins.build_strategy("sel_update", model.tasks, warmup_steps=5)
    strategy.groups = [["score"], ["sentiment"]]
    assert model.push_to_hub("org/drug-mtl", metrics=METRICS, strategy=strategy) == "commit-info"
    card = ModelCard(calls["files"]["README.md"].decode())
    assert card.data.mtl_method == "sel_update" and card.data.mtl_method_settings["warmup_steps"] == 5
    assert card.data.mtl_task_groups == [["score"], ["sentiment"]] and card.data.mtl_metrics == METRICS
    assert "sel_update" in card.data.tags and "- score\n- sentiment" in card.text
    # fields given explicitly win over the strategy's
    model.push_to_hub("org/drug-mtl", strategy=strategy, method="my_method")
    assert ModelCard(calls["files"]["README.md"].decode()).data.mtl_method == "my_method"


@pytest.mark.parametrize("mode", ["batchnorm", "scale_shift"])
def test_card_states_the_task_connection_mode(mode):
    torch.manual_seed(0)
    if mode == "batchnorm":
        model = MultiTaskModel(MultiTaskConfig(backbone_config=resnet_config(), tasks=DENSE_TASKS[:2]))
    else:
        model = MultiTaskModel(text_config())
    card = build_model_card(model.add_task_connections().config)  # mode "auto" resolves to the one applied
    assert card.data.mtl_task_connections == {"mode": mode}
    section = card.text.split("## Task-specific connections\n\n")[1].split("\n\n")[0]
    assert section.startswith(f"Mode `{mode}`:")
    if mode == "batchnorm":
        assert "one BatchNorm per task" in section and "Jeong & Yoon (CVPR 2024)" in section
        assert "extension" not in section
    else:
        assert "this project's extension of the CVPR 2024 method" in section
        assert "defines task-specific BatchNorm connections for CNNs" in section
    assert "## Task-specific connections" not in build_model_card(text_config()).text


def test_card_metadata_is_plain_yaml_with_the_tasks_hub_type_as_pipeline_tag():
    model = MultiTaskModel(MultiTaskConfig(backbone_config=resnet_config(), tasks=DENSE_TASKS[:2])).add_task_connections()
    strategy = mtl_plugins.build_strategy("conn_strength", model.tasks, model=model, schedule="phase2")
    card = build_model_card(model.config, datasets=["nyud-v2"], metrics={"seg/miou": 0.4},
                            **card_fields_from_strategy(strategy))
    header = str(card).split("---\n")[1]
    data = yaml.safe_load(header)  # no Python-specific tags
    assert data["library_name"] == "transformers" and data["datasets"] == ["nyud-v2"]
    assert data["tags"] == ["mtl-plugins", "multi-task-learning", "conn_strength"]
    assert data["mtl_priority_stats"] == strategy.priority()
    assert data["pipeline_tag"] == "image-segmentation"  # seg and parts
    assert "no transformers `pipeline` runs a multi-task model" in card.text

    def tag(*indices):
        config = MultiTaskConfig(backbone_config=resnet_config(), tasks=[DENSE_TASKS[i] for i in indices])
        return build_model_card(config).data.to_dict()["pipeline_tag"]

    assert tag(4, 3) == "image-to-image" and tag(3, 4) == "depth-estimation"  # a tie: the earliest task's
    assert tag(4, 3, 0, 2) == "image-segmentation"  # the type most tasks share
    assert build_model_card(text_config()).data.to_dict()["pipeline_tag"] == "text-classification"


def usage_code(card: ModelCard) -> str:
    return card.text.split("## Usage\n\n")[1].split("```python\n")[1].split("```")[0]


@pytest.mark.parametrize("make_config", [resnet_config, vit_config, bert_config])
def test_card_usage_snippet_runs_as_written(tmp_path, make_config):
    tasks = TEXT_TASKS[:2] if make_config is bert_config else DENSE_TASKS[:2]
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=make_config(), tasks=tasks))
    model.save_pretrained(tmp_path)
    code = usage_code(build_model_card(model.config))
    assert "inputs = " in code and 'from_pretrained("path/to/checkpoint")' in code
    namespace = {}
    exec(code.replace("path/to/checkpoint", str(tmp_path)), namespace)
    assert set(namespace["outputs"]) == set(model.tasks)


def test_card_usage_snippet_tokenizes_text_with_the_base_model():
    code = usage_code(build_model_card(text_config(backbone_pretrained="packaged:all-MiniLM-L6-v2"), repo_id="org/x"))
    assert 'AutoModel.from_pretrained("org/x")' in code
    assert 'tokenizer = AutoTokenizer.from_pretrained("sentence-transformers/all-MiniLM-L6-v2")' in code
    assert 'inputs = tokenizer(["An example sentence."], return_tensors="pt")' in code


def test_card_metadata_has_a_model_index_with_the_test_metrics():
    model = MultiTaskModel(MultiTaskConfig(backbone_config=resnet_config(), tasks=DENSE_TASKS[:4]))
    metrics = {"seg/miou": 0.41, "depth/rmse": 0.6}
    card = build_model_card(model.config, repo_id="org/nyud-mtl", datasets=["nyud-v2"], metrics=metrics)
    data = yaml.safe_load(str(card).split("---\n")[1])
    (entry,) = data["model-index"]
    assert entry["name"] == "nyud-mtl"
    found = {(r["task"]["type"], r["task"]["name"], r["dataset"]["name"], m["type"], m["value"])
             for r in entry["results"] for m in r["metrics"]}
    assert found == {("image-segmentation", "seg", "nyud-v2", "miou", 0.41),
                     ("depth-estimation", "depth", "nyud-v2", "rmse", 0.6)}
    assert "model-index" not in yaml.safe_load(str(build_model_card(model.config)).split("---\n")[1])
    assert usage_code(card).startswith("# pip install mtl-plugins\n")
