"""Saliency benchmark: mask quality of every method and images/s at 32 px and 224 px.

    .venv/bin/python bench/bench_saliency.py [--cifar DIR] [--quality-n 500]
        [--out bench/results/saliency.json]

Quality: mean IoU and F-measure (beta^2 = 0.3) against the ground-truth masks of synthetic TEST
images (a separate random stream from the train images the parameters were chosen on).
Speed, two ways:
- `1 process`: `relicv2_cli.saliency.compute` in this process, one core, per method;
- `stage, all cores`: the `relicv2 saliency` stage end to end (worker pool, HDF5 writes), default
  method, on CIFAR-10 training images at 32 px (synthetic when CIFAR is absent) and on synthetic
  images generated at 224 px.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relicv2_cli import saliency as sal  # noqa: E402
from relicv2_cli.data import load_dataset  # noqa: E402
from relicv2_cli.stages import saliency as stage  # noqa: E402


def quality(n: int, size: int) -> dict:
    data = load_dataset("synthetic", limit_train=1, limit_test=n, image_size=size)
    x, gt = data.test.images, data.test.masks
    out = {}
    for method in sal.METHODS:
        start = time.perf_counter()
        _, masks = sal.compute(x, method)
        elapsed = time.perf_counter() - start
        out[method] = {**sal.evaluate(masks, gt), "images_per_s_1proc": len(x) / elapsed}
    return out


def speed_one_process(images: np.ndarray, methods) -> dict:
    cv2.setNumThreads(1)
    out = {}
    for method in methods:
        sal.compute(images[:4], method)  # warm-up
        start = time.perf_counter()
        sal.compute(images, method)
        out[method] = len(images) / (time.perf_counter() - start)
    return out


def speed_stage(spec: str, n: int, image_size: int | None, workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        art = stage.run(spec, limit_train=n, limit_test=1, image_size=image_size, workdir=Path(tmp),
                        workers=workers, quality_n=0, quiet=True)
        total = time.perf_counter() - start
        return {"images": n, "images_per_s": art.metrics["images_per_s"],
                "wall_s_incl_load_and_preview": total,
                "workers": workers, "chunk_size": art.config["chunk_size"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_cifar = os.environ.get("RELICV2_DATA", "/work/shared/data")
    parser.add_argument("--cifar", default=default_cifar, help="folder holding cifar-10-batches-py")
    parser.add_argument("--quality-n", type=int, default=500)
    parser.add_argument("--n32", type=int, default=5000, help="images for the 32 px stage run")
    parser.add_argument("--n224", type=int, default=400, help="images for the 224 px stage run")
    parser.add_argument("--workers", type=int, default=stage._cpu_count())
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "saliency.json"))
    args = parser.parse_args()

    has_cifar = (Path(args.cifar) / "cifar-10-batches-py").is_dir()
    spec32 = f"cifar10:{args.cifar}" if has_cifar else "synthetic"
    results: dict = {
        "machine": {"cpus": stage._cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "opencv": cv2.__version__},
        "default_method": stage.DEFAULT_METHOD,
        "command": " ".join(sys.argv),
    }

    print(f"quality on {args.quality_n} synthetic test images (32 px) ...", flush=True)
    results["quality_32px"] = quality(args.quality_n, 32)

    print("speed, one process ...", flush=True)
    x32 = load_dataset(spec32, limit_train=1000, limit_test=1).train.images
    x224 = load_dataset("synthetic", limit_train=60, limit_test=1, image_size=224).train.images
    results["speed_1proc"] = {"32": speed_one_process(x32, sal.METHODS),
                              "224": speed_one_process(x224, sal.METHODS)}
    results["speed_1proc"]["32_source"] = spec32.split(":")[0]

    print(f"speed, stage end to end with {args.workers} workers ...", flush=True)
    results["speed_stage"] = {
        "32": {"spec": spec32.split(":")[0], **speed_stage(spec32, args.n32, None, args.workers)},
        "224": {"spec": "synthetic", **speed_stage("synthetic", args.n224, 224, args.workers)},
    }
    rate32 = results["speed_stage"]["32"]["images_per_s"]
    results["cifar10_train_50000_minutes_estimate"] = 50000 / rate32 / 60

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")

    print(f"\nmask quality, {args.quality_n} synthetic test images at 32 px (IoU, F beta^2=0.3):")
    print(f"{'method':14s} {'IoU':>6s} {'F':>6s}   img/s 32px 1proc   img/s 224px 1proc")
    for method, r in sorted(results["quality_32px"].items(), key=lambda kv: -kv[1]["iou"]):
        print(f"{method:14s} {r['iou']:6.3f} {r['f_beta']:6.3f}   "
              f"{results['speed_1proc']['32'][method]:15.0f}"
              f"   {results['speed_1proc']['224'][method]:17.1f}")
    for size in ("32", "224"):
        r = results["speed_stage"][size]
        print(f"stage ({stage.DEFAULT_METHOD}, {r['workers']} workers) at {size} px on {r['spec']}: "
              f"{r['images_per_s']:.0f} images/s over {r['images']} images")
    print("CIFAR-10 train (50,000 images) estimate: "
          f"{results['cifar10_train_50000_minutes_estimate']:.1f} min")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
