"""``predictions.png``: input | ground truth | prediction of a dense model for a few fixed test images.

One row per image: the input (ImageNet normalisation undone), then for every task its target and
the model's prediction side by side: class colours (segmentation, human parts), a depth colour map
(one range per image, shared by target and prediction), normals as RGB (``(n + 1) / 2``), edge
and saliency probabilities in grey. Ignored target pixels (255) are black.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .data.dense.transforms import IGNORE, IMAGENET_MEAN, IMAGENET_STD
from .tasks import TaskSpec

#: Task kinds that predictions.png can draw.
DRAWN_KINDS = ("semantic_segmentation", "human_parts", "saliency", "depth", "normals", "edges")


def can_draw(task_specs: Mapping[str, TaskSpec]) -> bool:
    """Whether every task is a dense kind that :func:`plot_predictions` draws."""
    return bool(task_specs) and all(spec.kind in DRAWN_KINDS for spec in task_specs.values())


def _image(pixels: torch.Tensor) -> np.ndarray:
    mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    return np.clip(pixels.permute(1, 2, 0).numpy() * std + mean, 0, 1)


def _prediction(kind: str, logits: torch.Tensor) -> np.ndarray:
    """One image's raw head output (``C x H x W``) in the target's units."""
    if kind in ("semantic_segmentation", "human_parts"):
        return logits.argmax(0).numpy()
    if kind in ("saliency", "edges"):
        return torch.sigmoid(logits[0]).numpy()
    if kind == "depth":
        return logits[0].clamp_min(0).numpy()
    return torch.nn.functional.normalize(logits, dim=0).permute(1, 2, 0).numpy()


def _target(kind: str, target: torch.Tensor) -> np.ndarray:
    value = target.numpy().astype(np.float64)
    if kind == "normals":
        return np.moveaxis(value, 0, -1)
    return value[0] if value.ndim == 3 else value


def _colour(kind: str, value: np.ndarray, num_classes: int, depth_range: tuple[float, float]) -> np.ndarray:
    """An ``H x W x 3`` RGB picture of one map; ignored pixels (255) black."""
    from matplotlib import colormaps

    if kind == "normals":
        ignored = (value == IGNORE).any(-1)
        rgb = np.clip((value + 1) / 2, 0, 1)
    elif kind in ("semantic_segmentation", "human_parts"):
        ignored = value == IGNORE
        palette = colormaps["tab20"](np.linspace(0, 1, 20))[:, :3]
        rgb = palette[np.clip(value, 0, num_classes - 1).astype(int) % 20]
    elif kind == "depth":
        ignored = (value == IGNORE) | (value <= 0)
        low, high = depth_range
        rgb = colormaps["viridis"](np.clip((value - low) / max(high - low, 1e-6), 0, 1))[..., :3]
    else:
        ignored = value == IGNORE
        rgb = np.repeat(np.clip(value, 0, 1)[..., None], 3, axis=-1)
    rgb = rgb.copy()
    rgb[ignored] = 0.0
    return rgb


def plot_predictions(model: torch.nn.Module, dataset, task_specs: Mapping[str, TaskSpec], tasks: Sequence[str],
                     path: str | Path, count: int = 4) -> Path:
    """Draw the first ``count`` images of ``dataset`` (a dense eval split) with targets and predictions."""
    from .plots import _pyplot

    plt = _pyplot()
    count = min(count, len(dataset))
    batch = dataset[0:count]
    was_training = model.training
    model.eval()
    parameter = next(model.parameters())
    with torch.no_grad():
        logits = model(pixel_values=batch["pixel_values"].to(parameter.device, parameter.dtype)).logits
    model.train(was_training)
    columns = 1 + 2 * len(tasks)
    fig, axes = plt.subplots(count, columns, figsize=(1.6 * columns, 1.7 * count), squeeze=False)
    for row in range(count):
        axes[row][0].imshow(_image(batch["pixel_values"][row].float().cpu()))
        for j, task in enumerate(tasks):
            kind, classes = task_specs[task].kind, task_specs[task].num_outputs
            target = _target(kind, batch[task][row].cpu())
            predicted = _prediction(kind, logits[task][row].float().cpu())
            valid = target[(target != IGNORE) & (target > 0)] if kind == "depth" else None
            depth_range = (float(valid.min()), float(valid.max())) if valid is not None and valid.size else (0.0, 1.0)
            axes[row][1 + 2 * j].imshow(_colour(kind, target, classes, depth_range), interpolation="nearest")
            axes[row][2 + 2 * j].imshow(_colour(kind, predicted, classes, depth_range), interpolation="nearest")
            if row == 0:
                axes[0][1 + 2 * j].set_title(f"{task}\ntarget", fontsize=8)
                axes[0][2 + 2 * j].set_title(f"{task}\nprediction", fontsize=8)
    axes[0][0].set_title("input", fontsize=8)
    for ax in np.ravel(axes):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
