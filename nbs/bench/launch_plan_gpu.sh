#!/usr/bin/env bash
# One H100/H200 call for launch plans: the layer tests that exercise them natively (plans, graphs, the fast launch,
# PDL, FP8 dispatch), then `launch_plan_gpu.py` (eager with and without plans, beside the replay).
#   REV=<commit> bash nbs/bench/launch_plan_gpu.sh  -> $OUT/pytest_plans_<card>_<commit>.log, launch_plan_<card>_<commit>.json
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/pytest_plans_${CARD:-gpu}_$C.log"
timeout "${LIMIT_TESTS:-130}" python -m pytest -q -n 4 -p no:cacheprovider -m "gpu or not gpu" tests/test_layer.py \
  tests/test_modular.py -k "launch_plans or cuda_graphs or fast_launch or programmatic or fp8_before or quantized" > "$log" 2>&1
echo "tests exit $?" >> "$log"; grep -E "^FAILED|passed|failed|exit" "$log" | tail -8
timeout "${LIMIT_BENCH:-170}" python "$(dirname "$0")/launch_plan_gpu.py" "$OUT/launch_plan_${CARD:-gpu}_$C.json" 2>&1 | grep -v Warn
