"""Pretraining speed: images/s, share of step time outside the model, achieved FLOP/s, peak memory.

Runs the real training loop (`run_pretrain`) for a few steps on CIFAR-10 (RELICV2_DATA) or the
synthetic set, reads its metrics.jsonl, counts the FLOPs of one step with torch's FlopCounterMode and
measures a bf16 matmul in the same process for reference. Prints a table and writes
bench/results/pretrain.json.

    python bench/bench_pretrain.py                      # CIFAR-10 default config, 12 steps
    python bench/bench_pretrain.py --steps 30 --width 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from relicv2_cli.augment import ViewConfig, make_views
from relicv2_cli.models import build_network, make_target
from relicv2_cli.stages import pretrain

RESULTS = Path(__file__).parent / "results"


def matmul_tflops(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """Achieved bf16 matmul TFLOP/s: the machine's practical ceiling for the model's convolutions."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    (a @ b).sum().item()
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.sum().item()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def step_flops(cfg: pretrain.PretrainConfig, device: torch.device, image_size: int = 32) -> float:
    """FLOPs of one training step's forward + backward (online and target networks)."""
    online = build_network(cfg.arch, cfg.width, cfg.stem, cfg.proj_hidden, cfg.proj_dim).to(device)
    target = make_target(online).to(device)
    shape = (cfg.batch_size, 3, image_size, image_size)
    images = torch.randint(0, 255, shape, dtype=torch.uint8, device=device)
    view_cfg = ViewConfig(large_crops=cfg.large_crops, small_crops=cfg.small_crops, large_size=cfg.large_size,
                          small_size=cfg.small_size, blur=cfg.blur)
    views = make_views(images, view_cfg, torch.Generator(device=device).manual_seed(0))
    labels = torch.zeros(cfg.batch_size, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as counter:
        loss, *_ = pretrain._loss(cfg, online, target, views, labels,
                                  torch.Generator(device=device).manual_seed(0), device)
        loss.backward()
    return counter.get_total_flops()


def measure_speed(cfg: pretrain.PretrainConfig, device: str, warmup_steps: int = 2) -> dict:
    """Run `run_pretrain` for cfg.max_steps steps in a temporary workdir and average its logged
    images/s and data share over the steps after the warm-up ones."""
    with tempfile.TemporaryDirectory() as tmp:
        art = pretrain.run_pretrain(cfg, workdir=Path(tmp), device=device, quiet=True)
        rows = [json.loads(line) for line in (art.path / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows if "images_per_s" in r and r["step"] > warmup_steps]
    return {"steps": len(steady), "images_per_s": sum(r["images_per_s"] for r in steady) / len(steady),
            "data_fraction": sum(r["data_fraction"] for r in steady) / len(steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--method", default="relicv2")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    data = os.environ.get("RELICV2_DATA")
    spec = f"cifar10:{data}" if data else "synthetic"
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cfg = pretrain.PretrainConfig(spec=spec, method=args.method, width=args.width, batch_size=args.batch_size,
                                  epochs=1.0, max_steps=args.steps, log_every=1, eval_every=0,
                                  precision=args.precision, limit_test=500)
    speed = measure_speed(cfg, str(device))
    images_per_s, data_fraction = speed["images_per_s"], speed["data_fraction"]
    flops = step_flops(cfg, device)
    achieved = flops * images_per_s / cfg.batch_size / 1e12
    peak = matmul_tflops(device)
    memory_gib = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    result = {
        "spec": spec, "device": str(device), "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "method": cfg.method, "arch": cfg.arch, "width": cfg.width,
        "batch_size": cfg.batch_size,
        "views": f"{cfg.large_crops}x{cfg.large_size}px + {cfg.small_crops}x{cfg.small_size}px",
        "precision": cfg.precision, "steps_measured": speed["steps"], "images_per_s": round(images_per_s, 1),
        "views_per_s": round(images_per_s * (cfg.large_crops + cfg.small_crops), 1),
        "data_fraction": round(data_fraction, 4), "gflop_per_step": round(flops / 1e9, 1),
        "achieved_tflops": round(achieved, 3), "matmul_bf16_tflops": round(peak, 3),
        "fraction_of_matmul": round(achieved / peak, 3), "peak_memory_gib": round(memory_gib, 2),
    }
    RESULTS.mkdir(exist_ok=True)
    name = f"pretrain_{device.type}_{cfg.method}_w{cfg.width:g}.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
