"""Cityscapes as the preprocessed arrays of the LibMTL / Nash-MTL (MTAN) benchmark: 128 x 256 images,
7-class semantic segmentation and depth (2975 train / 500 val).

Images are stored in [0, 1] and used as they are (no normalisation, as in those benchmarks). Label
-1 and depth 0 become the ignore value 255. Training applies the MTAN random scale-crop (scales 1,
1.2, 1.5; depth divided by the scale); evaluation applies nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...tasks import TaskSpec, select_tasks
from .. import DataBundle, register_dataset
from .layout import (
    VALIDATION_FRACTION,
    DatasetLayoutError,
    channels_last,
    dataset_root,
    hold_out,
    limit,
    read_npy,
    require_dirs,
)
from .lazy import lazy_dataset
from .transforms import add_ignore_regions, random_flip, random_scale_crop, to_tensors

NAME = "Cityscapes (LibMTL / Nash-MTL arrays)"
TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semantic_segmentation", 7, "masked_cross_entropy", "miou", True),
    "depth": TaskSpec("depth", 1, "depth_l1", "abs_err", False),
}
FOLDERS = {"semseg": "label_7", "depth": "depth"}
LAYOUT = """  <root>/
    train/image/<i>.npy      H x W x 3 float in [0, 1], i = 0 .. N-1
    train/label_7/<i>.npy    H x W, classes 0..6, -1 = ignore
    train/depth/<i>.npy      H x W x 1 (or H x W), 0 = no measurement
    val/image/, val/label_7/, val/depth/   the same for the validation split"""
WHERE = ("Download the preprocessed Cityscapes arrays of LibMTL / Nash-MTL (train/ and val/ with image/, label_7/, "
         "depth/), unpack them")


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    return select_tasks(tasks, TASKS, NAME)


def load_sample(row: dict[str, Any]) -> dict[str, np.ndarray]:
    image = read_npy(row["pixel_values"])
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetLayoutError(f"{NAME}: {row['pixel_values']!r} has shape {image.shape}, expected H x W x 3")
    sample = {"image": image}
    for task, path in row.items():
        if task == "pixel_values":
            continue
        value = channels_last(read_npy(path))
        if task == "semseg":
            value[value < 0] = 255.0
        if value.shape[:2] != image.shape[:2] or value.shape[2] != 1:
            raise DatasetLayoutError(f"{NAME}: {path!r} has shape {value.shape}, expected {image.shape[:2]} (x 1)")
        sample[task] = value
    return sample


class CityscapesTransform:
    """Training: MTAN random scale-crop (and an optional flip); then ignore regions and tensors."""

    def __init__(self, tasks: Sequence[str], train: bool = False, scales: Sequence[float] = (1.0, 1.2, 1.5),
                 flip_p: float = 0.0):
        self.kinds = {t: TASKS[t].kind for t in tasks}
        self.train, self.scales, self.flip_p = train, tuple(scales), flip_p

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator):
        if self.train:
            sample = random_scale_crop(sample, self.kinds, rng, self.scales)
            if self.flip_p > 0:
                sample = random_flip(sample, self.kinds, rng, self.flip_p)
        return to_tensors(add_ignore_regions(sample, self.kinds), self.kinds)


def load_cityscapes(root: str | Path | None, split: str = "val", tasks: Sequence[str] | None = None,
                    size: int | None = None, train: bool = False, part: str = "all",
                    validation_fraction: float = VALIDATION_FRACTION, **transform_options: Any):
    """One split (``train`` or ``val``) as a lazily decoded ``datasets.Dataset``; ``part``: the whole
    split or its training / validation part (:func:`~.layout.hold_out`)."""
    tasks = check_tasks(tasks)
    root = dataset_root(root, NAME, LAYOUT, WHERE)
    require_dirs(root, [f"{split}/image", *(f"{split}/{FOLDERS[t]}" for t in tasks)], NAME, LAYOUT)
    images = root / split / "image"
    numbers = sorted(int(p.stem) for p in images.glob("*.npy") if p.stem.isdigit())
    if not numbers or numbers != list(range(len(numbers))):
        raise DatasetLayoutError(f"{NAME}: {str(images)!r} must hold 0.npy .. N-1.npy. Expected layout:\n{LAYOUT}")
    ids = hold_out([str(n) for n in numbers], part, validation_fraction)
    ids = limit(ids, size, "validation size" if part == "validation" else f"{split} size")
    columns = {"pixel_values": [str(images / f"{i}.npy") for i in ids]}
    for t in tasks:
        paths = [root / split / FOLDERS[t] / f"{i}.npy" for i in ids]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DatasetLayoutError(f"{NAME}: missing {missing[:3]}. Expected layout:\n{LAYOUT}")
        columns[t] = [str(p) for p in paths]
    transform = CityscapesTransform(tasks, train=train, **transform_options)
    return lazy_dataset(columns, load_sample, transform, "validation" if part == "validation" else split)


@register_dataset("cityscapes")
def cityscapes_data(root: str | None = None, tasks: Sequence[str] | None = None, train_size: int | None = None,
                    eval_size: int | None = None, validation_fraction: float = VALIDATION_FRACTION,
                    validation_size: int | None = None, augment: bool = True, **transform_options: Any) -> DataBundle:
    """Recipe entry point: Cityscapes train (augmented), validation and val (the test split). A fixed
    random ``validation_fraction`` of the train arrays is held out as the validation split;
    ``validation_fraction=0`` trains on all of them, as the papers do."""
    tasks = check_tasks(tasks)
    held = float(validation_fraction) > 0
    common = dict(validation_fraction=validation_fraction, **transform_options)
    return DataBundle(
        tasks=tasks,
        train=load_cityscapes(root, "train", tasks, train_size, train=augment, part="train" if held else "all",
                              **common),
        eval=load_cityscapes(root, "val", tasks, eval_size, train=False, **common),
        task_specs={t: TASKS[t] for t in tasks},
        validation=load_cityscapes(root, "train", tasks, validation_size, part="validation", **common)
        if held else None,
    )
