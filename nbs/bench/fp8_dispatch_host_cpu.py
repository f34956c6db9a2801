"""moe-lit's own host (Python) time per eager forward of the FP8 nixl_ep layers, FP8 on the wire (the record's choice)
against quantizing the slabs after the dispatch (`dispatch_quant = None`), launch plans off, on the 2-core CPU:
shrunk to hidden 256 / intermediate 64, T = 1, Triton's launches stubbed, two alternating rounds, the fastest of
7 loops of 400 forwards (µs).

    TRITON_INTERPRET=1 python nbs/bench/fp8_dispatch_host_cpu.py
"""
import torch
from triton.runtime.interpreter import InterpretedFunction
InterpretedFunction.run = lambda self, *a, **kw: None          # stub: moe-lit's own work only, no kernel runs
import moe_lit.layer as L
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import host_loop_us

L.LAUNCH_PLANS = False
for dep in [d for d in LAYER_DEPLOYMENTS if d["backend"] == "nixl_ep"]:
    c = deployment_config(dep).replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16)
    if c.shared_intermediate_size: c = c.replace(shared_intermediate_size=64)
    layer = FusedMoE(c, experts="triton", quant="fp8")
    x, chosen, t = torch.randn(1, 256, dtype=torch.bfloat16), layer.dispatch_quant, {}
    for _ in range(2):
        for mode, block in (("on the wire", chosen), ("after dispatch", None)):
            layer.dispatch_quant, layer._kernels = block, {}
            layer(x)
            t.setdefault(mode, []).append(host_loop_us(lambda: layer(x), n=400, blocks=7, warmup=20))
    print(f"{dep['name']:<45} FP8 on the wire {min(t['on the wire']):6.1f} us   quantized after dispatch "
          f"{min(t['after dispatch']):6.1f} us", flush=True)
