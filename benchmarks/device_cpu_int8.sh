#!/usr/bin/env bash
# The CPU path's integer kernel (2-bit group-16 experts, int8 activations): kernel timings, hybrid tests,
# and decode with the hybrid path on against off at 12 GiB, pinned and pageable.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_cpu_int8.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
bench() { python3 -m moe_offload bench --synthetic mixtral-8x7b "$@" 2>&1; }
(lscpu | grep -E "Model name|^CPU\(s\)" ; grep -o -w 'avx512_vnni\|amx_int8' /proc/cpuinfo | sort -u) | tee "$OUT/cpu.txt"
python3 benchmarks/cpu_experts.py --threads 8 15 16 --json "$OUT/cpu_experts.json" 2>&1 | tee "$OUT/cpu_experts.txt"
timeout 200 python3 -m pytest tests/offload/test_offloading_cuda.py tests/offload/test_hybrid.py tests/kernels/test_cpu.py \
  -q -x -p no:cacheprovider -W ignore 2>&1 | tail -6 | tee "$OUT/pytest_hybrid.txt"
bench --preset 4/2 --gpu-memory 12GiB --hybrid on --json "$OUT/mixtral-8x7b_4-2_12GiB_hybrid.json" \
  | tee "$OUT/bench_4-2_12GiB_hybrid.txt"
bench --preset 4/2 --gpu-memory 12GiB --hybrid on --no-pin --json "$OUT/mixtral-8x7b_4-2_12GiB_pageable_hybrid.json" \
  | tee "$OUT/bench_4-2_12GiB_pageable_hybrid.txt"
