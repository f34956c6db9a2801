"""Which constant fills a CUDA-graph capture of the layer records (each one a launch in every replay), with the
moe-lit lines that made them (`moe_lit.testing.record_fills`).

    python nbs/bench/capture_fills.py [T ...]          # default T = 1

For each entry of `LAYER_DEPLOYMENTS`: the layer (random weights) runs `layer.capture(batch_sizes=(T,))` under
`record_fills()`, which lists every zeros / full / fill_ / zero_ / ones / arange made while the stream is captured.
"""
import sys, torch
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE
from moe_lit.testing import record_fills

tokens = [int(a) for a in sys.argv[1:]] or [1]
for dep in LAYER_DEPLOYMENTS:
    cfg = deployment_config(dep)
    torch.manual_seed(0)
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"])
    for T in tokens:
        with record_fills() as fills: layer.capture(batch_sizes=(T,))
        print(f"== {dep['name']} T={T}: {len(fills)} fills recorded", flush=True)
        for name, frames in fills: print(f"   {name}: " + " <- ".join(frames))
    layer.graphs = {}
    del layer; torch.cuda.empty_cache()
