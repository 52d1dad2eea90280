"""On-disk layouts of the public dense-prediction releases: checks with clear errors, and file readers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or does not have the layout of the public release."""


def dataset_root(root: str | Path | None, name: str, layout: str, where: str) -> Path:
    """``root`` as a Path, or an error saying where to put the ``name`` release and its layout."""
    if root is None or str(root) == "":
        raise DatasetLayoutError(
            f"{name}: no data folder given. {where} and pass its path as data.root=/path/to/it "
            f"(mtl-train <recipe> data.root=...). Expected layout:\n{layout}"
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetLayoutError(
            f"{name}: data folder {str(path)!r} does not exist. {where} and pass its path as data.root=... "
            f"Expected layout:\n{layout}"
        )
    return path


def require_dirs(root: Path, names: Sequence[str], dataset: str, layout: str) -> None:
    """Every folder in ``names`` (relative to ``root``) exists, or a layout error listing the missing ones."""
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise DatasetLayoutError(
            f"{dataset}: {str(root)!r} lacks the folder(s) {missing}. Expected layout:\n{layout}"
        )


def read_split(path: Path, dataset: str, layout: str) -> list[str]:
    """Sample ids of a split list (one id per line, blank lines skipped)."""
    if not path.is_file():
        raise DatasetLayoutError(f"{dataset}: split list {str(path)!r} not found. Expected layout:\n{layout}")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetLayoutError(f"{dataset}: split list {str(path)!r} is empty")
    return ids


def find_file(folder: Path, stem: str, suffixes: Sequence[str], dataset: str, layout: str) -> Path:
    """``folder/stem<suffix>`` for the first suffix that exists, or a layout error."""
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    expected = " or ".join(f"{stem}{s}" for s in suffixes)
    raise DatasetLayoutError(f"{dataset}: {expected} not found in {str(folder)!r}. Expected layout:\n{layout}")


def limit(ids: list[str], size: int | None, what: str) -> list[str]:
    """The first ``size`` ids (all when ``size`` is None)."""
    if size is None:
        return ids
    size = int(size)
    if size <= 0:
        raise ValueError(f"{what} must be positive, got {size}")
    if size > len(ids):
        raise ValueError(f"{what}={size} but the split has only {len(ids)} samples")
    return ids[:size]


#: Share of the training list held out as the validation split, when the release has no validation split.
VALIDATION_FRACTION = 0.1


def hold_out(ids: Sequence[str], part: str, fraction: float, seed: int = 0) -> list[str]:
    """``part`` of ``ids`` split into training and validation: ``"validation"`` is a seeded random
    ``fraction`` of them (at least one), ``"train"`` the rest, ``"all"`` every id; order is kept."""
    if part == "all":
        return list(ids)
    if part not in ("train", "validation"):
        raise ValueError(f"part must be 'all', 'train' or 'validation', got {part!r}")
    fraction = float(fraction)
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1) to hold out a validation split, got {fraction}")
    count = max(1, round(fraction * len(ids)))
    if count >= len(ids):
        raise ValueError(f"validation_fraction={fraction} of {len(ids)} training samples leaves none to train on")
    held = set(np.random.default_rng(seed).permutation(len(ids))[:count].tolist())
    return [i for n, i in enumerate(ids) if (n in held) == (part == "validation")]


def read_rgb(path: str | Path) -> np.ndarray:
    """An image as ``H x W x 3`` float32 in [0, 255]."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def read_png(path: str | Path) -> np.ndarray:
    """A PNG (or other image) as a float32 array with its stored values (``H x W`` or ``H x W x C``)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32)


def read_npy(path: str | Path) -> np.ndarray:
    """A ``.npy`` array as float32 (no pickled objects are loaded)."""
    return np.load(path, allow_pickle=False).astype(np.float32)


def read_mat(path: str | Path) -> dict:
    """A MATLAB ``.mat`` file (scipy)."""
    from scipy.io import loadmat

    return loadmat(str(path))


def channels_last(array: np.ndarray) -> np.ndarray:
    """``H x W`` -> ``H x W x 1``; ``H x W x C`` unchanged."""
    return array[..., None] if array.ndim == 2 else array
