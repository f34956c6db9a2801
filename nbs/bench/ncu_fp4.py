"""The FP4 GEMM1 (+SiLU) of the batched format at decode, beside the bf16 GEMM of the same routed rows, for Nsight
Compute: where the FP4 K loop's time goes (stall reasons, bytes in flight, occupancy) on the rows where bf16 runs at
its floor and FP4 at 43-66 % of it (`09c` Performance).

    bash nbs/bench/ncu_fp4.sh          (runs this under `ncu`; the report goes to $OUT/ncu_fp4_<card>_<commit>.txt)
    python nbs/bench/ncu_fp4.py        (alone: the same launches, timed with do_bench, for the report's context)

Per scenario (DeepSeek-V3 EP8, Mixtral-8x7B and Qwen3-30B-A3B decode of `14_bench.SCENARIOS`): MXFP4 and NVFP4 in the
layer's mma128 layout with the tile the table gives, and bf16 with its table's tile, each launched twice (the first
compiles); the script prints the scenario, scheme and tile before each pair, so the report's kernels read in order.
"""
import os, torch, triton.testing
from moe_lit.bench import SCENARIOS, _problem
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.kernels import quant as Q
from moe_lit.kernels.batched import batched_moe_gemm

profiled = os.environ.get("MOE_LIT_NCU", "") == "1"    # under ncu (ncu_fp4.sh sets it): two launches a variant, no timing
for name in ("DeepSeek-V3 EP8 decode", "Mixtral-8x7B decode", "Qwen3-30B-A3B decode"):
    sc = next(s for s in SCENARIOS if s["name"] == name)
    a, w13, counts = _problem(sc)
    E, M, K = a.shape
    N, exp_m = w13.shape[1], max(1, sc["rows"] // E)
    w2 = torch.randn(E, K, N // 2, device="cuda", dtype=a.dtype) / N ** 0.5
    runs = [("bf16", None, lambda: batched_moe_gemm(a, w13, counts, "silu_and_mul", expected_m=exp_m, validate=False))]
    for scheme in ("mxfp4_w4a16", "nvfp4_w4a16"):
        qw = quantize_expert_weights(w13, w2, scheme).relayout("mma128")
        wa = Q._weight_kernel_args(qw, "w13")
        tile = Q._quant_tile("batched_moe_gemm", E, N, K, exp_m, a.dtype, wa["FMT"], wa["GROUP_K"], True, None, layout=2)
        runs.append((scheme, tile, (lambda qw=qw: Q.batched_moe_gemm_quant(a, qw, counts, "silu_and_mul",
                                                                            expected_m=exp_m, validate=False))))
    for label, tile, f in runs:
        f(); torch.cuda.synchronize()                 # compile (a first launch)
        t = "" if profiled else f"  {triton.testing.do_bench(f, return_mode='median') * 1e3:7.1f} us (do_bench median)"
        print(f"== {name} {label} tile {tile or 'bf16 table'}{t}", flush=True)
        f(); torch.cuda.synchronize()                 # the launch to read
    del a, w13, w2, runs
    torch.cuda.empty_cache()
