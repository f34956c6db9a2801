#!/usr/bin/env bash
# Tile tables for the shared experts' GEMMs on this card (`tune_shared.py`), with the layers that have shared experts
# (DeepSeek-V3 EP8 rank 0, nixl_ep and allgather) timed before and after them in the same call (T = 1, 2, 4, 8; one
# graph per layer and the decode step; no transformers peers; TOKENS, tuned and timed).
#   REV=<commit> [TOKENS="1 2 4 8"] bash nbs/bench/tune_shared_gpu.sh
# -> $OUT/layer_shared_{before,after}_<card>_<commit>.json, tune_shared_<card>_<commit>.json, and the tables under
#    $OUT/shared_configs/ (E=1 files only)
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
timeout "${LIMIT_BENCH:-100}" bash -c "$(declare -f ab); ab '$OUT/layer_shared_before_${CARD:-gpu}_$C.json'"
timeout "${LIMIT_TUNE:-300}" python nbs/bench/tune_shared.py "$OUT/tune" ${TOKENS:-1 2 4 8} 2>&1 | grep -v Warn | tail -30
cp "$OUT/tune/tune_shared.json" "$OUT/tune_shared_${CARD:-gpu}_$C.json" 2>/dev/null
MOE_LIT_TILE_CONFIG_DIR="$OUT/tune/configs" timeout "${LIMIT_BENCH:-100}" \
  bash -c "$(declare -f ab); ab '$OUT/layer_shared_after_${CARD:-gpu}_$C.json'"
mkdir -p "$OUT/shared_configs" && cp "$OUT"/tune/configs/fused_moe_gemm/E=1,* "$OUT/shared_configs/" 2>/dev/null; rm -rf "$OUT/tune"
