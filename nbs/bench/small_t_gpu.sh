#!/usr/bin/env bash
# The small-T chain on one CUDA machine. Results under $OUT; pass REV= (a copied tree may carry a stale HEAD).
#   bash nbs/bench/small_t_gpu.sh base    -> kernel chain of every deployment at T = 1, 2, then the whole GPU suite
#   bash nbs/bench/small_t_gpu.sh suite   -> the whole GPU suite alone
#   bash nbs/bench/small_t_gpu.sh check   -> the whole GPU suite beside memcheck of the router, dispatch, modular
#                                            and layer tests
#   bash nbs/bench/small_t_gpu.sh measure -> the chain again, the whole layer benchmark (JSON, log and figure), the
#                                            seed scenario
#   bash nbs/bench/small_t_gpu.sh launch  -> eager against replayed at T = 1, each host-side switch off and on
#                                            (eager_vs_replay.py --ab launch / select / overlap)
#   bash nbs/bench/small_t_gpu.sh combine -> the tests of the Standard experts and the layer natively, the kernel chain
#                                            with PDL off at T = 1, 2, 4, and GEMM2's slot sum against its own launch
#                                            (eager_vs_replay.py --ab combine, T = 1, 2, 4)
#   bash nbs/bench/small_t_gpu.sh pdl     -> programmatic dependent launch off and on, eager and replayed, T = 1, 2,
#                                            8 (eager_vs_replay.py --ab pdl), then the kernel chain with it on
#   bash nbs/bench/small_t_gpu.sh select  -> the router, modular and layer tests natively, the selection kernel
#                                            against BASE (default nbs/bench/_router_base.py; select_ab.py), T = 1, 2, 4,
#                                            and the kernel chain at T = 1, 2
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
chain() { timeout 150 python nbs/bench/profile_small_t.py 1 2 2>&1 | grep -v Warning > "$OUT/profile_small_t_${CARD:-gpu}_$C.log"; grep "==" "$OUT/profile_small_t_${CARD:-gpu}_$C.log"; }
suite() { timeout 400 python -m pytest -q -n 6 -m "gpu or not gpu" tests 2>&1 | grep -v Warning | tail -15 | tee "$OUT/pytest_gpu_${CARD:-gpu}_$C.log"; }
case "${1:-base}" in
base) chain; suite ;;
suite) suite ;;
check)
  timeout 280 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -m "not gpu" tests/test_kernels_dispatch.py \
    tests/test_kernels_router.py tests/test_modular.py tests/test_layer.py 2>&1 | tail -4 > "$OUT/memcheck_small_t_${CARD:-gpu}_$C.log" &
  suite; wait; echo "== memcheck"; cat "$OUT/memcheck_small_t_${CARD:-gpu}_$C.log" ;;
measure)
  chain
  timeout 360 python nbs/bench/layer_bench_run.py "$OUT/layer_bench_${CARD:-gpu}_$C.json" 2>&1 | grep -v Warning > "$OUT/layer_bench_${CARD:-gpu}_$C.log"
  tail -3 "$OUT/layer_bench_${CARD:-gpu}_$C.log"
  timeout 80 python nbs/bench/seed_scenario.py "$OUT/seed_scenario_${CARD:-gpu}_$C.json" 2>&1 | grep -v Warning | tail -9 ;;
launch)
  for m in launch select overlap; do
    timeout 150 python nbs/bench/eager_vs_replay.py --ab $m 2>&1 | grep -v Warning | tee "$OUT/eager_vs_replay_${m}_${CARD:-gpu}_$C.log"
  done ;;
combine)
  timeout 200 python -m pytest -q -n 4 -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_contiguous.py tests/test_modular.py \
    tests/test_layer.py tests/test_integrations_transformers.py 2>&1 | grep -E "^FAILED|passed|failed|rror" | tail -8 \
    | tee "$OUT/pytest_combine_${CARD:-gpu}_$C.log"
  MOE_LIT_PDL=0 timeout 120 python nbs/bench/profile_small_t.py 1 2 4 2>&1 | grep -v Warn > "$OUT/profile_small_t_nopdl_${CARD:-gpu}_$C.log"
  grep "==" "$OUT/profile_small_t_nopdl_${CARD:-gpu}_$C.log"
  timeout 200 python nbs/bench/eager_vs_replay.py --ab combine --tokens 1,2,4 2>&1 | grep -v Warning \
    | tee "$OUT/eager_vs_replay_combine_${CARD:-gpu}_$C.log" ;;
pdl)
  timeout 300 python nbs/bench/eager_vs_replay.py --ab pdl --tokens 1,2,8 2>&1 | grep -v Warning | tee "$OUT/eager_vs_replay_pdl_${CARD:-gpu}_$C.log"
  MOE_LIT_PDL=1 timeout 150 python nbs/bench/profile_small_t.py 1 2 2>&1 | grep -v Warning > "$OUT/profile_small_t_pdl_${CARD:-gpu}_$C.log"
  grep "==" "$OUT/profile_small_t_pdl_${CARD:-gpu}_$C.log" ;;
select)
  timeout 220 python -m pytest -q -n 6 -p no:cacheprovider -m "gpu or not gpu" tests/test_kernels_router.py tests/test_testing.py \
    tests/test_modular.py tests/test_layer.py 2>&1 | grep -E "^FAILED|passed|failed|rror" | tail -8 | tee "$OUT/pytest_select_${CARD:-gpu}_$C.log"
  timeout 220 python nbs/bench/select_ab.py "${BASE:-nbs/bench/_router_base.py}" 1 2 4 2>&1 | grep -v Warning \
    | tee "$OUT/select_ab_${CARD:-gpu}_$C.log"
  chain ;;
esac
