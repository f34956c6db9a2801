#!/usr/bin/env bash
# Nsight Compute on `ncu_fp8.py`'s launches (the FP8 activation quantizer and the FP8 GEMM1 of both formats at decode):
# the same sections as `ncu_fp4.sh`, clocks left alone. Writes $OUT/ncu_fp8_<card>_<commit>.txt; the timings of the
# same launches (do_bench, no profiler) go first, to $OUT/ncu_fp8_times_<card>_<commit>.txt.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout 120 python nbs/bench/ncu_fp8.py > "$OUT/ncu_fp8_times_${CARD:-gpu}_$C.txt" 2>&1
timeout "${LIMIT:-240}" "$NCU" --clock-control none --target-processes all \
  -k regex:'_quantize_fp8_rows_kernel|_batched_moe_gemm_quant_kernel|_fused_moe_quant_kernel' \
  "${NCU_SECTIONS[@]}" \
  env MOE_LIT_NCU=1 python nbs/bench/ncu_fp8.py > "$OUT/ncu_fp8_${CARD:-gpu}_$C.txt" 2>&1
echo "ncu exit $?" >> "$OUT/ncu_fp8_${CARD:-gpu}_$C.txt"
cat "$OUT/ncu_fp8_times_${CARD:-gpu}_$C.txt" | grep -v Warn
grep -E "^==|^#|  [a-z_]+kernel|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Grid Size|Block Size|ncu exit" \
  "$OUT/ncu_fp8_${CARD:-gpu}_$C.txt" | head -90
