"""Streamed pretraining (relicv2_cli/stream.py): crops made in loader workers from encoded images,
exact resume, independence of --workers, one-line errors; make_views unchanged for in-memory runs."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import typer
from safetensors.torch import load_file

from relicv2_cli import stream
from relicv2_cli.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ViewConfig,
    augment,
    crop_resize,
    make_views,
    normalize,
    sample_boxes,
    views_from_crops,
)
from relicv2_cli.data import load_dataset
from relicv2_cli.errors import RelicError
from relicv2_cli.stages.pretrain import PretrainConfig, run_pretrain


def write_folder(root: Path, per_class: int = 20) -> Path:
    """Two classes of JPEGs, 20-60 px, mixed sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(20, 61, 2)
            image = (rng.random((h, w, 3)) * 120).astype(np.uint8)
            image[..., 2 * c] = 255  # blue cats, red dogs (BGR)
            cv2.imwrite(str(root / name / f"{i:02d}.jpg"), image)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("jpegs") / "pets")


def tiny(folder: Path, **changes) -> PretrainConfig:
    settings = dict(spec=f"imagefolder:{folder}", arch="resnet18", width=0.25, proj_hidden=32, proj_dim=16,
                    batch_size=8, n_negatives=4, large_size=16, small_size=8, epochs=2.0, warmup_epochs=0.5,
                    log_every=1, eval_every=0, in_memory="no", workers=0, precision="fp32",
                    deterministic=True)
    return PretrainConfig(**{**settings, **changes})


def backbone(art) -> dict:
    return load_file(art.path / "backbone.safetensors")


# ---------------------------------------------------------------------------------------------------
# In memory: the views of a fixed seed are those of make_views before it was split in two


def old_make_views(images, cfg, generator, masks):
    """make_views as it was before streaming (the same draws in the same order), from its parts."""
    b, _, h, w = images.shape
    x = images.float() / 255
    L, S = cfg.large_crops, cfg.small_crops
    enough = (masks != 0).flatten(1).float().mean(1) >= cfg.mask_min_area
    masked = (torch.rand((L, b), generator=generator) < cfg.mask_prob) & enough
    source = torch.cat([x, x * (masks != 0).unsqueeze(1).to(x.dtype)])
    boxes = sample_boxes(L * b, h, w, cfg.large_scale, cfg.ratio, generator, "cpu")
    index = torch.arange(b).repeat(L) + b * masked.reshape(-1).long()
    crops = crop_resize(source, boxes, index, cfg.large_size)
    presets = [cfg.presets[i % 2] for i in range(L)]
    large = normalize(augment(crops, presets, generator, cfg.blur, cfg.jitter), cfg.mean, cfg.std).chunk(L)
    boxes = sample_boxes(S * b, h, w, cfg.small_scale, cfg.ratio, generator, "cpu")
    crops = crop_resize(x, boxes, torch.arange(b).repeat(S), cfg.small_size)
    small = normalize(augment(crops, [cfg.small_preset] * S, generator, cfg.blur, cfg.jitter), cfg.mean,
                      cfg.std).chunk(S)
    return list(large), list(small), masked


def test_in_memory_views_are_bit_identical_to_the_old_make_views():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 20, 24), dtype=torch.uint8, generator=gen)
    masks = (torch.rand(6, 20, 24, generator=gen) > 0.5).to(torch.uint8)
    cfg = ViewConfig(large_crops=3, small_crops=2, large_size=12, small_size=8, mask_prob=0.5, blur=True)
    views = make_views(images, cfg, torch.Generator().manual_seed(7), masks)
    large, small, masked = old_make_views(images, cfg, torch.Generator().manual_seed(7), masks)
    assert masked.any() and torch.equal(views.masked, masked)
    for new, old in zip(views.large + views.small, large + small, strict=True):
        assert torch.equal(new, old)


def test_views_from_crops_apply_the_photometric_part_of_make_views():
    # Crops that are the whole image (box = image, size = side) make make_views' crop the identity.
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=gen)
    cfg = ViewConfig(large_crops=2, small_crops=1, large_size=8, small_size=8, large_scale=(1.0, 1.0),
                     small_scale=(1.0, 1.0), ratio=(1.0, 1.0), mask_prob=0.0, blur=True)
    views = make_views(images, cfg, torch.Generator().manual_seed(3))
    # make_views drew 10 attempts x 3 uniforms + 2 positions per box first: replay them
    replay = torch.Generator().manual_seed(3)
    sample_boxes(2 * 4, 8, 8, cfg.large_scale, cfg.ratio, replay, "cpu")
    both = [cfg.presets[0], cfg.presets[1]]
    large = normalize(augment(images.repeat(2, 1, 1, 1).float() / 255, both, replay, cfg.blur, cfg.jitter),
                      cfg.mean, cfg.std)
    sample_boxes(4, 8, 8, cfg.small_scale, cfg.ratio, replay, "cpu")
    small = normalize(augment(images.float() / 255, [cfg.small_preset], replay, cfg.blur, cfg.jitter),
                      cfg.mean, cfg.std)
    torch.testing.assert_close(torch.cat(views.large), large, atol=1e-5, rtol=0)
    torch.testing.assert_close(views.small[0], small, atol=1e-5, rtol=0)
    # views_from_crops on those crops draws the same photometric randomness as make_views after its boxes
    g = torch.Generator().manual_seed(5)
    out = views_from_crops(images.repeat(2, 1, 1, 1), images, cfg, g)
    g2 = torch.Generator().manual_seed(5)
    ref_large = normalize(augment(images.repeat(2, 1, 1, 1).float() / 255, both, g2, cfg.blur, cfg.jitter),
                          cfg.mean, cfg.std)
    ref_small = normalize(augment(images.float() / 255, [cfg.small_preset], g2, cfg.blur, cfg.jitter),
                          cfg.mean, cfg.std)
    assert torch.equal(torch.cat(out.large), ref_large) and torch.equal(out.small[0], ref_small)
    assert not out.masked.any() and out.masked.shape == (2, 4)


# ---------------------------------------------------------------------------------------------------
# One image: crops, reduced decoding, centre views


def jpeg(image_rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image_rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def smooth_image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    wave = 128 + 100 * np.sin(x / 9) * np.cos(y / 11)
    return np.stack([255 * x / w, 255 * y / h, wave], -1).astype(np.uint8)


def test_reduction_keeps_at_least_the_output_size_across_every_box():
    boxes = np.array([[0, 0, 400, 300], [10, 10, 110, 110]])
    assert stream.reduction_for(boxes, np.array([64, 16])) == 4  # 300/64 = 4.7, 100/16 = 6.25
    assert stream.reduction_for(boxes, np.array([64, 60])) == 1  # 100/60 < 2
    assert stream.reduction_for(boxes, np.array([32, 8])) == 8
    assert stream.reduction_for(np.array([[0, 0, 40, 40]]), np.array([16])) == 2


def test_crop_boxes_are_drawn_as_torchvisions_random_resized_crop():
    from torchvision.transforms import RandomResizedCrop

    rng, n = stream.image_generator(0, 0, 0), 4000
    for height, width in ((30, 40), (300, 120)):
        ours = stream.crop_boxes(n, height, width, (0.08, 1.0), (3 / 4, 4 / 3), rng)
        torch.manual_seed(0)
        params = [RandomResizedCrop.get_params(torch.empty(3, height, width), [0.08, 1.0], [3 / 4, 4 / 3])
                  for _ in range(n)]  # (top, left, h, w)
        theirs = np.array([(j, i, j + w, i + h) for i, j, h, w in params])
        for boxes in (ours, theirs):
            assert (boxes[:, :2] >= 0).all()
            assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        stats = [(np.mean((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / (height * width),
                  np.mean(np.log((b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1]))),
                  np.mean((b[:, 0] + b[:, 2]) / 2) / width, np.mean((b[:, 1] + b[:, 3]) / 2) / height)
                 for b in (ours, theirs)]
        assert np.allclose(stats[0], stats[1], atol=0.02), stats  # area, log-aspect, centre: same law
    # no draw fits: torchvision's fallback, the whole image with its aspect ratio clamped, centred
    assert stream.crop_boxes(1, 20, 20, (1.0, 1.0), (2.0, 2.0), rng).tolist() == [[0, 5, 20, 15]]
    assert RandomResizedCrop.get_params(torch.empty(3, 20, 20), [1.0, 1.0], [2.0, 2.0]) == (5, 0, 10, 20)


def test_reduced_decoding_gives_nearly_the_crops_of_a_full_decode():
    data = jpeg(smooth_image(320, 480))
    cfg = ViewConfig(large_crops=2, small_crops=3, large_size=32, small_size=16)
    full = stream.crop_image(data, "x.jpg", cfg, stream.image_generator(0, 0, 0), reduce=False)
    fast = stream.crop_image(data, "x.jpg", cfg, stream.image_generator(0, 0, 0))
    assert [c.shape for c in full] == [(2, 32, 32, 3), (3, 16, 16, 3), (2,)]
    for a, b in zip(full, fast, strict=True):
        assert a.shape == b.shape and np.abs(a.astype(float) - b).mean() < 3  # of 255


def test_crop_boxes_follow_the_seed_and_position():
    data = jpeg(smooth_image(60, 40))
    cfg = ViewConfig(large_crops=2, small_crops=2, large_size=16, small_size=8)
    a = stream.crop_image(data, "x", cfg, stream.image_generator(0, 5, 1))
    b = stream.crop_image(data, "x", cfg, stream.image_generator(0, 5, 1))
    c = stream.crop_image(data, "x", cfg, stream.image_generator(0, 5, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_center_image_resizes_the_shorter_side_and_keeps_the_centre():
    image = np.zeros((40, 120, 3), np.uint8)
    image[:, 40:80] = 200  # the middle third, which a centre crop of the 40 x 40 squares keeps whole
    view = stream.center_image(jpeg(image), "x", 20, 1.0)
    assert view.shape == (3, 20, 20)
    std, mean = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (IMAGENET_STD, IMAGENET_MEAN))
    pixels = view.double() * std + mean
    assert abs(255 * pixels.mean().item() - 200) < 4


def test_truncated_jpeg_is_a_one_line_error_naming_the_file(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=6)
    bad = root / "dog" / "03.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])
    with pytest.raises(RelicError) as error:
        run_pretrain(tiny(root, batch_size=4, n_negatives=2, max_steps=2, epochs=1.0), workdir=tmp_path,
                     quiet=True)
    message = str(error.value)
    assert "\n" not in message and f"truncated image {bad}" in message
    assert not (tmp_path / "pretrain" / "relicv2-imagefolder-resnet18").exists()


# ---------------------------------------------------------------------------------------------------
# Step batches


def test_step_crops_do_not_depend_on_the_number_of_workers(folder):
    dataset = load_dataset(f"imagefolder:{folder}")
    cfg = ViewConfig(large_crops=2, small_crops=1, large_size=16, small_size=8)
    order = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))
    crops = stream.StepCrops(dataset.train, cfg, lambda step: order[step * 4 : step * 4 + 4], torch.arange(4),
                             seed=3)
    alone = list(stream.step_batches(crops, 1, 5, workers=0, pin=False))
    shared = list(stream.step_batches(crops, 1, 5, workers=2, pin=False))
    assert len(alone) == 4 and alone[0][0].shape == (8, 16, 16, 3) and alone[0][1].shape == (4, 8, 8, 3)
    for a, b in zip(alone, shared, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Step 2 resumed alone gives what it gave in the run from step 1; view-major rows: view 1 of image 0 at 4
    assert torch.equal(next(stream.step_batches(crops, 2, 3, 0, False))[0], alone[1][0])
    image0 = stream.crop_image(dataset.train.encoded(int(order[8])), "", cfg, stream.image_generator(3, 2, 0))
    assert np.array_equal(alone[1][0][4].numpy(), image0[0][1])
    assert torch.equal(stream.on_device(alone[1][0], torch.device("cpu"))[4], alone[1][0][4].permute(2, 0, 1))


def test_workers_leave_ctrl_c_to_the_training_process(folder):
    # Ctrl-C signals the whole process group; the training loop may need more steps' crops before it
    # stops (under torchrun it votes on log steps only), so the workers must keep working.
    dataset = load_dataset(f"imagefolder:{folder}")
    crops = stream.StepCrops(dataset.train, ViewConfig(large_crops=1, small_crops=0, large_size=8),
                             lambda step: torch.arange(4), torch.arange(4), seed=0)
    before = set(children())
    batches = stream.step_batches(crops, 0, 8, workers=2, pin=False)
    next(batches), next(batches)  # items 0 and 1: both workers are up (one item each)
    workers = sorted(set(children()) - before)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGINT)
    assert len(list(batches)) == 6


# ---------------------------------------------------------------------------------------------------
# Streamed pretraining end to end


def test_streamed_pretrain_writes_the_artifact_and_evaluates_in_chunks(folder, tmp_path):
    art = run_pretrain(tiny(folder, max_steps=3, eval_every=2), workdir=tmp_path, quiet=True)
    assert art.config["streamed"] is True and art.config["image_size"] == 16
    assert (art.path / "backbone.safetensors").exists() and art.metrics["steps"] == 3
    rows = [json.loads(line) for line in (art.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [2, 3]
    assert 0 <= rows[-1]["knn_top1"] <= 1
    assert len(art.manifest["dataset"]["fingerprint"]) == 64  # from the encoded bytes: nothing decoded


def children() -> list[int]:
    """This process's live children (the loader's workers), zombies left out."""
    pids = [int(pid) for task in Path("/proc/self/task").iterdir()
            for pid in (task / "children").read_text().split()]
    return [pid for pid in pids if alive(pid)]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone meanwhile
        return False


def wait_until_no_children(before: set[int], seconds: float = 60) -> list[int]:
    """The children still alive after up to `seconds` (a loaded machine slows the workers' exit),
    except those in `before`: processes earlier tests left running for the whole session (a
    multiprocessing pool's helpers, say)."""
    deadline = time.monotonic() + seconds
    while set(children()) - before and time.monotonic() < deadline:
        time.sleep(0.2)
    return sorted(set(children()) - before)


def test_streamed_resume_equals_an_uninterrupted_run_with_any_workers(folder, tmp_path):
    # The uninterrupted run makes its crops in the training process, the cut one in 2 workers.
    before = set(children())
    whole = run_pretrain(tiny(folder, max_steps=6), workdir=tmp_path, name="whole", quiet=True)

    def kill_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(typer.Exit) as stopped:
        run_pretrain(tiny(folder, max_steps=6, workers=2), workdir=tmp_path, name="cut", quiet=True,
                     step_callback=kill_at_3)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    # the workers ended with the loop, not when the traceback that pytest keeps is freed
    assert wait_until_no_children(before) == []
    resumed = run_pretrain(tiny(folder, max_steps=6, workers=2), workdir=tmp_path, name="cut", resume=True,
                           quiet=True)
    a, b = backbone(whole), backbone(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_streams_mixed_sizes_and_keeps_small_uniform_data_in_memory(folder, tmp_path, capsys):
    mixed = load_dataset(f"imagefolder:{folder}")
    streamed, why = stream.choose("auto", mixed, torch.device("cpu"))
    assert streamed and "mixed sizes" in why
    assert stream.choose("auto", mixed, torch.device("cpu"), image_size=16)[0] is False
    synthetic = load_dataset("synthetic", limit_train=8, limit_test=8)
    assert stream.choose("auto", synthetic, torch.device("cpu"))[0] is False
    with pytest.raises(RelicError, match="--in-memory no streams encoded images.*synthetic is decoded"):
        stream.choose("no", synthetic, torch.device("cpu"))
    uniform = tmp_path / "uniform" / "a"
    uniform.mkdir(parents=True)
    for i in range(10):
        cv2.imwrite(str(uniform / f"{i}.png"), np.full((30, 40, 3), i, np.uint8))
    streamed, why = stream.choose("auto", load_dataset(f"imagefolder:{uniform.parent}"), torch.device("cpu"))
    assert not streamed and "decoded data ~0.00 GiB (estimated from 8 images' sizes) <= 50%" in why


def test_streamed_runs_refuse_image_size(folder, tmp_path):
    with pytest.raises(RelicError, match="--image-size resizes the split decoded in memory"):
        run_pretrain(tiny(folder, image_size=16, max_steps=1), workdir=tmp_path, quiet=True)


def group_members(pgid: int) -> list[int]:
    """Live processes of process group `pgid` (zombies left out)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                members.append(int(entry.name))
    return members


def test_sigterm_to_the_process_group_checkpoints_and_resume_continues(folder, tmp_path):
    # A scheduler (or `kill -- -PGID`) signals every process of the group, the loader's workers
    # included: they must leave it to the training process, which stops at a step boundary,
    # checkpoints, ends its workers and exits 143.
    settings = dict(epochs=50.0, workers=2)  # 200 steps: far more than it runs before the signal
    script = ("import sys, typer\nsys.path.insert(0, sys.argv[1])\n"
              "from test_stream import tiny, run_pretrain\nfrom pathlib import Path\n"
              "try: run_pretrain(tiny(Path(sys.argv[2]), epochs=50.0, workers=2), workdir=Path(sys.argv[3]), "
              "name='cut', quiet=True)\n"
              "except typer.Exit as stop: sys.exit(stop.exit_code)")
    args = [sys.executable, "-c", script, str(Path(__file__).parent), str(folder), str(tmp_path)]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = tmp_path / "pretrain" / ".cut.partial" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (log.exists() and log.read_text().strip()):
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no step logged"
            time.sleep(0.05)
        assert len(group_members(proc.pid)) == 3  # the training process and its 2 workers
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "stopped by SIGTERM" in proc.stderr.read()
    deadline = time.monotonic() + 30  # nothing of the group is left (the workers ended with the loop)
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert group_members(proc.pid) == []
    stopped = torch.load(log.parent / "checkpoint.pt", weights_only=True)["step"]
    assert 1 <= stopped < 200
    resumed = run_pretrain(tiny(folder, **settings, max_steps=stopped + 2), workdir=tmp_path, name="cut",
                           resume=True, quiet=True)
    whole = run_pretrain(tiny(folder, epochs=50.0, max_steps=stopped + 2), workdir=tmp_path, name="whole",
                         quiet=True)
    a, b = backbone(whole), backbone(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_has_one_fingerprint_streamed_or_in_memory(tmp_path):
    root = tmp_path / "same"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            cv2.imwrite(str(root / c / f"{i}.jpg"), np.full((16, 16, 3), 30 * i + 100 * (c == "b"), np.uint8))
    # by hand: count and decode settings, each file's length and bytes, the labels
    train = load_dataset(f"imagefolder:{root}").train
    digest = hashlib.sha256(f"encoded {len(train)}".encode())
    for name in train.files:
        data = Path(name).read_bytes()
        digest.update(len(data).to_bytes(8, "little") + data)
    digest.update(train.labels.astype(np.int64).tobytes())
    assert train.fingerprint == digest.hexdigest() and train._images is None  # nothing decoded
    runs = {mode: run_pretrain(tiny(root, in_memory=mode, max_steps=1, batch_size=4, n_negatives=2),
                               workdir=tmp_path, name=mode, quiet=True) for mode in ("yes", "no")}
    assert runs["yes"].config["streamed"] is False and runs["no"].config["streamed"] is True
    assert runs["yes"].manifest["dataset"] == runs["no"].manifest["dataset"]
    # decoding to another size is other data
    resized = load_dataset(f"imagefolder:{root}", image_size=8).train
    before = resized.fingerprint
    assert resized.images.shape[1:] == (8, 8, 3) and resized.fingerprint == before != train.fingerprint
