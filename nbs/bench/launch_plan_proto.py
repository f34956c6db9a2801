"""A launch plan for the layer's eager forward, prototyped on the CPU: record one forward's torch ops and Triton
launches once per shape, replay them with a new input, and check the replay against the eager forward bit for bit.

    TRITON_INTERPRET=1 python nbs/bench/launch_plan_proto.py

Not part of the package: an experiment for `12_layer`'s open work (the Python between the launches is about 80 % of
the layer's own host time, `host_plan_bound.py`). Recording uses torch's `TorchDispatchMode` (every aten op, factory
functions included) and a wrapper around the interpreter's kernel call (the kernels' own torch calls inside it are
not recorded). A value is the forward's input, the output of a recorded op, or a tensor that existed before the
forward (the layer's weights, tables, kept counters: held by reference, as eager would use them). Replay runs the
ops in order on the new input. For each deployment of the layer benchmark (shrunk as in `host_overhead_cpu.py`):
the replay of three fresh inputs must equal the eager forward bit for bit; then, with the kernels stubbed, the eager
forward's host time against the replay's (`host_loop_us`). What the prototype does not carry, and a real plan must:
Python-side state the forward changes (it has none that changes results here), side streams and PDL flags (CUDA
only), and the keys that invalidate a plan (weights edited, switches such as `FP8_ACT_QUANT`, the tile-table root).
"""
import sys, torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from triton.runtime.interpreter import InterpretedFunction
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import host_loop_us

_RUN = InterpretedFunction.run
STUB = [False]                          # True: the kernels do not run (host timing)
REC = []                                # the recorder while one records


class V:
    "A reference to the i-th value of a forward (0: its input)."
    __slots__ = ("i",)
    def __init__(self, i): self.i = i


class Recorder(TorchDispatchMode):
    "Notes every aten op as (op, args, kwargs) with tensors replaced by value references; values by tensor identity."
    def __init__(self, x):
        super().__init__()
        self.steps, self.ids = [], {id(x): 0}      # value 0 is the input
        self.n, self.keep = 1, [x]                 # (tensors kept alive so that their ids stay theirs)

    def ref(self, t):        # a value of this forward, or a tensor from before it (held as it is: a constant)
        return V(self.ids[id(t)]) if isinstance(t, torch.Tensor) and id(t) in self.ids else t

    def define(self, t):
        if isinstance(t, torch.Tensor): self.ids[id(t)] = self.n; self.n += 1; self.keep.append(t); return V(self.n - 1)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError("the forward read a value on the host: not plannable")
        a, k = tree_map(self.ref, args), tree_map(self.ref, kwargs)
        self.steps.append(("op", func, a, k, tree_map(self.define, out)))
        return out


def _run(self, *args, grid, warmup, **kwargs):
    "The interpreter's kernel call: recorded as one step (its own torch calls are not), stubbed when timing."
    if REC:
        rec = REC[0]
        a, k = tree_map(rec.ref, args), tree_map(rec.ref, kwargs)
        rec.steps.append(("launch", self, a, dict(k, grid=grid, warmup=warmup), None))
        with torch.utils._python_dispatch._disable_current_modes():
            return None if STUB[0] else _RUN(self, *args, grid=grid, warmup=warmup, **kwargs)
    return None if STUB[0] else _RUN(self, *args, grid=grid, warmup=warmup, **kwargs)
InterpretedFunction.run = _run


def record(layer, x):
    "`(plan, out_ref)`: one forward of `layer` on `x`, recorded."
    rec = Recorder(x)
    REC.append(rec)
    try:
        with rec: y = layer(x)
    finally: REC.clear()
    return rec.steps, rec.ref(y)


aten = torch.ops.aten
PURE = {aten.empty.memory_format, aten.detach.default, aten.view.default, aten.unsqueeze.default,
        aten.slice.Tensor, aten.select.int, aten.t.default, aten.expand.default}   # no effect but their output

def _empty(size, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    return torch.empty(size, dtype=dtype, device=device)
FAST = {aten.empty.memory_format: _empty, aten.detach.default: torch.Tensor.detach,    # the Python-level call: an
        aten.view.default: torch.Tensor.view, aten.unsqueeze.default: torch.Tensor.unsqueeze}  # OpOverload's costs 4-9 µs


def compile_plan(plan, out_ref):
    """Each step as (call, args list, kwargs dict, [(i, value)] to fill in args, [(key, value)] in kwargs, outputs):
    the references found once, so that a replay only indexes (a nested reference, e.g. in a list argument, is refused).
    Pure ops whose outputs nothing later reads are dropped."""
    used = {out_ref.i} if isinstance(out_ref, V) else set()
    keep = []
    for kind, fn, a, k, out in reversed(plan):
        outs = [r.i for r in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(r, V)]
        if kind == "op" and fn in PURE and not used.intersection(outs): keep.append(False); continue
        keep.append(True)
        used.update(v.i for v in list(a) + list(k.values()) if isinstance(v, V))
    renum, n = {0: 0}, 1                                   # values renumbered over the kept steps
    for (kind, fn, a, k, out), kept in zip(plan, reversed(keep)):
        for r in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(r, V) and kept: renum[r.i] = n; n += 1
    plan = [(kind, fn, [V(renum[v.i]) if isinstance(v, V) else v for v in a],
             {key: V(renum[v.i]) if isinstance(v, V) else v for key, v in k.items()},
             [V(renum[r.i]) if isinstance(r, V) else r for r in (out if isinstance(out, (tuple, list)) else (out,))])
            for (kind, fn, a, k, out), kept in zip(plan, reversed(keep)) if kept]
    steps = []
    for kind, fn, a, k, out in plan:
        for v in list(a) + list(k.values()):
            if isinstance(v, (list, tuple)) and any(isinstance(e, V) for e in v):
                raise RuntimeError(f"{fn}: a value inside a list argument: not handled by this prototype")
        fill_a = [(i, v.i) for i, v in enumerate(a) if isinstance(v, V)]
        fill_k = [(key, v.i) for key, v in k.items() if isinstance(v, V)]
        call = fn.run if kind == "launch" else FAST.get(fn, fn)
        outs = None if kind == "launch" else [r.i if isinstance(r, V) else None for r in out]
        steps.append((call, list(a), dict(k), fill_a, fill_k, outs))
    return steps, (V(renum[out_ref.i]) if isinstance(out_ref, V) else out_ref)


def replay(steps, out_ref, x):
    "The forward's output for a new input `x` of the recorded shape."
    vals = [x]
    for call, a, k, fill_a, fill_k, outs in steps:
        if fill_a:
            a = a.copy()
            for i, v in fill_a: a[i] = vals[v]
        if fill_k:
            k = k.copy()
            for key, v in fill_k: k[key] = vals[v]
        res = call(*a, **k)
        if outs is not None:
            for o, i in zip(res if isinstance(res, (tuple, list)) else (res,), outs):
                if i is not None: vals.append(o)
    return vals[out_ref.i] if isinstance(out_ref, V) else out_ref


only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
for dep in [d for d in LAYER_DEPLOYMENTS if only in d["name"]]:
    c = deployment_config(dep)
    c = c.replace(hidden_size=256, intermediate_size=64, dtype=torch.bfloat16,
                  **({"shared_intermediate_size": 64} if c.shared_intermediate_size else {}))
    layer = FusedMoE(c, experts="triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, generator=g).to(torch.bfloat16)
    layer(x)                                            # a first call: what it builds once is built
    plan, out_ref = record(layer, x)
    steps, out_ref = compile_plan(plan, out_ref)
    same = all(torch.equal(replay(steps, out_ref, z), layer(z))
               for z in (torch.randn(1, 256, generator=g).to(torch.bfloat16) for _ in range(3)))
    STUB[0] = True
    eager = host_loop_us(lambda: layer(x), n=400, blocks=5, warmup=20)
    planned = host_loop_us(lambda: replay(steps, out_ref, x), n=400, blocks=5, warmup=20)
    STUB[0] = False
    ops = sum(s[0] == "op" for s in plan)
    print(f"{dep['name']:<45} {len(plan) - ops} launches + {ops} torch ops ({len(steps) - len(plan) + ops} kept); "
          f"replay equals eager bit for bit: {same}; "
          f"host per forward: eager {eager:6.1f} us, replayed plan {planned:5.1f} us", flush=True)
