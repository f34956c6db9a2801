"""The seed scenario's rank 0 on one GPU: DeepSeek-V3 EP8, nixl_ep (batched format), round-robin placement, the
whole layer (routing, dispatch, experts, combine, shared experts) in bf16 and with NVFP4 / MXFP4 experts.

    python nbs/bench/seed_scenario.py [out.json]
Times are medians of CUDA-graph replays (`layer.capture`) and of eager forwards, µs; the output of each quantized
layer is compared with its own float64 reference on the dequantized weights. The tokens are seeded (by T), so every
layer and every run routes the same batch: at T = 1 which local experts the token reaches decides the time. (The runs committed up
to seed_scenario_h200_11d154c.json drew them afresh: their T = 1 rows moved by ±20 µs with the routing.)
"""
import json, sys, time
import torch, triton.testing
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE
from moe_lit.testing import check_output
from moe_lit.formats import moe_reference_standard

dep = next(d for d in LAYER_DEPLOYMENTS if d["name"] == "DeepSeek-V3 EP8 rank 0, nixl_ep round robin")
cfg = deployment_config(dep)
rows = []
for quant in ("unquantized", "nvfp4_w4a16", "mxfp4_w4a16"):
    t0 = time.perf_counter()
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"], quant=quant)
    build_s = time.perf_counter() - t0
    for T in (1, 64, 256):
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=cfg.dtype,    # the same tokens in every run and
                        generator=torch.Generator(device="cuda").manual_seed(T))   # layer: T = 1 compares like with like
        y = layer(x)
        wts, ids = layer.route(x)
        local = layer.placement.local_slot(ids)
        ref = moe_reference_standard(x.double(), layer.w13[:, :, :cfg.hidden_size], layer.w2[:, :cfg.hidden_size], wts,
                                     local, activation=layer.activation) + layer.shared_experts(x.double())
        chk = check_output(y, ref, cfg.dtype, quant, "triton")
        eager = triton.testing.do_bench(lambda: layer(x), return_mode="median") * 1e3
        layer.capture(batch_sizes=(T,))
        replay = triton.testing.do_bench(lambda: layer(x), return_mode="median") * 1e3
        layer.graphs = {}
        r = dict(quant=quant, num_tokens=T, eager_us=eager, replay_us=replay, build_s=build_s, max_rel_err=chk["max_rel_err"], cosine=chk["cosine"], ok=chk["ok"])
        print(json.dumps(r), flush=True)
        rows.append(r)
    del layer; torch.cuda.empty_cache()
if len(sys.argv) > 1: json.dump(dict(deployment=dep["name"], rows=rows), open(sys.argv[1], "w"), indent=1)
