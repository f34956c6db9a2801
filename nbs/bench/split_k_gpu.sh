#!/usr/bin/env bash
# Split-K on one CUDA machine. Results under $OUT; pass REV= (a copied tree may carry a stale HEAD).
#   bash nbs/bench/split_k_gpu.sh sweep -> the split sweep, the seed scenario and its T=1 profile, then the whole GPU suite
#   bash nbs/bench/split_k_gpu.sh final -> the seed scenario, the layer benchmark (rows saved as they finish) + figure,
#                                          then memcheck of the kernel tests in four parallel sanitizers
#   bash nbs/bench/split_k_gpu.sh slots -> the batched deployments of the layer benchmark at small T, the seed scenario,
#                                          memcheck of the split and compact-slot tests, then the whole GPU suite
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
seed() { timeout 80 python nbs/bench/seed_scenario.py "$OUT/seed_scenario_h200_$C.json" 2>&1 | grep -v Warning | tail -9; }
case "${1:-sweep}" in
sweep)
  timeout 200 python nbs/bench/split_k_sweep.py "$OUT/split_k_sweep_h200_$C.json" > "$OUT/split_k_sweep_h200_$C.log" 2>&1
  tail -65 "$OUT/split_k_sweep_h200_$C.log" | grep -v "^{"
  seed
  timeout 60 python nbs/bench/profile_seed_t1.py > "$OUT/profile_seed_t1_h200_$C.log" 2>&1; grep -E "==|gemm" "$OUT/profile_seed_t1_h200_$C.log"
  timeout 330 python -m pytest -q -n 6 -m "gpu or not gpu" tests 2>&1 | grep -v Warning | tail -15 | tee "$OUT/pytest_gpu_h200_$C.log"
  ;;
final)
  seed
  timeout 320 python nbs/bench/layer_bench_run.py "$OUT/layer_bench_h200_$C.json" 2>&1 | grep -v Warning | tee "$OUT/layer_bench_h200_$C.log" | tail -3
  mc() { timeout 190 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -m "not gpu" "$@" 2>&1 | tail -4; }
  { mc tests/test_kernels_quant.py > "$OUT/mc1.log" & mc tests/test_kernels_quant_experts.py tests/test_kernels_quant_act.py > "$OUT/mc2.log" &
    mc tests/test_layer.py tests/test_modular.py > "$OUT/mc3.log" &
    mc tests/test_kernels_contiguous.py tests/test_kernels_batched.py > "$OUT/mc4.log" & wait; }
  for f in "$OUT"/mc?.log; do echo "== $f"; cat "$f"; done | tee "$OUT/memcheck_h200_$C.log"; rm -f "$OUT"/mc?.log
  ;;
slots)
  timeout 120 python - "$OUT/layer_bench_small_t_h200_$C.json" <<'PY' 2>&1 | grep -v Warning | tee "$OUT/layer_bench_small_t_h200_$C.log"
import json, sys
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, bench_layer, format_bench_layer
deps = [d for d in LAYER_DEPLOYMENTS if "nixl_ep" in d["name"]]
rep = bench_layer(sys.argv[1], deps, tokens=(1, 2, 4, 8, 16, 64))
print(format_bench_layer(rep))
PY
  seed
  timeout 90 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -m "not gpu" tests/test_kernels_batched.py \
    tests/test_kernels_quant.py -k "compact or split_k" 2>&1 | tail -4 | tee "$OUT/memcheck_slots_h200_$C.log"
  timeout 300 python -m pytest -q -n 6 -m "gpu or not gpu" tests 2>&1 | grep -v Warning | tail -15 | tee "$OUT/pytest_gpu_h200_$C.log"
  ;;
esac
