"""Rows of one FP8 activation-quantizer program in the batched layout (`09b`'s `_act_quant_block_rows`): the quantizer
alone at 4–64 rows a program, on GEMM1's input [E, M, K] and GEMM2's [E, M, I] of every batched decode scenario
(`14_bench.SCENARIOS`), then GEMM1 + SiLU and the whole quantized experts (both GEMMs, `BatchedTritonQuantExperts`)
with the rule and with the former fixed 64 rows. µs, medians of CUDA-graph replays (eager too for the GEMM).

    python nbs/bench/act_quant_rows.py OUT.json
"""
import json, sys, torch, triton.testing
from moe_lit.bench import SCENARIOS, _problem, source_commit
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.kernels import quant as Q, quant_act as QA
from moe_lit.kernels.quant_experts import BatchedTritonQuantExperts

replay = lambda f: triton.testing.do_bench_cudagraph(f, return_mode="median") * 1e3
eager = lambda f: triton.testing.do_bench(f, return_mode="median") * 1e3
rule = QA._act_quant_block_rows
rows = []
for sc in [s for s in SCENARIOS if "decode" in s["name"]]:
    a, w13, counts = _problem(sc)
    E, M, K = a.shape
    N, exp_m = w13.shape[1], max(1, sc["rows"] // E)
    w2 = torch.randn(E, K, N // 2, device="cuda", dtype=a.dtype) / N ** 0.5
    qw = quantize_expert_weights(w13, w2, "fp8_w8a8_block")
    h = torch.randn(E, M, N // 2, device="cuda", dtype=a.dtype)
    row = dict(scenario=sc["name"], E=E, M=M, K=K, I=N // 2, expected_m=exp_m, max_count=int(counts.max()),
               rule_rows=rule(128, exp_m), quantizer_us={})
    for r in (4, 8, 16, 32, 64):
        QA._act_quant_block_rows = lambda g, e, r=r: max(1, min(r, 8192 // g))
        row["quantizer_us"][r] = (replay(lambda: QA._fp8_quantize_activations(a, "group", counts, 128, exp_m)),
                                  replay(lambda: QA._fp8_quantize_activations(h, "group", counts, 128, exp_m)))
    f1 = lambda: Q.batched_moe_gemm_quant(a, qw, counts, "silu_and_mul", expected_m=exp_m, validate=False)
    fx = lambda: BatchedTritonQuantExperts().apply(a, counts, qw, expected_m=exp_m, validate=False)
    for label, fn in (("fixed64", lambda g, e: max(1, min(64, 8192 // g))), ("rule", rule)):
        QA._act_quant_block_rows = fn
        row[label] = dict(gemm1_eager_us=eager(f1), gemm1_replay_us=replay(f1), experts_eager_us=eager(fx),
                          experts_replay_us=replay(fx))
    QA._act_quant_block_rows = rule
    rows.append(row)
    q = row["quantizer_us"]
    print(f"{sc['name']:<26} E={E} M={M} expected {exp_m} max {row['max_count']} rule {row['rule_rows']} rows | "
          + " ".join(f"{r}:{q[r][0]:.1f}/{q[r][1]:.1f}" for r in q) + " | GEMM1 eager/replay "
          + " vs ".join(f"{row[l]['gemm1_eager_us']:.1f}/{row[l]['gemm1_replay_us']:.1f}" for l in ("fixed64", "rule"))
          + " | experts " + " vs ".join(f"{row[l]['experts_eager_us']:.1f}/{row[l]['experts_replay_us']:.1f}"
                                       for l in ("fixed64", "rule")), flush=True)
    del a, w13, w2, qw, h
    torch.cuda.empty_cache()
json.dump(dict(commit=source_commit(), device=torch.cuda.get_device_name(), rows=rows), open(sys.argv[1], "w"), indent=1)
