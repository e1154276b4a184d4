"""Saliency of a streamed image folder against the same folder decoded in memory.

    RELICV2_DATA=DIR .venv/bin/python bench/bench_saliency_stream.py [--images 2000] [--workers 1 2]

Writes --images JPEGs (CIFAR-10 upscaled to 96-160 px a side with a little noise, quality 90, as
bench_decode.py writes them; synthetic pictures without RELICV2_DATA) into a temporary ImageFolder,
then runs `relicv2 saliency` (default method, --split all) on it with 1 and 2 workers:

- streamed: the per-image layout, chunks decoded in loader workers, each mask at its image's size;
- in memory: --image-size 128 (the mean side), the whole set decoded when loaded, the array layout
  (soft maps and masks, gzip).

Reports images/s of the stage's work (the manifest's `images_per_s`: masks computed and written) and of
the whole call (loading, decoding, fingerprints and preview included), and the bytes per image of
masks.h5 and, streamed, of the mask PNGs alone. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_decode import cpu_model, write_jpegs  # noqa: E402

from relicv2_cli.artifacts import load_artifact  # noqa: E402
from relicv2_cli.stages.saliency import DEFAULT_METHOD  # noqa: E402


def one_run(spec: str, workdir: Path, name: str, workers: int, image_size: int | None) -> dict:
    """`relicv2 saliency` in its own process, as users run it (and so that this script's imports do
    not reach the pool's forkserver)."""
    args = ["saliency", spec, "--workdir", str(workdir), "--name", name, "--split", "all", "--workers",
            str(workers), "--quality-n", "0", "--quiet"]
    args += ["--image-size", str(image_size)] if image_size else []
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "relicv2_cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): relicv2 {' '.join(args)}")
    art = load_artifact(proc.stdout.strip().splitlines()[-1])
    h5 = art.path / "masks.h5"
    with h5py.File(h5, "r") as f:
        groups = [f[s] for s in ("train", "test")]
        n = sum(int(g.attrs["count"]) for g in groups)
        png = sum(len(m) for g in groups for m in g["mask"]) / n if f.attrs["layout"] == "per-image" else None
    return {"mode": "streamed" if image_size is None else f"in memory, --image-size {image_size}",
            "workers": workers, "images": n, "images_per_s": round(art.metrics["images_per_s"], 1),
            "end_to_end_images_per_s": round(n / wall, 1), "wall_s": round(wall, 1),
            "h5_bytes_per_image": round(h5.stat().st_size / n, 1),
            "png_bytes_per_image": None if png is None else round(png, 1),
            "foreground_fraction": round(art.metrics["foreground_fraction"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sides", type=int, nargs=2, default=[96, 160], help="range of the JPEGs' sides")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "saliency_stream.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        files = write_jpegs(root, args.images, tuple(args.sides))
        mean_kib = sum(Path(f).stat().st_size for f in files) / len(files) / 1024
        print(f"{len(files)} JPEGs of {args.sides[0]}-{args.sides[1]} px, {mean_kib:.1f} KiB each",
              flush=True)
        spec = f"imagefolder:{root}"
        side = int(np.mean(args.sides))
        for workers in args.workers:
            for image_size in (None, side):
                row = one_run(spec, Path(tmp) / "runs", f"w{workers}-{image_size}", workers, image_size)
                rows.append(row)
                print(f"  {row['mode']}, {workers} workers: {row['images_per_s']:.0f} images/s "
                      f"({row['end_to_end_images_per_s']:.0f} end to end)", flush=True)
    load_after = os.getloadavg()
    print("\n| mode | workers | images/s (stage) | images/s (end to end) | masks.h5 bytes/image | "
          "PNG bytes/image |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['workers']} | {r['images_per_s']:.0f} | "
              f"{r['end_to_end_images_per_s']:.0f} | {r['h5_bytes_per_image']:.0f} | "
              f"{r['png_bytes_per_image'] or '-'} |")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "load_average_before": load_before,
                    "load_average_after": load_after},
        "settings": {"images": args.images, "sides_px": args.sides, "jpeg_quality": 90,
                     "method": DEFAULT_METHOD, "jpeg_kib": round(mean_kib, 1),
                     "source": "cifar10 upscaled" if os.environ.get("RELICV2_DATA") else "synthetic"},
        "rows": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
