#!/usr/bin/env bash
# Session 14: CPU layers served without the host (offload/served.py) against the host-synced CPU layers, and the tests
# of both on the GPU. Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_served.sh [parts]
# parts: tests | bench (env BUDGETS="12GiB 9.6GB", RUNS="full,host CPU layers", TOKENS=128)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-tests bench}; do
case $p in
tests)
  timeout 300 python3 -m pytest tests/offload/test_served.py tests/offload/test_offloading_cuda.py -q -x \
    -p no:cacheprovider -W ignore 2>&1 | tail -15 | tee "$OUT/pytest_served.txt" ;;
bench)
  for budget in ${BUDGETS:-12GiB 9.6GB}; do
    timeout 400 python3 -m moe_offload bench --synthetic mixtral-8x7b --preset 4/2 --max-context 640 \
      --int8-activations --runs "${RUNS:-full,host CPU layers}" --new-tokens ${TOKENS:-128} --gpu-memory $budget \
      --cpu-layers auto --json "$OUT/served_$budget.json" 2>&1 | grep -v Warning | tail -12
  done ;;
esac
done
