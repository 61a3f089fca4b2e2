#!/usr/bin/env bash
# Session 8, device calls: split experts (a layer's misses split within each expert: the CPU computes the first hidden
# units from host memory while the rest is copied) against whole experts and copies only, and their tests on the GPU.
# Usage on the GPU machine, from the repo root:
#   OUT=<dir> [BUDGETS="12GiB 9.6GB"] [EXTRA="--int8-activations"] [SUFFIX=_int8] bash benchmarks/device_split.sh [tests|bench]...
# Each bench runs --hybrid on, then (as bench does now) split experts, the host waiting for the CPU, and copies only
# (--hybrid off) in one process. Until split experts became opt-in, the first run split and the second ran whole experts.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-tests bench}; do
case $p in
tests)
  timeout 400 python3 -m pytest tests/offload/test_offloading_cuda.py tests/offload/test_hybrid.py tests/test_weights.py \
    tests/kernels/test_cpu.py tests/test_cpu_expert.py -q -x -p no:cacheprovider -W ignore \
    --junitxml="$OUT/pytest_split.xml" 2>&1 | tail -15
  grep -o '<testsuite [^>]*>' "$OUT/pytest_split.xml"
  ;;
bench)
  for budget in ${BUDGETS:-12GiB}; do
    name="mixtral-8x7b_4-2_${budget}_split${SUFFIX:-}"
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) > "$OUT/$name.mem" 2>/dev/null &
    sampler=$!
    timeout ${BENCH_TIMEOUT:-500} python3 -m moe_offload bench --synthetic mixtral-8x7b --max-context 1024 --preset 4/2 \
      --gpu-memory $budget --hybrid on --new-tokens ${NEW_TOKENS:-64} ${EXTRA:-} --json "$OUT/$name.json" 2>&1 \
      | grep -E "^│|CPU experts|rror|skipped|Traceback|line [0-9]"
    kill $sampler 2>/dev/null
    echo "nvidia-smi peak: $(sort -n "$OUT/$name.mem" | tail -1) MiB"
  done
  ;;
esac
done
