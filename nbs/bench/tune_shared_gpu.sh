#!/usr/bin/env bash
# Tile tables for the shared experts' GEMMs on this card (`tune_shared.py`), with the layers that have shared experts
# (DeepSeek-V3 EP8 rank 0, nixl_ep and allgather) timed before and after them in the same call (T = 1, 2, 4, 8; one
# graph per layer and the decode step; no transformers peers; TOKENS, tuned and timed).
#   REV=<commit> [TOKENS="1 2 4 8"] bash nbs/bench/tune_shared_gpu.sh
# -> $OUT/layer_shared_{before,after}_<card>_<commit>.json, tune_shared_<card>_<commit>.json and
#    tune_shared_configs_<card>_<commit>.tgz (the E=1 tables: their names do not come back from the device as files).
# On a fresh machine the first bench compiles every kernel: give it LIMIT_BENCH >= 150 (60 cut it before its rows).
# `shared_ab.py` is the cleaner A/B of the tables once they are in the package (one process, both modes).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
ab() { python - "$1" "${TOKENS:-1 2 4 8}" <<'PY' 2>&1 | grep -v Warn
import sys
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, bench_layer, format_bench_layer
deps = [d for d in LAYER_DEPLOYMENTS if d["name"].startswith("DeepSeek-V3")]
rep = bench_layer(sys.argv[1], deps, tokens=tuple(int(t) for t in sys.argv[2].split()), peers=False)
print(format_bench_layer(rep), flush=True)
PY
}
timeout "${LIMIT_BENCH:-150}" bash -c "$(declare -f ab); ab '$OUT/layer_shared_before_${CARD:-gpu}_$C.json'"
timeout "${LIMIT_TUNE:-300}" python nbs/bench/tune_shared.py "$OUT/tune" ${TOKENS:-1 2 4 8} 2>&1 | grep -v Warn | tail -30
cp "$OUT/tune/tune_shared.json" "$OUT/tune_shared_${CARD:-gpu}_$C.json" 2>/dev/null
MOE_LIT_TILE_CONFIG_DIR="$OUT/tune/configs" timeout "${LIMIT_BENCH:-150}" \
  bash -c "$(declare -f ab); ab '$OUT/layer_shared_after_${CARD:-gpu}_$C.json'"
tables=$(cd "$OUT/tune/configs" 2>/dev/null && ls -d fused_moe_gemm/E=1,* 2>/dev/null)
[ -n "$tables" ] && tar -C "$OUT/tune/configs" -czf "$OUT/tune_shared_configs_${CARD:-gpu}_$C.tgz" $tables
rm -rf "$OUT/tune"
