"""The router's selection kernel against another version of it, in one process: alone, and in the whole layer.

    python nbs/bench/select_ab.py BASE.py [T ...]

BASE.py ("base") is `moe_lit/kernels/router.py` of another commit, older or a candidate, with its relative imports made
absolute; "new" is this checkout's:

    git show REV:moe_lit/kernels/router.py | sed 's/^from \\.\\.\\([a-z_.]*\\) import/from moe_lit.\\1 import/; \\
        s/^from \\.\\([a-z_]*\\) import/from moe_lit.kernels.\\1 import/' > nbs/bench/_router_base.py

For each deployment of the layer benchmark (bf16, random weights, the benchmark's seeds) and each T (default 1 2 4):
- **alone**: the selection launch on the deployment's logits (fp32, random), 20 launches captured in one CUDA graph;
  µs a launch = the replay's median (`triton.testing.do_bench`) / 20. Ids (equal) and weights (the largest difference) of both versions;
- **layer**: the layer's graph for T captured with each version's selection (`router._route_topk` swapped: the layer's
  `_route_tokens` calls it while a graph is captured), and with this version selecting in the logits launch
  (`ROUTER_SELECT_IN_GRAPHS`, "one launch"; up to `ROUTER_SELECT_MAX_TOKENS` tokens), replays timed alternately,
  3 rounds, the least median each; the outputs compared with the base's (the renormalising sum's order may differ
  by a rounding).
"""
import importlib.util, sys, torch, triton.testing
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE
import moe_lit.kernels.router as R

path, tokens = sys.argv[1], [int(a) for a in sys.argv[2:]] or [1, 2, 4]
spec = importlib.util.spec_from_file_location("router_base", path)
base = importlib.util.module_from_spec(spec); sys.modules["router_base"] = base  # dataclasses look their module up
spec.loader.exec_module(base)
versions = {"base": base._route_topk, "new": R._route_topk}

def graph_us(fn, n=20) -> float:
    "Median µs of one `fn()` as one of n launches in a captured graph."
    fn(); torch.cuda.synchronize()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n): fn()
    return triton.testing.do_bench(g.replay, return_mode="median") * 1e3 / n

print(f"{'deployment':<45} {'T':>3}  selection alone: base / new us  same ids, max |dw|   layer replay: base / new / "
      f"new in one launch us  max |dy|")
for dep in LAYER_DEPLOYMENTS:
    cfg = deployment_config(dep)
    torch.manual_seed(0)
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"])
    plan, bias = layer.router, layer.e_score_correction_bias
    for T in tokens:
        logits = torch.randn(T, cfg.num_experts, device="cuda", generator=torch.Generator("cuda").manual_seed(T))
        out = {k: f(plan, logits, bias, torch.int32) for k, f in versions.items()}
        same_ids = torch.equal(out["base"][1], out["new"][1])
        dw = (out["base"][0] - out["new"][0]).abs().max().item()
        alone = {k: graph_us(lambda f=f: f(plan, logits, bias, torch.int32)) for k, f in versions.items()}
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=cfg.dtype, generator=torch.Generator("cuda").manual_seed(T))
        replay, y = {}, {}
        graphs = {}
        for k, (f, one) in dict(base=(versions["base"], False), new=(versions["new"], False),
                                one=(versions["new"], True)).items():
            R._route_topk, R.ROUTER_SELECT_IN_GRAPHS = f, one
            try: layer.capture(batch_sizes=(T,))
            finally: R._route_topk, R.ROUTER_SELECT_IN_GRAPHS = versions["new"], False
            graphs[k] = layer.graphs[T]
            layer.graphs = {}
        for _ in range(3):
            for k, (g, gx, gy) in graphs.items():
                gx.copy_(x); g.replay(); torch.cuda.synchronize(); y[k] = gy.clone()
                replay[k] = min(replay.get(k, float("inf")), triton.testing.do_bench(g.replay, return_mode="median") * 1e3)
        dy = max((y["base"].float() - y[k].float()).abs().max().item() for k in ("new", "one"))
        print(f"{dep['name']:<45} {T:>3}  {alone['base']:>8.2f} / {alone['new']:>5.2f}  {same_ids!s:<5} {dw:.1e}  "
              f"{replay['base']:>13.1f} / {replay['new']:>5.1f} / {replay['one']:>5.1f}  {dy:.1e}", flush=True)
