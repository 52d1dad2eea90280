"""Recipe model ``hub_multitask``: a :class:`MultiTaskModel` built from a recipe's task specs.

Recipe task kinds map to head kinds (``classification`` -> ``sequence_classification`` for text,
``regression`` -> ``regression``; dense kinds keep their names) unless ``task_kinds`` names them.
The task spec's loss must be one the head kind trains with (:data:`mtl_plugins.losses.KIND_LOSSES`);
a ``dense_regression`` head trains with the one it names (``l1`` or ``mse``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from mtl_plugins.losses import kind_loss_name, kind_losses
from mtl_plugins.models import register_model
from mtl_plugins.tasks import TaskSpec

from .configuration import MultiTaskConfig
from .heads import HEAD_KINDS
from .modeling import MultiTaskModel

#: Recipe task kind -> the head kind that trains it.
SPEC_KINDS = {"classification": "sequence_classification", "regression": "regression"}


def head_task(name: str, spec: TaskSpec, kind: str | None, loss_weight: float) -> dict[str, Any]:
    """The task entry for ``spec``; a recipe loss that the head would not compute is an error."""
    if kind is None:
        if spec.kind in SPEC_KINDS:
            kind = SPEC_KINDS[spec.kind]
        elif spec.kind in HEAD_KINDS:
            kind = spec.kind
        else:
            raise ValueError(f"task {name!r}: no head kind for task kind {spec.kind!r}; set model.options.task_kinds")
    entry = {"name": name, "kind": kind, "num_outputs": spec.num_outputs, "loss_weight": loss_weight}
    if spec.labels is not None:
        entry["labels"] = list(spec.labels)
    losses = kind_losses(kind)
    loss = kind_loss_name(kind, spec.loss)
    if loss is None and len(losses) > 1:
        raise ValueError(f"task {name!r}: the {kind} head trains with {sorted(losses)}, "
                         f"the dataset asks for {spec.loss!r}")
    if loss is None:
        raise ValueError(f"task {name!r}: hub_multitask trains {spec.kind} tasks with {next(iter(losses))}, "
                         f"the dataset asks for {spec.loss!r}")
    if len(losses) > 1:
        entry["loss"] = loss
    return entry


@register_model("hub_multitask")
def hub_multitask(
    tasks: Sequence[str],
    task_specs: Mapping[str, TaskSpec],
    backbone_pretrained: str | None = None,
    backbone_config: dict | None = None,
    task_kinds: Mapping[str, str] | None = None,
    loss_weights: Mapping[str, float] | None = None,
    task_connections: dict | None = None,
    pooling: str = "mean",
    head_dropout: float = 0.0,
    feature_levels: list | None = None,
) -> MultiTaskModel:
    """A hub model from a pretrained backbone (folder, Hub id or ``packaged:`` name) or a backbone
    config dict; ``pooling``, ``head_dropout`` and ``feature_levels`` as in :class:`MultiTaskConfig`.
    ``task_connections`` (options dict) adds task-specific connections to the backbone."""
    kinds, weights = dict(task_kinds or {}), dict(loss_weights or {})
    unknown = sorted((set(kinds) | set(weights)) - set(tasks))
    if unknown:
        raise ValueError(f"task_kinds/loss_weights name unknown tasks {unknown}; tasks are {list(tasks)}")
    entries = [head_task(t, task_specs[t], kinds.get(t), float(weights.get(t, 1.0))) for t in tasks]
    config = MultiTaskConfig(backbone_config=backbone_config, backbone_pretrained=backbone_pretrained,
                             tasks=entries, pooling=pooling, head_dropout=head_dropout,
                             feature_levels=feature_levels)
    model = MultiTaskModel(config)
    if task_connections is not None:
        model.add_task_connections(**task_connections)
    return model
