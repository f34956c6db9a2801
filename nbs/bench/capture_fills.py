"""Which constant fills the layer launches per decode forward (each one a launch in every replay), with the lines
that made them.

    python nbs/bench/capture_fills.py [T ...] [--test]   # default T = 1; --test: the layers of test_layer_cuda_graphs

For each entry of `LAYER_DEPLOYMENTS` and each T, three views of the same question:
1. `layer.capture(batch_sizes=(T,))` under `moe_lit.testing.record_fills()`: every zeros / full / fill_ / zero_ / ones /
   arange that Python asked for while the stream was captured, with the moe-lit lines that asked;
2. the fill kernels (`FillFunctor`, `fill`, `zero` in the CUDA kernel's name) of 20 replays of that graph, per replay,
   from the torch profiler: what the replay really launches, whichever op made it;
3. one eager forward with the launch plans off, under the profiler with Python stacks: each fill kernel with the
   aten op that launched it and that op's callers (moe-lit's own frames first). An op that fills inside its own
   CUDA implementation (a sort, a bincount) shows here and not in 1.
"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
import moe_lit.layer as layer_mod
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE
from moe_lit.testing import record_fills

FILL_WORDS = ("fill", "zero")
is_fill = lambda name: any(w in name.lower() for w in FILL_WORDS)

def callers(evt, n: int = 8) -> str:
    "The op's chain of callers, innermost first, moe-lit's frames and aten ops only (the profiler's Python stack)."
    out, e = [], evt.cpu_parent
    while e is not None and len(out) < n:
        if "moe_lit" in e.name or e.name.startswith("aten::"): out.append(e.name.split("moe_lit/")[-1])
        e = e.cpu_parent
    return " <- ".join(out) or "(no moe-lit frame)"

def test_layers():
    "The layers of `tests/test_layer.py::test_layer_cuda_graphs` (`--test`): 16 experts, shared, grouped sigmoid; EP2."
    from moe_lit.config import MoEConfig, ParallelConfig
    base = MoEConfig(num_experts=16, top_k=4, hidden_size=256, intermediate_size=128, dtype=torch.bfloat16,
                     routing_method="grouped_topk", num_expert_group=4, topk_group=2, scoring_func="sigmoid",
                     has_correction_bias=True, routed_scaling_factor=2.5, num_shared_experts=1, shared_intermediate_size=64)
    for backend, placement in (("none", "linear"), ("allgather_reducescatter", "linear"), ("nixl_ep", "round_robin"),
                               ("deepep_low_latency", "linear")):
        for quant in ("unquantized", "fp8_w8a8_block", "mxfp4_w4a16"):
            par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=backend)
            yield f"test config {backend} {quant}", FusedMoE(base.replace(parallel=par), seed=1, device="cuda", quant=quant,
                                                             placement=placement)

def deployment_layers():
    for dep in LAYER_DEPLOYMENTS:
        torch.manual_seed(0)
        yield dep["name"], FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"])

args = sys.argv[1:]
tokens = [int(a) for a in args if a != "--test"] or [1]
for name, layer in (test_layers() if "--test" in args else deployment_layers()):
    cfg = layer.config
    for T in tokens:
        with record_fills() as fills: layer.capture(batch_sizes=(T,))
        print(f"== {name} T={T}", flush=True)
        print(f"  1. capture: {len(fills)} fills asked for by Python")
        for name, frames in fills: print(f"     {name}: " + " <- ".join(frames))
        g = layer.graphs[T][0]
        g.replay(); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20): g.replay()
            torch.cuda.synchronize()
        kern = [e.name for e in prof.events() if e.device_type.name == "CUDA" and e.device_time_total > 0]
        fk = [k for k in kern if is_fill(k)]
        print(f"  2. replay: {len(kern) / 20:g} launches per replay, fill kernels per replay: {len(fk) / 20:g}")
        for k in sorted(set(fk)): print(f"     {fk.count(k) / 20:g} x {k[:110]}")
        graphs, layer.graphs = layer.graphs, {}
        layer_mod.LAUNCH_PLANS = False                       # the Python path: its stack names the lines
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=cfg.dtype)
        layer(x); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            layer(x); torch.cuda.synchronize()
        layer_mod.LAUNCH_PLANS, layer.graphs = True, graphs
        hits = [(k.name, e) for e in prof.events() for k in getattr(e, "kernels", []) if is_fill(k.name)]
        print(f"  3. eager forward (no plan): {len(hits)} fill kernels")
        for name, e in hits: print(f"     {name[:70]} by {e.name} <- {callers(e)}")
    layer.graphs = {}
    del layer; torch.cuda.empty_cache()
