#!/usr/bin/env bash
# Session 4, one device call: CUDA tests of the fused decode kernels, stacked q/k/v, batched copies and the
# paths they touch; a profile of the resident Mixtral step; Mixtral 4/2 ablations at 12 GiB; Qwen3 at 7 GiB.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_fused.sh [tests|mixtral|qwen3]...
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for part in "${@:-tests mixtral qwen3}"; do
for p in $part; do
case $p in
tests)
  timeout 300 python3 -m pytest tests/kernels/test_fused.py tests/test_engine.py tests/kernels/test_attention.py \
    tests/kernels/test_grouped_kernels.py tests/test_graphs.py tests/test_grouped.py tests/offload/test_offloading_cuda.py \
    tests/test_routing.py tests/test_families.py -q -p no:cacheprovider -W ignore 2>&1 | tail -15 | tee "$OUT/pytest_fused.txt"
  ;;
mixtral)
  timeout 150 python3 benchmarks/profile_decode.py --synthetic mixtral-8x7b --preset 4/2 --steps 16 \
    > "$OUT/profile_resident_fused.txt" 2>&1; head -1 "$OUT/profile_resident_fused.txt"
  grep -E "^ +(_|void|nvjet|triton|Memcpy)" "$OUT/profile_resident_fused.txt" | head -20
  timeout 300 python3 -m moe_offload bench --synthetic mixtral-8x7b --preset 4/2 --gpu-memory 12GiB --hybrid off --ablations \
    --json "$OUT/mixtral-8x7b_4-2_12GiB_fused.json" 2>&1 | grep -E "^│|^┃"
  ;;
memory)
  timeout 150 python3 benchmarks/gpu_memory.py --gpu-memory 12GiB 2>&1 | grep -v Warn | tail -6
  ;;
kernels)
  timeout 400 python3 benchmarks/kernels.py --ab --skip matrices,baselines,batches,host --json "$OUT/kernels_ab.json" 2>&1 \
    | grep -E "^sweep|FAILED|^[0-9].*D2D|expert|error" | head -60
  ;;
hybrid)
  for pin in "" "--no-pin"; do
    name=mixtral-8x7b_4-2_12GiB${pin:+_pageable}_hybrid_s4
    timeout 280 python3 -m moe_offload bench --synthetic mixtral-8x7b --preset 4/2 --gpu-memory 12GiB --hybrid on $pin \
      --new-tokens 64 --json "$OUT/$name.json" 2>&1 | grep -E "^│|^┃|Warning"
  done
  ;;
qwen3)
  timeout 240 python3 -m moe_offload bench --synthetic qwen3-30b-a3b --preset 4/2 --gpu-memory 7GiB --hybrid off --ablations \
    --new-tokens 96 --json "$OUT/qwen3-30b-a3b_4-2_7GiB_batched.json" 2>&1 | grep -E "^│|^┃"
  ;;
esac
done
done
