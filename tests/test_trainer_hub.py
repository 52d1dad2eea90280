"""trainer.push_to_hub(): the project's model card, the processor with the model (uploads intercepted)."""

import datasets
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import RepoUrl
from safetensors.torch import load
from test_hub_fixtures import DENSE_TASKS, convnext_config, dense_labels
from transformers import ConvNextImageProcessor

from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel
from mtl_plugins.trainers import MultiTaskTrainer, MultiTaskTrainingArguments

TASKS = [DENSE_TASKS[0], DENSE_TASKS[3]]  # seg, depth


def intercept(monkeypatch) -> dict:
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id if '/' in repo_id else 'user/' + repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["files"] = {op.path_in_repo: open(op.path_or_fileobj, "rb").read() for op in operations}
        calls["commit"] = kwargs
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def dense_dataset(n=4):
    labels = dense_labels(batch=n, size=32)
    g = torch.Generator().manual_seed(1)
    columns = {"pixel_values": torch.randn(n, 3, 32, 32, generator=g).numpy(), "seg": labels["seg"].numpy(),
               "depth": labels["depth"].numpy()}
    return datasets.Dataset.from_dict(columns).with_format("torch")


def trainer_for(model, tmp_path, **kwargs):
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path / "my-run"), max_steps=1, per_device_train_batch_size=2,
                                      report_to="none", use_cpu=True, disable_tqdm=True, **kwargs)
    data = dense_dataset()
    return MultiTaskTrainer(model=model, args=args, train_dataset=data, eval_dataset=data, strategy="sel_update",
                            strategy_options={"warmup_steps": 0}, processing_class=ConvNextImageProcessor(),
                            compute_metrics=depth_error)


def depth_error(prediction) -> dict:
    """The mean absolute depth error (the predictions and labels are in task order: seg, depth)."""
    import numpy as np

    predicted, labels = prediction.predictions[1], prediction.label_ids[1]
    return {"depth/abs_err": float(np.abs(predicted.squeeze(1) - labels).mean())}


def test_trainer_push_to_hub_uploads_the_rich_card_and_the_image_processor(tmp_path, monkeypatch):
    calls = intercept(monkeypatch)
    torch.manual_seed(0)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=convnext_config(), tasks=TASKS))
    trainer = trainer_for(model, tmp_path, hub_model_id="org/dense-mtl")
    trainer.train()
    evaluation = trainer.evaluate()
    assert trainer.push_to_hub(delta_m=1.5) == "commit-info"
    assert calls["repo"][0] == "org/dense-mtl"
    files = calls["files"]
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(files)
    weights = load(files["model.safetensors"])
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    card = ModelCard(files["README.md"].decode())
    assert card.data.mtl_method == "sel_update" and card.data.mtl_method_settings["warmup_steps"] == 0
    assert card.data.mtl_task_groups is not None and card.data.mtl_delta_m == 1.5
    expected = {"depth/abs_err": evaluation["eval_depth/abs_err"]}
    assert card.data.mtl_metrics == pytest.approx(expected)
    assert "fine-tuned version of" not in card.text and "Strategy: `sel_update`" in card.text
    # the Trainer's own card path writes the same card
    trainer.create_model_card()
    written = ModelCard.load(tmp_path / "my-run" / "README.md")
    assert written.data.mtl_method == "sel_update" and written.data.mtl_metrics == pytest.approx(expected)


def test_repo_id_defaults_to_the_output_folder_name(tmp_path, monkeypatch):
    calls = intercept(monkeypatch)
    torch.manual_seed(0)
    trainer = trainer_for(MultiTaskModel(MultiTaskConfig(backbone_config=convnext_config(), tasks=TASKS)), tmp_path)
    trainer.push_to_hub()
    assert calls["repo"][0] == "my-run"


def test_push_to_hub_of_an_hps_model_is_a_clear_error(tmp_path, monkeypatch):
    from mtl_plugins.data import build_data
    from mtl_plugins.models import build_model

    calls = intercept(monkeypatch)
    data = build_data("multidigits", tasks=["left", "right"], train_size=8, eval_size=8)
    model = build_model("multidigits_cnn", data.tasks, data.task_specs, width=2)
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=data.train, strategy="ew")
    with pytest.raises(ValueError, match="push_to_hub needs a Hugging Face multi-task model .*HPS has no Hub config"):
        trainer.push_to_hub()
    with pytest.raises(ValueError, match="HPS has no Hub config"):
        trainer.create_model_card()
    assert calls == {}


def test_model_push_to_hub_uploads_the_processor(monkeypatch):
    calls = intercept(monkeypatch)
    model = MultiTaskModel(MultiTaskConfig(backbone_config=convnext_config(), tasks=TASKS))
    model.push_to_hub("org/x", processor=ConvNextImageProcessor(size={"shortest_edge": 64}))
    assert b'"shortest_edge": 64' in calls["files"]["preprocessor_config.json"]


def test_a_text_model_and_its_tokenizer_raise_no_special_token_notice(tmp_path, caplog):
    """``Trainer.train`` aligns the config's pad / bos / eos ids with the tokenizer's and warns when they
    differ; a text model takes them from its backbone, so its own tokenizer changes nothing."""
    import logging

    from test_hub_fixtures import TEXT_TASKS, bert_config
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from mtl_plugins.pretrained import resolve_pretrained

    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("packaged:all-MiniLM-L6-v2"))
    model = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(pad_token_id=tokenizer.pad_token_id),
                                           tasks=TEXT_TASKS[:2]))
    assert model.config.pad_token_id == model.config.backbone_config.pad_token_id == tokenizer.pad_token_id
    assert MultiTaskConfig.from_dict(model.config.to_dict()).pad_token_id == tokenizer.pad_token_id  # reloads
    args = MultiTaskTrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2,
                                      report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no")
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(1, 50, (2, 8), generator=g).numpy(),
                                       "attention_mask": torch.ones(2, 8, dtype=torch.long).numpy(),
                                       "sentiment": [0, 2], "score": [0.5, -1.0]}).with_format("torch")

    def notices(model):
        caplog.clear()
        transformers_logging.enable_propagation()  # transformers' logger does not propagate by default
        try:
            with caplog.at_level(logging.WARNING, logger="transformers"):
                MultiTaskTrainer(model=model, args=args, train_dataset=data, strategy="ew",
                                 processing_class=tokenizer).train()
        finally:
            transformers_logging.disable_propagation()
        return [r.getMessage() for r in caplog.records if "new PAD/BOS/EOS tokens" in r.getMessage()]

    assert notices(model) == []
    other = MultiTaskModel(MultiTaskConfig(backbone_config=bert_config(pad_token_id=1), tasks=TEXT_TASKS[:2]))
    assert len(notices(other)) == 1 and other.config.pad_token_id == tokenizer.pad_token_id  # a real mismatch still warns
