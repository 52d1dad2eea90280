"""Taskonomy, "tiny" split, with the 11 tasks of the ICLR 2025 recipe.

Buildings flagged train in ``splits_taskonomy/train_val_test_tiny.csv`` form the training set, those
flagged val the validation set, the others the test set. The released code trains on train and val
(``train_on_val_buildings=True``), leaves out the buildings listed in ``EXCLUDED_BUILDINGS`` and
evaluates on the first tenth of the test images (``eval_fraction=0.1``).
Images and targets are resized to 256 x 256 (bilinear); training flips left-right (normals' x
component negated, which the released loader omits). Values as in the released loader:

* ``rgb`` -> [-1, 1]; depth (``depth_euclidean``, ``depth_zbuffer``): ``log(1 + v) / log(2^16)``;
* ``principal_curvature``: first two channels, standardised with the released mean and std;
* ``edge_occlusion``: ``v / (0.00625 * 2^16)`` mapped to [-1, 1] (not clipped) and Gaussian-blurred
  (sigma 4);
* the others clipped to their range (``RANGES``) and mapped to [-1, 1].

Every task is a dense regression of signed values: ``normal`` has the ``normals`` head kind, the
others the ``dense_regression`` kind (any channel count, loss over every pixel: L1, or MSE for
``principal_curvature``, as in the released code). Scores are the errors the released code reports:
mean absolute error, squared error for ``principal_curvature``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...tasks import TaskSpec, select_tasks
from .. import DataBundle, register_dataset
from .layout import DatasetLayoutError, channels_last, dataset_root, read_png, read_rgb, require_dirs
from .lazy import lazy_dataset
from .transforms import random_flip, resize, to_tensors

NAME = "Taskonomy"
CHANNELS = {
    "depth_euclidean": 1, "depth_zbuffer": 1, "edge_occlusion": 1, "edge_texture": 1, "keypoints2d": 1,
    "keypoints3d": 1, "normal": 3, "principal_curvature": 2, "reshading": 3, "segment_unsup2d": 1,
    "segment_unsup25d": 1,
}
TASKS: dict[str, TaskSpec] = {
    t: TaskSpec("normals" if t == "normal" else "dense_regression", c,
                "normals_l1" if t == "normal" else "mse" if t == "principal_curvature" else "l1",
                "mse" if t == "principal_curvature" else "l1", False)
    for t, c in CHANNELS.items()
}
#: Stored value range of the tasks that are clipped and mapped to [-1, 1].
RANGES = {
    "keypoints2d": (0.0, 0.005 * 2**16), "keypoints3d": (0.0, 2.0**16), "normal": (0.0, 255.0),
    "reshading": (0.0, 255.0), "edge_texture": (0.0, 0.08 * 2**16), "segment_unsup2d": (0.0, 255.0),
    "segment_unsup25d": (0.0, 255.0),
}
EDGE_OCCLUSION_MAX = 0.00625 * 2**16
CURVATURE_MEAN, CURVATURE_STD = (123.572, 120.1), (31.922, 21.658)
#: Buildings the released loader leaves out of the tiny/medium splits (missing or incomplete data).
EXCLUDED_BUILDINGS = frozenset((
    "woodbine", "wiconisco", "brinnon", "cauthron", "cochranton", "donaldson", "german", "castor", "tokeland",
    "andover", "rogue", "athens", "broseley", "tilghmanton", "winooski", "rosser", "arkansaw", "bonnie", "willow",
    "timberon", "bohemia", "micanopy", "thrall", "annona", "byers", "anaheim", "duarte", "wyldwood",
))
SIZE = 256
LAYOUT = """  <root>/
    splits_taskonomy/train_val_test_tiny.csv       header, then: building,train,val,test (1 or 0)
    rgb/taskonomy/<building>/point_<p>_view_<v>_domain_rgb.png
    <task>/taskonomy/<building>/point_<p>_view_<v>_domain_<task>.png    for each task:
        depth_euclidean depth_zbuffer edge_occlusion edge_texture keypoints2d keypoints3d
        normal principal_curvature reshading segment_unsup2d segment_unsup25d"""
WHERE = ("Download the Taskonomy tiny split (rgb and the task folders, as the omnidata / Taskonomy downloader lays "
         "them out) with splits_taskonomy/, unpack it")


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    return select_tasks(tasks, TASKS, NAME)


def read_buildings(csv_path: Path, excluded: frozenset[str] = EXCLUDED_BUILDINGS) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}``: buildings by their flag (train first, then val;
    unflagged ones are test)."""
    if not csv_path.is_file():
        raise DatasetLayoutError(f"{NAME}: split file {str(csv_path)!r} not found. Expected layout:\n{LAYOUT}")
    result: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        if len(row) < 4:
            raise DatasetLayoutError(f"{NAME}: {str(csv_path)!r} row {row} is not building,train,val,test")
        building = row[0].strip()
        if building in excluded:
            continue
        flags = [value.strip() == "1" for value in row[1:3]]
        result["train" if flags[0] else "val" if flags[1] else "test"].append(building)
    return result


#: The partitions ``load_taskonomy`` reads: groups of flagged buildings.
PARTITIONS = {"train": ("train",), "val": ("val",), "train+val": ("train", "val"), "test": ("test",)}


def target_path(root: Path, task: str, rgb_path: Path) -> Path:
    stem = rgb_path.name[: -len("_domain_rgb.png")]
    return root / task / "taskonomy" / rgb_path.parent.name / f"{stem}_domain_{task}.png"


def decode(task: str, raw: np.ndarray) -> np.ndarray:
    """Stored map (``H x W x C``, resized) -> the released target values."""
    channels = CHANNELS[task]
    if raw.shape[2] < channels:
        raw = np.repeat(raw[..., :1], channels, axis=2)
    raw = raw[..., :channels]
    if task.startswith("depth"):
        return np.log1p(raw) / math.log(2.0**16)
    if task == "principal_curvature":
        return (raw - np.asarray(CURVATURE_MEAN, np.float32)) / np.asarray(CURVATURE_STD, np.float32)
    if task == "edge_occlusion":
        from scipy.ndimage import gaussian_filter

        return gaussian_filter(raw / EDGE_OCCLUSION_MAX * 2.0 - 1.0, sigma=(4, 4, 0))
    low, high = RANGES[task]
    return (np.clip(raw, low, high) - low) / (high - low) * 2.0 - 1.0


class TaskonomyTransform:
    """Decode, resize to ``size`` and (training) flip one Taskonomy sample."""

    def __init__(self, tasks: Sequence[str], size: int = SIZE, train: bool = False, flip_p: float = 0.5):
        self.tasks, self.size, self.train, self.flip_p = list(tasks), (int(size), int(size)), train, flip_p
        self.kinds = {t: TASKS[t].kind for t in self.tasks}

    def load(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        image = resize(read_rgb(row["pixel_values"]), self.size, "bilinear", antialias=True)
        sample = {"image": image / 255.0 * 2.0 - 1.0}
        for t in self.tasks:
            raw = resize(channels_last(read_png(row[t])), self.size, "bilinear", antialias=True)
            sample[t] = decode(t, raw).astype(np.float32)
        return sample

    def __call__(self, sample: dict[str, np.ndarray], rng: np.random.Generator):
        if self.train:
            sample = random_flip(sample, self.kinds, rng, self.flip_p)
        return to_tensors(sample, self.kinds)


def load_taskonomy(root: str | Path | None, partition: str = "test", tasks: Sequence[str] | None = None,
                   split: str = "tiny", size: int | None = None, fraction: float = 1.0, train: bool = False,
                   image_size: int = SIZE, skip_incomplete: bool = False,
                   excluded_buildings: Sequence[str] | None = None):
    """``partition`` (buildings flagged ``train``, ``val``, both: ``train+val``, or ``test``) of a split as
    a lazily decoded ``datasets.Dataset``."""
    tasks = check_tasks(tasks)
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {sorted(PARTITIONS)}, got {partition!r}")
    root = dataset_root(root, NAME, LAYOUT, WHERE)
    require_dirs(root, ["splits_taskonomy", "rgb/taskonomy", *(f"{t}/taskonomy" for t in tasks)], NAME, LAYOUT)
    excluded = EXCLUDED_BUILDINGS if excluded_buildings is None else frozenset(excluded_buildings)
    flagged = read_buildings(root / "splits_taskonomy" / f"train_val_test_{split}.csv", excluded)
    buildings = [b for group in PARTITIONS[partition] for b in flagged[group]]
    columns: dict[str, list[str]] = {"pixel_values": [], **{t: [] for t in tasks}}
    for building in buildings:
        folder = root / "rgb" / "taskonomy" / building
        if not folder.is_dir():
            continue  # the released loader skips buildings that were not downloaded
        for rgb in sorted(folder.glob("*_domain_rgb.png")):
            targets = {t: target_path(root, t, rgb) for t in tasks}
            missing = [str(p) for p in targets.values() if not p.is_file()]
            if missing and not skip_incomplete:
                raise DatasetLayoutError(f"{NAME}: missing target file(s) {missing[:3]} (skip_incomplete=True skips "
                                         f"such samples). Expected layout:\n{LAYOUT}")
            if missing:
                continue
            columns["pixel_values"].append(str(rgb))
            for t in tasks:
                columns[t].append(str(targets[t]))
    total = len(columns["pixel_values"])
    if total == 0:
        raise DatasetLayoutError(f"{NAME}: no image of the {partition!r} buildings found under {str(root)!r}. "
                                 f"Expected layout:\n{LAYOUT}")
    count = max(1, int(total * fraction)) if size is None else int(size)
    if not 0 < count <= total:
        raise ValueError(f"{partition} size {count} is not in [1, {total}]")
    columns = {k: v[:count] for k, v in columns.items()}
    transform = TaskonomyTransform(tasks, image_size, train=train)
    return lazy_dataset(columns, transform.load, transform, {"val": "validation", "train+val": "train"}.get(partition, partition))


@register_dataset("taskonomy")
def taskonomy_data(root: str | None = None, tasks: Sequence[str] | None = None, split: str = "tiny",
                   train_size: int | None = None, eval_size: int | None = None, eval_fraction: float = 0.1,
                   validation_size: int | None = None, train_on_val_buildings: bool = False,
                   augment: bool = True, image_size: int = SIZE, skip_incomplete: bool = False,
                   excluded_buildings: Sequence[str] | None = None) -> DataBundle:
    """Recipe entry point: Taskonomy train, validation and test partitions. The buildings flagged
    ``val`` are the validation split (what training evaluates on); ``train_on_val_buildings=True``
    trains on them too, as the released code does, and the bundle has no validation split."""
    tasks = check_tasks(tasks)
    common = dict(root=root, tasks=tasks, split=split, image_size=image_size, skip_incomplete=skip_incomplete,
                  excluded_buildings=excluded_buildings)
    return DataBundle(
        tasks=tasks,
        train=load_taskonomy(partition="train+val" if train_on_val_buildings else "train", size=train_size,
                             train=augment, **common),
        eval=load_taskonomy(partition="test", size=eval_size, fraction=eval_fraction, train=False, **common),
        task_specs={t: TASKS[t] for t in tasks},
        validation=None if train_on_val_buildings else load_taskonomy(partition="val", size=validation_size,
                                                                      train=False, **common),
    )
