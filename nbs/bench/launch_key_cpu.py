"""Host cost of a launch's binding on this CPU: Triton's JIT (binder + cache key) against `launch_kernel`'s key and argument list.

    TRITON_INTERPRET=1 python nbs/bench/launch_key_cpu.py

For each Triton launch of one decode forward (T = 1) of the layer benchmark's Qwen3-30B-A3B and DeepSeek-V3 nixl_ep
deployments (shrunk to hidden 256: the arguments' count and kinds do not depend on the sizes), it times, per launch
in µs (best of 5 loops of 20000):
- `jit`: what Triton 3.6's `JITFunction.run` does before the launcher on every call: the argument binder with
  specialisation (built for a Hopper target, no GPU needed) and `compute_cache_key`;
- `launch`: what `moe_lit.kernels.batched.launch_kernel` does instead once the key is known: `launch_key`, the dict lookup and
  the parameter list for the compiled kernel's launcher.
Neither includes the launcher call itself (6.5 µs for a 25-argument kernel on the H200 host, `launch_cost_h200.log`)
nor the JIT's other per-call work (launch metadata and hook chains, driver lookups), which `launch_kernel` also skips.
"""
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature, compute_cache_key
from moe_lit.kernels.batched import launch_key, _launch_tail
from moe_lit.testing import record_launches
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config


from moe_lit.bench import host_loop_us
per_call = lambda f, n=20000: host_loop_us(f, n=n, blocks=5, warmup=200)


backend = make_backend(GPUTarget("cuda", 90, 32))
for dep in (d for d in LAYER_DEPLOYMENTS if d["name"].startswith(("Qwen3-30B-A3B, 1 GPU", "DeepSeek-V3 EP8 rank 0, nixl"))):
    c = deployment_config(dep)
    c = c.replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16,
                  **({"shared_intermediate_size": 64} if c.shared_intermediate_size else {}))
    layer = FusedMoE(c, experts="triton")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    layer(x)
    with record_launches() as seen: layer(x)
    print(dep["name"])
    tj = tl_ = 0
    for kernel, args, kwargs in seen:
        jf = JITFunction(kernel.fn)
        binder = create_function_from_signature(jf.signature, jf.params, backend)
        kw = dict(kwargs, debug=False, instrumentation_mode="")
        cache = {}
        def jit_call():
            bound, spec, options = binder(*args, **kw)
            return compute_cache_key(cache, spec, options)
        jit = per_call(jit_call)
        keys = {launch_key(args, kwargs): 1}
        defaults, get, n = _launch_tail(kernel, len(args), kwargs)
        ours = per_call(lambda: (keys.get(launch_key(args, kwargs)), get({**defaults, **kwargs})))
        tj, tl_ = tj + jit, tl_ + ours
        print(f"  {kernel.fn.__name__:28s} {len(args) + len(kwargs):3d} args   jit {jit:5.2f} us   launch {ours:5.2f} us")
    print(f"  {'per forward':28s} {len(seen):3d} launches jit {tj:5.1f} us   launch {tl_:5.1f} us")
