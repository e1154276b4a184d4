"""Image folders as users have them: split layouts, unlabelled folders, balanced limits, --skip-bad."""

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from relicv2_cli.data import load_dataset
from relicv2_cli.errors import RelicError
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain


def write_jpegs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs of mixed sizes and aspect ratios (20-60 px a side)."""
    rng = np.random.default_rng([seed, n, len(str(folder))])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        h, w = rng.integers(20, 61, 2)
        paths.append(folder / f"{i:03d}.jpg")
        cv2.imwrite(str(paths[-1]), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return paths


def files_of(split) -> list[str]:
    return [str(Path(f).relative_to(Path(f).parents[2])) for f in split.files]


def test_train_and_val_folders_are_splits_not_classes(tmp_path):
    for c in ("cat", "dog"):
        write_jpegs(tmp_path / "train" / c, 4)
        write_jpegs(tmp_path / "val" / c, 2)
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    # Before: two classes "train" and "val", and every 5th image of both (val included) in the test split.
    assert dataset.class_names == ["cat", "dog"] and dataset.labelled
    assert dataset.val is None  # val is the test split when there is no test/
    assert all(f.startswith("train/") for f in files_of(dataset.train))
    assert all(f.startswith("val/") for f in files_of(dataset.test))
    assert dataset.train.labels.tolist() == [0] * 4 + [1] * 4 and dataset.test.labels.tolist() == [0, 0, 1, 1]


def test_train_val_test_keeps_val_and_train_test(tmp_path):
    for c in ("a", "b", "c"):
        write_jpegs(tmp_path / "three" / "train" / c, 3)
        write_jpegs(tmp_path / "three" / "val" / c, 2)
        write_jpegs(tmp_path / "three" / "test" / c, 1)
        write_jpegs(tmp_path / "two" / "train" / c, 2)
        write_jpegs(tmp_path / "two" / "test" / c, 1)
    dataset = load_dataset(f"imagefolder:{tmp_path / 'three'}")
    assert dataset.class_names == ["a", "b", "c"]
    assert (len(dataset.train), len(dataset.val), len(dataset.test)) == (9, 6, 3)
    assert all(f.startswith("val/") for f in files_of(dataset.val))
    assert all(f.startswith("test/") for f in files_of(dataset.test))
    dataset = load_dataset(f"imagefolder:{tmp_path / 'two'}", image_size=16)
    assert (len(dataset.train), len(dataset.test), dataset.val) == (6, 3, None)
    assert dataset.test.images.shape == (3, 16, 16, 3)


def test_class_folders_without_splits_hold_out_every_fifth(tmp_path):
    write_jpegs(tmp_path / "cat", 10)
    write_jpegs(tmp_path / "dog", 5)
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    assert dataset.class_names == ["cat", "dog"]
    test_names = [Path(f).name for f in dataset.test.files]
    assert test_names == ["004.jpg", "009.jpg", "004.jpg"] and dataset.test.labels.tolist() == [0, 0, 1]
    assert len(dataset.train) == 12
    # The hold-out does not depend on --seed.
    assert load_dataset(f"imagefolder:{tmp_path}", seed=7).test.files == dataset.test.files


def test_flat_and_nested_unlabelled_folders(tmp_path):
    write_jpegs(tmp_path / "flat", 10)
    dataset = load_dataset(f"imagefolder:{tmp_path / 'flat'}", image_size=16)
    assert not dataset.labelled and dataset.class_names == ["unlabelled"]
    assert (len(dataset.train), len(dataset.test)) == (8, 2) and set(dataset.train.labels.tolist()) == {0}
    # Nested: imagefolder: would read the sub-folders as classes; images: reads every image below.
    nested = tmp_path / "nested"
    write_jpegs(nested / "2019", 5)
    write_jpegs(nested / "2020" / "june", 3)
    write_jpegs(nested / "2020" / "july", 2)
    assert load_dataset(f"imagefolder:{nested}").class_names == ["2019", "2020"]
    dataset = load_dataset(f"images:{nested}")
    assert not dataset.labelled and (len(dataset.train), len(dataset.test)) == (8, 2)
    assert sum("/2020/july/" in f for f in dataset.train.files + dataset.test.files) == 2
    # A flat train/ + val/ layout is unlabelled too.
    write_jpegs(tmp_path / "split" / "train", 6)
    write_jpegs(tmp_path / "split" / "val", 3)
    dataset = load_dataset(f"imagefolder:{tmp_path / 'split'}")
    assert not dataset.labelled and (len(dataset.train), len(dataset.test)) == (6, 3)


def test_ambiguous_and_empty_layouts_are_one_line_errors(tmp_path):
    write_jpegs(tmp_path / "mixed" / "cat", 2)
    write_jpegs(tmp_path / "mixed", 1)
    with pytest.raises(RelicError, match=r"holds images \(000.jpg\) beside class sub-folders \(cat\)"):
        load_dataset(f"imagefolder:{tmp_path / 'mixed'}")
    write_jpegs(tmp_path / "noval" / "val" / "cat", 2)
    with pytest.raises(RelicError, match="has val/ but no train/ split folder"):
        load_dataset(f"imagefolder:{tmp_path / 'noval'}")
    write_jpegs(tmp_path / "extra" / "train" / "cat", 2)
    write_jpegs(tmp_path / "extra" / "val" / "cow", 2)
    with pytest.raises(RelicError, match="cow is not one of the 1 class folders of the training split"):
        load_dataset(f"imagefolder:{tmp_path / 'extra'}")


def test_limits_take_a_seeded_class_balanced_subset(tmp_path):
    for c, n in (("a", 10), ("b", 10), ("c", 3)):
        write_jpegs(tmp_path / "train" / c, n)
        write_jpegs(tmp_path / "test" / c, 4)
    spec = f"imagefolder:{tmp_path}"
    dataset = load_dataset(spec, limit_train=7, limit_test=6, seed=0, image_size=8)
    # Before: the first 7 files in class order, all of class a.
    assert sorted(np.bincount(dataset.train.labels, minlength=3).tolist()) == [2, 2, 3]
    assert np.bincount(dataset.test.labels, minlength=3).tolist() == [2, 2, 2]
    # A class that runs out leaves its turns to the others.
    counts = np.bincount(load_dataset(spec, limit_train=19).train.labels, minlength=3).tolist()
    assert counts[2] == 3 and sorted(counts[:2]) == [8, 8]
    again = load_dataset(spec, limit_train=7, limit_test=6, seed=0, image_size=8)
    assert again.train.files == dataset.train.files and again.train.fingerprint == dataset.train.fingerprint
    other = load_dataset(spec, limit_train=7, limit_test=6, seed=1, image_size=8)
    assert other.train.files != dataset.train.files
    assert dataset.options["seed"] == 0 and other.record()["fingerprint"] != dataset.record()["fingerprint"]


def test_encoded_gives_the_file_bytes(tmp_path):
    paths = write_jpegs(tmp_path / "cat", 5)
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    assert dataset.train.encoded(0) == paths[0].read_bytes()
    assert dataset.test.encoded(0) == paths[4].read_bytes()


def test_stages_that_need_labels_refuse_an_unlabelled_folder(tmp_path, cli):
    write_jpegs(tmp_path / "photos", 10)
    spec = f"images:{tmp_path / 'photos'}"
    small = ["--image-size", "16", "--width", "0.25", "--device", "cpu", "--workdir", tmp_path / "runs"]
    expected = f"needs class labels; {spec} is a folder of unlabelled images"
    for args in (["eval", "linear", "random:resnet18", spec], ["eval", "semi", "random:resnet18", spec],
                 ["eval", "transfer", "random:resnet18", spec],
                 ["analyze", "ratios", "random:resnet18", spec],
                 ["analyze", "neighbors", "random:resnet18", spec],
                 ["pretrain", spec, "--method", "supervised", "--batch-size", "4"]):
        result = cli(*args, *small)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1, (args, result.err)
        assert f"error: {' '.join(args[:2]) if args[0] != 'pretrain' else 'pretrain --method supervised'} " \
               f"{expected}" in result.err, result.err
    assert not (tmp_path / "runs").exists()


def test_self_supervised_pretrain_on_unlabelled_images_skips_evaluation(tmp_path):
    write_jpegs(tmp_path / "photos", 20)
    cfg = PretrainConfig(spec=f"images:{tmp_path / 'photos'}", image_size=16, arch="resnet18", width=0.25,
                         proj_hidden=32, proj_dim=16, batch_size=8, epochs=1.0, warmup_epochs=0.0,
                         large_size=16, small_crops=0, n_negatives=4, log_every=1, eval_every=1, max_steps=2)
    art = run_pretrain(cfg, workdir=tmp_path / "runs", device="cpu", quiet=True)
    assert art.metrics["steps"] == 2 and "knn_top1" not in art.metrics
    assert art.config["labelled"] is False and art.config["class_names"] == ["unlabelled"]


def test_every_command_that_reads_a_spec_has_skip_bad(cli):
    commands = [["data", "info"], ["data", "prepare"], ["saliency"], ["pretrain"], ["embed"],
                ["eval", "features"], ["eval", "linear"], ["eval", "semi"], ["eval", "transfer"],
                ["analyze", "neighbors"], ["analyze", "ratios"]]
    for command in commands:
        result = cli(*command, "--help")
        assert result.code == 0 and re.search(r"--skip-bad\b", result.out), command


def test_skip_bad_reaches_the_loader(tmp_path, cli):
    write_jpegs(tmp_path / "train" / "cat", 4)
    write_jpegs(tmp_path / "test" / "cat", 2)
    bad = tmp_path / "train" / "cat" / "001.jpg"
    bad.write_bytes(bad.read_bytes()[:-100])
    args = ["eval", "features", "random:resnet18", f"imagefolder:{tmp_path}", "--image-size", "16", "--width",
            "0.25", "--device", "cpu", "--workdir", tmp_path / "runs", "--quiet"]
    result = cli(*args)
    assert result.code == 2 and f"truncated image {bad} (use --skip-bad" in result.err
    result = cli(*args, "--skip-bad")
    assert result.code == 0, result.err
