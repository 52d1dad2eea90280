"""NYUD-v2 (795 train / 654 val) in the multi-task release read by the ATRC / InvPT code and the ICLR
2025 recipe: semantic segmentation (40 classes), depth, surface normals and edges.

Targets: ``semseg`` class ids 0..39 (the release's 0 = unlabelled becomes 255), ``depth`` in metres
(0 = no measurement, becomes 255), ``normals`` decoded from the PNG as ``2 * v / 255 - 1``, ``edge``
as ``v / 255``. Images are 480 x 640; training crops are 448 x 576 as in the released configs.
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
    channels_last,
    dataset_root,
    find_file,
    hold_out,
    limit,
    read_npy,
    read_png,
    read_rgb,
    read_split,
    require_dirs,
)
from .lazy import lazy_dataset
from .transforms import DenseTransforms, resize

NAME = "NYUD-v2"
TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semantic_segmentation", 40, "masked_cross_entropy", "miou", True),
    "depth": TaskSpec("depth", 1, "depth_l1", "rmse", False),
    "normals": TaskSpec("normals", 3, "normals_l1", "mean_angle", False),
    "edge": TaskSpec("edges", 1, "edge_bce", "loss", False),
}
FOLDERS = {"semseg": "segmentation", "depth": "depth", "normals": "normals", "edge": "edge"}
SUFFIXES = {"semseg": (".png",), "depth": (".npy",), "normals": (".png",), "edge": (".png",)}
IMAGE_SUFFIXES = (".png", ".jpg")
SIZE = (448, 576)
LAYOUT = """  <root>/                      (the NYUDv2 folder of the ATRC / InvPT release)
    images/<id>.png               RGB images (.jpg accepted)
    segmentation/<id>.png         class ids 1..40, 0 = unlabelled
    depth/<id>.npy                depth in metres (H x W float)
    normals/<id>.png              normals encoded as (n + 1) / 2 * 255
    edge/<id>.png                 edge maps, 0 or 255
    gt_sets/train.txt, val.txt    one <id> per line"""
WHERE = ("Download the NYUD-v2 multi-task release of ATRC / InvPT (NYUDv2, with images/, segmentation/, depth/, "
         "normals/, edge/, gt_sets/), unpack it")


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    return select_tasks(tasks, TASKS, NAME)


def load_sample(row: dict[str, Any]) -> dict[str, np.ndarray]:
    """Decode one row (file paths) into the transforms' sample dict."""
    image = read_rgb(row["pixel_values"])
    sample = {"image": image}
    for task, path in row.items():
        if task == "pixel_values":
            continue
        if task == "semseg":
            value = read_png(path) - 1.0
            value[value < 0] = 255.0
        elif task == "depth":
            value = read_npy(path)
        elif task == "normals":
            value = 2.0 * read_png(path)[..., :3] / 255.0 - 1.0
        else:
            value = read_png(path) / 255.0
            value = value[..., 0] if value.ndim == 3 else value
        value = channels_last(value.astype(np.float32))
        if value.shape[:2] != image.shape[:2]:
            value = resize(value, image.shape[:2], "nearest")
        sample[task] = value
    return sample


def load_nyud(root: str | Path | None, split: str = "val", tasks: Sequence[str] | None = None, size: int | None = None,
              train: bool = False, crop_size: Sequence[int] = SIZE, part: str = "all",
              validation_fraction: float = VALIDATION_FRACTION, **transform_options: Any):
    """One split as a lazily decoded ``datasets.Dataset`` with ``pixel_values`` and one column per task;
    ``part``: the whole split list or its training / validation part (:func:`~.layout.hold_out`)."""
    tasks = check_tasks(tasks)
    root = dataset_root(root, NAME, LAYOUT, WHERE)
    require_dirs(root, ["images", "gt_sets", *(FOLDERS[t] for t in tasks)], NAME, LAYOUT)
    ids = hold_out(read_split(root / "gt_sets" / f"{split}.txt", NAME, LAYOUT), part, validation_fraction)
    ids = limit(ids, size, "validation size" if part == "validation" else f"{split} size")
    columns = {"pixel_values": [str(find_file(root / "images", i, IMAGE_SUFFIXES, NAME, LAYOUT)) for i in ids]}
    for t in tasks:
        columns[t] = [str(find_file(root / FOLDERS[t], i, SUFFIXES[t], NAME, LAYOUT)) for i in ids]
    transform = DenseTransforms({t: TASKS[t].kind for t in tasks}, tuple(crop_size), train=train, **transform_options)
    return lazy_dataset(columns, load_sample, transform, "validation" if part == "validation" else split)


@register_dataset("nyud")
def nyud_data(root: str | None = None, tasks: Sequence[str] | None = None, train_split: str = "train",
              eval_split: str = "val", train_size: int | None = None, eval_size: int | None = None,
              validation_fraction: float = VALIDATION_FRACTION, validation_size: int | None = None,
              crop_size: Sequence[int] = SIZE, augment: bool = True, **transform_options: Any) -> DataBundle:
    """Recipe entry point: NYUD-v2 train (augmented), validation and val (the test split, deterministic).

    The release has no validation split: a fixed random ``validation_fraction`` of the train list is
    held out as one (what training evaluates on); ``validation_fraction=0`` trains on the whole list,
    as the papers do, and the bundle has no validation split."""
    tasks = check_tasks(tasks)
    held = float(validation_fraction) > 0
    common = dict(root=root, tasks=tasks, crop_size=crop_size, validation_fraction=validation_fraction,
                  **transform_options)
    return DataBundle(
        tasks=tasks,
        train=load_nyud(split=train_split, size=train_size, train=augment, part="train" if held else "all", **common),
        eval=load_nyud(split=eval_split, size=eval_size, train=False, **common),
        task_specs={t: TASKS[t] for t in tasks},
        validation=load_nyud(split=train_split, size=validation_size, part="validation", **common) if held else None,
    )
