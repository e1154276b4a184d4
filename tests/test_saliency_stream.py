"""Saliency masks of streamed sets (image folders, prepared sets): one PNG per image at the image's own
size, computed a chunk at a time in loader workers; streamed pretraining applies them in its workers."""

import os
import signal
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file

from relicv2_cli import saliency as sal
from relicv2_cli import stream
from relicv2_cli.augment import ViewConfig
from relicv2_cli.data import Split, load_dataset
from relicv2_cli.errors import RelicError
from relicv2_cli.stages import saliency as stage
from relicv2_cli.stages.prepare import run as prepare
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain

METHOD = stage.DEFAULT_METHOD


def scene(rng: np.random.Generator, h: int, w: int, colour: tuple) -> np.ndarray:
    """A coloured ellipse on grey noise (BGR), so that the masks have a foreground."""
    image = np.clip(rng.normal(128, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    centre = (int(rng.integers(w // 3, 2 * w // 3 + 1)), int(rng.integers(h // 3, 2 * h // 3 + 1)))
    cv2.ellipse(image, centre, (max(2, w // 5), max(2, h // 5)), 0, 0, 360, colour, -1)
    return image


def write_folder(root: Path, per_class: int = 6, sizes=(20, 61)) -> Path:
    """Three classes of JPEGs of mixed sizes (sides in `sizes`) and aspect ratios."""
    rng = np.random.default_rng(0)
    for name, colour in (("cat", (220, 60, 40)), ("dog", (40, 60, 220)), ("owl", (40, 200, 60))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(*sizes, 2)
            cv2.imwrite(str(root / name / f"{i:02d}.jpg"), scene(rng, h, w, colour))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("jpegs") / "pets")


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory) -> Path:
    return prepare(f"imagefolder:{folder}", workdir=tmp_path_factory.mktemp("runs"), max_side=24, workers=1,
                   quiet=True).path


@pytest.fixture(scope="module")
def folder_masks(folder, tmp_path_factory):
    return stage.run(f"imagefolder:{folder}", workdir=tmp_path_factory.mktemp("runs"), quiet=True, workers=1)


def rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def stored_masks(art, split: str = "train") -> list[np.ndarray]:
    """The masks as docs/saliency.md reads them with plain h5py + OpenCV."""
    with h5py.File(art.path / "masks.h5", "r") as f:
        assert f.attrs["layout"] == "per-image" and f[split]["done"][()].all()
        group = f[split]
        masks = [cv2.imdecode(png, cv2.IMREAD_GRAYSCALE) for png in group["mask"]]
        assert [m.shape for m in masks] == list(zip(group["height"][()], group["width"][()], strict=True))
        assert group["foreground"][()].tolist() == [int(m.sum()) for m in masks]
    return masks


def test_folder_and_prepared_sets_get_one_mask_per_image_at_its_size(folder, prepared, folder_masks,
                                                                      tmp_path):
    for spec, art in ((f"imagefolder:{folder}", folder_masks),
                      (f"prepared:{prepared}", stage.run(f"prepared:{prepared}", workdir=tmp_path, quiet=True,
                                                         workers=2))):
        split = load_dataset(spec).train
        masks = stored_masks(art)
        assert len(masks) == len(split) == 15 and art.config["layout"] == "per-image"
        images = [rgb(split.encoded(i)) for i in range(len(split))]
        assert len({image.shape for image in images}) > 5  # mixed sizes, each mask at its image's
        for image, mask in zip(images, masks, strict=True):
            assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1}
            # the in-memory computation of the same pixels
            assert np.array_equal(mask, sal.compute(image[None], METHOD)[1][0])
        fraction = sum(int(m.sum()) for m in masks) / sum(m.size for m in masks)
        assert 0.05 < fraction < 0.6 and art.metrics["foreground_fraction"] == pytest.approx(fraction)
        assert (art.path / "preview.png").exists()
    # prepared images are the folder's shrunk to 24 px at most on the shorter side
    assert max(min(m.shape) for m in masks) == 24


def test_streamed_masks_equal_the_in_memory_stage_on_same_size_images(tmp_path):
    root = tmp_path / "square"
    rng = np.random.default_rng(1)
    (root / "a").mkdir(parents=True)
    for i in range(10):
        cv2.imwrite(str(root / "a" / f"{i}.png"), scene(rng, 28, 28, (200, 50, 50)))
    spec = f"imagefolder:{root}"
    streamed = stage.run(spec, workdir=tmp_path, quiet=True, workers=2)
    # --image-size at the images' own size decodes the split whole: today's array layout
    in_memory = stage.run(spec, workdir=tmp_path, name="array", quiet=True, workers=1, image_size=28)
    with h5py.File(in_memory.path / "masks.h5", "r") as f:
        assert f.attrs["layout"] == "array" and f["train"]["mask"].shape == (8, 28, 28)
        array_masks = f["train"]["mask"][()]
    assert np.array_equal(np.stack(stored_masks(streamed)), array_masks)
    # an in-memory run of the folder stacks the per-image masks
    dataset = load_dataset(spec)
    assert np.array_equal(sal.load_masks(streamed.path, dataset), array_masks)


def test_interrupted_streamed_saliency_resumes_to_the_same_masks(folder, folder_masks, tmp_path, monkeypatch):
    real = stage._ImageChunks.__getitem__

    def stop_at_chunk_2(self, k):
        if self.tasks[k][1] == 2:
            raise KeyboardInterrupt
        return real(self, k)

    monkeypatch.setattr(stage._ImageChunks, "__getitem__", stop_at_chunk_2)
    monkeypatch.setattr(Split, "images", property(lambda self: pytest.fail("the split was decoded whole")))
    spec = f"imagefolder:{folder}"
    with pytest.raises(KeyboardInterrupt):
        stage.run(spec, workdir=tmp_path, quiet=True, workers=1, chunk_size=4)
    with h5py.File(tmp_path / "saliency" / ".imagefolder.partial" / "masks.h5", "r") as f:
        assert f["train"]["done"][()].tolist() == [1, 1, 0, 0]
    monkeypatch.setattr(stage._ImageChunks, "__getitem__", real)
    resumed = stage.run(spec, workdir=tmp_path, quiet=True, workers=2, chunk_size=4, resume=True)
    assert resumed.metrics["images_this_run"] == 7
    assert all(np.array_equal(a, b) for a, b in zip(stored_masks(resumed), stored_masks(folder_masks),
                                                   strict=True))


def test_masks_of_other_data_are_refused_naming_both_fingerprints(folder, folder_masks, tmp_path):
    other = write_folder(tmp_path / "other")
    first = other / "cat" / "00.jpg"
    cv2.imwrite(str(first), 255 - cv2.imread(str(first)))  # same count, one image differs
    data = load_dataset(f"imagefolder:{other}")
    ours = folder_masks.manifest["config"]["splits"]["train"]["fingerprint"]
    with pytest.raises(RelicError) as error:
        run_pretrain(tiny(other, saliency=str(folder_masks.path), max_steps=1), workdir=tmp_path, quiet=True)
    message = str(error.value)
    assert "\n" not in message and "made for a different dataset: train fingerprint" in message
    assert ours[:12] in message and data.train.fingerprint[:12] in message
    # the same refusal in memory
    with pytest.raises(RelicError, match=f"{ours[:12]}… != {data.train.fingerprint[:12]}…"):
        sal.load_masks(folder_masks.path, load_dataset(f"imagefolder:{other}"))


def test_masked_large_crop_equals_the_mask_applied_by_hand_then_cropped(folder, folder_masks):
    split = load_dataset(f"imagefolder:{folder}").train
    data, mask = split.encoded(3), stored_masks(folder_masks)[3]
    cfg = ViewConfig(large_crops=2, small_crops=2, large_size=16, small_size=8, mask_prob=1.0)
    large, small, masked = stream.crop_image(data, "x", cfg, stream.image_generator(0, 4, 1), mask=mask)
    assert masked.tolist() == [True, True]
    # by hand: the same draws (boxes, then one coin per large crop), the full image times its mask
    g = stream.image_generator(0, 4, 1)
    h, w = mask.shape
    boxes = np.concatenate([stream.crop_boxes(2, h, w, cfg.large_scale, cfg.ratio, g),
                            stream.crop_boxes(2, h, w, cfg.small_scale, cfg.ratio, g)])
    assert g.random() < 1.0 and g.random() < 1.0
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    cut = bgr * mask[..., None]
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        source, out, size = (cut, large[k], 16) if k < 2 else (bgr, small[k - 2], 8)
        expected = cv2.cvtColor(stream.resize(source[y1:y2, x1:x2], size, size), cv2.COLOR_BGR2RGB)
        assert np.array_equal(out, expected)
    assert (large == 0).all(axis=-1).any() and not (small == 0).all(axis=-1).any()  # black background
    # a mask under --mask-min-area is not applied: the crops of no mask at all
    tiny_mask = np.zeros_like(mask)
    tiny_mask[0, 0] = 1
    plain = stream.crop_image(data, "x", cfg, stream.image_generator(0, 4, 1))
    small_area = stream.crop_image(data, "x", cfg, stream.image_generator(0, 4, 1), mask=tiny_mask)
    assert small_area[2].tolist() == [False, False]
    assert all(np.array_equal(a, b) for a, b in zip(plain[:2], small_area[:2], strict=True))
    with pytest.raises(RelicError, match=f"the saliency mask of x is {w}x{h - 1} but the image is {w}x{h}"):
        stream.crop_image(data, "x", cfg, stream.image_generator(0, 4, 1), mask=mask[1:])


def tiny(folder: Path, **changes) -> PretrainConfig:
    settings = dict(spec=f"imagefolder:{folder}", arch="resnet18", width=0.25, proj_hidden=32, proj_dim=16,
                    batch_size=5, n_negatives=4, large_size=16, small_size=8, epochs=3.0, warmup_epochs=0.5,
                    log_every=1, eval_every=0, in_memory="no", workers=0, precision="fp32",
                    deterministic=True, mask_prob=0.5)
    return PretrainConfig(**{**settings, **changes})


def test_streamed_pretrain_with_saliency_resumes_exactly(folder, folder_masks, tmp_path, monkeypatch):
    seen = []
    real = stream.StepCrops.__getitem__
    monkeypatch.setattr(stream.StepCrops, "__getitem__", lambda self, step: seen.append(real(self, step)) or
                        seen[-1])
    cfg = tiny(folder, saliency=str(folder_masks.path), max_steps=3)
    whole = run_pretrain(cfg, workdir=tmp_path, name="whole", quiet=True)
    assert [p["path"] for p in whole.manifest["parents"]] == [str(folder_masks.path.resolve())]
    masked = torch.cat([item[2].flatten() for item in seen])
    assert masked.any() and not masked.all()  # p_m = 0.5 of 2 x 5 large crops per step

    def kill_at_2(step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(typer.Exit):
        run_pretrain(cfg, workdir=tmp_path, name="cut", quiet=True, step_callback=kill_at_2)
    resumed = run_pretrain(tiny(folder, saliency=str(folder_masks.path), max_steps=3, workers=2),
                           workdir=tmp_path, name="cut", resume=True, quiet=True)
    a, b = (load_file(art.path / "backbone.safetensors") for art in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
