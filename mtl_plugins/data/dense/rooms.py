"""``rooms``: procedurally generated indoor scenes with exact dense ground truth (embedded, offline).

Each scene is a room (floor, back wall, two side walls; random size) holding 2-8 objects of six
classes (sphere, box, cylinder, cone, torus, pyramid) at random places on the floor, with random
size, orientation and colour, solid procedural textures (noise, stripes, checker) on every surface,
one point light with cast shadows and ambient light, seen from a random camera pose and field of
view. Scenes are rendered by the analytic ray caster of :mod:`.render`, so every target is exact:

========  ==============  ======================================================================
task      kind            target (as the NYUD-v2 / PASCAL-Context loaders deliver theirs)
========  ==============  ======================================================================
semseg    segmentation    class id: 0 floor, 1 wall, 2 sphere, 3 box, 4 cylinder, 5 cone, 6 torus,
                          7 pyramid; 255 where the ray leaves the room (ceiling, open front)
depth     depth           z-depth in metres (0 where nothing is hit: ignored by the transforms)
normals   normals         unit camera-frame normals, NYU encoding: x right, y down, z to the camera
edge      edges           thinned boundaries where the class or the surface instance changes or the
                          depth jumps (inverse depth not locally affine), 0 / 1
saliency  saliency        1 on objects, 0 on the room, 255 where nothing is hit
========  ==============  ======================================================================

Every sample also carries its pinhole intrinsics ``fx, fy, cx, cy`` (pixels; ray of pixel centre
``(u, v)`` is ``((u - cx) / fx, (v - cy) / fy, 1)``), so depth back-projects to camera coordinates.
Splits ``train`` / ``validation`` / ``test`` come from independent random streams of one ``seed``.
Generated splits are cached as ``datasets`` Arrow folders under ``<cache>/rooms/<key>`` (the key
hashes every generation parameter) and reused; recipes read them through the same dense
transforms, heads, losses and metrics as the real datasets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...tasks import TaskSpec, select_tasks
from .. import DataBundle, register_dataset
from .lazy import BatchTransform
from .morphology import laplacian, thin
from .render import CLASSES, ROOM_SURFACES, SHAPES, Scenes, intrinsics_from_fov, look_at, render

NAME = "rooms"
VERSION = 1  # bump when the generator changes: old caches are then not reused
TASKS: dict[str, TaskSpec] = {
    "semseg": TaskSpec("semantic_segmentation", len(CLASSES), "masked_cross_entropy", "miou", True,
                       labels=CLASSES),
    "depth": TaskSpec("depth", 1, "depth_l1", "rmse", False),
    "normals": TaskSpec("normals", 3, "normals_l1", "mean_angle", False),
    "edge": TaskSpec("edges", 1, "edge_bce", "loss", False),
    "saliency": TaskSpec("saliency", 1, "balanced_bce", "miou", True),
}
SPLITS = ("train", "validation", "test")
DEFAULT_SIZES = {"train": 3000, "validation": 300, "test": 500}
IGNORE = 255
#: Relative second difference of inverse depth above which neighbouring pixels are a depth jump.
DEPTH_JUMP = 0.1
MAX_OBJECTS = 8
#: Surface index of each room surface in a rendering's ``surface`` map (objects: 4 + slot).
ROOM_SURFACE_INDEX = {name: i for i, name in enumerate(ROOM_SURFACES)}


def check_tasks(tasks: Sequence[str] | None) -> list[str]:
    return select_tasks(tasks, TASKS, NAME)


# -- scene sampling --------------------------------------------------------------------------------
def _rotation_y(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([c, zero, s], -1), np.stack([zero, one, zero], -1), np.stack([-s, zero, c], -1)], -2)


def _rotation_x(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    zero, one = np.zeros_like(c), np.ones_like(c)
    return np.stack([np.stack([one, zero, zero], -1), np.stack([zero, c, -s], -1), np.stack([zero, s, c], -1)], -2)


def _colours(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random RGB colours (HSV with moderate saturation and value)."""
    from matplotlib.colors import hsv_to_rgb

    hsv = np.stack([rng.random(shape), rng.uniform(0.2, 0.9, shape), rng.uniform(0.35, 1.0, shape)], -1)
    return hsv_to_rgb(hsv)


def sample_scenes(count: int, height: int, width: int, rng: np.random.Generator,
                  fov_range: tuple[float, float] = (50.0, 75.0), objects: tuple[int, int] = (2, MAX_OBJECTS),
                  dtype: torch.dtype = torch.float32) -> Scenes:
    """``count`` random scenes (numpy draws in a fixed order, so a generator state fixes them all),
    as tensors of ``dtype`` (the geometry is computed in that precision)."""
    n, k = count, MAX_OBJECTS
    room = np.stack([rng.uniform(4.0, 6.0, n), rng.uniform(2.6, 3.2, n), rng.uniform(5.0, 7.5, n)], -1)
    width_m, length = room[:, 0], room[:, 2]
    camera = np.stack([rng.uniform(-0.25, 0.25, n) * width_m, rng.uniform(1.1, 1.9, n), rng.uniform(0.3, 0.9, n)], -1)
    target = np.stack([rng.uniform(-0.15, 0.15, n) * width_m, rng.uniform(0.0, 0.6, n),
                       rng.uniform(0.45, 0.7, n) * length], -1)
    roll = np.deg2rad(rng.uniform(-6.0, 6.0, n))
    fov = rng.uniform(*fov_range, n)
    light = np.stack([rng.uniform(-0.35, 0.35, n) * width_m, room[:, 1] - rng.uniform(0.1, 0.4, n),
                      rng.uniform(0.3, 0.8, n) * length], -1)
    ambient = rng.uniform(0.2, 0.4, n)

    # objects on a jittered 3 x 4 grid of floor cells in front of the camera (no two in one cell)
    count_objects = rng.integers(objects[0], objects[1] + 1, n)
    cells = np.argsort(rng.random((n, 12)), axis=1)[:, :k]
    shape = rng.integers(0, len(SHAPES), (n, k))
    shape[np.arange(k)[None, :] >= count_objects[:, None]] = -1
    col, row = cells % 3, cells // 3
    cell_w = (width_m[:, None] - 1.0) / 3
    cell_z = (length[:, None] - 2.0) / 4
    size = rng.uniform(0.22, 0.5, (n, k))
    jitter = rng.uniform(-0.5, 0.5, (n, k, 2)) * np.maximum(0.0, 1 - 2 * size[..., None] / np.minimum(cell_w, cell_z)[..., None])
    x = -width_m[:, None] / 2 + 0.5 + (col + 0.5 + jitter[..., 0]) * cell_w
    z = 1.5 + (row + 0.5 + jitter[..., 1]) * cell_z
    u = rng.uniform(0.0, 1.0, (n, k, 3))
    yaw = rng.uniform(0, 2 * np.pi, (n, k))
    tilt = np.where(shape == SHAPES.index("torus"), rng.uniform(0, np.pi / 2, (n, k)), 0.0)
    dims = np.zeros((n, k, 3))
    lift = np.zeros((n, k))
    for s, name in enumerate(SHAPES):
        m = shape == s
        if name == "sphere":
            d = np.stack([size, 0 * size, 0 * size], -1)
            up = size
        elif name == "box":
            d = size[..., None] * (0.55 + 0.6 * u)
            up = d[..., 1]
        elif name == "cylinder":
            d = np.stack([size * (0.5 + 0.4 * u[..., 0]), size * (0.6 + 0.8 * u[..., 1]), 0 * size], -1)
            up = d[..., 1]
        elif name == "cone":
            d = np.stack([size * (0.6 + 0.4 * u[..., 0]), size * (1.4 + 1.2 * u[..., 1]), 0 * size], -1)
            up = d[..., 1] / 2
        elif name == "torus":
            major = size * (0.65 + 0.2 * u[..., 0])
            d = np.stack([major, major * (0.25 + 0.2 * u[..., 1]), 0 * size], -1)
            up = major * np.sin(tilt) + d[..., 1] * np.cos(tilt) + 1e-3
        else:  # pyramid
            d = np.stack([size * (0.7 + 0.4 * u[..., 0]), size * (1.3 + 1.0 * u[..., 1]), 0 * size], -1)
            up = d[..., 1] / 2
        dims[m] = d[m]
        lift[m] = up[m]
    centre = np.stack([x, lift, z], -1)
    rotation = _rotation_y(yaw) @ _rotation_x(tilt)

    surfaces = 4 + k
    texture = rng.integers(0, 3, (n, surfaces))
    colours = _colours(rng, (n, surfaces, 2))
    frequency = np.concatenate([rng.uniform(0.8, 2.5, (n, 4)), rng.uniform(2.0, 7.0, (n, k))], 1)
    axis = rng.normal(size=(n, surfaces, 3))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    phase = rng.random((n, surfaces))

    def t(a):
        return torch.as_tensor(a, dtype=dtype)

    return Scenes(room=t(room), camera_position=t(camera), camera_rotation=look_at(t(camera), t(target), t(roll)),
                  intrinsics=intrinsics_from_fov(height, width, torch.as_tensor(fov)).to(dtype), light=t(light),
                  ambient=t(ambient),
                  shape=torch.as_tensor(shape), centre=t(centre), rotation=t(rotation), dims=t(dims),
                  texture=torch.as_tensor(texture), colours=t(colours), frequency=t(frequency), axis=t(axis),
                  phase=t(phase))


# -- ground truth -------------------------------------------------------------------------------------
def class_map(surface: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Class ids (``CLASSES`` order) from surface indices of one image; 255 where nothing is hit."""
    labels = np.full(surface.shape, IGNORE, dtype=np.uint8)
    labels[surface == 0] = 0
    labels[(surface >= 1) & (surface <= 3)] = 1
    objects = surface >= 4
    labels[objects] = 2 + shapes[surface[objects] - 4]
    return labels


def depth_jumps(depth: np.ndarray, threshold: float = DEPTH_JUMP) -> np.ndarray:
    """Pixels next to a depth discontinuity: the second difference of inverse depth (affine in the
    image on every plane) exceeds ``threshold`` times the inverse depth, along rows or columns
    (``depth``: ``H x W`` or a stack ``B x H x W``; 0 = no depth)."""
    inverse = np.where(depth > 0, 1.0 / np.where(depth > 0, depth, 1.0), 0.0)
    jump = np.zeros(depth.shape, dtype=bool)
    for axis in (-2, -1):
        a = np.moveaxis(inverse, axis, 0)
        second = np.zeros_like(a)
        second[1:-1] = np.abs(a[:-2] - 2 * a[1:-1] + a[2:])
        # a jump between pixels i and i + 1 shows at both (like the Laplacian of a label step)
        big = second > threshold * np.maximum(a, 1e-12)
        jump |= np.moveaxis(big & (a > 0), 0, axis)
    return jump


def edge_map(semseg: np.ndarray, instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Thin (one-pixel) boundaries where class or instance change or the depth jumps, float32 0/1
    (one map ``H x W`` or a stack ``B x H x W``)."""
    boundary = (np.abs(laplacian(semseg.astype(np.int64))) > 0) | (np.abs(laplacian(instance)) > 0)
    return thin(boundary | depth_jumps(depth)).astype(np.float32)


def ground_truth(rendering, shapes: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image arrays of a rendered batch: image (uint8), the five targets, instance ids."""
    surface = rendering.surface.numpy()
    depth = rendering.depth.numpy().astype(np.float32)
    out = {"image": np.round(rendering.image.numpy() * 255).astype(np.uint8), "depth": depth,
           "normals": rendering.normals.numpy().astype(np.float32), "surface": surface.astype(np.int16)}
    semseg = np.stack([class_map(surface[i], shapes[i]) for i in range(len(surface))])
    out["semseg"] = semseg
    out["saliency"] = np.where(surface < 0, IGNORE, (surface >= 4).astype(np.uint8)).astype(np.uint8)
    out["edge"] = edge_map(semseg, surface.astype(np.int64), depth)
    return out


def generate(count: int, height: int = 64, width: int = 64, seed: int = 0, split: str = "train",
             chunk: int = 128, **scene_options: Any) -> dict[str, np.ndarray]:
    """``count`` scenes of ``split`` rendered as numpy arrays (``image``, targets, ``surface``,
    ``intrinsics``); deterministic given ``seed`` and ``split``, independent of ``chunk``."""
    if split not in SPLITS:
        raise ValueError(f"unknown rooms split {split!r}; choose one of {SPLITS}")
    for what, value in (("count", count), ("height", height), ("width", width)):
        if int(value) != value or value <= 0:
            raise ValueError(f"rooms: {what} must be a positive integer, got {value!r}")
    rng = np.random.default_rng([int(seed), SPLITS.index(split), VERSION])
    scenes = sample_scenes(count, height, width, rng, **scene_options)
    parts = []
    for start in range(0, count, chunk):
        part = _slice(scenes, slice(start, min(start + chunk, count)))
        parts.append(ground_truth(render(part, height, width), part.shape.numpy()))
    arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    arrays["intrinsics"] = scenes.intrinsics.numpy().astype(np.float32)
    return arrays


def _slice(scenes: Scenes, index: slice) -> Scenes:
    return Scenes(**{name: getattr(scenes, name)[index] for name in scenes.__dataclass_fields__})


# -- datasets and caching -------------------------------------------------------------------------------
def cache_key(**parameters: Any) -> str:
    source = json.dumps({"version": VERSION, **parameters}, sort_keys=True, default=str)
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _to_arrow(arrays: Mapping[str, np.ndarray], split: str):
    import datasets

    columns = {
        "pixel_values": [a.tobytes() for a in arrays["image"]],
        "semseg": [a.tobytes() for a in arrays["semseg"]],
        "depth": [a.tobytes() for a in arrays["depth"]],
        "normals": [a.tobytes() for a in arrays["normals"]],
        "edge": [np.packbits(a.astype(bool)).tobytes() for a in arrays["edge"]],
        "saliency": [a.tobytes() for a in arrays["saliency"]],
        "intrinsics": arrays["intrinsics"].tolist(),
        "height": [arrays["image"].shape[1]] * len(arrays["image"]),
        "width": [arrays["image"].shape[2]] * len(arrays["image"]),
    }
    return datasets.Dataset.from_dict(columns, split=split)


def load_split(split: str = "train", size: int | None = None, height: int = 64, width: int = 64, seed: int = 0,
               cache: str | Path | None = None):
    """The raw Arrow dataset of one split (encoded arrays and ``intrinsics``), generated on first use
    and cached under ``cache`` (default ``<mtl_plugins cache>/rooms``)."""
    import datasets

    from ...runner import cache_dir

    size = DEFAULT_SIZES.get(split, 0) if size is None else int(size)
    folder = Path(cache) if cache is not None else cache_dir() / "rooms"
    folder = folder / cache_key(split=split, size=size, height=height, width=width, seed=seed)
    if not (folder / "dataset_info.json").is_file():
        dataset = _to_arrow(generate(size, height, width, seed, split), split)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        quiet = not datasets.utils.are_progress_bars_disabled()
        if quiet:
            datasets.disable_progress_bars()
        try:
            dataset.save_to_disk(str(partial))
        finally:
            if quiet:
                datasets.enable_progress_bars()
        (partial / "parameters.json").write_text(json.dumps(
            {"split": split, "size": size, "height": height, "width": width, "seed": seed, "version": VERSION}))
        try:  # atomic: a process generating the same split at the same time keeps its own copy
            partial.rename(folder)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    return datasets.load_from_disk(str(folder))


class RoomsDecoder:
    """Decodes one row of a rooms Arrow dataset into the dense transforms' sample dict (picklable)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = int(height), int(width)

    def __call__(self, row: Mapping[str, Any]) -> dict[str, np.ndarray]:
        shape = (self.height, self.width)
        sample = {"image": np.frombuffer(row["pixel_values"], np.uint8).reshape(*shape, 3).astype(np.float32)}
        for task, value in row.items():
            if task == "semseg" or task == "saliency":
                array = np.frombuffer(value, np.uint8).reshape(shape).astype(np.float32)
            elif task == "depth":
                array = np.frombuffer(value, np.float32).reshape(shape).copy()
            elif task == "normals":
                array = np.frombuffer(value, np.float32).reshape(*shape, 3).copy()
            elif task == "edge":
                array = np.unpackbits(np.frombuffer(value, np.uint8))[: shape[0] * shape[1]].reshape(shape).astype(np.float32)
            else:
                continue
            sample[task] = array if array.ndim == 3 else array[..., None]
        return sample


def decode(dataset, index: int) -> dict[str, np.ndarray]:
    """Row ``index`` of a raw split as arrays: ``image``, the targets (``H x W`` or ``H x W x 3``),
    ``intrinsics`` (fx, fy, cx, cy)."""
    row = dataset[int(index)]
    sample = RoomsDecoder(row["height"], row["width"])(row)
    out = {k: (v[..., 0] if v.shape[-1] == 1 else v) for k, v in sample.items()}
    out["intrinsics"] = np.asarray(row["intrinsics"], dtype=np.float32)
    return out


def rooms_split(split: str, tasks: Sequence[str], size: int | None, height: int, width: int, seed: int,
                cache: str | Path | None, augment: bool, **transform_options: Any):
    """A split as a ``datasets.Dataset`` that yields ``pixel_values`` and the tasks' tensors through
    :class:`~mtl_plugins.data.dense.transforms.DenseTransforms`, like the real dense datasets."""
    from .transforms import DenseTransforms

    raw = load_split(split, size, height, width, seed, cache)
    raw = raw.remove_columns([c for c in raw.column_names if c not in ("pixel_values", *tasks)])
    transform = DenseTransforms({t: TASKS[t].kind for t in tasks}, (height, width), train=augment, **transform_options)
    return raw.with_transform(BatchTransform(["pixel_values", *tasks], RoomsDecoder(height, width), transform))


@register_dataset(NAME)
def rooms_data(tasks: Sequence[str] | None = None, train_size: int | None = None, eval_size: int | None = None,
               validation_size: int | None = None, height: int = 64, width: int = 64, seed: int = 0,
               cache: str | None = None, augment: bool = False, **transform_options: Any) -> DataBundle:
    """Recipe entry point: rooms train, validation (what training evaluates on) and test (``eval``,
    ``eval_size`` scenes) splits. ``augment=True`` applies the released training augmentations
    (scaling, crop, flip, photometric); off by default, since every scene is new."""
    tasks = check_tasks(tasks)
    common = {"tasks": tasks, "height": height, "width": width, "seed": seed, "cache": cache, **transform_options}
    return DataBundle(
        tasks=tasks,
        train=rooms_split("train", size=train_size, augment=augment, **common),
        eval=rooms_split("test", size=eval_size, augment=False, **common),
        task_specs={t: TASKS[t] for t in tasks},
        validation=rooms_split("validation", size=validation_size, augment=False, **common),
    )
