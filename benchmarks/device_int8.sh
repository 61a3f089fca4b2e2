#!/usr/bin/env bash
# Session 5, device calls: CUDA tests of the int8-activation GEMV and the paths it touches; its benchmark against
# the exact GEMV (benchmarks/gemv_int8.py); Mixtral end to end with int8 activations and without.
# Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_int8.sh [tests|kernels|mixtral|offloaded]...
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
bench() {  # name, then bench arguments
  local name=$1; shift
  timeout 300 python3 -m moe_offload bench --synthetic mixtral-8x7b --max-context 1024 --hybrid off "$@" \
    --json "$OUT/$name.json" 2>&1 | grep -E "^│|^┃|rror"
}
for p in ${@:-tests kernels mixtral}; do
case $p in
tests)
  timeout 300 python3 -m pytest tests/kernels/test_gemv_int8.py tests/kernels/test_quant_matmul.py \
    tests/kernels/test_grouped_kernels.py tests/test_engine.py tests/offload/test_offloading_cuda.py tests/test_graphs.py \
    -q -p no:cacheprovider -W ignore --junitxml="$OUT/pytest_int8.xml" 2>&1 | tail -15 | tee "$OUT/pytest_int8.txt"
  grep -o '<testsuite [^>]*>' "$OUT/pytest_int8.xml"
  ;;
kernels)
  timeout 300 python3 benchmarks/gemv_int8.py --sweep --json "$OUT/gemv_int8.json" 2>&1 | grep -v "^sweep" | tail -30
  ;;
mixtral)
  for preset in ${PRESETS:-4/2 4/3 4/4}; do
    tag=${preset/\//-}
    bench "mixtral-8x7b_${tag}_resident_exact" --preset $preset
    bench "mixtral-8x7b_${tag}_resident_int8" --preset $preset --int8-activations
  done
  ;;
offloaded)
  for preset in 4/2 4/3; do
    tag=${preset/\//-}
    bench "mixtral-8x7b_${tag}_12GiB_exact" --preset $preset --gpu-memory 12GiB
    bench "mixtral-8x7b_${tag}_12GiB_int8" --preset $preset --gpu-memory 12GiB --int8-activations
  done
  ;;
esac
done
