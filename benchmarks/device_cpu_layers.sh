#!/usr/bin/env bash
# Session 6, device calls: the 512-bit CPU kernel against the 256-bit one (alone and beside copies), the CPU path's
# tests on an AVX-512 host, and Mixtral decode with experts of N layers on the CPU (--cpu-layers) against copies only.
# Usage on the GPU machine, from the repo root:
#   OUT=<dir> [BUDGETS="12GiB:8 3.5GiB:32"] [PRESETS="4/2"] [EXTRA="--int8-activations"] [SUFFIX=_int8] \
#     bash benchmarks/device_cpu_layers.sh [cpu|tests|layers]...
# (each bench also runs copies only, without CPU layers, beside it; nvidia-smi's peak is sampled every 0.2 s.)
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
bench() {  # name, then bench arguments
  local name=$1; shift
  timeout 420 python3 -m moe_offload bench --synthetic mixtral-8x7b --max-context 1024 "$@" \
    --json "$OUT/$name.json" 2>&1 | grep -E "^│|rror|skipped"
}
for p in ${@:-cpu tests layers}; do
case $p in
cpu)
  (lscpu | grep -E "Model name|^CPU\(s\)|NUMA node\(s\)"; grep -o -w 'avx512_vnni\|amx_int8\|avx512bw' /proc/cpuinfo | sort -u) \
    | tee "$OUT/cpu.txt"
  timeout 240 python3 benchmarks/cpu_experts.py --presets 4/2 --kernels ${KERNELS:-hqq hqq-avx2} --threads ${THREADS:-15 16} \
    --prefetch 0 1024 --under-load --json "$OUT/cpu_experts_512.json" 2>&1 | tail -12
  ;;
tests)
  timeout 300 python3 -m pytest tests/kernels/test_cpu.py tests/offload/test_hybrid.py tests/offload/test_planner.py \
    tests/test_cpu_expert.py tests/offload/test_offloading_cuda.py tests/test_engine.py \
    -q -p no:cacheprovider -W ignore --junitxml="$OUT/pytest_cpu.xml" 2>&1 | tail -5
  grep -o '<testsuite [^>]*>' "$OUT/pytest_cpu.xml"
  ;;
layers)
  for preset in ${PRESETS:-4/2}; do
    for spec in ${BUDGETS:-12GiB:8}; do
      budget=${spec%%:*}; n=${spec##*:}; tag=${preset/\//-}
      (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) \
        > "$OUT/${tag}_${budget}_cpu${n}${SUFFIX:-}.mem" 2>/dev/null &
      sampler=$!
      bench "mixtral-8x7b_${tag}_${budget}_cpu${n}${SUFFIX:-}" --preset $preset --gpu-memory $budget --cpu-layers $n ${EXTRA:-}
      kill $sampler 2>/dev/null
      echo "nvidia-smi peak: $(sort -n "$OUT/${tag}_${budget}_cpu${n}${SUFFIX:-}.mem" | tail -1) MiB"
    done
  done
  ;;
esac
done
