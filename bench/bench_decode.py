"""Decode + random resized crop speed: the streamed loader's worker path against torchvision.

    .venv/bin/python bench/bench_decode.py [--images 2000] [--workers 1 2] [--size 224] [--max-side 256]

Writes --images JPEGs (CIFAR-10 upscaled to 300-500 px a side with a little noise, quality 90; synthetic
pictures without RELICV2_DATA) into a temporary ImageFolder, then reads them all, side by side in one
run, with the same number of DataLoader workers and batch size:

- ours: relicv2_cli.stream.StepCrops, the worker path of `relicv2 pretrain --in-memory no`, one 224 px
  crop per image (decode at reduced scale where it keeps the crop's pixels, cv2 resize), uint8 batches;
- torchvision: ImageFolder + DataLoader + transforms.RandomResizedCrop(224) + PILToTensor (uint8), and
  the same with ToTensor (float), the pipeline users would otherwise write;
- ours with the ImageNet preset's views (2 x 224 + 6 x 96 crops from one decode), for the cores a GPU
  step of the preset needs;
- the same two on the folder prepared by `relicv2 data prepare --max-side 256` (shorter side capped at
  256 px, the recipe of docs/distributed.md): what a streamed ImageNet run reads. torchvision reading
  those same smaller JPEGs is measured too, so that the gain of fewer pixels is told apart from ours.

Speed per core is images per CPU second of the loader's processes (getrusage of this process and its
reaped workers): steadier than wall time on a shared machine. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relicv2_cli import stream  # noqa: E402
from relicv2_cli.augment import ViewConfig  # noqa: E402
from relicv2_cli.data import Split, load_dataset  # noqa: E402
from relicv2_cli.stages.pretrain import PRESETS  # noqa: E402


def write_jpegs(root: Path, n: int, sides: tuple[int, int] = (300, 500), seed: int = 0) -> list[str]:
    """n JPEGs in 10 class folders, each side uniform in `sides` px."""
    rng = np.random.default_rng(seed)
    data = os.environ.get("RELICV2_DATA")
    sources = load_dataset(f"cifar10:{data}", limit_train=n).train.images if data else None
    files = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
        if sources is not None:
            image = cv2.resize(sources[i % len(sources)][..., ::-1], (w, h), interpolation=cv2.INTER_CUBIC)
        else:  # smooth random pictures: a few coloured blobs
            y, x = np.mgrid[0:h, 0:w] / max(h, w)
            image = np.stack([128 + 100 * np.sin(rng.uniform(3, 20) * x + rng.uniform(3, 20) * y + c)
                              for c in range(3)], -1)
        noisy = np.clip(image.astype(np.float32) + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        path = root / f"class{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), noisy, [cv2.IMWRITE_JPEG_QUALITY, 90])
        files.append(str(path))
    return files


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the DataLoader's workers once joined)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(batches, batch: int) -> tuple[int, float, float]:
    """(images, wall seconds, CPU seconds) of iterating `batches` of `batch` images to the end (its
    workers joined)."""
    cpu, wall = cpu_seconds(), time.perf_counter()
    items = sum(1 for _ in batches)
    return items * batch, time.perf_counter() - wall, cpu_seconds() - cpu


def ours(split: Split, batch: int, workers: int, views: ViewConfig) -> tuple[int, float, float]:
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))
    crops = stream.StepCrops(split, views, lambda step: order[step * batch : (step + 1) * batch],
                             torch.arange(batch), seed=0)
    steps = len(split) // batch
    return timed(stream.step_batches(crops, 0, steps, workers, pin=False), batch)


def prepare(root: Path, out: Path, max_side: int) -> Split:
    """`relicv2 data prepare` of the folder (shorter sides capped at max_side, the ImageNet recipe of
    docs/distributed.md) with both splits in one: every image, as the folder rows read them all."""
    subprocess.run([sys.executable, "-m", "relicv2_cli", "data", "prepare", f"imagefolder:{root}",
                    "--max-side", str(max_side), "--workdir", str(out), "--name", "bench", "--quiet"],
                   check=True, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    prepared = load_dataset(f"prepared:{out / 'dataset' / 'bench'}")
    return prepared.train, prepared.test


def write_prepared(splits: tuple[Split, Split], root: Path) -> None:
    """The prepared set's JPEG bytes as a class-folder tree, for torchvision to read the same pixels."""
    for s, split in enumerate(splits):
        for i in range(len(split)):
            path = root / f"class{split.labels[i]}" / f"{s}-{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(split.encoded(i))


def torchvision_loader(root: Path, batch: int, workers: int, size: int, float_tensor: bool):
    last = transforms.ToTensor() if float_tensor else transforms.PILToTensor()
    crop = transforms.Compose([transforms.RandomResizedCrop(size), last])
    folder = torchvision.datasets.ImageFolder(str(root), crop)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch, shuffle=True, num_workers=workers,
                                         drop_last=True, generator=torch.Generator().manual_seed(0))
    return timed(loader, batch)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--sides", type=int, nargs=2, default=[300, 500], help="range of the JPEGs' sides")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-side", type=int, default=256, help="data prepare's cap on the shorter side")
    parser.add_argument("--step-s", type=float, default=1.0, help="GPU step time for the cores estimate")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    preset = PRESETS["imagenet-1000ep"]
    one_crop = ViewConfig(large_crops=1, small_crops=0, large_size=args.size)
    preset_views = ViewConfig(large_crops=preset["large_crops"], small_crops=preset["small_crops"],
                              large_size=preset["large_size"], small_size=preset["small_size"])
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        files = write_jpegs(root, args.images, tuple(args.sides))
        print(f"{len(files)} JPEGs, {sum(Path(f).stat().st_size for f in files) / len(files) / 1024:.0f} KiB "
              f"each on average, written in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        train, test = prepare(root, Path(tmp) / "prepared", args.max_side)
        write_prepared((train, test), Path(tmp) / "prepared-jpegs")
        size = sum(len(s.encoded(i)) for s in (train, test) for i in range(len(s))) / (len(train) + len(test))
        print(f"prepared (--max-side {args.max_side}): {size / 1024:.0f} KiB per image, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        folder = Split(labels=np.zeros(len(files), np.int64), files=files)

        def tv(workers: int, float_tensor: bool, source: Path = root):
            return torchvision_loader(source, args.batch, workers, args.size, float_tensor)

        small = f"{args.max_side} px"
        loaders = (
            ("ours (stream.StepCrops, uint8)", lambda w: ours(folder, args.batch, w, one_crop)),
            ("torchvision RRC + PILToTensor", lambda w: tv(w, False)),
            ("torchvision RRC + ToTensor", lambda w: tv(w, True)),
            ("ours, preset views 2x224 + 6x96", lambda w: ours(folder, args.batch, w, preset_views)),
            (f"ours, prepared set ({small})", lambda w: ours(train, args.batch, w, one_crop)),
            (f"ours, prepared set ({small}), preset views",
             lambda w: ours(train, args.batch, w, preset_views)),
            (f"torchvision RRC + PILToTensor, the prepared {small} JPEGs",
             lambda w: tv(w, False, Path(tmp) / "prepared-jpegs")),
        )
        for workers in args.workers:
            for name, run in loaders:
                images, wall, cpu = run(workers)
                rows.append({"loader": name, "workers": workers, "images": images, "wall_s": round(wall, 2),
                             "images_per_s": round(images / wall, 1),
                             "images_per_cpu_s": round(images / cpu, 1)})
                print(f"  {name}, {workers} workers: {images / wall:.0f} images/s, "
                      f"{images / cpu:.0f} per CPU-s", flush=True)
    load_after = os.getloadavg()

    def rate(name: str, workers: int) -> float:
        return next(r["images_per_cpu_s"] for r in rows if r["loader"] == name and r["workers"] == workers)

    print("\n| loader | workers | images/s | images per CPU-s (per core) |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['loader']} | {r['workers']} | {r['images_per_s']:.0f} | {r['images_per_cpu_s']:.0f} |")
    names = [name for name, _ in loaders]

    def ratio(a: int, b: int) -> dict:
        return {w: round(rate(names[a], w) / rate(names[b], w), 2) for w in args.workers}

    speedups, prepared_speedups, same_small = ratio(0, 1), ratio(4, 1), ratio(4, 6)
    batch = preset["batch_size"]
    best_preset = max(rate(names[3], w) for w in args.workers)
    best_prepared = max(rate(names[5], w) for w in args.workers)
    cores, cores_prepared = (batch / (r * args.step_s) for r in (best_preset, best_prepared))
    print(f"\nours / torchvision (PILToTensor), per core, the same JPEGs: {speedups}")
    print(f"ours on the prepared set / torchvision on the original JPEGs: {prepared_speedups}; "
          f"ours / torchvision both on the prepared JPEGs: {same_small}")
    print(f"ImageNet preset (batch {batch}, 2x224 + 6x96 crops per image): {best_preset:.0f} images per "
          f"CPU-s from the files -> {cores:.0f} CPU cores to feed a {args.step_s:g} s GPU step; "
          f"{best_prepared:.0f} from the prepared set -> {cores_prepared:.0f} cores")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "opencv": cv2.__version__,
                    "load_average_before": load_before, "load_average_after": load_after},
        "settings": {"images": args.images, "sizes_px": args.sides, "jpeg_quality": 90, "size": args.size,
                     "batch": args.batch, "source": "cifar10 upscaled" if os.environ.get("RELICV2_DATA")
                     else "synthetic"},
        "rows": rows, "speedup_per_core": speedups, "prepared_max_side": args.max_side,
        "speedup_per_core_prepared_vs_torchvision_on_originals": prepared_speedups,
        "speedup_per_core_both_on_prepared_jpegs": same_small,
        "preset": {"batch": batch, "images_per_cpu_s": best_preset, "step_s": args.step_s,
                   "cores_needed": round(cores, 1), "images_per_cpu_s_prepared": best_prepared,
                   "cores_needed_prepared": round(cores_prepared, 1)},
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
