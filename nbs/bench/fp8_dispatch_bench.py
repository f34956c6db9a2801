"""FP8 before dispatch, measured on the whole layer. The nixl_ep deployments of the layer benchmark (`14a_bench_layer`)
with FP8 block weights quantized at load, eager and CUDA-graph replayed (median of `triton.testing.do_bench`, µs),
with the rows quantized before dispatch (what the backend record asks, `10_modular.dispatch_quantization`) and after
(`dispatch_quant = None`: GEMM1's batched quantizer over the slabs, the path before), the same layer and inputs.
The two outputs must be equal bit for bit (recorded). Floor: the FP8 codes and scales of the local experts the batch
touches, the shared experts, the router's gate, the tokens in and out, at the card's copy bandwidth of the same run.

    python nbs/bench/fp8_dispatch_bench.py OUT.json
"""
import json, sys, torch, triton.testing
from moe_lit.layer import FusedMoE
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.bench import measure_device, source_commit

bench = lambda f: triton.testing.do_bench(f, return_mode="median") * 1e3
nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts if t is not None)
TOKENS = (1, 2, 8, 64, 256)
dev = measure_device()
rows = []
for dep in [d for d in LAYER_DEPLOYMENTS if d["backend"] == "nixl_ep"]:
    layer = FusedMoE(deployment_config(dep), seed=0, device="cuda", placement=dep["placement"], quant="fp8")
    chosen = layer.dispatch_quant
    print(dep["name"], "|", layer.dispatch_quant_reason, flush=True)
    q = layer.qweights
    per_expert = nbytes(*(getattr(q, n)[0] for n in ("w13", "w13_scale", "w2", "w2_scale")))
    shared = 0 if layer.shared_experts is None else nbytes(*layer.shared_experts.parameters())
    router = nbytes(layer.router_gate, layer.gate_bias, layer.e_score_correction_bias)
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = {T: torch.randn(T, layer.config.hidden_size, device="cuda", dtype=layer.config.dtype, generator=g) for T in TOKENS}
    res = {T: dict(deployment=dep["name"], num_tokens=T) for T in TOKENS}
    for T, x in xs.items():
        local = layer.placement.local_slot(layer.route(x)[1])
        touched = int(local[local >= 0].unique().numel())
        res[T].update(touched_experts=touched, floor_us=(touched * per_expert + shared + router + 2 * nbytes(x)) / dev["copy_Bps"] * 1e6)
    outs = {}
    for mode, block in (("before", chosen), ("after", None)):
        layer.dispatch_quant, layer._kernels, layer.graphs, layer._plans, layer._seen = block, {}, {}, {}, set()
        outs[mode] = {T: layer(x) for T, x in xs.items()}
        for T, x in xs.items(): res[T][f"{mode}_eager_us"] = bench(lambda: layer(x))
        layer.capture(TOKENS)
        for T, x in xs.items():
            graph, static_x, _ = layer.graphs[T]
            static_x.copy_(x)
            res[T][f"{mode}_replay_us"] = bench(graph.replay)
        layer.graphs = {}
    for T in TOKENS:
        r = res[T]
        r["bit_equal"] = bool(torch.equal(outs["before"][T], outs["after"][T]))
        r["replay_gain"] = r["after_replay_us"] / r["before_replay_us"]
        print(f"{dep['name']:<45} T={T:>3} floor {r['floor_us']:7.1f} | before: eager {r['before_eager_us']:7.1f} "
              f"replay {r['before_replay_us']:7.1f} ({100 * r['floor_us'] / r['before_replay_us']:4.0f} %) | after: eager "
              f"{r['after_eager_us']:7.1f} replay {r['after_replay_us']:7.1f} ({100 * r['floor_us'] / r['after_replay_us']:4.0f} %) "
              f"| bit-equal {r['bit_equal']}", flush=True)
        rows.append(r)
    layer = None; torch.cuda.empty_cache()
    json.dump(dict(device=dev, commit=source_commit(), rows=rows), open(sys.argv[1], "w"), indent=1)
