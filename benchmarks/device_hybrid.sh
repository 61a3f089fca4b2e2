#!/usr/bin/env bash
# Device session for the hybrid CPU path: CPU kernel timings, CUDA tests, bench with hybrid on/off.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_hybrid.sh [part]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
part=${1:-1}
bench() { python3 -m moe_offload bench --synthetic mixtral-8x7b "$@" 2>&1; }
if [ "$part" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  (lscpu | grep -E "Model name|^CPU\(s\)|Thread|Core|Flags" | cut -c1-200; gcc --version | head -1) | tee -a "$OUT/device.txt"
  python3 benchmarks/cpu_experts.py --threads 8 15 16 --json "$OUT/cpu_experts.json" 2>&1 | tee "$OUT/cpu_experts.txt"
  timeout 240 python3 -m pytest tests/offload/test_offloading_cuda.py tests/offload/test_hybrid.py tests/kernels -q -x \
    -p no:cacheprovider -W ignore 2>&1 | tail -6 | tee "$OUT/pytest_cuda.txt"
  bench --preset 4/2 --gpu-memory 12GiB --hybrid on --ablations --json "$OUT/mixtral-8x7b_4-2_12GiB_hybrid.json" \
    | tee "$OUT/bench_4-2_12GiB_hybrid.txt"
fi
if [ "$part" = 2 ]; then
  bench --preset 4/2 --gpu-memory 12GiB --hybrid on --no-pin --json "$OUT/mixtral-8x7b_4-2_12GiB_pageable_hybrid.json" \
    | tee "$OUT/bench_4-2_12GiB_pageable_hybrid.txt"
  bench --preset 4/3 --gpu-memory 12GiB --hybrid on --json "$OUT/mixtral-8x7b_4-3_12GiB_hybrid.json" \
    | tee "$OUT/bench_4-3_12GiB_hybrid.txt"
fi
if [ "$part" = 3 ]; then  # resident decode (no memory cap), to compare with earlier sessions
  bench --preset 4/2 --json "$OUT/mixtral-8x7b_4-2_resident.json" | tee "$OUT/bench_4-2_resident.txt"
  python3 benchmarks/profile_decode.py 2>&1 | tail -30 | tee "$OUT/profile_resident.txt"
fi
if [ "$part" = 4 ]; then  # after OMP_WAIT_POLICY=PASSIVE
  bench --preset 4/2 --gpu-memory 12GiB --hybrid on --json "$OUT/mixtral-8x7b_4-2_12GiB_hybrid.json" \
    | tee "$OUT/bench_4-2_12GiB_hybrid.txt"
  bench --preset 4/3 --gpu-memory 12GiB --hybrid on --json "$OUT/mixtral-8x7b_4-3_12GiB_hybrid.json" \
    | tee "$OUT/bench_4-3_12GiB_hybrid.txt"
  bench --preset 4/2 --gpu-memory 12GiB --hybrid on --no-pin --cpu-threads 15 --json "$OUT/mixtral-8x7b_4-2_12GiB_pageable_hybrid.json" \
    | tee "$OUT/bench_4-2_12GiB_pageable_hybrid.txt"
fi
