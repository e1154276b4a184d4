"""`relicv2 data prepare` and `prepared:DIR`: JPEG in HDF5 shards, sizes, fingerprint, damage, resume."""

import hashlib
import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from jpeg_images import smooth_image

from relicv2_cli.data import load_dataset, prepared
from relicv2_cli.errors import RelicError
from relicv2_cli.stages.prepare import parse_size, run

# (height, width) of the source images: both orientations, square, and some under the cap of 24.
SIZES = [(40, 60), (60, 30), (33, 33), (20, 50), (24, 40), (50, 22), (36, 48), (21, 21)]



def write_folder(root: Path) -> dict[str, np.ndarray]:
    """train/ + val/ with classes cat and dog; returns the BGR source of every relative path."""
    written = {}
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = smooth_image(*SIZES[(i + c) % len(SIZES)], seed=len(written))
                rel = f"{split}/{name}/{i}.jpg"
                cv2.imwrite(str(root / rel), image, [cv2.IMWRITE_JPEG_QUALITY, 98])
                written[rel] = image
    return written


def capped(h: int, w: int, side: int) -> tuple[int, int]:
    if min(h, w) <= side:
        return h, w
    return (side, round(w * side / h)) if h <= w else (round(h * side / w), side)


def test_prepare_then_load_gives_labels_names_sizes_and_pixels(tmp_path):
    write_folder(tmp_path / "photos")
    source = load_dataset(f"imagefolder:{tmp_path / 'photos'}")
    art = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", max_side=24,
              workers=1, quiet=True)
    assert art.path == tmp_path / "runs" / "dataset" / "imagefolder-photos-24" and art.kind == "dataset"
    dataset = load_dataset(f"prepared:{art.path}")
    assert dataset.class_names == ["cat", "dog"] and dataset.labelled and dataset.val is None
    for split, original in ((dataset.train, source.train), (dataset.test, source.test)):
        assert split.labels.tolist() == original.labels.tolist()
        for i, file in enumerate(original.files):
            h, w = cv2.imread(file).shape[:2]
            assert tuple(split.sizes[i]) == capped(h, w, 24), file  # shorter side 24 at most, aspect kept
            stored = cv2.imdecode(np.frombuffer(split.encoded(i), np.uint8), cv2.IMREAD_COLOR)
            assert stored.shape[:2] == tuple(split.sizes[i])
            expected = cv2.resize(cv2.imread(file), stored.shape[1::-1], interpolation=cv2.INTER_AREA)
            assert np.abs(stored.astype(float) - expected).mean() < 3, file  # JPEG at quality 95
    # Examples by hand: 40x60 -> 24x36, 60x30 -> 48x24, 20x50 stays.
    assert [tuple(s) for s in dataset.train.sizes[:4]] == [(24, 36), (48, 24), (24, 24), (20, 50)]
    squares = load_dataset(f"prepared:{art.path}", image_size=16).train
    assert squares.images.shape == (16, 16, 16, 3)
    # squares are other pixels than the stored images (which streamed runs crop): another fingerprint
    assert squares.fingerprint != dataset.train.fingerprint


def test_max_side_zero_keeps_sizes_and_limits_are_balanced(tmp_path):
    write_folder(tmp_path / "photos")
    art = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", max_side=0,
              workers=1, quiet=True)
    dataset = load_dataset(f"prepared:{art.path}", limit_train=5, seed=3)
    assert sorted(np.bincount(dataset.train.labels).tolist()) == [2, 3]
    full = load_dataset(f"prepared:{art.path}")
    assert [tuple(s) for s in full.train.sizes[:4]] == SIZES[:4]
    assert dataset.train.fingerprint != full.train.fingerprint
    again = load_dataset(f"prepared:{art.path}", limit_train=5, seed=3)
    assert again.train.fingerprint == dataset.train.fingerprint


def read_plain(path: Path) -> dict:
    """What docs/data.md says a plain h5py reader does."""
    with h5py.File(path, "r") as f:
        return {"images": [bytes(b) for b in f["images"][:]], "label": f["label"][:], "name": f["name"][:],
                "height": f["height"][:], "width": f["width"][:], "crc32": f["crc32"][:],
                "attrs": dict(f.attrs)}


def test_shards_of_about_shard_size_readable_by_plain_h5py(tmp_path):
    write_folder(tmp_path / "photos")
    art = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", shard_size="3000",
              workers=1, quiet=True)
    index = json.loads((art.path / "dataset.json").read_text())
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 2 and sum(s["count"] for s in shards) == 16
    for k, shard in enumerate(shards):
        plain = read_plain(art.path / shard["file"])
        sizes = [len(b) for b in plain["images"]]
        if k < len(shards) - 1:  # closed as soon as its images reach the size
            assert sum(sizes) >= 3000 > sum(sizes[:-1])
        assert art.manifest["files"][shard["file"]]["sha256"] == shard["sha256"]
        assert plain["attrs"]["split"] == "train" and plain["attrs"]["count"] == len(sizes)
        decoded = cv2.imdecode(np.frombuffer(plain["images"][0], np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape[:2] == (plain["height"][0], plain["width"][0])
    # The fingerprint: sha256 over the shards' content digests, each over (label, length, bytes) per image.
    digests = []
    for shard in shards:
        plain = read_plain(art.path / shard["file"])
        digest = hashlib.sha256()
        for label, data in zip(plain["label"], plain["images"], strict=True):
            digest.update(np.int64(label).tobytes() + np.int64(len(data)).tobytes() + data)
        digests.append(digest.hexdigest())
    expected = hashlib.sha256(" ".join(digests).encode()).hexdigest()
    dataset = load_dataset(f"prepared:{art.path}")
    assert dataset.train.fingerprint == expected and dataset.train._images is None  # nothing decoded
    first = read_plain(art.path / shards[0]["file"])
    assert first["name"][0].decode() == "train/cat/0.jpg"


def test_same_fingerprint_with_workers_and_unlabelled_folders(tmp_path):
    write_folder(tmp_path / "photos")
    one = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", name="one",
              workers=1, quiet=True)
    two = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", name="two", workers=2,
              shard_size="1KiB", quiet=True)
    assert load_dataset(f"prepared:{one.path}").train.fingerprint != ""
    # Shard boundaries differ, so shard digests differ; the images do not.
    a, b = load_dataset(f"prepared:{one.path}"), load_dataset(f"prepared:{two.path}")
    assert all(a.train.encoded(i) == b.train.encoded(i) for i in range(len(a.train)))
    art = run(f"images:{tmp_path / 'photos' / 'train'}", workdir=tmp_path / "runs", workers=1, quiet=True)
    dataset = load_dataset(f"prepared:{art.path}")
    assert not dataset.labelled and (len(dataset.train), len(dataset.test)) == (13, 3)


def test_a_corrupt_shard_is_named_and_nothing_changes(tmp_path, cli):
    write_folder(tmp_path / "photos")
    art = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", shard_size="3000",
              workers=1, quiet=True)
    shard = art.path / "train-00001.h5"
    data = bytearray(shard.read_bytes())
    image = read_plain(shard)["images"][1]
    at = data.find(image) + len(image) // 2
    data[at] ^= 0xFF
    shard.write_bytes(bytes(data))
    before = {p: p.read_bytes() for p in art.path.iterdir()}
    dataset = load_dataset(f"prepared:{art.path}", image_size=16)  # labels and sizes are intact
    with pytest.raises(RelicError, match=f"corrupt shard {shard}: image 1 fails its crc32 check"):
        dataset.train.images
    result = cli("data", "info", f"prepared:{art.path}", "--image-size", "16")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"corrupt shard {shard}" in result.err
    assert {p: p.read_bytes() for p in art.path.iterdir()} == before
    assert "train-00001.h5: sha256 differs" in cli("artifacts", "verify", art.path).err
    # Damage in the HDF5 structure (here: the file cut short) is named too.
    shard.write_bytes(bytes(data[:200]))
    with pytest.raises(RelicError, match=f"corrupt shard {shard}"):
        load_dataset(f"prepared:{art.path}")


def test_truncated_jpeg_is_named_or_skipped(tmp_path, cli):
    write_folder(tmp_path / "photos")
    bad = tmp_path / "photos" / "train" / "dog" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:-300])
    result = cli("data", "prepare", f"imagefolder:{tmp_path / 'photos'}", "--workdir", tmp_path / "runs")
    assert result.code == 2 and len(result.err.strip().splitlines()) == 1
    assert f"truncated image {bad} (use --skip-bad" in result.err
    assert list((tmp_path / "runs" / "dataset").iterdir()) == []  # no artifact, no staging left
    result = cli("data", "prepare", f"imagefolder:{tmp_path / 'photos'}", "--workdir", tmp_path / "runs",
                 "--skip-bad", "--quiet")
    assert result.code == 0, result.err
    art_path = Path(result.last_line)
    metrics = json.loads((art_path / "manifest.json").read_text())["metrics"]
    assert (metrics["train_count"], metrics["train_skipped"], metrics["test_count"]) == (15, 1, 8)
    index = json.loads((art_path / "dataset.json").read_text())
    assert index["splits"]["train"]["skipped"] == ["train/dog/3.jpg"]
    assert len(load_dataset(f"prepared:{art_path}").train) == 15


def test_resume_keeps_finished_shards(tmp_path, monkeypatch):
    write_folder(tmp_path / "photos")
    spec, runs = f"imagefolder:{tmp_path / 'photos'}", tmp_path / "runs"
    whole = run(spec, workdir=runs, name="whole", shard_size="3000", workers=1, quiet=True)
    real, calls = prepared._write_shard, []

    def crash_on_third(path, *args):
        calls.append(path.name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(path, *args)

    monkeypatch.setattr(prepared, "_write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(spec, workdir=runs, name="cut", shard_size="3000", workers=1, quiet=True)
    staging = runs / "dataset" / ".cut.partial"
    kept = {p.name: p.stat().st_mtime_ns for p in staging.glob("*.h5")}
    assert sorted(kept) == ["train-00000.h5", "train-00001.h5"]
    with pytest.raises(RelicError, match="an interrupted run left .*--resume"):
        run(spec, workdir=runs, name="cut", shard_size="3000", workers=1, quiet=True)
    with pytest.raises(RelicError, match=r"cannot resume .* \(quality\)"):
        run(spec, workdir=runs, name="cut", shard_size="3000", quality=80, resume=True, workers=1, quiet=True)
    monkeypatch.setattr(prepared, "_write_shard", real)
    art = run(spec, workdir=runs, name="cut", shard_size="3000", resume=True, workers=1, quiet=True)
    assert {name: (art.path / name).stat().st_mtime_ns for name in kept} == kept  # not rewritten
    a, b = load_dataset(f"prepared:{whole.path}"), load_dataset(f"prepared:{art.path}")
    assert (a.train.fingerprint, a.test.fingerprint) == (b.train.fingerprint, b.test.fingerprint)
    assert a.fingerprint == b.fingerprint


def test_bad_options_are_one_line_errors(tmp_path, cli):
    assert parse_size("1GiB") == 1 << 30 and parse_size("256MiB") == 256 << 20 and parse_size("4000") == 4000
    for args, message in ((["--shard-size", "lots"], "--shard-size must be a positive size"),
                          (["--quality", "0"], "--quality must be in [1, 100]"),
                          (["--max-side", "-1"], "--max-side must be 0"),
                          (["--workers", "0"], "--workers must be at least 1")):
        result = cli("data", "prepare", "synthetic", "--workdir", tmp_path, *args)
        assert result.code == 2 and message in result.err, result.err
    assert not (tmp_path / "dataset").exists()


def test_stages_read_a_prepared_set(tmp_path, cli):
    write_folder(tmp_path / "photos")
    art = run(f"imagefolder:{tmp_path / 'photos'}", workdir=tmp_path / "runs", max_side=24, workers=1,
              quiet=True)
    result = cli("eval", "linear", "random:resnet18", f"prepared:{art.path}", "--image-size", "16", "--width",
                 "0.25", "--device", "cpu", "--workdir", tmp_path / "runs", "--l2-grid", "1e-2", "--quiet")
    assert result.code == 0, result.err
    manifest = json.loads((Path(result.last_line) / "manifest.json").read_text())
    prepared_set = load_dataset(f"prepared:{art.path}", image_size=16)  # the fingerprint names the size
    assert manifest["dataset"]["test_count"] == 8 and len(manifest["metrics"]["per_class"]) == 2
    assert manifest["dataset"]["split_fingerprints"]["test"] == prepared_set.test.fingerprint
    info = cli("data", "info", f"prepared:{art.path}")
    assert info.code == 0 and "height 20-50, width 21-50" in info.out and "2: cat, dog" in info.out
