"""FP4 GEMM1 (+SiLU) at decode with the tuned tile, and the same tile with one stage: the pipeliner's wgmma waits
(ptxas serializes every MMA of the K loop at 2+ stages, `09c` Performance) against exposed code-word loads.

    MOE_LIT_FP4_PREFETCH={0,2,4} python nbs/bench/fp4_stages.py OUT.jsonl     (one process per prefetch distance)

For each decode scenario of `14_bench.SCENARIOS` and MXFP4 / NVFP4 (mma128, the layer's layout), both formats:
µs eager (median of `do_bench`) and replayed (`do_bench_cudagraph`), % of the same floor as `bench_quant` (FP4
bytes of the active experts' w13 + activations, at the measured copy bandwidth), for the tile the table gives and
that tile with `num_stages=1`. `MOE_LIT_FP4_PREFETCH` (read at import) makes the K loop ask L2 for the code words
that many K tiles ahead. Appends one JSON line per (scenario, scheme, format, stages) to OUT.jsonl and prints them.
"""
import json, sys, os
import torch, triton.testing
from moe_lit.bench import SCENARIOS, measure_device, _problem, _contiguous_problem, _quant_bytes
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.kernels.contiguous import moe_align_block_size
from moe_lit.kernels import quant as Q

out = sys.argv[1]
prefetch = int(Q.FP4_PREFETCH)
dev = measure_device()
bench = lambda f: triton.testing.do_bench(f, return_mode="median") * 1e3
replay = lambda f: triton.testing.do_bench_cudagraph(f, return_mode="median") * 1e3
for sc in [s for s in SCENARIOS if "decode" in s["name"]]:
    a, w13, counts = _problem(sc)
    E, M, K = a.shape
    N, exp_m = w13.shape[1], max(1, sc["rows"] // E)
    w2 = torch.randn(E, K, N // 2, device="cuda", dtype=a.dtype) / N ** 0.5
    x, ids = _contiguous_problem(sc)
    active = [e for e, n in enumerate(counts.tolist()) if n]
    io = (sc["rows"] * K + sc["rows"] * N // 2) * a.element_size()
    for scheme in ("mxfp4_w4a16", "nvfp4_w4a16"):
        plain = quantize_expert_weights(w13, w2, scheme)
        floor_us = (_quant_bytes(plain, "w13", active) + io) / dev["copy_Bps"] * 1e6
        qw = plain.relayout("mma128")
        bm = Q.quant_block_m(qw, exp_m, a.dtype)
        aligned = moe_align_block_size(ids, bm, E)
        wa = Q._weight_kernel_args(qw, "w13")
        tiles = dict(batched=Q._quant_tile("batched_moe_gemm", E, N, K, exp_m, a.dtype, wa["FMT"], wa["GROUP_K"], True,
                                           None, layout=2),
                     contiguous=Q._quant_tile("fused_moe_gemm", E, N, K, bm, a.dtype, wa["FMT"], wa["GROUP_K"], True,
                                              None, block_m=bm, layout=2))
        for fmt, tile in tiles.items():
            for stages in sorted({tile["num_stages"], 1}, reverse=True):
                cfg = dict(tile, num_stages=stages)
                f = (lambda: Q.batched_moe_gemm_quant(a, qw, counts, "silu_and_mul", expected_m=exp_m, validate=False,
                                                      config=cfg)) if fmt == "batched" else \
                    (lambda: Q.fused_moe_gemm_quant(x, qw, *aligned, ids.shape[1], bm, "silu_and_mul", config=cfg))
                eager, graph = bench(f), replay(f)
                row = dict(scenario=sc["name"], scheme=scheme, format=fmt, tile=cfg, prefetch=prefetch,
                           floor_us=floor_us, eager_us=eager, graph_us=graph, graph_pct_floor=100 * floor_us / graph,
                           device=dev["device_name"], commit=os.environ.get("MOE_LIT_COMMIT", ""))
                print(f"{sc['name']:<26} {scheme:<12} {fmt:<10} stages {stages} prefetch {prefetch}  floor "
                      f"{floor_us:6.1f}  eager {eager:7.1f}  replay {graph:7.1f} ({row['graph_pct_floor']:4.1f}%)", flush=True)
                with open(out, "a") as fh: fh.write(json.dumps(row) + "\n")
        qw = plain = None
