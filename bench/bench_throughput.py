"""Pretraining throughput against lightly, interleaved in one process, and where the time goes.

Same backbone (ResNet-18, cifar stem, --width), same batch (256), bf16 autocast on both sides, CIFAR-10
from RELICV2_DATA. Three configurations run in turn, --rounds times, --steps steps each (the first
two of every run are dropped as warm-up), so that a slow spell of the machine hits all of them:

- ours, BYOL, 2 x 32 px views: `relicv2 pretrain --method byol --small-crops 0` (same views as lightly);
- lightly BYOL example, 2 x 32 px views: bench/lightly_byol.py (PIL transforms in DataLoader workers);
- ours, RELICv2, 2 x 32 + 2 x 16 px views: the default recipe (more views per image, so fewer images/s).

Per configuration: images/s and views/s (median over rounds), the share of a step spent waiting for
data + augmentation, FLOPs per step (torch FlopCounterMode) and achieved FLOP/s against a bf16 matmul
measured in the same run. Writes bench/results/throughput_DEVICE_wWIDTH.json and .md.

    python bench/bench_throughput.py                 # about 12 minutes on 2 CPU cores at width 1
    python bench/bench_throughput.py --rounds 1 --steps 4 --width 0.25
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

import lightly_byol
import torch
from bench_pretrain import matmul_tflops, measure_speed, step_flops

from relicv2_cli.stages import pretrain

RESULTS = Path(__file__).parent / "results"
WARMUP_STEPS = 2


def run_ours(spec: str, method: str, small_crops: int, width: float, steps: int, device: str) -> dict:
    cfg = pretrain.PretrainConfig(spec=spec, method=method, small_crops=small_crops, width=width,
                                  batch_size=256,
                                  epochs=1.0, max_steps=steps, log_every=1, eval_every=0, limit_train=10_000,
                                  limit_test=100)
    return measure_speed(cfg, device, WARMUP_STEPS)


def run_lightly(loader, width: float, steps: int, device: str) -> dict:
    torch.manual_seed(0)
    model, _ = lightly_byol.build("ours", width)
    timings = []
    lightly_byol.train(model, loader, epochs=1, max_steps=steps, device=device,
                       on_step=lambda s, d, t: timings.append((s, d, t)))
    steady = [(d, t) for s, d, t in timings if s > WARMUP_STEPS]
    return {"images_per_s": statistics.mean(loader.batch_size / t for _, t in steady),
            "data_fraction": statistics.mean(d / t for d, t in steady)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.environ.get("RELICV2_DATA"))
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="steps per run, the first 2 dropped")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if not args.data or not (Path(args.data) / "cifar-10-batches-py").is_dir():
        raise SystemExit("needs CIFAR-10: set RELICV2_DATA (or --data) to the folder holding "
                         "cifar-10-batches-py")
    spec = f"cifar10:{args.data}"
    loader = lightly_byol.make_loader(args.data)  # built once: its worker processes persist across rounds

    configs = {
        "ours BYOL, 2x32px": (lambda: run_ours(spec, "byol", 0, args.width, args.steps, args.device), 2),
        "lightly BYOL example, 2x32px": (lambda: run_lightly(loader, args.width, args.steps, args.device), 2),
        "ours RELICv2, 2x32px + 2x16px": (lambda: run_ours(spec, "relicv2", 2, args.width, args.steps,
                                                           args.device), 4),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_ in range(args.rounds):
        for name, (run, _) in configs.items():
            runs[name].append(run())
            print(f"round {round_ + 1}: {name}: {runs[name][-1]['images_per_s']:.1f} img/s", flush=True)

    device = torch.device(args.device)
    flops = {
        "ours BYOL, 2x32px": step_flops(
            pretrain.PretrainConfig(method="byol", small_crops=0, width=args.width), device),
        "lightly BYOL example, 2x32px": lightly_byol.step_flops(
            lightly_byol.build("ours", args.width)[0], 256, 32, device),
        "ours RELICv2, 2x32px + 2x16px": step_flops(
            pretrain.PretrainConfig(method="relicv2", width=args.width), device),
    }
    peak = matmul_tflops(device)
    rows = []
    for name, (_, views) in configs.items():
        ips = statistics.median(r["images_per_s"] for r in runs[name])
        achieved = flops[name] * ips / 256 / 1e12
        rows.append({"config": name, "images_per_s": round(ips, 1), "views_per_s": round(ips * views, 1),
                     "images_per_s_rounds": [round(r["images_per_s"], 1) for r in runs[name]],
                     "data_fraction": round(statistics.median(r["data_fraction"] for r in runs[name]), 4),
                     "gflop_per_step": round(flops[name] / 1e9, 1), "achieved_tflops": round(achieved, 3),
                     "fraction_of_matmul": round(achieved / peak, 3)})
    ratio = rows[0]["images_per_s"] / rows[1]["images_per_s"]
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(),
                          "lightly": lightly_byol.lightly_version()},
              "width": args.width, "batch_size": 256, "precision": "bf16 autocast", "rounds": args.rounds,
              "steps_per_run": args.steps, "matmul_bf16_tflops": round(peak, 3), "rows": rows,
              "ours_byol_over_lightly_byol": round(ratio, 2)}
    RESULTS.mkdir(exist_ok=True)
    stem = f"throughput_{torch.device(args.device).type}_w{args.width:g}"  # "w0.25": no with_suffix
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"ResNet-18 w{args.width:g} cifar stem, batch 256, bf16, CIFAR-10; median of {args.rounds} "
             "interleaved rounds; "
             f"bf16 matmul {peak:.2f} TFLOP/s.", "",
             "| configuration | img/s | views/s | per round | data + aug share | GFLOP/step | TFLOP/s | of "
             "matmul |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['images_per_s']} | {r['views_per_s']} | "
              f"{', '.join(map(str, r['images_per_s_rounds']))} | "
              f"{100 * r['data_fraction']:.1f}% | {r['gflop_per_step']:,} | {r['achieved_tflops']} | "
              f"{100 * r['fraction_of_matmul']:.0f}% |"
              for r in rows]
    lines += ["", f"ours / lightly (BYOL, same views): {ratio:.2f}x"]
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
