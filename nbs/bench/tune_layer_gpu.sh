#!/usr/bin/env bash
# Tile tables for the layer's own GEMM calls at decode on this card (`tune_layer.py`), with the layer timed before and
# after them in the same call (T = 1, 2, 4, 8; one graph per layer and the decode step; no transformers peers).
#   REV=<commit> [TUNE_MAX_TOKENS=64] bash nbs/bench/tune_layer_gpu.sh [deployment index ...]   # default: 0 1 (Qwen3, one GPU and EP2)
# -> $OUT/layer_{before,after}_<card>_<commit>.json, tune_layer_<card>_<commit>.json, tune_configs_<card>_<commit>.tgz
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
deps="${*:-0 1}"
ab() { python - "$@" <<'PY' 2>&1 | grep -v Warn
import sys
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, bench_layer, format_bench_layer
rep = bench_layer(sys.argv[1], [LAYER_DEPLOYMENTS[int(i)] for i in sys.argv[2].split()], tokens=(1, 2, 4, 8), peers=False)
print(format_bench_layer(rep), flush=True)
PY
}
timeout "${LIMIT_BENCH:-120}" bash -c "$(declare -f ab); ab '$OUT/layer_before_${CARD:-gpu}_$C.json' '$deps'"
timeout "${LIMIT_TUNE:-240}" python nbs/bench/tune_layer.py "$OUT/tune" $deps 2>&1 | grep -v Warn | tail -24
cp "$OUT/tune/tune_layer.json" "$OUT/tune_layer_${CARD:-gpu}_$C.json" 2>/dev/null
MOE_LIT_TILE_CONFIG_DIR="$OUT/tune/configs" timeout "${LIMIT_BENCH:-120}" \
  bash -c "$(declare -f ab); ab '$OUT/layer_after_${CARD:-gpu}_$C.json' '$deps'"
tar -C "$OUT/tune" -czf "$OUT/tune_configs_${CARD:-gpu}_$C.tgz" configs && rm -rf "$OUT/tune"
