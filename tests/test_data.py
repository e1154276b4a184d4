import gzip
import pickle

import cv2
import numpy as np
import pytest

from relicv2_cli.data import load_dataset
from relicv2_cli.errors import RelicError


def test_cifar10_counts_labels_and_names(cifar_dir, cli):
    dataset = load_dataset(f"cifar10:{cifar_dir}")
    assert dataset.train.images.shape == (50000, 32, 32, 3) and dataset.train.images.dtype == np.uint8
    assert len(dataset.test) == 10000
    assert dataset.train.labels[:5].tolist() == [6, 9, 9, 4, 1]
    assert dataset.class_names[:3] == ["airplane", "automobile", "bird"] and dataset.num_classes == 10
    result = cli("data", "info", f"cifar10:{cifar_dir}")
    assert result.code == 0
    assert "50,000" in result.out and "10,000" in result.out and "truck" in result.out


def test_limits_change_the_fingerprint(cifar_dir):
    small = load_dataset(f"cifar10:{cifar_dir}", limit_train=100, limit_test=50)
    assert len(small.train) == 100 and len(small.test) == 50
    assert small.train.labels[:5].tolist() == [6, 9, 9, 4, 1]
    other = load_dataset(f"cifar10:{cifar_dir}", limit_train=101, limit_test=50)
    assert small.fingerprint != other.fingerprint
    assert small.fingerprint == load_dataset(f"cifar10:{cifar_dir}", limit_train=100, limit_test=50).fingerprint
    resized = load_dataset(f"cifar10:{cifar_dir}", limit_train=10, limit_test=10, image_size=48)
    assert resized.train.images.shape == (10, 48, 48, 3)


def test_fashion_mnist(fashion_dir):
    dataset = load_dataset(f"fashion-mnist:{fashion_dir}")
    assert dataset.train.images.shape == (60000, 28, 28, 3)
    assert len(dataset.test) == 10000 and dataset.num_classes == 10


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_on_small_files_and_truncation(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 8)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    dataset = load_dataset(f"fashion-mnist:{tmp_path}")
    assert dataset.train.images.shape == (20, 28, 28, 3) and len(dataset.test) == 8
    raw = gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz").read()
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(RelicError, match="t10k-images-idx3-ubyte.gz: truncated"):
        load_dataset(f"fashion-mnist:{tmp_path}")


def test_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), y_test=np.arange(6) % 3, class_names=np.array(["a", "b", "c"]))
    dataset = load_dataset(f"npz:{tmp_path / 'd.npz'}", limit_train=12)
    assert dataset.train.images.shape == (12, 8, 8, 3) and dataset.class_names == ["a", "b", "c"]
    np.savez(tmp_path / "bad.npz", x_train=np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(RelicError, match="missing keys y_train, x_test, y_test"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(RelicError, match="junk.npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")


def make_folder(root, with_splits, sizes=(12, 12)):
    rng = np.random.default_rng(0)
    splits = ("train", "test") if with_splits else ("",)
    for split in splits:
        for c in ("cat", "dog"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(5):
                cv2.imwrite(str(folder / f"{i}.png"), rng.integers(0, 255, (*sizes, 3), dtype=np.uint8))


def test_imagefolder_with_and_without_split_folders(tmp_path):
    make_folder(tmp_path / "a", with_splits=True)
    dataset = load_dataset(f"imagefolder:{tmp_path / 'a'}")
    assert dataset.class_names == ["cat", "dog"] and len(dataset.train) == 10 and len(dataset.test) == 10
    assert dataset.train.images.shape == (10, 12, 12, 3)
    make_folder(tmp_path / "b", with_splits=False)
    dataset = load_dataset(f"imagefolder:{tmp_path / 'b'}", image_size=16)
    assert len(dataset.train) == 8 and len(dataset.test) == 2  # every 5th image per class is held out
    assert dataset.test.images.shape == (2, 16, 16, 3)


def test_imagefolder_unreadable_image_named_or_skipped(tmp_path, cli):
    make_folder(tmp_path, with_splits=True)
    bad = tmp_path / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(RelicError, match="broken.png"):
        load_dataset(f"imagefolder:{tmp_path}").train.images
    dataset = load_dataset(f"imagefolder:{tmp_path}", skip_bad=True)
    assert len(dataset.train.images) == 10 and dataset.train.skipped == [str(bad)]
    result = cli("data", "info", f"imagefolder:{tmp_path}")
    assert result.code != 0 and "broken.png" in result.err and "Traceback" not in result.err
    assert cli("data", "info", f"imagefolder:{tmp_path}", "--skip-bad").code == 0


def test_cifar_corrupt_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}, f)
    assert len(load_dataset(f"cifar10:{tmp_path}").train) == 10
    (folder / "data_batch_3").write_bytes((folder / "data_batch_3").read_bytes()[:40])
    with pytest.raises(RelicError, match="data_batch_3"):
        load_dataset(f"cifar10:{tmp_path}")


def test_bad_specs_give_one_line_errors(cli, tmp_path):
    result = cli("data", "info", "mnist:/x")
    assert result.code != 0 and "valid kinds: synthetic, cifar10" in result.err and "Traceback" not in result.err
    result = cli("data", "info", f"cifar10:{tmp_path / 'missing'}")
    assert result.code != 0 and "does not exist" in result.err
    assert len(result.err.strip().splitlines()) == 1
    result = cli("data", "info", "cifar10")
    assert result.code != 0 and "needs a path" in result.err


def test_synthetic_spec_loads_with_masks_and_is_deterministic():
    a = load_dataset("synthetic", limit_train=200, limit_test=50)
    b = load_dataset("synthetic", limit_train=200, limit_test=50)
    assert a.train.images.shape == (200, 32, 32, 3) and a.train.masks.shape == (200, 32, 32)
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != load_dataset("synthetic", limit_train=200, limit_test=50, seed=1).fingerprint
    assert load_dataset("synthetic", limit_train=20, limit_test=5, image_size=64).train.images.shape[1] == 64
