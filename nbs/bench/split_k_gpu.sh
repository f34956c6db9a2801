#!/usr/bin/env bash
# Split-K on one CUDA machine: the quant tests natively, the split sweep, the seed scenario and its T=1 profile. Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/.gpucarry${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-nbs/bench/out}; mkdir -p "$OUT"
C=$(git rev-parse --short HEAD 2>/dev/null || echo wt)
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python -m pytest -q -n 4 -m "gpu or not gpu" tests/test_kernels_quant.py tests/test_kernels_quant_experts.py \
  2>&1 | grep -v Warning | tail -15 | tee "$OUT/pytest_quant_h200_$C.log"
timeout 200 python nbs/bench/split_k_sweep.py "$OUT/split_k_sweep_h200_$C.json" > "$OUT/split_k_sweep_h200_$C.log" 2>&1
tail -3 "$OUT/split_k_sweep_h200_$C.log"
timeout 90 python nbs/bench/seed_scenario.py "$OUT/seed_scenario_h200_$C.json" 2>&1 | grep -v Warning | tail -12
timeout 60 python nbs/bench/profile_seed_t1.py > "$OUT/profile_seed_t1_h200_$C.log" 2>&1; head -40 "$OUT/profile_seed_t1_h200_$C.log"
