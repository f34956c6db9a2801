"""Eager vs CUDA-graph-replayed forward of the whole layer at T = 1, every `LAYER_DEPLOYMENTS` entry (GPU).

    python nbs/bench/eager_vs_replay.py [--quant SCHEME]
eager: a loop of 200 `layer(x)` calls, synchronised once at the end, µs per call (the host-bound rate a Python caller
sees); replay: the same forward captured with `layer.capture([1])`, a loop of 200 `graph.replay()`; host = eager −
replay. Random weights, bf16, fixed seeds.
"""
import sys, time, torch
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

quant = sys.argv[sys.argv.index("--quant") + 1] if "--quant" in sys.argv else "unquantized"


def loop_us(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


for dep in LAYER_DEPLOYMENTS:
    layer = FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"], quant=quant)
    x = torch.randn(1, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype)
    eager = loop_us(lambda: layer(x))
    g, gx, gy = layer.capture([1]).graphs[1]
    gx.copy_(x); replay = loop_us(g.replay)
    print(f"{dep['name']:<45} {quant:<12} T=1 eager {eager:7.1f} us  replay {replay:6.1f} us  host {eager - replay:7.1f} us",
          flush=True)
    del layer, g; torch.cuda.empty_cache()
