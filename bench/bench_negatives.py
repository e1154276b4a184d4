"""Negative sampling speed: one `sample_negatives` call per (online, target) pair of a step.

    .venv/bin/python bench/bench_negatives.py [--batch 4096] [--pool 8192] [--n 10] [--repeats 20]

Compares the sampler in relicv2_cli.losses (Floyd's algorithm, O(batch * n) draws) with the
top-n-of-uniform-scores sampler it replaced (O(batch * pool) draws), on one CPU thread, for a local
pool and for `global_rows` (every anchor of the pool drawn, as under `--dist-sampling global`).
Prints a table (median ms per call) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relicv2_cli.losses import sample_negatives  # noqa: E402


def topk_sampler(batch: int, n: int, generator: torch.Generator, pool: int) -> torch.Tensor:
    """The previous sampler: i.i.d. uniform scores for every (anchor, pool row), positive masked, top n."""
    scores = torch.rand(batch, pool, generator=generator)
    rows = torch.arange(batch)
    scores[rows, rows] = -1.0
    return scores.topk(n, dim=1, sorted=False).indices


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pool", type=int, default=8192)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "negatives_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    b, pool, n = args.batch, args.pool, args.n
    rows = {
        "top-n of uniform scores (before)": median_ms(lambda: topk_sampler(b, n, g, pool), args.repeats),
        "Floyd, local rows (now)": median_ms(
            lambda: sample_negatives(b, n, g, "cpu", pool=pool), args.repeats),
        "Floyd, global_rows (now)": median_ms(
            lambda: sample_negatives(b, n, g, "cpu", offset=0, pool=pool, global_rows=True), args.repeats),
    }
    print(f"sample_negatives, batch {b}, pool {pool}, n_e {n}, 1 CPU thread ({cpu_model()})")
    print(f"{'sampler':<36} {'ms per call':>12}")
    for name, ms in rows.items():
        print(f"{name:<36} {ms:>12.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": b, "pool": pool, "n_negatives": n, "threads": 1,
                                    "cpu": cpu_model(), "median_ms": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
