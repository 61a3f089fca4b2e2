#!/usr/bin/env bash
# Session 7, device calls: device lookup (the layers between CPU layers find their experts on the GPU and read misses
# in place over PCIe) against host lookup and copies only, and its tests on the GPU.
# Usage on the GPU machine, from the repo root:
#   OUT=<dir> [BUDGETS="12GiB:auto 9.6GB:16"] [EXTRA="--int8-activations"] [SUFFIX=_int8] \
#     bash benchmarks/device_lookup.sh [zero|tests|bench]...
# Each bench runs --device-lookup on, then off (host lookup) and copies only (--hybrid off, no CPU layers) beside it.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-tests bench}; do
case $p in
zero)
  timeout 200 python3 benchmarks/zero_copy.py --presets 4/2,4/3 | tee "$OUT/zero_copy.jsonl"
  ;;
tests)
  timeout 400 python3 -m pytest tests/offload/test_device_lookup.py tests/offload/test_offloading_cuda.py \
    tests/test_graphs.py tests/test_grouped.py tests/offload/test_hybrid.py tests/test_engine.py \
    -q -x -p no:cacheprovider -W ignore --junitxml="$OUT/pytest_lookup.xml" 2>&1 | tail -15
  grep -o '<testsuite [^>]*>' "$OUT/pytest_lookup.xml"
  ;;
bench)
  for spec in ${BUDGETS:-12GiB:auto}; do
    budget=${spec%%:*}; n=${spec##*:}
    name="mixtral-8x7b_4-2_${budget}_cpu${n}_lookup${SUFFIX:-}"
    (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) > "$OUT/$name.mem" 2>/dev/null &
    sampler=$!
    timeout ${BENCH_TIMEOUT:-500} python3 -m moe_offload bench --synthetic mixtral-8x7b --max-context 1024 --preset 4/2 \
      --gpu-memory $budget --cpu-layers $n --device-lookup on ${EXTRA:-} --json "$OUT/$name.json" 2>&1 \
      | grep -E "^│|rror|skipped|Traceback|line [0-9]"
    kill $sampler 2>/dev/null
    echo "nvidia-smi peak: $(sort -n "$OUT/$name.mem" | tail -1) MiB"
  done
  ;;
esac
done
