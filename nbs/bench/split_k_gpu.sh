#!/usr/bin/env bash
# Split-K on one CUDA machine: the split sweep, the seed scenario and its T=1 profile, then the whole GPU suite.
# Results under $OUT; pass REV= (a copied tree may carry a stale HEAD).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/.gpucarry${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-nbs/bench/out}; mkdir -p "$OUT"
C=${REV:-$(git rev-parse --short HEAD 2>/dev/null || echo wt)}
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 200 python nbs/bench/split_k_sweep.py "$OUT/split_k_sweep_h200_$C.json" > "$OUT/split_k_sweep_h200_$C.log" 2>&1
tail -65 "$OUT/split_k_sweep_h200_$C.log" | grep -v "^{"
timeout 90 python nbs/bench/seed_scenario.py "$OUT/seed_scenario_h200_$C.json" 2>&1 | grep -v Warning | tail -9
timeout 60 python nbs/bench/profile_seed_t1.py > "$OUT/profile_seed_t1_h200_$C.log" 2>&1; grep -E "==|gemm" "$OUT/profile_seed_t1_h200_$C.log"
timeout 330 python -m pytest -q -n 6 -m "gpu or not gpu" tests 2>&1 | grep -v Warning | tail -15 | tee "$OUT/pytest_gpu_h200_$C.log"
