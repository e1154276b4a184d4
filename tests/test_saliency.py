import json

import cv2
import h5py
import numpy as np
import pytest

from relicv2_cli import saliency as sal
from relicv2_cli.artifacts import Staging, load_artifact
from relicv2_cli.data import load_dataset
from relicv2_cli.errors import RelicError
from relicv2_cli.saliency import load_masks
from relicv2_cli.stages import saliency as stage
from relicv2_cli.stages.saliency import run

SMALL = dict(limit_train=64, limit_test=8)


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", limit_train=160, limit_test=8)


def clutter_scene(seed: int = 0, size: int = 64):
    """A saturated disc on grey clutter (random strokes and noise), and its true mask."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(128, 18, (size, size, 3)), 0, 255).astype(np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 1.0)
    for _ in range(12):
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        grey = int(rng.integers(70, 190))
        cv2.line(image, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), (grey, grey, grey), 1)
    truth = np.zeros((size, size), np.uint8)
    centre = (int(rng.integers(size // 3, 2 * size // 3)), int(rng.integers(size // 3, 2 * size // 3)))
    cv2.circle(truth, centre, size // 6, 1, -1)
    image[truth == 1] = (220, 60, 40)
    return image, truth


def test_salient_object_on_clutter_is_found():
    scenes = [clutter_scene(seed) for seed in range(6)]
    images = np.stack([s[0] for s in scenes])
    truth = np.stack([s[1] for s in scenes])
    _, masks = sal.compute(images, stage.DEFAULT_METHOD)
    quality = sal.evaluate(masks, truth)
    assert quality["iou"] > 0.8, quality
    assert sal.evaluate(sal.compute(images, "centre")[1], truth)["iou"] < 0.5


def test_default_beats_centre_prior_on_synthetic(synthetic):
    x, gt = synthetic.train.images, synthetic.train.masks
    default = sal.evaluate(sal.compute(x, stage.DEFAULT_METHOD)[1], gt)
    centre = sal.evaluate(sal.compute(x, "centre")[1], gt)
    assert default["iou"] > 0.7 and default["f_beta"] > 0.75, default  # measured about 0.82 / 0.87
    assert default["iou"] > centre["iou"] + 0.3


@pytest.mark.parametrize("method", sal.METHODS)
def test_every_method_shapes_ranges_and_determinism(synthetic, method):
    x = synthetic.train.images[:12]
    maps, masks = sal.compute(x, method)
    assert maps.shape == masks.shape == x.shape[:3] and maps.dtype == masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    again_maps, again_masks = sal.compute(x[::-1].copy(), method)  # order and batch do not matter
    assert np.array_equal(again_masks[::-1], masks) and np.array_equal(again_maps[::-1], maps)


def test_metrics_by_hand():
    gt = np.zeros((1, 4, 4), np.uint8)
    gt[0, :2] = 1  # 8 pixels
    pred = np.zeros_like(gt)
    pred[0, :1] = 1  # 4 pixels, all correct: precision 1, recall 0.5
    iou, f = sal.mask_scores(pred, gt)
    assert iou[0] == pytest.approx(0.5)
    assert f[0] == pytest.approx(1.3 * 0.5 / (0.3 + 0.5))
    empty = np.zeros_like(gt)
    assert sal.mask_scores(empty, empty)[0][0] == 1.0 and sal.mask_scores(empty, gt)[1][0] == 0.0
    with pytest.raises(ValueError):
        sal.split_method("centre+grabcut")


def test_otsu_binarisation_splits_two_levels():
    sal_map = np.zeros((8, 8), np.float32)
    sal_map[2:5, 2:6] = 0.9
    sal_map += np.linspace(0, 0.1, 64, dtype=np.float32).reshape(8, 8)
    assert sal.binarize(sal_map).sum() == 12


def test_real_photo_mask_covers_the_centre_more_than_the_border():
    data = pytest.importorskip("skimage.data")
    image = data.chelsea()  # a cat filling the middle of the frame
    _, masks = sal.compute(image[None], stage.DEFAULT_METHOD)
    mask = masks[0].astype(float)
    h, w = mask.shape
    centre = mask[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
    border = np.concatenate([mask[: h // 10].ravel(), mask[-h // 10 :].ravel(),
                             mask[:, : w // 10].ravel(), mask[:, -w // 10 :].ravel()]).mean()
    assert centre > 0.3 and centre > border + 0.2, (centre, border)  # measured 0.43 vs 0.03


def test_cli_writes_artifact_with_quality_and_preview(cli, tmp_path):
    result = cli("saliency", "synthetic", "--limit-train", "64", "--limit-test", "8", "--workdir", tmp_path,
                 "--workers", "1", "--quality-n", "32", "--quiet")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line, kind="saliency")
    assert art.path == tmp_path / "saliency" / "synthetic"
    assert (art.path / "preview.png").stat().st_size > 10_000
    metrics = art.metrics
    assert metrics["iou"] > metrics["centre_prior_iou"] and metrics["beats_centre_prior"] is True
    assert set(metrics["quality"]["train"]["methods"]) == set(sal.METHODS)
    assert metrics["quality"]["train"]["n"] == 32 and metrics["images_per_s"] > 0
    dataset = load_dataset("synthetic", **SMALL)
    assert art.config["splits"]["train"] == {"count": 64, "fingerprint": dataset.train.fingerprint}
    with h5py.File(art.path / "masks.h5") as f:
        assert list(f) == ["train"]
        assert f["train"]["mask"].shape == (64, 32, 32) and f["train"]["mask"].compression == "gzip"
        assert f["train"].attrs["fingerprint"] == dataset.train.fingerprint
        assert f["train"].attrs["count"] == 64
        assert f.attrs["method"] == stage.DEFAULT_METHOD and "grabcut" in json.loads(f.attrs["params"])
    masks = load_masks(art.path, dataset)
    assert masks.shape == (64, 32, 32) and masks.dtype == np.uint8
    assert np.array_equal(masks, sal.compute(dataset.train.images, stage.DEFAULT_METHOD)[1])


def test_pool_gives_the_same_masks_and_split_all(tmp_path):
    one = run("synthetic", **SMALL, workdir=tmp_path, name="one", workers=1, chunk_size=16, quality_n=0,
              quiet=True)
    two = run("synthetic", **SMALL, workdir=tmp_path, name="two", workers=2, chunk_size=16, quality_n=0,
              quiet=True,
              split="all", method="bc")
    dataset = load_dataset("synthetic", **SMALL)
    assert np.array_equal(load_masks(two.path, dataset, "train"), sal.compute(dataset.train.images, "bc")[1])
    assert load_masks(two.path, dataset, "test").shape == (8, 32, 32)
    with pytest.raises(RelicError, match="no masks for the test split"):
        load_masks(one.path, dataset, "test")


def test_mismatched_dataset_is_refused(tmp_path):
    art = run("synthetic", **SMALL, workdir=tmp_path, workers=1, quality_n=0, quiet=True, method="ft")
    with pytest.raises(RelicError, match=r"different dataset: train count 64 != 65"):
        load_masks(art.path, load_dataset("synthetic", limit_train=65, limit_test=8))
    with pytest.raises(RelicError, match=r"different dataset: train fingerprint .* seed=1"):
        load_masks(art.path, load_dataset("synthetic", **SMALL, seed=1))
    with Staging(tmp_path, "pretrain", "other") as other:
        other_art = other.commit(config={})
    with pytest.raises(RelicError, match="expected an artifact of kind 'saliency'"):
        load_masks(other_art.path, load_dataset("synthetic", **SMALL))


def test_resume_skips_finished_chunks(tmp_path, monkeypatch):
    calls, interrupt_at = [], [3]
    real = sal.compute

    def flaky(images, method, params=None, seed=0):
        calls.append(len(images))
        if len(calls) in interrupt_at:
            raise KeyboardInterrupt  # the run is interrupted while computing its third chunk
        return real(images, method, params, seed=seed)

    monkeypatch.setattr(sal, "compute", flaky)
    kwargs = dict(limit_train=80, limit_test=8, workdir=tmp_path, name="synthetic", workers=1, chunk_size=16,
                  quality_n=0, quiet=True)
    with pytest.raises(KeyboardInterrupt):
        run("synthetic", **kwargs)
    partial = tmp_path / "saliency" / ".synthetic.partial"
    with h5py.File(partial / "masks.h5") as f:
        assert f["train"]["done"][()].tolist() == [1, 1, 0, 0, 0]
    with pytest.raises(RelicError, match="pass --resume"):
        run("synthetic", **kwargs)
    with pytest.raises(RelicError, match="cannot resume: the interrupted run differs in method"):
        run("synthetic", **kwargs, resume=True, method="ft")
    calls.clear()
    interrupt_at.clear()
    art = run("synthetic", **kwargs, resume=True)
    assert calls == [16, 16, 16]  # only the three chunks not written before
    assert art.metrics["images_this_run"] == 48 and not partial.exists()
    dataset = load_dataset("synthetic", limit_train=80, limit_test=8)
    assert np.array_equal(load_masks(art.path, dataset), real(dataset.train.images, stage.DEFAULT_METHOD)[1])


def write_masks(folder, masks, scale=255, size=None):
    folder.mkdir(parents=True, exist_ok=True)
    for i, mask in enumerate(masks):
        out = (mask * scale).astype(np.uint8)
        if size is not None:
            out = cv2.resize(out, (size, size), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"{i:05d}.png"), out)


def test_import_from_dir_by_index(cli, tmp_path):
    dataset = load_dataset("synthetic", **SMALL)
    write_masks(tmp_path / "masks", dataset.train.masks, size=64)  # another model's size, resized back
    result = cli("saliency", "synthetic", "--limit-train", "64", "--limit-test", "8", "--workdir",
                 tmp_path / "runs",
                 "--from-dir", tmp_path / "masks", "--workers", "1", "--quality-n", "16", "--quiet")
    assert result.code == 0, result.err
    art = load_artifact(result.last_line)
    assert art.name == "synthetic-import" and art.config["method"] == "import"
    assert art.metrics["iou"] > 0.95 and art.metrics["quality"]["train"]["methods"]["import"]["iou"] > 0.95
    assert np.mean(load_masks(art.path, dataset) == dataset.train.masks) > 0.99


def test_import_missing_or_unreadable_mask_is_named(cli, tmp_path):
    dataset = load_dataset("synthetic", **SMALL)
    write_masks(tmp_path / "masks", dataset.train.masks, scale=1)  # {0, 1} PNGs are accepted too
    (tmp_path / "masks" / "00017.png").unlink()
    args = ("saliency", "synthetic", "--limit-train", "64", "--limit-test", "8", "--workdir",
            tmp_path / "runs",
            "--from-dir", tmp_path / "masks", "--workers", "1")
    result = cli(*args)
    assert result.code == 2
    assert "missing mask for train image 17" in result.err and "00017.png" in result.err
    assert len(result.err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()  # nothing written on bad input
    (tmp_path / "masks" / "00017.png").write_bytes(b"not a png")
    result = cli(*args)
    assert result.code == 2 and "unreadable mask" in result.err and "00017.png" in result.err
    assert not (tmp_path / "runs").exists()


def test_import_by_file_name_for_imagefolder(tmp_path):
    root = tmp_path / "photos"
    names = []
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(5):
            image, truth = clutter_scene(seed=len(names), size=40)
            cv2.imwrite(str(root / c / f"{c}{k}.jpg"), image[..., ::-1])
            mask_dir = tmp_path / "masks" / c
            mask_dir.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mask_dir / f"{c}{k}.png"), truth * 255)
            names.append((c, k))
    art = run(f"imagefolder:{root}", from_dir=tmp_path / "masks", workdir=tmp_path / "runs", workers=1,
              quiet=True)
    dataset = load_dataset(f"imagefolder:{root}")
    masks = load_masks(art.path, dataset)
    for i, file in enumerate(dataset.train.files):
        folder, stem = file.split("/")[-2], file.split("/")[-1][:-4]
        expected = cv2.imread(str(tmp_path / "masks" / folder / (stem + ".png")), 0)
        assert np.array_equal(masks[i], (expected > 127).astype(np.uint8))


def test_bad_input_changes_nothing(cli, tmp_path):
    result = cli("saliency", "synthetic", "--method", "magic", "--workdir", tmp_path)
    assert result.code == 2 and "--method must be one of" in result.err
    result = cli("saliency", "synthetic", "--split", "val", "--workdir", tmp_path)
    assert result.code == 2 and "--split must be one of" in result.err
    result = cli("saliency", "synthetic", "--from-dir", tmp_path / "nope", "--workdir", tmp_path)
    assert result.code == 2 and "is not a directory" in result.err
    assert list(tmp_path.iterdir()) == []


def test_cifar10_masks_and_refusal_of_other_limits(cifar_dir, tmp_path):
    art = run(f"cifar10:{cifar_dir}", limit_train=64, limit_test=8, workdir=tmp_path, workers=1, quiet=True)
    assert art.name == "cifar10" and "quality" not in art.metrics  # no ground truth on CIFAR
    dataset = load_dataset(f"cifar10:{cifar_dir}", limit_train=64, limit_test=8)
    masks = load_masks(art.path, dataset)
    assert masks.shape == (64, 32, 32) and 0.02 < masks.mean() < 0.6
    with pytest.raises(RelicError, match=r"train count 64 != 128 .*limit_train=128"):
        load_masks(art.path, load_dataset(f"cifar10:{cifar_dir}", limit_train=128, limit_test=8))
