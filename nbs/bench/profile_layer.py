"Where one eager forward of the layer spends its host time: cProfile of repeated forwards (GPU)."
import cProfile, pstats, sys, time
import torch
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

dep = LAYER_DEPLOYMENTS[int(sys.argv[1]) if len(sys.argv) > 1 else 0]
T = int(sys.argv[2]) if len(sys.argv) > 2 else 1
layer = FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"])
x = torch.randn(T, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype)
for _ in range(3): layer(x)
torch.cuda.synchronize()
t0 = time.perf_counter()
for _ in range(100): layer(x)
torch.cuda.synchronize()
print(f"{dep['name']} T={T}: {(time.perf_counter() - t0) * 1e4:.1f} us per eager forward (host loop of 100)")
pr = cProfile.Profile(); pr.enable()
for _ in range(100): layer(x)
pr.disable(); torch.cuda.synchronize()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
pstats.Stats(pr).sort_stats("cumulative").print_stats("moe_lit", 30)   # where the layer's own time goes

from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(20): layer(x)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))

# shared experts beside the routed ones (side stream) or after them, replayed: the A/B behind `overlap_shared`
if layer.shared_experts is not None:
    import triton.testing
    for T2 in (1, 64):
        x2 = torch.randn(T2, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype)
        res = {}
        for overlap in (True, False):
            for mk in layer._kernels.values(): mk.overlap_shared = overlap
            layer.capture([T2]); g, sx, _ = layer.graphs[T2]; sx.copy_(x2)
            res[overlap] = triton.testing.do_bench(g.replay, return_mode="median") * 1e3
        print(f"T={T2}: replay with shared experts on a side stream {res[True]:.1f} us, in line {res[False]:.1f} us")
