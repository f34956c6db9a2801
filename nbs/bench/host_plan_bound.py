"""How much of an eager forward's host time is moe-lit's Python between the launches, measured without a GPU.

    TRITON_INTERPRET=1 python nbs/bench/host_plan_bound.py

For three deployments of the layer benchmark (`LAYER_DEPLOYMENTS`, shrunk to hidden 256 / intermediate 64 as in
`host_overhead_cpu.py`; Triton's launches stubbed out, so no kernel runs): the fastest of 5 loops of 3000 forwards,
µs a forward, beside the same forward's Triton launches called again straight from a record of their arguments,
with ten `torch.empty` allocations — what a launch plan recorded once per shape would leave of the host's work
(the GPU's launch cost itself comes on top of both). The lower the second figure against the first, the more of the
host time is the Python between the launches.
"""
import torch
from triton.runtime.interpreter import InterpretedFunction
RECORD = []                                                     # while non-empty: [list] the launches are noted in
def _stub(self, *a, **kw):
    if RECORD: RECORD[0].append((self, a, kw))
InterpretedFunction.run = _stub
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import host_loop_us
per_call = lambda f: host_loop_us(f, n=3000, blocks=5, warmup=100)


for name in ("nixl_ep round", "allgather", "Qwen3-30B-A3B, 1 GPU"):
    dep = next(d for d in LAYER_DEPLOYMENTS if name in d["name"])
    c = deployment_config(dep)
    c = c.replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16,
                  **({"shared_intermediate_size": 64} if c.shared_intermediate_size else {}))
    layer = FusedMoE(c, experts="triton")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    layer(x)
    RECORD.append(launches := []); layer(x); RECORD.clear()

    def replay():
        bufs = [torch.empty(4, 8) for _ in range(10)]
        for fn, a, kw in launches: fn.run(*a, **kw)
        return bufs
    print(f"{dep['name']:<45} forward {per_call(lambda: layer(x)):6.1f} us; its {len(launches)} launches from a record "
          f"+ 10 allocations {per_call(replay):5.1f} us", flush=True)
