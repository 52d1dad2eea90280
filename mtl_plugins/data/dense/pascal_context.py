"""PASCAL-Context (4998 train / 5105 val) in the multi-task release read by MTI-Net, ATRC, InvPT and the
ICLR 2025 recipe: semantic segmentation (21 classes), human parts (6 parts + background), saliency,
surface normals and edges.

How the targets are derived, as in the released loaders:

* ``semseg``: ``semseg/VOC12/<id>.png`` when it exists, else ``semseg/pascal-context/<id>.png``.
* ``human_parts``: the PASCAL-Part annotations of the person objects (class index 15) in
  ``human_parts/<id>.mat``, part names grouped into head, torso, upper arm, lower arm (with hand),
  upper leg, lower leg (with foot); an image without person parts is ignored entirely (255).
* ``sal``: ``sal_distill/<id>.png / 255 > 0.5``.
* ``normals``: ``2 * normals_distill/<id>.png / 255 - 1``, kept only where the PASCAL-Context label
  (``pascal-context/trainval/<id>.mat``, ``LabelMap``) is a class that NYUD-v2 also names (plus
  ``tvmonitor``); elsewhere ignored.
* ``edge``: thinned boundaries of that ``LabelMap`` (see :mod:`.morphology`).
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
    find_file,
    hold_out,
    limit,
    read_mat,
    read_png,
    read_rgb,
    read_split,
    require_dirs,
)
from .lazy import lazy_dataset
from .morphology import label_edges
from .transforms import DenseTransforms, resize

NAME = "PASCAL-Context"
TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semantic_segmentation", 21, "masked_cross_entropy", "miou", True),
    "human_parts": TaskSpec("human_parts", 7, "masked_cross_entropy", "miou", True),
    "sal": TaskSpec("saliency", 1, "balanced_bce", "miou", True),
    "normals": TaskSpec("normals", 3, "normals_l1", "mean_angle", False),
    "edge": TaskSpec("edges", 1, "edge_bce", "loss", False),
}
SIZE = (512, 512)
PERSON = 15
#: PASCAL-Part names of a person's parts -> the six part classes (0 is background).
HUMAN_PARTS = {
    **dict.fromkeys(("hair", "head", "lear", "lebrow", "leye", "mouth", "nose", "rear", "rebrow", "reye"), 1),
    **dict.fromkeys(("neck", "torso"), 2),
    **dict.fromkeys(("luarm", "ruarm"), 3),
    **dict.fromkeys(("lhand", "llarm", "rhand", "rlarm"), 4),
    **dict.fromkeys(("luleg", "ruleg"), 5),
    **dict.fromkeys(("lfoot", "llleg", "rfoot", "rlleg"), 6),
}
#: PASCAL-Context label ids (of the 459-class ``LabelMap``) whose class name NYUD-v2 also uses, plus
#: ``tvmonitor`` (427): the pixels where the distilled normals are kept.
NORMALS_VALID_CLASSES = frozenset((
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43, 46, 49, 50, 51, 53, 55, 56,
    59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87, 88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124,
    135, 141, 142, 143, 146, 150, 154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213,
    215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251, 252, 255, 260, 261, 263, 269,
    272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290, 291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323,
    329, 330, 331, 336, 342, 345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401, 403,
    405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440, 441, 442, 443, 444, 446, 454, 457,
))
_NORMALS_VALID = np.array(sorted(NORMALS_VALID_CLASSES))
LAYOUT = """  <root>/                               (the PASCALContext folder of the MTI-Net / ATRC / InvPT release)
    JPEGImages/<id>.jpg
    semseg/pascal-context/<id>.png         21 classes (semseg/VOC12/<id>.png preferred when present)
    human_parts/<id>.mat                   PASCAL-Part annotations (struct 'anno')
    pascal-context/trainval/<id>.mat       PASCAL-Context 'LabelMap' (edges, normals mask)
    normals_distill/<id>.png               distilled normals, (n + 1) / 2 * 255
    sal_distill/<id>.png                   distilled saliency, 0..255
    ImageSets/Context/train.txt, val.txt   one <id> per line"""
WHERE = "Download the PASCAL-Context multi-task release of MTI-Net / ATRC / InvPT (PASCALContext), unpack it"
FOLDERS = {"human_parts": "human_parts", "sal": "sal_distill", "normals": "normals_distill", "edge": "pascal-context/trainval"}
SUFFIXES = {"human_parts": ".mat", "sal": ".png", "normals": ".png", "edge": ".mat"}


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    return select_tasks(tasks, TASKS, NAME)


def semseg_path(root: Path, sample_id: str) -> Path:
    voc = root / "semseg" / "VOC12" / f"{sample_id}.png"
    if voc.is_file():
        return voc
    return find_file(root / "semseg" / "pascal-context", sample_id, (".png",), NAME, LAYOUT)


def _field(record: Any, name: str) -> Any:
    try:
        return record[name]
    except (ValueError, KeyError, IndexError) as error:
        raise DatasetLayoutError(f"{NAME}: human-part annotation lacks the field {name!r}") from error


def human_parts(path: str | Path, shape: tuple[int, int]) -> np.ndarray:
    """Part class map (``H x W``, 0 = background) of every person with part annotations."""
    anno = _field(read_mat(path), "anno")[0, 0]
    objects = _field(anno, "objects")
    target = np.zeros(shape, dtype=np.float32)
    for obj in np.ravel(objects):
        parts = _field(obj, "parts")
        if int(np.ravel(_field(obj, "classIndex"))[0]) != PERSON or parts.size == 0:
            continue
        for part in np.ravel(parts):
            name = str(np.ravel(_field(part, "part_name"))[0])
            if name not in HUMAN_PARTS:
                raise DatasetLayoutError(f"{NAME}: unknown human part {name!r} in {str(path)!r}")
            mask = np.asarray(_field(part, "mask"), dtype=bool)
            if mask.shape != shape:
                raise DatasetLayoutError(f"{NAME}: part mask {mask.shape} != image {shape} in {str(path)!r}")
            target[mask] = HUMAN_PARTS[name]
    return target


def context_labels(root: Path, sample_id: str) -> np.ndarray:
    return np.asarray(_field(read_mat(root / "pascal-context" / "trainval" / f"{sample_id}.mat"), "LabelMap"))


class PascalLoader:
    """Decodes one row (file paths) into the transforms' sample dict; ``root`` locates the label maps."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __call__(self, row: dict[str, Any]) -> dict[str, np.ndarray]:
        image = read_rgb(row["pixel_values"])
        shape = image.shape[:2]
        sample_id = Path(row["pixel_values"]).stem
        sample = {"image": image}
        labels = None
        for task, path in row.items():
            if task == "pixel_values":
                continue
            if task == "semseg":
                value = read_png(path)
            elif task == "human_parts":
                value = human_parts(path, shape)
            elif task == "sal":
                value = read_png(path)
                value = (value[..., 0] if value.ndim == 3 else value) / 255.0
                value = (value > 0.5).astype(np.float32)
            elif task == "normals":
                labels = context_labels(self.root, sample_id) if labels is None else labels
                value = 2.0 * read_png(path)[..., :3] / 255.0 - 1.0
                value[~np.isin(labels, _NORMALS_VALID)] = 0.0
            else:
                labels = context_labels(self.root, sample_id) if labels is None else labels
                value = label_edges(labels)
            value = channels_last(np.asarray(value, dtype=np.float32))
            if value.shape[:2] != shape:
                value = resize(value, shape, "nearest")
            sample[task] = value
        return sample


def load_pascal_context(root: str | Path | None, split: str = "val", tasks: Sequence[str] | None = None,
                        size: int | None = None, train: bool = False, crop_size: Sequence[int] = SIZE,
                        part: str = "all", validation_fraction: float = VALIDATION_FRACTION, **transform_options: Any):
    """One split as a lazily decoded ``datasets.Dataset`` with ``pixel_values`` and one column per task;
    ``part``: the whole split list or its training / validation part (:func:`~.layout.hold_out`)."""
    tasks = check_tasks(tasks)
    root = dataset_root(root, NAME, LAYOUT, WHERE)
    folders = ["JPEGImages", "ImageSets/Context"] + ["semseg"] * ("semseg" in tasks)
    folders += [FOLDERS[t] for t in tasks if t in FOLDERS]
    if "normals" in tasks:
        folders.append(FOLDERS["edge"])
    require_dirs(root, folders, NAME, LAYOUT)
    ids = hold_out(read_split(root / "ImageSets" / "Context" / f"{split}.txt", NAME, LAYOUT), part,
                   validation_fraction)
    ids = limit(ids, size, "validation size" if part == "validation" else f"{split} size")
    columns = {"pixel_values": [str(find_file(root / "JPEGImages", i, (".jpg",), NAME, LAYOUT)) for i in ids]}
    for t in tasks:
        if t == "semseg":
            columns[t] = [str(semseg_path(root, i)) for i in ids]
        else:
            columns[t] = [str(find_file(root / FOLDERS[t], i, (SUFFIXES[t],), NAME, LAYOUT)) for i in ids]
            if t == "normals":
                for i in ids:
                    find_file(root / FOLDERS["edge"], i, (".mat",), NAME, LAYOUT)
    transform = DenseTransforms({t: TASKS[t].kind for t in tasks}, tuple(crop_size), train=train, **transform_options)
    return lazy_dataset(columns, PascalLoader(root), transform, "validation" if part == "validation" else split)


@register_dataset("pascal_context")
def pascal_context_data(root: str | None = None, tasks: Sequence[str] | None = None, train_split: str = "train",
                        eval_split: str = "val", train_size: int | None = None, eval_size: int | None = None,
                        validation_fraction: float = VALIDATION_FRACTION, validation_size: int | None = None,
                        crop_size: Sequence[int] = SIZE, augment: bool = True, saliency_metric: str = "miou",
                        **transform_options: Any) -> DataBundle:
    """Recipe entry point: PASCAL-Context train (augmented), validation and val (the test split,
    deterministic). A fixed random ``validation_fraction`` of the train list is held out as the
    validation split; ``validation_fraction=0`` trains on the whole list, as the papers do.

    ``saliency_metric``: ``miou`` (MTI-Net, the CVPR 2024 Delta_m) or ``maxf`` (the ICLR 2025 code)."""
    tasks = check_tasks(tasks)
    if saliency_metric not in ("miou", "maxf"):
        raise ValueError(f"saliency_metric must be 'miou' or 'maxf', got {saliency_metric!r}")
    specs = {t: TASKS[t] for t in tasks}
    if "sal" in specs:
        specs["sal"] = TaskSpec("saliency", 1, "balanced_bce", saliency_metric, True)
    held = float(validation_fraction) > 0
    common = dict(root=root, tasks=tasks, crop_size=crop_size, validation_fraction=validation_fraction,
                  **transform_options)
    return DataBundle(
        tasks=tasks,
        train=load_pascal_context(split=train_split, size=train_size, train=augment, part="train" if held else "all",
                                  **common),
        eval=load_pascal_context(split=eval_split, size=eval_size, train=False, **common),
        task_specs=specs,
        validation=load_pascal_context(split=train_split, size=validation_size, part="validation", **common)
        if held else None,
    )
