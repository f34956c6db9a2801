#!/usr/bin/env bash
# One H100/H200 call for FP8 before dispatch: the tests that run it natively, a memcheck of its kernels' tests,
# then the whole-layer measurement (`fp8_dispatch_bench.py`).
#   REV=<commit> bash nbs/bench/fp8_dispatch_gpu.sh   -> $OUT/pytest_fp8_dispatch_<card>_<commit>.log,
#                                                       memcheck_fp8_dispatch_<card>_<commit>.log, fp8_dispatch_<card>_<commit>.json
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
log="$OUT/pytest_fp8_dispatch_${CARD:-gpu}_$C.log"
timeout "${LIMIT_TESTS:-200}" python -m pytest -q -n 4 -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_dispatch.py \
  tests/test_modular.py tests/test_kernels_quant_experts.py tests/test_layer.py -k \
  "dispatch or modular or fp8 or quant or cuda_graphs or fast_launch or programmatic or sync" > "$log" 2>&1
echo "tests exit $?" >> "$log"; grep -E "^FAILED|passed|failed|exit" "$log" | tail -8
LIMIT=${LIMIT_MEMCHECK:-120} WORKERS=2 bash "$(dirname "$0")/memcheck_gpu.sh" fp8_dispatch tests/test_kernels_dispatch.py \
  tests/test_modular.py -k "translations or overflow or fp8_before or agree"
timeout "${LIMIT_BENCH:-200}" python "$(dirname "$0")/fp8_dispatch_bench.py" "$OUT/fp8_dispatch_${CARD:-gpu}_$C.json" 2>&1 | grep -v Warn
