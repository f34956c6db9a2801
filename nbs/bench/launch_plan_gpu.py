"""Launch plans on the GPU: the eager forward of every layer-benchmark deployment (bf16, `14a_bench_layer`) at T = 1
and 8 (or the T given) with plans off (`LAUNCH_PLANS = False`: moe-lit's Python runs every call) and on (replayed steps), alternating
three rounds, the fastest median of `triton.testing.do_bench` each (µs; host noise only adds), beside the
CUDA-graph replay of the same forward (GPU time only). host = eager - replay. The planned outputs are checked equal
to the unplanned ones bit for bit on fresh inputs.

    python nbs/bench/launch_plan_gpu.py OUT.json [T ...]      # default T = 1 8
"""
import json, sys, torch, triton.testing
import moe_lit.layer as L
from moe_lit.layer import FusedMoE, LaunchPlan
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import source_commit

bench = lambda f: triton.testing.do_bench(f, return_mode="median") * 1e3
TOKENS = [int(t) for t in sys.argv[2:]] or [1, 8]
rows = []
for dep in LAYER_DEPLOYMENTS:
    layer = FusedMoE(deployment_config(dep), seed=0, device="cuda", placement=dep["placement"])
    g = torch.Generator(device="cuda").manual_seed(0)
    H = layer.config.hidden_size
    for T in TOKENS:
        xs = [torch.randn(T, H, device="cuda", dtype=layer.config.dtype, generator=g) for _ in range(4)]
        got = [layer(x) for x in xs]
        L.LAUNCH_PLANS = False
        want = [layer(x) for x in xs]
        L.LAUNCH_PLANS = True
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        planned = sum(isinstance(p, LaunchPlan) for p in layer._plans.values())
        refused = [p for p in layer._plans.values() if isinstance(p, str)]      # a key that stays eager, and why
        t = {False: [], True: []}
        for _ in range(3):
            for on in (False, True):
                L.LAUNCH_PLANS = on
                t[on].append(bench(lambda: layer(xs[0])))
        L.LAUNCH_PLANS = True
        layer.capture([T])
        graph, static_x, _ = layer.graphs[T]
        static_x.copy_(xs[0])
        replay = bench(graph.replay)
        layer.graphs = {}
        r = dict(deployment=dep["name"], num_tokens=T, eager_unplanned_us=min(t[False]), eager_planned_us=min(t[True]),
                 replay_us=replay, bit_equal=same, plans=planned, refused=refused)
        r["host_unplanned_us"], r["host_planned_us"] = r["eager_unplanned_us"] - replay, r["eager_planned_us"] - replay
        rows.append(r)
        print(f"{dep['name']:<45} T={T} eager unplanned {r['eager_unplanned_us']:6.1f} planned {r['eager_planned_us']:6.1f} "
              f"replay {replay:6.1f} | host {r['host_unplanned_us']:6.1f} -> {r['host_planned_us']:6.1f} us | "
              f"bit-equal {same}, plans {planned}" + (f", refused: {refused}" if refused else ""), flush=True)
    layer = None; torch.cuda.empty_cache()
    json.dump(dict(commit=source_commit(), device=torch.cuda.get_device_name(), rows=rows), open(sys.argv[1], "w"), indent=1)
