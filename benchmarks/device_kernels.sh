#!/usr/bin/env bash
# Session 9, device calls: the int8-activation GEMV with wide tiles (every thread holds all rows of the tile, so one
# x8 load serves them all) against the shipped configs, and the CUDA tests of the kernels and the offloaded paths.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_kernels.sh [sweep|exact|experts|tests|e2e]...
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
best_configs() {  # the fastest configs per matrix of a sweep's JSON
  python3 - "$1" <<'PY'
import json, sys, collections
d = json.load(open(sys.argv[1]))
best = collections.defaultdict(list)
for r in d.get("sweep", []):
    if "us" in r:
        best[(r["bits"], r["group"], r["n"], r["k"])].append((round(r["us"], 1), r["config"], round(r["pct_d2d"], 1)))
for k, v in best.items():
    print(k, sorted(v)[:4])
PY
}
for p in ${@:-sweep tests}; do
case $p in
sweep)  # baseline experts with the shipped configs, the wide sweep, then the experts with the sweep's best
  timeout ${SWEEP_TIMEOUT:-360} python3 benchmarks/gemv_int8.py --baseline --sweep --wide --json "$OUT/gemv_wide.json" 2>&1 \
    | grep -v "^sweep" | tail -40
  best_configs "$OUT/gemv_wide.json"
  ;;
exact)  # the exact path on the planes kernel: its sweep, then whole experts exact (old kernel) / planes / int8
  timeout ${SWEEP_TIMEOUT:-360} python3 benchmarks/gemv_int8.py --sweep --exact --json "$OUT/gemv_exact.json" 2>&1 \
    | grep -v "^sweep" | tail -30
  best_configs "$OUT/gemv_exact.json"
  timeout 200 python3 -m pytest tests/kernels/test_gemv_int8.py -q -x -p no:cacheprovider -W ignore 2>&1 | tail -3
  ;;
experts)  # the whole experts with the shipped configs only
  timeout 300 python3 benchmarks/gemv_int8.py --json "$OUT/gemv_experts.json" 2>&1 | tail -20
  ;;
tests)
  timeout ${TESTS_TIMEOUT:-400} python3 -m pytest tests/kernels/test_gemv_int8.py tests/kernels/test_quant_matmul.py tests/test_engine.py \
    tests/offload/test_offloading_cuda.py tests/offload/test_hybrid.py tests/offload/test_device_lookup.py \
    -q -x -p no:cacheprovider -W ignore --junitxml="$OUT/pytest_kernels.xml" 2>&1 | tail -15
  grep -o '<testsuite [^>]*>' "$OUT/pytest_kernels.xml"
  ;;
e2e)  # Mixtral end to end with the int8 GEMV: resident 4/2 and 4/3, and 12 GiB 4/2 with the hybrid path on and off
  bench() {
    local name=$1; shift
    timeout ${BENCH_TIMEOUT:-300} python3 -m moe_offload bench --synthetic mixtral-8x7b --max-context 1024 "$@" \
      --json "$OUT/$name.json" 2>&1 | grep -E "^│|^┃|rror|Traceback"
  }
  for preset in ${PRESETS:-4/2 4/3}; do
    bench "mixtral_${preset/\//-}_resident_int8" --preset $preset --hybrid off --int8-activations
  done
  if [ -n "${EXACT:-}" ]; then  # the default (exact) decode path
    for preset in ${PRESETS:-4/2 4/3}; do
      bench "mixtral_${preset/\//-}_resident_exact" --preset $preset --hybrid off
    done
  fi
  [ -n "${NO_OFFLOAD:-}" ] || bench mixtral_4-2_12GiB_int8_hybrid --preset 4/2 --gpu-memory 12GiB --hybrid on --new-tokens 64 --int8-activations
  ;;
esac
done
