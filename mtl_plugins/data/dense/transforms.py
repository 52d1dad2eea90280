"""Training and evaluation transforms of the released dense-prediction recipes.

A *sample* is a dict: ``"image"`` (``H x W x 3`` float32 in [0, 255]) and one ``H x W x C`` float32
array per task, with each task's head kind given in ``kinds``. Randomness comes from a
``numpy.random.Generator`` passed in, so runs are reproducible and DataLoader workers differ.

:class:`DenseTransforms` is the ATRC/InvPT pipeline of the ICLR 2025 code for NYUD-v2 and
PASCAL-Context. Training: random scaling (0.5-2, depth divided by the scale), random crop (re-drawn
up to 10 times while one class covers more than 75% of the crop), horizontal flip (normals' x
component negated), photometric distortion, ImageNet normalisation, padding to the crop size, ignore
regions. Evaluation: normalisation, padding, ignore regions only (no randomness).

Ignore regions (value 255 in the targets): padding of label maps; depth 0; normals of zero length;
human parts of an image without any human part annotation.
:func:`random_scale_crop` is the MTAN / Nash-MTL Cityscapes augmentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IGNORE = 255.0
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Kinds whose targets are class ids (``H x W`` int64 tensors).
LABEL_KINDS = ("semantic_segmentation", "human_parts", "saliency")
#: Padding value per kind (``image`` included); depth and normals pad with 0, turned into ignore later.
PAD_VALUE = {"image": 0.0, "depth": 0.0, "normals": 0.0}

Sample = dict[str, np.ndarray]


def resize(array: np.ndarray, size: tuple[int, int], mode: str, antialias: bool = False) -> np.ndarray:
    """``H x W x C`` array resized to ``size`` (``bilinear`` for images, ``nearest`` for targets)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1)[None]
    kwargs = {"align_corners": False, "antialias": antialias} if mode == "bilinear" else {}
    return F.interpolate(tensor, size=size, mode=mode, **kwargs)[0].permute(1, 2, 0).numpy()


def random_scaling(sample: Sample, kinds: Mapping[str, str], rng: np.random.Generator,
                   scale_range: tuple[float, float] = (0.5, 2.0)) -> Sample:
    """Scale everything by one factor drawn from ``scale_range``; depth values are divided by it."""
    scale = float(rng.uniform(*scale_range))
    if scale == 1.0:
        return sample
    height, width = sample["image"].shape[:2]
    size = (int(height * scale), int(width * scale))
    out = {}
    for key, value in sample.items():
        out[key] = resize(value, size, "bilinear" if key == "image" else "nearest")
        if kinds.get(key) == "depth":
            out[key] = out[key] / scale
    return out


def random_crop(sample: Sample, kinds: Mapping[str, str], size: tuple[int, int], rng: np.random.Generator,
                cat_max_ratio: float = 0.75, tries: int = 10) -> Sample:
    """Crop ``size`` (or less where the image is smaller) at a random place.

    With ``cat_max_ratio < 1`` and a semantic segmentation task, the place is re-drawn (up to ``tries``
    times) while a single class covers ``cat_max_ratio`` or more of the crop's labelled pixels."""
    height, width = sample["image"].shape[:2]
    if (height, width) == tuple(size):
        return sample

    def draw() -> tuple[int, int]:
        return int(rng.integers(0, max(height - size[0], 0) + 1)), int(rng.integers(0, max(width - size[1], 0) + 1))

    top, left = draw()
    seg_key = next((k for k, kind in kinds.items() if kind == "semantic_segmentation" and k in sample), None)
    if cat_max_ratio < 1.0 and seg_key is not None:
        for _ in range(tries):
            crop = sample[seg_key][top : top + size[0], left : left + size[1]]
            labels, counts = np.unique(crop, return_counts=True)
            counts = counts[labels != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return {k: v[top : top + size[0], left : left + size[1]] for k, v in sample.items()}


def random_flip(sample: Sample, kinds: Mapping[str, str], rng: np.random.Generator, p: float = 0.5) -> Sample:
    """Flip left-right with probability ``p``; the x component of normals changes sign."""
    if rng.random() >= p:
        return sample
    out = {k: np.ascontiguousarray(v[:, ::-1]) for k, v in sample.items()}
    for key, kind in kinds.items():
        if kind == "normals" and key in out:
            out[key][..., 0] *= -1.0
    return out


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: float = 32,
                           contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """Brightness, contrast (first or last), saturation and hue changes, each with probability 0.5.

    ``hue_delta`` is in OpenCV's 8-bit hue unit (2 degrees), as in the released recipe."""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    def convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(img.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    img = image.astype(np.uint8)
    if rng.random() < 0.5:
        img = convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.random() < 0.5
    if contrast_first and rng.random() < 0.5:
        img = convert(img, alpha=rng.uniform(*contrast_range))
    if rng.random() < 0.5:
        hsv = rgb_to_hsv(img / 255.0)
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(*saturation_range), 0.0, 1.0)
        img = np.round(hsv_to_rgb(hsv) * 255.0).astype(np.uint8)
    if rng.random() < 0.5:
        hsv = rgb_to_hsv(img / 255.0)
        hsv[..., 0] = (hsv[..., 0] + rng.integers(-hue_delta, hue_delta) / 180.0) % 1.0
        img = np.round(hsv_to_rgb(hsv) * 255.0).astype(np.uint8)
    if not contrast_first and rng.random() < 0.5:
        img = convert(img, alpha=rng.uniform(*contrast_range))
    return img.astype(np.float32)


def normalize(image: np.ndarray, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> np.ndarray:
    """[0, 255] -> [0, 1] -> standardised per channel."""
    return ((image / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).astype(np.float32)


def pad(sample: Sample, kinds: Mapping[str, str], size: tuple[int, int]) -> Sample:
    """Pad (centred) to at least ``size``: images, depth and normals with 0, other targets with 255."""
    height, width = sample["image"].shape[:2]
    dh, dw = max(size[0] - height, 0), max(size[1] - width, 0)
    if dh == 0 and dw == 0:
        return sample
    out = {}
    for key, value in sample.items():
        fill = PAD_VALUE.get("image" if key == "image" else kinds[key], IGNORE)
        padded = np.full((height + dh, width + dw, value.shape[2]), fill, dtype=np.float32)
        padded[dh // 2 : dh // 2 + height, dw // 2 : dw // 2 + width] = value
        out[key] = padded
    return out


def add_ignore_regions(sample: Sample, kinds: Mapping[str, str]) -> Sample:
    """Mark invalid targets with 255 (see the module docstring)."""
    out = dict(sample)
    for key, kind in kinds.items():
        if key not in out:
            continue
        value = out[key].copy()
        if kind == "normals":
            value[np.linalg.norm(value, axis=2) == 0] = IGNORE
        elif kind == "depth":
            value[value == 0] = IGNORE
        elif kind == "human_parts" and np.all((value == 0) | (value == IGNORE)):
            value[:] = IGNORE
        out[key] = value
    return out


def to_tensors(sample: Sample, kinds: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``pixel_values`` (``3 x H x W``) and per task: class ids ``H x W`` (int64) or ``C x H x W`` float."""
    out = {"pixel_values": torch.from_numpy(np.ascontiguousarray(sample["image"].transpose(2, 0, 1), dtype=np.float32))}
    for key, kind in kinds.items():
        value = sample[key]
        if kind in LABEL_KINDS:
            out[key] = torch.from_numpy(np.ascontiguousarray(value[..., 0])).round().long()
        else:
            out[key] = torch.from_numpy(np.ascontiguousarray(value.transpose(2, 0, 1), dtype=np.float32))
    return out


@dataclass
class DenseTransforms:
    """The released NYUD-v2 / PASCAL-Context pipeline (see the module docstring).

    ``size`` is the training crop and evaluation padding size (NYUD-v2 448 x 576, PASCAL 512 x 512)."""

    kinds: Mapping[str, str]
    size: tuple[int, int]
    train: bool = True
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_p: float = 0.5
    photometric: bool = True
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __call__(self, sample: Sample, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        size = tuple(int(s) for s in self.size)
        if self.train:
            sample = random_scaling(sample, self.kinds, rng, self.scale_range)
            sample = random_crop(sample, self.kinds, size, rng, self.cat_max_ratio)
            sample = random_flip(sample, self.kinds, rng, self.flip_p)
            if self.photometric:
                sample = {**sample, "image": photometric_distortion(sample["image"], rng)}
        sample = {**sample, "image": normalize(sample["image"], self.mean, self.std)}
        sample = pad(sample, self.kinds, size)
        sample = add_ignore_regions(sample, self.kinds)
        return to_tensors(sample, self.kinds)


def random_scale_crop(sample: Sample, kinds: Mapping[str, str], rng: np.random.Generator,
                      scales: tuple[float, ...] = (1.0, 1.2, 1.5)) -> Sample:
    """MTAN / Nash-MTL Cityscapes augmentation: crop ``1/s`` of the image (``s`` drawn from ``scales``)
    at a random place and resize it back; depth values are divided by ``s``."""
    height, width = sample["image"].shape[:2]
    scale = float(scales[int(rng.integers(0, len(scales)))])
    h, w = int(height / scale), int(width / scale)
    top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    out = {}
    for key, value in sample.items():
        crop = value[top : top + h, left : left + w]
        out[key] = resize(crop, (height, width), "bilinear" if key == "image" else "nearest")
        if kinds.get(key) == "depth":
            out[key] = out[key] / scale
    return out
