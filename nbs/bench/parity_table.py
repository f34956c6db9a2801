"Parity of moe-lit with transformers MoE blocks, family by family (tiny seeded models, save_pretrained -> from_pretrained). Run: .venv/bin/python nbs/bench/parity_table.py"
import tempfile, torch
from moe_lit.testing import tiny_hf_model, TINY_HF
from moe_lit.real_models import parity
from moe_lit.checkpoint import CheckpointWeights
from moe_lit.layouts import moe_layer_indices
from moe_lit.config import ParallelConfig
from moe_lit.layer import run_emulated_ep
from moe_lit.testing import hf_moe_block, hf_moe_output
rows = []
for t in TINY_HF:
    r = {"family": t}
    for dtype in (torch.float32, torch.float64):
        model = tiny_hf_model(t, seed=1, dtype=dtype)
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d, max_shard_size="100KB")
            x = torch.randn(16, 32, dtype=dtype, generator=torch.Generator().manual_seed(2))
            errs, ids = [], True
            for i in moe_layer_indices(d):
                p = parity(model, d, i, x); errs.append(p["max_rel_err"]); ids &= p["ids_equal"]
            r[str(dtype)[6:]] = f"{max(errs):.1e}"; r["ids"] = ids
            if dtype == torch.float64:
                ep = []
                for b in ("allgather_reducescatter", "nixl_ep"):
                    par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=b)
                    src = CheckpointWeights(d, moe_layer_indices(d)[0], parallel=par, dtype=dtype)
                    want = hf_moe_output(hf_moe_block(model, moe_layer_indices(d)[0]), x)
                    run = run_emulated_ep(src.config, x, weights=src)
                    ep.append(((run.output - want).abs().max() / want.abs().max()).item())
                r["EP2 std/batched fp64"] = "/".join(f"{e:.1e}" for e in ep)
    rows.append(r)
print("| family | ids exact | fp32 max rel | fp64 max rel | EP2 std / batched (fp64) |")
print("|---|---|---|---|---|")
for r in rows: print(f"| {r['family']} | {r['ids']} | {r['float32']} | {r['float64']} | {r['EP2 std/batched fp64']} |")
