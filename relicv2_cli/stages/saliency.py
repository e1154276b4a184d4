"""`relicv2 saliency`: precompute background-removal masks for a dataset, once, before pretraining.

Output: WORKDIR/saliency/NAME with
- `masks.h5`: one group per split (`train`, `test`, `val`) in the dataset's index order, with
  `done` (one flag per chunk of images) and attrs recording the split's count and fingerprint,
  the method and its parameters. Array sets (decoded when loaded) get the `array` layout:
  `saliency` (N, H, W) uint8 (the soft map scaled to 0..255) and `mask` (N, H, W) uint8 in
  {0, 1}. Image folders and prepared sets stream (decoded a chunk at a time in loader workers)
  into the `per-image` layout: each mask a PNG at its image's size, with `height`, `width` and
  `foreground`. Chunks are written and flushed as they finish, so an interrupted run keeps
  WORKDIR/saliency/.NAME.partial and `--resume` computes only the chunks not yet done.
- `preview.png`: 16 images with their saliency map, mask and background removed.
- manifest metrics: images/s and, when the dataset has ground-truth masks (synthetic), mean IoU
  and F-measure (beta^2 = 0.3) of every method and of the centre prior on the same images.

`relicv2_cli.saliency.load_masks(path, dataset, split)` reads them back (`pretrain --saliency`):
it refuses masks made for a different dataset (fingerprint or count mismatch).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Annotated

import cv2
import h5py
import numpy as np
import typer

from relicv2_cli import artifacts, options
from relicv2_cli import saliency as sal
from relicv2_cli.data import Dataset, Split, decode_bytes, load_dataset, streamed_error
from relicv2_cli.errors import BadImage, RelicError
from relicv2_cli.workers import cv2_pool

DEFAULT_METHOD = "bc+grabcut"
SPLIT_CHOICES = ("train", "test", "all")
PREVIEW_NAME = "preview.png"
IMPORT_METHOD = "import"
MASK_SUFFIXES = (".png",)


# ----------------------------------------------------------------------------------------------
# Workers.


def _work(task: tuple) -> tuple:
    key, images, method, params, seed = task
    return key, *sal.compute(images, method, params, seed=seed)


class _Runner:
    """Runs `sal.compute` over chunks of images: in this process without a pool, else in the pool."""

    def __init__(self, pool: Pool | None, workers: int):
        self.pool, self.workers = pool, workers

    def map(self, tasks: list[tuple]):
        """Yield (key, saliency, mask) per task, in completion order."""
        if self.pool is None:
            yield from map(_work, tasks)
        else:
            yield from self.pool.imap_unordered(_work, tasks)


def _raise_interrupt(signum, frame):
    """SIGTERM stops the run like Ctrl-C: the h5 file is closed and the partial kept for --resume."""
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------
# Import of masks computed elsewhere.


def _mask_index(folder: Path) -> tuple[dict[str, Path], int]:
    """Every PNG under `folder`, keyed by relative path without suffix, by stem, and by integer
    stem (any zero padding); also the most common width of the integer stems (0 if none)."""
    index: dict[str, Path] = {}
    widths: dict[int, int] = {}
    for file in sorted(folder.rglob("*")):
        if file.suffix.lower() not in MASK_SUFFIXES or not file.is_file():
            continue
        rel = file.relative_to(folder).with_suffix("").as_posix()
        index.setdefault(f"path:{rel}", file)
        index.setdefault(f"stem:{file.stem}", file)
        if file.stem.isdigit():
            index.setdefault(f"index:{int(file.stem)}", file)
            widths[len(file.stem)] = widths.get(len(file.stem), 0) + 1
    return index, (max(widths, key=widths.get) if widths else 0)


def _mask_keys(split: Split, i: int, data_root: Path | None) -> list[str]:
    """Lookup keys for image i, best first: its path relative to the dataset root, its last two
    path parts (class/stem), its stem; the index when the dataset has no file names."""
    if split.files is None:
        return [f"index:{i}"]
    file = Path(split.files[i])
    keys = []
    if data_root is not None:
        try:
            keys.append(f"path:{file.relative_to(data_root).with_suffix('').as_posix()}")
        except ValueError:
            pass
    keys += [f"path:{file.parent.name}/{file.stem}", f"stem:{file.stem}", f"index:{i}"]
    return keys


def _read_mask(file: Path, h: int, w: int) -> np.ndarray:
    """A mask PNG as a soft map (h, w) float32 in [0, 1]: grey, the brightest colour channel, or
    the alpha channel of a black RGBA image; {0, 1} images are taken as binary; resized to the
    image size (bilinear)."""
    raw = cv2.imread(str(file), cv2.IMREAD_UNCHANGED)
    if raw is None or raw.size == 0:
        raise RelicError(f"unreadable mask {file}")
    if raw.ndim == 3:  # colour: the brightest channel; RGBA with black colour: the alpha channel
        raw = raw[..., 3] if raw.shape[2] == 4 and raw[..., :3].max() == 0 else raw[..., :3].max(axis=2)
    top = 65535.0 if raw.dtype == np.uint16 else 255.0
    soft = raw.astype(np.float32) / (1.0 if raw.max() <= 1 else top)
    if soft.shape != (h, w):
        soft = cv2.resize(soft, (w, h), interpolation=cv2.INTER_LINEAR)
    return np.clip(soft, 0.0, 1.0)


def _import_masks(folder: Path, dataset: Dataset, splits: list[str], data_root: Path | None) -> dict:
    """Read and validate every mask before anything is written: {split: (saliency, mask)}."""
    if not folder.is_dir():
        raise RelicError(f"--from-dir {folder} is not a directory")
    out = {}
    for name in splits:
        split = dataset.split(name)
        base = folder / name if (folder / name).is_dir() else folder
        index, width = _mask_index(base)
        n, h, w = split.images.shape[:3]
        files, missing = [], []
        for i in range(n):
            keys = _mask_keys(split, i, data_root)
            found = next((index[k] for k in keys if k in index), None)
            if found is None:
                label = f"{name} image {i}" + (f" ({split.files[i]})" if split.files is not None else "")
                kind, _, key = keys[0].partition(":")
                wanted = (f"{int(key):0{width}d}" if kind == "index" else key) + ".png"
                missing.append(f"{label}: no {base / wanted}")
            files.append(found)
        if missing:
            more = f" (and {len(missing) - 1:,} more)" if len(missing) > 1 else ""
            raise RelicError(f"missing mask for {missing[0]}{more}")
        saliency = np.empty((n, h, w), np.uint8)
        masks = np.empty((n, h, w), np.uint8)
        for i, file in enumerate(files):
            soft = _read_mask(file, h, w)
            saliency[i] = np.rint(soft * 255).astype(np.uint8)
            masks[i] = soft >= 0.5
        out[name] = (saliency, masks)
    return out


# ----------------------------------------------------------------------------------------------
# The stage.


def _default_name(spec: str, method: str, split: str, imported: bool) -> str:
    kind = re.sub(r"[^A-Za-z0-9_-]+", "-", spec.partition(":")[0]).strip("-") or "data"
    parts = [kind]
    if imported:
        parts.append("import")
    elif method != DEFAULT_METHOD:
        parts.append(re.sub(r"[^A-Za-z0-9_-]+", "-", method))
    if split != "train":
        parts.append(split)
    return "-".join(parts)


def _auto_chunk(n: int, pixels: float) -> int:
    """Images per chunk of `pixels` each (the mean for images of mixed sizes): at most 512 and about
    12 MB of pixels, at least 16, and small enough to make about 16 chunks of a small split (so the
    workers stay busy to the end). Independent of --workers, so a run can be resumed with another
    worker count."""
    cap = max(16, min(512, int((12 << 20) // (pixels * 3))))
    return int(min(cap, max(16, -(-n // 16))))


def _method_params(method: str) -> dict:
    if method == IMPORT_METHOD:
        return {"binarise": "soft >= 0.5 after bilinear resize"}
    base, refine = sal.split_method(method)
    params = {base: sal.DEFAULT_PARAMS[base]}
    if refine:
        params["grabcut"] = sal.DEFAULT_PARAMS["grabcut"]
    params["binarise"] = "ellipse" if base == "centre" else ("grabcut" if refine else "otsu")
    return params


def _open_h5(path: Path, resume: bool, header: dict, split_info: dict, shapes: dict | None,
             chunk: int) -> h5py.File:
    """Create masks.h5, or reopen the interrupted run's one after checking it was made the same way.
    `shapes` {split: (N, H, W)} makes the array layout; None the per-image layout (streamed sets)."""
    if resume and path.exists():
        try:
            f = h5py.File(path, "r+")
        except OSError as e:
            raise RelicError(f"cannot resume: {path} is unreadable ({e}); pass --force to restart") from None
        try:
            found = json.loads(f.attrs.get("header", "{}"))
        except json.JSONDecodeError:
            found = {}
        if found != header:
            f.close()
            diff = sorted(k for k in set(found) | set(header) if found.get(k) != header.get(k))
            raise RelicError(f"cannot resume: the interrupted run differs in {', '.join(diff) or 'format'} "
                             f"(e.g. {diff[0] if diff else 'header'}: "
                             f"{found.get(diff[0]) if diff else '?'!r} "
                             f"now {header.get(diff[0]) if diff else '?'!r}); pass --force to restart")
        return f
    f = h5py.File(path, "w")
    f.attrs["format"] = sal.H5_FORMAT
    f.attrs["header"] = json.dumps(header, sort_keys=True)
    f.attrs["method"] = header["method"]
    f.attrs["params"] = json.dumps(header["params"], sort_keys=True)
    f.attrs["splits"] = json.dumps(list(split_info))
    f.attrs["spec"] = header["spec"]
    f.attrs["chunk_size"] = chunk
    f.attrs["layout"] = header["layout"]
    for name, info in split_info.items():
        group = f.create_group(name)
        group.attrs["count"] = info["count"]
        group.attrs["fingerprint"] = info["fingerprint"]
        if shapes is None:
            n = info["count"]
            group.create_dataset("mask", shape=(n,), dtype=h5py.vlen_dtype(np.uint8))
            for key, dtype in (("height", np.int32), ("width", np.int32), ("foreground", np.int64)):
                group.create_dataset(key, shape=(n,), dtype=dtype)
            group.create_dataset("done", shape=(-(-n // chunk),), dtype=np.uint8, fillvalue=0)
            continue
        n, h, w = shapes[name]
        per_chunk = max(1, min(n, chunk, (64 << 10) // (h * w)))  # h5 chunks of ~64 KB
        for key in ("saliency", "mask"):
            group.create_dataset(key, shape=(n, h, w), dtype=np.uint8, chunks=(per_chunk, h, w),
                                 compression="gzip", compression_opts=4)
        group.create_dataset("done", shape=(-(-n // chunk),), dtype=np.uint8, fillvalue=0)
    f.flush()
    return f


def run(
    spec: str,
    *,
    method: str = DEFAULT_METHOD,
    split: str = "train",
    from_dir: Path | None = None,
    workdir: Path = options.DEFAULT_WORKDIR,
    name: str | None = None,
    seed: int = 0,
    force: bool = False,
    quiet: bool = False,
    resume: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
    image_size: int | None = None,
    skip_bad: bool = False,
    workers: int | None = None,
    chunk_size: int | None = None,
    quality_n: int = 500,
) -> artifacts.Artifact:
    """Compute (or import) masks for SPEC's split(s) and commit a `saliency` artifact."""
    workers = _check_run_options(split, method, from_dir, workers, chunk_size, quality_n)
    dataset = load_dataset(spec, limit_train=limit_train, limit_test=limit_test, image_size=image_size,
                           skip_bad=skip_bad, seed=seed)
    splits = ["train", *(["val"] if dataset.val is not None else []), "test"] if split == "all" else [split]
    used_method = IMPORT_METHOD if from_dir is not None else method
    imported = None
    if from_dir is not None:
        kind, _, arg = spec.partition(":")
        data_root = Path(arg).expanduser() if kind in ("imagefolder", "images") else None
        imported = _import_masks(Path(from_dir), dataset, splits, data_root)

    # Image folders and prepared sets stream: decoded a chunk at a time, masks at each image's size.
    streamed = from_dir is None and image_size is None and _streamable(dataset.split(splits[0]))
    if streamed:
        from relicv2_cli import stream

        first = dataset.split(splits[0])
        pixels = stream.decoded_bytes(first)[0] / 3 / len(first)
    else:
        pixels = float(np.prod(dataset.split(splits[0]).images.shape[1:3]))
    chunk = chunk_size or _auto_chunk(len(dataset.split(splits[0])), pixels)
    layout = sal.LAYOUT_PER_IMAGE if streamed else sal.LAYOUT_ARRAY
    split_info = {s: {"count": len(dataset.split(s)),
                      "fingerprint": dataset.split(s).fingerprint} for s in splits}
    params = _method_params(used_method)
    header = {"format": sal.H5_FORMAT, "spec": spec, "method": used_method, "params": params,
              "splits": split_info, "chunk_size": chunk, "seed": seed, "layout": layout,
              "from_dir": str(from_dir) if from_dir is not None else None}
    config = {
        "spec": spec, "method": used_method, "params": params, "split": split, "splits": split_info,
        "from_dir": from_dir, "workers": workers, "chunk_size": chunk, "seed": seed,
        "limit_train": limit_train, "limit_test": limit_test, "image_size": image_size, "skip_bad": skip_bad,
        "quality_n": quality_n, "layout": layout,
    }
    name = name or _default_name(spec, used_method, split, from_dir is not None)
    shapes = None if streamed else {s: dataset.split(s).images.shape[:3] for s in splits}

    staging = artifacts.Staging(Path(workdir), "saliency", name, force=force, resume=resume, resumable=True)
    pool_workers = 1 if streamed else workers  # streamed: the loader's workers
    with staging, options.handle_signals(_raise_interrupt, (signal.SIGTERM,)), cv2_pool(pool_workers) as pool:
        runner = _Runner(pool, workers)
        h5_path = staging.dir / sal.H5_NAME
        start = time.perf_counter()
        with _open_h5(h5_path, resume, header, split_info, shapes, chunk) as f:
            tasks, total, done_before = _pending_chunks(f, dataset, splits, chunk)
            with options.progress_bar(quiet) as progress:
                bar = progress.add_task(f"saliency {used_method}", total=total, completed=done_before,
                                        info=f"{workers} worker(s)" if imported is None else "import")
                write = _write_image_chunks if streamed else _write_chunks
                if streamed:
                    results = stream.loader(_ImageChunks(dataset, tasks, method, seed), range(len(tasks)),
                                            workers if workers > 1 else 0, pin=False)
                elif imported is not None:
                    results = ((key, *(a[lo:hi] for a in imported[key[0]])) for key, lo, hi in
                               (((s, c), lo, hi) for s, c, lo, hi in tasks))
                else:
                    results = runner.map([((s, c), dataset.split(s).images[lo:hi], method, None, seed)
                                          for s, c, lo, hi in tasks])
                processed = write(f, tasks, results, lambda n: progress.update(bar, advance=n))
            elapsed = time.perf_counter() - start
            if streamed:
                images_first, sal_first, masks_first = _streamed_head(dataset.split(splits[0]), f[splits[0]],
                                                                      method, seed)
                foreground = _stored_foreground(f[splits[0]])
            else:
                images_first = dataset.split(splits[0]).images[:16]
                masks_first = f[splits[0]]["mask"][:16]
                sal_first = f[splits[0]]["saliency"][:16]
                foreground = _foreground_fraction(f[splits[0]]["mask"], chunk)

        quality = _quality(dataset, splits, h5_path, used_method, quality_n, runner, seed, quiet)
        metrics = _run_metrics(split_info, processed, elapsed, quality, used_method, foreground)
        gt = dataset.split(splits[0]).masks
        write_preview(staging.dir / PREVIEW_NAME, images_first, sal_first, masks_first,
                      title=f"saliency {used_method} - {spec} ({splits[0]})", gt=gt)
        if not quiet:
            _print_quality(quality, used_method, metrics)
        return staging.commit(config=config, dataset=dataset.record(), metrics=metrics)


def _check_run_options(split, method, from_dir, workers, chunk_size, quality_n) -> int:
    """One-line errors before any work; returns the number of workers."""
    options.check_choice("--split", split, SPLIT_CHOICES)
    if from_dir is None:
        options.check_choice("--method", method, sal.METHODS)
    workers = workers if workers is not None else _cpu_count()
    if workers < 1:
        raise RelicError(f"--workers must be at least 1, got {workers}")
    if chunk_size is not None and chunk_size < 1:
        raise RelicError(f"--chunk-size must be at least 1, got {chunk_size}")
    if quality_n < 0:
        raise RelicError(f"--quality-n must be 0 or more, got {quality_n}")
    if from_dir is not None and not Path(from_dir).is_dir():
        raise RelicError(f"--from-dir {from_dir} is not a directory")
    return workers


def _pending_chunks(f: h5py.File, dataset: Dataset, splits: list[str], chunk: int):
    """(chunks still to compute as (split, chunk, lo, hi), images in all, images already done)."""
    tasks, total, done_before = [], 0, 0
    for s in splits:
        n = len(dataset.split(s))
        done = f[s]["done"][()]
        total += n
        for c in range(len(done)):
            lo, hi = c * chunk, min(n, (c + 1) * chunk)
            if done[c]:
                done_before += hi - lo
            else:
                tasks.append((s, c, lo, hi))
    return tasks, total, done_before


def _write_chunks(f: h5py.File, tasks: list[tuple], results, advance) -> int:
    """Write each finished chunk and flush, so an interruption keeps it; returns the images written."""
    bounds = {(s, c): (lo, hi) for s, c, lo, hi in tasks}
    processed = 0
    for (s, c), sal_chunk, mask_chunk in results:
        lo, hi = bounds[(s, c)]
        f[s]["saliency"][lo:hi] = sal_chunk
        f[s]["mask"][lo:hi] = mask_chunk
        f[s]["done"][c] = 1
        f.flush()
        processed += hi - lo
        advance(hi - lo)
    return processed


def _streamable(split: Split) -> bool:
    """An image folder's or prepared set's split not yet decoded: its images can stream."""
    return split._images is None and (split._read is not None or split.files is not None)


class _ImageChunks:
    """Item k: the masks of chunk tasks[k] = (split, chunk, lo, hi) of a streamed set, made in a loader
    worker: each image decoded from its stored bytes at its own size (the pixels an in-memory decode
    gives), then `sal.compute`. Per image (PNG bytes, height, width, foreground pixels); or a
    RelicError's message. A plain class (DataLoader needs only __getitem__): the pool workers of array
    sets import this module, and importing torch there would cost each of them seconds."""

    def __init__(self, dataset: Dataset, tasks: list[tuple], method: str, seed: int):
        self.dataset, self.tasks, self.method, self.seed = dataset, tasks, method, seed

    def __getitem__(self, k: int) -> tuple | str:
        name, c, lo, hi = self.tasks[k]
        split = self.dataset.split(name)
        rows = []
        try:
            for i in range(lo, hi):
                mask = sal.compute(_decoded(split, i)[None], self.method, seed=self.seed)[1][0]
                rows.append((sal.encode_mask(mask), mask.shape[0], mask.shape[1], int(mask.sum())))
        except RelicError as e:
            return streamed_error(e, split)
        return (name, c), rows


def _decoded(split: Split, i: int) -> np.ndarray:
    """Image i of a streamed split as RGB (H, W, 3): the bytes decoded as an in-memory load decodes them."""
    problem, image = decode_bytes(split.encoded(i))
    if problem:
        name = split.files[i] if split.files is not None else f"image {i}"
        raise BadImage(f"{problem} image {name}")
    return image


def _write_image_chunks(f: h5py.File, tasks: list[tuple], results, advance) -> int:
    """The per-image layout's `_write_chunks`: each image's PNG, size and foreground count."""
    bounds = {(s, c): (lo, hi) for s, c, lo, hi in tasks}
    processed = 0
    for (s, c), rows in results:
        lo, hi = bounds[(s, int(c))]
        pngs = np.empty(hi - lo, object)
        pngs[:] = [np.frombuffer(png, np.uint8) for png, *_ in rows]
        group = f[s]
        group["mask"][lo:hi] = pngs
        for column, key in enumerate(("height", "width", "foreground"), start=1):
            group[key][lo:hi] = [int(row[column]) for row in rows]
        group["done"][int(c)] = 1
        f.flush()
        processed += hi - lo
        advance(hi - lo)
    return processed


def _streamed_head(split: Split, group: h5py.Group, method: str, seed: int, count: int = 16):
    """The preview's first images, their saliency maps (recomputed: the per-image layout stores masks
    only) and stored masks."""
    images = [_decoded(split, i) for i in range(min(count, len(split)))]
    maps = [sal.compute(image[None], method, seed=seed)[0][0] for image in images]
    return images, maps, [sal.decode_mask(group["mask"][i]) for i in range(len(images))]


def _stored_foreground(group: h5py.Group) -> float:
    pixels = group["height"][()].astype(np.int64) * group["width"][()]
    return float(group["foreground"][()].sum() / max(1, pixels.sum()))


def _run_metrics(split_info: dict, processed: int, elapsed: float, quality: dict, used_method: str,
                 foreground: float) -> dict:
    metrics: dict = {"images": sum(i["count"] for i in split_info.values()),
                     "images_this_run": processed,
                     "images_per_s": processed / elapsed if processed and elapsed > 0 else None}
    if quality:
        metrics["quality"] = quality
        head = quality[next(iter(quality))]
        metrics["iou"] = head["all_images"]["iou"]
        metrics["f_beta"] = head["all_images"]["f_beta"]
        if "centre" in head["methods"]:
            centre = head["methods"]["centre"]
            metrics["centre_prior_iou"] = centre["iou"]
            metrics["centre_prior_f_beta"] = centre["f_beta"]
            metrics["beats_centre_prior"] = head["methods"][used_method]["iou"] > centre["iou"]
    metrics["foreground_fraction"] = foreground
    return metrics


def _foreground_fraction(dset: h5py.Dataset, block: int) -> float:
    total = 0.0
    for lo in range(0, len(dset), block):
        total += float(dset[lo : lo + block].sum(dtype=np.int64))
    return total / max(1, dset.size)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _quality(dataset: Dataset, splits: list[str], h5_path: Path, used_method: str, quality_n: int,
             runner: _Runner, seed: int, quiet: bool) -> dict:
    """Per split with ground truth: the run's masks on all images, and every method (plus the
    centre prior) on the first `quality_n` images, all scored the same way."""
    quality = {}
    for s in splits:
        split = dataset.split(s)
        if split.masks is None:
            continue
        k = min(quality_n, len(split))
        iou_sum = f_sum = 0.0
        with h5py.File(h5_path, "r") as f:
            dset = f[s]["mask"]
            for lo in range(0, len(split), 1024):  # in blocks: large splits need not fit twice in memory
                iou, fm = sal.mask_scores(dset[lo : lo + 1024], split.masks[lo : lo + 1024])
                iou_sum, f_sum = iou_sum + iou.sum(), f_sum + fm.sum()
            head = dset[:k]
        entry = {"all_images": {"iou": iou_sum / len(split), "f_beta": f_sum / len(split), "n": len(split)}}
        methods = {}
        if k:
            methods[used_method] = sal.evaluate(head, split.masks[:k])
            others = [m for m in sal.METHODS if m != used_method]
            step = max(1, -(-k // max(1, runner.workers)))
            tasks = [((m, lo), split.images[lo:min(k, lo + step)], m, None, seed)
                     for m in others for lo in range(0, k, step)]
            with options.progress_bar(quiet) as progress:
                bar = progress.add_task("quality of every method", total=len(tasks), info=f"{k} images")
                parts: dict[str, dict[int, np.ndarray]] = {m: {} for m in others}
                for (m, lo), _, mask_part in runner.map(tasks):
                    parts[m][lo] = mask_part
                    progress.update(bar, advance=1)
            for m in others:
                pred = np.concatenate([parts[m][lo] for lo in sorted(parts[m])])
                methods[m] = sal.evaluate(pred, split.masks[:k])
        entry["n"] = k
        entry["methods"] = methods
        quality[s] = entry
    return quality


def _print_quality(quality: dict, used_method: str, metrics: dict) -> None:
    from rich.table import Table

    for s, entry in quality.items():
        table = Table(title=f"mask quality on {entry['n']} {s} images (ground truth)")
        for column in ("method", "IoU", "F (beta^2=0.3)"):
            table.add_column(column)
        for m, r in sorted(entry["methods"].items(), key=lambda kv: -kv[1]["iou"]):
            label = f"[bold]{m}[/bold] (this run)" if m == used_method else m
            table.add_row(label, f"{r['iou']:.3f}", f"{r['f_beta']:.3f}")
        options.console.print(table)
    if metrics.get("images_per_s"):
        options.console.print(f"{metrics['images_this_run']:,} images at {metrics['images_per_s']:.0f} "
                              "images/s")


def write_preview(path: Path, images: np.ndarray, saliency: np.ndarray, masks: np.ndarray, *, title: str,
                  gt: np.ndarray | None = None, count: int = 16) -> None:
    """16 images in two blocks of 8 rows: image, saliency map, mask, background removed (black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(count, len(images))
    rows = -(-n // 2) if n > 1 else 1
    blocks = 2 if n > 1 else 1
    columns = ("image", "saliency", "mask", "background removed")
    fig, axes = plt.subplots(rows, 4 * blocks, figsize=(1.5 * 4 * blocks, 1.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, b = i % rows, i // rows
        cells = (images[i], saliency[i], masks[i], images[i] * masks[i][..., None].astype(np.uint8))
        for j, cell in enumerate(cells):
            ax = axes[r, 4 * b + j]
            if cell.ndim == 2:
                ax.imshow(cell, cmap="gray", vmin=0, vmax=255 if j == 1 else 1, interpolation="nearest")
            else:
                ax.imshow(cell, interpolation="nearest")
            if r == 0:
                ax.set_title(columns[j], fontsize=8)
        if gt is not None:
            iou = sal.mask_scores(masks[i : i + 1], gt[i : i + 1])[0][0]
            axes[r, 4 * b + 2].text(0.02, 0.02, f"IoU {iou:.2f}", color="yellow", fontsize=6,
                                    transform=axes[r, 4 * b + 2].transAxes)
        axes[r, 4 * b].text(-0.08, 0.5, str(i), fontsize=6, transform=axes[r, 4 * b].transAxes,
                            ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def command(
    spec: options.Spec,
    method: Annotated[str, typer.Option(
        help=f"Saliency method: {', '.join(sal.METHODS)} (default {DEFAULT_METHOD}: best measured; see "
             "docs/saliency.md).")] = DEFAULT_METHOD,
    split: Annotated[str, typer.Option(help="Split(s) to compute masks for: train, test or all.")] = "train",
    from_dir: Annotated[Path | None, typer.Option(
        help="Import masks made elsewhere: a folder of PNGs keyed by file name (imagefolder) or index "
             "(default: compute them).")] = None,
    workdir: options.Workdir = options.DEFAULT_WORKDIR,
    name: Annotated[str | None, typer.Option(
        help="Artifact name (default: the spec kind, e.g. synthetic or cifar10, plus the method when not "
             "the default).")] = None,
    seed: options.Seed = 0,
    force: options.Force = False,
    quiet: options.Quiet = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue an interrupted run: only chunks not yet written are computed.")] = False,
    limit_train: options.LimitTrain = None,
    limit_test: options.LimitTest = None,
    image_size: options.ImageSize = None,
    skip_bad: options.SkipBad = False,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: all cores).")] = None,
    chunk_size: Annotated[int | None, typer.Option(
        help="Images per chunk, the unit of work and of --resume (default: up to 512 at 32 px, fewer for "
             "large images or small splits).")] = None,
    quality_n: Annotated[int, typer.Option(
        help="With ground-truth masks (synthetic): score every method on the first N images.")] = 500,
) -> None:
    """Precompute background-removal masks (unsupervised saliency) for SPEC, or import them (--from-dir)."""
    art = run(spec, method=method, split=split, from_dir=from_dir, workdir=workdir, name=name, seed=seed,
              force=force, quiet=quiet, resume=resume, limit_train=limit_train, limit_test=limit_test,
              image_size=image_size, skip_bad=skip_bad, workers=workers, chunk_size=chunk_size,
              quality_n=quality_n)
    options.finish(art.path)
