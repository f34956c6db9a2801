"""Eager forward at T = 1 with Triton's JIT launch path against `launch_kernel`'s direct launches, same process (GPU).

    python nbs/bench/launch_ab.py [--quant SCHEME]

Every `LAYER_DEPLOYMENTS` entry is built once; its eager forward is timed as a loop of 300 `layer(x)` calls
synchronised at the end (µs per call, the host-bound rate a Python caller sees), alternately with
`moe_lit.kernels.batched.FAST_LAUNCH` off (the JIT) and on (direct launches), three times each, the best kept; then the
same forward captured (`layer.capture([1])`) and replayed: host = eager − replay. Both modes must give the same bits.
"""
import sys, time, torch
import moe_lit.kernels.batched as kb
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

quant = sys.argv[sys.argv.index("--quant") + 1] if "--quant" in sys.argv else "unquantized"


def loop_us(f, n=300):
    for _ in range(20): f()
    torch.cuda.synchronize(); t0 = time.perf_counter()
    for _ in range(n): f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


on = kb.FAST_LAUNCH
print(f"triton launcher convention checked: FAST_LAUNCH default {on}", flush=True)
for dep in LAYER_DEPLOYMENTS:
    layer = FusedMoE(deployment_config(dep), device="cuda", placement=dep["placement"], quant=quant)
    x = torch.randn(1, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype)
    best = {False: float("inf"), True: float("inf")}
    outs = {}
    for _ in range(3):
        for fast in (False, True):
            kb.FAST_LAUNCH = fast
            outs[fast] = layer(x)
            best[fast] = min(best[fast], loop_us(lambda: layer(x)))
    kb.FAST_LAUNCH = on
    same = torch.equal(outs[False], outs[True])
    g, gx, gy = layer.capture([1]).graphs[1]
    gx.copy_(x); replay = loop_us(g.replay)
    jit, direct = best[False], best[True]
    print(f"{dep['name']:<45} {quant:<12} T=1 eager jit {jit:7.1f} us  direct {direct:7.1f} us  replay {replay:6.1f} us  "
          f"host jit {jit - replay:6.1f}  direct {direct - replay:6.1f}  same bits {same}", flush=True)
    del layer; torch.cuda.empty_cache()
