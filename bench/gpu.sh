#!/usr/bin/env bash
# The benchmarks on a machine with one GPU, in at most ten minutes (1-3 of docs/benchmarks.md):
#   1+2. throughput against lightly's BYOL, interleaved, with the data share and achieved FLOP/s;
#   3.   quality at a fixed budget (1 minute of training per method instead of 10).
# Run from the repository root after `make install` and `pip install -e '.[bench]'`:
#   RELICV2_DATA=/path/to/data bash bench/gpu.sh
# Results land in bench/results/throughput_cuda_w1.* and bench/results/quality_gpu.*.
set -euo pipefail
: "${RELICV2_DATA:?set RELICV2_DATA to the folder holding cifar-10-batches-py}"
PY=${PY:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 180 "$PY" bench/bench_throughput.py --device cuda --rounds 3 --steps 30
timeout 400 "$PY" bench/bench_quality.py --budget 1 --skip-semi --workdir runs/bench-quality-gpu \
    --out bench/results/quality_gpu.json
