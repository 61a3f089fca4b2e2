#!/usr/bin/env bash
# Full-size synthetic benchmarks of the non-Mixtral-8x7B families (issue 8), at GPU budgets that keep about
# half of the experts on the GPU, so offloading is exercised. The results go in BENCHMARKS.md.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_families.sh [STEP]
# STEP (optional) runs one line only (tests, qwen3, qwen3-43, olmoe, olmoe-43, 8x22b, 8x22b-43, qwen15),
# so that each stays well inside a 10-minute command limit.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results}
STEP=${1:-all}
bench() { python3 -m moe_offload bench --hybrid off --synthetic "$@" 2>&1; }
step() { [[ $STEP == all || $STEP == "$1" ]]; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device_families.txt"
# The family tests against this machine's transformers (CPU, about a minute).
step tests && python3 -m pytest tests/test_families.py -q -x -p no:cacheprovider -W ignore 2>&1 | tail -4 \
  | tee "$OUT/pytest_families.txt"
# Qwen3-30B-A3B: 1.71 MiB per 4/2 expert, 55 of 128 slots per layer at 7 GiB (43%); 4/3: 59 of 128 at 8 GiB.
step qwen3 && bench qwen3-30b-a3b --preset 4/2 --gpu-memory 7GiB --ablations \
  --json "$OUT/qwen3-30b-a3b_4-2_7GiB.json" | tee "$OUT/bench_qwen3_4-2_7GiB.txt"
step qwen3-43 && bench qwen3-30b-a3b --preset 4/3 --gpu-memory 8GiB \
  --json "$OUT/qwen3-30b-a3b_4-3_8GiB.json" | tee "$OUT/bench_qwen3_4-3_8GiB.txt"
# OLMoE-1B-7B: 2.28 MiB per 4/2 expert, 27 of 64 slots per layer at 2.5 GiB (42%); 4/3: 29 of 64 at 2.75 GiB.
step olmoe && bench olmoe-1b-7b --preset 4/2 --gpu-memory 2.5GiB --ablations \
  --json "$OUT/olmoe-1b-7b_4-2_2.5GiB.json" | tee "$OUT/bench_olmoe_4-2_2.5GiB.txt"
step olmoe-43 && bench olmoe-1b-7b --preset 4/3 --gpu-memory 2.75GiB \
  --json "$OUT/olmoe-1b-7b_4-3_2.75GiB.json" | tee "$OUT/bench_olmoe_4-3_2.75GiB.txt"
# Mixtral-8x22B: 109 MiB per 4/2 expert, 4 of 8 slots per layer at 30 GiB (50%); 4/3: 4 of 8 at 34 GiB.
# 48 GiB of pinned host memory per build: no ablations here (each would rebuild it).
step 8x22b && bench mixtral-8x22b --preset 4/2 --gpu-memory 30GiB \
  --json "$OUT/mixtral-8x22b_4-2_30GiB.json" | tee "$OUT/bench_8x22b_4-2_30GiB.txt"
step 8x22b-43 && bench mixtral-8x22b --preset 4/3 --gpu-memory 34GiB \
  --json "$OUT/mixtral-8x22b_4-3_34GiB.json" | tee "$OUT/bench_8x22b_4-3_34GiB.txt"
# Qwen1.5-MoE-A2.7B (qwen2_moe, shared expert): 26 of 60 slots per layer at 5 GiB (43%).
step qwen15 && bench qwen1.5-moe-a2.7b --preset 4/2 --gpu-memory 5GiB --ablations \
  --json "$OUT/qwen1.5-moe-a2.7b_4-2_5GiB.json" | tee "$OUT/bench_qwen15_4-2_5GiB.txt"
exit 0
