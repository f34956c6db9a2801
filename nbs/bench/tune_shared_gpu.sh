#!/usr/bin/env bash
# Tile tables for the shared experts' GEMMs on this card (`tune_shared.py`: each GEMM alone), then the whole layers
# with shared experts (DeepSeek-V3 EP8 rank 0, nixl_ep and allgather) replayed with the heuristic's tiles and with
# the new tables, alternately in one process (`shared_ab.py --tables`): a tile that wins alone can lose in the layer.
#   REV=<commit> [TOKENS="1 2 4 8"] bash nbs/bench/tune_shared_gpu.sh
# -> $OUT/tune_shared_<card>_<commit>.json (every timing), shared_ab_tuned_<card>_<commit>.log (the layer A/B) and
#    tune_shared_configs_<card>_<commit>.tgz (the E=1 tables: names with '=' and ',' do not come back as files).
# Commit a table's entry only where the layer A/B gained; keep the heuristic's own tile at the others.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout "${LIMIT_TUNE:-300}" python nbs/bench/tune_shared.py "$OUT/tune" ${TOKENS:-1 2 4 8} 2>&1 | grep -v Warn | tail -30
cp "$OUT/tune/tune_shared.json" "$OUT/tune_shared_${CARD:-gpu}_$C.json" 2>/dev/null
timeout "${LIMIT_AB:-150}" python nbs/bench/shared_ab.py --tables "$OUT/tune/configs" ${TOKENS:-1 2 4 8} 2>&1 \
  | grep -v Warn | tee "$OUT/shared_ab_tuned_${CARD:-gpu}_$C.log"
tables=$(cd "$OUT/tune/configs" 2>/dev/null && ls -d fused_moe_gemm/E=1,* 2>/dev/null)
[ -n "$tables" ] && tar -C "$OUT/tune/configs" -czf "$OUT/tune_shared_configs_${CARD:-gpu}_$C.tgz" $tables
rm -rf "$OUT/tune"
