"""Which torch fills a CUDA-graph capture of the layer records (each one a launch in every replay), with the moe-lit
lines that made them.

    python nbs/bench/capture_fills.py [T ...]          # default T = 1

For each entry of `LAYER_DEPLOYMENTS`: the layer (random weights) runs `layer.capture(batch_sizes=(T,))` under a
TorchDispatchMode that prints every fill-like aten op (zeros, full, fill_, zero_, arange, ones) made while the stream
is capturing, with the last moe-lit frames of its Python stack.
"""
import sys, traceback, torch
from torch.utils._python_dispatch import TorchDispatchMode
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

class Fills(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if torch.cuda.is_current_stream_capturing() and any(k in name for k in ("zero", "full", "fill", "arange", "ones")):
            frames = [f for f in traceback.extract_stack() if "/moe_lit/" in f.filename][-4:]
            print(f"   {name}: " + " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames)))
        return func(*args, **(kwargs or {}))

tokens = [int(a) for a in sys.argv[1:]] or [1]
for dep in LAYER_DEPLOYMENTS:
    cfg = deployment_config(dep)
    torch.manual_seed(0)
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"])
    for T in tokens:
        print(f"== {dep['name']} T={T}", flush=True)
        with Fills(): layer.capture(batch_sizes=(T,))
    layer.graphs = {}
    del layer; torch.cuda.empty_cache()
