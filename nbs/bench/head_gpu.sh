#!/usr/bin/env bash
# One CUDA machine, the checks a commit needs before its numbers count. Results under $OUT; pass REV=.
#   bash nbs/bench/head_gpu.sh spec   -> `moe-lit run` with Triton quantized experts at real sizes (FP8 block, MXFP4,
#                                        NVFP4; one GPU and the seed scenario), each held to its kernels' spec; the
#                                        tests of that check natively; the small-T kernel chain with PDL off
#   bash nbs/bench/head_gpu.sh suite  -> the whole GPU suite (4 workers), then what failed again in one process (nothing
#                                        when nothing failed: --lfnf none)
#   bash nbs/bench/head_gpu.sh owed   -> one 10-minute call: the fills of test_layer_cuda_graphs' layers at T = 1
#                                        (`capture_fills.py 1 --test`), then the whole suite with 8 workers (-v; it did
#                                        not finish in 320 s at d36b5cf: 95 %)
#   bash nbs/bench/head_gpu.sh owed_one -> both in one call: the suite, then the memcheck, the fills only on failure
#   bash nbs/bench/head_gpu.sh owed_memcheck -> a second call: memcheck of the batched GEMM's real shapes, split-K and
#                                        bad-launch tests (real_shapes alone passed 130 s at d36b5cf) and the dispatch
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
# the steps the owed modes share
fills_of_test() {   # capture_fills of test_layer_cuda_graphs' layers at T = 1; $1: time limit (s)
  timeout "$1" python nbs/bench/capture_fills.py 1 --test 2>&1 | grep -v Warn > "$OUT/capture_fills_test_${CARD:-gpu}_$C.log"
  grep -E "^==|^  [123]\.|^     " "$OUT/capture_fills_test_${CARD:-gpu}_$C.log" | head -60
}
whole_suite() {     # every test on 8 workers, -v; prints failures, their first lines, the 25 slowest; $1: time limit (s)
  timeout "$1" python -m pytest -v -n 8 --tb=short --durations=25 -p no:cacheprovider -m "gpu or not gpu" tests \
    > "$OUT/pytest_gpu_v_${CARD:-gpu}_$C.log" 2>&1
  echo "suite exit $?"
  grep -E "^FAILED|^ERROR| passed| failed" "$OUT/pytest_gpu_v_${CARD:-gpu}_$C.log" | tail -15
  grep -A4 "^E  " "$OUT/pytest_gpu_v_${CARD:-gpu}_$C.log" | cut -c1-600 | head -30
  grep -A26 "slowest 25 durations" "$OUT/pytest_gpu_v_${CARD:-gpu}_$C.log" | head -27
}
owed_memcheck() {  # memcheck of the batched GEMM's real-shape, split-K and bad-launch tests and the dispatch tests
  LIMIT=$1 WORKERS=2 bash "$(dirname "$0")/memcheck_gpu.sh" owed tests/test_kernels_batched.py \
    tests/test_kernels_dispatch.py -k "real_shapes or split_k or launch_arguments_refused or dispatch"
}
case "${1:-spec}" in
spec)
  timeout 170 python -m pytest -q -n 4 -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_quant_experts.py tests/test_testing.py \
    tests/test_report.py tests/test_launch.py -k "prequantized or spec or quant or nccl" 2>&1 | grep -E "^FAILED|passed|failed|rror" \
    | tail -8 | tee "$OUT/pytest_spec_${CARD:-gpu}_$C.log"
  log="$OUT/run_kernel_spec_${CARD:-gpu}_$C.log"; : > "$log"
  for args in "--quant fp8" "--quant nvfp4" \
              "--model deepseek-v3 --ep 8 --all2all nixl_ep --quant fp8" "--model deepseek-v3 --ep 8 --all2all nixl_ep --quant nvfp4" \
              "--model deepseek-v3 --ep 8 --all2all deepep_high_throughput --quant fp8"; do
    echo "== moe-lit run $args --experts triton" | tee -a "$log"
    timeout 70 python -m moe_lit.cli run $args --experts triton 2>&1 | grep -v Warn | grep -iE "spec|float64|single|wire|exit|error" | tee -a "$log"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
  done
  MOE_LIT_PDL=0 timeout 120 python nbs/bench/profile_small_t.py 1 2 4 2>&1 | grep -v Warn > "$OUT/profile_small_t_nopdl_${CARD:-gpu}_$C.log"
  grep "==" "$OUT/profile_small_t_nopdl_${CARD:-gpu}_$C.log" ;;
suite)
  timeout "${LIMIT_SUITE:-400}" python -m pytest -q -n 4 -m "gpu or not gpu" tests 2>&1 | grep -v Warning \
    | tail -25 | tee "$OUT/pytest_gpu_${CARD:-gpu}_$C.log"
  timeout "${LIMIT_LF:-150}" python -m pytest -q -m "gpu or not gpu" --lf --lfnf none tests 2>&1 | grep -v Warning | tail -8 \
    | tee "$OUT/pytest_gpu_rerun_${CARD:-gpu}_$C.log" ;;
owed)
  fills_of_test 90
  whole_suite "${LIMIT_SUITE:-470}" ;;
owed_one)
  # both owed checks in one call, one after the other (a memcheck beside the suite ran big tests out of memory at
  # 57a349f): the whole suite (8 workers), the memcheck, then the fills of test_layer_cuda_graphs' layers only if
  # that test failed
  whole_suite "${LIMIT_SUITE:-330}"
  owed_memcheck "${LIMIT_MEMCHECK:-180}"
  if grep -q "FAILED.*test_layer_cuda_graphs" "$OUT/pytest_gpu_v_${CARD:-gpu}_$C.log"; then fills_of_test 70; fi ;;
owed_memcheck)
  owed_memcheck "${LIMIT_MEMCHECK:-560}" ;;
esac
