"""Rows of one batched FP8 activation-quantizer program (`09b`'s `ACT_QUANT_BATCHED_ROWS`), on GEMM1's input
[E, M, K] and GEMM2's [E, M, I] of every batched decode scenario (`14_bench.SCENARIOS`), µs as medians of CUDA-graph
replays; then, for the fastest in sum and for the package's setting, GEMM1 + SiLU (eager, replayed) and both
quantized experts (`BatchedTritonQuantExperts`).

    python nbs/bench/act_quant_sweep.py OUT.json [--rows 4,8,16,32,64]

`act_quant_rows_h100_fd9e6e2.json` came from this sweep's first version (fd9e6e2); `act_quant_sweep_h100_ecf327d.json`
from the version at ecf327d, which also swept a program taking several groups in turn (a kernel variant since
removed: it did not pay).
"""
import argparse, json, torch, triton.testing
from moe_lit.bench import SCENARIOS, _problem, source_commit
from moe_lit.quant_weights import quantize_expert_weights
from moe_lit.kernels import quant as Q, quant_act as QA
from moe_lit.kernels.quant_experts import BatchedTritonQuantExperts

ap = argparse.ArgumentParser(description="rows a program of the batched FP8 activation quantizer")
ap.add_argument("out")
ap.add_argument("--rows", type=lambda s: tuple(int(v) for v in s.split(",")), default=(4, 8, 16, 32, 64))
args = ap.parse_args()
replay = lambda f: triton.testing.do_bench_cudagraph(f, return_mode="median") * 1e3
eager = lambda f: triton.testing.do_bench(f, return_mode="median") * 1e3
package = QA.ACT_QUANT_BATCHED_ROWS
def use(rows): QA.ACT_QUANT_BATCHED_ROWS = rows
problems, out = [], dict(commit=source_commit(), device=torch.cuda.get_device_name(), package=package, rows=[])
for sc in [s for s in SCENARIOS if "decode" in s["name"]]:
    a, w13, counts = _problem(sc)
    E, M, K = a.shape
    N, exp_m = w13.shape[1], max(1, sc["rows"] // E)
    w2 = torch.randn(E, K, N // 2, device="cuda", dtype=a.dtype) / N ** 0.5
    problems.append((sc["name"], a, counts, exp_m, quantize_expert_weights(w13, w2, "fp8_w8a8_block"),
                     torch.randn(E, M, N // 2, device="cuda", dtype=a.dtype)))
    del w13, w2
total = {}
for name, a, counts, exp_m, qw, h in problems:
    row = dict(scenario=name, quantizer_us={})
    for rows in args.rows:
        use(rows)
        t = (replay(lambda: QA._fp8_quantize_activations(a, "group", counts, 128)),
             replay(lambda: QA._fp8_quantize_activations(h, "group", counts, 128)))
        row["quantizer_us"][rows] = t
        total[rows] = total.get(rows, 0.0) + sum(t)
    out["rows"].append(row)
    print(name, " ".join(f"{k}:{v[0]:.1f}/{v[1]:.1f}" for k, v in row["quantizer_us"].items()), flush=True)
best = min(total, key=total.get)
out.update(sum_us=total, best=best)
print("sum over scenarios (µs):", " ".join(f"{r}:{v:.1f}" for r, v in sorted(total.items(), key=lambda kv: kv[1])))
for (name, a, counts, exp_m, qw, h), row in zip(problems, out["rows"]):
    f1 = lambda: Q.batched_moe_gemm_quant(a, qw, counts, "silu_and_mul", expected_m=exp_m, validate=False)
    fx = lambda: BatchedTritonQuantExperts().apply(a, counts, qw, expected_m=exp_m, validate=False)
    for label, rows in (("package", package), ("best", best)):
        use(rows)
        row[label] = dict(rows=rows, gemm1_eager_us=eager(f1), gemm1_replay_us=replay(f1), experts_eager_us=eager(fx),
                          experts_replay_us=replay(fx))
    print(name, " | ".join(f"{l} {row[l]['rows']}: GEMM1 {row[l]['gemm1_eager_us']:.1f}/{row[l]['gemm1_replay_us']:.1f}"
                           f" experts {row[l]['experts_eager_us']:.1f}/{row[l]['experts_replay_us']:.1f}"
                           for l in ("package", "best")), flush=True)
use(package)
json.dump(out, open(args.out, "w"), indent=1)
