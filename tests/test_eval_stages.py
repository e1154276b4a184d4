"""`relicv2 eval linear | semi | transfer` end to end through the CLI, on tiny encoders and data."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from safetensors.torch import load_file

from relicv2_cli import features as features_lib
from relicv2_cli import probe
from relicv2_cli.artifacts import load_artifact, verify_artifact
from relicv2_cli.data import load_dataset
from relicv2_cli.data.subsets import balanced_subset
from tests.test_eval_features import make_pretrain

SMALL = ["--limit-train", "200", "--limit-test", "60", "--image-size", "16", "--width", "0.25", "--device",
         "cpu"]


@pytest.fixture
def forwards(monkeypatch):
    """Counts calls of the feature extractor (one per split actually embedded)."""
    calls = []
    real = features_lib.encode_images

    def spy(model, images, **kw):
        calls.append(len(images))
        return real(model, images, **kw)

    monkeypatch.setattr(features_lib, "encode_images", spy)
    return calls


def test_linear_cached_reuses_features(tmp_path, cli, forwards):
    pre = make_pretrain(tmp_path)
    result = cli("eval", "linear", pre.path, "synthetic", *SMALL, "--workdir", tmp_path, "--l2-grid",
                 "1e-4:1:5")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="linear")
    assert art.path == tmp_path / "linear" / "tiny-relicv2-synthetic"
    assert sum(forwards) == 260  # test, then train (one call per batch)
    m = art.metrics
    assert 0 <= m["top1"] <= m["top5"] <= 1 and m["l2"] in art.config["l2_grid"] and len(m["l2_grid"]) == 5
    assert set(m["per_class"]) == set(load_dataset("synthetic", limit_train=1).class_names)
    weights = load_file(str(art.path / "classifier.safetensors"))
    assert weights["weight"].shape == (10, 128) and weights["bias"].shape == (10,)
    kinds = [p["kind"] for p in art.manifest["parents"]]
    assert kinds == ["pretrain", "features", "features"]
    assert verify_artifact(art.path) == []
    assert "top-1" in result.err and "chosen L2" in result.err  # the Rich table, on stderr

    # A second evaluation of the same encoder on the same data reuses both feature artifacts.
    again = cli("eval", "linear", pre.path, "synthetic", *SMALL, "--workdir", tmp_path, "--l2-grid", "1e-2",
                "--name", "single-l2", "--quiet")
    assert again.code == 0, again.err
    assert sum(forwards) == 260 and again.out.strip() == str(tmp_path / "linear" / "single-l2")
    assert len(list((tmp_path / "features").iterdir())) == 2
    # The artifact exists: refused without --force, nothing changed.
    refused = cli("eval", "linear", pre.path, "synthetic", *SMALL, "--workdir", tmp_path)
    assert refused.code == 2 and "artifact exists" in refused.err
    assert load_artifact(art.path).digest == art.digest


def test_linear_augment_protocol(tmp_path, cli):
    result = cli("eval", "linear", "random:resnet18", "synthetic", *SMALL, "--workdir", tmp_path,
                 "--protocol", "augment",
                 "--max-steps", "3", "--batch-size", "64", "--quiet")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="linear")
    assert art.name == "random-resnet18-synthetic-augment" and art.config["nesterov"] is True
    assert art.metrics["steps"] == 3 and 0 <= art.metrics["top1"] <= 1
    lines = [json.loads(x) for x in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["step"] == 1 and lines[-1]["step"] == 3
    # --lr is a base rate per 256 images (the release's 0.3 means 1.2 at batch 1024): 0.3 * 64 / 256 at
    # step 0 of the cosine schedule.
    assert lines[0]["lr"] == pytest.approx(0.3 * 64 / 256)


def test_bad_input_writes_nothing(tmp_path, cli):
    pre = make_pretrain(tmp_path)
    feats = cli("eval", "features", pre.path, "synthetic", *SMALL, "--workdir", tmp_path, "--quiet")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [
        (["eval", "linear", feats.last_line, "synthetic"],
         "expected an artifact of kind 'pretrain', found kind 'features'"),
        (["eval", "linear", "random:resnet18", "synthetic", "--l2-grid", "x"], "--l2-grid"),
        (["eval", "linear", "random:resnet18", "nosuch:data"], "unknown dataset spec"),
        (["eval", "linear", "random:resnet18", "synthetic", "--protocol", "sgd"],
         "--protocol must be one of"),
        (["eval", "semi", "random:resnet18", "synthetic", "--fraction", "0"], "--fraction must be in (0, 1]"),
        (["eval", "semi", "random:resnet18", "synthetic", "--fraction", "1.5"],
         "--fraction must be in (0, 1]"),
        (["eval", "semi", "random:resnet18", "synthetic"], "exactly one of --fraction"),
        (["eval", "semi", "random:resnet18", "synthetic", "--subset", tmp_path / "nope.txt"],
         "subset file not found"),
        (["eval", "transfer", "random:resnet18"], "at least one dataset SPEC"),
        (["eval", "transfer", "synthetic"], "at least one ENCODER"),
    ]
    (tmp_path / "range.txt").write_text("0\n5\n200\n")
    cases.append((["eval", "semi", "random:resnet18", "synthetic", "--subset", tmp_path / "range.txt"],
                  "out of range"))
    (tmp_path / "dup.txt").write_text("0\n5\n5\n")
    cases.append((["eval", "semi", "random:resnet18", "synthetic", "--subset", tmp_path / "dup.txt"],
                  "duplicate"))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for args, message in cases:
        result = cli(*args, *SMALL, "--workdir", tmp_path)
        assert result.code == 2, (args, result.err)
        assert message in result.err and len(result.err.strip().splitlines()) == 1, result.err
        assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, args


def test_semi_fraction_leaving_a_class_empty(tmp_path, cli):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.integers(0, 255, (20, 16, 16, 3), dtype=np.uint8),
             y_train=np.repeat([0, 1], 10), x_test=rng.integers(0, 255, (6, 16, 16, 3), dtype=np.uint8),
             y_test=np.array([0, 1, 2, 0, 1, 2]))
    result = cli("eval", "semi", "random:resnet18", f"npz:{tmp_path / 'd.npz'}", "--fraction", "0.1",
                 "--workdir", tmp_path / "runs", "--width", "0.25")
    assert result.code == 2 and "leave 1 class(es) empty (2)" in result.err
    assert not (tmp_path / "runs").exists()


def test_semi_subset_is_balanced_deterministic_and_reused(tmp_path, cli):
    pre = make_pretrain(tmp_path)
    args = ["synthetic", *SMALL, "--workdir", tmp_path, "--fraction", "0.1", "--max-steps", "2",
            "--batch-size", "8"]
    result = cli("eval", "semi", pre.path, *args)
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="semi")
    assert art.name == "tiny-relicv2-synthetic-10pct-s0"
    indices = np.loadtxt(art.path / "subset.txt", dtype=np.int64)
    data = load_dataset("synthetic", limit_train=200, limit_test=60, image_size=16)
    assert np.array_equal(indices, balanced_subset(data.train.labels, 0.1, 0))
    counts = np.bincount(data.train.labels[indices], minlength=10)
    expected = np.round(0.1 * np.bincount(data.train.labels, minlength=10))
    assert counts.tolist() == expected.astype(int).tolist()
    m = art.metrics
    assert m["subset_size"] == len(indices) and m["steps"] == 2 and m["batch"] == 8
    assert 0 <= m["top1"] <= m["top5"] <= 1
    assert m["head_lr"] == m["backbone_lr"] == pytest.approx(0.1 * 8 / 256)  # lr * batch / 256, one lr
    assert "fine-tuned top-1" in result.err and "frozen linear top-1 (same labels)" in result.err
    assert 0 <= m["frozen_linear_top1"] <= m["frozen_linear_top5"] <= 1

    # The random-init baseline on the same images: via the artifact (or its subset.txt), or the same seed.
    base = cli("eval", "semi", "random:resnet18", "synthetic", *SMALL, "--workdir", tmp_path, "--subset",
               art.path,
               "--max-steps", "1", "--batch-size", "8", "--quiet")
    assert base.code == 0, base.err
    base_art = load_artifact(base.last_line)
    assert base_art.metrics["subset_sha256"] == m["subset_sha256"]
    # auto defaults, resolved in the record: a probe head for learned weights, a zero head for random
    # init; at 16 px the crops keep at least 30% of the image.
    assert (art.config["head_init"], base_art.config["head_init"]) == ("probe", "zero")
    assert art.config["crop_min_scale"] == base_art.config["crop_min_scale"] == [0.3]
    assert base_art.config["subset"]["source"] == "artifact"
    same_seed = cli("eval", "semi", "random:resnet18", *args, "--quiet", "--save-weights")
    assert same_seed.code == 0, same_seed.err
    assert load_artifact(same_seed.last_line).metrics["subset_sha256"] == m["subset_sha256"]
    assert (Path(same_seed.last_line) / "finetuned.safetensors").exists()
    # A subset made for other training data is refused.
    other = cli("eval", "semi", "random:resnet18", "synthetic", "--limit-train", "150", "--image-size", "16",
                "--workdir", tmp_path, "--subset", art.path, "--width", "0.25")
    assert other.code == 2 and "indexes another training split" in other.err


def write_imagefolder(root: Path, per_split=(12, 6, 6), classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n // len(classes) * 1 + 2):
                noise = rng.integers(0, 40, (16, 16, 3), dtype=np.uint8)
                image = np.full((16, 16, 3), 60 * c, np.uint8) + noise
                cv2.imwrite(str(folder / f"{i}.png"), image)


def test_transfer_several_encoders_and_datasets(tmp_path, cli, monkeypatch):
    write_imagefolder(tmp_path / "folder")
    pre = make_pretrain(tmp_path)
    sizes = []
    real = probe.fit_logistic

    def spy(features, labels, l2, **kw):
        sizes.append(len(features))
        return real(features, labels, l2, **kw)

    monkeypatch.setattr(probe, "fit_logistic", spy)
    result = cli("eval", "transfer", pre.path, "random:resnet18", "synthetic",
                 f"imagefolder:{tmp_path / 'folder'}",
                 *SMALL, "--workdir", tmp_path, "--l2-grid", "1e-3:1:4", "--metric", "mean-per-class")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="transfer")
    rows = art.metrics["rows"]
    assert [(r["encoder"], r["dataset"].split(":")[0]) for r in rows] == [
        ("pretrain/tiny (relicv2)", "synthetic"), ("pretrain/tiny (relicv2)", "imagefolder"),
        ("random:resnet18", "synthetic"), ("random:resnet18", "imagefolder")]
    syn, folder = rows[0], rows[1]
    assert syn["val_source"].startswith("carved 0.2")
    assert syn["n_train"] + syn["n_val"] == 200 == syn["refit_count"]
    assert folder["val_source"] == "split" and (folder["n_train"], folder["n_val"]) == (18, 12)
    assert folder["refit_count"] == 30 and folder["n_test"] == 12
    # Per (encoder, dataset): 4 grid fits on train, then one refit on train + val.
    assert sizes == [160] * 4 + [200] + [18] * 4 + [30] + [160] * 4 + [200] + [18] * 4 + [30]
    assert all(r["metric"] == "mean-per-class" and r["score"] == r["mean_per_class"] for r in rows)
    assert "(relicv2)" in result.err and "random:resnet18" in result.err  # side by side
    assert set(art.metrics["mean_score"]) == {"pretrain/tiny (relicv2)", "random:resnet18"}
    assert len([p for p in art.manifest["parents"] if p["kind"] == "features"]) == 10


def test_transfer_finetune(tmp_path, cli):
    result = cli("eval", "transfer", "random:resnet18", "synthetic", *SMALL, "--workdir", tmp_path,
                 "--finetune",
                 "--max-steps", "2", "--batch-size", "32", "--quiet")
    assert result.code == 0, result.err
    row = load_artifact(result.last_line).metrics["rows"][0]
    assert row["mode"] == "finetune" and row["steps"] == 2 and row["refit_count"] == 200


def test_linear_on_cifar10(cifar_dir, tmp_path, cli):
    result = cli("eval", "linear", "random:resnet18", f"cifar10:{cifar_dir}", "--limit-train", "500",
                 "--limit-test",
                 "200", "--width", "0.25", "--workdir", tmp_path, "--device", "cpu", "--l2-grid", "1e-3:10:5",
                 "--quiet")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line)
    # random features beat chance
    assert art.name == "random-resnet18-cifar10-data" and art.metrics["top1"] > 0.15


def test_semi_crop_min_scale_auto_follows_the_view_size():
    from relicv2_cli.stages.semi import auto_crop_min_scale
    assert [auto_crop_min_scale(s) for s in (16, 32, 95, 96, 224)] == [0.3, 0.3, 0.3, 0.08, 0.08]
