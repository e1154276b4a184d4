"""--skip-bad on streamed image folders: the listing is checked once, headers only, before anything
streams, so streamed and in-memory runs see the same images and saliency masks stay aligned."""

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from jpeg_images import smooth_image
from PIL import Image

from relicv2_cli import stream
from relicv2_cli.artifacts import load_artifact
from relicv2_cli.data import header_size, load_dataset
from relicv2_cli.encoders import load_encoder
from relicv2_cli.errors import RelicError
from relicv2_cli.stages import saliency as stage
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain
from tests.test_stream import tiny as stream_tiny


def write_folder(root: Path) -> tuple[Path, Path, Path]:
    """train/ and val/ of two classes, 4 + 2 JPEGs of 24 x 24 each; train/cat/1.jpg truncated and
    val/dog/x.jpg not an image. Returns (root, truncated, garbage)."""
    for split, n in (("train", 4), ("val", 2)):
        for c, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                cv2.imwrite(str(root / split / name / f"{i}.jpg"), smooth_image(24, 24, 10 * c + i + 100 * n))
    truncated = root / "train" / "cat" / "1.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage = root / "val" / "dog" / "x.jpg"
    garbage.write_bytes(b"not an image at all")
    return root, truncated, garbage


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path, Path]:
    return write_folder(tmp_path_factory.mktemp("bad") / "pets")


def tiny(root: Path, **changes) -> PretrainConfig:
    """test_stream's tiny run, 2 steps of batch 4 (the folder holds 7 good training images)."""
    return stream_tiny(root, **{"batch_size": 4, "n_negatives": 2, "max_steps": 2, **changes})


def test_the_listing_is_checked_before_anything_decodes(folder):
    root, truncated, garbage = folder
    dataset = load_dataset(f"imagefolder:{root}", skip_bad=True)
    assert dataset.train.skipped == [str(truncated)] and dataset.test.skipped == [str(garbage)]
    assert len(dataset.train) == 7 and str(truncated) not in dataset.train.files
    assert dataset.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert dataset.train._images is None and dataset.test._images is None  # no pixels decoded
    plain = load_dataset(f"imagefolder:{root}")
    assert len(plain.train) == 8 and plain.train.skipped == [] and not plain.train.checked
    record = dataset.record()
    assert record["skipped"] == {"train": [str(truncated)], "test": [str(garbage)]}
    # after --limit-train: the subset drawn without --skip-bad, less its bad files
    drawn = load_dataset(f"imagefolder:{root}", limit_train=4, seed=1).train.files
    kept = load_dataset(f"imagefolder:{root}", limit_train=4, seed=1, skip_bad=True).train.files
    assert drawn == [str(root / "train" / f) for f in ("cat/0.jpg", "cat/1.jpg", "dog/2.jpg", "dog/3.jpg")]
    assert kept == [f for f in drawn if f != str(truncated)]


def test_streamed_pretrain_skips_them_and_has_the_in_memory_fingerprint(folder, tmp_path):
    root, truncated, garbage = folder
    with pytest.raises(RelicError) as error:
        run_pretrain(tiny(root), workdir=tmp_path, name="plain", quiet=True)
    assert str(error.value).startswith(f"truncated image {truncated} (no end-of-image marker after its last "
                                       "scan) (use --skip-bad to skip such files) (step ")
    runs = {mode: run_pretrain(tiny(root, in_memory=mode, skip_bad=True), workdir=tmp_path, name=mode,
                               quiet=True) for mode in ("yes", "no")}
    assert runs["no"].config["streamed"] is True and runs["yes"].config["streamed"] is False
    streamed, in_memory = runs["no"].manifest["dataset"], runs["yes"].manifest["dataset"]
    assert streamed["skipped"] == {"train": [str(truncated)], "test": [str(garbage)]}
    assert streamed["train_count"] == 7 and streamed["test_count"] == 4
    assert streamed == in_memory  # the same images: the same fingerprints
    assert streamed["fingerprint"] == load_dataset(f"imagefolder:{root}", skip_bad=True).fingerprint


def test_streamed_features_embed_exactly_the_kept_images(folder, tmp_path, cli):
    root, truncated, _ = folder
    args = ["eval", "features", "random:resnet18", f"imagefolder:{root}", "--split", "train", "--width",
            "0.25", "--precision", "fp32", "--workers", "0", "--device", "cpu", "--workdir", tmp_path,
            "--quiet"]
    result = cli(*args)
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        f"error: truncated image {truncated} (no end-of-image marker after its last scan) "
        "(use --skip-bad to skip such files)"]
    result = cli(*args, "--skip-bad")
    assert result.code == 0, result.err
    art = load_artifact(result.out.strip().splitlines()[-1])
    kept = load_dataset(f"imagefolder:{root}", skip_bad=True).train
    assert art.config["count"] == len(kept) == 7
    assert art.manifest["dataset"]["split_fingerprints"]["train"] == kept.fingerprint


def test_saliency_made_with_skip_bad_is_accepted_by_a_skip_bad_pretrain(folder, tmp_path):
    root, truncated, _ = folder
    spec = f"imagefolder:{root}"
    hint = "\\(use --skip-bad to skip such files\\)"
    with pytest.raises(RelicError, match=f"^truncated image {truncated} .*{hint}$"):
        stage.run(spec, workdir=tmp_path, name="plain", quiet=True, workers=1)
    masks = stage.run(spec, workdir=tmp_path, quiet=True, workers=1, skip_bad=True)
    assert masks.config["layout"] == "per-image"  # streamed
    assert masks.config["splits"]["train"]["count"] == 7
    art = run_pretrain(tiny(root, skip_bad=True, saliency=str(masks.path), mask_prob=0.5, max_steps=1),
                       workdir=tmp_path, quiet=True)
    assert art.metrics["steps"] == 1 and art.config["streamed"] is True


def test_a_readable_header_over_undecodable_pixels_names_data_prepare(tmp_path):
    root, _, _ = write_folder(tmp_path / "pets")
    png = root / "train" / "dog" / "cut.png"
    cv2.imwrite(str(png), smooth_image(24, 24, 7))
    png.write_bytes(png.read_bytes()[:200])  # the header reads; the pixel data stops short
    split = load_dataset(f"imagefolder:{root}", skip_bad=True).train
    assert str(png) in split.files  # the header check keeps it
    hint = ("its header reads, so --skip-bad kept it: relicv2 data prepare --skip-bad decodes every image "
            "and writes a set without such files")
    with pytest.raises(RelicError, match=f"^unreadable image {png} \\({hint}\\)$"):
        stream.encode_streamed(load_encoder("random:resnet18", width=0.25).model,
                               stream.StreamedImages(split, workers=0), image_size=16,
                               device=torch.device("cpu"), precision="fp32")
    # in memory, the full decode skips it too
    assert len(split.images) == 7 and split.skipped == [str(root / "train" / "cat" / "1.jpg"), str(png)]
    assert np.array_equal(split.labels, [0, 0, 0, 1, 1, 1, 1])


def test_a_png_header_gives_the_decoded_size_without_its_pixels():
    turned = Image.Exif()
    turned[0x0112] = 6  # EXIF orientation: rotate 90 degrees
    for exif, size in ((None, (20, 10)), (turned, (10, 20))):
        out = io.BytesIO()
        Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(out, format="PNG",
                                                              **({"exif": exif} if exif else {}))
        data = out.getvalue()
        height, width = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2]
        assert header_size(data, "x.png") == (width, height) == size
        assert header_size(data[:data.index(b"IDAT") + 8], "x.png") == size  # the pixels cut off
