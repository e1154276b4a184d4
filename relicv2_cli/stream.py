"""Streamed images: decoding and random resized crops in DataLoader workers, for training splits that
do not fit in memory decoded (`relicv2 pretrain --in-memory`, docs/pretrain.md "Streamed data").

Everything here reads a split through `Split.encoded(i)` (the JPEG/PNG bytes of image i) only, so an
image folder and a prepared set stream alike. Pretraining's step s is one loader item: the crops of
every image of that step's batch, each image's crop boxes drawn from a generator seeded by (seed,
step, position in the batch), so the crops depend neither on the number of workers nor on where a
run was resumed. The photometric augmentations are not done here: they stay batched on the training
device (augment.views_from_crops). Fine-tuning on a streamed split (`crop_flip_steps`) cuts its one
crop per image the same way; its flips stay on the device.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
from collections.abc import Callable, Iterator

import cv2
import numpy as np
import torch

from relicv2_cli import options
from relicv2_cli.augment import ViewConfig, center_view, crop_flip, epoch_batches, flip_views
from relicv2_cli.data import Dataset, Split, decode_bytes, header_size, streamed_error
from relicv2_cli.errors import BadImage, RelicError
from relicv2_cli.knn import encode_views

IN_MEMORY = ("auto", "yes", "no")
MEMORY_SHARE = 0.5  # auto streams when the decoded data would take more than this share of the memory
SIZE_SAMPLE = 64  # images whose header sizes estimate a split's decoded size
REDUCTIONS = (8, 4, 2)  # JPEG decodes at 1/8, 1/4 or 1/2 scale (libjpeg's DCT scaling)
READ_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
              8: cv2.IMREAD_REDUCED_COLOR_8}


def default_workers() -> int:
    """Loader processes when --workers is not given: the CPU cores this process may use, less one
    for the training loop, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) - 1))


# ---------------------------------------------------------------------------------------------------
# One image


def image_name(split: Split, i: int) -> str:
    return split.files[i] if split.files is not None else f"image {i}"


def stored_size(split: Split, i: int) -> tuple[int, int] | None:
    """(width, height) of image i when the split stores it (a prepared set), else None."""
    return None if split.sizes is None else (int(split.sizes[i, 1]), int(split.sizes[i, 0]))


def decode(data: bytes, name: str, reduction: int = 1) -> np.ndarray:
    """BGR uint8 (H', W', 3) of an encoded image; a JPEG with reduction r > 1 decodes at 1/r scale
    (H' = ceil(H / r): libjpeg's DCT scaling, much faster than a full decode)."""
    flag = READ_FLAGS[reduction] if data[:2] == b"\xff\xd8" else cv2.IMREAD_COLOR
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if pixels is None:
        raise BadImage(f"unreadable image {name}")
    return pixels


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: random.Random, attempts: int = 10) -> np.ndarray:
    """(n, 4) whole-pixel boxes x1, y1, x2, y2, each drawn as torchvision's RandomResizedCrop draws
    one: area fraction U(scale), aspect ratio log-uniform in `ratio`, sides rounded, the first of
    `attempts` draws that fits placed uniformly, else the whole image with its aspect ratio clamped
    into `ratio`, centred. Plain Python floats: torch ops on tiny tensors cost ~1 ms an image here."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    boxes = []
    for _ in range(n):
        for _ in range(attempts):
            area = height * width * rng.uniform(*scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                break
        else:
            if width / height < min(ratio):
                w, h = width, round(width / min(ratio))
            elif width / height > max(ratio):
                w, h = round(height * max(ratio)), height
            else:
                w, h = width, height
            x, y = (width - w) // 2, (height - h) // 2
        boxes.append((x, y, x + w, y + h))
    return np.array(boxes, np.int64).reshape(n, 4)


def reduction_for(boxes: np.ndarray, sizes: np.ndarray) -> int:
    """The largest JPEG reduction that keeps at least `size` pixels across every box (each box's
    output side in `sizes`): decoding smaller then loses nothing the resize would keep."""
    across = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / sizes
    return next((r for r in REDUCTIONS if across.min() >= r), 1)


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """cv2.resize: area averaging (antialiased) when a side shrinks 2x or more, else bilinear (at most
    2 source pixels per output pixel: little aliasing, and 7x faster than area averaging)."""
    shrink = max(pixels.shape[1] / width, pixels.shape[0] / height)
    interpolation = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
    return cv2.resize(pixels, (width, height), interpolation=interpolation)


def crop_image(data: bytes, name: str, views: ViewConfig, generator: random.Random,
               reduce: bool = True, mask: np.ndarray | None = None, size: tuple[int, int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Large (L, ls, ls, 3) and small (S, ss, ss, 3) uint8 random resized crops of one encoded image,
    and which large crops had their background removed (L,) bool: boxes drawn by crop_boxes (large
    first) on the full image's size (`size`, width and height, when known: a prepared set stores it;
    else read from the header), the image decoded at the smallest scale that keeps every box at least
    its output size across.

    With a saliency `mask` (H, W) of the full image, make_views' rule: each large crop is cut from the
    image times its mask with probability views.mask_prob (drawn after the boxes), unless the mask
    covers less than views.mask_min_area; small crops never are. The image is then decoded whole."""
    width, height = size if size is not None else header_size(data, name)
    L, S = views.large_crops, views.small_crops
    boxes = np.concatenate([crop_boxes(L, height, width, views.large_scale, views.ratio, generator),
                            crop_boxes(S, height, width, views.small_scale, views.ratio, generator)])
    sizes = np.array([views.large_size] * L + [views.small_size] * S)
    masked = np.zeros(L, bool)
    if mask is not None and mask.shape != (height, width):
        raise RelicError(f"the saliency mask of {name} is {mask.shape[1]}x{mask.shape[0]} but the image is "
                         f"{width}x{height}")
    if mask is not None and views.mask_prob > 0 and L:
        enough = np.count_nonzero(mask) >= views.mask_min_area * mask.size
        masked = np.array([generator.random() < views.mask_prob for _ in range(L)]) & enough
    pixels = decode(data, name, reduction_for(boxes, sizes) if reduce and not masked.any() else 1)
    sources = [pixels] * len(boxes)
    if masked.any():
        cut = pixels * (mask != 0)[..., None].astype(np.uint8)
        sources[:L] = [cut if m else pixels for m in masked]
    # The decoded image may be smaller: scale the boxes to it (exact for reduction 1).
    scale = np.array([pixels.shape[1] / width, pixels.shape[0] / height] * 2)
    boxes = np.rint(boxes * scale).astype(int)
    # BGR to RGB on the small crops rather than the image
    crops = [cv2.cvtColor(resize(source[y1:y2, x1:x2], size, size), cv2.COLOR_BGR2RGB)
             for source, (x1, y1, x2, y2), size in zip(sources, boxes, sizes, strict=True)]
    large = np.stack(crops[:L]) if L else np.zeros((0, views.large_size, views.large_size, 3), np.uint8)
    small = np.stack(crops[L:]) if S else np.zeros((0, views.small_size, views.small_size, 3), np.uint8)
    return large, small, masked


def center_image(data: bytes, name: str, size: int, crop_fraction: float) -> torch.Tensor:
    """The evaluation view (augment.center_view) of one encoded image: decoded in full as the in-memory
    split is (data.decode_bytes), so a streamed and a decoded split give the same views; normalised
    float (3, size, size)."""
    problem, rgb = decode_bytes(data)
    if problem:
        raise BadImage(f"{problem} image {name}")
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    return center_view(pixels, size, crop_fraction=crop_fraction)[0]


# ---------------------------------------------------------------------------------------------------
# Pretraining's steps


def image_generator(seed: int, step: int, position: int) -> random.Random:
    """The generator of one image's crop boxes and mask draws: a function of (seed, step, position in
    the batch)."""
    return random.Random(((seed * 1_000_003 + step) * 1_000_033 + position) % 2**63)


class StepCrops(torch.utils.data.Dataset):
    """Item s: the crops of step s's images (uint8, view-major, channels last: large (L * B, ls, ls, 3),
    small (S * B, ss, ss, 3); on_device makes them (N, 3, s, s) on the training device) and which
    large crops were background-removed ((L, B) bool), or a RelicError's message (a worker's
    exception would reach the training loop as a multi-line traceback). `masks(i)` gives image i's
    saliency mask (saliency.MaskReader), with --saliency."""

    def __init__(self, split: Split, views: ViewConfig, batch_indices: Callable[[int], torch.Tensor],
                 positions: torch.Tensor | None, seed: int, masks: Callable[[int], np.ndarray] | None = None):
        self.split, self.views, self.batch_indices = split, views, batch_indices
        # the batch rows this process makes views of (None: all, however many the step has)
        self.positions = None if positions is None else positions.tolist()
        self.seed, self.masks = seed, masks

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | str:
        try:
            batch = self.batch_indices(step).tolist()
            positions = range(len(batch)) if self.positions is None else self.positions
            crops = [crop_image(self.split.encoded(batch[p]), image_name(self.split, batch[p]), self.views,
                                image_generator(self.seed, step, p),
                                mask=None if self.masks is None else self.masks(batch[p]),
                                size=stored_size(self.split, batch[p]))
                     for p in positions]
        except RelicError as e:
            return f"{streamed_error(e, self.split)} (step {step})"
        masked = torch.from_numpy(np.stack([c[2] for c in crops], axis=1))
        return *(_view_major(np.stack([c[k] for c in crops], axis=1)) for k in (0, 1)), masked


def _view_major(crops: np.ndarray) -> torch.Tensor:
    """(V, B, s, s, 3) -> (V * B, s, s, 3): all images' view 0, then view 1, ... as make_views, still
    channels last (no copy): on_device permutes them where the training runs."""
    return torch.from_numpy(crops.reshape(-1, *crops.shape[2:]))


def on_device(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, s, s, 3) uint8 crops of the loader -> (N, 3, s, s) contiguous on `device`. The layout change
    runs there rather than in the workers (0.1 ms an image of a worker's time; on a GPU next to
    nothing)."""
    return crops.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous()


def _ignore_stop_signals(_worker: int) -> None:
    """Ctrl-C, a scheduler's SIGTERM and `kill -- -PGID` reach the whole process group: the workers
    leave them to the training process, which finishes its step (it may need more steps' crops: under
    torchrun it votes on log steps only), checkpoints and then ends the workers through the loader.
    A worker whose training process died without doing so ends on its own: the loader's watchdog
    checks the parent every few seconds."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset: torch.utils.data.Dataset, items, workers: int, pin: bool, batch_size=None,
           collate=None) -> Iterator:
    """Items of `dataset` in the order of `items`, made by `workers` processes (0: in this one) two
    items ahead each; RelicError messages from the workers raised here as one line.

    OpenCV is set to one thread here, before the workers fork: the parallelism is the workers', and
    cv2.setNumThreads in a worker forked from a process whose OpenCV threads run deadlocks."""
    cv2.setNumThreads(1)
    data = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=items,
                                            num_workers=workers, pin_memory=pin, collate_fn=collate,
                                            prefetch_factor=2 if workers else None,
                                            worker_init_fn=_ignore_stop_signals if workers else None))
    try:
        for item in data:
            if isinstance(item, str):
                raise RelicError(item)
            yield item
    finally:  # the workers end now (close() or an error), not when a traceback holding them is freed
        del data


def step_batches(crops: StepCrops, first: int, last: int, workers: int, pin: bool) -> Iterator:
    """The crops of steps first .. last - 1, in order: a run resumed at step k starts its loader at k."""
    return loader(crops, range(first, last), workers, pin)


# ---------------------------------------------------------------------------------------------------
# Fine-tuning's steps (eval linear --protocol augment, eval transfer --finetune, eval semi)


def fine_tune_batch(step: int, n: int, batch: int, seed: int) -> torch.Tensor:
    """The images of streamed fine-tuning's step `step`: augment.epoch_batches of a generator seeded by
    (seed, epoch), a pure function of the step (the loader's workers and the training loop both ask)."""
    per_epoch = math.ceil(n / batch)
    epoch, within = divmod(step, per_epoch)
    return _epoch_batches(n, batch, seed, epoch)[within]


@functools.lru_cache(maxsize=2)
def _epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    return epoch_batches(n, batch, torch.Generator().manual_seed(seed * 7919 + epoch))


def crop_flip_steps(images: np.ndarray | Split, steps: int, *, batch: int, size: int, crop_min_scale: float,
                    seed: int, device: torch.device, workers: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image indices on `device`, normalised crop + flip views (B, 3, size, size)) of fine-tuning's
    steps 0 .. steps - 1: `batch` images a step, every image once an epoch, crops of area fraction
    U(crop_min_scale, 1) and aspect 3/4-4/3.

    `images` an array (in memory, the fastest): on the device once, augment.crop_flip of each batch,
    one generator seeded by `seed` drawing batches and crops. A Split (streamed): step s's batch is
    fine_tune_batch(s), its crops are cut in `workers` loader processes (StepCrops with one large crop
    and no small one: crop_image's boxes and reduced JPEG decoding) and come to the device as uint8,
    where the flips (a generator seeded by (seed, s)) and the normalisation are batched; the views
    depend neither on `workers` nor on anything drawn before step s."""
    n = len(images)
    if isinstance(images, Split):
        views = ViewConfig(large_crops=1, small_crops=0, large_size=size, large_scale=(crop_min_scale, 1.0),
                           mask_prob=0.0)
        indices = functools.partial(fine_tune_batch, n=n, batch=batch, seed=seed)
        crops = StepCrops(images, views, indices, None, seed)
        workers = default_workers() if workers is None else workers
        loaded = step_batches(crops, 0, steps, workers, device.type == "cuda")
        for step, (large, _small, _masked) in enumerate(loaded):
            x = on_device(large, device).float() / 255
            flips = torch.Generator().manual_seed(seed * 1_000_003 + step)
            yield indices(step).to(device), flip_views(x, flips)
        return
    images_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    generator = torch.Generator().manual_seed(seed)
    batches: list[torch.Tensor] = []
    for _ in range(steps):
        if not batches:
            batches = epoch_batches(n, batch, generator)
        idx = batches.pop(0).to(device)
        yield idx, crop_flip(images_t[idx], size, (crop_min_scale, 1.0), generator)


def rows_of(split: Split, rows) -> Split:
    """Rows `rows` of a split of encoded images as a split (semi's labelled subset), decoding nothing."""
    rows = np.asarray(rows, np.int64)
    return Split(labels=split.labels[rows],
                 files=None if split.files is None else [split.files[i] for i in rows],
                 sizes=None if split.sizes is None else split.sizes[rows],
                 _read=lambda i: split.encoded(int(rows[i])))


def joined(first: Split, second: Split) -> Split:
    """Two splits of encoded images as one (transfer fine-tunes on train + validation), decoding nothing."""
    n = len(first)
    return Split(labels=np.concatenate([first.labels, second.labels]),
                 files=None if first.files is None or second.files is None else first.files + second.files,
                 sizes=None if first.sizes is None or second.sizes is None else
                 np.concatenate([first.sizes, second.sizes]),
                 _read=lambda i: first.encoded(i) if i < n else second.encoded(i - n))


# ---------------------------------------------------------------------------------------------------
# Evaluation: chunks of centre views, never the whole split decoded


class CenterViews(torch.utils.data.Dataset):
    """Item i: the centre view of image i, or the message of a bad image (--skip-bad dropped the files
    whose headers do not read when the split was loaded)."""

    def __init__(self, split: Split, size: int, crop_fraction: float):
        self.split, self.size, self.crop_fraction = split, size, crop_fraction

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            data = self.split.encoded(i)
            return center_image(data, image_name(self.split, i), self.size, self.crop_fraction)
        except RelicError as e:
            return streamed_error(e, self.split)


def _collate(items: list) -> torch.Tensor | str:
    errors = [item for item in items if isinstance(item, str)]
    return errors[0] if errors else torch.stack(items)


class StreamedImages:
    """A split's images for evaluation, rows `rows` (default all): len() and slicing as an array, for
    `encode_streamed` (and DistContext.encode's sharding)."""

    def __init__(self, split: Split, workers: int | None = None, rows: np.ndarray | None = None):
        self.split = split
        self.workers = default_workers() if workers is None else workers
        self.rows = np.arange(len(split)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: slice) -> StreamedImages:
        return StreamedImages(self.split, self.workers, self.rows[rows])


def encode_streamed(encoder, images: StreamedImages, *, image_size: int, device: torch.device,
                    precision: str = "bf16", batch_size: int = 512, progress=None,
                    description: str = "embedding", crop_fraction: float = 1.0) -> torch.Tensor:
    """knn.encode_images of a streamed split: each image decoded and given its centre view in the
    loader's workers, `batch_size` images a chunk, so memory holds a few chunks, never the split."""
    views = CenterViews(images.split, image_size, crop_fraction)
    chunks = loader(views, images.rows.tolist(), images.workers, device.type == "cuda", batch_size=batch_size,
                    collate=_collate)
    return encode_views(encoder, chunks, len(images), device=device, precision=precision, progress=progress,
                        description=description)


def decode_rows(split: Split, rows, side: int) -> np.ndarray:
    """uint8 (n, H, W, 3) of the given rows only (semi's labelled subset), decoded one by one: as they
    are when they share one size, else each one's shorter side resized to `side` and its centre
    side x side kept (augment.center_view's geometry, rounded back to uint8), so that they stack."""
    images = []
    for i in rows:
        problem, rgb = decode_bytes(split.encoded(int(i)))
        if problem:
            raise RelicError(streamed_error(BadImage(f"{problem} image {image_name(split, int(i))}"), split))
        images.append(rgb)
    if len({image.shape for image in images}) <= 1:
        return np.stack(images) if images else np.zeros((0, side, side, 3), np.uint8)
    squares = [center_view(torch.from_numpy(image).permute(2, 0, 1)[None], side, (0, 0, 0), (1, 1, 1))[0]
               for image in images]
    return (torch.stack(squares) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------------
# In memory or streamed


def can_stream(split: Split) -> bool:
    """Whether the split has encoded images to stream (an image folder or a prepared set)."""
    try:
        split.encoded(0)
    except RelicError:
        return False
    return True


def streamed(dataset: Dataset, split: Split) -> bool:
    """Whether evaluation streams the split: it has encoded images and no --image-size asked for one
    resized array in memory."""
    return dataset.options.get("image_size") is None and can_stream(split)


def sample_sizes(split: Split) -> tuple[np.ndarray, str]:
    """((k, 2) height, width of images of an encoded split, how they were found): every stored size of
    a prepared set, else the headers of SIZE_SAMPLE evenly spaced images."""
    if split.sizes is not None:
        return split.sizes, "exact"
    n = len(split)
    k = min(n, SIZE_SAMPLE)
    sample = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})
    try:
        sizes = [header_size(split.encoded(i), image_name(split, i))[::-1] for i in sample]
    except RelicError as e:
        raise RelicError(streamed_error(e, split)) from None
    return np.array(sizes, np.int64), f"estimated from {len(sample)} images' sizes"


def decoded_bytes(split: Split, image_size: int | None = None) -> tuple[float, str, bool]:
    """(bytes of the split decoded as uint8 RGB, how it was found, whether sizes differ): exact when
    decoded, resized to --image-size or prepared (sizes stored), else the mean size of SIZE_SAMPLE
    evenly spaced images' headers times the count."""
    if split._images is not None:
        return float(split._images.nbytes), "exact", False
    if image_size is not None:
        return 3.0 * len(split) * image_size**2, "exact", False
    sizes, how = sample_sizes(split)
    mixed = len(np.unique(sizes, axis=0)) > 1
    return 3.0 * len(split) * float(sizes.prod(1).astype(float).mean()), how, mixed


def training_choice(dataset: Dataset, splits: list[Split]) -> tuple[bool, str]:
    """(stream?, why) of a stage that trains on crops of whole splits (`splits` joined): in memory, the
    fastest, unless they stream (streamed()) and have images of mixed sizes (in memory they are one
    array) or would take more than MEMORY_SHARE of the available RAM decoded."""
    if not streamed(dataset, splits[0]):
        return False, ("--image-size resizes the images in memory" if can_stream(splits[0]) else
                       f"{dataset.spec} is decoded in memory when loaded")
    found = [decoded_bytes(split) for split in splits]
    size, how = sum(f[0] for f in found), found[0][1]
    # within a split the sizes agree (else it is mixed): its first image's size stands for all
    firsts = {header_size(split.encoded(0), image_name(split, 0)) for split in splits if len(split)}
    if any(f[2] for f in found) or len(firsts) > 1:
        return True, "images of mixed sizes (in memory they need --image-size)"
    ram, gib = available_ram(), 2.0**30
    if size > MEMORY_SHARE * ram:
        return True, (f"decoded training data ~{size / gib:.1f} GiB ({how}) > {MEMORY_SHARE:.0%} of "
                      f"{ram / gib:.1f} GiB available RAM")
    return False, (f"decoded training data ~{size / gib:.2f} GiB ({how}) <= {MEMORY_SHARE:.0%} of "
                   f"{ram / gib:.1f} GiB available RAM")


def announce(what: str, choice: tuple[bool, str], quiet: bool) -> bool:
    """Say a training_choice on stderr (`WHAT streamed: WHY` or `WHAT in memory: WHY`) unless quiet;
    returns whether it streams."""
    streams, why = choice
    if not quiet:
        options.console.print(f"{what} {'streamed' if streams else 'in memory'}: {why}", markup=False,
                              highlight=False, soft_wrap=True)
    return streams


def available_ram() -> float:
    """Bytes of RAM available to new allocations (Linux MemAvailable; free pages elsewhere)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def choose(mode: str, dataset: Dataset, device: torch.device,
           image_size: int | None = None) -> tuple[bool, str]:
    """(stream?, why) for --in-memory MODE. auto streams images of mixed sizes (the in-memory split is
    one array: it would need --image-size), and data whose decoded training split would take more than
    MEMORY_SHARE of the available RAM (the in-memory path holds it twice on the CPU: the decoded array
    and the tensor made from it; plus the test split) or, on CUDA, of the free GPU memory."""
    if mode == "yes":
        return False, "--in-memory yes"
    if not can_stream(dataset.train):
        if mode == "no":
            raise RelicError(f"--in-memory no streams encoded images (image folders, prepared sets); "
                             f"{dataset.spec} is decoded in memory when loaded")
        return False, f"{dataset.spec} is decoded in memory when loaded"
    if mode == "no":
        return True, "--in-memory no"
    train, how, mixed = decoded_bytes(dataset.train, image_size)
    if mixed:
        return True, "images of mixed sizes (in memory they need --image-size)"
    test = decoded_bytes(dataset.test, image_size)[0]
    host = (2 if device.type == "cpu" else 1) * train + test
    ram = available_ram()
    gib = 2.0**30
    if host > MEMORY_SHARE * ram:
        return True, (f"decoded data ~{host / gib:.1f} GiB ({how}) > {MEMORY_SHARE:.0%} of "
                      f"{ram / gib:.1f} GiB available RAM")
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
        if train > MEMORY_SHARE * free:
            return True, (f"decoded training split ~{train / gib:.1f} GiB ({how}) > {MEMORY_SHARE:.0%} of "
                          f"{free / gib:.1f} GiB free GPU memory")
    return False, (f"decoded data ~{host / gib:.2f} GiB ({how}) <= {MEMORY_SHARE:.0%} of {ram / gib:.1f} GiB "
                   "available RAM" + (" and of free GPU memory" if device.type == "cuda" else ""))
