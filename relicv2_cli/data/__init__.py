"""Datasets: one loader interface for every SPEC kind.

A SPEC names a dataset: `synthetic`, `cifar10:DIR`, `cifar100:DIR`, `fashion-mnist:DIR`,
`imagefolder:DIR`, `images:DIR` (unlabelled), `npz:FILE`, `prepared:DIR` (a `dataset` artifact of
`relicv2 data prepare`). Every loader returns a `Dataset` with train and test splits of uint8 RGB
images (N, H, W, 3), int64 labels, class names and a fingerprint that changes when the content (or
the limits applied to it) changes. Splits of files (imagefolder, prepared) decode on first use and
give each image's encoded bytes without decoding (`Split.encoded`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from relicv2_cli.errors import BadImage, RelicError

SPEC_KINDS = ("synthetic", "cifar10", "cifar100", "fashion-mnist", "imagefolder", "images", "npz", "prepared")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
ORIENTATION = 0x0112  # the EXIF tag


@dataclass
class Split:
    """One split. Images may be decoded lazily (imagefolder, prepared): they load on first access."""

    labels: np.ndarray
    _images: np.ndarray | None = None
    _decode: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None
    masks: np.ndarray | None = None  # ground-truth foreground masks (N, H, W) uint8, synthetic only
    files: list[str] | None = None  # source file per image (imagefolder), for mask import by name
    skipped: list[str] = field(default_factory=list)  # files --skip-bad left out (folders)
    checked: bool = False  # --skip-bad checked every file's header before the split was used (folders)
    _fingerprint: str | None = None
    sizes: np.ndarray | None = None  # (N, 2) height, width of each stored image (prepared), no decoding
    _read: Callable[[int], bytes] | None = None  # encoded bytes of image i (prepared)
    decode_settings: str = ""  # what decoding changes besides the bytes (--image-size), in the fingerprint
    _stored: str | None = None  # the stored images' fingerprint (stored_fingerprint), once computed

    @property
    def images(self) -> np.ndarray:
        if self._images is None:
            assert self._decode is not None
            self._images, keep = self._decode()
            if len(keep) != len(self.labels):
                self.labels = self.labels[keep]
                if self.files is not None:
                    kept = set(keep.tolist())
                    self.skipped = self.skipped + [f for i, f in enumerate(self.files) if i not in kept]
                    self.files = [self.files[i] for i in keep]
                self._fingerprint = self._stored = None  # --skip-bad dropped files: hash the ones kept
        return self._images

    def __len__(self) -> int:
        return len(self.labels)  # before a lazy decode: the listed count; --skip-bad may lower it

    def encoded(self, i: int) -> bytes:
        """The stored (encoded) bytes of image i, without decoding: a prepared set's JPEG, or an
        image file's content."""
        if self._read is not None:
            return self._read(i)
        if self.files is not None:
            try:
                return Path(self.files[i]).read_bytes()
            except OSError as e:
                raise RelicError(f"cannot read image {self.files[i]}: {e.strerror}") from None
        raise RelicError("this split holds decoded images only (no encoded bytes)")

    @property
    def fingerprint(self) -> str:
        """sha256 of the content. A split of files (an image folder; a prepared set stores its own)
        hashes its encoded bytes, labels and decode settings, so it has one fingerprint whether it is
        streamed or decoded in memory, and computing it decodes nothing; arrays hash their pixels."""
        if self._fingerprint is None and (self.files is not None or self._read is not None):
            stored = stored_fingerprint(self)
            self._fingerprint = hashlib.sha256(f"{stored} {self.decode_settings}".encode()).hexdigest() \
                if self.decode_settings else stored
        if self._fingerprint is None:
            images = self.images
            digest = hashlib.sha256()
            digest.update(str(images.shape).encode())
            digest.update(np.ascontiguousarray(images).data)
            digest.update(np.ascontiguousarray(self.labels.astype(np.int64)).data)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint


@dataclass
class Dataset:
    spec: str
    train: Split
    test: Split
    class_names: list[str]
    val: Split | None = None  # only when the source has its own validation split
    options: dict = field(default_factory=dict)  # limits and resize applied, for the manifest
    labelled: bool = True  # False: a folder of unlabelled images, every label 0 ("unlabelled")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> Split:
        if name == "val" and self.val is None:
            raise RelicError(f"{self.spec} has no validation split")
        if name not in ("train", "test", "val"):
            raise RelicError(f"unknown split {name!r}; expected train, test or val")
        return getattr(self, name)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for split in (self.train, self.val, self.test):
            digest.update((split.fingerprint if split is not None else "-").encode())
        digest.update("\n".join(self.class_names).encode())
        return digest.hexdigest()

    def record(self) -> dict:
        """What a manifest stores about the data it was made from (with --skip-bad, the files skipped)."""
        splits = [(name, split) for name, split in (("train", self.train), ("val", self.val), ("test", self.test))
                  if split is not None]
        return {
            "spec": self.spec,
            "fingerprint": self.fingerprint,
            "train_count": len(self.train),
            "test_count": len(self.test),
            "split_fingerprints": {name: split.fingerprint for name, split in splits},
            **self.options,
            **({"skipped": {name: split.skipped for name, split in splits if split.skipped}}
               if any(split.skipped for _, split in splits) else {}),
        }


def load_dataset(
    spec: str,
    *,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
    skip_bad: bool = False,
    seed: int = 0,
) -> Dataset:
    """Parse SPEC and load it. `seed` is the synthetic dataset's generator seed, and draws the
    class-balanced --limit-train/--limit-test subsets of imagefolder and prepared sets."""
    kind, _, arg = spec.partition(":")
    if kind not in SPEC_KINDS:
        raise RelicError(f"unknown dataset spec {spec!r}; valid kinds: {', '.join(SPEC_KINDS)} (e.g. cifar10:DIR)")
    if kind != "synthetic" and not arg:
        raise RelicError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
    for flag, value in (("--limit-train", limit_train), ("--limit-test", limit_test), ("--image-size", image_size)):
        if value is not None and value <= 0:
            raise RelicError(f"{flag} must be positive, got {value}")
    if kind != "synthetic":
        path = Path(arg).expanduser()
        if not path.exists():
            raise RelicError(f"{spec}: {path} does not exist")

    if kind == "synthetic":
        dataset = _load_synthetic(spec, limit_train, limit_test, image_size or 32, seed)
    elif kind in ("cifar10", "cifar100"):
        dataset = _load_cifar(spec, path, kind)
    elif kind == "fashion-mnist":
        dataset = _load_fashion_mnist(spec, path)
    elif kind == "npz":
        dataset = _load_npz(spec, path)
    elif kind == "prepared":
        from relicv2_cli.data.prepared import load_prepared

        dataset = load_prepared(spec, path, image_size, limit_train, limit_test, seed)
    else:
        dataset = _load_imagefolder(spec, path, image_size, skip_bad, limit_train, limit_test, seed,
                                    unlabelled=kind == "images")

    if kind not in ("synthetic", "imagefolder", "images", "prepared"):
        for name, limit in (("train", limit_train), ("test", limit_test)):
            if limit is not None:
                setattr(dataset, name, _limit(dataset.split(name), limit))
        if image_size is not None:
            for split in (dataset.train, dataset.val, dataset.test):
                if split is not None:
                    split._images = resize_images(split.images, image_size)
    dataset.options = {"limit_train": limit_train, "limit_test": limit_test, "image_size": image_size}
    if kind == "synthetic" or (kind in ("imagefolder", "images", "prepared") and (limit_train or limit_test)):
        dataset.options["seed"] = seed  # it draws the limited subsets
    if len(dataset.train) == 0 or len(dataset.test) == 0:
        raise RelicError(f"{spec}: a split is empty (train {len(dataset.train)}, test {len(dataset.test)})")
    return dataset


def _limit(split: Split, limit: int) -> Split:
    n = min(limit, len(split.labels))
    return Split(
        labels=split.labels[:n],
        _images=split.images[:n],
        masks=None if split.masks is None else split.masks[:n],
        files=None if split.files is None else split.files[:n],
    )


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, H, W, C) uint8 images to size x size (area when shrinking, bilinear when growing)."""
    if images.shape[1] == size and images.shape[2] == size:
        return images
    interp = cv2.INTER_AREA if images.shape[1] > size else cv2.INTER_LINEAR
    out = np.empty((len(images), size, size, images.shape[3]), np.uint8)
    for i, image in enumerate(images):
        resized = cv2.resize(image, (size, size), interpolation=interp)
        out[i] = resized.reshape(size, size, -1)
    return out


def _as_rgb(images: np.ndarray) -> np.ndarray:
    """Grey (N, H, W) or (N, H, W, 1) becomes 3 equal channels, so every model sees RGB."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


def _load_synthetic(spec, limit_train, limit_test, image_size, seed) -> Dataset:
    from relicv2_cli.data.synthetic import CLASS_NAMES, generate_synthetic

    n_train = 5000 if limit_train is None else limit_train
    n_test = 1000 if limit_test is None else limit_test
    arrays = generate_synthetic(n_train=n_train, n_test=n_test, image_size=image_size, seed=seed)
    return Dataset(
        spec=spec,
        train=Split(labels=arrays["y_train"], _images=arrays["x_train"], masks=arrays["m_train"]),
        test=Split(labels=arrays["y_test"], _images=arrays["x_test"], masks=arrays["m_test"]),
        class_names=list(CLASS_NAMES),
    )


def _plain_dtype(*args) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("holds an array of Python objects")
    return dtype


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at protocol 2 as _codecs.encode(text, "latin1"); no other codec.
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"would decode text with {encoding!r}")
    return text.encode("latin1")


# Everything a CIFAR python file may reference: numpy arrays as numpy pickles them (protocol 2:
# _reconstruct + ndarray + dtype; protocol 5: _frombuffer), under both numpy 1 and 2 module names.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, str, numbers and numpy arrays only: a pickle can name any
    callable and have it run on load, so every other global is refused."""

    def find_class(self, module: str, name: str):
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"would call {module}.{name}") from None


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise RelicError(f"missing CIFAR file {path}")
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise RelicError(f"refused CIFAR file {path}: it {e} (the official python version holds only "
                         "arrays, lists, strings and numbers)") from None
    except (EOFError, ValueError, TypeError, OSError, IndexError, KeyError, AttributeError, MemoryError) as e:
        raise RelicError(f"corrupt or truncated CIFAR file {path}: {e}") from None
    if not isinstance(batch, dict):
        raise RelicError(f"corrupt CIFAR file {path}: holds a {type(batch).__name__}, not a dict")
    return batch


def _load_cifar(spec: str, path: Path, kind: str) -> Dataset:
    folder_name = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
    folder = path / folder_name if (path / folder_name).is_dir() else path
    if kind == "cifar10":
        train_files, test_files, meta_file = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta"
        label_key, names_key = b"labels", b"label_names"
    else:
        train_files, test_files, meta_file = ["train"], ["test"], "meta"
        label_key, names_key = b"fine_labels", b"fine_label_names"
    if not (folder / meta_file).exists():
        raise RelicError(f"{spec}: no {folder_name}/{meta_file} under {path} (expected the official python version)")
    meta = _unpickle(folder / meta_file)
    names = meta.get(names_key)
    if not isinstance(names, list) or not names or not all(isinstance(n, bytes) for n in names):
        raise RelicError(f"corrupt CIFAR file {folder / meta_file}: {names_key.decode()} is not a list of names")
    names = [n.decode(errors="replace") for n in names]

    def read(files: list[str]) -> Split:
        images, labels = [], []
        for name in files:
            source = folder / name
            batch = _unpickle(source)
            if b"data" not in batch or label_key not in batch:
                raise RelicError(f"corrupt CIFAR file {source}: no {label_key.decode()!r} or 'data' entry")
            data = batch[b"data"]
            if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                    and data.shape[1] == 3 * 32 * 32):
                found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise RelicError(f"corrupt CIFAR file {source}: data must be uint8 (N, 3072) (32x32 RGB), "
                                 f"found {found}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(check_labels(batch[label_key], len(data), len(names), f"{len(names)} label names",
                                       str(source)))
        return Split(labels=np.concatenate(labels), _images=np.ascontiguousarray(np.concatenate(images)))

    return Dataset(spec=spec, train=read(train_files), test=read(test_files), class_names=names)


MAX_CLASSES = 100_000  # bounds the class count of sources without class names (npz)


def check_labels(labels, count: int, num_classes: int, classes: str, source: str) -> np.ndarray:
    """Labels as int64 (N,), or a RelicError naming `source`: 1-D (or (N, 1)) integers in
    [0, num_classes), one per image. `classes` says where num_classes comes from, for the message."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise RelicError(f"{source}: labels must be 1-D (one per image), found shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise RelicError(f"{source}: labels must be integers, found {labels.dtype}")
    if len(labels) != count:
        raise RelicError(f"{source}: {count} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise RelicError(f"{source}: label {bad} outside [0, {num_classes}) ({classes})")
    return labels.astype(np.int64)


def check_images(images: np.ndarray, source: str) -> np.ndarray:
    """uint8 (N, H, W) or (N, H, W, 1|3) with N, H, W > 0, returned as RGB (N, H, W, 3)."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise RelicError(f"{source}: images must be uint8 (N, H, W) grey or (N, H, W, 1|3), "
                         f"found {images.dtype} {images.shape}")
    if 0 in images.shape:
        raise RelicError(f"{source}: no images (shape {images.shape})")
    return _as_rgb(images)


FASHION_MNIST_CLASSES = [
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
]


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip (or plain) IDX file: magic (0, 0, type 0x08, ndim), big-endian dims, uint8 data."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise RelicError(f"corrupt or truncated IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise RelicError(f"{path}: not a uint8 IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    expected = 4 + 4 * ndim + int(np.prod(dims))
    if len(raw) != expected:
        raise RelicError(f"{path}: truncated IDX file ({len(raw)} bytes, expected {expected})")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).exists():
            return folder / name
    raise RelicError(f"missing Fashion-MNIST file {folder / (stem + '.gz')}")


def _load_fashion_mnist(spec: str, path: Path) -> Dataset:
    def read(prefix: str) -> Split:
        images_file = _find_idx(path, f"{prefix}-images-idx3-ubyte")
        labels_file = _find_idx(path, f"{prefix}-labels-idx1-ubyte")
        images = check_images(_read_idx(images_file), str(images_file))
        labels = check_labels(_read_idx(labels_file), len(images), len(FASHION_MNIST_CLASSES),
                              "Fashion-MNIST's 10 classes", str(labels_file))
        return Split(labels=labels, _images=images)

    return Dataset(spec=spec, train=read("train"), test=read("t10k"), class_names=list(FASHION_MNIST_CLASSES))


def _load_npz(spec: str, path: Path) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
        arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise RelicError(f"corrupt or unreadable npz file {path}: {e}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise RelicError(f"{path}: missing keys {', '.join(missing)} (needs x_train, y_train, x_test, y_test)")

    names = [str(n) for n in arrays["class_names"]] if "class_names" in arrays else None
    bound = (len(names), f"{len(names)} class_names") if names is not None else \
        (MAX_CLASSES, f"at most {MAX_CLASSES:,} classes without class_names")

    def split(name: str) -> Split:
        x, y = arrays[f"x_{name}"], arrays[f"y_{name}"]
        images = check_images(x, f"{path} x_{name}")
        return Split(labels=check_labels(y, len(x), *bound, f"{path} y_{name}"), _images=images)

    train, test = split("train"), split("test")
    if names is None:
        names = [str(i) for i in range(int(max(train.labels.max(), test.labels.max())) + 1)]
    return Dataset(spec=spec, train=train, test=test, class_names=names)


SPLIT_FOLDERS = ("train", "val", "test")


def _load_imagefolder(spec, path, image_size, skip_bad, limit_train, limit_test, seed,
                      unlabelled: bool = False) -> Dataset:
    """Split folders `train/` with `val/` and/or `test/` when present (without `test/`, `val/` is the
    test split), else every 5th image of each class is the test split. Each split holds one
    sub-folder per class, or only images (a flat unlabelled folder); `unlabelled` (the `images:`
    kind) reads every image below each split as unlabelled, whatever its sub-folders."""
    if not path.is_dir():
        raise RelicError(f"{spec}: {path} is not a directory")
    present = [name for name in SPLIT_FOLDERS if (path / name).is_dir()]
    if present and "train" not in present:
        raise RelicError(f"{spec}: {path} has {'/, '.join(present)}/ but no train/ split folder")
    if present == ["train"]:
        roots = {"all": path / "train"}
    elif present:
        roots = {"train": path / "train", "test": path / ("test" if "test" in present else "val")}
        if "test" in present and "val" in present:
            roots["val"] = path / "val"
    else:
        roots = {"all": path}

    first = next(iter(roots.values()))
    class_names = [] if unlabelled else _class_folders(spec, first)
    labelled = bool(class_names)
    if not labelled:
        class_names = ["unlabelled"]
    lists = {name: _listing(spec, root, class_names if labelled else None) for name, root in roots.items()}
    if "all" in lists:
        # Deterministic hold-out, the same whatever --seed: every 5th image of each class goes to test.
        files, labels = lists.pop("all")
        rank = np.zeros(len(labels), int)
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            rank[idx] = np.arange(len(idx))
        is_test = rank % 5 == 4
        lists["train"] = ([f for f, t in zip(files, is_test, strict=True) if not t], labels[~is_test])
        lists["test"] = ([f for f, t in zip(files, is_test, strict=True) if t], labels[is_test])
    for name, limit in (("train", limit_train), ("test", limit_test)):
        if limit is not None:
            files, labels = lists[name]
            keep = limited(labels, limit, seed)
            lists[name] = ([files[i] for i in keep], labels[keep])
    # After the limits: the images kept are those of the run without --skip-bad, less the bad ones.
    skipped = {name: [] for name in lists}
    if skip_bad:  # before anything reads the split: a streamed one is never decoded as a whole
        for name, (files, labels) in lists.items():
            good = np.array([header_readable(f) for f in files], bool)
            skipped[name] = [f for f, ok in zip(files, good, strict=True) if not ok]
            lists[name] = ([f for f, ok in zip(files, good, strict=True) if ok], labels[good])

    def lazy(name: str) -> Split:
        files, labels = lists[name]
        return Split(labels=labels, files=files, skipped=skipped[name], checked=skip_bad,
                     decode_settings=decode_key(image_size),
                     _decode=lambda: decode_images(files, _file_bytes(files), image_size, skip_bad))

    return Dataset(
        spec=spec,
        train=lazy("train"),
        test=lazy("test"),
        val=lazy("val") if "val" in lists else None,
        class_names=class_names,
        labelled=labelled,
    )


def truncated_jpeg(data: bytes) -> bool:
    """libjpeg decodes a truncated JPEG partly, with only a warning on stderr, so a JPEG's last scan
    (SOS marker) must be followed by an end-of-image marker. Compressed data cannot hold FF D9 (FF is
    stuffed), so this also admits EXIF thumbnails before the image and data appended after its end
    (camera trailers), which a plain "ends with FF D9" test would refuse."""
    return data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda")


def header_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of the decoded image from its header alone (PIL reads no pixels here), EXIF
    orientation applied as cv2.imdecode applies it; one-line errors (BadImage) naming `name`."""
    if truncated_jpeg(data):
        raise BadImage(f"truncated image {name} (no end-of-image marker after its last scan)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            # PIL decodes a whole PNG to look for an eXIf chunk after its pixels; writers put it before
            exif = image.getexif() if image.format != "PNG" or "exif" in image.info else {}
            turned = exif.get(ORIENTATION, 1) in (5, 6, 7, 8)
    except UnidentifiedImageError:  # its message names the BytesIO object, not the file
        raise BadImage(f"unreadable image {name}: not an image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"unreadable image {name}: {e}") from None
    return (height, width) if turned else (width, height)


def header_readable(file: str) -> bool:
    """--skip-bad's check of a listed file, without decoding pixels: it reads, is no truncated JPEG
    and its header gives a size."""
    try:
        header_size(Path(file).read_bytes(), file)
    except (OSError, BadImage):
        return False
    return True


def streamed_error(error: RelicError, split: Split) -> str:
    """The message of an error met reading a streamed split, saying what to do when it is a bad file
    of a folder: --skip-bad, which checks every file's header first; when it did, the file's pixels do
    not decode, which only a full decode finds. A prepared set's images decoded when it was written."""
    if not isinstance(error, BadImage) or split.files is None:
        return str(error)
    if split.checked:
        return (f"{error} (its header reads, so --skip-bad kept it: relicv2 data prepare --skip-bad decodes "
                "every image and writes a set without such files)")
    return f"{error} (use --skip-bad to skip such files)"


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _class_folders(spec: str, root: Path) -> list[str]:
    """The class sub-folders of a split's root; none when the images lie in the root itself (an
    unlabelled folder). Images beside class folders are ambiguous, so they are refused."""
    loose = [f for f in root.iterdir() if _is_image(f)]
    folders = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in SPLIT_FOLDERS)
    if loose and folders:
        raise RelicError(f"{spec}: {root} holds images ({loose[0].name}) beside class sub-folders "
                         f"({folders[0]}); move them into a class folder, or read the folder as unlabelled "
                         f"with images:{root}")
    if not loose and not folders:
        raise RelicError(f"{spec}: no images or class sub-folders in {root}")
    return folders


def _listing(spec: str, root: Path, class_names: list[str] | None) -> tuple[list[str], np.ndarray]:
    """Files (sorted) and labels of one split root: by class folder, or every image below the root
    with label 0 when `class_names` is None."""
    if class_names is None:
        files = sorted(str(f) for f in root.rglob("*") if _is_image(f))
        labels = np.zeros(len(files), np.int64)
    else:
        unknown = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in class_names)
        if unknown:
            raise RelicError(f"{spec}: {root / unknown[0]} is not one of the {len(class_names)} class "
                             "folders of the training split")
        files, labels_list = [], []
        for label, name in enumerate(class_names):
            if (root / name).is_dir():
                found = sorted(str(f) for f in (root / name).rglob("*") if _is_image(f))
                files += found
                labels_list += [label] * len(found)
        labels = np.asarray(labels_list, np.int64)
    if not files:
        raise RelicError(f"{spec}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {root}")
    return files, labels


def limited(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced subset of `limit` images, drawn by a generator seeded by
    `seed`: classes take turns (in a seeded order), each giving a random image not yet taken, so
    class counts differ by at most one until a class runs out."""
    rng = np.random.default_rng([seed, 13])
    order = rng.permutation(len(labels))
    rank = np.empty(len(labels), np.int64)  # the draw in which each image would be taken
    for c in np.unique(labels):
        members = order[labels[order] == c]
        rank[members] = np.arange(len(members))
    class_turn = rng.permutation(int(labels.max()) + 1 if len(labels) else 0)
    taken = np.lexsort((class_turn[labels], rank))[:limit]
    return np.sort(taken)


def _file_bytes(files: list[str]) -> Callable[[int], bytes]:
    return lambda i: Path(files[i]).read_bytes()


def decode_bytes(data: bytes) -> tuple[str | None, np.ndarray | None]:
    """(problem, RGB image) of an encoded image; `truncated_jpeg` says why a truncated JPEG needs its
    own test."""
    if truncated_jpeg(data):
        return "truncated", None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    return ("unreadable", None) if image is None else (None, cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def decode_images(names: list[str], read: Callable[[int], bytes], image_size: int | None,
                  skip_bad: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decode image i from `read(i)` for every name into one (N, H, W, 3) array, resized to
    `image_size` square when given; returns it with the indices kept (--skip-bad drops bad files)."""
    images, keep = [], []
    for i, name in enumerate(names):
        try:
            problem, image = decode_bytes(read(i))
        except OSError:
            problem, image = "unreadable", None
        if problem:
            if not skip_bad:
                raise RelicError(f"{problem} image {name} (use --skip-bad to skip such files)")
            continue
        if image_size is not None:
            image = resize_images(image[None], image_size)[0]
        elif images and image.shape != images[0].shape:
            raise RelicError(f"{name} is {image.shape[1]}x{image.shape[0]}, others are "
                             f"{images[0].shape[1]}x{images[0].shape[0]}; pass --image-size to resize")
        images.append(image)
        keep.append(i)
    if not images:
        raise RelicError("no readable images")
    return np.stack(images), np.asarray(keep, int)


def stored_fingerprint(split: Split) -> str:
    """The fingerprint of a split's stored images, never decoding them: a prepared set's own (from its
    shards), else the sha256 of `encoded N`, every image's encoded bytes (length-prefixed) and the
    labels. Split.fingerprint is this plus the decode settings (--image-size) when there are any."""
    if split._stored is None:
        digest = hashlib.sha256()
        digest.update(f"encoded {len(split)}".encode())
        for i in range(len(split)):
            data = split.encoded(i)
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        digest.update(np.ascontiguousarray(split.labels.astype(np.int64)).data)
        split._stored = digest.hexdigest()
    return split._stored


def decode_key(image_size: int | None) -> str:
    return "" if image_size is None else f"image_size={image_size}"


def require_labels(dataset: Dataset, what: str) -> None:
    """One line when a stage that needs class labels gets a folder of unlabelled images."""
    if not dataset.labelled:
        raise RelicError(f"{what} needs class labels; {dataset.spec} is a folder of unlabelled images")
