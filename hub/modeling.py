"""``MultiTaskModel``: a Hugging Face backbone shared by all tasks and one head per task."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd, HfApi
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from mtl_plugins.architectures.base import MultiTaskMixin
from mtl_plugins.architectures.task_connections import (
    TaskBatchNorm,
    add_task_connections,
    task_connections,
)
from mtl_plugins.losses import loss_for_kind

from .backbones import (
    build_backbone,
    feature_channels,
    fuse_feature_maps,
    mean_pool,
    vit_feature_maps,
)
from .card import build_model_card, card_fields_from_strategy
from .configuration import (
    VIT_MODEL_TYPES,
    MultiTaskConfig,
    backbone_modality,
    normalize_task,
)
from .heads import HEAD_KINDS, DenseHead, SequenceHead, TokenHead

#: Keyword arguments of ``from_pretrained`` that say where and how to fetch the checkpoint's config.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
#: Task fields that shape the weights: a ``config`` given to ``from_pretrained`` must agree on these.
WEIGHT_FIELDS = ("kind", "num_outputs")
#: Inputs that ``predict`` passes to the model.
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "token_type_ids")


@dataclass
class MultiTaskModelOutput(ModelOutput):
    """``loss`` (weighted sum, when labels are given), ``logits`` (task -> tensor), ``losses`` (task -> scalar)."""

    loss: Tensor | None = None
    logits: dict[str, Tensor] | None = None
    losses: dict[str, Tensor] | None = None


class MultiTaskModel(MultiTaskMixin, PreTrainedModel):
    """A shared backbone and one head per task (see :class:`MultiTaskConfig` for the head kinds).

    ``forward(pixel_values=...)`` or ``forward(input_ids=..., attention_mask=...)`` returns a
    :class:`MultiTaskModelOutput`. Labels are keyword arguments named after the tasks and/or a
    ``labels`` mapping; ``task=`` runs one task's path only (its head and, with task-specific
    connections, its normalisations). Only safetensors checkpoints are read.
    """

    config_class = MultiTaskConfig
    config: MultiTaskConfig
    main_input_name = "pixel_values"
    #: Labels are per task; the Trainer must not pass ``num_items_in_batch`` to ``forward``.
    accepts_loss_kwargs = False
    _no_split_modules: list[str] = []

    def __init__(self, config: MultiTaskConfig):
        super().__init__(config)
        if config.backbone_config is None:
            raise ValueError("MultiTaskConfig has no backbone: give backbone_config or backbone_pretrained")
        if not config.tasks:
            raise ValueError("MultiTaskConfig has no tasks: give tasks=[{'name': ..., 'kind': ...}, ...]")
        self.modality = backbone_modality(config.backbone_config)
        self.main_input_name = "pixel_values" if self.modality == "vision" else "input_ids"
        # Inside ``from_pretrained`` the model is built on the meta device and every weight comes from
        # the checkpoint, so the backbone's own pretrained weights are only read for a fresh model.
        fresh = torch.get_default_device().type != "meta"
        self.backbone = build_backbone(config.backbone_config, config.backbone_pretrained if fresh else None)
        channels = feature_channels(self.backbone, config.backbone_config, config.feature_levels)
        self.heads = nn.ModuleDict({t["name"]: self._make_head(t, channels) for t in config.tasks})
        if config.task_connections is not None:
            self._convert_backbone(config.task_connections)
        self.post_init()

    def _make_head(self, task: Mapping[str, Any], channels: int) -> nn.Module:
        if self.modality == "vision":
            return DenseHead(channels, task["num_outputs"])
        head_class = TokenHead if task["kind"] == "token_classification" else SequenceHead
        return head_class(channels, task["num_outputs"], self.config.head_dropout)

    @property
    def tasks(self) -> list[str]:
        """Task names, in order."""
        return self.config.task_names

    @property
    def loss_weights(self) -> dict[str, float]:
        """Each task's static ``loss_weight``: the weights of ``loss`` and of training (strategies take them)."""
        return {t["name"]: t["loss_weight"] for t in self.config.tasks}

    # -- task-specific connections -------------------------------------------------------------
    def add_task_connections(self, **options: Any) -> MultiTaskModel:
        """Give every task its own normalisations in the backbone (saved and reloaded with the model).

        ``options`` go to :func:`~mtl_plugins.architectures.task_connections.add_task_connections`; the
        config records them with the mode that was applied (``batchnorm`` or ``scale_shift``)."""
        if self.config.task_connections is not None:
            raise ValueError("this model already has task-specific connections")
        self._convert_backbone(options)
        saved = {k: v for k, v in options.items() if k != "example_input"}
        self.config.task_connections = {**saved, "mode": self._connection_mode()}
        return self

    def _convert_backbone(self, options: Mapping[str, Any]) -> None:
        options = dict(options)
        if self.modality == "vision" and "example_input" not in options:
            options["example_input"] = self._example_pixels()
        add_task_connections(self.backbone, self.tasks, **options)

    def _example_pixels(self) -> Tensor:
        """A zero image batch in the backbone's dtype and on its device, for tracing its layers."""
        channels = getattr(self.config.backbone_config, "num_channels", 3)
        weight = next(p for p in self.backbone.parameters() if p.is_floating_point())
        return torch.zeros(2, channels, 64, 64, dtype=weight.dtype, device=weight.device)

    def _connection_mode(self) -> str:
        """``batchnorm`` (per-task BatchNorms, CVPR 2024) or ``scale_shift`` (this project's transformer extension)."""
        connections = task_connections(self.backbone)
        return "batchnorm" if any(isinstance(c, TaskBatchNorm) for c in connections) else "scale_shift"

    @property
    def shared_module(self) -> nn.Module:
        return self.backbone

    # -- forward -----------------------------------------------------------------------------------
    def _backbone_inputs(self, pixel_values, input_ids, attention_mask, token_type_ids) -> dict[str, Tensor]:
        if self.modality == "vision":
            if pixel_values is None or input_ids is not None:
                raise ValueError("this model has a vision backbone: pass pixel_values (B x C x H x W), not input_ids")
            if pixel_values.dim() != 4:
                raise ValueError(f"pixel_values must be B x C x H x W, got shape {tuple(pixel_values.shape)}")
            return {"pixel_values": pixel_values}
        if input_ids is None or pixel_values is not None:
            raise ValueError("this model has a text encoder: pass input_ids (and attention_mask), not pixel_values")
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return {k: v for k, v in inputs.items() if v is not None}

    def _features(self, inputs: Mapping[str, Tensor]) -> Tensor:
        """Fused multi-level maps (vision) or token states (text)."""
        if self.modality == "text":
            return self.backbone(**inputs).last_hidden_state
        if self.config.backbone_config.model_type in VIT_MODEL_TYPES:
            maps = vit_feature_maps(self.backbone, inputs["pixel_values"], self.config.feature_levels)
        else:
            maps = self.backbone(inputs["pixel_values"]).feature_maps
        return fuse_feature_maps(maps)

    def _head(self, task: str, features: Tensor, inputs: Mapping[str, Tensor]) -> Tensor:
        kind = self.config.task(task)["kind"]
        if self.modality == "vision":
            return self.heads[task](features, tuple(inputs["pixel_values"].shape[-2:]))
        if kind == "token_classification":
            return self.heads[task](features)
        if self.config.pooling == "cls":
            return self.heads[task](features[:, 0])
        return self.heads[task](mean_pool(features, inputs.get("attention_mask")))

    def forward(
        self,
        pixel_values: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        *,
        task: str | None = None,
        labels: Mapping[str, Tensor] | None = None,
        **task_labels: Tensor,
    ) -> MultiTaskModelOutput:
        inputs = self._backbone_inputs(pixel_values, input_ids, attention_mask, token_type_ids)
        labels = self.collect_labels(labels, task_labels)
        run = self.tasks_to_run(task)
        logits = self.task_logits(run, lambda: self._features(inputs), lambda t, f: self._head(t, f, inputs))
        if not labels:
            return MultiTaskModelOutput(logits=logits)
        losses, loss = self.task_losses(run, logits, labels)
        return MultiTaskModelOutput(loss=loss, logits=logits, losses=losses)

    def compute_task_loss(self, task: str, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss of ``task``'s kind (:data:`mtl_plugins.losses.KIND_LOSSES`, the task's ``loss`` if it names one)."""
        entry = self.config.task(task)
        return loss_for_kind(entry["kind"], entry.get("loss"))(logits, labels, ignore_index=entry["ignore_index"])

    @torch.no_grad()
    def predict(self, inputs: Mapping[str, Tensor] | Tensor, task: str | None = None,
                class_names: bool = False) -> dict[str, Any]:
        """Task outputs in user units: class ids (segmentation, parts, classification, tokens), depth in
        label units (metres for NYUD-v2), unit normals, probabilities (saliency, edges), regression values,
        ``B x C x H x W`` maps (dense regression). ``class_names=True``: classification tasks whose
        config has ``labels`` give one class name per example instead of class ids."""
        if isinstance(inputs, Tensor):
            inputs = {self.main_input_name: inputs}
        model_inputs = {k: self._to_model(v) for k, v in inputs.items() if k in MODEL_INPUTS}
        training = self.training
        self.eval()
        try:
            logits = self(**model_inputs, task=task).logits
        finally:
            self.train(training)
        predictions = {t: HEAD_KINDS[self.config.task(t)["kind"]].predict(value) for t, value in logits.items()}
        if class_names:
            for t, value in predictions.items():
                names = self.config.task(t).get("labels")
                if names and value.dim() == 1 and not value.is_floating_point():
                    predictions[t] = [names[i] for i in value.tolist()]
        return predictions

    def _to_model(self, value: Any) -> Any:
        """A tensor on the model's device; floating tensors also in the model's dtype."""
        if not isinstance(value, Tensor):
            return value
        if value.is_floating_point():
            return value.to(device=self.device, dtype=self.dtype)
        return value.to(self.device)

    # -- sharing -------------------------------------------------------------------------------------
    def push_to_hub(
        self,
        repo_id: str,
        *,
        strategy: Any = None,
        processor: Any = None,
        commit_message: str = "Upload multi-task model",
        private: bool | None = None,
        token: str | bool | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str = "50GB",
        **card_fields: Any,
    ) -> Any:
        """Upload the safetensors checkpoint, its config and a model card in one commit.

        ``card_fields`` go to :func:`~mtl_plugins.hub.build_model_card` (``method``, ``method_settings``,
        ``metrics``, ``delta_m``, ``datasets``, ``task_groups``, ``priority_stats``, ``base_model``,
        ``license``). A training ``strategy`` adds its method, settings and task groups or priority
        statistics (:func:`~mtl_plugins.hub.card.card_fields_from_strategy`); ``card_fields`` given
        explicitly take precedence. ``processor`` (the tokenizer or image processor that prepares the
        inputs) goes up with the model. Returns the commit info.
        """
        strategy_fields = card_fields_from_strategy(strategy) if strategy is not None else {}
        saves_processor = callable(getattr(processor, "save_pretrained", None))
        if saves_processor and hasattr(processor, "tokenize"):
            card_fields.setdefault("tokenizer_included", True)
        card = build_model_card(self.config, repo_id=repo_id, **{**strategy_fields, **card_fields})
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            if saves_processor:
                processor.save_pretrained(folder)
            card.save(Path(folder) / "README.md")
            files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
            operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                          for p in files]
            return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                     revision=revision, create_pr=create_pr)

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args: Any, tasks: Sequence[Any] | None = None, **kwargs: Any):
        """Load a checkpoint (safetensors only). ``tasks`` (names or task dicts), when given, must name
        the checkpoint's tasks, and every field a task dict gives (``kind``, ``num_outputs``,
        ``loss_weight``, ...) must match the saved task; a ``config`` must match its task names, kinds
        and output sizes. Any weight the checkpoint lacks or has in excess is an error."""
        if kwargs.get("use_safetensors") is False:
            raise ValueError("MultiTaskModel reads safetensors checkpoints only; pickle checkpoints are refused")
        if kwargs.get("ignore_mismatched_sizes"):
            raise ValueError("ignore_mismatched_sizes would leave heads untrained; load with matching tasks instead")
        kwargs["use_safetensors"] = True
        want_info = kwargs.pop("output_loading_info", False)
        hub_kwargs = {k: kwargs[k] for k in HUB_KWARGS if k in kwargs}
        saved = MultiTaskConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        given = kwargs.get("config")
        if isinstance(given, MultiTaskConfig):
            check_tasks_match(saved.tasks, given.tasks, pretrained_model_name_or_path, fields=WEIGHT_FIELDS)
        if tasks is not None:
            check_tasks_match(saved.tasks, tasks, pretrained_model_name_or_path)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(k)}
        if problems:
            raise ValueError(f"checkpoint {str(pretrained_model_name_or_path)!r} does not match the model: {problems}")
        return (model, info) if want_info else model


def check_tasks_match(saved: Sequence[Mapping[str, Any]], requested: Sequence[Any], source: Any,
                      fields: Sequence[str] | None = None) -> None:
    """Raise ``ValueError`` naming every task that is missing, not requested, or differs from the
    checkpoint in a field the caller gave (only ``fields``, when given)."""
    saved_by_name = {t["name"]: t for t in saved}
    wanted = {entry["name"]: entry for entry in (_requested_task(t) for t in _task_list(requested))}
    problems = []
    missing = [n for n in wanted if n not in saved_by_name]
    extra = [n for n in saved_by_name if n not in wanted]
    if missing:
        problems.append(f"tasks {missing} are not in the checkpoint")
    if extra:
        problems.append(f"the checkpoint has tasks {extra} that were not requested")
    for name in [n for n in wanted if n in saved_by_name]:
        problems += task_differences(wanted[name], saved_by_name[name], fields)
    if problems:
        raise ValueError(f"checkpoint {str(source)!r} does not match the requested tasks: " + "; ".join(problems)
                         + f" (checkpoint tasks: {[(t['name'], t['kind']) for t in saved]})")


def _task_list(requested: Any) -> Sequence[Any]:
    if isinstance(requested, (str, Mapping)) or not isinstance(requested, Sequence):
        raise TypeError(f"tasks must be a list of task names or task dicts, got {requested!r}")
    return requested


def _requested_task(task: Any) -> dict[str, Any]:
    """A requested task as a dict with a ``name`` (a bare name means: any task of that name)."""
    if isinstance(task, str):
        return {"name": task}
    if not isinstance(task, Mapping) or not isinstance(task.get("name"), str):
        raise TypeError(f"each requested task must be a name or a dict with a 'name', got {task!r}")
    return dict(task)


def task_differences(requested: Mapping[str, Any], saved: Mapping[str, Any],
                     fields: Sequence[str] | None = None) -> list[str]:
    """How the fields given in ``requested`` differ from the ``saved`` task, each compared after the
    fields not given are filled in from the saved task."""
    name = saved["name"]
    given = [k for k in requested if k != "name" and (fields is None or k in fields)]
    if "kind" in given and requested["kind"] != saved["kind"]:
        return [f"task {name!r} is {saved['kind']!r} in the checkpoint, requested {requested['kind']!r}"]
    try:
        merged = normalize_task({**saved, **{k: requested[k] for k in given}}, None)
    except ValueError as error:
        return [str(error)]
    problems = []
    for key in given:
        have, want = saved.get(key), merged.get(key)
        if want == have:
            continue
        if key == "num_outputs":
            problems.append(f"task {name!r} has {have} outputs in the checkpoint, requested {want}")
        else:
            problems.append(f"task {name!r} has {key}={have!r} in the checkpoint, requested {want!r}")
    return problems
