"""One table for a GPU (bench/gpu.sh): images/s of our pretraining step against lightly's BYOL example
on the same device, the share of step time spent making the batch, and achieved TFLOP/s against a bf16
matmul measured in the same run.

Rows (each also run through lightly's example: same network, batch and large-view size, its 2 views
made by PIL transforms in DataLoader workers):
- CIFAR-10 default: ResNet-18 cifar stem, 2 x 32 + 2 x 16 px views, batch 512 and 1024 (CIFAR-10 from
  RELICV2_DATA when set, else the synthetic set at 32 px; both in memory);
- ImageNet preset: its network and views (ResNet-50, 2 x 224 + 6 x 96 px, blur), batch 256, on
  synthetic 224 px images in memory.
Ours: `setup` + `train_step` of relicv2 pretrain, timed over --steps steps after --warmup, with no wait
for the device in between (wall clock / steps); data share from the step's CUDA events. Without
lightly (the `bench` extra) its rows say so. `--device cpu --tiny` is the dry run the tests use.

    python bench/bench_gpu.py                         # on the GPU, a few minutes
    python bench/bench_gpu.py --device cpu --tiny --steps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
from bench_pretrain import matmul_tflops, step_flops

from relicv2_cli import distributed
from relicv2_cli.stages import pretrain

try:
    import lightly_byol
except ImportError as error:  # lightly missing: the table says so instead of failing
    lightly_byol, LIGHTLY_MISSING = None, f"lightly not installed ({error.name}); pip install -e '.[bench]'"
else:
    LIGHTLY_MISSING = ""

RESULTS = Path(__file__).parent / "results"


def rows(tiny: bool) -> list[tuple[str, dict, int]]:
    """(name, PretrainConfig fields, image side of the in-memory data)."""
    imagenet = {k: v for k, v in pretrain.PRESETS["imagenet-1000ep"].items()
                if k not in ("batch_size", "epochs")}
    if tiny:  # the same code paths at sizes a CPU runs in seconds
        small = dict(width=0.25, proj_hidden=64, proj_dim=32)
        return [("CIFAR-10 default, batch 16 (tiny)", dict(small, batch_size=16), 32),
                ("ImageNet preset, batch 8 (tiny)",
                 dict(imagenet, **small, arch="resnet18", batch_size=8, large_size=64, small_size=32,
                      small_crops=2), 64)]
    cifar: dict = {}
    return [("CIFAR-10 default, batch 512", dict(cifar, batch_size=512), 32),
            ("CIFAR-10 default, batch 1024", dict(cifar, batch_size=1024), 32),
            ("ImageNet preset (ResNet-50), batch 256", dict(imagenet, batch_size=256), 224)]


def spec_for(size: int) -> tuple[str, int | None]:
    data = os.environ.get("RELICV2_DATA")
    if size == 32 and data and (Path(data) / "cifar-10-batches-py").is_dir():
        return f"cifar10:{data}", None
    return "synthetic", size


def run_ours(fields: dict, size: int, device: torch.device, steps: int, warmup: int, compile: bool) -> dict:
    spec, image_size = spec_for(size)
    batch = fields["batch_size"]
    cfg = pretrain.PretrainConfig(spec=spec, image_size=image_size, limit_train=4 * batch, limit_test=16,
                                  compile=compile, **fields)
    ddp = distributed.setup(device)
    run = pretrain.setup(cfg, device, ddp)
    clocks = []
    for step in range(steps):
        if step == warmup:
            wait(device)
            start = time.perf_counter()
        clocks.append(pretrain.train_step(run, step, ddp)["clock"])
    wait(device)
    seconds = time.perf_counter() - start
    shares = [clock.seconds()[1] for clock in clocks[warmup:]]
    flops = step_flops(cfg, device, image_size=size)
    images = run.dataset.train.images
    del run
    return {"images_per_s": batch * (steps - warmup) / seconds, "data_fraction": statistics.median(shares),
            "flops": flops, "views": cfg.large_crops + cfg.small_crops, "images": images, "cfg": cfg}


def run_lightly(cfg: pretrain.PretrainConfig, images, device: torch.device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    model, _ = lightly_byol.build("ours", cfg.width, cfg.arch, cfg.stem)
    loader = lightly_byol.make_array_loader(images, cfg.large_size, cfg.batch_size,
                                            workers=min(os.cpu_count(), 16), blur=cfg.blur)
    timings = []
    lightly_byol.train(model, loader, epochs=math.ceil(steps * cfg.batch_size / len(images)) + 1,
                       max_steps=steps, device=str(device), on_step=lambda s, d, t: timings.append((s, d, t)))
    steady = [(d, t) for s, d, t in timings if s > warmup]
    flops = lightly_byol.step_flops(model, cfg.batch_size, cfg.large_size, device)
    return {"images_per_s": cfg.batch_size / statistics.median(t for _, t in steady),
            "data_fraction": statistics.median(d / t for d, t in steady), "flops": flops}


def wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny networks and images: a CPU dry run")
    parser.add_argument("--compile", action="store_true", help="ours with --compile")
    parser.add_argument("--out", type=Path, default=None, help="JSON of the table (default bench/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = matmul_tflops(device, n=256 if args.tiny else 8192)
    table = []
    for name, fields, size in rows(args.tiny):
        ours = run_ours(fields, size, device, args.steps, args.warmup, args.compile)
        cfg = ours["cfg"]
        views = f"{cfg.large_crops}x{cfg.large_size} + {cfg.small_crops}x{cfg.small_size}"
        row = {"config": name, "views": views,
               "ours_images_per_s": round(ours["images_per_s"], 1),
               "ours_views_per_s": round(ours["images_per_s"] * ours["views"], 1),
               "ours_data_fraction": round(ours["data_fraction"], 4),
               "ours_tflops": round(ours["flops"] * ours["images_per_s"] / cfg.batch_size / 1e12, 3)}
        if lightly_byol is None:
            row["lightly"] = LIGHTLY_MISSING
        else:
            theirs = run_lightly(cfg, ours["images"], device, args.steps, args.warmup)
            tflops = theirs["flops"] * theirs["images_per_s"] / cfg.batch_size / 1e12
            row.update({"lightly_images_per_s": round(theirs["images_per_s"], 1),
                        "lightly_data_fraction": round(theirs["data_fraction"], 4),
                        "lightly_tflops": round(tflops, 3)})
        table.append(row)
        print(f"done: {name}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "matmul_bf16_tflops": round(peak, 2), "steps": args.steps, "warmup": args.warmup,
              "compile": args.compile, "rows": table}
    out = args.out or RESULTS / f"gpu_{device.type}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{result['device']}, bf16, {args.steps - args.warmup} timed steps; "
          f"bf16 matmul {peak:.3g} TFLOP/s\n")
    print("| configuration | views | ours img/s | lightly BYOL img/s | ours / lightly | data share ours / "
          "lightly | TFLOP/s ours (of matmul) / lightly |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        if "lightly" in r:
            theirs, ratio, tflops = r["lightly"], "-", "-"
            share = f"{100 * r['ours_data_fraction']:.1f}% / -"
        else:
            theirs = r["lightly_images_per_s"]
            ratio = f"{r['ours_images_per_s'] / theirs:.2f}x"
            share = f"{100 * r['ours_data_fraction']:.1f}% / {100 * r['lightly_data_fraction']:.1f}%"
            tflops = r["lightly_tflops"]
        print(f"| {r['config']} | {r['views']} | {r['ours_images_per_s']} | {theirs} | {ratio} | {share} | "
              f"{r['ours_tflops']} ({100 * r['ours_tflops'] / peak:.0f}%) / {tflops} |")


if __name__ == "__main__":
    main()
