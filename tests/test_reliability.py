"""Hostile and careless input: every row of docs/reliability.md is one of these tests."""

import codecs
import errno
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from relicv2_cli import __version__, artifacts
from relicv2_cli.data import load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.errors import RelicError
from tests.test_eval_features import make_pretrain

TINY_EVAL = ("--width", "0.25", "--limit-train", "50", "--limit-test", "30", "--image-size", "16",
             "--device", "cpu", "--quiet")


class Marker:
    """Unpickling this creates the file `path` (as a real exploit would run any code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def one_line_error(result, *needles):
    assert result.code == 2, (result.code, result.err)
    assert len(result.err.strip().splitlines()) == 1, result.err
    for needle in needles:
        assert needle in result.err, result.err


def write_cifar(root: Path, batches: dict, *, kind="cifar10", protocol=2, names=(b"a", b"b")) -> Path:
    """A CIFAR python folder; `batches` maps file name -> dict (missing batches get 2 plain images)."""
    folder = root / ("cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    if kind == "cifar10":
        files, meta, labels_key, names_key = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], \
            "batches.meta", b"labels", b"label_names"
    else:
        files, meta, labels_key, names_key = ["train", "test"], "meta", b"fine_labels", b"fine_label_names"
    with open(folder / meta, "wb") as f:
        pickle.dump({names_key: list(names)}, f, protocol=protocol)
    for name in files:
        batch = batches.get(name, {b"data": np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072),
                                   labels_key: [0, 1]})
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    return root


# ------------------------------------------------------------------------------------------------
# 1, 8: pickles that run code


def test_cifar_pickle_with_code_is_refused_and_not_run(tmp_path, cli):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Marker(tmp_path / "proof")))  # the payload is live: plain pickle runs it
    assert (tmp_path / "proof").exists()
    root = write_cifar(tmp_path / "d", {"data_batch_1": {b"data": Marker(marker), b"labels": [0]}})
    result = cli("data", "info", f"cifar10:{root}")
    one_line_error(result, "refused CIFAR file ", "data_batch_1: it would call io.open (the official")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_arrays_load_under_the_restricted_unpickler(tmp_path, protocol):
    """numpy pickles arrays with _reconstruct (protocol 2, the official files) or _frombuffer (5)."""
    data = np.random.default_rng(0).integers(0, 255, (3, 3072), dtype=np.uint8)
    root = write_cifar(tmp_path, {"train": {b"data": data, b"fine_labels": [2, 0, 1]}}, kind="cifar100",
                       protocol=protocol, names=(b"x", b"y", b"z"))
    dataset = load_dataset(f"cifar100:{root}")
    assert dataset.class_names == ["x", "y", "z"] and dataset.train.labels.tolist() == [2, 0, 1]
    np.testing.assert_array_equal(dataset.train.images[1, :, :, 0], data[1, :1024].reshape(32, 32))


class Rot13:
    def __reduce__(self):
        return (codecs.encode, ("abc", "rot13"))  # pickled as _codecs.encode, as protocol 2 writes bytes


@pytest.mark.parametrize(("data", "message"), [
    (np.array([1, 2], dtype=object), "it holds an array of Python objects"),
    (np.array([Marker("pwned"), 1], dtype=object), "it holds an array of Python objects"),
    (Rot13(), "it would decode text with 'rot13'"),
])
def test_cifar_object_arrays_and_other_codecs_are_refused(tmp_path, monkeypatch, data, message):
    monkeypatch.chdir(tmp_path)
    root = write_cifar(tmp_path / "a", {"data_batch_2": {b"data": data, b"labels": [0, 1]}})
    with pytest.raises(RelicError, match=f"data_batch_2: {message} \\(the official python version"):
        load_dataset(f"cifar10:{root}")
    assert not (tmp_path / "pwned").exists()


def test_real_cifar10_loads_under_the_restricted_unpickler(cifar_dir):
    dataset = load_dataset(f"cifar10:{cifar_dir}")
    assert len(dataset.train) == 50000 and len(dataset.test) == 10000 and dataset.class_names[0] == "airplane"
    assert np.bincount(dataset.train.labels).tolist() == [5000] * 10


def test_torch_file_with_code_is_one_line_and_not_run(tmp_path, cli):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Marker(marker)}, evil)
    result = cli("eval", "features", f"torchvision:{evil}", "synthetic", *TINY_EVAL, "--workdir", tmp_path)
    one_line_error(result,
                   f"refused to load {evil}: it holds Python objects, not only tensors (it references "
                   "io.open)")
    assert "weights_only" not in result.err and not marker.exists()
    # The checkpoint reader shares the loader; a truncated file is one line too.
    (tmp_path / "cut.pt").write_bytes(evil.read_bytes()[:100])
    with pytest.raises(RelicError, match=r"^cannot read .*cut.pt as a torch file \(truncated or corrupt\): "
                                         r"PytorchStreamReader failed reading zip archive[^.\n]*$"):
        artifacts.load_torch_file(tmp_path / "cut.pt")


# ------------------------------------------------------------------------------------------------
# 3, 4: labels and images


def npz(tmp_path, name="d.npz", **overrides):
    arrays = dict(x_train=np.zeros((4, 8, 8, 3), np.uint8), y_train=np.array([0, 1, 2, 1]),
                  x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.array([0, 2]))
    arrays.update(overrides)
    np.savez(tmp_path / name, **arrays)
    return f"npz:{tmp_path / name}"


@pytest.mark.parametrize(("overrides", "message"), [
    (dict(y_train=np.array([0, 1, 2, 10**9])), r"y_train: label 1000000000 outside \[0, 100000\) "
                                                r"\(at most 100,000 classes without class_names\)"),
    (dict(y_train=np.array([0, 1, 2, 5]), class_names=np.array(["a", "b", "c"])),
     r"y_train: label 5 outside \[0, 3\) \(3 class_names\)"),
    (dict(y_train=np.zeros((4, 2), int)),
     r"y_train: labels must be 1-D \(one per image\), found shape \(4, 2\)"),
    (dict(y_test=np.array([0.0, 1.7])), "y_test: labels must be integers, found float64"),
    (dict(y_test=np.array([0, -1])), r"y_test: label -1 outside \[0, "),
    (dict(y_train=np.array([0, 1])), "y_train: 4 images but 2 labels"),
    (dict(x_train=np.zeros((4, 8, 8, 4), np.uint8)),
     r"x_train: images must be uint8 .*found uint8 \(4, 8, 8, 4\)"),
    (dict(x_test=np.zeros((2, 8, 8, 3), np.float32)), "x_test: images must be uint8"),
    (dict(x_test=np.zeros((0, 8, 8, 3), np.uint8), y_test=np.zeros(0, int)),
     r"x_test: no images \(shape \(0, 8, 8, 3\)\)"),
])
def test_npz_labels_and_images_are_validated(tmp_path, overrides, message):
    with pytest.raises(RelicError, match=message):
        load_dataset(npz(tmp_path, **overrides))


def test_npz_keras_style_column_labels_still_load(tmp_path):
    dataset = load_dataset(npz(tmp_path, y_train=np.array([[0], [1], [2], [1]])))
    assert dataset.train.labels.tolist() == [0, 1, 2, 1] and dataset.class_names == ["0", "1", "2"]


@pytest.mark.parametrize(("batch", "message"), [
    ({b"data": np.zeros((20, 3072), np.uint8), b"labels": [0] * 12}, "data_batch_4: 20 images but 12 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]},
     r"data_batch_4: label -1 outside \[0, 2\)"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.0, 1.5]},
     "data_batch_4: labels must be integers"),
    ({b"data": np.zeros((3, 4096), np.uint8), b"labels": [0, 1, 0, 1]},
     r"data_batch_4: data must be uint8 \(N, 3072\) \(32x32 RGB\), found uint8 \(3, 4096\)"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "data_batch_4: data must be uint8"),
])
def test_cifar_labels_and_images_are_validated(tmp_path, batch, message):
    root = write_cifar(tmp_path, {"data_batch_4": batch})
    with pytest.raises(RelicError, match=message):
        load_dataset(f"cifar10:{root}")


# ------------------------------------------------------------------------------------------------
# 5: payload hashes


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_backbone_is_refused_and_features_are_keyed_by_its_hash(tmp_path, cli):
    art = make_pretrain(tmp_path)
    backbone = art.path / "backbone.safetensors"
    enc = load_encoder(art.path)
    assert enc.key == f"pretrain:{artifacts.sha256_file(backbone)}"
    flip_byte(backbone)
    result = cli("eval", "features", art.path, "synthetic", *TINY_EVAL, "--workdir", tmp_path)
    one_line_error(result, "backbone.safetensors: sha256 differs from its manifest")
    assert not (tmp_path / "features").exists()
    flip_byte(backbone)  # restored: accepted again, with the same key
    assert load_encoder(art.path).key == enc.key


def test_payloads_are_hashed_once_per_process_and_rehashed_when_changed(tmp_path, monkeypatch):
    art = make_pretrain(tmp_path)
    calls = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda p: calls.append(p) or real(p))
    art.file("backbone.safetensors")
    art.file("backbone.safetensors")
    assert len(calls) <= 1  # 0 when an earlier call in this process hashed it already
    flip_byte(art.path / "backbone.safetensors")
    with pytest.raises(RelicError, match="sha256 differs"):
        art.file("backbone.safetensors")
    (art.path / "backbone.safetensors").write_bytes(b"short")
    with pytest.raises(RelicError, match=r"backbone.safetensors has 5 bytes, its manifest records \d+"):
        art.file("backbone.safetensors")


# ------------------------------------------------------------------------------------------------
# 7, 8, 9: full disk, failed starts


H5PY_ENOSPC = ("[Errno 28] Unable to synchronously create file (file write failed: time = Wed Dec  2 "
               "10:24:47 "
               "2026\n, filename = '{}', file descriptor = 3, errno = 28, error message = 'No space left on "
               "device', buf = 0x55fd0c38a3d8, total write size = 96, bytes this sub-write = 96, offset = 0)")


def test_full_disk_during_eval_is_one_line_and_leaves_no_partial(tmp_path, cli, monkeypatch):
    def full(self, name, **kwargs):  # h5py's own text for ENOSPC spans two lines
        raise OSError(errno.ENOSPC, H5PY_ENOSPC.format(self.file.filename))

    monkeypatch.setattr(h5py.Group, "create_dataset", full)
    result = cli("eval", "features", "random:resnet18", "synthetic", *TINY_EVAL, "--workdir", tmp_path)
    one_line_error(result, "no space left on device writing ", "features.h5")
    assert list((tmp_path / "features").iterdir()) == []


def test_atomic_write_on_a_full_disk_is_one_line_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")

    def write(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(RelicError,
                       match=f"^no space left on device writing {target}; free some space and rerun$"):
        artifacts.atomic_write(target, write)
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    artifacts.atomic_write(target, lambda f: torch.save({"w": torch.ones(2)}, f))
    assert torch.equal(artifacts.load_torch_file(target)["w"], torch.ones(2))


def test_resumable_staging_is_kept_only_once_it_holds_a_checkpoint(tmp_path):
    def run(fail_after_checkpoint: bool, **kwargs):
        with pytest.raises(ZeroDivisionError):
            with artifacts.Staging(tmp_path, "pretrain", "p", resumable=True, checkpoint="checkpoint.pt",
                                   **kwargs) as staging:
                (staging.dir / "metrics.jsonl").write_text("{}\n")
                if fail_after_checkpoint:
                    (staging.dir / "checkpoint.pt").write_bytes(b"x")
                1 / 0
        return tmp_path / "pretrain" / ".p.partial"

    assert not run(False).exists()  # failed before its first checkpoint: nothing to resume
    partial = run(True)
    assert (partial / "checkpoint.pt").exists()
    with pytest.raises(RelicError, match="an interrupted run left"):
        artifacts.Staging(tmp_path, "pretrain", "p", resumable=True, checkpoint="checkpoint.pt")
    (partial / "checkpoint.pt").unlink()  # a leftover from before this rule: replaced without --force
    staging = artifacts.Staging(tmp_path, "pretrain", "p", resumable=True, checkpoint="checkpoint.pt")
    assert list(staging.dir.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# 11: truncated images


def test_truncated_jpeg_is_named_or_skipped_and_counted(tmp_path, cli):
    rng = np.random.default_rng(0)
    for c, n in (("cat", 3), ("dog", 2)):
        for split in ("train", "test"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(tmp_path / split / c / f"{i}.jpg"), rng.integers(0, 255, (16, 16, 3),
                                                                                 dtype=np.uint8))
    bad = tmp_path / "train" / "cat" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:-200])
    result = cli("data", "info", f"imagefolder:{tmp_path}")
    one_line_error(result, f"truncated image {bad} (use --skip-bad")
    result = cli("data", "info", f"imagefolder:{tmp_path}", "--skip-bad")
    assert result.code == 0, result.err
    assert re.search(r"train images +│ 4  \(per class: 2, 2\)", result.out), result.out
    assert re.search(r"test images +│ 5  \(per class: 3, 2\)", result.out), result.out
    assert f"1 unreadable or truncated, first {bad}" in result.out
    # Data appended after the end-of-image marker (camera trailers) is not truncation.
    bad.unlink()
    trailer = tmp_path / "train" / "dog" / "0.jpg"
    trailer.write_bytes(trailer.read_bytes() + b"TRAILER\xff\xd8 appended by a camera")
    result = cli("data", "info", f"imagefolder:{tmp_path}")
    assert result.code == 0, result.err
    assert re.search(r"train images +│ 4  \(per class: 2, 2\)", result.out), result.out


# ------------------------------------------------------------------------------------------------
# 12: --version


def test_version_is_printed_without_importing_torch(cli):
    result = cli("--version")
    assert result.code == 0 and result.out == f"{__version__}\n"
    code = ("import sys; sys.argv = ['relicv2', '--version']; from relicv2_cli.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch "
            "imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0 and out.stdout == f"{__version__}\n", out.stderr
