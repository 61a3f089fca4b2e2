#!/usr/bin/env bash
# Grouped expert kernels (device-side routing): CUDA tests, then resident / offloaded decode at full size.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_grouped.sh [STEP]
# STEP: tests, profile, mixtral, qwen3, all (default).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
STEP=${1:-all}
step() { [[ $STEP == all || $STEP == "$1" ]]; }
bench() { python3 -m moe_offload bench --hybrid off --synthetic "$@" 2>&1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device_grouped.txt"
step tests && python3 -m pytest tests/kernels/test_grouped_kernels.py tests/kernels/test_attention.py tests/test_graphs.py \
  tests/offload/test_offloading_cuda.py tests/test_grouped.py -q -x -p no:cacheprovider -W ignore 2>&1 \
  | tail -15 | tee "$OUT/pytest_grouped.txt"
step profile && python3 benchmarks/profile_decode.py --synthetic mixtral-8x7b --preset 4/2 --steps 16 2>&1 \
  | grep -v '^-' | cut -c1-160 | tee "$OUT/profile_resident.txt"
step mixtral && bench mixtral-8x7b --preset 4/2 --gpu-memory 12GiB --ablations \
  --json "$OUT/mixtral-8x7b_4-2_12GiB.json" | tee "$OUT/bench_4-2_12GiB.txt"
step qwen3 && bench qwen3-30b-a3b --preset 4/2 --gpu-memory 7GiB --ablations \
  --json "$OUT/qwen3-30b-a3b_4-2_7GiB.json" | tee "$OUT/bench_qwen3_4-2_7GiB.txt"
