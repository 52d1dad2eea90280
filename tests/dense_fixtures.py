"""Tiny generated datasets in the on-disk layouts of the public dense-prediction releases.

Each writer fills a folder with a few small random samples and returns what it wrote (the arrays
before encoding, and the targets a correct loader must produce), so tests can compare against them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.io import savemat


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:04d}" for i in range(n)]


def write_nyud(root: Path, n_train: int = 3, n_val: int = 2, shape: tuple[int, int] = (24, 32), seed: int = 0) -> dict:
    """NYUD-v2 (ATRC / InvPT release layout). Returns ``{id: {"image", "semseg", "depth", "normals", "edge"}}``
    with the targets as the loader must produce them (semseg 0..39, 255 = unlabelled)."""
    rng = np.random.default_rng(seed)
    h, w = shape
    samples = {}
    splits = {"train": _ids("tr", n_train), "val": _ids("va", n_val)}
    for split, ids in splits.items():
        (root / "gt_sets").mkdir(parents=True, exist_ok=True)
        (root / "gt_sets" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for i in ids:
            image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            stored_seg = rng.integers(0, 41, (h, w), dtype=np.uint8)  # 0 = unlabelled
            depth = rng.uniform(0.5, 10.0, (h, w)).astype(np.float32)
            depth[rng.random((h, w)) < 0.1] = 0.0
            normals = rng.normal(size=(h, w, 3))
            normals /= np.linalg.norm(normals, axis=2, keepdims=True)
            stored_normals = np.round((normals + 1.0) / 2.0 * 255.0).astype(np.uint8)
            edge = (rng.random((h, w)) < 0.2).astype(np.uint8) * 255
            _png(root / "images" / f"{i}.png", image)
            _png(root / "segmentation" / f"{i}.png", stored_seg)
            (root / "depth").mkdir(parents=True, exist_ok=True)
            np.save(root / "depth" / f"{i}.npy", depth)
            _png(root / "normals" / f"{i}.png", stored_normals)
            _png(root / "edge" / f"{i}.png", edge)
            semseg = np.where(stored_seg == 0, 255, stored_seg.astype(np.int64) - 1)
            samples[i] = {"image": image, "semseg": semseg, "depth": depth,
                          "normals": 2.0 * stored_normals / 255.0 - 1.0, "edge": edge / 255.0}
    return {"splits": splits, "samples": samples}


# A few PASCAL-Part person part names and the part class the loader must give them.
PART_CLASSES = {"head": 1, "hair": 1, "neck": 2, "torso": 2, "luarm": 3, "rlarm": 4, "rhand": 4, "ruleg": 5, "lfoot": 6}


def _struct_array(records: list[tuple], fields: list[str]) -> np.ndarray:
    array = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for k, record in enumerate(records):
        array[0, k] = record
    return array


def write_pascal(root: Path, n_train: int = 3, n_val: int = 2, shapes: tuple = ((20, 28), (24, 24), (18, 30)),
                 seed: int = 0, valid_normal_class: int = 72, invalid_normal_class: int = 2) -> dict:
    """PASCAL-Context (MTI-Net / ATRC / InvPT release layout). Returns per id: ``image`` (as stored, JPEG),
    ``semseg``, ``human_parts`` (expected part map, or None when the image has no person parts),
    ``sal`` (expected 0/1), ``normals`` (expected, 0 where masked out), ``labels`` (the LabelMap)."""
    rng = np.random.default_rng(seed)
    samples = {}
    splits = {"train": _ids("2008_00", n_train), "val": _ids("2009_00", n_val)}
    (root / "ImageSets" / "Context").mkdir(parents=True, exist_ok=True)
    for split, ids in splits.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    names = list(PART_CLASSES)
    for k, i in enumerate(splits["train"] + splits["val"]):
        h, w = shapes[k % len(shapes)]
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "JPEGImages" / f"{i}.jpg", quality=95)
        semseg = rng.integers(0, 21, (h, w), dtype=np.uint8)
        semseg[rng.random((h, w)) < 0.05] = 255
        _png(root / "semseg" / "pascal-context" / f"{i}.png", semseg)
        # LabelMap: left half a class NYUD also names (normals kept), right half one it does not.
        labels = np.full((h, w), invalid_normal_class, dtype=np.uint16)
        labels[:, : w // 2] = valid_normal_class
        labels[h // 2 :, : w // 4] = 284  # person (also valid for normals)
        (root / "pascal-context" / "trainval").mkdir(parents=True, exist_ok=True)
        savemat(root / "pascal-context" / "trainval" / f"{i}.mat", {"LabelMap": labels})
        # Human parts: every other image has a person with parts (and a dog without).
        objects, expected = [], None
        if k % 2 == 0:
            expected = np.zeros((h, w), dtype=np.int64)
            parts = []
            for name in rng.choice(names, size=3, replace=False):
                mask = np.zeros((h, w), dtype=np.uint8)
                top, left = rng.integers(0, h - 4), rng.integers(0, w - 4)
                mask[top : top + rng.integers(3, h - top + 1), left : left + rng.integers(3, w - left + 1)] = 1
                parts.append((str(name), mask))
                expected[mask.astype(bool)] = PART_CLASSES[str(name)]
            objects.append(("person", np.array([[15]]), np.ones((h, w), np.uint8), _struct_array(parts, ["part_name", "mask"])))
        objects.append(("dog", np.array([[12]]), np.ones((h, w), np.uint8), np.zeros((0, 0))))
        (root / "human_parts").mkdir(parents=True, exist_ok=True)
        savemat(root / "human_parts" / f"{i}.mat",
                {"anno": {"imname": i, "objects": _struct_array(objects, ["class", "classIndex", "mask", "parts"])}})
        sal = rng.integers(0, 256, (h, w), dtype=np.uint8)
        _png(root / "sal_distill" / f"{i}.png", sal)
        stored_normals = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        _png(root / "normals_distill" / f"{i}.png", stored_normals)
        normals = 2.0 * stored_normals / 255.0 - 1.0
        normals[labels == invalid_normal_class] = 0.0
        samples[i] = {"image": image, "semseg": semseg.astype(np.int64), "human_parts": expected,
                      "sal": (sal / 255.0 > 0.5).astype(np.int64), "normals": normals, "labels": labels}
    return {"splits": splits, "samples": samples}


TASKONOMY_TASKS = ("depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d",
                   "normal", "principal_curvature", "reshading", "segment_unsup2d", "segment_unsup25d")
SIXTEEN_BIT = ("depth_euclidean", "depth_zbuffer", "edge_occlusion", "edge_texture", "keypoints2d", "keypoints3d")
THREE_CHANNEL = ("normal", "principal_curvature", "reshading")


def write_taskonomy(root: Path, buildings: dict | None = None, points: int = 2, size: int = 32, seed: int = 0) -> dict:
    """Taskonomy tiny split layout. ``buildings``: name -> (train, val, test) flags. Returns the
    stored arrays per rgb file path (``{path: {task: array}}``) and the building lists."""
    rng = np.random.default_rng(seed)
    buildings = buildings or {"allensville": (1, 0, 0), "beechwood": (0, 1, 0), "collierville": (0, 0, 1),
                              "woodbine": (1, 0, 0)}
    (root / "splits_taskonomy").mkdir(parents=True, exist_ok=True)
    with open(root / "splits_taskonomy" / "train_val_test_tiny.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "train", "val", "test"])
        for name, flags in buildings.items():
            writer.writerow([name, *flags])
    stored = {}
    for name in buildings:
        for p in range(points):
            stem = f"point_{p}_view_0"
            rgb_path = root / "rgb" / "taskonomy" / name / f"{stem}_domain_rgb.png"
            _png(rgb_path, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            arrays = {}
            for task in TASKONOMY_TASKS:
                if task in SIXTEEN_BIT:
                    array = rng.integers(0, 2**16, (size, size), dtype=np.uint16)
                elif task in THREE_CHANNEL:
                    array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                else:
                    array = rng.integers(0, 256, (size, size), dtype=np.uint8)
                _png(root / task / "taskonomy" / name / f"{stem}_domain_{task}.png", array)
                arrays[task] = array
            stored[str(rgb_path)] = arrays
    return {"buildings": buildings, "stored": stored}


def write_cityscapes(root: Path, n_train: int = 3, n_val: int = 2, shape: tuple[int, int] = (16, 32), seed: int = 0) -> dict:
    """Cityscapes arrays in the LibMTL / Nash-MTL layout. Returns ``{split: [{image, semseg, depth}]}`` as stored."""
    rng = np.random.default_rng(seed)
    h, w = shape
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        for folder in ("image", "label_7", "depth"):
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        out[split] = []
        for i in range(n):
            image = rng.random((h, w, 3)).astype(np.float32)
            label = rng.integers(-1, 7, (h, w)).astype(np.float32)
            depth = rng.uniform(1.0, 80.0, (h, w, 1)).astype(np.float32)
            depth[rng.random((h, w, 1)) < 0.2] = 0.0
            np.save(root / split / "image" / f"{i}.npy", image)
            np.save(root / split / "label_7" / f"{i}.npy", label)
            np.save(root / split / "depth" / f"{i}.npy", depth)
            out[split].append({"image": image, "semseg": label, "depth": depth})
    return out


#: Overrides that train a Cityscapes recipe for 2 steps on a tiny random ResNet (no download).
TINY_CITYSCAPES = ["model.options.backbone_pretrained=null",
                   "model.options.backbone_config={model_type: resnet, embedding_size: 8, hidden_sizes: [8, 8, 16, 16], "
                   "depths: [1, 1, 1, 1], layer_type: basic}",
                   "training.max_steps=2", "training.per_device_train_batch_size=3",
                   "training.per_device_eval_batch_size=2", "training.dataloader_num_workers=0",
                   "training.logging_steps=1"]
