"""FP8 block GEMM1 (+SiLU) at decode in both formats, for Nsight Compute: why the batched GEMM replays at 69 % of its
floor on Qwen3-30B-A3B where the contiguous one reaches 95 % (`quant_bench_h100_630ba9b.json`), with Mixtral-8x7B
(batched 91 %) beside it as the row where the two agree.

    bash nbs/bench/ncu_fp8.sh          (runs this under `ncu`; the report goes to $OUT/ncu_fp8_<card>_<commit>.txt)
    python nbs/bench/ncu_fp8.py        (alone: the same launches timed with do_bench, and each one's tile)

Both take bf16 activations as the layer does (the default `FP8_ACT_QUANT = "launch"`: a quantizer launch, then the
GEMM), so the report shows `_quantize_fp8_rows_kernel` before each GEMM. Each variant runs twice (the first compiles).
"""
import os, torch, triton.testing
from moe_lit.bench import SCENARIOS, _problem, _contiguous_problem
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.kernels import quant as Q
from moe_lit.kernels.contiguous import moe_align_block_size

profiled = os.environ.get("MOE_LIT_NCU", "") == "1"
for name in ("Qwen3-30B-A3B decode", "Mixtral-8x7B decode"):
    sc = next(s for s in SCENARIOS if s["name"] == name)
    a, w13, counts = _problem(sc)
    E, M, K = a.shape
    N, exp_m = w13.shape[1], max(1, sc["rows"] // E)
    w2 = torch.randn(E, K, N // 2, device="cuda", dtype=a.dtype) / N ** 0.5
    qw = quantize_expert_weights(w13, w2, "fp8_w8a8_block")
    wa = Q._weight_kernel_args(qw, "w13")
    x, ids = _contiguous_problem(sc)
    bm = Q.quant_block_m(qw, exp_m, a.dtype)
    aligned = moe_align_block_size(ids, bm, E)
    tiles = {"batched": Q._quant_tile("batched_moe_gemm", E, N, K, exp_m, a.dtype, wa["FMT"], wa["GROUP_K"], True, None),
             "contiguous": Q._quant_tile("fused_moe_gemm", E, N, K, exp_m, a.dtype, wa["FMT"], wa["GROUP_K"], True, None,
                                         block_m=bm)}
    runs = {"batched": lambda: Q.batched_moe_gemm_quant(a, qw, counts, "silu_and_mul", expected_m=exp_m, validate=False),
            "contiguous": lambda: Q.fused_moe_gemm_quant(x, qw, *aligned, ids.shape[1], bm, "silu_and_mul")}
    print(f"# {name}: E={E} M={M} K={K} N={N} rows={sc['rows']} active={int((counts > 0).sum())} "
          f"max count={int(counts.max())} sorted length={aligned[0].numel()}", flush=True)
    for label, f in runs.items():
        f(); torch.cuda.synchronize()
        t = "" if profiled else (f"  eager {triton.testing.do_bench(f, return_mode='median') * 1e3:7.1f} us, replayed "
                                 f"{triton.testing.do_bench_cudagraph(f, return_mode='median') * 1e3:7.1f} us")
        print(f"== {name} fp8 {label} tile {tiles[label]}{t}", flush=True)
        f(); torch.cuda.synchronize()
    del a, w13, w2, qw, runs
    torch.cuda.empty_cache()
