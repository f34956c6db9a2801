#!/usr/bin/env bash
# One H100/H200 call: `bench_quant` of the FP8 block scheme (both formats, eager and replayed, both activation paths),
# then the whole GPU suite with 4 workers (6 ran an H100 out of memory) and a serial rerun of what failed
# (only when the suite finished: a cut run records no failures).
#   REV=<commit> bash nbs/bench/fp8_suite_gpu.sh      -> $OUT/quant_bench_fp8_<card>_<commit>.json, pytest_gpu_<card>_<commit>.log
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"
timeout "${LIMIT_BENCH:-150}" python - "$OUT/quant_bench_fp8_${CARD:-gpu}_$C.json" <<'PY' 2>&1 | grep -v Warn
import json, sys
from moe_lit.bench import measure_device, bench_quant, format_bench_quant, source_commit
dev = measure_device(); rows = bench_quant(dev, schemes=("fp8_w8a8_block",))
print(format_bench_quant(rows), flush=True)
json.dump(dict(device=dev, commit=source_commit(), quant=rows), open(sys.argv[1], "w"), indent=1)
PY
log="$OUT/pytest_gpu_${CARD:-gpu}_$C.log"
timeout "${LIMIT_SUITE:-380}" python -m pytest -q -n 4 -m "gpu or not gpu" tests > "$log" 2>&1
rc=$?; echo "suite exit $rc" >> "$log"
grep -E "^FAILED|passed|failed" "$log" | tail -12
if [ "$rc" = 1 ]; then   # failures recorded (a run cut by timeout records none: --lf would rerun everything)
  timeout "${LIMIT_RERUN:-60}" python -m pytest -q --lf -m "gpu or not gpu" tests >> "$log" 2>&1
  echo "rerun exit $?" >> "$log"; tail -3 "$log"
fi
