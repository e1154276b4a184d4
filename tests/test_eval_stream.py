"""Streamed evaluation (issue 13, item 4): image folders and prepared sets are decoded a chunk at a
time and given the release's centre view (shorter side to size / crop fraction, centre crop), never
decoded whole; array sets keep the view and the cache names they had."""

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from jpeg_images import smooth_image

from relicv2_cli import stream
from relicv2_cli.artifacts import load_artifact
from relicv2_cli.augment import IMAGENET_MEAN, IMAGENET_STD, ViewConfig, center_view, normalize
from relicv2_cli.data import Split, decode_bytes, load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.features import extract_features, features_key, features_name, read_features
from relicv2_cli.finetune import evaluate_network, finetune
from relicv2_cli.knn import encode_images
from relicv2_cli.stages.prepare import run as prepare

# (height, width): both orientations, squares, 20-60 px
SIZES = [(40, 60), (60, 30), (33, 33), (20, 50), (24, 40), (50, 22), (36, 48), (58, 58)]
TINY = ["--arch", "resnet18", "--width", "0.25", "--stem", "imagenet", "--precision", "fp32",
        "--workers", "0"]



@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """train/ (8 per class) + val/ (4 per class), classes cat and dog, JPEGs of mixed sizes."""
    root = tmp_path_factory.mktemp("eval-stream") / "photos"
    seed = 0
    for split, n in (("train", 8), ("val", 4)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                image = smooth_image(*SIZES[(i + 3 * c) % 8], seed)
                cv2.imwrite(str(root / split / name / f"{i}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, 95])
                seed += 1
    return root


@pytest.fixture(scope="module")
def prepared_photos(photos) -> Path:
    """The same folder after `data prepare --max-side 0` (sizes kept; JPEG re-encoded at quality 95)."""
    return prepare(f"imagefolder:{photos}", workdir=photos.parent / "runs", max_side=0, workers=1,
                   quiet=True).path


@pytest.fixture
def no_whole_split(monkeypatch):
    """Decoding a whole split (Split.images) fails the test."""
    def whole(self):
        raise AssertionError("a streamed path decoded the whole split")

    monkeypatch.setattr(Split, "images", property(whole))


def fp64_encoder(seed: int = 0):
    encoder = load_encoder("random:resnet18", width=0.25, stem="imagenet", seed=seed)
    encoder.model.double()
    return encoder


def decoded(split: Split, i: int) -> np.ndarray:
    return decode_bytes(split.encoded(i))[1]


# ---------------------------------------------------------------------------------------------------
# The view


def test_center_view_resizes_the_shorter_side_then_crops_the_centre_by_hand():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (1, 3, 30, 50), dtype=np.uint8))
    view = center_view(image, 16, crop_fraction=0.8)
    # By hand: shorter side 30 -> round(16 / 0.8) = 20, longer 50 -> round(50 * 20 / 30) = 33;
    # crop offsets top (20 - 16) // 2 = 2, left (33 - 16) // 2 = 8.
    resized = F.interpolate(image.double() / 255, size=(20, 33), mode="bilinear", align_corners=False,
                            antialias=True)
    expected = normalize(resized[..., 2:18, 8:24].clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD)
    assert view.shape == (1, 3, 16, 16)
    torch.testing.assert_close(view.double(), expected, rtol=0, atol=1e-5)
    # torchvision's Resize(20) + CenterCrop(16) on the same tensor: the same view.
    theirs = TF.center_crop(TF.resize(image.float() / 255, 20, antialias=True), 16).clamp(0, 1)
    torch.testing.assert_close(view.double(), normalize(theirs, IMAGENET_MEAN, IMAGENET_STD).double(), rtol=0,
                               atol=1e-5)


def test_a_square_image_at_the_resized_side_is_only_cropped():
    image = torch.arange(3 * 20 * 20).remainder(256).to(torch.uint8).reshape(1, 3, 20, 20)
    view = center_view(image, 16, crop_fraction=0.8)  # 16 / 0.8 = 20: no resampling, rows/columns 2..17
    assert torch.equal(view, normalize(image[..., 2:18, 2:18].float() / 255, IMAGENET_MEAN, IMAGENET_STD))


# ---------------------------------------------------------------------------------------------------
# Array sets: the same features and the same cache names as before the crop fraction existed


def test_array_sets_keep_their_features_and_cache_names(tmp_path):
    dataset = load_dataset("synthetic", limit_train=8, limit_test=6, image_size=24)
    encoder = load_encoder("random:resnet18", width=0.25, seed=0)
    art = extract_features(encoder, dataset, "test", workdir=tmp_path, precision="fp32", device="cpu",
                           quiet=True)
    assert art.config["crop_fraction"] == 1.0 and art.config["image_size"] == 24
    # The name of the key as it was computed before --crop-fraction: cached features stay valid.
    old = {"encoder": encoder.key, "split_fingerprint": dataset.test.fingerprint, "split": "test", "size": 24,
           "precision": "fp32", "view": "center"}
    old_body = json.dumps(old, sort_keys=True)
    assert art.path.name == features_name(encoder, "test", hashlib.sha256(old_body.encode()).hexdigest())
    # The old view of 24 px images at the encoder's own 24 px: [0, 1] and ImageNet mean/std, no resize.
    x = torch.from_numpy(dataset.test.images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        expected = encoder.model.eval()(normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    assert np.array_equal(read_features(art).features, expected.numpy())


def test_crop_fraction_enters_the_cache_key_and_is_checked(tmp_path, cli, photos):
    encoder = load_encoder("random:resnet18", width=0.25, seed=0)
    keys = {f: features_key(encoder, "fp", "test", 32, "bf16", f) for f in (1.0, 0.875, 0.5)}
    assert len(set(keys.values())) == 3
    common = ["eval", "features", "random:resnet18", f"imagefolder:{photos}", "--split", "test",
              "--workdir", tmp_path, *TINY]
    auto = cli(*common)
    half = cli(*common, "--crop-fraction", "0.5")
    assert auto.code == half.code == 0, auto.err + half.err
    assert auto.last_line != half.last_line
    assert load_artifact(auto.last_line).config["crop_fraction"] == 0.875
    assert load_artifact(half.last_line).config["crop_fraction"] == 0.5
    # A name given by hand that holds the other crop fraction is refused, naming both.
    cli(*common, "--name", "mine")
    other = cli(*common, "--name", "mine", "--crop-fraction", "0.5")
    assert other.code == 2 and "crop fraction 0.875, not 224 px / fp32 / crop fraction 0.5" in other.err
    for bad in ("0", "1.5", "wide"):
        result = cli(*common, "--crop-fraction", bad)
        assert result.code == 2
        assert f"--crop-fraction must be auto or a number in (0, 1], got '{bad}'" in result.err
        assert len(result.err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------
# Streamed features: the same as the decoded images' in memory, whatever the chunk


def test_streamed_views_and_features_equal_the_in_memory_ones(photos):
    split = load_dataset(f"imagefolder:{photos}").train
    encoder = fp64_encoder()
    views = stream.CenterViews(split, 16, 0.875)
    streamed = stream.encode_streamed(encoder.model, stream.StreamedImages(split, workers=0), image_size=16,
                                      device=torch.device("cpu"), precision="fp64", batch_size=5,
                                      crop_fraction=0.875)
    for i in range(len(split)):
        image = decoded(split, i)  # the in-memory path, one image at a time (the sizes differ)
        in_memory = torch.from_numpy(image).permute(2, 0, 1)[None]
        assert torch.equal(views[i], center_view(in_memory, 16, crop_fraction=0.875)[0])
        features = encode_images(encoder.model, image[None], image_size=16, device=torch.device("cpu"),
                                 precision="fp64", crop_fraction=0.875)
        torch.testing.assert_close(streamed[i].double(), features[0].double(), rtol=0, atol=1e-6)


def test_chunks_smaller_than_the_split_give_the_same_features(photos):
    split = load_dataset(f"imagefolder:{photos}").train
    encoder = fp64_encoder()

    def features(batch_size: int, workers: int) -> torch.Tensor:
        return stream.encode_streamed(encoder.model, stream.StreamedImages(split, workers=workers),
                                      image_size=20, device=torch.device("cpu"), precision="fp64",
                                      batch_size=batch_size, crop_fraction=0.875)

    one_chunk = features(64, 0)
    assert one_chunk.shape == (16, encoder.feature_dim)
    torch.testing.assert_close(features(3, 2), one_chunk, rtol=0, atol=1e-6)  # 6 chunks, 2 loader workers


def test_a_bad_image_is_a_one_line_error_naming_it(tmp_path, photos):
    root = shutil.copytree(photos, tmp_path / "photos")
    bad = root / "train" / "dog" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:-100])  # the end of the scan and the end-of-image marker lost
    split = load_dataset(f"imagefolder:{root}").train
    with pytest.raises(RelicError, match=f"^truncated image {bad} \\(use --skip-bad to skip such files\\)$"):
        stream.encode_streamed(load_encoder("random:resnet18", width=0.25).model,
                               stream.StreamedImages(split, workers=0), image_size=16,
                               device=torch.device("cpu"), precision="fp32")


# ---------------------------------------------------------------------------------------------------
# The commands: no --image-size, never the whole split decoded


def test_features_of_the_folder_and_its_prepared_copy_agree(tmp_path, cli, photos, prepared_photos,
                                                            no_whole_split):
    paths = {}
    for spec in (f"imagefolder:{photos}", f"prepared:{prepared_photos}"):
        result = cli("eval", "features", "random:resnet18", spec, "--split", "test", "--workdir", tmp_path,
                     *TINY)
        assert result.code == 0, result.err
        assert "mixed sizes: centre views of 224 px" in result.err
        paths[spec] = result.last_line
    folder, prepared = (read_features(p) for p in paths.values())
    config = load_artifact(paths[f"prepared:{prepared_photos}"]).config
    assert config["image_size"] == 224 and config["crop_fraction"] == 0.875
    assert np.array_equal(folder.labels, prepared.labels)
    # prepared re-encodes each JPEG (quality 95): close, not equal
    cosine = (folder.features * prepared.features).sum(1) / np.linalg.norm(folder.features, axis=1) / \
        np.linalg.norm(prepared.features, axis=1)
    assert cosine.min() > 0.99
    other = read_features(cli("eval", "features", "random:resnet18", f"imagefolder:{photos}", "--split",
                              "test", "--workdir", tmp_path, *TINY, "--seed", "1").last_line)
    assert np.abs(other.features - folder.features).max() > 10 * np.abs(prepared.features -
                                                                        folder.features).max()


def test_linear_neighbors_ratios_and_embed_stream(tmp_path, cli, photos, prepared_photos, no_whole_split):
    for spec in (f"imagefolder:{photos}", f"prepared:{prepared_photos}"):
        linear = cli("eval", "linear", "random:resnet18", spec, "--workdir", tmp_path, *TINY,
                     "--max-iter", "20", "--l2-grid", "1e-3,1e-1")
        assert linear.code == 0, linear.err
        art = load_artifact(linear.last_line)
        assert art.manifest["metrics"]["top1"] >= 0 and art.config["crop_fraction"] == 0.875
        assert art.manifest["dataset"]["test_count"] == 8
        neighbors = cli("analyze", "neighbors", "random:resnet18", spec, "--workdir", tmp_path, *TINY,
                        "--per-class", "2", "--k", "2")
        assert neighbors.code == 0, neighbors.err
        assert load_artifact(neighbors.last_line).config["crop_fraction"] == 0.875
        ratios = cli("analyze", "ratios", "random:resnet18", spec, "--workdir", tmp_path, *TINY)
        assert ratios.code == 0, ratios.err
        transfer = cli("eval", "transfer", "random:resnet18", spec, "--workdir", tmp_path, *TINY,
                       "--max-iter", "20", "--l2-grid", "1e-3,1e-1")
        assert transfer.code == 0, transfer.err
        assert load_artifact(transfer.last_line).manifest["metrics"]["rows"][0]["crop_fraction"] == 0.875
    out = tmp_path / "test.h5"
    embedded = cli("embed", "random:resnet18", f"prepared:{prepared_photos}", "--split", "test", "--out", out,
                   *TINY)
    assert embedded.code == 0, embedded.err
    with h5py.File(out) as f:
        assert f.attrs["crop_fraction"] == 0.875 and f.attrs["image_size"] == 224
        embeddings = f["embeddings"][...]
    test_features = [p for p in load_artifact(linear.last_line).manifest["parents"]
                     if p["kind"] == "features" and "-test-" in Path(p["path"]).name]
    assert np.array_equal(embeddings, read_features(test_features[0]["path"]).features)


def test_semi_streams_the_crops_of_its_labelled_images_only(tmp_path, cli, photos, monkeypatch,
                                                             no_whole_split):
    cropped = []
    real = stream.crop_image

    def spy(data, name, *args, **kw):
        cropped.append(name)
        return real(data, name, *args, **kw)

    monkeypatch.setattr(stream, "crop_image", spy)
    result = cli("eval", "semi", "random:resnet18", f"imagefolder:{photos}", "--fraction", "0.5",
                 "--epochs", "1,2", "--val-fraction", "0.5", "--max-steps", "1", "--batch-size", "2",
                 "--workdir", tmp_path, *TINY)
    assert result.code == 0, result.err
    assert "labelled images streamed: images of mixed sizes (in memory they need --image-size)" in result.err
    art = load_artifact(result.last_line)
    subset = [int(line) for line in art.file("subset.txt").read_text().split() if not line.startswith("#")]
    assert len(subset) == 8 and art.config["streamed"] is True  # 4 of 8 per class
    train = load_dataset(f"imagefolder:{photos}").train
    # two candidates and the final fine-tune, one step of 2 crops each, all of labelled images
    assert len(cropped) == 6 and set(cropped) <= {train.files[i] for i in subset}
    assert len(art.metrics["selection"]) == 2 and art.metrics["steps"] == 1
    assert art.config["crop_fraction"] == 0.875


def test_semi_of_one_size_images_decodes_the_labelled_ones_in_memory(tmp_path, cli, photos, monkeypatch):
    root = tmp_path / "squares"
    for c in ("cat", "dog"):
        for split in ("train", "test"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                cv2.imwrite(str(root / split / c / f"{i}.jpg"), smooth_image(24, 24, i))
    rows = []
    real = stream.decode_rows

    def counted(split, indices, side):
        rows.extend(int(i) for i in indices)
        return real(split, indices, side)

    monkeypatch.setattr(stream, "decode_rows", counted)
    result = cli("eval", "semi", "random:resnet18", f"imagefolder:{root}", "--fraction", "0.5",
                 "--epochs", "1", "--batch-size", "2", "--workdir", tmp_path / "runs", *TINY)
    assert result.code == 0, result.err
    assert "labelled images in memory: decoded training data" in result.err
    art = load_artifact(result.last_line)
    subset = [int(line) for line in art.file("subset.txt").read_text().split() if not line.startswith("#")]
    assert sorted(rows) == subset and len(subset) == 4 and art.config["streamed"] is False


def test_stream_rows_of_a_split_reads_those_rows(photos):
    split = load_dataset(f"imagefolder:{photos}").train
    part = stream.rows_of(split, np.array([5, 2, 9]))
    assert len(part) == 3 and list(part.labels) == [int(split.labels[i]) for i in (5, 2, 9)]
    assert part.files == [split.files[i] for i in (5, 2, 9)]
    assert part.encoded(1) == split.encoded(2)
    assert stream.rows_of(part, [2]).encoded(0) == split.encoded(9)


def test_stream_decode_rows_squares_mixed_sizes_at_the_view_side(photos):
    split = load_dataset(f"imagefolder:{photos}").train
    images = stream.decode_rows(split, [0, 1], 20)
    assert images.shape == (2, 20, 20, 3) and images.dtype == np.uint8
    # image 0 (40 x 60): shorter side 40 -> 20, longer 60 -> 30, centre columns 5..24
    source = torch.from_numpy(decoded(split, 0)).permute(2, 0, 1)[None].double() / 255
    expected = F.interpolate(source, size=(20, 30), mode="bilinear", align_corners=False, antialias=True)
    expected = (expected[0, :, :, 5:25].clamp(0, 1) * 255).round().permute(1, 2, 0).numpy()
    assert np.abs(images[0].astype(float) - expected).max() <= 1


@pytest.fixture(scope="module")
def photos_with_val(photos) -> Path:
    """train/ (8 per class), val/ (4 per class) and test/ (val/'s images again): a validation split."""
    root = photos.parent / "photos-with-val"
    for split, source in (("train", "train"), ("val", "val"), ("test", "val")):
        shutil.copytree(photos / source, root / split)
    return root


@pytest.mark.parametrize("command", [["eval", "linear", "--protocol", "augment"],
                                     ["eval", "transfer", "--finetune"]])
def test_fine_tuning_on_mixed_sizes_streams_its_crops(tmp_path, cli, photos_with_val, command,
                                                      no_whole_split):
    stage, *flags = command[1:]
    spec = f"imagefolder:{photos_with_val}"
    result = cli(command[0], stage, "random:resnet18", spec, *flags, "--workdir", tmp_path, *TINY,
                 "--max-steps", "2", "--batch-size", "4")
    assert result.code == 0, result.err
    assert "training data streamed: images of mixed sizes (in memory they need --image-size)" in result.err
    art = load_artifact(result.last_line)
    if stage == "linear":
        assert art.config["streamed"] is True and art.metrics["steps"] == 2
        assert (art.path / "classifier.safetensors").exists()
    else:
        assert art.config["streamed"] == {spec: True}
        row = art.metrics["rows"][0]
        assert row["streamed"] is True and row["steps"] == 2 and row["refit_count"] == 24  # train + val


def test_training_choice_streams_mixed_sizes_and_data_too_large_for_memory(tmp_path, photos, monkeypatch):
    # train/ of 24 px images, test/ of 48 px ones: each split of one size, mixed when joined
    for split, side in (("train", 24), ("test", 48)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(4):
                cv2.imwrite(str(tmp_path / split / c / f"{i}.jpg"), smooth_image(side, side, i))
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    ram = stream.available_ram() / 2**30
    assert stream.training_choice(dataset, [dataset.train]) == (
        False, f"decoded training data ~0.00 GiB (estimated from 8 images' sizes) <= 50% of {ram:.1f} GiB "
               "available RAM")
    assert stream.training_choice(dataset, [dataset.train, dataset.test]) == (
        True, "images of mixed sizes (in memory they need --image-size)")
    mixed = load_dataset(f"imagefolder:{photos}")
    assert stream.training_choice(mixed, [mixed.train])[0] is True
    resized = load_dataset(f"imagefolder:{photos}", image_size=16)
    assert stream.training_choice(resized, [resized.train]) == (False,
                                                                "--image-size resizes the images in memory")
    monkeypatch.setattr(stream, "available_ram", lambda: 2 * 8 * 24 * 24 * 3 - 1.0)  # 8 images decoded
    assert stream.training_choice(dataset, [dataset.train]) == (
        True, "decoded training data ~0.0 GiB (estimated from 8 images' sizes) > 50% of 0.0 GiB available "
              "RAM")


def test_streamed_crops_of_a_step_are_crop_image_flipped_after_the_workers(photos):
    split = load_dataset(f"imagefolder:{photos}").train  # 16 images
    kwargs = dict(batch=5, size=12, crop_min_scale=0.3, seed=2, device=torch.device("cpu"))
    alone = list(stream.crop_flip_steps(split, 5, workers=0, **kwargs))
    assert torch.equal(torch.cat([idx for idx, _ in alone[:4]]).sort().values, torch.arange(16))  # one epoch
    shared = stream.crop_flip_steps(split, 5, workers=1, **kwargs)
    for (idx_a, views_a), (idx_b, views_b) in zip(alone, shared, strict=True):
        assert torch.equal(idx_a, idx_b) and torch.equal(views_a, views_b)
    # By hand, step 1: each image's crop_image with its (seed, step, position) generator, then flips from a
    # generator seeded by (seed, step), then ImageNet normalisation.
    idx, views = alone[1]
    assert torch.equal(idx, stream.fine_tune_batch(1, 16, 5, 2)) and views.shape == (4, 3, 12, 12)
    cfg = ViewConfig(large_crops=1, small_crops=0, large_size=12, large_scale=(0.3, 1.0), mask_prob=0.0)
    crops = np.stack([stream.crop_image(split.encoded(int(i)), "", cfg, stream.image_generator(2, 1, p))[0][0]
                      for p, i in enumerate(idx)])
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255
    flip = torch.rand(4, generator=torch.Generator().manual_seed(2 * 1_000_003 + 1)) < 0.5
    assert 0 < flip.sum() < 4
    expected = normalize(torch.where(flip.view(4, 1, 1, 1), x.flip(-1), x), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(views, expected)


def test_streamed_fine_tuning_learns(tmp_path, no_whole_split):
    """Two classes told apart by the colour of a disc (red or blue), on JPEGs of mixed sizes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("test", 8)):
        for c, colour in enumerate(((40, 40, 220), (220, 40, 40))):  # BGR: red, blue
            (tmp_path / split / str(c)).mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(28, 56, 2)
                image = np.full((h, w, 3), rng.integers(60, 200), np.uint8)
                cv2.circle(image, (int(w // 2), int(h // 2)), int(min(h, w) // 3), colour, -1)
                cv2.imwrite(str(tmp_path / split / str(c) / f"{i}.jpg"), image)
    dataset = load_dataset(f"imagefolder:{tmp_path}")
    assert stream.training_choice(dataset, [dataset.train])[0]
    encoder = load_encoder("random:resnet18", width=0.25, stem="cifar", seed=0)
    cpu = torch.device("cpu")
    net, history, _ = finetune(encoder, dataset.train, dataset.train.labels, num_classes=2, size=24,
                               epochs=6, max_steps=None, batch_size=8, lr=0.1, head_lr_scale=1.0,
                               momentum=0.9, crop_min_scale=0.3, seed=0, device=cpu, precision="fp32",
                               quiet=True, workers=0)
    scores = evaluate_network(net, stream.StreamedImages(dataset.test, workers=0), dataset.test.labels,
                              num_classes=2, size=24, device=cpu, precision="fp32", batch_size=16, quiet=True)
    assert history[-1]["step"] == 24 and scores["top1"] >= 0.9


def test_image_size_keeps_the_in_memory_path(tmp_path, photos):
    dataset = load_dataset(f"imagefolder:{photos}", image_size=24)
    assert not stream.streamed(dataset, dataset.test)
    art = extract_features(load_encoder("random:resnet18", width=0.25, stem="imagenet"), dataset, "test",
                           workdir=tmp_path, precision="fp32", device="cpu", quiet=True, workers=0)
    assert art.config["native_size"] == [24, 24] and art.config["crop_fraction"] == 0.875
