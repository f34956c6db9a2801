#!/usr/bin/env bash
# The GPU runs behind the layer benchmark (14a_bench_layer) and the hot-path tests, on one CUDA machine.
#   bash nbs/bench/layer_gpu.sh smoke  -> the layer/router tests natively, two deployments at T = 1, 64
#   bash nbs/bench/layer_gpu.sh tests  -> the GPU suite (pytest -n 4), a host/kernel profile of one forward, router logits
#   bash nbs/bench/layer_gpu.sh bench  -> the whole layer benchmark (JSON + figure), memcheck of the layer's GPU tests
#   bash nbs/bench/layer_gpu.sh final  -> hot-path tests natively (SKIP_HOT_TESTS=1: not, where the suite just ran), the layer
#                                         benchmark (rows saved as they finish; LIMIT_BENCH seconds) + figure, then memcheck
#                                         of every kernel test file's native tests in four parallel sanitizers (LIMIT_MC
#                                         seconds; SKIP_MEMCHECK=1: not)
# Results go under $OUT (default: nbs/bench/out). fastcore may be carried in .gpucarry/ where it is not installed.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh"   # the root, the carried packages, $OUT, the commit ($C; pass REV=), the card
rev=$C; card=${CARD:-gpu}
python - <<'PY'
import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
PY
router_logits_bench() {
python - <<'PY'
import torch, triton.testing
from moe_lit.routing import matmul_acc
for E, H, T in ((128, 2048, 1), (128, 2048, 256), (256, 7168, 1), (256, 7168, 256)):
    x = torch.randn(T, H, device="cuda").bfloat16(); g = torch.randn(E, H, device="cuda").bfloat16(); g32 = g.float()
    a = triton.testing.do_bench_cudagraph(lambda: x.float() @ g32.T, return_mode="median") * 1e3
    b = triton.testing.do_bench_cudagraph(lambda: matmul_acc(x, g), return_mode="median") * 1e3
    d = (matmul_acc(x, g).double() - (x.double() @ g.double().T)).abs().max().item()
    e = ((x.float() @ g32.T).double() - (x.double() @ g.double().T)).abs().max().item()
    print(f"router logits E={E} H={H} T={T}: fp32 upcast {a:.1f} us (max err {e:.1e}), bf16 mm -> fp32 {b:.1f} us (max err {d:.1e})")
PY
}
case "${1:-smoke}" in
smoke)
  python -m pytest -q -x -m "gpu or not gpu" tests/test_kernels_router.py tests/test_layer.py 2>&1 | tail -15
  router_logits_bench
  python - <<'PY'
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, bench_layer, format_bench_layer
rep = bench_layer(None, [LAYER_DEPLOYMENTS[0], LAYER_DEPLOYMENTS[4]], tokens=(1, 64))
print(format_bench_layer(rep))
PY
  ;;
tests)
  python -m pytest -q -n 4 -m "gpu or not gpu" tests 2>&1 | tail -8 | tee "$OUT/pytest_gpu_${card}_$rev.log"
  for d in 0 4 5; do python nbs/bench/profile_layer.py $d 1; done > "$OUT/profile_layer_${card}_$rev.log" 2>&1
  router_logits_bench | tee "$OUT/router_logits_${card}_$rev.log"
  ;;
bench)
  python -m moe_lit.cli bench --layer --out "$OUT/layer_bench_${card}_$rev.json" 2>&1 | tee "$OUT/layer_bench_${card}_$rev.log" | tail -70
  python - "$OUT/layer_bench_${card}_$rev.json" "$OUT/layer_bench_${card}_$rev.png" <<'PY'
import sys
from moe_lit.bench_layer import load_bench_layer, plot_bench_layer
plot_bench_layer(load_bench_layer(sys.argv[1])).savefig(sys.argv[2], dpi=110)
PY
  for d in 4 5; do python nbs/bench/profile_layer.py $d 1 2>&1 | grep -E "per eager|side stream"; done | tee "$OUT/overlap_ab_${card}_$rev.log"
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -x -m gpu tests/test_layer.py 2>&1 | tail -6 \
    | tee "$OUT/memcheck_layer_${card}_$rev.log"
  ;;
final)
  [ "${SKIP_HOT_TESTS:-0}" = 1 ] || timeout 120 python -m pytest -q -n 4 -m "not gpu" tests/test_kernels_dispatch.py \
    tests/test_layer.py tests/test_modular.py tests/test_kernels_router.py 2>&1 | grep -E "FAILED|ERROR|passed|failed" \
    | tee "$OUT/pytest_hot_path_${card}_$rev.log"
  timeout "${LIMIT_BENCH:-330}" python nbs/bench/layer_bench_run.py "$OUT/layer_bench_${card}_$rev.json" 2>&1 | grep -v Warning | tee "$OUT/layer_bench_${card}_$rev.log" | tail -60
  [ "${SKIP_MEMCHECK:-0}" = 1 ] && exit 0
  mc() { timeout "${LIMIT_MC:-230}" compute-sanitizer --tool memcheck --error-exitcode 1 python -m pytest -q -m "not gpu" "$@" 2>&1 | tail -4; }
  { mc tests/test_kernels_quant.py > "$OUT/mc1.log" & mc tests/test_kernels_quant_experts.py tests/test_kernels_quant_act.py > "$OUT/mc2.log" &
    mc tests/test_layer.py tests/test_kernels_router.py tests/test_kernels_dispatch.py tests/test_modular.py > "$OUT/mc3.log" &
    mc tests/test_kernels_contiguous.py tests/test_kernels_batched.py > "$OUT/mc4.log" & wait; }
  for f in "$OUT"/mc?.log; do echo "== $f"; cat "$f"; done | tee "$OUT/memcheck_${card}_$rev.log"; rm -f "$OUT"/mc?.log
  ;;
esac
