"""Data-parallel pretraining throughput: one process vs N processes (torchrun) on this machine.

Runs the real command, `python -m relicv2_cli pretrain` for one process and
`python -m torch.distributed.run --nproc-per-node=N -m relicv2_cli pretrain` for N, with the same
global batch and a chosen number of threads per process (OMP_NUM_THREADS), reads
rank 0's metrics.jsonl (images/s of the global batch, warm-up steps skipped) and writes
bench/results/distributed_<device>.json.

    python bench/bench_distributed.py    # synthetic 32 px, batch 64: 1x1, 2x1, 1x2 (procs x threads)
    python bench/bench_distributed.py --runs 1:1,2:1,4:1 --batch-size 256 --steps 20 --device cuda

On CPU the interesting comparison is at equal cores: 2 processes of 1 thread against 1 process of
2 threads (and against 1 process of 1 thread, the per-core rate). On N GPUs it is the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, threads: int, args: argparse.Namespace, workdir: Path) -> dict:
    pretrain = ["pretrain", args.spec, "--limit-train", str(args.batch_size * (args.steps + 1)),
                "--limit-test", "64",
                "--image-size", "32", "--width", str(args.width), "--proj-hidden", "256", "--proj-dim", "64",
                "--batch-size", str(args.batch_size), "--epochs", "1", "--max-steps", str(args.steps),
                "--log-every", "1", "--eval-every", "0", "--precision", args.precision, "--device",
                args.device,
                "--dist-sampling", args.sampling, "--checkpoint-every", "100000", "--quiet",
                "--workdir", str(workdir), "--name", f"n{nproc}t{threads}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "relicv2_cli", *pretrain]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "relicv2_cli", *pretrain]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's intra-op threads per process
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{proc.stderr[-3000:]}")
    log = workdir / "pretrain" / f"n{nproc}t{threads}" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    steady = [r for r in rows if "images_per_s" in r and r["step"] > args.warmup]
    images_per_s = sum(r["images_per_s"] for r in steady) / len(steady)
    return {"processes": nproc, "threads_per_process": threads, "images_per_s": round(images_per_s, 1),
            "step_s": round(args.batch_size / images_per_s, 3), "steps_measured": len(steady),
            "data_fraction": round(sum(r["data_fraction"] for r in steady) / len(steady), 3),
            "wall_s_including_start": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="1:1,2:1,1:2",
                        help="comma-separated PROCESSES:THREADS_PER_PROCESS (default: 1 process on 1 core, "
                             "2 processes "
                             "on 1 core each, 1 process on 2 cores)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the average")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--sampling", default="local", choices=("local", "global"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--spec", default="synthetic")
    parser.add_argument("--repeat", type=int, default=2,
                        help="run the whole sequence this many times, interleaved, and keep the median "
                             "(on a shared machine single runs move by 2x)")
    args = parser.parse_args()

    configs = [tuple(int(v) for v in item.split(":")) for item in args.runs.split(",")]
    trials: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    for attempt in range(args.repeat):
        for nproc, threads in configs:
            with tempfile.TemporaryDirectory() as tmp:
                trials[(nproc, threads)].append(run(nproc, threads, args, Path(tmp)))
            print(json.dumps({"repeat": attempt, **trials[(nproc, threads)][-1]}), flush=True)
    results = []
    for config in configs:
        runs = sorted(trials[config], key=lambda r: r["images_per_s"])
        median = runs[len(runs) // 2]
        results.append({**median, "images_per_s_all": [r["images_per_s"] for r in trials[config]]})
    base = results[0]["images_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["images_per_s"] / base, 3)
        r["cores_used"] = r["processes"] * r["threads_per_process"]
    report = {"device": args.device, "machine": platform.processor() or platform.machine(),
              "cores": os.cpu_count(),
              "spec": args.spec, "arch": "resnet18", "width": args.width, "global_batch": args.batch_size,
              "views": "2x32px + 2x16px", "precision": args.precision, "dist_sampling": args.sampling,
              "load_average_at_end": round(os.getloadavg()[0], 2), "runs": results}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"distributed_{args.device}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'processes':>9} {'threads':>7} {'images/s':>9} {'step s':>7} {'speed-up':>8}")
    for r in results:
        print(f"{r['processes']:>9} {r['threads_per_process']:>7} {r['images_per_s']:>9} {r['step_s']:>7} "
              f"{r['speedup_vs_first']:>8}")


if __name__ == "__main__":
    main()
