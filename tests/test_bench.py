"""bench/gpu.sh's CPU dry run: the GPU benchmark's every code path (ours, lightly's rows or their
'not installed' row, FLOP counts, the table) on tiny sizes, so that it cannot break unseen."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_benchmark_dry_run_on_cpu_prints_one_table(tmp_path):
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PY": sys.executable, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = ["--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1", "--out", str(out)]
    proc = subprocess.run(["bash", "bench/gpu.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "ours img/s" in table[0]  # header + CIFAR-10 row + ImageNet row
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"].split(",")[0] for r in rows] == ["CIFAR-10 default", "ImageNet preset"]
    for r in rows:
        assert r["ours_images_per_s"] > 0 and 0 <= r["ours_data_fraction"] < 1 and r["ours_tflops"] > 0
        assert r.get("lightly_images_per_s", 0) > 0 or "lightly not installed" in r["lightly"]
