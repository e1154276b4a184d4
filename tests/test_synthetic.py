"""Tests for the embedded synthetic shapes dataset."""

import numpy as np
import pytest

from relicv2_cli.data.synthetic import CLASS_NAMES, PATTERN_NAMES, generate_synthetic

KEYS = ("x_train", "y_train", "m_train", "x_test", "y_test", "m_test")


@pytest.fixture(scope="module")
def data():
    """The default-size dataset, generated once for the statistical tests (~2-4 s)."""
    return generate_synthetic(n_train=5000, n_test=1000, image_size=32, seed=0)


def _radial_histogram(masks: np.ndarray, bins: int = 10) -> np.ndarray:
    """Rotation-, translation- and scale-invariant mask descriptor: distribution of the distance
    of foreground pixels from the mask centroid, in units of sqrt(area)."""
    m = masks.astype(np.float64)
    _, h, w = m.shape
    yy, xx = np.mgrid[:h, :w]
    area = m.sum(axis=(1, 2))
    cy = (m * yy).sum(axis=(1, 2)) / area
    cx = (m * xx).sum(axis=(1, 2)) / area
    r = np.hypot(yy - cy[:, None, None], xx - cx[:, None, None]) / np.sqrt(area)[:, None, None]
    b = np.minimum((r / 1.2 * bins).astype(int), bins - 1)
    return np.stack([((b == k) * m).sum(axis=(1, 2)) for k in range(bins)], axis=1) / area[:, None]


def test_class_names():
    assert len(CLASS_NAMES) == 10
    assert len(set(CLASS_NAMES)) == 10


def test_shapes_dtypes_and_ranges(data):
    assert set(data) == set(KEYS)
    for split, n in (("train", 5000), ("test", 1000)):
        x, y, m = data[f"x_{split}"], data[f"y_{split}"], data[f"m_{split}"]
        assert x.shape == (n, 32, 32, 3) and x.dtype == np.uint8
        assert y.shape == (n,) and y.dtype == np.int64
        assert m.shape == (n, 32, 32) and m.dtype == np.uint8
        assert y.min() >= 0 and y.max() < len(CLASS_NAMES)
        assert set(np.unique(m).tolist()) <= {0, 1}


def test_masks_nonempty_and_not_full(data):
    for split in ("train", "test"):
        area = data[f"m_{split}"].reshape(len(data[f"m_{split}"]), -1).mean(axis=1)
        assert area.min() > 0.02, "every image has a visible object"
        assert area.max() < 0.5, "no object fills the image"


@pytest.mark.parametrize("n", [5000, 1000, 23, 7])
def test_class_balance(data, n):
    y = data["y_train"] if n == 5000 else generate_synthetic(n_train=n, n_test=0)["y_train"]
    counts = np.bincount(y, minlength=len(CLASS_NAMES))
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1
    # Shuffled, not sorted by class.
    if n >= 23:
        assert np.any(np.diff(y) < 0)


def test_deterministic():
    a = generate_synthetic(n_train=40, n_test=20, seed=5)
    b = generate_synthetic(n_train=40, n_test=20, seed=5)
    c = generate_synthetic(n_train=40, n_test=20, seed=6)
    for k in KEYS:
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["x_train"], c["x_train"])
    assert not np.array_equal(a["m_train"], c["m_train"])
    # Train and test are different streams, not copies of each other.
    assert not np.array_equal(a["x_train"][:20], a["x_test"])


def test_splits_use_independent_streams():
    a = generate_synthetic(n_train=30, n_test=10, seed=1)
    b = generate_synthetic(n_train=30, n_test=25, seed=1)
    c = generate_synthetic(n_train=12, n_test=10, seed=1)
    for k in ("x_train", "y_train", "m_train"):
        assert np.array_equal(a[k], b[k]), "changing n_test must not change the train set"
    for k in ("x_test", "y_test", "m_test"):
        assert np.array_equal(a[k], c[k]), "changing n_train must not change the test set"


@pytest.mark.parametrize("size", [16, 256])
def test_other_image_sizes(size):
    d = generate_synthetic(n_train=10, n_test=3, image_size=size, seed=2)
    assert d["x_train"].shape == (10, size, size, 3)
    assert d["m_test"].shape == (3, size, size)
    area = d["m_train"].reshape(10, -1).mean(axis=1)
    assert area.min() > 0.02 and area.max() < 0.5


@pytest.mark.parametrize("kwargs", [
    {"image_size": 8}, {"image_size": 300}, {"n_train": -1}, {"seed": -3}, {"n_test": 2.5},
])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        generate_synthetic(**{"n_train": 4, "n_test": 4, **kwargs})


def test_no_colour_shortcut(data):
    """Colour is drawn independently of the class: per-class mean colours agree with the global
    mean to within 8 (whole image) and 15 (object pixels only) on the 0-255 scale. With 500
    images per class the sampling noise is about 2 and 4 respectively."""
    x, y, m = data["x_train"].astype(np.float64), data["y_train"], data["m_train"]
    global_img = x.mean(axis=(0, 1, 2))
    global_obj = (x * m[..., None]).sum(axis=(0, 1, 2)) / m.sum()
    for k in range(len(CLASS_NAMES)):
        sel = y == k
        img_mean = x[sel].mean(axis=(0, 1, 2))
        obj_mean = (x[sel] * m[sel][..., None]).sum(axis=(0, 1, 2)) / m[sel].sum()
        assert np.abs(img_mean - global_img).max() < 8, CLASS_NAMES[k]
        assert np.abs(obj_mean - global_obj).max() < 15, CLASS_NAMES[k]


def test_no_area_shortcut(data):
    """Object area is drawn independently of the class: each class's mean mask area is within
    10% of the global mean, and classifying by area alone stays near chance (< 20%)."""
    area = data["m_train"].reshape(5000, -1).mean(axis=1)
    y = data["y_train"]
    means = np.array([area[y == k].mean() for k in range(len(CLASS_NAMES))])
    assert np.abs(means / area.mean() - 1).max() < 0.10
    test_area = data["m_test"].reshape(1000, -1).mean(axis=1)
    pred = np.abs(test_area[:, None] - means[None, :]).argmin(axis=1)
    assert (pred == data["y_test"]).mean() < 0.20


def test_shape_defines_the_class(data):
    """A nearest-centroid classifier on a pose-invariant descriptor of the ground-truth masks is
    far above chance (10%): the classes are told apart by shape (observed ~0.9)."""
    f_train = _radial_histogram(data["m_train"])
    f_test = _radial_histogram(data["m_test"])
    y = data["y_train"]
    centroids = np.stack([f_train[y == k].mean(axis=0) for k in range(len(CLASS_NAMES))])
    pred = ((f_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    assert (pred == data["y_test"]).mean() > 0.6


def test_each_class_has_its_pattern(data):
    """Objects are painted in two colours (red, blue); the share of the less frequent colour among
    an object's pixels is ~0 for the plain class and 0.25-0.5 for the patterned ones (by geometry:
    dots cover 28% of their lattice, a rim 27% of a ring, halves and stripes 50%)."""
    x, y, m = data["x_train"].astype(np.float64), data["y_train"], data["m_train"].astype(bool)
    red = x[..., 0] > x[..., 2]
    share = (red & m).sum(axis=(1, 2)) / m.sum(axis=(1, 2))
    minority = np.minimum(share, 1 - share)
    for k, pattern in enumerate(PATTERN_NAMES):
        mean = minority[y == k].mean()
        if pattern == "solid":
            assert mean < 0.05, CLASS_NAMES[k]
        else:
            assert 0.15 < mean < 0.55, (CLASS_NAMES[k], pattern, mean)
