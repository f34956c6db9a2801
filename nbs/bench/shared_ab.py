"""The shared experts' tile tables off and on, one process, CUDA-graph replays of the whole layer (GPU).

    python nbs/bench/shared_ab.py [--tables DIR] [T ...]       # default T = 1 2

For each `LAYER_DEPLOYMENTS` entry with shared experts: the layer is captured and its replay timed
(`triton.testing.do_bench`, median) with the package's tables minus the E = 1 ones (the heuristic tile, as before
`tune_shared.py`) and with them (the package's, or DIR: a whole tables folder such as `tune_shared.py`'s
OUT_DIR/configs), alternately, twice each; the best of each is printed with the outputs' relative
difference (the tiles and splits differ, so the bits may).
"""
import os, shutil, sys, tempfile
from pathlib import Path
import torch, triton.testing
import moe_lit
from moe_lit.bench_layer import LAYER_DEPLOYMENTS, deployment_config
from moe_lit.layer import FusedMoE

args = sys.argv[1:]
tables = ""                                                   # "": the package's own
if "--tables" in args:
    i = args.index("--tables"); tables = str(Path(args[i + 1]).resolve()); del args[i:i + 2]
tokens = [int(a) for a in args] or [1, 2]
base = Path(tempfile.mkdtemp()) / "configs"
shutil.copytree(Path(moe_lit.__file__).parent / "configs", base)
for p in (base / "fused_moe_gemm").glob("E=1,*"): p.unlink()
modes = {"heuristic": str(base), "tuned": tables}
for dep in LAYER_DEPLOYMENTS:
    cfg = deployment_config(dep)
    if not cfg.num_shared_experts: continue
    torch.manual_seed(0)
    layer = FusedMoE(cfg, device="cuda", placement=dep["placement"])
    for T in tokens:
        x = torch.randn(T, cfg.hidden_size, device="cuda", dtype=cfg.dtype, generator=torch.Generator("cuda").manual_seed(T))
        best, outs = {}, {}
        for _ in range(2):
            for mode, root in modes.items():
                os.environ["MOE_LIT_TILE_CONFIG_DIR"] = root
                layer.graphs = {}
                g, gx, gy = layer.capture([T]).graphs[T]
                gx.copy_(x); g.replay(); torch.cuda.synchronize(); outs[mode] = gy.clone()
                best[mode] = min(best.get(mode, float("inf")), triton.testing.do_bench(g.replay, return_mode="median") * 1e3)
        a, b = outs["heuristic"].float(), outs["tuned"].float()
        print(f"{dep['name']:<45} T={T}: replay heuristic {best['heuristic']:6.1f} us  tuned {best['tuned']:6.1f} us  "
              f"rel diff {((a - b).norm() / a.norm()).item():.1e}", flush=True)
    layer.graphs = {}; del layer; torch.cuda.empty_cache()
