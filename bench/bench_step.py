"""Median optimizer-step time of the training loop's `train_step`, several code trees and settings
interleaved (A B A B ...) so that a busy spell of a shared machine hits all of them.

Each (tree, settings) run is a fresh child process with PYTHONPATH=TREE: `setup` of the default CIFAR-10
recipe (RELICV2_DATA, else the synthetic set), --steps steps timed on the host clock after waiting for
the device, the first --warmup dropped. Trees: this one, or another checkout (e.g. `git archive COMMIT
relicv2_cli | tar -x -C /tmp/before`) for before/after; settings: PretrainConfig fields.

    python bench/bench_step.py --run before=/tmp/before --run "after=." \\
        --run "after, channels-last off=.:channels_last=off" --rounds 3 --width 0.25
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def child(args: argparse.Namespace) -> None:
    import torch

    from relicv2_cli import distributed
    from relicv2_cli.stages import pretrain

    torch.set_num_threads(args.threads)
    data = os.environ.get("RELICV2_DATA")
    overrides = {key: _value(text) for key, text in (item.split("=", 1) for item in args.set)}
    cfg = pretrain.PretrainConfig(spec=f"cifar10:{data}" if data else "synthetic", width=args.width,
                                  batch_size=args.batch_size, limit_train=4 * args.batch_size, limit_test=100,
                                  **overrides)
    dev = torch.device(args.device)
    ddp = distributed.setup(dev)
    run = pretrain.setup(cfg, dev, ddp)
    extra = (Path("unused"),) if len(inspect.signature(pretrain.train_step).parameters) == 4 else ()
    times, cpu = [], []
    for step in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = pretrain.train_step(run, step, ddp, *extra)
        out["loss"].item()  # wait for the device
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    print(json.dumps({"first_s": times[0], "steps_s": times[args.warmup:], "cpu_s": cpu[args.warmup:]}))


def _value(text: str):
    """A --set value: JSON where it parses (16, 0.5, true), else the string (on, off)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[],
                        help="NAME=TREE[:FIELD=VALUE,...], repeatable (default: this tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least hurt by other load)")
    parser.add_argument("--out", type=Path, default=RESULTS / "step_cpu.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    runs = {}
    for spec in args.run or ["this tree=."]:
        name, rest = spec.split("=", 1)
        tree, _, settings = rest.partition(":")
        runs[name] = (Path(tree).resolve(), [s for s in settings.split(",") if s])
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--width", str(args.width),
              "--batch-size", str(args.batch_size), "--device", args.device,
              "--threads", str(args.threads)]
    times: dict[str, list[float]] = {name: [] for name in runs}
    first: dict[str, list[float]] = {name: [] for name in runs}  # includes compilation with compile=1
    # CPU seconds of the process per step: on a machine shared with other jobs, far steadier than wall time
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, (tree, settings) in runs.items():
            sets = [a for s in settings for a in ("--set", s)]
            cmd = [sys.executable, __file__, "--child", *common, *sets]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            measured = json.loads(result.stdout.strip().splitlines()[-1])
            times[name] += measured["steps_s"]
            cpu[name] += measured["cpu_s"]
            first[name].append(round(measured["first_s"], 2))
            print(f"round {round_ + 1}: {name}: {statistics.median(times[name]):.3f} s/step so far",
                  flush=True)
    rows = [{"run": name, "tree": str(runs[name][0]), "settings": runs[name][1],
             "median_step_s": round(statistics.median(t), 3), "step_s": [round(x, 3) for x in t],
             "images_per_s": round(args.batch_size / statistics.median(t), 1), "first_step_s": first[name],
             "median_cpu_s": round(statistics.median(cpu[name]), 3),
             "cpu_s": [round(x, 3) for x in cpu[name]]}
            for name, t in times.items()]
    result = {"width": args.width, "batch_size": args.batch_size, "device": args.device,
              "rounds": args.rounds,
              "steps_per_run": args.steps, "warmup": args.warmup, "cpus": os.cpu_count(),
              "threads": args.threads,
              "load_average": os.getloadavg(), "rows": rows}
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ResNet-18 w{args.width:g} cifar stem, batch {args.batch_size}, 2x32 + 2x16 px, bf16; median of "
          f"{args.rounds} interleaved rounds x {args.steps - args.warmup} steps\n")
    print("| run | wall s/step | img/s | CPU s/step |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['median_step_s']} | {r['images_per_s']} | {r['median_cpu_s']} |")


if __name__ == "__main__":
    main()
