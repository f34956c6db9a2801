"""Kernel times of every layer-benchmark deployment at small T (torch profiler over CUDA-graph replays), bf16.

    python nbs/bench/profile_small_t.py [T ...] [--select-max N]    # default T = 1 2

`--select-max N` sets `ROUTER_SELECT_MAX_TOKENS` (0: the selection always takes its own launch; 03a).

For each entry of `LAYER_DEPLOYMENTS` and each T: the layer (random weights, the benchmark's seed) is captured for
that T, its replay timed (`triton.testing.do_bench`, median), then replayed 50 times under the profiler. The table
is per replay, µs, by kernel, in the order of first launch: the chain a small-T forward waits on.
"""
import sys, torch, triton.testing
from torch.profiler import profile, ProfilerActivity
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

import moe_lit.kernels.router as router
args = sys.argv[1:]
if "--select-max" in args:
    i = args.index("--select-max"); router.ROUTER_SELECT_MAX_TOKENS = int(args[i + 1]); del args[i:i + 2]
print(f"ROUTER_SELECT_MAX_TOKENS = {router.ROUTER_SELECT_MAX_TOKENS}")
tokens = [int(a) for a in args] or [1, 2]
for dep in LAYER_DEPLOYMENTS:
    cfg = deployment_config(dep)
    torch.manual_seed(0)
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"])
    for T in tokens:
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=cfg.dtype, generator=torch.Generator("cuda").manual_seed(T))
        layer.capture(batch_sizes=(T,))
        g = layer.graphs[T][0]
        layer(x); torch.cuda.synchronize()
        replay = triton.testing.do_bench(g.replay, return_mode="median") * 1e3
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(50): g.replay()
            torch.cuda.synchronize()
        order, tot, cnt = [], {}, {}
        for e in prof.events():
            if e.device_type.name != "CUDA" or e.device_time_total <= 0: continue
            if e.name not in tot: order.append(e.name)
            tot[e.name] = tot.get(e.name, 0.0) + e.device_time_total / 50
            cnt[e.name] = cnt.get(e.name, 0) + 1
        print(f"== {dep['name']} T={T}: replay {replay:.1f} us, {sum(tot.values()):.1f} us of kernels, "
              f"{sum(cnt.values()) // 50} launches per replay", flush=True)
        for k in order: print(f"   {tot[k]:7.1f}  x{cnt[k] // 50}  {k[:100]}")
    layer.graphs = {}
    del layer; torch.cuda.empty_cache()
