import numpy as np
import pytest
from sklearn.datasets import load_digits

from mtl_plugins.data import build_data
from mtl_plugins.data.multidigits import IMAGE_SHAPE, MAX_SHIFT, RIGHT_START, _pools, load_multidigits, make_arrays


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = make_arrays("train", 50, seed=0), make_arrays("train", 50, seed=0), make_arrays("train", 50, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["pixel_values"], c["pixel_values"])


def test_splits_use_disjoint_digit_images():
    pools = _pools(seed=0)
    assert not set(pools["train"]) & set(pools["test"])
    assert not set(pools["train"]) & set(pools["validation"])
    assert sum(len(p) for p in pools.values()) == len(load_digits().target)


def test_labels_follow_from_the_two_digits():
    arrays = make_arrays("test", 200, seed=0)
    left, right = arrays["left"], arrays["right"]
    assert np.array_equal(arrays["left_odd"], left % 2)
    assert np.array_equal(arrays["right_large"], (right >= 5).astype(int))
    assert np.allclose(arrays["sum"] * 18, left + right)
    assert arrays["pixel_values"].shape == (200, *IMAGE_SHAPE)
    assert 0.0 <= arrays["pixel_values"].min() and arrays["pixel_values"].max() <= 1.0


def test_images_are_real_digits_of_the_labelled_class():
    digits = load_digits()
    arrays = make_arrays("train", 30, seed=0)
    images = digits.images / 16.0
    for i in range(30):
        # the columns left of RIGHT_START hold a real digit image with the left label, unoverlapped
        canvas = arrays["pixel_values"][i, 0]
        matches = set()
        for dy in range(MAX_SHIFT[0] + 1):
            for dx in range(MAX_SHIFT[1] + 1):
                width = min(8, RIGHT_START - dx)
                window = canvas[dy : dy + 8, dx : dx + width]
                exact = np.abs(images[:, :, :width] - window).max(axis=(1, 2)) < 1e-6
                matches |= set(digits.target[exact].tolist())
        assert arrays["left"][i] in matches


def test_dataset_columns_and_errors():
    ds = load_multidigits("validation", size=10, tasks=["left", "sum"])
    assert ds.column_names == ["pixel_values", "left", "sum"]
    assert tuple(ds[0]["pixel_values"].shape) == IMAGE_SHAPE
    with pytest.raises(ValueError, match="unknown MultiDigits tasks \\['up'\\]"):
        load_multidigits("train", 5, tasks=["up"])
    with pytest.raises(ValueError, match="unknown split"):
        load_multidigits("dev", 5)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_data("mnist")


def test_bundle_has_a_validation_split_of_its_own_digit_images():
    from mtl_plugins.data import build_data

    bundle = build_data("multidigits", tasks=["left"], train_size=50, eval_size=30, validation_size=20)
    assert (len(bundle.train), len(bundle.validation), len(bundle.eval)) == (50, 20, 30)
    validation = {x.numpy().tobytes() for x in bundle.validation["pixel_values"]}
    assert not validation & {x.numpy().tobytes() for x in bundle.eval["pixel_values"]}
