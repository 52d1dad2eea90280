"""``MultiTaskConfig``: a backbone (a transformers config or a pretrained checkpoint) and the task heads."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

from mtl_plugins.architectures.base import check_task_names
from mtl_plugins.losses import kind_losses
from mtl_plugins.pretrained import hub_id, resolve_pretrained

from .heads import HEAD_KINDS, HeadKind

#: Vision transformers without an ``AutoBackbone`` class: features are read from their hidden states.
VIT_MODEL_TYPES = ("vit",)
#: How many feature levels are fused by default (spread evenly over the stages or blocks).
DEFAULT_NUM_LEVELS = 4
TASK_KEYS = ("name", "kind", "num_outputs", "loss_weight", "ignore_index", "labels", "loss")
#: Names of ``MultiTaskModel.forward``'s arguments: a task of that name could not pass its labels.
RESERVED_TASK_NAMES = ("pixel_values", "input_ids", "attention_mask", "token_type_ids", "task", "labels")


def backbone_modality(config: PreTrainedConfig) -> str:
    """``vision`` for ``AutoBackbone`` and ViT configs, ``text`` for encoders with a vocabulary."""
    if config.model_type in MODEL_FOR_BACKBONE_MAPPING_NAMES or config.model_type in VIT_MODEL_TYPES:
        return "vision"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"backbone model_type {config.model_type!r} is an encoder-decoder: use an encoder "
                         "(e.g. bert, roberta, deberta-v2) as the shared backbone")
    if getattr(config, "vocab_size", None):
        return "text"
    raise ValueError(
        f"unsupported backbone model_type {config.model_type!r}: use a vision model with an AutoBackbone "
        f"({', '.join(sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES))}), ViT, or a text encoder"
    )


def num_stages(config: PreTrainedConfig) -> int:
    """Feature levels a vision backbone offers: its stages, or a ViT's blocks."""
    if config.model_type in VIT_MODEL_TYPES:
        return int(config.num_hidden_layers)
    return len(config.stage_names) - 1  # stage_names[0] is the stem


def default_feature_levels(stages: int, count: int = DEFAULT_NUM_LEVELS) -> list[int]:
    """``count`` stage indices (1-based) spread evenly up to the last stage, e.g. 12 -> [3, 6, 9, 12]."""
    count = min(count, stages)
    return [round(stages * (i + 1) / count) for i in range(count)]


def _check_ignore_index(name: str, spec: HeadKind, value: Any) -> int | float | None:
    """Real-valued kinds take any number or None (no ignore value); class kinds an integer."""
    if spec.real_valued:
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"task {name!r}: ignore_index must be a number or None, got {value!r}")
    elif isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"task {name!r}: ignore_index must be an integer, got {value!r}")
    return value


def normalize_task(task: Mapping[str, Any], modality: str | None) -> dict[str, Any]:
    """A task entry with every key filled in and checked; errors name the task and the problem."""
    if not isinstance(task, Mapping):
        raise TypeError(f"each task must be a dict with 'name' and 'kind', got {task!r}")
    name = task.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"task {dict(task)!r} needs a non-empty string 'name'")
    check_task_names([name], RESERVED_TASK_NAMES, "MultiTaskModel")
    unknown = sorted(set(task) - set(TASK_KEYS))
    if unknown:
        raise ValueError(f"task {name!r}: unknown keys {unknown}; accepted: {list(TASK_KEYS)}")
    kind = task.get("kind")
    if kind not in HEAD_KINDS:
        raise ValueError(f"task {name!r}: unknown kind {kind!r}; available: {', '.join(HEAD_KINDS)}")
    spec = HEAD_KINDS[kind]
    if modality is not None and spec.modality != modality:
        raise ValueError(f"task {name!r} of kind {kind!r} needs a {spec.modality} backbone, but the backbone is {modality}")
    default_outputs = spec.fixed_outputs or (1 if kind == "regression" else None)
    num_outputs = task.get("num_outputs", default_outputs)
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"task {name!r} of kind {kind!r} needs a positive integer 'num_outputs', got {num_outputs!r}")
    if spec.fixed_outputs is not None and num_outputs != spec.fixed_outputs:
        raise ValueError(f"task {name!r}: kind {kind!r} has {spec.fixed_outputs} output(s), got num_outputs={num_outputs}")
    loss_weight = task.get("loss_weight", 1.0)
    if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) or loss_weight < 0:
        raise ValueError(f"task {name!r}: loss_weight must be a non-negative number, got {loss_weight!r}")
    ignore_index = _check_ignore_index(name, spec, task.get("ignore_index", spec.ignore_index))
    entry = {"name": name, "kind": kind, "num_outputs": num_outputs, "loss_weight": float(loss_weight),
             "ignore_index": ignore_index}
    losses = kind_losses(kind)
    if len(losses) > 1:
        loss = task.get("loss", next(iter(losses)))
        if loss not in losses:
            raise ValueError(f"task {name!r}: kind {kind!r} trains with one of {sorted(losses)}, "
                             f"got loss={loss!r}")
        entry["loss"] = loss
    elif task.get("loss") is not None:
        raise ValueError(f"task {name!r}: kind {kind!r} has a fixed loss; 'loss' applies to "
                         f"{[k for k in HEAD_KINDS if len(kind_losses(k)) > 1]} only")
    if task.get("labels") is not None:
        labels = [str(label) for label in task["labels"]]
        if len(labels) != num_outputs:
            raise ValueError(f"task {name!r}: {len(labels)} labels for num_outputs={num_outputs}")
        entry["labels"] = labels
    return entry


#: Special token ids a text backbone's config carries.
SPECIAL_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class MultiTaskConfig(PreTrainedConfig):
    r"""Configuration of a :class:`~mtl_plugins.hub.MultiTaskModel`.

    Args:
        backbone_config: a transformers config of the backbone (or its ``to_dict()``): a vision model with
            an ``AutoBackbone`` (ConvNeXt, ResNet, Swin, DINOv2, ...), ViT, or a text encoder (BERT, ...).
        backbone_pretrained: a local folder, a Hub repo id or a ``packaged:`` name whose weights initialise
            the backbone (its config is read from there when ``backbone_config`` is not given).
        tasks: one dict per task: ``name``, ``kind`` (see ``HEAD_KINDS``), ``num_outputs``,
            ``loss_weight`` (1.0), ``ignore_index`` (255 for dense kinds, -100 for text, None for
            ``dense_regression``; labels equal to it add no loss, and ``regression`` and
            ``dense_regression`` take any number or None for none), optional class ``labels`` and, for
            ``dense_regression``, ``loss`` (``l1``, the default, or ``mse``). Task names must differ
            from ``MultiTaskModel.forward``'s arguments (``RESERVED_TASK_NAMES``).
        feature_levels: vision only: the stages (or ViT blocks, 1-based) whose features are fused;
            default four levels spread evenly up to the last one.
        pooling: text only: ``mean`` (masked mean of token states) or ``cls`` (first token).
        head_dropout: dropout before the text heads.
        task_connections: options of task-specific connections in the backbone, or None for none.
    """

    model_type = "mtl_multitask"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(AutoConfig, model_type="bert", optional=True)}

    backbone_config: dict | PreTrainedConfig | None = None
    backbone_pretrained: str | None = None
    tasks: list | None = None
    feature_levels: list | None = None
    pooling: str = "mean"
    head_dropout: float = 0.0
    task_connections: dict | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        self.backbone_config = self._resolve_backbone_config()
        modality = backbone_modality(self.backbone_config) if self.backbone_config is not None else None
        self._check_tasks(modality)
        if modality == "vision":
            self._set_feature_levels()
        elif self.feature_levels is not None and modality == "text":
            raise ValueError("feature_levels applies to vision backbones only")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {self.pooling!r}")
        super().__post_init__(**kwargs)
        if modality == "text":
            self._take_special_tokens()

    def _take_special_tokens(self) -> None:
        """The text backbone's pad / bos / eos token ids, where this config sets none: the Trainer
        compares them with the tokenizer's (and warns of "new PAD/BOS/EOS tokens" when they are missing)."""
        for name in SPECIAL_TOKEN_IDS:
            value = getattr(self.backbone_config, name, None)
            if value is not None and getattr(self, name, None) is None:
                setattr(self, name, value)

    def _resolve_backbone_config(self) -> PreTrainedConfig | None:
        config = self.backbone_config
        if isinstance(config, PreTrainedConfig):
            return copy.deepcopy(config)
        if isinstance(config, Mapping):
            config = dict(config)
            if "model_type" not in config:
                raise ValueError("backbone_config given as a dict needs a 'model_type' (e.g. 'bert', 'convnext', 'vit')")
            return AutoConfig.for_model(**config)
        if config is not None:
            raise TypeError(f"backbone_config must be a transformers config or a dict, got {type(config).__name__}")
        if self.backbone_pretrained is not None:
            config = AutoConfig.from_pretrained(resolve_pretrained(self.backbone_pretrained))
            config._name_or_path = hub_id(self.backbone_pretrained) or ""  # not the local folder it was read from
            return config
        return None

    def _check_tasks(self, modality: str | None) -> None:
        if self.tasks is None:
            return
        if isinstance(self.tasks, (str, Mapping)) or not isinstance(self.tasks, (list, tuple)):
            raise TypeError(f"tasks must be a list of task dicts, got {self.tasks!r}")
        tasks = [normalize_task(t, modality) for t in self.tasks]
        names = [t["name"] for t in tasks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate task names: {duplicates}")
        self.tasks = tasks

    def _set_feature_levels(self) -> None:
        stages = num_stages(self.backbone_config)
        levels = default_feature_levels(stages) if self.feature_levels is None else [int(v) for v in self.feature_levels]
        if not levels or any(not 1 <= v <= stages for v in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"feature_levels must be distinct stage indices in 1..{stages}, got {self.feature_levels!r}")
        self.feature_levels = sorted(levels)
        if self.backbone_config.model_type not in VIT_MODEL_TYPES:
            self.backbone_config.out_indices = self.feature_levels

    # -- accessors --------------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Task names, in order."""
        return [t["name"] for t in self.tasks or []]

    def task(self, name: str) -> dict[str, Any]:
        """The entry of task ``name``."""
        for entry in self.tasks or []:
            if entry["name"] == name:
                return entry
        raise KeyError(f"unknown task {name!r}; tasks are {self.task_names}")
