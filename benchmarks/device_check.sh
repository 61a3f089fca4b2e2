#!/usr/bin/env bash
# One short device call: the CUDA tests of decode attention, grouped experts, graphs, offloading and routing
# replay; the demo model's perplexity table; Qwen3-30B-A3B (top-8) with its ablations.
# Usage on the GPU machine, from the repo root, .demo_corpus/ carried: OUT=<dir> bash benchmarks/device_check.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
timeout 200 python3 -m pytest tests/kernels/test_attention.py tests/kernels/test_grouped_kernels.py tests/test_graphs.py \
  tests/offload/test_offloading_cuda.py tests/test_routing.py -q -x -p no:cacheprovider -W ignore 2>&1 | tail -5 \
  | tee "$OUT/pytest_check.txt"
mkdir -p /tmp/ppl && OUT=/tmp/ppl timeout 200 bash benchmarks/device_perplexity.sh 2>&1 | grep "^|" | tee "$OUT/perplexity_table.md"
timeout 200 python3 -m moe_offload bench --synthetic qwen3-30b-a3b --preset 4/2 --gpu-memory 7GiB --hybrid off --ablations \
  --new-tokens 96 --json "$OUT/qwen3-30b-a3b_4-2_7GiB.json" 2>&1 | tee "$OUT/bench_qwen3_4-2_7GiB.txt" | grep -E "^│|^┃"
