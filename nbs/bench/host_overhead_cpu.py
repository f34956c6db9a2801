"""moe-lit's own host work per eager forward, without a GPU: Triton's launches stubbed out, torch's CPU ops real.

    TRITON_INTERPRET=1 python nbs/bench/host_overhead_cpu.py [--profile] [--quant SCHEME]
Every deployment of the layer benchmark (`LAYER_DEPLOYMENTS`) at T = 1, shrunk to hidden 256 / intermediate 64 so the
weights fit a laptop: the Python path (checks, routing plan, dispatch, launch arguments) does not depend on the sizes.
"""
import sys, time, torch, cProfile, pstats
from triton.runtime.interpreter import InterpretedFunction
InterpretedFunction.run = lambda self, *a, **kw: None          # stub: measure moe-lit's own host work
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config


def per_forward(layer, x, n=400, blocks=7):
    "The fastest of `blocks` loops of `n` forwards, per forward in µs (the minimum: this machine's noise only adds)."
    for _ in range(20): layer(x)
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(n): layer(x)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


quant = sys.argv[sys.argv.index("--quant") + 1] if "--quant" in sys.argv else "unquantized"
for dep in LAYER_DEPLOYMENTS:
    c = deployment_config(dep)
    c = c.replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16,
                  **({"shared_intermediate_size": 64} if c.shared_intermediate_size else {}))
    layer = FusedMoE(c, experts="triton", quant=quant)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    print(f"{dep['name']:<45} {c.activation_format.value:<16} {quant:<12} host per forward {per_forward(layer, x):6.1f} us",
          flush=True)
    if "--profile" in sys.argv:
        pr = cProfile.Profile(); pr.enable()
        for _ in range(500): layer(x)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)
