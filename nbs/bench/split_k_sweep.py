"""Split-K at decode: each expert GEMM with a few active experts of one row each, SPLIT_K 1 / 2 / 4 / 8 (`*` marks the
launcher's own choice, `split_k_factor`), as CUDA-graph replays (the launch cost left out), against the weight-bytes floor.

    python nbs/bench/split_k_sweep.py OUT.json
Batched format, E = 8 local experts of which `active` hold one row; GEMM1 with SiLU (w13) and GEMM2 (w2); bf16
weights (`batched_moe_gemm`) and quantized ones (`batched_moe_gemm_quant`, FP4 in the kernel layout). The floor is
the active experts' bytes of the weight (codes + scales) at the measured copy bandwidth.
"""
import json, sys
import torch, triton.testing
from moe_lit.bench import measure_device, source_commit
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.kernels.quant import batched_moe_gemm_quant, _quant_tile, _weight_kernel_args, _split_target
from moe_lit.kernels.batched import batched_moe_gemm, _batched_tile, split_k_factor, _num_sms, _cdiv, SPLIT_K_PROGRAMS_PER_SM
from moe_lit.formats import SILU

from moe_lit.models import PRESETS
SHAPES = [(name, PRESETS[key].hidden_size, PRESETS[key].intermediate_size) for name, key in
          (("DeepSeek-V3", "deepseek-v3"), ("Qwen3-30B-A3B", "qwen3-30b-a3b"), ("Mixtral-8x7B", "mixtral-8x7b"),
           ("gpt-oss-120b", "gpt-oss-120b"))]
E = 8
dev = measure_device()
rows = []
for model, H, I in SHAPES:
    for scheme in ("bf16", "mxfp4_w4a16", "nvfp4_w4a16", "fp8_w8a8_block"):
        g = torch.Generator(device="cuda").manual_seed(0)
        w13 = torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) / H ** 0.5
        w2 = torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) / I ** 0.5
        qw = None if scheme == "bf16" else quantize_expert_weights(w13, w2, scheme).for_kernels()
        for which, act, K, N in (("w13", SILU, H, 2 * I), ("w2", None, I, H)):
            n_out = N // 2 if act else N
            if qw is None:
                w = w13 if which == "w13" else w2
                nbytes_e = w[0].numel() * 2
                bm, bn, bk, _, rest = _batched_tile(E, N, K, 1, torch.bfloat16, act is not None, None, None)
                base, target = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **rest), SPLIT_K_PROGRAMS_PER_SM["16-bit"]
            else:
                wa = _weight_kernel_args(qw, which)
                nbytes_e = wa["codes"][0].numel() * wa["codes"].element_size() + wa["scale"][0].numel() * wa["scale"].element_size()
                base = _quant_tile("batched_moe_gemm", E, N, K, 1, torch.bfloat16, wa["FMT"], wa["GROUP_K"],
                                   act is not None, None, layout=wa["LAYOUT"])
                target = _split_target(wa["FMT"])
            a = torch.randn(E, 16, K, device="cuda", dtype=torch.bfloat16)
            for active in (1, 4):
                cnt = torch.tensor([1] * active + [0] * (E - active), dtype=torch.int32, device="cuda")
                pick = split_k_factor(_cdiv(n_out, base["BLOCK_N"]), active, _cdiv(K, base["BLOCK_K"]), _num_sms(), target)
                floor_us = active * nbytes_e / dev["copy_Bps"] * 1e6
                for split in (1, 2, 4, 8):
                    cfg = dict(base, SPLIT_K=split)
                    if qw is None:
                        f = lambda: batched_moe_gemm(a, w, cnt, act, config=cfg, expected_m=1, validate=False)
                    else:
                        f = lambda: batched_moe_gemm_quant(a, qw, cnt, act, weight=which, config=cfg, expected_m=1,
                                                           validate=False)
                    f(); torch.cuda.synchronize()
                    us = triton.testing.do_bench_cudagraph(f, rep=50, return_mode="median") * 1e3
                    r = dict(model=model, scheme=scheme, gemm=which, K=K, N=N, active=active, split_k=split, heuristic=split == pick,
                             us=round(us, 2), floor_us=round(floor_us, 2), pct_floor=round(100 * floor_us / us, 1),
                             tile={k: v for k, v in base.items()})
                    print(json.dumps(r), flush=True)
                    rows.append(r)
        del qw, w13, w2; torch.cuda.empty_cache()
if len(sys.argv) > 1:
    json.dump(dict(device=dev, commit=source_commit(), num_sms=_num_sms(), rows=rows), open(sys.argv[1], "w"), indent=1)
from collections import defaultdict                                   # the table: one line per GEMM, µs by SPLIT_K
t = defaultdict(dict)
for r in rows: t[(r["model"], r["scheme"], r["gemm"], r["active"], r["floor_us"])][r["split_k"]] = (r["us"], r["heuristic"])
print(f"{'model':<14}{'scheme':<16}{'gemm':<5}{'act':>4}{'floor':>7}  " + "".join(f"{'S=' + str(s):>9}" for s in (1, 2, 4, 8)))
for (m, sc, gm, act, fl), v in t.items():
    print(f"{m:<14}{sc:<16}{gm:<5}{act:>4}{fl:>7.1f}  " + "".join(f"{v[s][0]:>8.1f}{'*' if v[s][1] else ' '}" for s in (1, 2, 4, 8)))
