"""Peak memory of streamed pretraining against the size of the training split.

    .venv/bin/python bench/bench_memory.py [--counts 10000 50000] [--steps 30] [--cache DIR]

Writes CIFAR-10's 50,000 training images (RELICV2_DATA; synthetic pictures without it) once as a
JPEG folder (`train/` + `val/`, each image upscaled to a random size of 96-160 px a side, quality 90)
into --cache, prepares it with `relicv2 data prepare` once per count (`--limit-train N`, a
class-balanced subset), then runs the same streamed pretraining on each prepared set as a
subprocess: 64 px large crops, `--in-memory no --workers 1`, OMP_NUM_THREADS=1, the same number of
steps. Memory is sampled from /proc every 0.1 s over the training process and its loader worker:
the sum of their RSS (shared pages counted in each process) and of their PSS (shared pages split
between the processes that share them). "training" is the peak until the last step's log line,
"with final eval" includes the kNN evaluation after the last step, whose train-split features are
O(N) by nature. Prints a table, writes bench/results/memory_cpu.json. Goal (issue 13): the larger
split's training peak at most 10% above the smaller's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relicv2_cli.data import load_dataset  # noqa: E402

SIDES = (96, 160)
TEST_IMAGES = 1000
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_folder(root: Path, n_train: int, seed: int = 0) -> None:
    """train/ and val/ JPEG folders (10 classes) at random sizes in SIDES; skipped when complete."""
    done = root / ".complete"
    if done.exists() and done.read_text() == str(n_train):
        return
    data = os.environ.get("RELICV2_DATA")
    rng = np.random.default_rng(seed)
    if data:
        cifar = load_dataset(f"cifar10:{data}")
        splits = {"train": (cifar.train.images, cifar.train.labels),
                  "val": (cifar.test.images, cifar.test.labels)}
    else:  # smooth random pictures
        y, x = np.mgrid[0:32, 0:32] / 32
        pictures = np.stack([np.stack([128 + 100 * np.sin(rng.uniform(3, 20) * x + rng.uniform(3, 20) * y + c)
                                       for c in range(3)], -1) for _ in range(100)]).astype(np.uint8)
        splits = {s: (pictures[np.arange(n) % 100], np.arange(n) % 10)
                  for s, n in (("train", n_train), ("val", TEST_IMAGES))}
    for split, count in (("train", n_train), ("val", TEST_IMAGES)):
        images, labels = splits[split]
        for i in range(count):
            w, h = (int(v) for v in rng.integers(SIDES[0], SIDES[1] + 1, 2))
            image = cv2.resize(images[i][..., ::-1], (w, h), interpolation=cv2.INTER_CUBIC)
            path = root / split / f"class{int(labels[i])}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    done.write_text(str(n_train))


def relicv2(*args: str, env: dict) -> str:
    """Run the CLI; its last stdout line (the artifact path)."""
    proc = subprocess.run([sys.executable, "-m", "relicv2_cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"relicv2 {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def tree(pid: int) -> list[int]:
    """pid and its descendants (the loader's workers)."""
    pids, i = [pid], 0
    while i < len(pids):
        for task in Path(f"/proc/{pids[i]}/task").glob("*"):
            try:
                pids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        i += 1
    return pids


def memory(pids: list[int]) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) in bytes of `pids` (processes gone meanwhile count 0)."""
    rss = pss = 0
    for pid in pids:
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1]) * 1024
        except (OSError, IndexError, ValueError):
            pass
    return rss, pss


def logged_steps(log: Path) -> int:
    try:
        return sum(1 for line in log.read_text().splitlines() if '"loss"' in line)
    except OSError:
        return 0


def measure(spec: str, steps: int, workdir: Path, name: str, env: dict) -> dict:
    args = [sys.executable, "-m", "relicv2_cli", "pretrain", spec, "--in-memory", "no", "--workers", "1",
            "--arch", "resnet18", "--width", "0.25", "--proj-hidden", "512", "--large-size", "64",
            "--small-size", "32", "--batch-size", "64", "--max-steps", str(steps), "--log-every", "1",
            "--eval-every", "0", "--workdir", str(workdir), "--name", name, "--force", "--quiet"]
    log = workdir / "pretrain" / f".{name}.partial" / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peak = {"training": [0, 0], "with final eval": [0, 0]}
    training, train_s = True, None
    while proc.poll() is None:
        rss, pss = memory(tree(proc.pid))
        if training and logged_steps(log) >= steps - 1:  # the last step's line follows its evaluation
            training, train_s = False, time.perf_counter() - start
        for phase in (["training"] if training else []) + ["with final eval"]:
            peak[phase] = [max(peak[phase][0], rss), max(peak[phase][1], pss)]
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"pretrain on {spec} failed:\n{proc.stderr.read()[-3000:]}")
    mib = 2.0**20
    return {"spec": spec, "steps": steps, "train_s": round(train_s or 0.0, 1),
            "total_s": round(time.perf_counter() - start, 1),
            "training_rss_mib": round(peak["training"][0] / mib, 1),
            "training_pss_mib": round(peak["training"][1] / mib, 1),
            "with_eval_rss_mib": round(peak["with final eval"][0] / mib, 1),
            "with_eval_pss_mib": round(peak["with final eval"][1] / mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs=2, default=[10_000, 50_000])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/relicv2-bench-memory"),
                        help="the JPEG folder and prepared sets, kept between runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "memory_cpu.json")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    small, large = args.counts
    folder = args.cache / "jpegs"
    write_folder(folder, large)
    prepared = {}
    for n in args.counts:
        path = args.cache / "dataset" / f"n{n}"
        if not (path / "manifest.json").exists():
            path = Path(relicv2("data", "prepare", f"imagefolder:{folder}", "--limit-train", str(n),
                                "--workers", "1", "--workdir", str(args.cache), "--name", f"n{n}", "--force",
                                "--quiet", env=env))
        prepared[n] = f"prepared:{path}"
    load_before = os.getloadavg()
    rows = [{"train_images": n, **measure(prepared[n], args.steps, args.cache, f"mem{n}", env)}
            for n in args.counts]
    load_after = os.getloadavg()
    ratio = {key: round(rows[1][key] / rows[0][key], 3) for key in
             ("training_rss_mib", "training_pss_mib", "with_eval_rss_mib", "with_eval_pss_mib")}
    print("\n| train images | steps | training: RSS MiB | training: PSS MiB | with final eval: RSS MiB "
          "| with final eval: PSS MiB | train s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['train_images']:,} | {r['steps']} | {r['training_rss_mib']:.0f} "
              f"| {r['training_pss_mib']:.0f} | {r['with_eval_rss_mib']:.0f} | {r['with_eval_pss_mib']:.0f} "
              f"| {r['train_s']:.0f} |")
    print(f"| ratio {large:,} / {small:,} | | {ratio['training_rss_mib']:.3f} "
          f"| {ratio['training_pss_mib']:.3f} | {ratio['with_eval_rss_mib']:.3f} "
          f"| {ratio['with_eval_pss_mib']:.3f} | |")
    goal = ratio["training_rss_mib"] <= 1.10
    print(f"goal (training peak RSS of {large:,} at most 10% above {small:,}): "
          f"{'met' if goal else 'NOT met'}")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": load_after},
        "settings": {"sides_px": SIDES, "jpeg_quality": 90, "source": "cifar10 upscaled"
                     if os.environ.get("RELICV2_DATA") else "synthetic", "test_images": TEST_IMAGES,
                     "pretrain": "resnet18 w0.25, 2x64 + 2x32 px crops, batch 64, --in-memory no "
                                 "--workers 1, OMP_NUM_THREADS=1", "sample_interval_s": 0.1},
        "rows": rows, "ratio_large_over_small": ratio, "goal_met": goal,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
