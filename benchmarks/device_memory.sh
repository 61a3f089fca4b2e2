#!/usr/bin/env bash
# Session 13: where the GPU memory of an offloaded run goes (with and without the allocator's expandable segments),
# and the offloading tests on the GPU. Usage on the GPU machine, from the repo root: OUT=<dir> bash
# benchmarks/device_memory.sh [parts]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-memory tests}; do
case $p in
memory)
  for budget in 12GiB 4.5GiB; do
    for conf in "" "expandable_segments:True"; do
      tag=${budget}_${conf:+expandable}
      PYTORCH_CUDA_ALLOC_CONF=$conf timeout 300 python3 benchmarks/gpu_memory.py --gpu-memory $budget --cpu-layers auto \
        --int8 --json "$OUT/memory_$tag.json" 2>&1 | grep -v Warning | tail -25
    done
  done ;;
tests)
  timeout 500 python3 -m pytest tests/offload/test_offloading_cuda.py tests/test_graphs.py -q -x -p no:cacheprovider \
    -W ignore 2>&1 | tail -15 | tee "$OUT/pytest_offloading.txt" ;;
esac
done
