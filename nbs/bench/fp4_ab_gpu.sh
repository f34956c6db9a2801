#!/usr/bin/env bash
# FP4 GEMM1 (+SiLU) before and after a change, on one machine in one call: `bench_quant` of a base revision's
# moe_lit and of this tree's, FP4 schemes only, the layout each side's layer runs, same device measurement.
#   here:   bash nbs/bench/fp4_ab_gpu.sh prepare REV  -> REV's moe_lit/ unpacked under nbs/bench/out/base (ignored by
#                                                       git: pass carry=["nbs/bench/out/base", ".gpucarry"] to the run)
#   device: REV=<head> bash nbs/bench/fp4_ab_gpu.sh run -> $OUT/fp4_ab_{base,head}_$CARD_$C.json and the table
set -uo pipefail
case "${1:-run}" in
prepare)
  cd "$(dirname "$0")/../.."
  rev=${2:?a base revision}; rm -rf nbs/bench/out/base; mkdir -p nbs/bench/out/base
  git archive "$rev" moe_lit | tar -x -C nbs/bench/out/base && echo "$rev" > nbs/bench/out/base/REV
  echo "base $(cat nbs/bench/out/base/REV) unpacked: nbs/bench/out/base/moe_lit" ;;
run)
  source "$(dirname "$0")/gpu_env.sh"
  base=$PWD/nbs/bench/out/base; [ -d "$base/moe_lit" ] || { echo "no base: run 'prepare REV' here first"; exit 1; }
  out=$(cd "$OUT" && pwd); repo=$PWD
  for side in base head; do
    root=$repo; [ $side = base ] && root=$base
    (cd /tmp && PYTHONPATH=$root:$repo/.gpucarry timeout 240 python - "$out/fp4_ab_${side}_${CARD:-gpu}_$C.json") <<'PY' 2>&1 | grep -v Warning
import json, sys, moe_lit
from moe_lit.bench import measure_device, bench_quant, format_bench_quant
dev = measure_device()
rows = bench_quant(dev, schemes=("mxfp4_w4a16", "nvfp4_w4a16"))
print(moe_lit.__file__); print(format_bench_quant(rows), flush=True)
json.dump(dict(device=dev, quant=rows), open(sys.argv[1], "w"), indent=1)
PY
  done
  python - "$OUT/fp4_ab_base_${CARD:-gpu}_$C.json" "$OUT/fp4_ab_head_${CARD:-gpu}_$C.json" "$(cat "$base/REV")" <<'PY'
import json, sys
base, head = (json.load(open(p))["quant"] for p in sys.argv[1:3])
key = lambda r: (r["scenario"], r["scheme"])
b = {key(r): r for r in base}
print(f"base {sys.argv[3]} against this tree; us (% of floor), then head / base")
for r in head:
    o = b.get(key(r))
    if o is None: continue
    cells = [f"{c[:-3]} {o[c]:7.1f} -> {r[c]:7.1f} ({r[c] / o[c]:.2f}x)" for c in
             ("batched_us", "contiguous_us", "batched_graph_us", "contiguous_graph_us") if o.get(c) and r.get(c)]
    print(f"{r['scenario']:<26} {r['scheme']:<12} floor {r['floor_us']:6.1f}  " + "  ".join(cells))
PY
  ;;
esac
