#!/usr/bin/env bash
# On the GPU machine, from the repo root, with .llamacpp/ carried (made here by fetch.sh):
#   OUT=<dir> bash benchmarks/vs_llamacpp/run.sh PART
# PART: build   llama-bench for sm_90 (CUDA + CPU backends) into .llamacpp/build (kept while the machine is warm)
#       gguf    the Mixtral-8x7B-shaped GGUFs (Q2_K and Q3_K experts, Q8_0 elsewhere) under $GGUF_DIR
#       llama   llama-bench at the budgets below, GPU memory sampled with nvidia-smi
#       ours    moe-offload bench at the same budgets, presets 4/2 and 4/2-lean (offloaded: --cpu-layers auto) and 4/3, int8
#               activations (OURS_EXTRA), GPU memory sampled the same way
#       table   the markdown table from the JSON files in $OUT
# Budgets: llama.cpp keeps the experts of N layers on the CPU (-ncmoe N); N per budget is the issue's for Q2_K
# (0/10/16/32 -> 16.6/12.3/9.6/2.5 GB), and for Q3_K the N whose memory lands at the same budgets.
# Subsets (one device call holds a build plus a few runs): LLAMA_SPECS="q2_k 10 12GiB;q2_k 16 9.6GB", REPS,
# OURS_PRESETS, OURS_BUDGETS, OURS_RUNS (bench --runs), OURS_CPU_LAYERS; LLAMA_BUILD=/tmp/... builds outside the
# carried .llamacpp/, so a later call that carries it again keeps the build.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results/vs_llamacpp}
GGUF_DIR=${GGUF_DIR:-/tmp/gguf}
PART=${1:?PART: build, gguf, llama, ours or table}
BUILD=${LLAMA_BUILD:-.llamacpp/build}  # outside .llamacpp (LLAMA_BUILD=/tmp/...) it survives a later carry
BENCH=$BUILD/bin/llama-bench
mkdir -p "$OUT"

sample_gpu() {  # sample_gpu FILE: print the sampler's pid; memory.used (MiB) every 0.2 s into FILE
  # The subshell's own stdout goes to FILE: left on the $(...) pipe, the caller would wait for it forever.
  (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done) > "$1" 2>/dev/null &
  echo $!
}
peak() { sort -n "$1" | tail -1; }

case $PART in
build)
  NVCC=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
  if [ -z "$NVCC" ]; then
    echo "no CUDA compiler (nvcc) on this machine: llama.cpp's CUDA build needs the CUDA toolkit; install it or run elsewhere" >&2
    exit 2
  fi
  [ -d .llamacpp ] || { echo ".llamacpp/ missing: run benchmarks/vs_llamacpp/fetch.sh here and carry .llamacpp" >&2; exit 2; }
  cmake -S .llamacpp -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF > "$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; exit 1; }
  time ninja -C "$BUILD" llama-bench > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  "$BENCH" --help 2>&1 | head -3 || true  # head closes the pipe early: not a failure
  ;;
gguf)
  mkdir -p "$GGUF_DIR"
  for q in q2_k q3_k; do
    [ -s "$GGUF_DIR/mixtral-8x7b-$q.gguf" ] || time PYTHONPATH=.llamacpp/gguf-py python3 benchmarks/vs_llamacpp/make_gguf.py \
      "$GGUF_DIR/mixtral-8x7b-$q.gguf" --experts "$q"
  done
  ls -la "$GGUF_DIR"
  ;;
llama)
  # LLAMA_SPECS: "quant ncmoe budget" entries separated by ';' (default: all eight)
  IFS=';' read -ra specs <<< "${LLAMA_SPECS:-q2_k 0 resident;q2_k 10 12GiB;q2_k 16 9.6GB;q2_k 32 2.5GB;q3_k 0 resident;q3_k 15 12GiB;q3_k 21 9.6GB;q3_k 32 2.5GB}"
  for spec in "${specs[@]}"; do
    set -- $spec
    name="llama_$1_$3"
    pid=$(sample_gpu "$OUT/$name.mem")
    timeout "${LLAMA_TIMEOUT:-150}" "$BENCH" -m "$GGUF_DIR/mixtral-8x7b-$1.gguf" -ngl 99 -ncmoe "$2" -fa 1 \
      -p 512 -n 128 -t 16 -lm none -r "${REPS:-2}" -o json > "$OUT/$name.json" 2> "$OUT/$name.log"
    status=$?
    kill "$pid" 2>/dev/null
    echo "$name: exit $status, peak GPU $(peak "$OUT/$name.mem") MiB"
  done
  ;;
ours)
  for preset in ${OURS_PRESETS:-4/2 4/2-lean 4/3}; do
    # 2580MiB: llama.cpp's own peak with every expert on the CPU (2583 MiB, session 12), the issue's ~2.5 GB.
    # OURS_CONTEXT 640: llama-bench's context (512 prompt + 128 generated tokens); the KV cache is sized to it.
    for budget in ${OURS_BUDGETS:-resident 12GiB 9.6GB 2580MiB}; do
      name="ours_${preset/\//-}_$budget"
      args=(--synthetic mixtral-8x7b --preset "$preset" --max-context "${OURS_CONTEXT:-1024}" --json "$OUT/$name.json"
            ${OURS_EXTRA:---int8-activations})
      [ "$budget" = resident ] || args+=(--gpu-memory "$budget")
      if [[ "$preset" == 4/2* ]] && [ "$budget" != resident ]; then  # 4/2 and 4/2-lean: 2-bit g16 experts
        # our fastest placement where the CPU kernel's integer path runs (BENCHMARKS.md, session 10): CPU layers
        # sharing their experts with the copy link, every other layer whole; copies only beside it in one process
        args+=(--cpu-layers "${OURS_CPU_LAYERS:-auto}" --runs "${OURS_RUNS:-full,no hybrid}")
      elif [ "$budget" != resident ]; then
        # 4/3: copies only where a cache fits (auto places no CPU layers); where none fits (~2.5 GB), every layer
        # streams its experts, copied by the served layers' thread (session 14)
        args+=(--cpu-layers auto --runs full)
      fi
      pid=$(sample_gpu "$OUT/$name.mem")
      timeout "${OURS_TIMEOUT:-200}" python3 -m moe_offload bench "${args[@]}" > "$OUT/$name.log" 2>&1
      status=$?
      kill "$pid" 2>/dev/null
      echo "$name: exit $status, peak GPU $(peak "$OUT/$name.mem") MiB"
      grep -E "^│ full" "$OUT/$name.log" || tail -3 "$OUT/$name.log"
    done
  done
  ;;
table)
  python3 benchmarks/vs_llamacpp/table.py "$OUT"
  ;;
*)
  echo "unknown PART $PART" >&2; exit 2
  ;;
esac
