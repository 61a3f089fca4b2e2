#!/usr/bin/env bash
# Session 15: where an offloaded prefill's copy link sits idle (profile_decode.py --timeline), the served layers' tests
# on the GPU, and 4/3 with every layer streamed. Usage on the GPU machine, from the repo root:
#   OUT=<dir> bash benchmarks/device_link.sh [parts]     parts: tests | timeline | streamed
# env BUDGETS (timeline; default "2580MiB 9.6GB"), ON_DEVICE (timeline: "1 0" for an A/B of the prefill routed on the device),
# TESTS (tests: files beside test_offloading_cuda.py; default test_served.py), RINGS (timeline: MOE_OFFLOAD_PREFILL_RING
# values, "planned" for the planner's own).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 MOE_OFFLOAD_CACHE=/tmp/moe-offload-cache
OUT=${OUT:-benchmarks/results}
for p in ${@:-tests timeline streamed}; do
case $p in
tests)
  timeout 300 python3 -m pytest tests/offload/test_offloading_cuda.py ${TESTS-tests/offload/test_served.py} -q -rfEs \
    -p no:cacheprovider -W ignore 2>&1 | tail -8
  echo "pytest rc ${PIPESTATUS[0]}" ;;
timeline)
  for budget in ${BUDGETS:-2580MiB 9.6GB}; do
    for held in ${ON_DEVICE:-1}; do
      for ring in ${RINGS:-planned}; do  # RINGS: MOE_OFFLOAD_PREFILL_RING values (extra prefill slots); planned: unset
        [ "$ring" = planned ] && unset MOE_OFFLOAD_PREFILL_RING || export MOE_OFFLOAD_PREFILL_RING=$ring
        echo "== timeline 4/2 $budget MOE_OFFLOAD_PREFILL_ON_DEVICE=$held ring=$ring ${PROFILE_ARGS:-}"
        MOE_OFFLOAD_PREFILL_ON_DEVICE=$held timeout 300 python3 benchmarks/profile_decode.py --preset 4/2 --gpu-memory $budget \
          --cpu-layers auto --int8 --max-context 640 --prefill 512 --timeline ${PROFILE_ARGS:-} 2>&1 | grep -v -e Warning -e _warn_once | tail -${LINES_KEPT:-14}
      done
    done
    unset MOE_OFFLOAD_PREFILL_RING
  done ;;
streamed)  # SIGABRT on timeout: faulthandler prints every thread's stack
  PYTHONFAULTHANDLER=1 timeout -s ABRT ${STREAMED_TIMEOUT:-200} python3 -m moe_offload bench --synthetic mixtral-8x7b \
    --preset 4/3 --max-context 640 --int8-activations --runs full --new-tokens ${TOKENS:-64} --gpu-memory 2580MiB \
    --cpu-layers auto --serve-cpu-layers on --json "$OUT/streamed_4-3_2580MiB.json" 2>&1 | grep -v -e Warning -e _warn_once | tail -40 ;;
esac
done
