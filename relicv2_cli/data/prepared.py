"""Prepared datasets: `relicv2 data prepare` writes them once, `prepared:DIR` reads them.

A prepared set is a `dataset` artifact: every image re-encoded as JPEG with its shorter side capped,
in HDF5 shards of about --shard-size bytes (`train-00000.h5`, ...), so that many processes read in
parallel, plus `dataset.json` (class names, the shards of each split, fingerprints). The format is
in docs/data.md; plain h5py reads it. Reading checks each image's crc32 as it is read (the bytes of
one image, not the whole shard), so a damaged shard is named without hashing gigabytes first;
`relicv2 artifacts verify` rechecks every file's sha256.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from relicv2_cli import artifacts
from relicv2_cli.data import Dataset, Split, check_labels, decode_bytes, decode_images, decode_key, limited
from relicv2_cli.errors import RelicError
from relicv2_cli.workers import cv2_pool

FORMAT = "relicv2-prepared"
VERSION = 1
INDEX = "dataset.json"
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------------------------------
# Reading


class _Shards:
    """Image j of one split, read from its shard by index. h5py handles do not survive a fork, so
    they are opened per process (DataLoader workers may share one reader)."""

    def __init__(self, root: Path, shards: list[dict]):
        self.root = root
        self.files = [s["file"] for s in shards]
        self.ends = np.cumsum([s["count"] for s in shards])
        self._open: dict = {}  # shard number -> (pid, h5py.File, its images, crc32 array)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def shard(self, k: int):
        import h5py

        held = self._open.get(k)
        if held is None or held[0] != os.getpid():
            path = self.root / self.files[k]
            try:
                f = h5py.File(path, "r")
                held = (os.getpid(), f, f["images"], f["crc32"][:])
            except (OSError, KeyError) as e:
                raise _corrupt(path, e) from None
            self._open[k] = held
        return held

    def read(self, j: int) -> bytes:
        k = int(np.searchsorted(self.ends, j, side="right"))
        offset = j - (int(self.ends[k - 1]) if k else 0)
        _, _, images, crc = self.shard(k)
        path = self.root / self.files[k]
        try:
            data = images[offset].tobytes()
        except (OSError, KeyError) as e:
            raise _corrupt(path, e) from None
        if zlib.crc32(data) != int(crc[offset]):
            raise RelicError(f"corrupt shard {path}: image {offset} fails its crc32 check "
                             f"(relicv2 artifacts verify {self.root})")
        return data


def _corrupt(path: Path, error: Exception) -> RelicError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RelicError(f"corrupt shard {path}: {first}")


@dataclass
class _Reader:
    """`Split.encoded`: image i of a (possibly limited) split is image positions[i] of the stored one."""

    shards: _Shards
    positions: np.ndarray

    def __call__(self, i: int) -> bytes:
        return self.shards.read(int(self.positions[i]))


def load_prepared(spec: str, path: Path, image_size: int | None, limit_train: int | None,
                  limit_test: int | None, seed: int) -> Dataset:
    """A prepared set's splits: labels and stored sizes now, pixels on first `.images`."""
    art = artifacts.load_artifact(path, kind="dataset")
    try:
        index = json.loads(art.file(INDEX).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RelicError(f"corrupt {path / INDEX}: {e}") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise RelicError(f"{path / INDEX}: expected {FORMAT} version {VERSION}, found "
                         f"{index.get('format')!r} version {index.get('version')!r}")
    class_names = index["class_names"]
    limits = {"train": limit_train, "test": limit_test}
    splits = {name: _load_split(art, name, info, class_names, image_size, limits.get(name), seed)
              for name, info in index["splits"].items()}
    return Dataset(spec=spec, train=splits["train"], test=splits["test"], val=splits.get("val"),
                   class_names=class_names, labelled=index["labelled"])


def _load_split(art: artifacts.Artifact, name: str, info: dict, class_names: list[str],
                image_size: int | None, limit: int | None, seed: int) -> Split:
    import h5py

    labels, sizes, names = [], [], []
    for shard in info["shards"]:
        path = art.path / shard["file"]
        recorded = art.manifest["files"].get(shard["file"], {}).get("bytes")
        if not path.exists() or path.stat().st_size != recorded:
            raise RelicError(f"corrupt shard {path}: missing or not the size its manifest records "
                             f"(relicv2 artifacts verify {art.path})")
        try:
            with h5py.File(path, "r") as f:  # fletcher32 checks these small arrays
                labels.append(f["label"][:])
                sizes.append(np.stack([f["height"][:], f["width"][:]], 1))
                names += [n.decode() for n in f["name"][:]]
        except (OSError, KeyError) as e:
            raise _corrupt(path, e) from None
    labels = check_labels(np.concatenate(labels), info["count"], len(class_names),
                          f"{len(class_names)} class names", f"{art.path} {name}")
    sizes = np.concatenate(sizes).astype(np.int64)
    positions = np.arange(len(labels))
    fingerprint = info["fingerprint"]
    if limit is not None:
        positions = limited(labels, limit, seed)
        fingerprint = hashlib.sha256(f"{fingerprint} {positions.tolist()}".encode()).hexdigest()
    read = _Reader(_Shards(art.path, info["shards"]), positions)
    kept = [names[p] for p in positions]
    # the stored images' fingerprint; Split.fingerprint adds --image-size (decoded squares) when given
    return Split(labels=labels[positions], sizes=sizes[positions], _read=read, _stored=fingerprint,
                 decode_settings=decode_key(image_size),
                 _decode=lambda: decode_images([f"{n} (in {art.path})" for n in kept], read, image_size,
                                               skip_bad=False))


# ---------------------------------------------------------------------------------------------------
# Writing


@dataclass
class PrepareOptions:
    max_side: int = 256
    quality: int = 95
    shard_size: int = 1 << 30
    workers: int = 1
    skip_bad: bool = False


def encode_image(task: tuple) -> tuple:
    """(i, problem, JPEG bytes, height, width) of source image i: decoded, its shorter side shrunk
    to `max_side` (area interpolation, aspect kept), re-encoded at `quality`."""
    i, payload, max_side, quality = task
    if isinstance(payload, np.ndarray):
        problem, rgb = None, payload
    else:
        try:
            data = Path(payload).read_bytes() if isinstance(payload, str) else payload
        except OSError:
            return i, "unreadable", None, 0, 0
        problem, rgb = decode_bytes(data)
        if problem:
            return i, problem, None, 0, 0
    height, width = rgb.shape[:2]
    if max_side and min(height, width) > max_side:
        scale = max_side / min(height, width)
        height, width = (max_side, max(1, round(width * scale))) if height <= width else \
            (max(1, round(height * scale)), max_side)
        rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        return i, "unencodable", None, 0, 0
    return i, None, jpeg.tobytes(), height, width


def _payload(split: Split, i: int):
    """What a worker needs for image i: a file path, stored bytes (a prepared source) or pixels."""
    if split.files is not None:
        return split.files[i]
    if split.sizes is not None:
        return split.encoded(i)
    return split.images[i]


def _source_name(split: Split, root: str, i: int) -> str:
    if split.files is not None:
        try:
            return str(Path(split.files[i]).relative_to(root))
        except ValueError:
            return split.files[i]
    return f"{i:08d}"


def _listing_digest(split: Split, names: list[str]) -> str:
    return hashlib.sha256(json.dumps([names, split.labels.tolist()]).encode()).hexdigest()


def _content_digest(records: list[tuple]) -> str:
    """sha256 of a shard's images as stored (label, length, JPEG bytes each): no decoding."""
    digest = hashlib.sha256()
    for _name, label, data, _h, _w in records:
        digest.update(np.int64(label).tobytes() + np.int64(len(data)).tobytes())
        digest.update(data)
    return digest.hexdigest()


def _write_shard(path: Path, records: list[tuple], split: str, number: int, first: int) -> None:
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as f:
        images = f.create_dataset("images", (len(records),), dtype=h5py.vlen_dtype(np.uint8))
        for k, (_name, _label, data, _h, _w) in enumerate(records):
            images[k] = np.frombuffer(data, np.uint8)
        columns = {"label": (np.int64, 1), "height": (np.int32, 3), "width": (np.int32, 4)}
        for key, (dtype, col) in columns.items():
            f.create_dataset(key, data=np.array([r[col] for r in records], dtype), fletcher32=True)
        f.create_dataset("crc32", data=np.array([zlib.crc32(r[2]) for r in records], np.uint32),
                         fletcher32=True)
        f.create_dataset("name", data=[r[0] for r in records], dtype=h5py.string_dtype())
        f.attrs.update({"format": FORMAT, "version": VERSION, "split": split, "shard": number,
                        "first": first, "count": len(records)})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def prepare(dataset: Dataset, root: str, staging: Path, opts: PrepareOptions, request: dict, progress,
            resume: bool) -> dict:
    """Write every split's shards into `staging` and the finished `dataset.json`; returns the index.
    `dataset.json` is rewritten after each shard, so an interrupted run resumes after its last whole
    shard (`request`, what was asked, must match)."""
    splits = {s: dataset.split(s) for s in SPLITS if s != "val" or dataset.val is not None}
    names = {s: [_source_name(split, root, i) for i in range(len(split))] for s, split in splits.items()}
    request = {**request, "listing": {s: _listing_digest(split, names[s]) for s, split in splits.items()}}
    index = {"format": FORMAT, "version": VERSION, "complete": False, "request": request,
             "class_names": dataset.class_names, "labelled": dataset.labelled,
             "max_side": opts.max_side, "quality": opts.quality,
             "splits": {s: {"count": 0, "shards": [], "skipped": []} for s in splits}}
    if resume and (staging / INDEX).exists():
        index = _resumed_index(staging, request)
    else:  # a run killed before its first shard may have left a partly written one
        for path in staging.iterdir():
            path.unlink()
    total = sum(len(split) for split in splits.values())
    done = sum(sh["source_end"] for info in index["splits"].values() for sh in info["shards"][-1:])
    bar = progress.add_task("prepare", total=total, completed=done, info=f"{opts.workers} worker(s)",
                            unit="images")
    with cv2_pool(opts.workers) as pool:
        imap = map if pool is None else functools.partial(pool.imap, chunksize=8)
        for s, split in splits.items():
            info = index["splits"][s]
            start = info["shards"][-1]["source_end"] if info["shards"] else 0
            tasks = ((i, _payload(split, i), opts.max_side, opts.quality) for i in range(start, len(split)))
            records, skipped, size = [], [], 0
            for i, problem, data, height, width in imap(encode_image, tasks):
                progress.advance(bar)
                if problem:
                    where = split.files[i] if split.files is not None else f"{s} image {i}"
                    if not opts.skip_bad:
                        raise RelicError(f"{problem} image {where} (use --skip-bad to skip such files)")
                    skipped.append(names[s][i])
                else:
                    records.append((names[s][i], int(split.labels[i]), data, height, width))
                    size += len(data)
                if records and (size >= opts.shard_size or i == len(split) - 1):
                    _finish_shard(staging, index, s, records, skipped, i + 1)
                    records, skipped, size = [], [], 0
            if skipped:  # bad images after the last shard
                info["skipped"] += skipped
            if info["count"] == 0:
                raise RelicError(f"no readable images in the {s} split of {dataset.spec}")
            info["fingerprint"] = hashlib.sha256(
                " ".join(sh["content_sha256"] for sh in info["shards"]).encode()).hexdigest()
    index["complete"] = True
    artifacts.atomic_write_bytes(staging / INDEX, (json.dumps(index, indent=1) + "\n").encode())
    return index


def _finish_shard(staging: Path, index: dict, split: str, records: list, skipped: list, source_end: int):
    info = index["splits"][split]
    number = len(info["shards"])
    path = staging / f"{split}-{number:05d}.h5"
    _write_shard(path, records, split, number, info["count"])
    info["shards"].append({"file": path.name, "count": len(records), "source_end": source_end,
                           "sha256": artifacts.sha256_file(path), "content_sha256": _content_digest(records)})
    info["count"] += len(records)
    info["skipped"] += skipped
    artifacts.atomic_write_bytes(staging / INDEX, (json.dumps(index, indent=1) + "\n").encode())


def _resumed_index(staging: Path, request: dict) -> dict:
    """The index of an interrupted run, after checking that it was asked the same and that its
    finished shards are intact; files it did not finish are removed."""
    index = json.loads((staging / INDEX).read_text())
    if index.get("request") != request:
        before = index.get("request") or {}
        changed = sorted(k for k in set(before) | set(request) if before.get(k) != request.get(k))
        raise RelicError(f"cannot resume {staging}: it was started with other settings or source files "
                         f"({', '.join(changed)}); rerun with --force to start again")
    listed = set()
    for info in index["splits"].values():
        for shard in info["shards"]:
            path = staging / shard["file"]
            if not path.exists() or artifacts.sha256_file(path) != shard["sha256"]:
                raise RelicError(f"cannot resume: finished shard {path} is missing or changed; "
                                 "rerun with --force to start again")
            listed.add(shard["file"])
    for path in staging.iterdir():
        if path.name != INDEX and path.name not in listed:
            path.unlink()
    return index
