#!/usr/bin/env bash
# Session 12: where a 512-token prefill's time goes (resident and 12 GiB with CPU layers) and where the GPU memory
# goes at 12 GiB. Usage on the GPU machine, from the repo root: OUT=<dir> bash benchmarks/device_prefill.sh [parts]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-gpu host memory}; do
case $p in
gpu)  # the GPU's kernels in a resident prefill
  timeout 300 python3 benchmarks/profile_decode.py --prefill 512 2>&1 | tail -30 | tee "$OUT/prefill_resident_gpu.txt" ;;
host)  # the host's share, resident and at 12 GiB with 15 CPU layers
  timeout 300 python3 benchmarks/profile_decode.py --prefill 512 --host 2>&1 | head -50 | tee "$OUT/prefill_resident_host.txt"
  timeout 300 python3 benchmarks/profile_decode.py --prefill 512 --host --gpu-memory 12GiB --cpu-layers 15 --int8 2>&1 \
    | head -50 | tee "$OUT/prefill_12GiB_host.txt" ;;
tests)  # the prefill kernels and every path that must stay bit-identical to resident
  timeout 400 python3 -m pytest tests/kernels/test_moe_gemm.py tests/kernels/test_fused.py tests/test_grouped.py \
    tests/offload/test_offloading_cuda.py -q -x -p no:cacheprovider -W ignore 2>&1 | tail -15 | tee "$OUT/pytest_prefill.txt" ;;
kernel)
  timeout 500 python3 benchmarks/moe_gemm.py ${SWEEP:+--sweep} --json "$OUT/moe_gemm.json" 2>&1 | tail -70 ;;
prefill)  # unprofiled prefill rates only
  timeout 200 python3 benchmarks/profile_decode.py --prefill 512 --host 2>&1 | grep "^prefill"
  timeout 200 python3 benchmarks/profile_decode.py --prefill 512 --host --gpu-memory 12GiB --cpu-layers 15 --int8 2>&1 \
    | grep "^prefill" ;;
ab)  # prefill kernels against dequantize-then-cuBLAS, alternating in one process
  timeout 200 python3 benchmarks/prefill_ab.py 2>&1 | tail -1 | tee "$OUT/prefill_ab.jsonl"
  timeout 200 python3 benchmarks/prefill_ab.py --gpu-memory 12GiB --cpu-layers 15 2>&1 | tail -1 | tee -a "$OUT/prefill_ab.jsonl"
  timeout 200 python3 benchmarks/prefill_ab.py --gpu-memory 12GiB 2>&1 | tail -1 | tee -a "$OUT/prefill_ab.jsonl" ;;
profile)  # both prefill paths: the GPU's kernels and the host's operations
  for k in 1 0; do
    MOE_OFFLOAD_PREFILL_KERNELS=$k timeout 300 python3 benchmarks/profile_decode.py --prefill 512 --int8 2>&1 \
      > "$OUT/prefill_profile_k$k.txt"; grep -E "^prefill|total" "$OUT/prefill_profile_k$k.txt"
  done ;;
memory)
  timeout 300 python3 benchmarks/gpu_memory.py --gpu-memory 12GiB 2>&1 | tail -8 | tee "$OUT/memory_12GiB.txt" ;;
esac
done
