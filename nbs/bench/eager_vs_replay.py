"""Eager vs CUDA-graph-replayed forward of the whole layer at small T, every `LAYER_DEPLOYMENTS` entry (GPU).

    python nbs/bench/eager_vs_replay.py [--quant SCHEME] [--tokens 1,2,8] [--ab launch|select|overlap|pdl|combine]

eager: a loop of 200 `layer(x)` calls, synchronised once at the end, µs per call (the host-bound rate a Python caller
sees); replay: the same forward captured with `layer.capture([T])`, a loop of 200 `graph.replay()`; host = eager −
replay. Random weights, bf16, fixed seeds; T = 1 unless `--tokens` lists others. `--ab` times eager with a switch off
and on, alternately, three times each in one process, keeps the best of each, and compares both modes' outputs bit
for bit:
  launch  - Triton's JIT launch path against `launch_kernel`'s direct launches (`moe_lit.kernels.batched.FAST_LAUNCH`)
  select  - the router's selection in its own launch against the logits launch's last program
            (`moe_lit.kernels.router.ROUTER_SELECT_MAX_TOKENS` 0 against its default)
  overlap - the shared experts in line against a side stream (`ModularKernel.overlap_shared`; layers without shared
            experts are skipped)
  pdl     - programmatic dependent launch off and on (`moe_lit.kernels.batched.PDL`, as `MOE_LIT_PDL=1`): the
            replay is captured and timed in each mode too, since a graph is where the launches' gaps remain
  combine - the Standard experts' slot sum in its own launch against GEMM2's last pair of a token
            (`TritonExperts.combine_in_gemm2` "never" against "always", `08_kernels.contiguous`); replays too, as pdl.
            The two sum the same bf16 rows in the same order, so "same bits" is expected but not promised
"""
import sys, time, torch
import moe_lit.kernels.batched as kb
import moe_lit.kernels.router as kr
from moe_lit.kernels.contiguous import TritonExperts
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

quant = sys.argv[sys.argv.index("--quant") + 1] if "--quant" in sys.argv else "unquantized"
ab = sys.argv[sys.argv.index("--ab") + 1] if "--ab" in sys.argv else None
tokens = [int(t) for t in sys.argv[sys.argv.index("--tokens") + 1].split(",")] if "--tokens" in sys.argv else [1]
assert ab in (None, "launch", "select", "overlap", "pdl", "combine"), \
    f"--ab: expected launch, select, overlap, pdl or combine, got {ab}"


def loop_us(f, n=200):
    for _ in range(10): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def switch(layer, on: bool):
    "Set the A/B switch (`on`: the layer's default for launch and select, the side stream for overlap, PDL on)."
    if ab == "launch": kb.FAST_LAUNCH = on
    elif ab == "select": kr.ROUTER_SELECT_MAX_TOKENS = select_default if on else 0
    elif ab == "overlap":
        for mk in layer._kernels.values(): mk.overlap_shared = on
    elif ab == "pdl": kb.PDL = on
    elif ab == "combine": TritonExperts.combine_in_gemm2 = "always" if on else "never"   # in the plans' key (12_layer)


def replay_us(layer, x):
    "µs per replay of `x`'s forward, captured now (in the switch's current mode)."
    g, gx, gy = layer.capture([len(x)]).graphs[len(x)]
    gx.copy_(x)
    us = loop_us(g.replay)
    layer.graphs = {}
    return us


launch_default, select_default, pdl_default = kb.FAST_LAUNCH, kr.ROUTER_SELECT_MAX_TOKENS, kb.PDL
for dep in LAYER_DEPLOYMENTS:
    layer = FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"], quant=quant)
    if ab == "overlap" and layer.shared_experts is None: continue
    for T in tokens:
        x = torch.randn(T, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype)
        layer(x)                                                     # builds the ModularKernel the switch reaches
        modes = (False, True) if ab else (True,)
        best, outs, replays = {}, {}, {}
        for _ in range(3 if ab else 1):
            for on in modes:
                switch(layer, on)
                outs[on] = layer(x)
                best[on] = min(best.get(on, float("inf")), loop_us(lambda: layer(x)))
                if ab in ("pdl", "combine"): replays[on] = min(replays.get(on, float("inf")), replay_us(layer, x))
        switch(layer, True)
        replay = replays[True] if ab in ("pdl", "combine") else replay_us(layer, x)
        if ab:
            off, on = best[False], best[True]
            extra = f"  replay off {replays[False]:6.1f} us" if ab in ("pdl", "combine") else ""
            print(f"{dep['name']:<45} {quant:<12} T={T} {ab}: eager off {off:7.1f} us  on {on:7.1f} us{extra}  replay "
                  f"{replay:6.1f} us  host off {off - replay:6.1f}  on {on - replay:6.1f}  same bits "
                  f"{torch.equal(outs[False], outs[True])}", flush=True)
        else:
            eager = best[True]
            print(f"{dep['name']:<45} {quant:<12} T={T} eager {eager:7.1f} us  replay {replay:6.1f} us  host "
                  f"{eager - replay:7.1f} us", flush=True)
    del layer; torch.cuda.empty_cache()
kb.FAST_LAUNCH, kr.ROUTER_SELECT_MAX_TOKENS, kb.PDL = launch_default, select_default, pdl_default
TritonExperts.combine_in_gemm2 = "auto"
