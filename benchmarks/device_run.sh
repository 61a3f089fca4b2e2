#!/usr/bin/env bash
# One batched device session: CUDA tests, then the full-size benchmarks recorded in BENCHMARKS.md.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_run.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest tests/offload/test_offloading_cuda.py tests/kernels -q -x -p no:cacheprovider -W ignore 2>&1 \
  | tail -4 | tee "$OUT/pytest_cuda.txt"
bench() { python3 -m moe_offload bench --synthetic mixtral-8x7b "$@" 2>&1; }
bench --preset 4/2 --gpu-memory 12GiB --ablations --json "$OUT/mixtral-8x7b_4-2_12GiB.json" | tee "$OUT/bench_4-2_12GiB.txt"
bench --preset 4/3 --gpu-memory 12GiB --json "$OUT/mixtral-8x7b_4-3_12GiB.json" | tee "$OUT/bench_4-3_12GiB.txt"
bench --preset 4/2 --gpu-memory 16GiB --json "$OUT/mixtral-8x7b_4-2_16GiB.json" | tee "$OUT/bench_4-2_16GiB.txt"
