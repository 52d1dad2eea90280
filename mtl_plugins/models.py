"""Recipe models: name -> builder ``builder(tasks, task_specs, **options) -> nn.Module``.

A recipe model's forward takes the inputs and labels named after the tasks and returns a
:class:`~mtl_plugins.outputs.MultiTaskOutput`; it offers ``get_share_params()``. The Hub's recipe
model (``hub_multitask``) registers itself here when ``mtl_plugins.hub`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from .architectures.hps import HPS
from .losses import loss_for_kind
from .registry import Registry
from .tasks import TaskSpec

MODELS = Registry("model", arguments=("tasks", "task_specs"),
                  hint="Hugging Face models such as hub_multitask register when mtl_plugins.hub is imported")


def register_model(name: str, *, aliases: Sequence[str] = ()) -> Callable:
    """Register a recipe model builder ``builder(tasks, task_specs, **options)`` under ``name``."""
    return MODELS.register(name, aliases=aliases)


def available_models() -> list[str]:
    """Names of every registered recipe model."""
    return MODELS.available()


def build_model(name: str, tasks: Sequence[str], task_specs: Mapping[str, TaskSpec], **options) -> nn.Module:
    """Build recipe model ``name`` for ``tasks``; unknown names and options are errors listing the accepted ones."""
    return MODELS.build(name, list(tasks), dict(task_specs), **options)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, BatchNorm, ReLU: the unit that task-specific connections convert."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def multidigits_encoder(width: int = 32) -> nn.Sequential:
    """A three-conv CNN for 12x20 MultiDigits images -> ``2 * width * 8`` features."""
    return nn.Sequential(
        conv_block(1, width),
        conv_block(width, 2 * width),
        nn.MaxPool2d(2),
        conv_block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d((2, 4)),
        nn.Flatten(),
    )


@register_model("multidigits_cnn")
def multidigits_cnn(tasks: Sequence[str], task_specs: Mapping[str, TaskSpec], width: int = 32, hidden: int = 64) -> HPS:
    """Hard-parameter-sharing CNN for MultiDigits: shared encoder, an MLP head per task."""
    features = 2 * width * 8
    heads = {
        t: nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, task_specs[t].num_outputs))
        for t in tasks
    }
    losses = {t: loss_for_kind(task_specs[t].kind, task_specs[t].loss) for t in tasks}
    return HPS(tasks, encoder=multidigits_encoder(width), heads=heads, losses=losses)


