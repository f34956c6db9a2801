"""moe-lit's own host (Python) time per eager forward with and without launch plans, measured without a GPU:
every layer-benchmark deployment shrunk to hidden 256 / intermediate 64, T = 1, Triton's launches stubbed (the
interpreter's kernel call returns at once), two alternating rounds, the fastest of 7 loops of 400 forwards (µs).

    TRITON_INTERPRET=1 python nbs/bench/launch_plan_host_cpu.py [SCHEME]
"""
import sys, torch
from triton.runtime.interpreter import InterpretedFunction
InterpretedFunction.run = lambda self, *a, **kw: None          # stub: moe-lit's own work only, no kernel runs
import moe_lit.layer as L
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import host_loop_us

quant = sys.argv[1] if len(sys.argv) > 1 else "unquantized"
for dep in LAYER_DEPLOYMENTS:
    c = deployment_config(dep).replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16)
    if c.shared_intermediate_size: c = c.replace(shared_intermediate_size=64)
    layer = FusedMoE(c, experts="triton", quant=quant)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    t = {False: [], True: []}
    for _ in range(2):
        for on in (False, True):
            L.LAUNCH_PLANS = on
            t[on].append(host_loop_us(lambda: layer(x), n=400, blocks=7, warmup=20))
    print(f"{dep['name']:<45} {quant:<12} eager {min(t[False]):6.1f} us   planned {min(t[True]):6.1f} us", flush=True)
