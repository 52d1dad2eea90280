"""Saving and loading MultiTaskModel: safetensors round trips, AutoModel, the Hub cache by repo id,
remote code, task-specific connections, mismatch errors and the refusal of pickle checkpoints."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_hub_fixtures import DENSE_TASKS, TEXT_TASKS, bert_config, convnext_config, resnet_config, text_batch
from transformers import AutoConfig, AutoModel

from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel

ROOT = Path(__file__).resolve().parents[1]


def make_model(backbone_config=None, tasks=DENSE_TASKS[:2], seed=0, **options):
    torch.manual_seed(seed)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=backbone_config or convnext_config(), tasks=tasks, **options))
    with torch.no_grad():  # move away from the initialisation so a lost weight cannot go unnoticed
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def assert_same_model(a, b, inputs):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    out_a, out_b = a.eval()(**inputs).logits, b.eval()(**inputs).logits
    for task in out_a:
        torch.testing.assert_close(out_a[task], out_b[task], rtol=1e-6, atol=1e-6)


def run_python(code: str, **env: str) -> str:
    """Run ``code`` in a fresh interpreter (offline, the given environment) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_round_trip_writes_only_safetensors_and_config(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "mtl_multitask" and config["backbone_config"]["model_type"] == "convnext"
    assert [t["name"] for t in config["tasks"]] == ["seg", "parts"]
    loaded = MultiTaskModel.from_pretrained(tmp_path)
    assert_same_model(model, loaded, {"pixel_values": torch.randn(2, 3, 32, 32)})


def test_text_round_trip_and_auto_classes(tmp_path):
    model = make_model(bert_config(), TEXT_TASKS, pooling="cls", head_dropout=0.2)
    model.save_pretrained(tmp_path)
    batch = text_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, MultiTaskConfig) and config.pooling == "cls" and config.head_dropout == 0.2
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is MultiTaskModel and loaded.main_input_name == "input_ids"
    assert_same_model(model, loaded, inputs)


def test_from_pretrained_does_not_reread_the_backbone_checkpoint(tmp_path):
    torch.manual_seed(0)
    backbone = AutoModel.from_config(bert_config())
    backbone.save_pretrained(tmp_path / "backbone")
    model = MultiTaskModel(MultiTaskConfig(backbone_pretrained=str(tmp_path / "backbone"), tasks=TEXT_TASKS[:1]))
    original = backbone.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in model.backbone.state_dict().items())
    with torch.no_grad():
        model.backbone.embeddings.word_embeddings.weight.mul_(2)
    model.save_pretrained(tmp_path / "trained")
    for f in (tmp_path / "backbone").iterdir():
        f.unlink()
    loaded = MultiTaskModel.from_pretrained(tmp_path / "trained")
    torch.testing.assert_close(loaded.backbone.embeddings.word_embeddings.weight,
                               2 * original["embeddings.word_embeddings.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["batchnorm", "scale_shift"])
def test_task_specific_connections_are_saved_and_restored(tmp_path, mode):
    if mode == "batchnorm":
        model, inputs = make_model(resnet_config()), {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        batch = text_batch()
        model = make_model(bert_config(), TEXT_TASKS[:2])
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.add_task_connections(mode=mode)
    torch.manual_seed(1)
    with torch.no_grad():
        for task in model.tasks:
            for p in model.task_specific_parameters(task):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    first, second = model.tasks
    one = model(**inputs, task=first).logits[first]
    with torch.no_grad():  # the first task's connections change only its own output
        for p in model.task_specific_parameters(second):
            if p not in set(model.heads[second].parameters()):
                p.mul_(1.5)
    torch.testing.assert_close(model(**inputs, task=first).logits[first], one)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["task_connections"] == {"mode": mode}
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert any(f".{second}" in k or k.endswith(second) for k in keys if not k.startswith("heads."))
    loaded = MultiTaskModel.from_pretrained(tmp_path)
    assert_same_model(model, loaded, inputs)
    specific = {id(p) for t in loaded.tasks for p in loaded.task_specific_parameters(t)}
    assert not specific & {id(p) for p in loaded.get_share_params()}
    with pytest.raises(ValueError, match="already has task-specific connections"):
        loaded.add_task_connections()


def test_mismatched_tasks_or_kinds_are_clear_errors(tmp_path):
    make_model().save_pretrained(tmp_path)
    cases = [
        ({"tasks": ["seg"]}, r"the checkpoint has tasks \['parts'\] that were not requested"),
        ({"tasks": ["seg", "parts", "depth"]}, r"tasks \['depth'\] are not in the checkpoint"),
        ({"tasks": [{"name": "seg", "kind": "human_parts", "num_outputs": 5}, "parts"]},
         "task 'seg' is 'semantic_segmentation' in the checkpoint, requested 'human_parts'"),
        ({"tasks": [{"name": "seg", "kind": "semantic_segmentation", "num_outputs": 7}, "parts"]},
         "task 'seg' has 5 outputs in the checkpoint, requested 7"),
        ({"config": MultiTaskConfig(backbone_config=convnext_config(), tasks=DENSE_TASKS[2:4])},
         r"tasks \['sal', 'depth'\] are not in the checkpoint"),
        ({"use_safetensors": False}, "safetensors checkpoints only"),
        ({"ignore_mismatched_sizes": True}, "would leave heads untrained"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            MultiTaskModel.from_pretrained(tmp_path, **kwargs)
    assert MultiTaskModel.from_pretrained(tmp_path, tasks=["parts", "seg"]).tasks == ["seg", "parts"]


def test_requested_task_fields_are_each_compared_with_the_saved_task(tmp_path):
    make_model().save_pretrained(tmp_path)  # seg: semantic_segmentation, 5 outputs; parts: human_parts, 3
    mismatches = [
        ({"name": "seg", "num_outputs": 7}, "task 'seg' has 5 outputs in the checkpoint, requested 7"),
        ({"name": "seg", "kind": "depth"}, "task 'seg' is 'semantic_segmentation' in the checkpoint, requested 'depth'"),
        ({"name": "seg", "loss_weight": 2}, "task 'seg' has loss_weight=1.0 in the checkpoint, requested 2.0"),
        ({"name": "seg", "ignore_index": 0}, "task 'seg' has ignore_index=255 in the checkpoint, requested 0"),
        ({"name": "seg", "weight": 2}, r"task 'seg': unknown keys \['weight'\]"),
    ]
    for task, message in mismatches:
        with pytest.raises(ValueError, match=message):
            MultiTaskModel.from_pretrained(tmp_path, tasks=[task, "parts"])
    # fields that are not given are taken from the checkpoint: a kind without num_outputs loads
    same = [{"name": "seg", "kind": "semantic_segmentation"}, {"name": "parts", "num_outputs": 3, "loss_weight": 1}]
    assert MultiTaskModel.from_pretrained(tmp_path, tasks=same).config.task("seg")["num_outputs"] == 5
    with pytest.raises(TypeError, match="each requested task must be a name or a dict"):
        MultiTaskModel.from_pretrained(tmp_path, tasks=[3, "parts"])


def test_checkpoint_missing_weights_is_an_error(tmp_path):
    make_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["heads.parts.conv.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match the model: \{'missing_keys': \['heads.parts.conv.weight'\]"):
        MultiTaskModel.from_pretrained(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        MultiTaskModel.from_pretrained(tmp_path)
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModel.from_pretrained(tmp_path)


def populate_hub_cache(hf_home: Path, repo_id: str, files: Path, revision: str = "0" * 40) -> Path:
    """Lay out ``files`` as the Hugging Face cache does for a downloaded model repo."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in files.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_load_by_repo_id_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """The backbone and the multi-task model both come from a pre-populated cache, by repo id."""
    import huggingface_hub.constants

    torch.manual_seed(0)
    AutoModel.from_config(bert_config()).save_pretrained(tmp_path / "backbone")
    populate_hub_cache(tmp_path / "hf", "tiny-org/tiny-bert", tmp_path / "backbone")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    model = MultiTaskModel(MultiTaskConfig(backbone_pretrained="tiny-org/tiny-bert", tasks=TEXT_TASKS)).eval()
    backbone = AutoModel.from_pretrained(tmp_path / "backbone").state_dict()
    assert all(torch.equal(v, backbone[k]) for k, v in model.backbone.state_dict().items())
    model.save_pretrained(tmp_path / "mtl")
    populate_hub_cache(tmp_path / "hf", "tiny-org/tiny-mtl", tmp_path / "mtl")
    batch = text_batch()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    torch.save({"inputs": inputs, "logits": model(**inputs).logits}, tmp_path / "reference.pt")
    # a fresh interpreter whose HF_HOME holds the cache: AutoModel resolves the repo id offline
    out = run_python(f"""
        import torch
        import mtl_plugins.hub
        from transformers import AutoModel
        model = AutoModel.from_pretrained("tiny-org/tiny-mtl").eval()
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        logits = model(**reference["inputs"]).logits
        print(type(model).__name__, model.config.backbone_pretrained,
              all(torch.allclose(logits[t], reference["logits"][t], atol=1e-6) for t in logits))
    """, HF_HOME=str(tmp_path / "hf"))
    assert out.split() == ["MultiTaskModel", "tiny-org/tiny-bert", "True"]


def test_register_for_auto_class_saves_code_that_loads_without_the_hub_module(tmp_path, monkeypatch):
    monkeypatch.setattr(MultiTaskConfig, "_auto_class", None)
    monkeypatch.setattr(MultiTaskModel, "_auto_class", None)
    MultiTaskConfig.register_for_auto_class()
    MultiTaskModel.register_for_auto_class("AutoModel")
    model = make_model()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration.MultiTaskConfig", "AutoModel": "modeling.MultiTaskModel"}
    assert {"configuration.py", "modeling.py", "heads.py", "backbones.py"} <= set(os.listdir(tmp_path / "ckpt"))
    x = torch.randn(1, 3, 32, 32)
    torch.save({"x": x, "logits": model(pixel_values=x).logits}, tmp_path / "reference.pt")
    out = run_python(f"""
        import sys, torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        reference = torch.load({str(tmp_path / "reference.pt")!r})
        logits = model(pixel_values=reference["x"]).logits
        print("mtl_plugins.hub" in sys.modules, type(model).__module__.startswith("transformers_modules"),
              all(torch.allclose(logits[t], reference["logits"][t], atol=1e-6) for t in logits))
    """, HF_HOME=str(tmp_path / "hf"))
    assert out.split() == ["False", "True", "True"]
