#!/usr/bin/env bash
# One CUDA machine: the whole GPU suite, then the selection kernel against another commit's (select_ab.py; BASE=, default
# nbs/bench/_router_base.py), then the kernel chain at T = 1. Results under $OUT; pass REV=.
#   LIMIT_SUITE (default 300), LIMIT_AB (200) seconds
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout "${LIMIT_SUITE:-300}" python -m pytest -q -n 6 -p no:cacheprovider -m "gpu or not gpu" tests 2>&1 | grep -v Warning \
  | tail -25 | tee "$OUT/pytest_gpu_${CARD:-gpu}_$C.log"
timeout "${LIMIT_AB:-200}" python nbs/bench/select_ab.py "${BASE:-nbs/bench/_router_base.py}" 1 2 4 2>&1 | grep -v Warning \
  | tee "$OUT/select_ab_${CARD:-gpu}_$C.log"
timeout 80 python nbs/bench/profile_small_t.py 1 2>&1 | grep -v Warning > "$OUT/profile_small_t_${CARD:-gpu}_$C.log"
grep -A12 "DeepSeek" "$OUT/profile_small_t_${CARD:-gpu}_$C.log" | head -24
