#!/usr/bin/env bash
# Nsight Compute on the batched GEMM1 kernels of `ncu_fp4.py` (FP4 mma128 and bf16 at decode): speed of light, memory
# workload, occupancy, launch statistics, warp states (stall reasons) and scheduler statistics of every launch, the
# clocks left alone (the device notes: --clock-control none). Needs a machine whose ncu reads the counters
# (Firecracker). Writes $OUT/ncu_fp4_<card>_<commit>.txt and, from a second pass over the first four FP4 launches with
# every section's details, ncu_fp4_stalls_<card>_<commit>.txt; `ncu_fp4.py` alone times the same launches.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout "${LIMIT:-420}" "$NCU" --clock-control none --target-processes all \
  -k regex:'_batched_moe_gemm(_quant)?_kernel' \
  "${NCU_SECTIONS[@]}" \
  env MOE_LIT_NCU=1 python nbs/bench/ncu_fp4.py > "$OUT/ncu_fp4_${CARD:-gpu}_$C.txt" 2>&1
echo "ncu exit $?" >> "$OUT/ncu_fp4_${CARD:-gpu}_$C.txt"
# second pass, the first four FP4 launches (DeepSeek-V3 MXFP4 and NVFP4): every section's body printed, so the warp
# states come as a table of stall reasons, and where in the code the stalls are sampled (SourceCounters)
timeout "${LIMIT2:-180}" "$NCU" --clock-control none --target-processes all -k regex:'_batched_moe_gemm_quant_kernel' \
  --launch-count 4 --section WarpStateStats --section SourceCounters --print-details all \
  env MOE_LIT_NCU=1 python nbs/bench/ncu_fp4.py > "$OUT/ncu_fp4_stalls_${CARD:-gpu}_$C.txt" 2>&1
echo "ncu exit $?" >> "$OUT/ncu_fp4_stalls_${CARD:-gpu}_$C.txt"
grep -E "^==|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Stall|ncu exit" \
  "$OUT/ncu_fp4_${CARD:-gpu}_$C.txt" | head -80
