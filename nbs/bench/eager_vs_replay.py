"""Eager vs CUDA-graph-replayed forward of the whole layer at T = 1, every `LAYER_DEPLOYMENTS` entry (GPU).

    python nbs/bench/eager_vs_replay.py [--quant SCHEME] [--ab]

eager: a loop of 200 `layer(x)` calls, synchronised once at the end, µs per call (the host-bound rate a Python caller
sees); replay: the same forward captured with `layer.capture([1])`, a loop of 200 `graph.replay()`; host = eager −
replay. Random weights, bf16, fixed seeds. `--ab`: eager timed alternately with Triton's JIT launch path
(`moe_lit.kernels.batched.FAST_LAUNCH` off) and `launch_kernel`'s direct launches (on), three times each in one
process, the best kept, and both modes' outputs compared bit for bit.
"""
import sys, time, torch
import moe_lit.kernels.batched as kb
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

quant = sys.argv[sys.argv.index("--quant") + 1] if "--quant" in sys.argv else "unquantized"
ab = "--ab" in sys.argv


def loop_us(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


default = kb.FAST_LAUNCH
for dep in LAYER_DEPLOYMENTS:
    layer = FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"], quant=quant)
    x = torch.randn(1, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype)
    modes = (False, True) if ab else (default,)
    best, outs = {}, {}
    for _ in range(3 if ab else 1):
        for fast in modes:
            kb.FAST_LAUNCH = fast
            outs[fast] = layer(x)
            best[fast] = min(best.get(fast, float("inf")), loop_us(lambda: layer(x)))
    kb.FAST_LAUNCH = default
    g, gx, gy = layer.capture([1]).graphs[1]
    gx.copy_(x); replay = loop_us(g.replay)
    if ab:
        jit, direct = best[False], best[True]
        print(f"{dep['name']:<45} {quant:<12} T=1 eager jit {jit:7.1f} us  direct {direct:7.1f} us  replay {replay:6.1f} us"
              f"  host jit {jit - replay:6.1f}  direct {direct - replay:6.1f}  same bits {torch.equal(outs[False], outs[True])}",
              flush=True)
    else:
        eager = best[default]
        print(f"{dep['name']:<45} {quant:<12} T=1 eager {eager:7.1f} us  replay {replay:6.1f} us  host {eager - replay:7.1f} us",
              flush=True)
    del layer; torch.cuda.empty_cache()
