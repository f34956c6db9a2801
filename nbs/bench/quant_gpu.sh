#!/usr/bin/env bash
# The GPU runs behind the quant chapter's FP4 measurements, on one CUDA machine. Results go under $OUT.
#   bash nbs/bench/quant_gpu.sh check    -> quant GEMM/experts tests natively, bench_quant (both FP4 layouts), the seed command
#   bash nbs/bench/quant_gpu.sh tune [w4a16|fp8] -> re-tune the FP4 and/or FP8 tiles, bench every quantized scheme
#   bash nbs/bench/quant_gpu.sh memcheck -> compute-sanitizer memcheck of the quant tests (the real-shape ones excluded)
#   bash nbs/bench/quant_gpu.sh stages   -> FP4 GEMM1 with the tuned tile and with one stage, L2 prefetch 0 / 2 / 4 tiles ahead
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD:$PWD/.gpucarry${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-nbs/bench/out}; mkdir -p "$OUT"
case "${1:-check}" in
check)
  export MOE_LIT_FP4_DECODE=${MOE_LIT_FP4_DECODE:-ptx}
  timeout 170 python -m pytest -q -n 4 -m "gpu or not gpu" tests/test_kernels_quant.py tests/test_kernels_quant_experts.py \
    2>&1 | grep -v Warning | tail -12 | tee "$OUT/pytest_quant.log"
  timeout 240 python - "$OUT/quant_bench.json" <<'PY'
import json, sys
from moe_lit.bench import measure_device, bench_quant, format_bench_quant, source_commit
dev = measure_device(); rows = bench_quant(dev, fp4_layouts=("split64", "mma128"))
print(format_bench_quant(rows), flush=True)
json.dump(dict(device=dev, commit=source_commit(), quant=rows), open(sys.argv[1], "w"), indent=1)
PY
  timeout 120 python -m moe_lit.cli run --model deepseek-v3 --ep 8 --all2all nixl_ep --quant nvfp4 2>&1 | tail -14 \
    | tee "$OUT/run_deepseek_ep8_nvfp4.log"
  ;;
tune)
  timeout 560 python nbs/bench/tune_quant.py "$OUT" ${2:-} 2>&1 | grep -v Warning | tail -40
  tar -C "$OUT" -czf "$OUT/configs.tgz" configs && rm -rf "$OUT/configs"
  ;;
stages)
  for p in 0 2 4; do
    MOE_LIT_FP4_PREFETCH=$p timeout 180 python nbs/bench/fp4_stages.py "$OUT/fp4_stages.jsonl" 2>&1 | grep -v Warning
  done ;;
memcheck)
  timeout 560 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -x -m gpu \
    tests/test_kernels_quant.py tests/test_kernels_quant_act.py tests/test_kernels_quant_experts.py -k "not real_shapes" \
    > "$OUT/memcheck_quant.log" 2>&1; echo "memcheck exit $?" >> "$OUT/memcheck_quant.log"; tail -8 "$OUT/memcheck_quant.log"
  ;;
esac
