"""Dense dataset builders on generated fixtures in each release's layout, and their transforms."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from dense_fixtures import PART_CLASSES, write_cityscapes, write_nyud, write_pascal, write_taskonomy
from scipy import ndimage
from skimage.morphology import thin

from mtl_plugins.data import build_data
from mtl_plugins.data.dense.layout import DatasetLayoutError
from mtl_plugins.data.dense.morphology import label_edges, laplacian
from mtl_plugins.data.dense.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DenseTransforms,
    add_ignore_regions,
    photometric_distortion,
    random_crop,
    random_flip,
    random_scaling,
)

IGNORE = 255


def normalized(image: np.ndarray) -> np.ndarray:
    return ((image / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)


# ---------------------------------------------------------------- validation hold-out

@pytest.mark.parametrize("dataset, write, train_files", [
    ("nyud", write_nyud, lambda w: w["splits"]["train"]),
    ("pascal_context", write_pascal, lambda w: w["splits"]["train"]),
    ("cityscapes", write_cityscapes, lambda w: [str(i) for i in range(len(w["train"]))]),
])
def test_releases_without_a_validation_split_hold_one_out_of_train(tmp_path, dataset, write, train_files):
    written = write(tmp_path / dataset, n_train=10, n_val=1)
    expected = train_files(written)
    options = {"crop_size": [16, 16]} if dataset != "cityscapes" else {}

    def stems(split):
        return [Path(p).stem for p in split["pixel_values"]]

    data = build_data(dataset, root=str(tmp_path / dataset), **options)
    train, validation = stems(data.train.with_format(None)), stems(data.validation.with_format(None))
    assert len(validation) == 1 and len(train) == 9  # 10% held out
    assert sorted(train + validation) == sorted(expected) and not set(train) & set(validation)
    assert data.validation[0]["pixel_values"].shape[0] == 3  # decoded like the test split
    again = build_data(dataset, root=str(tmp_path / dataset), **options)
    assert stems(again.validation.with_format(None)) == validation  # fixed, not drawn per run
    half = build_data(dataset, root=str(tmp_path / dataset), validation_fraction=0.5, validation_size=2, **options)
    assert len(half.train) == 5 and len(half.validation) == 2
    whole = build_data(dataset, root=str(tmp_path / dataset), validation_fraction=0, **options)
    assert whole.validation is None and sorted(stems(whole.train.with_format(None))) == sorted(expected)
    with pytest.raises(ValueError, match="validation_fraction must be in"):
        build_data(dataset, root=str(tmp_path / dataset), validation_fraction=1.0, **options)
    with pytest.raises(ValueError, match="validation size=5 but the split has only 1"):
        build_data(dataset, root=str(tmp_path / dataset), validation_size=5, **options)


# ---------------------------------------------------------------- NYUD-v2

@pytest.fixture(scope="module")
def nyud(tmp_path_factory):
    root = tmp_path_factory.mktemp("NYUDv2")
    return root, write_nyud(root)


def test_nyud_eval_split_decodes_every_target(nyud):
    root, written = nyud
    data = build_data("nyud", root=str(root), crop_size=[24, 32])
    assert data.tasks == ["semseg", "depth", "normals", "edge"]
    assert len(data.train) == 2 and len(data.validation) == 1 and len(data.eval) == 2
    for index, sample_id in enumerate(written["splits"]["val"]):
        expected, got = written["samples"][sample_id], data.eval[index]
        np.testing.assert_allclose(got["pixel_values"].numpy(), normalized(expected["image"]), atol=1e-5)
        np.testing.assert_array_equal(got["semseg"].numpy(), expected["semseg"])
        depth = np.where(expected["depth"] == 0, IGNORE, expected["depth"])
        np.testing.assert_allclose(got["depth"][0].numpy(), depth, rtol=1e-6)
        np.testing.assert_allclose(got["normals"].numpy(), expected["normals"].transpose(2, 0, 1), atol=1e-6)
        np.testing.assert_array_equal(got["edge"][0].numpy(), expected["edge"])
    assert data.task_specs["semseg"].kind == "semantic_segmentation" and data.task_specs["semseg"].num_outputs == 40


def test_nyud_eval_pads_with_ignore_and_is_deterministic(nyud):
    root, written = nyud
    data = build_data("nyud", root=str(root), crop_size=[28, 36], tasks=["semseg", "depth", "normals"])
    a, b = data.eval[0:2], data.eval[0:2]
    for key in a:
        assert torch.equal(a[key], b[key])
    assert a["pixel_values"].shape == (2, 3, 28, 36)
    assert torch.all(a["pixel_values"][:, :, :2] == 0) and torch.all(a["pixel_values"][:, :, :, -2:] == 0)
    for task in ("semseg", "depth", "normals"):
        assert torch.all(a[task][..., :2, :] == IGNORE) and torch.all(a[task][..., -2:] == IGNORE), task
    expected = written["samples"][written["splits"]["val"][0]]["semseg"]
    np.testing.assert_array_equal(a["semseg"][0, 2:26, 2:34].numpy(), expected)


def test_nyud_train_split_is_augmented_reproducibly(nyud):
    root, _ = nyud
    data = build_data("nyud", root=str(root), crop_size=[16, 20], validation_fraction=0)
    assert data.validation is None
    torch.manual_seed(0)
    first = data.train[[0, 1, 2]]
    torch.manual_seed(0)
    again = data.train[[0, 1, 2]]
    torch.manual_seed(1)
    other = data.train[[0, 1, 2]]
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["pixel_values"], other["pixel_values"])
    assert first["pixel_values"].shape == (3, 3, 16, 20) and first["semseg"].shape == (3, 16, 20)
    labels = torch.unique(first["semseg"])
    assert torch.all((labels < 40) | (labels == IGNORE))
    normals = first["normals"]
    valid = (normals != IGNORE).all(dim=1)
    norms = normals.norm(dim=1)[valid]
    assert valid.any() and torch.allclose(norms, torch.ones_like(norms), atol=0.02)


def test_nyud_missing_data_names_the_expected_layout(tmp_path, nyud):
    with pytest.raises(DatasetLayoutError, match=r"(?s)data\.root=.*Expected layout:.*gt_sets/train.txt"):
        build_data("nyud")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        build_data("nyud", root=str(tmp_path / "nowhere"))
    root, _ = nyud
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"lacks the folder\(s\) \['gt_sets', 'segmentation'"):
        build_data("nyud", root=str(broken))
    with pytest.raises(ValueError, match="unknown NYUD-v2 tasks"):
        build_data("nyud", root=str(root), tasks=["semseg", "sal"])


# ---------------------------------------------------------------- PASCAL-Context

@pytest.fixture(scope="module")
def pascal(tmp_path_factory):
    root = tmp_path_factory.mktemp("PASCALContext")
    written = write_pascal(root)
    # a VOC12 segmentation, when present, is preferred to the pascal-context one
    voc_id = written["splits"]["val"][1]
    voc = np.full(written["samples"][voc_id]["semseg"].shape, 7, dtype=np.uint8)
    (root / "semseg" / "VOC12").mkdir(parents=True)
    from PIL import Image

    Image.fromarray(voc).save(root / "semseg" / "VOC12" / f"{voc_id}.png")
    written["samples"][voc_id]["semseg"] = voc.astype(np.int64)
    return root, written


def test_pascal_eval_targets(pascal):
    root, written = pascal
    data = build_data("pascal_context", root=str(root), crop_size=[32, 32])
    assert data.task_specs["sal"].metric == "miou" and data.task_specs["human_parts"].num_outputs == 7
    for index, sample_id in enumerate(written["splits"]["val"]):
        expected, got = written["samples"][sample_id], data.eval[index]
        h, w = expected["semseg"].shape
        top, left = (32 - h) // 2, (32 - w) // 2
        crop = (slice(top, top + h), slice(left, left + w))
        np.testing.assert_array_equal(got["semseg"][crop].numpy(), expected["semseg"])
        np.testing.assert_array_equal(got["sal"][crop].numpy(), expected["sal"])
        parts = expected["human_parts"]
        np.testing.assert_array_equal(got["human_parts"][crop].numpy(), IGNORE if parts is None else parts)
        normals = np.where(np.linalg.norm(expected["normals"], axis=2, keepdims=True) == 0, IGNORE, expected["normals"])
        np.testing.assert_allclose(got["normals"][(slice(None), *crop)].numpy(), normals.transpose(2, 0, 1), atol=1e-6)
        edges = got["edge"][0][crop].numpy()
        np.testing.assert_array_equal(edges, reference_edges(expected["labels"]))
        # edges lie on label boundaries, and every row crosses the vertical boundary at an edge pixel
        labels = expected["labels"].astype(int)
        boundary = np.zeros_like(labels, dtype=bool)
        boundary[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        boundary[:, :-1] |= labels[:, 1:] != labels[:, :-1]
        boundary[1:] |= labels[1:] != labels[:-1]
        boundary[:-1] |= labels[1:] != labels[:-1]
        assert np.all(boundary[edges == 1])
        assert np.all(edges[1:-1, w // 2 - 1 : w // 2 + 1].sum(axis=1) >= 1)  # (thinning may shorten line ends)
        assert torch.all(got["pixel_values"][:, :top] == 0)
    with_parts = [i for i in written["splits"]["train"] + written["splits"]["val"]
                  if written["samples"][i]["human_parts"] is not None]
    assert with_parts and set(np.unique(written["samples"][with_parts[0]]["human_parts"])) <= {0, *PART_CLASSES.values()}


def test_pascal_train_and_options(pascal):
    root, _ = pascal
    data = build_data("pascal_context", root=str(root), crop_size=[16, 16], tasks=["semseg", "human_parts"],
                      saliency_metric="maxf", train_size=2, eval_size=1)
    assert len(data.train) == 2 and len(data.eval) == 1
    # picklable as a whole (DataLoader workers started with spawn), and still decodes after the trip
    copy = pickle.loads(pickle.dumps(data.eval))
    assert torch.equal(copy[0]["semseg"], data.eval[0]["semseg"])
    batch = data.train[[0, 1]]
    assert batch["human_parts"].shape == (2, 16, 16) and batch["pixel_values"].shape == (2, 3, 16, 16)
    assert set(torch.unique(batch["human_parts"]).tolist()) <= {0, 1, 2, 3, 4, 5, 6, IGNORE}
    assert build_data("pascal_context", root=str(root), tasks=["sal"], saliency_metric="maxf").task_specs["sal"].metric == "maxf"
    with pytest.raises(ValueError, match="saliency_metric"):
        build_data("pascal_context", root=str(root), saliency_metric="f1")
    with pytest.raises(ValueError, match="train size=9"):
        build_data("pascal_context", root=str(root), train_size=9)


def test_pascal_missing_annotation_file_is_named(tmp_path):
    root = tmp_path / "pascal"
    written = write_pascal(root, n_train=2, n_val=1)
    (root / "human_parts" / f"{written['splits']['val'][0]}.mat").unlink()
    with pytest.raises(DatasetLayoutError, match=r"\.mat not found in .*human_parts"):
        build_data("pascal_context", root=str(root))


# ---------------------------------------------------------------- edges from label maps

def reference_edges(labels: np.ndarray) -> np.ndarray:
    """The release's edge target, from its description: pixels where the 4-neighbour Laplacian of the
    label map (mirrored borders, OpenCV's default) is non-zero, thinned to one-pixel-wide curves."""
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    boundary = ndimage.convolve(labels.astype(np.float64), kernel, mode="mirror") != 0
    return thin(boundary).astype(np.float32)


def test_label_edges_match_the_reference_on_random_label_maps():
    rng = np.random.default_rng(3)
    for _ in range(20):
        blocks = rng.integers(0, 4, tuple(rng.integers(2, 6, 2)))
        labels = np.kron(blocks, np.ones((5, 7), dtype=np.int64))  # regions with straight boundaries
        labels[rng.random(labels.shape) < 0.02] = 9  # and isolated pixels
        edges = label_edges(labels)
        assert edges.dtype == np.float32 and set(np.unique(edges)) <= {0.0, 1.0}
        np.testing.assert_array_equal(edges, reference_edges(labels))
    assert not label_edges(np.full((6, 8), 3)).any()  # one region: no edge

def test_laplacian_matches_scipy_mirror_convolution():
    labels = np.random.default_rng(0).integers(0, 4, (9, 13))
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    np.testing.assert_array_equal(laplacian(labels), ndimage.convolve(labels.astype(float), kernel, mode="mirror"))


def test_thinning_keeps_lines_and_thins_bars_to_one_pixel():
    line = np.zeros((12, 12), dtype=bool)
    line[np.arange(2, 10), np.arange(2, 10)] = True
    np.testing.assert_array_equal(thin(line), line)
    bar = np.zeros((11, 30), dtype=bool)
    bar[3:8, 2:28] = True
    thinned = thin(bar)
    assert thinned.sum() > 0 and np.all(bar[thinned])
    assert np.all(thinned[:, 6:24].sum(axis=0) == 1)
    assert ndimage.label(thinned, structure=np.ones((3, 3)))[1] == 1
    ring = np.zeros((15, 15), dtype=bool)
    ring[2:13, 2:13] = True
    ring[5:10, 5:10] = False
    thin_ring = thin(ring)
    assert ndimage.label(~thin_ring)[1] == 2  # the hole survives: topology kept


# ---------------------------------------------------------------- transforms

def sample_with_normals(rng):
    normals = rng.normal(size=(6, 8, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    return {"image": rng.uniform(0, 255, (6, 8, 3)).astype(np.float32), "normals": normals,
            "depth": rng.uniform(1, 5, (6, 8, 1)).astype(np.float32),
            "semseg": rng.integers(0, 5, (6, 8, 1)).astype(np.float32)}


KINDS = {"normals": "normals", "depth": "depth", "semseg": "semantic_segmentation"}


def test_flip_negates_the_normals_x_component():
    rng = np.random.default_rng(0)
    sample = sample_with_normals(rng)
    flipped = random_flip(sample, KINDS, rng, p=1.0)
    np.testing.assert_array_equal(flipped["image"], sample["image"][:, ::-1])
    np.testing.assert_array_equal(flipped["normals"][..., 0], -sample["normals"][:, ::-1, 0])
    np.testing.assert_array_equal(flipped["normals"][..., 1:], sample["normals"][:, ::-1, 1:])
    assert random_flip(sample, KINDS, rng, p=0.0) is sample


def test_scaling_divides_depth_by_the_scale_and_keeps_label_values():
    rng = np.random.default_rng(1)
    sample = sample_with_normals(rng)
    scaled = random_scaling(sample, KINDS, rng, scale_range=(2.0, 2.0))
    assert scaled["image"].shape == (12, 16, 3)
    np.testing.assert_allclose(scaled["depth"][::2, ::2], sample["depth"] / 2.0)
    np.testing.assert_array_equal(scaled["semseg"][::2, ::2], sample["semseg"])


def test_crop_redraws_while_one_class_dominates():
    seg = np.zeros((10, 40, 1), dtype=np.float32)
    seg[:, 30:] = (np.indices((10, 10)).sum(axis=0) % 2 + 1)[..., None]
    sample = {"image": np.zeros((10, 40, 3), np.float32), "semseg": seg}

    def dominated(crop):
        _, counts = np.unique(crop["semseg"], return_counts=True)
        return counts.max() / counts.sum() >= 0.75

    checked = [dominated(random_crop(sample, KINDS, (10, 10), np.random.default_rng(s))) for s in range(40)]
    unchecked = [dominated(random_crop(sample, KINDS, (10, 10), np.random.default_rng(s), cat_max_ratio=1.0)) for s in range(40)]
    assert sum(checked) <= 6 < 20 <= sum(unchecked)


def test_photometric_distortion_is_seeded_and_keeps_grey_grey():
    rng = np.random.default_rng(2)
    colour = rng.uniform(0, 255, (5, 6, 3)).astype(np.float32)
    a = photometric_distortion(colour, np.random.default_rng(7))
    assert np.array_equal(a, photometric_distortion(colour, np.random.default_rng(7)))
    assert a.dtype == np.float32 and a.min() >= 0 and a.max() <= 255
    assert any(not np.array_equal(photometric_distortion(colour, np.random.default_rng(s)), colour.astype(np.uint8))
               for s in range(5))
    grey = np.repeat(rng.uniform(0, 255, (5, 6, 1)), 3, axis=2).astype(np.float32)
    for seed in range(10):
        out = photometric_distortion(grey, np.random.default_rng(seed))
        assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 1] == out[..., 2])


def test_ignore_regions_and_deterministic_evaluation_transform():
    sample = {"image": np.zeros((4, 4, 3), np.float32), "human_parts": np.zeros((4, 4, 1), np.float32),
              "depth": np.ones((4, 4, 1), np.float32), "normals": np.ones((4, 4, 3), np.float32)}
    sample["depth"][0, 0] = 0
    sample["normals"][1, 1] = 0
    kinds = {"human_parts": "human_parts", "depth": "depth", "normals": "normals"}
    out = add_ignore_regions(sample, kinds)
    assert np.all(out["human_parts"] == IGNORE) and out["depth"][0, 0, 0] == IGNORE and out["depth"][1, 1, 0] == 1
    assert np.all(out["normals"][1, 1] == IGNORE) and np.all(out["normals"][0, 0] == 1)
    transform = DenseTransforms(kinds, (6, 6), train=False)
    a, b = transform(sample, np.random.default_rng(0)), transform(sample, np.random.default_rng(1))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["pixel_values"].shape == (3, 6, 6)


# ---------------------------------------------------------------- Taskonomy

@pytest.fixture(scope="module")
def taskonomy(tmp_path_factory):
    root = tmp_path_factory.mktemp("taskonomy")
    return root, write_taskonomy(root, points=2, size=32)


def test_taskonomy_partitions_and_decoded_values(taskonomy):
    root, written = taskonomy
    data = build_data("taskonomy", root=str(root), image_size=32)
    assert len(data.tasks) == 11 and data.task_specs["normal"].kind == "normals"
    assert data.task_specs["principal_curvature"].num_outputs == 2 and data.task_specs["principal_curvature"].metric == "mse"
    assert data.task_specs["reshading"].kind == "dense_regression"
    assert len(data.train) == 2 and len(data.validation) == 2  # allensville (train), beechwood (val); no woodbine
    assert data.validation[0]["pixel_values"].shape == (3, 32, 32)
    released = build_data("taskonomy", root=str(root), image_size=32, train_on_val_buildings=True)
    assert len(released.train) == 4 and released.validation is None  # the released code trains on val too
    assert len(data.eval) == 1  # the first tenth (at least one) of collierville's 2 images
    full = build_data("taskonomy", root=str(root), image_size=32, eval_fraction=1.0)
    assert len(full.eval) == 2
    rgb_paths = sorted(p for p in written["stored"] if "collierville" in p)
    for index, path in enumerate(rgb_paths):
        stored, got = written["stored"][path], full.eval[index]
        from PIL import Image

        rgb = np.asarray(Image.open(path), dtype=np.float64)
        np.testing.assert_allclose(got["pixel_values"].numpy(), (rgb / 127.5 - 1).transpose(2, 0, 1), atol=1e-5)
        np.testing.assert_allclose(got["depth_zbuffer"][0].numpy(), np.log1p(stored["depth_zbuffer"]) / math.log(65536),
                                   rtol=1e-5)
        kp = np.clip(stored["keypoints2d"].astype(float), 0, 0.005 * 65536) / (0.005 * 65536) * 2 - 1
        np.testing.assert_allclose(got["keypoints2d"][0].numpy(), kp, atol=1e-5)
        np.testing.assert_allclose(got["normal"].numpy(), (stored["normal"] / 127.5 - 1).transpose(2, 0, 1), atol=1e-5)
        curvature = (stored["principal_curvature"][..., :2] - [123.572, 120.1]) / [31.922, 21.658]
        np.testing.assert_allclose(got["principal_curvature"].numpy(), curvature.transpose(2, 0, 1), atol=1e-4)
        occlusion = ndimage.gaussian_filter(stored["edge_occlusion"] / (0.00625 * 65536) * 2 - 1, sigma=4)
        np.testing.assert_allclose(got["edge_occlusion"][0].numpy(), occlusion, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["segment_unsup2d"][0].numpy(), stored["segment_unsup2d"] / 127.5 - 1, atol=1e-5)


def test_taskonomy_training_flip_negates_normal_x(taskonomy):
    root, written = taskonomy
    data = build_data("taskonomy", root=str(root), image_size=32, tasks=["normal"])
    path = sorted(p for p in written["stored"] if "allensville" in p)[0]
    plain = (written["stored"][path]["normal"] / 127.5 - 1).transpose(2, 0, 1)
    flipped = plain[:, :, ::-1].copy()
    flipped[0] *= -1
    seen = set()
    for seed in range(8):
        torch.manual_seed(seed)
        got = data.train[0]["normal"].numpy()
        if np.allclose(got, plain, atol=1e-5):
            seen.add("plain")
        else:
            np.testing.assert_allclose(got, flipped, atol=1e-5)
            seen.add("flipped")
    assert seen == {"plain", "flipped"}


def test_taskonomy_missing_targets(tmp_path):
    root = tmp_path / "tk"
    written = write_taskonomy(root, points=2, size=8)
    victim = next(p for p in written["stored"] if "collierville" in p).replace("rgb", "normal")
    import os

    os.remove(victim)
    with pytest.raises(DatasetLayoutError, match="missing target"):
        build_data("taskonomy", root=str(root), tasks=["normal"])
    data = build_data("taskonomy", root=str(root), tasks=["normal"], skip_incomplete=True, eval_fraction=1.0)
    assert len(data.eval) == 1
    with pytest.raises(DatasetLayoutError, match="splits_taskonomy"):
        build_data("taskonomy", root=str(tmp_path))


# ---------------------------------------------------------------- Cityscapes

def test_cityscapes_arrays_and_ignore_values(tmp_path):
    written = write_cityscapes(tmp_path / "cs")
    data = build_data("cityscapes", root=str(tmp_path / "cs"), validation_fraction=0.0)
    assert data.task_specs["semseg"].num_outputs == 7 and data.task_specs["depth"].metric == "abs_err"
    for index, stored in enumerate(written["val"]):
        got = data.eval[index]
        np.testing.assert_array_equal(got["pixel_values"].numpy(), stored["image"].transpose(2, 0, 1))
        np.testing.assert_array_equal(got["semseg"].numpy(), np.where(stored["semseg"] < 0, IGNORE, stored["semseg"]))
        np.testing.assert_array_equal(got["depth"].numpy(),
                                      np.where(stored["depth"] == 0, IGNORE, stored["depth"]).transpose(2, 0, 1))
    torch.manual_seed(0)
    batch = data.train[[0, 1, 2]]
    assert batch["pixel_values"].shape == (3, 3, 16, 32) and batch["depth"].shape == (3, 1, 16, 32)
    valid = batch["depth"][batch["depth"] != IGNORE]
    assert valid.min() >= 1.0 / 1.5 - 1e-6 and valid.max() <= 80.0 + 1e-4


def test_cityscapes_layout_errors(tmp_path):
    write_cityscapes(tmp_path / "cs", n_train=2, n_val=2)
    (tmp_path / "cs" / "val" / "image" / "1.npy").rename(tmp_path / "cs" / "val" / "image" / "5.npy")
    with pytest.raises(DatasetLayoutError, match=r"0\.npy \.\. N-1\.npy"):
        build_data("cityscapes", root=str(tmp_path / "cs"))
    import shutil

    shutil.rmtree(tmp_path / "cs" / "train" / "label_7")
    with pytest.raises(DatasetLayoutError, match="train/label_7"):
        build_data("cityscapes", root=str(tmp_path / "cs"))
