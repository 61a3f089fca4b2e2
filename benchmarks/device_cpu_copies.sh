#!/usr/bin/env bash
# Session 10, device calls: CPU layers sharing their experts with the copy link (a CPU layer's experts split between the
# CPU and a copy into a scratch slot, HybridExecutor.cpu_layer_share) against CPU layers computing all of their experts
# and copies only, and the CUDA tests of the offloaded paths.
# Usage on the GPU machine, from the repo root:
#   OUT=<dir> [BUDGETS="12GiB:15 9.6GB:20"] [RUNS="full,CPU layers alone,no hybrid"] [EXTRA=...] \
#     bash benchmarks/device_cpu_copies.sh [tests|bench]...
# Each BUDGETS entry is budget:CPU layers; one bench process per entry, its runs in one process (bench --runs).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-tests bench}; do
case $p in
tests)
  timeout ${TESTS_TIMEOUT:-300} python3 -m pytest tests/offload/test_offloading_cuda.py tests/offload/test_hybrid.py \
    tests/offload/test_device_lookup.py -q -x -p no:cacheprovider -W ignore --junitxml="$OUT/pytest_cpu_copies.xml" 2>&1 | tail -8
  grep -o '<testsuite [^>]*>' "$OUT/pytest_cpu_copies.xml"
  ;;
bench)
  for entry in ${BUDGETS:-12GiB:15}; do
    budget=${entry%%:*} layers=${entry##*:}
    name="mixtral-8x7b_4-2_${budget}_cpu${layers}${SUFFIX:-}"
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) > "$OUT/$name.mem" 2>/dev/null &
    sampler=$!
    start=$SECONDS
    timeout ${BENCH_TIMEOUT:-300} python3 -m moe_offload bench --synthetic mixtral-8x7b --max-context 1024 --preset 4/2 \
      --gpu-memory $budget --cpu-layers $layers --new-tokens ${NEW_TOKENS:-64} --int8-activations \
      --runs "${RUNS:-full,CPU layers alone,no hybrid}" ${EXTRA:-} --json "$OUT/$name.json" 2>&1 \
      | grep -E "^│|rror|skipped|Traceback|line [0-9]|expert slots"
    kill $sampler 2>/dev/null
    echo "$name: $((SECONDS - start)) s, nvidia-smi peak $(sort -n "$OUT/$name.mem" | tail -1) MiB"
    rm -f "$OUT/$name.mem"  # (at most 8 files come back from a device call)
  done
  ;;
esac
done
