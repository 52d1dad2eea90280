"""MultiDigits: an offline multi-task benchmark from scikit-learn's bundled handwritten digits.

Each example places two real 8x8 digit images side by side on a 12x20 canvas (MultiMNIST-style):
each digit is shifted by a random offset (up to 4 rows, 3 columns), so the two digits may overlap
in the middle columns (pixel-wise maximum) and the tasks cannot rely on fixed pixel positions.
Tasks and their structure:

============  ==========================  ==========================================
task          target                      relation to the other tasks
============  ==========================  ==========================================
left          left digit (10 classes)     shares all information with ``left_odd``
right         right digit (10 classes)    shares all information with ``right_large``
left_odd      left digit is odd (2)       a coarsening of ``left``
right_large   right digit >= 5 (2)        a coarsening of ``right``
sum           (left + right) / 18 (MSE)   needs both halves: competes with each side
============  ==========================  ==========================================

``left``/``right`` read disjoint halves of the image and compete for the shared capacity;
``left``/``left_odd`` and ``right``/``right_large`` are pairs that help each other. The digit
images are split into train/val/test pools first (no digit image appears in two splits), then
pairs are drawn within each pool; everything is deterministic given ``seed``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..tasks import TaskSpec, select_tasks
from . import DataBundle, register_dataset

SPLITS = ("train", "validation", "test")
POOL_FRACTIONS = {"train": 0.7, "validation": 0.1, "test": 0.2}
DEFAULT_SIZES = {"train": 4000, "validation": 500, "test": 1000}


TASKS: dict[str, TaskSpec] = {
    "left": TaskSpec("classification", 10, "cross_entropy", "accuracy", True),
    "right": TaskSpec("classification", 10, "cross_entropy", "accuracy", True),
    "left_odd": TaskSpec("classification", 2, "cross_entropy", "accuracy", True),
    "right_large": TaskSpec("classification", 2, "cross_entropy", "accuracy", True),
    "sum": TaskSpec("regression", 1, "mse", "mae", False, metric_scale=18.0),
}
IMAGE_SHAPE = (1, 12, 20)
MAX_SHIFT = (4, 3)
RIGHT_START = 9


def check_task_names(tasks: Sequence[str] | None) -> list[str]:
    return select_tasks(tasks, TASKS, "MultiDigits")


def _pools(seed: int) -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_train = int(POOL_FRACTIONS["train"] * len(order))
    n_val = int(POOL_FRACTIONS["validation"] * len(order))
    bounds = {"train": (0, n_train), "validation": (n_train, n_train + n_val), "test": (n_train + n_val, len(order))}
    return {split: order[a:b] for split, (a, b) in bounds.items()}


def make_arrays(split: str = "train", size: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Images (``pixel_values``, float32 in [0, 1], shape N x 1 x 12 x 20) and every task's labels."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    size = DEFAULT_SIZES[split] if size is None else int(size)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    digits = load_digits()
    pool = _pools(seed)[split]
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    left, right = rng.choice(pool, size=size), rng.choice(pool, size=size)
    images = digits.images.astype(np.float32) / 16.0
    pixels = np.zeros((size, *IMAGE_SHAPE), dtype=np.float32)
    shifts = rng.integers(0, np.array(MAX_SHIFT) + 1, size=(size, 2, 2))
    for i in range(size):
        for side, (index, start) in enumerate(((left[i], 0), (right[i], RIGHT_START))):
            dy, dx = shifts[i, side]
            window = pixels[i, 0, dy : dy + 8, start + dx : start + dx + 8]
            np.maximum(window, images[index], out=window)
    a, b = digits.target[left], digits.target[right]
    return {
        "pixel_values": pixels,
        "left": a.astype(np.int64),
        "right": b.astype(np.int64),
        "left_odd": (a % 2).astype(np.int64),
        "right_large": (b >= 5).astype(np.int64),
        "sum": ((a + b) / 18.0).astype(np.float32),
    }


@register_dataset("multidigits")
def multidigits_data(tasks: Sequence[str] | None = None, train_size: int | None = None,
                     eval_size: int | None = None, seed: int = 0, validation_size: int | None = None):
    """The recipe entry point: a :class:`~mtl_plugins.data.DataBundle` (train, validation and test
    splits, drawn from disjoint digit images)."""
    tasks = check_task_names(tasks)
    return DataBundle(
        tasks=tasks,
        train=load_multidigits("train", train_size, seed, tasks),
        eval=load_multidigits("test", eval_size, seed, tasks),
        task_specs={t: TASKS[t] for t in tasks},
        validation=load_multidigits("validation", validation_size, seed, tasks),
    )


def load_multidigits(split: str = "train", size: int | None = None, seed: int = 0, tasks: Sequence[str] | None = None):
    """MultiDigits as a ``datasets.Dataset`` in torch format with ``pixel_values`` and one column per task."""
    import datasets

    tasks = check_task_names(tasks)
    arrays = make_arrays(split, size, seed)
    columns = {"pixel_values": arrays["pixel_values"], **{t: arrays[t] for t in tasks}}
    features = datasets.Features(
        {
            "pixel_values": datasets.Array3D(shape=IMAGE_SHAPE, dtype="float32"),
            **{t: datasets.Value("int64" if TASKS[t].kind == "classification" else "float32") for t in tasks},
        }
    )
    dataset = datasets.Dataset.from_dict(columns, features=features, split=split)
    return dataset.with_format("torch")
