"""kNN gain over random init of the learning tests' runs, for the default recipe and the recipe before
BYOL's colour jitter, per-view BatchNorm and bias-free heads became the defaults.

Runs `tests/test_learning.py`'s `knn_gain` (the same data, network and steps as the tests) and prints
one JSON line per run: synthetic seeds 0 and 1 (default recipe only), CIFAR-10 seeds 0 and 1 (both
recipes; needs RELICV2_DATA). One torch thread, about 1-2 minutes a run on a 2-core CPU.

    OMP_NUM_THREADS=1 RELICV2_DATA=../shared/data python bench/bench_learning.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_learning  # noqa: E402
import torch  # noqa: E402

OLD_RECIPE = {"jitter": "torchvision", "bn_stats": "joint", "head_bias": True}


def main() -> None:
    torch.set_num_threads(1)
    data_dir = os.environ.get("RELICV2_DATA")
    runs = [("synthetic", test_learning.SYNTHETIC, seed, test_learning.SYNTHETIC_TRAIN, "default")
            for seed in (0, 1)]
    if data_dir:
        runs += [(f"cifar10:{data_dir}", test_learning.CIFAR, seed, test_learning.CIFAR_TRAIN, recipe)
                 for seed in (0, 1) for recipe in ("default", "old")]
    else:
        print("RELICV2_DATA not set: CIFAR-10 runs skipped", file=sys.stderr)
    for spec, data, seed, train, recipe in runs:
        extra = OLD_RECIPE if recipe == "old" else {}
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            trained, random_init = test_learning.knn_gain(spec, data, seed, tmp, **train, **extra)
        print(json.dumps({"data": spec.split(":")[0], "seed": seed, "recipe": recipe,
                          "knn": round(trained, 4), "random_init": round(random_init, 4),
                          "gain": round(trained - random_init, 4),
                          "seconds": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
