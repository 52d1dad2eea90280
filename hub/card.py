"""Model cards for multi-task checkpoints (huggingface_hub ``ModelCard`` / ``ModelCardData``).

The card's metadata carries the tasks, the training method and its settings, per-task metrics,
Delta_m, the base model, the datasets, the task-specific connection mode and the final task groups
or priority statistics (keys prefixed ``mtl_``); the text shows the same in tables, and a usage
snippet that runs as written. ``pipeline_tag`` is the Hub task type most of the tasks share (for
search on the Hub); no transformers pipeline runs a multi-task model (``predict`` returns one output
per task), and the card says so.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from mtl_plugins.pretrained import hub_id

from .configuration import VIT_MODEL_TYPES, backbone_modality

#: What each task-specific connection mode adds to the backbone, for the card's text.
CONNECTION_MODES = {
    "batchnorm": "every BatchNorm fed directly by a convolution or linear layer becomes one BatchNorm per "
                 "task, the weights before it staying shared: the task-specific connections of Jeong & Yoon "
                 "(CVPR 2024).",
    "scale_shift": "a per-task channel scale and shift after every shared `nn.Linear` of the backbone. This "
                   "is this project's extension of the CVPR 2024 method (Jeong & Yoon) to transformers, not "
                   "part of the paper, which defines task-specific BatchNorm connections for CNNs.",
    "auto": "task-specific BatchNorms (Jeong & Yoon, CVPR 2024) when the backbone has BatchNorm layers; "
            "otherwise a per-task channel scale and shift after every shared `nn.Linear`, this project's "
            "extension of the CVPR 2024 method, which defines task-specific BatchNorm connections for CNNs.",
}

def _plain(value: Any) -> bool:
    """True for values that serialise to YAML/JSON as they are."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def card_fields_from_strategy(strategy: Any) -> dict[str, Any]:
    """``method``, ``method_settings`` (the strategy's plain-valued options) and what the strategy's
    :meth:`~mtl_plugins.strategies.Strategy.card_fields` reports of its learned state (e.g.
    ``task_groups``, ``priority_stats``)."""
    fields: dict[str, Any] = {"method": getattr(strategy, "name", type(strategy).__name__)}
    parameters = list(inspect.signature(type(strategy).__init__).parameters)[2:]  # self, tasks
    settings = {}
    for name in parameters:
        value = getattr(strategy, name, None)
        if name != "model" and value is not None and _plain(value):
            settings[name] = value
    fields["method_settings"] = settings
    fields.update(strategy.card_fields())
    return fields


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def connection_mode(config: Any) -> str | None:
    """The task-specific connection mode of ``config`` (``auto`` when not recorded), or None without them."""
    options = getattr(config, "task_connections", None)
    if options is None:
        return None
    return options.get("mode", "auto")


def build_model_card(
    config: Any,
    *,
    repo_id: str | None = None,
    method: str | None = None,
    method_settings: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    delta_m: float | None = None,
    datasets: Sequence[str] | None = None,
    task_groups: Sequence[Sequence[str]] | None = None,
    priority_stats: Mapping[str, Any] | None = None,
    loss_scaling: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    license: str | None = None,
    tokenizer_included: bool = False,
) -> ModelCard:
    """A model card for a :class:`MultiTaskConfig`'s model.

    ``metrics`` maps ``"<task>/<metric>"`` to a value (as ``mtl-train`` reports them); ``base_model``
    defaults to the Hub id of ``config.backbone_pretrained`` when it names one.
    ``tokenizer_included``: the repository holds the tokenizer (the usage snippet loads it from there).
    ``loss_scaling``: the loss weighting composed with ``method`` (``name``, ``options`` and its latest
    ``weights``, as ``Strategy.card_fields()`` reports it).
    """
    tasks = config.task_names
    metrics = dict(metrics or {})
    unknown = sorted({key.split("/")[0] for key in metrics} - set(tasks))
    if unknown or any("/" not in key for key in metrics):
        raise ValueError(f"metrics keys must be '<task>/<metric>' for tasks {tasks}; got {sorted(metrics)}")
    if task_groups is not None:
        grouped = [t for group in task_groups for t in group]
        if sorted(grouped) != sorted(tasks):
            raise ValueError(f"task_groups {list(map(list, task_groups))} must partition the tasks {tasks}")
    base_model = base_model or hub_id(config.backbone_pretrained)
    task_rows = [{k: t[k] for k in ("name", "kind", "num_outputs", "loss_weight")} for t in config.tasks]
    extra = {
        "mtl_tasks": task_rows,
        "mtl_method": method,
        "mtl_method_settings": dict(method_settings or {}) or None,
        "mtl_loss_scaling": dict(loss_scaling) if loss_scaling is not None else None,
        "mtl_task_connections": {"mode": connection_mode(config)} if connection_mode(config) else None,
        "mtl_metrics": metrics or None,
        "mtl_delta_m": delta_m,
        "mtl_task_groups": [list(g) for g in task_groups] if task_groups is not None else None,
        "mtl_priority_stats": dict(priority_stats) if priority_stats is not None else None,
    }
    data = ModelCardData(
        model_name=(repo_id.split("/")[-1] if repo_id else "multi-task-model") if metrics else None,
        eval_results=eval_results(config, metrics, datasets) or None,
        library_name="transformers",
        pipeline_tag=pipeline_tag(config),
        license=license,
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        tags=["mtl-plugins", "multi-task-learning", *([method] if method else []),
              *([loss_scaling["name"]] if loss_scaling is not None else [])],
        **{k: v for k, v in extra.items() if v is not None},
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + _body(config, repo_id, extra, base_model, datasets,
                                                                   tokenizer_included))


#: Hub task type (for ``model-index``) of each head kind.
HUB_TASK_TYPES = {"semantic_segmentation": "image-segmentation", "human_parts": "image-segmentation",
                  "saliency": "image-segmentation", "edges": "image-segmentation", "depth": "depth-estimation",
                  "normals": "image-to-image", "dense_regression": "image-to-image",
                  "sequence_classification": "text-classification", "regression": "text-classification",
                  "token_classification": "token-classification"}


def pipeline_tag(config: Any) -> str:
    """The Hub task type of most tasks (ties: the earliest task's), e.g. ``image-segmentation`` for
    NYUD-v2's semseg, depth, normals and edges."""
    types = [HUB_TASK_TYPES.get(t["kind"], "other") for t in config.tasks]
    return max(dict.fromkeys(types), key=types.count)


def eval_results(config: Any, metrics: Mapping[str, float], datasets: Sequence[str] | None) -> list[EvalResult]:
    """The test metrics as ``model-index`` entries: one per ``"<task>/<metric>"``, with the task's
    Hub task type and the first dataset named (``custom`` when none is)."""
    dataset = datasets[0] if datasets else "custom"
    kinds = {t["name"]: t["kind"] for t in config.tasks}
    return [EvalResult(task_type=HUB_TASK_TYPES.get(kinds[key.split("/")[0]], "other"), task_name=key.split("/")[0],
                       dataset_type=dataset, dataset_name=dataset, metric_type=key.split("/", 1)[1],
                       metric_name=key, metric_value=float(value))
            for key, value in metrics.items()]


def _body(config: Any, repo_id: str | None, extra: Mapping[str, Any], base_model: str | None,
          datasets: Sequence[str] | None, tokenizer_included: bool = False) -> str:
    backbone = config.backbone_config.model_type
    parts = [f"# {repo_id.split('/')[-1] if repo_id else 'Multi-task model'}",
             f"A multi-task model (mtl-plugins `MultiTaskModel`): a shared `{backbone}` backbone"
             + (f" initialised from `{base_model}`" if base_model else "")
             + " and one head per task" + (f", trained on {', '.join(datasets)}." if datasets else "."),
             "## Tasks", _table(["task", "kind", "outputs", "loss weight"],
                                [[t["name"], t["kind"], t["num_outputs"], t["loss_weight"]] for t in extra["mtl_tasks"]])]
    if extra.get("mtl_task_connections"):
        mode = extra["mtl_task_connections"]["mode"]
        parts += ["## Task-specific connections", f"Mode `{mode}`: {CONNECTION_MODES.get(mode, 'see mtl-plugins.')}"]
    if extra["mtl_method"]:
        parts += ["## Training method", f"Strategy: `{extra['mtl_method']}`."]
        if extra["mtl_method_settings"]:
            parts.append(_table(["setting", "value"], sorted(extra["mtl_method_settings"].items())))
    if extra.get("mtl_loss_scaling"):
        scaling = extra["mtl_loss_scaling"]
        parts += ["## Loss scaling", f"The task losses were weighted by `{scaling['name']}` before "
                  f"`{extra['mtl_method'] or 'the method'}` used them" + (f" (options {scaling['options']})."
                                                                          if scaling.get("options") else ".")]
        if scaling.get("weights"):
            parts.append(_table(["task", "final weight"], list(scaling["weights"].items())))
    if extra["mtl_metrics"] or extra["mtl_delta_m"] is not None:
        parts.append("## Results")
        if extra["mtl_metrics"]:
            rows = [[key.split("/", 1)[0], key.split("/", 1)[1], value] for key, value in extra["mtl_metrics"].items()]
            parts.append(_table(["task", "metric", "value"], rows))
        if extra["mtl_delta_m"] is not None:
            parts.append(f"Delta_m against single-task models: {extra['mtl_delta_m']:+.2f}%")
    if extra["mtl_task_groups"]:
        parts += ["## Final task groups", "\n".join(f"- {', '.join(g)}" for g in extra["mtl_task_groups"])]
    if extra["mtl_priority_stats"]:
        parts += ["## Task priority", "Share of channels whose top-priority task is each task, per connected layer.",
                  _table(["layer", *config.task_names],
                         [[layer, *shares] for layer, shares in extra["mtl_priority_stats"].items()])]
    name = repo_id or "path/to/checkpoint"
    parts += ["## Usage", f"The Hub lists the model under `{pipeline_tag(config)}`, but no transformers `pipeline` "
              "runs a multi-task model: load it as below (`predict` returns one output per task).",
              usage_snippet(config, name, name if tokenizer_included else base_model)]
    return "\n\n".join(parts) + "\n"


def usage_snippet(config: Any, name: str, tokenizer_source: str | None) -> str:
    """A Python block that loads the model from ``name`` and predicts every task on an example input
    (tokenised by the tokenizer of ``tokenizer_source`` for text models, when there is one)."""
    lines = ["# pip install mtl-plugins", "import torch", "import mtl_plugins.hub  # registers the model with AutoModel"]
    if backbone_modality(config.backbone_config) == "text" and tokenizer_source:
        lines += ["from transformers import AutoModel, AutoTokenizer", "",
                  f'model = AutoModel.from_pretrained("{name}")',
                  f'tokenizer = AutoTokenizer.from_pretrained("{tokenizer_source}")',
                  'inputs = tokenizer(["An example sentence."], return_tensors="pt")']
    else:
        lines += ["from transformers import AutoModel", "", f'model = AutoModel.from_pretrained("{name}")',
                  _example_inputs(config)]
    lines.append("outputs = model.predict(inputs)  # task name -> predictions")
    return "```python\n" + "\n".join(lines) + "\n```"


def _example_inputs(config: Any) -> str:
    """A line defining ``inputs``: a random image batch, or random token ids for a text encoder."""
    backbone = config.backbone_config
    if backbone_modality(backbone) == "text":
        return (f"inputs = torch.randint(0, {backbone.vocab_size}, (1, 16))  "
                "# token ids from the backbone's tokenizer")
    size = 224
    if backbone.model_type in VIT_MODEL_TYPES:
        size = backbone.image_size if isinstance(backbone.image_size, int) else backbone.image_size[0]
    channels = getattr(backbone, "num_channels", 3)
    return f"inputs = torch.randn(1, {channels}, {size}, {size})  # normalised images, B x C x H x W"
