"""moe-lit's own host (Python) work per eager forward, measured without a GPU.

    TRITON_INTERPRET=1 python nbs/bench/host_overhead_cpu.py [--profile] [--ops] [--quant SCHEME] [--only NAME]

For every deployment of the layer benchmark (`LAYER_DEPLOYMENTS`; the names say "1 GPU" as there, but nothing runs
on one here) a layer at T = 1, shrunk to hidden 256 / intermediate 64: the Python path (checks, routing plan,
dispatch, launch arguments) does not depend on the sizes. Triton's launches are stubbed out (the kernels never run,
their outputs stay uninitialised); torch's own ops run for real on the CPU, where on a GPU they would only be
launched. The figure is the fastest of 7 loops of 400 forwards, in µs per forward: a lower bound on what this
CPU spends in moe-lit's Python before any launch cost. Noise only adds, so run it on an idle machine.

It is one part of the GPU benchmark's host overhead (`bench_layer`'s `host_us` = eager − replay, 14a_bench_layer):
that one adds Triton's launch path (about 20 µs a kernel through the JIT, `nbs/bench/launch_cost.py`) and the CUDA
launches of torch's ops, on the GPU machine's CPU. `--quant` takes a full scheme name (mxfp4_w4a16, nvfp4_w4a16,
fp8_w8a8_block, ...); `--profile` adds cProfile's top 12 functions by own time over 500 forwards; `--keys` adds what
the GPU's direct launch path spends in Python on top (`launch_key` of every launch of one forward, timed here: the
interpreter never takes that path); `--ops` adds what one
forward asks of the device: its Triton launches and its top-level torch ops by name (torch's profiler on the CPU; the
interpreter never splits K, so split-K's buffers do not show). `--only NAME` measures the deployments whose name
contains NAME: two revisions compare best in alternating processes (`PYTHONPATH=<a worktree>`), since the figure
moves by several µs from one process to the next.
"""
import sys, torch, cProfile, pstats
from triton.runtime.interpreter import InterpretedFunction
RECORD = []                                                    # a list to note launches in, while `--ops` counts
KEYS = []                                                      # a list for (args, kwargs) of each launch, for `--keys`
def _stub(self, *a, **kw):                                     # stub: moe-lit's own work only, no kernel runs
    if RECORD: RECORD[0].append(self.fn.__name__)
    if KEYS: KEYS[0].append((a, {k: v for k, v in kw.items() if k not in ("grid", "warmup")}))
InterpretedFunction.run = _stub
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import host_loop_us


def per_forward(layer, x, n=400, blocks=7):
    "The fastest of `blocks` loops of `n` forwards, per forward in µs (the minimum: this machine's noise only adds)."
    return host_loop_us(lambda: layer(x), n=n, blocks=blocks, warmup=20)


quant = sys.argv[sys.argv.index("--quant") + 1] if "--quant" in sys.argv else "unquantized"
only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
for dep in [d for d in LAYER_DEPLOYMENTS if only in d["name"]]:
    c = deployment_config(dep)
    c = c.replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16,
                  **({"shared_intermediate_size": 64} if c.shared_intermediate_size else {}))
    layer = FusedMoE(c, experts="triton", quant=quant)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    print(f"{dep['name']:<45} {c.activation_format.value:<16} {quant:<12} host per forward {per_forward(layer, x):6.1f} us",
          flush=True)
    if "--ops" in sys.argv:
        from torch.profiler import profile, ProfilerActivity
        RECORD.append(launches := [])
        with profile(activities=[ProfilerActivity.CPU]) as prof: layer(x)
        RECORD.clear()
        ops = {}
        for e in prof.events():                     # top-level aten ops: the ones moe-lit's Python called
            if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
                ops[e.name[6:]] = ops.get(e.name[6:], 0) + 1
        print(f"    {len(launches)} Triton launches ({', '.join(launches)}); {sum(ops.values())} torch ops {ops}", flush=True)
    if "--keys" in sys.argv:
        from moe_lit.kernels.batched import launch_key
        KEYS.append(seen := [])
        layer(x)
        KEYS.clear()
        keys_us = per_forward(lambda _: [launch_key(a, kw) for a, kw in seen], None)
        print(f"    direct-launch keys: {keys_us:5.1f} us a forward ({len(seen)} launches, {keys_us / max(1, len(seen)):.1f} "
              f"us each)", flush=True)
    if "--profile" in sys.argv:
        pr = cProfile.Profile(); pr.enable()
        for _ in range(500): layer(x)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(12)
