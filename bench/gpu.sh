#!/usr/bin/env bash
# The GPU benchmark in one table, in at most 8 minutes (docs/benchmarks.md, "GPU"): images/s of the
# CIFAR-10 default (batch 512, 1024) and of the ImageNet preset (ResNet-50, batch 256, synthetic 224 px
# in memory) against lightly's BYOL example on the same GPU, data share, TFLOP/s against a bf16 matmul.
# Run from the repository root after `make install` (and `pip install -e '.[bench]'` for lightly's rows):
#   RELICV2_DATA=/path/to/data bash bench/gpu.sh        # CIFAR-10 rows on the synthetic set without it
# Extra arguments go to bench/bench_gpu.py; the tests run `bash bench/gpu.sh --device cpu --tiny ...`.
# The table lands in bench/results/gpu_cuda.json. The quality benchmark (bench/bench_quality.py) is separate.
set -euo pipefail
PY=${PY:-.venv/bin/python}
if [[ " $* " != *" --device cpu "* ]]; then
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
exec timeout 480 "$PY" bench/bench_gpu.py "$@"
