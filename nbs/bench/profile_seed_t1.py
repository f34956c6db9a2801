"""Kernel times of the seed scenario's rank 0 at T = 1, bf16 against NVFP4 / MXFP4 experts (torch profiler, CUDA-graph replays).

    python nbs/bench/profile_seed_t1.py
DeepSeek-V3 EP8 rank 0, nixl_ep (batched format), round-robin placement, as `seed_scenario.py`; the layer is
captured for T = 1 and replayed 50 times under the profiler; the table is per replay, µs, by kernel. The token is
drawn until it reaches exactly one of rank 0's experts (the common case at T = 1 that reaches the rank at all).
"""
import torch
from torch.profiler import profile, ProfilerActivity
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

dep = next(d for d in LAYER_DEPLOYMENTS if d["name"] == "DeepSeek-V3 EP8 rank 0, nixl_ep round robin")
cfg = deployment_config(dep)
for quant in ("unquantized", "nvfp4_w4a16", "mxfp4_w4a16"):
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"], quant=quant)
    g = torch.Generator(device="cuda").manual_seed(0)
    while True:
        x = torch.randn(1, cfg.hidden_size, device="cuda", dtype=cfg.dtype, generator=g)
        if int((layer.placement.local_slot(layer.route(x)[1]) >= 0).sum()) == 1: break
    layer.capture(batch_sizes=(1,))
    for _ in range(10): layer(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(50): layer(x)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 50) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    print(f"== {quant}: {sum(t for _, t in rows):.1f} us of kernels per replay")
    for k, t in rows[:12]: print(f"   {t:8.1f}  {k[:90]}")
    del layer; torch.cuda.empty_cache()
