# %%
#| default_exp bench

# %% [markdown]
# # Benchmarks
# > The batched-experts GEMM against the kernels a user would otherwise pick and against the roofline floor, all measured in the same run on the same GPU.

# %%
#| export
from __future__ import annotations
import json, math, os, subprocess, time
from pathlib import Path
import torch
from moe_lit.terms import check_int, check_choice, progress
from moe_lit.kernels.batched import batched_moe_gemm, lookup_tile_config, tile_config_path, fit_shared_memory, INTERPRET
from moe_lit.kernels.batched import read_tile_table

# %%
#| hide
from fastcore.test import test_eq, test_fail, test_close
from moe_lit.kernels.batched import split_k_factor, SPLIT_K_PROGRAMS_PER_SM
from moe_lit.quant import QUANT_SCHEME_TABLE
from moe_lit.models import PRESETS
import tempfile
from moe_lit.bench import _save_tile

# %% [markdown]
# In this notebook: `SCENARIOS`, `measure_device` (copy bandwidth and bf16 matmul rate), `roofline_floor`,
# `routed_counts`, `bench_scenario`, `tune_scenario`, `run_bench` (what `moe-lit bench` runs) and `plot_bench`. A
# **how-to** page; the numbers and figure at the end come from a committed results file.
#
# ## What is measured
#
# For each scenario — local experts `E`, `K = hidden_size`, `N = 2·intermediate_size` (GEMM1), capacity `M` rows per
# expert, and `rows` routed (token, slot) pairs spread over the experts by random routing with a fixed seed — the run
# times GEMM1 (`[rows of expert e, K] × [K, N]` for every expert) four ways:
#
# - **moe-lit**: `batched_moe_gemm` on the `[E, M, K]` slabs (and, separately, with the fused SiLU-and-mul epilogue);
# - **torch.bmm** on the padded batch: all `M` rows of every expert, valid or not;
# - **torch._grouped_mm** on the packed valid rows with per-expert offsets;
# - a **per-expert `torch.mm` loop** over the valid rows of each expert with tokens.
#
# Each is reported in µs and as a percentage of the **roofline floor** measured in the same run:
# `floor = max(bytes / copy bandwidth, flops / matmul rate)`, where `bytes` counts the weights of the experts that
# have tokens plus the valid activation rows in and the output rows out, and `flops = 2·rows·N·K`. The copy
# bandwidth counts the bytes read plus written by a device-to-device copy, so a kernel that mostly reads can pass
# 100%.

# %%
#| export
SCENARIOS = [   # (name, E local experts, K = hidden, N = 2·I, M = capacity per expert, routed rows)
    dict(name="DeepSeek-V3 EP8 decode", E=32, K=7168, N=4096, M=128, rows=1024, top_k=8),
    dict(name="DeepSeek-V3 EP8 prefill", E=32, K=7168, N=4096, M=1024, rows=16384, top_k=8),
    dict(name="Qwen3-30B-A3B decode", E=128, K=2048, N=1536, M=64, rows=512, top_k=8),
    dict(name="Mixtral-8x7B decode", E=8, K=4096, N=28672, M=64, rows=128, top_k=2),
    dict(name="gpt-oss-120b decode", E=128, K=2880, N=5760, M=64, rows=512, top_k=4),
]

def routed_counts(E: int,          # local experts
                  M: int,          # capacity: rows an expert's slab holds
                  rows: int,       # routed (token, slot) pairs in all, at most E·M
                  seed: int = 0,   # seed of the routing (a torch.Generator seed)
                 ) -> torch.Tensor:
    """`expert_num_tokens [E]` int32 for `rows` pairs routed uniformly at random (fixed seed), capped at `M` each.
    ValueError from `check_int` naming `E` or `M` (< 1) or `rows` (< 0 or > E·M); `seed` is not checked (torch's
    RuntimeError for a non-int). Source: moe-lit's own (uniform random routing)."""
    check_int("E", E, lo=1); check_int("M", M, lo=1); check_int("rows", rows, lo=0, hi=E * M + 1)
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(torch.randint(0, E, (rows,), generator=g), minlength=E)
    while counts.max() > M:                      # move the overflow to the emptiest experts: rows stay exact
        e_hi, e_lo = int(counts.argmax()), int(counts.argmin())
        counts[e_hi] -= 1; counts[e_lo] += 1
    return counts.int()

# %%
#| test routed_counts
c = routed_counts(32, 128, 1024)
test_eq((int(c.sum()), c.dtype, c.max().item() <= 128), (1024, torch.int32, True))
test_eq(routed_counts(4, 2, 8).tolist(), [2, 2, 2, 2])              # full capacity is exact
test_fail(lambda: routed_counts(4, 2, 9), contains="rows: expected <= 8, got 9")

# %%
#| export
def roofline_floor(E_active: int,        # experts with at least one row (their weights are read once)
                   rows: int,            # routed (token, slot) pairs
                   K: int, N: int,       # GEMM1's reduction (hidden) and output (2·intermediate) sizes, elements
                   bytes_per_el: int,    # bytes an element (2 for bf16)
                   copy_Bps: float,      # copy bandwidth, bytes/s (read + write, `measure_device`)
                   flops_per_s: float,   # matmul rate, FLOP/s
                  ) -> dict:             # {bytes, flops, floor_s (seconds), bound: 'memory' or 'compute'}
    """Floor time (s) of GEMM1 over the active experts: max of the byte time and the flop time.
    Nothing is checked: a zero `copy_Bps` or `flops_per_s` is a ZeroDivisionError, negative counts give a negative
    floor. Source: the roofline model (Williams, Waterman and Patterson, "Roofline", CACM 2009)."""
    nbytes = (E_active * N * K + rows * K + rows * N) * bytes_per_el
    flops = 2.0 * rows * N * K
    return dict(bytes=nbytes, flops=flops, floor_s=max(nbytes / copy_Bps, flops / flops_per_s),
                bound="memory" if nbytes / copy_Bps >= flops / flops_per_s else "compute")

# %%
#| test roofline_floor
f = roofline_floor(32, 1024, 7168, 4096, 2, 4.3e12, 790e12)
test_eq(f["bound"], "memory"); assert abs(f["floor_s"] - f["bytes"] / 4.3e12) < 1e-15
test_eq(roofline_floor(32, 16384, 7168, 4096, 2, 4.3e12, 790e12)["bound"], "compute")

# %% [markdown]
# ## Measuring the card
#
# The ceilings are measured, not quoted: a device-to-device copy of a 2 GiB buffer (bytes read + written) and an
# 8192³ bf16 `torch.mm` on random data, each the median of `triton.testing.do_bench`.

# %%
#| export
def measure_device(copy_bytes: int = 2 << 30,   # bytes copied device to device (read once, written once)
                   mm_size: int = 8192,         # n of the n×n by n×n bf16 matmul
                  ) -> dict:                    # {device_name, copy_Bps (B/s), bf16_flops (FLOP/s), torch}
    """Copy bandwidth (B/s, read + write) and bf16 matmul rate (FLOP/s) of the current CUDA device.
    ValueError naming `device` without a CUDA GPU or under the Triton interpreter; the sizes are not checked (torch's
    errors, e.g. OutOfMemoryError). Source: triton.testing's `do_bench` (median of each); the two ceilings are
    moe-lit's own choice of roofline."""
    import triton.testing
    if not torch.cuda.is_available() or INTERPRET: raise ValueError("device: expected a CUDA GPU, got none")
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3
    a = torch.randn(mm_size, mm_size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(mm_size, mm_size, device="cuda", dtype=torch.bfloat16)
    t_mm = triton.testing.do_bench(lambda: a @ b, return_mode="median") * 1e-3
    src = dst = a = b = None                         # free the buffers before the next measurement
    return dict(device_name=torch.cuda.get_device_name(), copy_Bps=2 * copy_bytes / t_copy,
                bf16_flops=2.0 * mm_size**3 / t_mm, torch=torch.__version__)

# %% [markdown]
# ## One scenario

# %%
#| export
def _problem(sc: dict, dtype=torch.bfloat16, seed: int = 0):
    E, K, N, M = sc["E"], sc["K"], sc["N"], sc["M"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(E, M, K, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(E, N, K, device="cuda", dtype=dtype, generator=g) / math.sqrt(K)
    counts = routed_counts(E, M, sc["rows"], seed).cuda()
    return a, w, counts

def _contiguous_problem(sc: dict, dtype=torch.bfloat16, seed: int = 1):
    "`(x [T, K], local ids [T, top_k])` with T = rows / top_k: each token on top_k distinct experts (fixed seed)."
    E, k = sc["E"], sc["top_k"]
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(sc["rows"] // k)]).int().cuda()
    return torch.randn(ids.shape[0], sc["K"], device="cuda", dtype=dtype), ids

def _peers(a, w, counts):
    "The peer implementations of GEMM1 as zero-argument callables (host-side counts precomputed, not timed)."
    E, M, K = a.shape
    c = counts.tolist()
    offs = torch.tensor(c, device=a.device).cumsum(0).to(torch.int32)
    packed = torch.cat([a[e, :n] for e, n in enumerate(c)])                       # [rows, K]
    wt = w.transpose(1, 2)                                                       # [E, K, N] view
    active = [e for e, n in enumerate(c) if n]
    return {"torch.bmm (padded)": lambda: torch.bmm(a, wt),
            "torch._grouped_mm (packed)": lambda: torch._grouped_mm(packed, wt, offs=offs),
            "per-expert torch.mm loop": lambda: [a[e, :c[e]] @ w[e].T for e in active]}

# %%
#| export
def bench_scenario(sc: dict, device: dict, configs: dict | None = None, dtype=torch.bfloat16,
                   with_peers: bool = True, contiguous_config: dict | None = None) -> dict:
    """Time moe-lit's GEMM1 (plain and fused SiLU) and the peers on scenario `sc`; µs and % of the roofline floor.
    Needs a CUDA GPU (without one, torch's RuntimeError for a CUDA generator); nothing is checked: KeyError for an `sc`
    without E, K, N, M or rows or a `device` without copy_Bps and bf16_flops, and the kernels run unvalidated.
    Source: triton.testing's `do_bench` (median) for every implementation; the peers are torch's own ops."""
    import triton.testing
    a, w, counts = _problem(sc, dtype)
    E, M, K = a.shape
    N, exp_m = w.shape[1], max(1, sc["rows"] // E)
    cfg = configs or lookup_tile_config("batched_moe_gemm", E, N, K, exp_m, dtype)
    out = torch.empty(E, M, N, device="cuda", dtype=dtype)
    out_silu = torch.empty(E, M, N // 2, device="cuda", dtype=dtype)
    impls = {"moe-lit batched_moe_gemm": lambda: batched_moe_gemm(a, w, counts, out=out, config=cfg, validate=False),
             "moe-lit + fused SiLU-and-mul": lambda: batched_moe_gemm(a, w, counts, "silu_and_mul", out=out_silu,
                                                                       config=cfg, validate=False)}
    if with_peers: impls.update(_peers(a, w, counts))
    align_us = None
    if "top_k" in sc:                           # the Standard format's kernel on the same rows: T = rows / top_k
        from moe_lit.kernels.contiguous import moe_align_block_size, fused_moe_gemm
        x, ids = _contiguous_problem(sc, dtype)
        T, k = ids.shape
        c_cfg = contiguous_config or lookup_tile_config("fused_moe_gemm", E, N, K, exp_m, dtype)
        bm = c_cfg["BLOCK_M"]
        aligned = moe_align_block_size(ids, bm, E)
        c_out = torch.empty(T * k, N, device="cuda", dtype=dtype)
        impls["moe-lit contiguous fused_moe_gemm"] = lambda: fused_moe_gemm(x, w, *aligned, k, bm, out=c_out,
                                                                            config=c_cfg, expected_m=exp_m)
        align_us = triton.testing.do_bench(lambda: moe_align_block_size(ids, bm, E, validate=False),
                                           return_mode="median") * 1e3
    floor = roofline_floor(int((counts > 0).sum()), sc["rows"], K, N, a.element_size(), device["copy_Bps"],
                           device["bf16_flops"])
    res = {}
    for name, fn in impls.items():
        t = triton.testing.do_bench(fn, return_mode="median") * 1e-3
        res[name] = dict(us=t * 1e6, pct_floor=100.0 * floor["floor_s"] / t)
    return dict(scenario=sc, config=cfg, contiguous_config=c_cfg if "top_k" in sc else None,
                floor_us=floor["floor_s"] * 1e6, bound=floor["bound"], results=res, align_us=align_us)

# %% [markdown]
# ## The fixed cost of alignment at decode
#
# The contiguous path pays for `moe_align_block_size` (four small launches) before its GEMMs; at tiny batches that
# fixed cost can rival the GEMMs. `align_cost` times, for `T = 1 … 16` tokens of DeepSeek-V3 on rank 0 of EP8, the two
# layout builders (`moe_align_block_size` and the one-launch `moe_pair_blocks`) and rank 0's whole
# `TritonExperts.apply` (both GEMMs and the sum) with each layout.

# %%
#| export
def align_cost(num_experts: int = 256, top_k: int = 8, ep_size: int = 8, hidden_size: int = 7168,
               intermediate_size: int = 2048, tokens=(1, 2, 4, 8, 16)) -> list[dict]:
    """Median µs per token count of both layouts' builders and of rank 0's whole `TritonExperts.apply` with each (GPU).
    Needs a CUDA GPU (torch's RuntimeError without one); the sizes are not checked (`num_experts // ep_size` local
    experts, a remainder dropped). Source: moe-lit's own measurement of vLLM's `moe_align_block_size` layout against
    `moe_pair_blocks`, timed with triton.testing's `do_bench` and `do_bench_cudagraph`."""
    import triton.testing
    from moe_lit.kernels.contiguous import moe_align_block_size, moe_pair_blocks, TritonExperts
    E = num_experts // ep_size                                       # rank 0 holds experts 0 .. E-1
    g = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(E, 2 * intermediate_size, hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
    w2 = torch.randn(E, hidden_size, intermediate_size, device="cuda", dtype=torch.bfloat16, generator=g)
    aligned, paired = TritonExperts(), TritonExperts()
    aligned.pair_blocks_max_pairs, paired.pair_blocks_max_pairs = 0, 1 << 30
    def bench(f):        # eager (what a Python caller pays, launches included) and replayed as a CUDA graph (GPU only)
        return (triton.testing.do_bench(f, return_mode="median") * 1e3,
                triton.testing.do_bench_cudagraph(f, return_mode="median") * 1e3)
    out = []
    for T in tokens:
        ids = torch.stack([torch.randperm(num_experts)[:top_k] for _ in range(T)]).int().cuda()
        local = torch.where(ids < E, ids, -1).int()
        x, wts = torch.randn(T, hidden_size, device="cuda", dtype=torch.bfloat16), torch.rand(T, top_k, device="cuda")
        row = dict(num_tokens=T, num_experts=num_experts, top_k=top_k, local_experts=E, block_m=16)
        for name, f in (("align", lambda: moe_align_block_size(local, 16, E, validate=False)),
                        ("pair_blocks", lambda: moe_pair_blocks(local, 16, E, validate=False)),
                        ("experts_aligned", lambda: aligned.apply(x, w13, w2, wts, local, validate=False)),
                        ("experts_pair_blocks", lambda: paired.apply(x, w13, w2, wts, local, validate=False))):
            row[f"{name}_us"], row[f"{name}_graph_us"] = bench(f)
        out.append(row)
    w13 = w2 = None
    return out

# %% [markdown]
# ## Tuning
#
# `tune_scenario` times candidate tiles for one scenario and returns the fastest; `run_bench(tune=True)` writes the
# winners into the JSON tile table (`tile_config_path`) that the launcher reads, keyed by the expected rows per
# expert. The candidates depend on the regime: narrow N tiles and deep K tiles while weights stream (decode), large
# square tiles with 8 warps once the arithmetic dominates (prefill). The FP4 kernels (`--tune w4a16`, tuned on MXFP4
# weights with the fused SiLU-and-mul) swap the GEMM's operands, so their `BLOCK_N` weight rows are the MMA's M side
# (64 or 128) and their `BLOCK_M` activation rows should cover an expert's rows in one tile: every extra M tile
# decodes the expert's weights again. The FP8 kernels (`--tune fp8`, 128×128 block weights, bf16 activations quantized
# in the K loop as the layer runs them) take a K tile of at most one 128-wide scale group and none of the descriptor,
# warp-specialised or grouped-order variants; without a table they run the bf16 heuristic's tile. Both quantized
# families also try a register cap (`maxnreg`) on their decode tiles. The FP4 GEMM1 loop of the 32-row, 64-wide,
# 4-warp tile holds 112 registers a thread (sm_90, Triton 3.6; `nbs/bench/sass_fp4_sm90.log`), so four programs fit
# an SM (16 warps). Capped at 96 it
# compiles without a spill, 17 instructions a K step longer, and five fit (20 warps) — what a loop short of issue
# slots to hide its decode's latency may want (`09c`, Performance). FP8's 16-row tile holds 142 registers; capped at
# 128, four programs fit instead of three. Larger tiles spill under a cap, so they get none.

# %%
#| export
def tile_candidates(expected_m: int, kernel: str = "batched_moe_gemm") -> list[dict]:
    """Candidate tiles of `kernel` (one of `TUNABLE`) for `expected_m` rows per expert. ValueError naming `kernel`
    (not in TUNABLE) or `expected_m` (not an int >= 1). Source: moe-lit's own search space (vLLM tunes its fused-MoE
    tiles with `benchmarks/kernels/benchmark_moe.py --tune`)."""
    check_choice("kernel", kernel, TUNABLE); check_int("expected_m", expected_m, lo=1)
    bm0 = max(16, 1 << (expected_m - 1).bit_length())
    if kernel.endswith("_fp8"):     # one-byte weights, a K tile within a 128-wide scale group, pointer loads only
        cands = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=nw, num_stages=st)
                 for bm in sorted({min(128, bm0), min(128, 2 * bm0)}) for bn, nw in ((32, 4), (64, 4), (128, 4), (128, 8))
                 for st in (3, 4)]
        cands += [dict(c, maxnreg=128) for c in cands if c["BLOCK_M"] <= 16 and c["BLOCK_N"] == 64 and c["num_warps"] == 4]
        return [c for c in cands if fit_shared_memory(c, True, 1) == c]
    if kernel.endswith("_w4a16"):   # FP4 swaps the operands: BLOCK_N weight rows are the MMA's M side; the mma128
        cands = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=128, num_warps=nw, num_stages=st)   # layout's K tile is 128
                 for bm in sorted({min(128, bm0), min(128, 2 * bm0)}) for bn, nw in ((64, 4), (128, 8))
                 for st in (1, 2, 3, 4, 5)]  # 64 weight rows a warp group (other pairings decode twice or through shared
        # memory); one stage: no load pipelining, but the MMAs of a K tile run back to back (09c, Performance; slower
        # on every H100 row measured); five: more code words in flight, which decode at 43-66 % of the floor may want
        cands += [dict(c, maxnreg=96) for c in cands if c["BLOCK_M"] <= 32 and c["BLOCK_N"] == 64 and c["num_stages"] in (3, 4)]
        return [c for c in cands if fit_shared_memory(c, True, 2) == c]
    if expected_m <= 64:
        cands = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st)
                 for bm in sorted({bm0, min(64, 2 * bm0)}) for bn in (32, 64, 128) for bk in (128, 256) for st in (3, 4)]
        return [c for c in cands if fit_shared_memory(c, False, 2) == c]
    cands = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=st, TMA=True)
             for bm in (64, 128) for bn in (128, 256) for bk in (64, 128) for nw in (4, 8) for st in (3, 4, 5)
             if not (bm == 128 and bn == 256 and nw == 4)]
    if kernel == "fused_moe_gemm":   # gathered A rows: pointer loads for A, the weight tile by descriptor or pointers
        cands = [dict(c, TMA=tma, GROUP_M=gm) for c in cands if c["BLOCK_K"] == 64 and c["num_stages"] < 5
                 for tma in (True, False) for gm in (0, 8) if not (gm and not tma)]
    else:
        cands += [dict(c, WARP_SPECIALIZE=True) for c in cands if c["BLOCK_K"] == 64]      # producer/consumer warps
        cands.append(dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3, TMA=False))  # pointer loads
    return [c for c in cands if fit_shared_memory(c, False, 2) == c]

TUNABLE = ("batched_moe_gemm", "fused_moe_gemm", "batched_moe_gemm_w4a16", "fused_moe_gemm_w4a16",   # the FP4
            "batched_moe_gemm_fp8", "fused_moe_gemm_fp8")   # kernels are tuned on MXFP4 weights with the fused
# SiLU-and-mul (NVFP4 runs the same loop with 16-wide groups), the FP8 ones on fp8_w8a8_block weights
TUNE_SETS = {"all": TUNABLE, "batched": TUNABLE[:1], "contiguous": TUNABLE[1:2], "w4a16": TUNABLE[2:4],
             "fp8": TUNABLE[4:6]}   # `run_bench(tune=...)` / `moe-lit bench --tune ...`

# %%
#| test tile_candidates
fits = {"_w4a16": (True, 2), "_fp8": (True, 1)}                    # how each family's launcher fits a tile
for kernel in TUNABLE:
    fit = next((v for k, v in fits.items() if kernel.endswith(k)), (False, 2))
    for m in (4, 32, 512):
        cands = tile_candidates(m, kernel)
        assert cands and all(fit_shared_memory(c, *fit) == c for c in cands), (kernel, m)
        if kernel.endswith("_fp8"): assert all(c["BLOCK_K"] <= 128 and "TMA" not in c for c in cands)
        assert len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)          # no duplicates
assert all(c["BLOCK_M"] >= 16 for c in tile_candidates(4, "fused_moe_gemm"))
capped = lambda m, k: {(c["BLOCK_M"], c["maxnreg"]) for c in tile_candidates(m, k) if "maxnreg" in c}
test_eq(capped(16, "batched_moe_gemm_w4a16"), {(16, 96), (32, 96)})      # decode tiles only: larger ones spill
test_eq(capped(512, "batched_moe_gemm_w4a16"), set())
test_eq(capped(4, "fused_moe_gemm_fp8"), {(16, 128)})
test_fail(lambda: tile_candidates(4, "bmm"), contains="kernel: expected one of")
for bad in (-1, True, 2.5, "4", None): test_fail(lambda: tile_candidates(bad), contains="expected_m: expected")

# %%
#| export
def _gemm1_callable(sc: dict, kernel: str, dtype=torch.bfloat16):
    "`f(cfg)` that runs GEMM1 of scenario `sc` with tile `cfg` on `kernel`'s layout of the same routed rows."
    from moe_lit.kernels.contiguous import moe_align_block_size, fused_moe_gemm
    from moe_lit.kernels.quant import batched_moe_gemm_quant, fused_moe_gemm_quant
    a, w, counts = _problem(sc, dtype)
    E, N = w.shape[:2]
    qw = None
    if kernel.endswith(("_w4a16", "_fp8")):
        from moe_lit.quant_weights import quantize_expert_weights
        qw = quantize_expert_weights(w, torch.randn(E, w.shape[2], N // 2, device="cuda", dtype=dtype),
                                     "mxfp4_w4a16" if kernel.endswith("_w4a16") else "fp8_w8a8_block"
                                     ).for_kernels()                   # tuned in the layout the layer runs
    if kernel.startswith("batched"):
        out = torch.empty(a.shape[0], a.shape[1], N // 2 if qw else N, device="cuda", dtype=dtype)
        if qw: return lambda cfg: batched_moe_gemm_quant(a, qw, counts, "silu_and_mul", out=out, config=cfg, validate=False)
        return lambda cfg: batched_moe_gemm(a, w, counts, out=out, config=cfg, validate=False)
    x, ids = _contiguous_problem(sc, dtype)
    out = torch.empty(ids.numel(), N // 2 if qw else N, device="cuda", dtype=dtype)
    layouts = {}
    def run(cfg):
        bm = cfg["BLOCK_M"]
        if bm not in layouts: layouts[bm] = moe_align_block_size(ids, bm, sc["E"])
        if qw: return fused_moe_gemm_quant(x, qw, *layouts[bm], ids.shape[1], bm, "silu_and_mul", out=out, config=cfg)
        return fused_moe_gemm(x, w, *layouts[bm], ids.shape[1], bm, out=out, config=cfg)
    return run

def tune_scenario(sc: dict, dtype=torch.bfloat16, kernel: str = "batched_moe_gemm") -> tuple[dict, list]:
    """`(best tile, [(tile, µs)...])` for GEMM1 of scenario `sc` on `kernel` (candidates that fail to compile are
    skipped). ValueError naming `kernel` (not in TUNABLE); a candidate that raises is timed as inf, not raised; needs a
    CUDA GPU (torch's RuntimeError without one). Source: triton.testing's `do_bench`; the sweep plays the part of
    vLLM's `benchmarks/kernels/benchmark_moe.py --tune`."""
    import triton.testing
    check_choice("kernel", kernel, TUNABLE)
    run = _gemm1_callable(sc, kernel, dtype)
    timings = []
    for cfg in progress(tile_candidates(max(1, sc["rows"] // sc["E"]), kernel), f"{kernel} tiles of {sc['name']}"):
        try: t = triton.testing.do_bench(lambda: run(cfg), warmup=5, rep=20, return_mode="median")
        except Exception: t = float("inf")           # out of shared memory / registers on this GPU
        timings.append((cfg, t * 1e3))
    return min(timings, key=lambda x: x[1])[0], timings

# %%
#| export
def host_loop_us(f,                 # a zero-argument callable: its host-side cost is what is measured
                 n: int = 1000,     # calls a loop
                 blocks: int = 5,   # loops; the fastest counts (this machine's noise only adds)
                 warmup: int = 100, # calls before the first loop
                ) -> float:         # µs a call
    """Wall time of `f` a call, µs: the fastest of `blocks` loops of `n` calls, with no device synchronisation —
    the host's side of a launch path (the `nbs/bench/*_cpu.py` scripts, with Triton's launches stubbed or
    compiled-only).
    ValueError from `check_int` naming `n` or `blocks` (< 1) or `warmup` (< 0); whatever `f` raises propagates.
    Source: the best-of-repeats rule of Python's `timeit` (`Timer.repeat`: the minimum is the measure)."""
    check_int("n", n, lo=1); check_int("blocks", blocks, lo=1); check_int("warmup", warmup, lo=0)
    for _ in range(warmup): f()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(n): f()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best

def source_commit() -> str:
    """The commit a benchmark measured: `$MOE_LIT_COMMIT` when set (a copied tree), else `git rev-parse --short HEAD`.
    Raises nothing: without git (OSError) or outside a checkout it returns 'unknown'. Source: git's `rev-parse`."""
    commit = os.environ.get("MOE_LIT_COMMIT", "")
    if not commit:
        try: commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError: pass
    return commit or "unknown"

# %%
#| export
def _save_tile(kernel: str, sc: dict, cfg: dict, device_name: str, config_dir) -> None:
    "Write the winning tile into `kernel`'s JSON table, keyed by the scenario's expected rows per expert."
    p = tile_config_path(kernel, sc["E"], sc["N"], device_name, torch.bfloat16, config_dir)
    table = {str(m): c for m, c in (read_tile_table(p) or {}).items()}   # read as the launchers do, checked
    table[str(max(1, sc["rows"] // sc["E"]))] = cfg                              # (uncached: this run wrote it)
    p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(table, indent=1, sort_keys=True))

def check_bench_args(out_json: str | Path | None = None,   # where the JSON goes: a file in an existing directory
                     tune: bool | str = False,             # False, True (every tunable kernel) or a `TUNE_SETS` name
                     config_dir: str | Path | None = None, # only with tune: an existing directory for the tables
                    ) -> tuple:                            # the kernels to tune (empty without tune)
    """The benchmarks' arguments, checked before the card is touched (`run_bench`, `bench_layer`, `moe-lit bench`):
    ValueError naming each argument and its flag, so a bad flag fails in a second, not after minutes of measuring."""
    def where(name, p, want_dir):       # a path on this machine: its kind, or None when it cannot be read as one
        if not isinstance(p, (str, Path)) or not str(p) or "\0" in str(p):
            raise ValueError(f"{name}: expected a path (a non-empty str or Path without NUL bytes), got {p!r}")
        try:
            d = Path(p) if want_dir else None if Path(p).is_dir() else Path(p).resolve(strict=False).parent
            return d is not None and d.is_dir() and os.access(d, os.W_OK | os.X_OK)   # (writable: checked now, not after)
        except (OSError, RuntimeError): return None     # a symbolic-link loop, a component that is a file, ...
    if out_json is not None and not where("out_json (--out)", out_json, False):
        raise ValueError(f"out_json (--out): expected a file in an existing directory this process may write to, "
                         f"got {str(out_json)!r}")
    tune = {False: (), True: TUNABLE, **TUNE_SETS}[check_choice("tune", tune, (False, True, *TUNE_SETS))]
    if config_dir is not None and not tune:
        raise ValueError(f"config_dir (--config-dir): expected tune (--tune) with it, only tuning writes tables, got "
                         f"config_dir={str(config_dir)!r} without tune")
    if config_dir is not None and not where("config_dir (--config-dir)", config_dir, True):
        raise ValueError(f"config_dir (--config-dir): expected an existing directory this process may write the tuned "
                         f"tables to, got {str(config_dir)!r}")
    return tune

def run_bench(out_json: str | Path | None = None, tune: bool | str = False, config_dir: str | Path | None = None,
              scenarios: list | None = None, on_scenario=None, align: bool = True, quant: bool = True) -> dict:
    """Measure the card, (optionally) tune, then benchmark every scenario; save JSON when `out_json` is given.
    ValueError from `check_bench_args` naming `out_json (--out)`, `tune` or `config_dir (--config-dir)` before the card
    is touched, then `measure_device`'s naming `device` without a GPU and `read_tile_table`'s naming a broken tile
    table. Source: moe-lit's own; the tuned tables use vLLM's file naming (`E=..,N=..,device_name=...json`)."""
    tune = check_bench_args(out_json, tune, config_dir)
    device = measure_device()
    for sc in (scenarios or SCENARIOS) if tune else ():                   # the tables tuning will add to: readable
        for kernel in tune:
            read_tile_table(tile_config_path(kernel, sc["E"], sc["N"], device["device_name"], torch.bfloat16, config_dir))
    results = []
    for sc in progress(scenarios or SCENARIOS, "scenarios"):
        if on_scenario: on_scenario(sc["name"])
        best, sweeps = {}, {}
        for kernel in tune:
            best[kernel], sweeps[kernel] = tune_scenario(sc, kernel=kernel)
            _save_tile(kernel, sc, best[kernel], device["device_name"], config_dir)
        results.append(dict(bench_scenario(sc, device, best.get("batched_moe_gemm"),
                                           contiguous_config=best.get("fused_moe_gemm")),
                            tuned=list(tune), sweeps={k: [(c, t) for c, t in v] for k, v in sweeps.items()}))
    commit = source_commit()
    report = dict(device=device, dtype="bf16", date=time.strftime("%Y-%m-%d"), commit=commit, scenarios=results,
                  align=align_cost() if align else None, quant=bench_quant(device, scenarios) if quant else None)
    if out_json: Path(out_json).write_text(json.dumps(report, indent=1))
    return report

# %% [markdown]
# ## Quantized weights at decode
#
# At decode the experts stream their weights, so quantized weights should run faster in proportion to their bytes.
# `bench_quant` times GEMM1 with the fused SiLU-and-mul of both formats' quantized kernels (`09c_kernels.quant`) on
# the decode scenarios' rows, against the **weight-bytes floor** of the same run: codes plus scales of the experts
# that have tokens, plus the activation rows in and out, over the measured copy bandwidth. FP8 w8a8 includes the
# activation quantization launch; FP4 weights are 0.53 (MXFP4) and 0.56 (NVFP4) bytes per element. The unquantized
# bf16 kernel of the same format is timed alongside for the speed-up.

# %%
#| export
QUANT_BENCH_SCHEMES = ("fp8_w8a8_block", "mxfp4_w4a16", "nvfp4_w4a16")

def _quant_bytes(qw, which: str, experts) -> int:
    "Bytes of `which` ('w13'/'w2') codes, scales and global scales of the listed experts."
    parts = [getattr(qw, which), getattr(qw, which + "_scale"), getattr(qw, which + "_global_scale")]
    return sum(t[0].numel() * t.element_size() * len(experts) for t in parts if t is not None and t.dim() > 0) + \
        sum(t.numel() * t.element_size() for t in parts if t is not None and t.dim() == 0)

def bench_quant(device: dict, scenarios: list | None = None, schemes=QUANT_BENCH_SCHEMES,
                fp4_layouts=("kernel",),   # FP4 byte orders to time: "kernel" (what the layer runs), "plain", "split64"
               ) -> list[dict]:
    """µs and % of the weight-bytes floor of quantized GEMM1 (+SiLU) in both formats, per decode scenario and scheme.

    Needs a CUDA GPU (ValueError otherwise). `device` is `measure_device()`'s dict (its `copy_Bps` sets the floor).
    One row per (scenario, scheme, FP4 layout): keys `scenario`, `scheme`, `fp4_layout` (None for FP8),
    `floor_us` (the checkpoint's plain bytes of the active experts' w13 plus activations in and out, at `copy_Bps`,
    whatever layout is timed), `bytes_per_weight`, `batched_us` / `contiguous_us` (median of `do_bench`) with their
    `_pct_floor`, the same two replayed as CUDA graphs (`batched_graph_us` / `contiguous_graph_us`), and
    `bf16_batched_us` (the unquantized batched GEMM on the same row). FP8 block rows time the launchers on bf16 input as the
    layer calls them (`09c`'s `FP8_ACT_QUANT`, by default a quantizer launch, then the GEMM) and add
    `k_loop_batched_us` / `k_loop_contiguous_us` (replayed: `k_loop_*_graph_us`): the same GEMMs quantizing each 1×128
    tile in their K loop instead (`FP8_ACT_QUANT = "loop"`). FP4 layouts are timed once each ("kernel"
    resolves to `FP4_KERNEL_LAYOUT`); FP8 schemes have one row. Source: triton.testing's `do_bench` and
    `do_bench_cudagraph`; the weight-bytes floor is moe-lit's own."""
    import triton.testing
    from moe_lit.quant import QUANT_SCHEME_TABLE
    from moe_lit.quant_weights import quantize_expert_weights, FP4_LAYOUTS, FP4_KERNEL_LAYOUT
    from moe_lit.kernels.quant import batched_moe_gemm_quant, fused_moe_gemm_quant, quant_block_m
    import moe_lit.kernels.quant as Q
    if not isinstance(fp4_layouts, (tuple, list)) or not fp4_layouts:
        raise ValueError(f"fp4_layouts: expected a non-empty tuple of 'kernel', 'plain', 'split64', got {fp4_layouts!r}")
    fp4_layouts = [FP4_KERNEL_LAYOUT if check_choice("fp4_layouts", lay, ("kernel", *FP4_LAYOUTS)) == "kernel" else lay
                   for lay in fp4_layouts]
    if not torch.cuda.is_available(): raise ValueError("device: expected a CUDA GPU for bench_quant, found none")
    from moe_lit.kernels.contiguous import moe_align_block_size
    bench = lambda f: triton.testing.do_bench(f, return_mode="median") * 1e-3
    replay = lambda f: triton.testing.do_bench_cudagraph(f, return_mode="median") * 1e-3
    rows = []
    for sc in [s for s in (scenarios or SCENARIOS) if "decode" in s["name"]]:
        a, w13, counts = _problem(sc)
        E, M, K = a.shape
        N, exp_m = w13.shape[1], max(1, sc["rows"] // E)
        w2 = torch.randn(E, K, N // 2, device="cuda", dtype=a.dtype) / math.sqrt(N // 2)
        x, ids = _contiguous_problem(sc)
        active = [e for e, n in enumerate(counts.tolist()) if n]
        io_bytes = (sc["rows"] * K + sc["rows"] * N // 2) * a.element_size()
        bf16_s = bench(lambda: batched_moe_gemm(a, w13, counts, "silu_and_mul", config=None, expected_m=exp_m, validate=False))
        for scheme in progress(schemes, f"schemes of {sc['name']}"):
            plain = quantize_expert_weights(w13, w2, scheme)
            floor_s = (_quant_bytes(plain, "w13", active) + io_bytes) / device["copy_Bps"]   # the checkpoint's bytes
            bm = quant_block_m(plain, exp_m, a.dtype)
            aligned = moe_align_block_size(ids, bm, E)
            fp4 = not QUANT_SCHEME_TABLE[scheme].is_fp8
            for layout in dict.fromkeys(fp4_layouts if fp4 else ("plain",)):
                qw = plain.relayout(layout)
                f_b = lambda: batched_moe_gemm_quant(a, qw, counts, "silu_and_mul", expected_m=exp_m, validate=False)
                f_c = lambda: fused_moe_gemm_quant(x, qw, *aligned, ids.shape[1], bm, "silu_and_mul")
                t_b, t_c = bench(f_b), bench(f_c)
                row = dict(scenario=sc["name"], scheme=scheme, fp4_layout=qw.fp4_layout if fp4 else None,
                           floor_us=floor_s * 1e6,
                           bytes_per_weight=_quant_bytes(plain, "w13", [0]) / (N * K), bf16_batched_us=bf16_s * 1e6,
                           batched_us=t_b * 1e6, batched_pct_floor=100 * floor_s / t_b,
                           contiguous_us=t_c * 1e6, contiguous_pct_floor=100 * floor_s / t_c,
                           batched_graph_us=replay(f_b) * 1e6, contiguous_graph_us=replay(f_c) * 1e6)
                if scheme == "fp8_w8a8_block":               # the other activation path, for the comparison
                    mode = "launch" if Q.FP8_ACT_QUANT == "loop" else "loop"
                    other = "two_launch" if mode == "launch" else "k_loop"
                    with Q.fp8_activation_path(mode):
                        row.update({f"{other}_batched_us": bench(f_b) * 1e6, f"{other}_contiguous_us": bench(f_c) * 1e6,
                                    f"{other}_batched_graph_us": replay(f_b) * 1e6,
                                    f"{other}_contiguous_graph_us": replay(f_c) * 1e6})
                rows.append(row)
            qw = plain = None
        a = w13 = w2 = None
    return rows

def format_bench_quant(rows: list[dict]) -> str:
    """The quantized rows as a text table. Nothing is checked: KeyError for a row without `bench_quant`'s keys.
    Source: moe-lit's own."""
    lines = [f"{'scenario':<24}{'scheme':<16}{'layout':<9}{'B/weight':>9}{'floor us':>10}{'batched us (% floor)':>24}"
             f"{'contiguous us (% floor)':>26}{'bf16 batched us':>17}"]
    for r in rows:
        lines.append(f"{r['scenario']:<24}{r['scheme']:<16}{r.get('fp4_layout') or '-':<9}"
                     f"{r['bytes_per_weight']:>9.3f}{r['floor_us']:>10.1f}"
                     f"{r['batched_us']:>14.1f} ({r['batched_pct_floor']:5.1f}%)"
                     f"{r['contiguous_us']:>16.1f} ({r['contiguous_pct_floor']:5.1f}%){r['bf16_batched_us']:>17.1f}"
                     + (f"   replayed {r['batched_graph_us']:.1f} / {r['contiguous_graph_us']:.1f}"
                        if "batched_graph_us" in r else "")
                     + "".join(f"   {label} {r[key + '_batched_us']:.1f} / {r[key + '_contiguous_us']:.1f}"
                               for key, label in (("two_launch", "two launches"), ("k_loop", "K loop"))
                               if key + "_batched_us" in r))
    return "\n".join(lines)

def plot_bench_quant(runs: dict,                      # {label: bench_quant rows}, oldest first
                     schemes=("mxfp4_w4a16", "nvfp4_w4a16", "fp8_w8a8_block"),
                     fp4_layout: str = "split64",      # a run that timed several FP4 layouts: the bars of this one
                                                       # (a run of one FP4 layout shows it whatever this says)
                    ):
    """Bars: % of the weight-bytes floor per (scenario, scheme), one bar per run and format. Returns the Figure.
    ValueError naming `runs` (not a non-empty dict), `fp4_layout` (not in FP4_LAYOUTS) or `schemes` (a str or empty);
    KeyError for rows without `bench_quant`'s keys. Source: moe-lit's own (matplotlib)."""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not isinstance(runs, dict) or not runs:
        raise ValueError(f"runs: expected a non-empty {{label: bench_quant rows}} dict, got {runs!r:.80}")
    from moe_lit.quant_weights import FP4_LAYOUTS
    check_choice("fp4_layout", fp4_layout, FP4_LAYOUTS)
    if isinstance(schemes, str) or not schemes: raise ValueError(f"schemes: expected a non-empty tuple of scheme names, got {schemes!r}")
    keys = list(dict.fromkeys((r["scenario"], r["scheme"]) for r in next(iter(runs.values())) if r["scheme"] in schemes))
    bars = [(label, fmt) for label in runs for fmt in ("batched", "contiguous")]
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(bars)
    for i, (label, fmt) in enumerate(bars):
        several = len({r.get("fp4_layout") for r in runs[label]} - {None}) > 1
        by_key = {(r["scenario"], r["scheme"]): r for r in runs[label]
                  if not several or r.get("fp4_layout") in (None, fp4_layout)}
        ax.bar([j + i * width for j in range(len(keys))],
               [by_key[k][f"{fmt}_pct_floor"] if k in by_key else 0 for k in keys], width, label=f"{label}, {fmt}")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))],
                  [f"{sc.split(' ')[0]}\n{scheme.split('_')[0]}" for sc, scheme in keys], fontsize=7)
    ax.axhline(100, color="k", lw=0.8, ls="--"); ax.set_ylabel("% of weight-bytes floor (higher is better)")
    ax.set_ylim(0, 110); ax.legend(fontsize=7, ncol=2); ax.set_title("Quantized GEMM1 + SiLU-and-mul at decode", fontsize=9)
    fig.tight_layout(); plt.close(fig)
    return fig

# %%
#| test host_loop_us
calls = []
t = host_loop_us(lambda: calls.append(1), n=10, blocks=3, warmup=2)
test_eq(len(calls), 2 + 3 * 10)
assert 0 < t < 1e6
test_fail(lambda: host_loop_us(lambda: None, n=0), contains="n: expected >= 1, got 0")

# %%
#| test bench_quant_arguments
for bad, msg in (("split64", "fp4_layouts: expected a non-empty tuple"), ((), "fp4_layouts: expected a non-empty tuple"),
                 (None, "fp4_layouts: expected a non-empty tuple"), (("split",), "fp4_layouts: expected one of")):
    test_fail(lambda: bench_quant({}, fp4_layouts=bad), contains=msg)
if not torch.cuda.is_available(): test_fail(lambda: bench_quant({}), contains="device: expected a CUDA GPU for bench_quant")
for runs, kw, msg in (([], {}, "runs: expected a non-empty"), ({"r": []}, dict(fp4_layout="bogus"), "fp4_layout: expected one of"),
                      ({"r": []}, dict(schemes="mxfp4_w4a16"), "schemes: expected a non-empty tuple")):
    test_fail(lambda: plot_bench_quant(runs, **kw), contains=msg)
with tempfile.TemporaryDirectory() as d:                 # --config-dir: refused before anything is measured
    test_fail(lambda: run_bench(config_dir=d), contains="config_dir (--config-dir): expected tune (--tune) with it")
    open(f := os.path.join(d, "afile"), "w").close()
    for bad in (f, os.path.join(d, "missing")):
        test_fail(lambda: run_bench(tune=True, config_dir=bad), contains="config_dir (--config-dir): expected an existing directory")
    os.symlink("loop", loop := os.path.join(d, "loop"))          # a symbolic link to itself
    for bad, msg in ((d, "a file in an existing directory"), (os.path.join(d, "no", "x.json"), "a file in an existing"),
                     (loop, "a file in an existing"), (os.path.join(loop, "x.json"), "a file in an existing"),
                     (os.path.join(f, "x.json"), "a file in an existing"),
                     ("", "a path (a non-empty str or Path"), (3, "a path"), ("a\0b", "a path (a non-empty str or Path without NUL bytes)")):   # before the card
        test_fail(lambda: run_bench(bad), contains=f"out_json (--out): expected {msg}")
    for bad in (5, b"/tmp", loop, ""):
        test_fail(lambda: run_bench(tune=True, config_dir=bad), contains="config_dir (--config-dir): expected")
    test_eq(check_bench_args(os.path.join(d, "x.json"), "fp8"), TUNE_SETS["fp8"])
    sc, cfg = dict(E=8, N=128, rows=64), dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    _save_tile("batched_moe_gemm", sc, cfg, "Some GPU", d)
    _save_tile("batched_moe_gemm", dict(sc, rows=512), dict(cfg, BLOCK_M=64), "Some GPU", d)   # merged into the same file
    p = tile_config_path("batched_moe_gemm", 8, 128, "Some GPU", torch.bfloat16, d)
    test_eq(json.loads(p.read_text()), {"8": cfg, "64": dict(cfg, BLOCK_M=64)})
    for bad, msg in (("[1, 2]", "tile table: expected a JSON object"), ("{not json", "tile table: expected valid JSON")):
        p.write_text(bad)                                # a broken table is named, not overwritten or a traceback
        test_fail(lambda: _save_tile("batched_moe_gemm", sc, cfg, "Some GPU", d), contains=str(p))
        test_fail(lambda: _save_tile("batched_moe_gemm", sc, cfg, "Some GPU", d), contains=msg)

# %% [markdown]
# ## Reading the results

# %%
#| export
def format_bench(report: dict) -> str:
    """The benchmark report as a text table: µs and % of the floor per implementation and scenario.
    Nothing is checked: KeyError for a dict without `run_bench`'s keys. Source: moe-lit's own."""
    d = report["device"]
    lines = [f"{d['device_name']}: copy {d['copy_Bps'] / 1e12:.2f} TB/s (read + write), bf16 matmul "
             f"{d['bf16_flops'] / 1e12:.0f} TFLOP/s; {report['dtype']}, {report['date']}, commit {report['commit']}"]
    for r in report["scenarios"]:
        sc = r["scenario"]
        lines.append(f"\n{sc['name']}: E={sc['E']} K={sc['K']} N={sc['N']} M={sc['M']} rows={sc['rows']}; "
                     f"floor {r['floor_us']:.1f} us ({r['bound']}-bound); tile {r['config']}")
        for name, v in r["results"].items():
            lines.append(f"  {name:<34} {v['us']:10.1f} us  {v['pct_floor']:6.1f}% of floor")
        if r.get("align_us") is not None:
            lines.append(f"  {'(contiguous: moe_align_block_size)':<34} {r['align_us']:10.1f} us  (not in the GEMM time)")
    if report.get("quant"):
        lines += ["", "Quantized GEMM1 + SiLU-and-mul at decode (floor: weight codes + scales + activations at the "
                      "copy bandwidth):", format_bench_quant(report["quant"])]
    if report.get("align"):
        a0 = report["align"][0]
        lines.append(f"\nContiguous layouts at decode ({a0['num_experts']} experts, top-{a0['top_k']}, rank 0 of "
                     f"{a0['num_experts'] // a0['local_experts']}); µs eager / µs replayed as a CUDA graph:")
        lines.append(f"  {'T':<5}{'align':>16}{'pair blocks':>16}{'experts, aligned':>20}{'experts, pair blocks':>24}")
        for a in report["align"]:
            cell = lambda n: f"{a[n + '_us']:.1f} / {a.get(n + '_graph_us', float('nan')):.1f}"
            lines.append(f"  {a['num_tokens']:<5}{cell('align'):>16}{cell('pair_blocks'):>16}"
                         f"{cell('experts_aligned'):>20}{cell('experts_pair_blocks'):>24}")
    return "\n".join(lines)

# %%
#| export
def plot_bench(report: dict):
    """Grouped bars: % of the roofline floor per scenario and implementation. Returns the matplotlib Figure.
    Nothing is checked: KeyError for a dict without `run_bench`'s keys, IndexError for no scenarios. Source: moe-lit's
    own (matplotlib)."""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(report["scenarios"][0]["results"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ax.bar([j + i * width for j in range(len(report["scenarios"]))],
               [r["results"][n]["pct_floor"] for r in report["scenarios"]], width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(report["scenarios"]))],
                  [r["scenario"]["name"].replace(" ", "\n", 1) for r in report["scenarios"]], fontsize=8)
    ax.axhline(100, color="k", lw=0.8, ls="--"); ax.set_ylabel("% of roofline floor (higher is better)")
    ax.set_ylim(0, 130)
    d = report["device"]
    ax.set_title(f"GEMM1, {report['dtype']}, {d['device_name']}, {report['date']}, commit {report['commit']}", fontsize=9)
    ax.legend(fontsize=7, ncol=3); fig.tight_layout(); plt.close(fig)
    return fig

# %% [markdown]
# ## Results on an H200
#
# The committed results (`nbs/bench/batched_and_contiguous_h200_dba5a43.json`, with its log) come from one run of
# `moe-lit bench` at commit dba5a43 on an NVIDIA H200, bf16, 2026-11-29, using the tuned tiles shipped in the
# package's `configs/` for both kernels (found by `moe-lit bench --tune`; the contiguous kernel's sweep is in
# `nbs/bench/batched_and_contiguous_h200_f606edd.json`, the batched prefill sweep in `tune_sweep_prefill_097bb63.json`).

# %%
#| export
def find_bench_results(p) -> Path:
    """A results file by path, else under `nbs/bench/` of the checkout the current directory is in (docs builds move).
    ValueError naming `paths` when neither exists; TypeError from `Path` for a `p` that is not a path. Source: moe-lit's
    own."""
    p = Path(p)
    if p.exists(): return p
    for d in (Path.cwd(), *Path.cwd().parents):
        if (d / "nbs" / "bench" / p.name).exists(): return d / "nbs" / "bench" / p.name
    raise ValueError(f"paths: expected an existing benchmark results file, got {str(p)!r}")

def load_bench_results(*paths) -> dict:
    """Merge committed benchmark JSON files: later files replace earlier ones' scenarios of the same name.
    ValueError naming `paths` (none given, or a later file's scenario the first lacks) or, from `find_bench_results`,
    a file that is not there; json's JSONDecodeError for a file that is not JSON. Source: moe-lit's own."""
    if not paths: raise ValueError("paths: expected at least one benchmark JSON file, got none")
    merged = None
    for p in paths:
        rep = json.loads(find_bench_results(p).read_text())
        if merged is None: merged = dict(rep, scenarios=list(rep["scenarios"]), commit=rep["commit"])
        else:
            names = {r["scenario"]["name"]: i for i, r in enumerate(merged["scenarios"])}
            for r in rep["scenarios"]:
                if r["scenario"]["name"] not in names:
                    raise ValueError(f"paths: {p} has scenario {r['scenario']['name']!r}, which the first file lacks "
                                     f"(expected one of {sorted(names)}): a later file only replaces scenarios")
                merged["scenarios"][names[r["scenario"]["name"]]] = r
            merged["commit"] += "+" + rep["commit"]
    return merged

# %%
#| test load_bench_results_refuses
test_fail(lambda: load_bench_results(), contains="paths: expected at least one benchmark JSON file")
with tempfile.TemporaryDirectory() as d:
    for name, scen in (("a", "x"), ("b", "y")):
        Path(d, f"{name}.json").write_text(json.dumps({"commit": name, "scenarios": [{"scenario": {"name": scen}}]}))
    test_eq(len(load_bench_results(f"{d}/a.json", f"{d}/a.json")["scenarios"]), 1)
    test_fail(lambda: load_bench_results(f"{d}/a.json", f"{d}/b.json"), contains="has scenario 'y', which the first file lacks")

# %%
h200 = load_bench_results("bench/batched_and_contiguous_h200_dba5a43.json")
print(format_bench(h200))

# %%
plot_bench(h200)

# %% [markdown]
# **Interpretation.** Both formats' kernels run every decode row at 98–107% of the floor (batched: DeepSeek-V3
# 100.7%, Qwen3 99.2%, Mixtral 103.6%, gpt-oss 106.5%; contiguous: 99.5%, 99.6%, 101.4%, 105.6%): the weights of the
# experts that have tokens are read once at the card's copy bandwidth, empty experts cost nothing, and the fused
# SiLU-and-mul epilogue costs 0.6–4.5% (Qwen3 192.0 → 193.1 µs, Mixtral 429.0 → 448.3 µs). (Above 100% means the kernel read faster than the copy that defines the floor —
# a copy also writes.) The padded `torch.bmm` pays for its padding rows (89–98%), `torch._grouped_mm` stays near
# 70%, and the per-expert loop collapses when there are many small experts (7% on Qwen3: launch-bound). At prefill,
# compute-bound, the contiguous kernel reaches 90.0% of the floor (the floor uses cuBLAS's 8192³ rate measured in the
# same run, 694 TFLOP/s) with its weight tile read through a tensor descriptor; the batched kernel 87.1%, cuBLAS's
# per-expert loop 89.3%, `torch._grouped_mm` 79.0%. Prefill rows move between runs: the contiguous prefill measured
# 79.0% (f606edd), 90.0% (dba5a43) and 76.7% (5412918, `bench_h200_5412918.log`, a run whose cuBLAS reference rate
# came out at 742 TFLOP/s instead of 685–694, which tightens the floor by 7%); the batched prefill 82.5%, 87.1% and
# 79.7%. At the 80% bar the batched prefill row is met in two runs of three and the contiguous one in one — not
# reliably.
#
# The decode table at the end separates what a Python caller pays (eager, launches included) from what the GPU does
# (the same calls replayed as a CUDA graph). On the GPU `moe_align_block_size` costs 8.8 µs and the one-launch
# pair-block layout 1.1 µs at every T = 1…16; eager, the alignment's four launches cost 70–200 µs of host time
# against 4–38 µs — launch overhead dominates unless the step is captured in a graph, as serving engines do. For the
# whole experts stage of rank 0 (graph replay), pair blocks win at T = 1, 2, 4 (72 vs 85, 88 vs 100, 94 vs 100 µs)
# and lose from T = 8 on (289 vs 281, 546 vs 476 µs), when pairs start to share experts and a shared expert's
# weights are read once per pair: `TritonExperts` switches at 32 pairs (T = 4 at top-8).

# %% [markdown]
# ### Quantized weights at decode, H200
#
# `nbs/bench/quant_bench_h200_swapab.json` (same card, 2026-12-03, the FP4 loop with swapped operands and the FP4
# tile tables of `moe-lit bench --tune w4a16`): GEMM1 + SiLU-and-mul of the quantized kernels against the
# weight-bytes floor, with the bf16 batched kernel of the same run for comparison. The run before the swap is
# `quant_bench_h200_498b446.json`.

# %%
quant = json.loads(find_bench_results("bench/quant_bench_h200_swapab.json").read_text())
print(format_bench_quant(quant["quant"]))

# %% [markdown]
# The FP4 history in one figure, both formats: the even/odd loop (`498b446`), the swapped operands with tuned tiles
# (`swapab`), the packed PTX decode with tiles re-tuned for it (`ptx`, `quant_bench_h200_ptx_8b4f333.json`), and the
# split64 layout with its own tiles (`split64`, `quant_bench_h200_split_3a67d16.json`), and the mma128 layout with the
# scale prefetch and its own tiles (`mma128`, `quant_bench_h200_mma128_8dcf083.json`) — the layer's path today.
# FP8 block's kernel is the same in every run; its times moved with the launch path around it (the per-call checks,
# `12_layer`'s "Checked once") and from run to run: Qwen3 contiguous 227, 283, 167, 147, 129 µs across the five runs.
# A file's name gives the commit it measured: the `commit` recorded inside a few older results is the copied tree's
# stale HEAD, from before the GPU scripts took `REV` (`MOE_LIT_COMMIT`): 67966ba in `quant_bench_h200_mma128_8dcf083.json`
# and `quant_bench_h200_prefetch_21d206f.json`, 17c0889 in `layer_bench_h200_8a184b7.json`.

# %%
load_quant = lambda name: json.loads(find_bench_results(f"bench/{name}").read_text())["quant"]
runs = {"498b446": load_quant("quant_bench_h200_498b446.json"), "swapab": quant["quant"],
        "ptx": load_quant("quant_bench_h200_ptx_8b4f333.json"), "split64": load_quant("quant_bench_h200_split_3a67d16.json"),
        "mma128": load_quant("quant_bench_h200_mma128_8dcf083.json")}
fig = plot_bench_quant(runs)
test_eq(len(fig.axes[0].patches), 10 * 12)       # 5 runs x 2 formats, 4 scenarios x 3 schemes
want = [r["batched_pct_floor"] for r in runs["mma128"] if r["scheme"] in ("mxfp4_w4a16", "nvfp4_w4a16", "fp8_w8a8_block")]
test_close(sorted(b.get_height() for b in fig.axes[0].patches[-24:-12]), sorted(want))   # a one-layout run: its bars
both = load_quant("quant_bench_h200_split_7a54c45.json")                  # plain and split64 rows in one run
for layout in ("plain", "split64"):
    want = [r["batched_pct_floor"] for r in both if r["fp4_layout"] == layout and r["scheme"] == "mxfp4_w4a16"]
    got = [b.get_height() for b in plot_bench_quant({"run": both}, ("mxfp4_w4a16",), layout).axes[0].patches[:len(want)]]
    test_close(got, want)                                                   # the layout asked for, not the last row
fig

# %% [markdown]
# **Interpretation.** FP8 w8a8 reads half the bytes of bf16 and runs 1.5–1.8× faster than the bf16 kernel on the
# large decode rows (DeepSeek-V3 contiguous 260 vs 473 µs, 86% of its floor; Mixtral 271 µs, 82%; gpt-oss 605 µs,
# 82%, in the table's run); on Qwen3-30B-A3B, whose GEMM is small (95 µs floor), the separate activation-quantization launch and the
# 16-row tiles leave it at 34–57% in that run (58–74% in the figure's last, mma128's) (the contiguous row moved from 227 to 283 µs between two runs of unchanged FP8
# code: at 4 rows per expert the time is launch- and tail-bound). The FP4 w4a16 kernels are **not yet fast**: in the
# table above (`swapab`) 19–27% of their floor (17% for NVFP4 contiguous on gpt-oss), about as slow as bf16 although
# they read 0.53–0.56 bytes per weight; with the PTX decode and the split64 layout 28–42%, 1.02–1.55× faster than the
# bf16 batched GEMM of the same run; with mma128 (the figure's last run) 33–55%. They are bound by the per-element dequantization in the K loop, not by memory: every weight
# element is decoded, scaled and converted once per program, and at decode there is one M tile per expert, so
# nothing amortizes it. The history: the first version (interleaved nibbles, arithmetic decode, the scale applied
# through a reshaped weight tile) measured 6.6–11% (`bench_h200_5412918.log`); even/odd dots with fp16 bit-field
# decoding 14–22% (`quant_bench_h200_498b446.json`); the weights as the left operand of the MMA (decoded in
# registers, no activation split) with tuned tiles 19–27% (the table's run); the packed PTX decode of
# `09c_kernels.quant` (eight codes per 32-bit word) with tiles re-tuned for it 21–39% (`ptx`); the split64 layout,
# which drops the nibble interleave from the K loop, 28–42% (`split64`); the mma128 layout, whose words decode
# straight into the MMA's registers (no shared-memory round trip of the decoded tile), with the scales loaded a tile
# ahead, 33–55% (`mma128`), its batched rows 1.38–2.0× faster than the bf16 batched GEMM of its run (DeepSeek-V3's
# contiguous rows 1.26–1.29×). The rest — 1.8–3.0× to the floor —
# is the decode's own instructions (about half the K loop, counted in `09c`'s Performance) and the second weight
# read of experts that need two M tiles; Blackwell's native FP4 tensor cores would remove the first. Open work.

# %% [markdown]
# ### Quantized weights at decode, H100
#
# `nbs/bench/quant_bench_h100_630ba9b.json` (an H100 80GB HBM3, 2026-12-06, every quantized kernel on the H100 tables
# tuned that day: FP4 by `quant_gpu.sh tune w4a16` at 1fe07b0, FP8 by `tune fp8` at 630ba9b). FP8's rows run the
# layer's default path, a quantizer launch and then the GEMM; "K loop" times the same GEMMs quantizing in their K loop
# instead (`09c`), slower on every row. FP4 is 53–66 % of its floor batched and 52–58 % contiguous; FP8 83–91 %
# batched except Qwen3 (65 %), 87–92 % contiguous (replayed 85–95 %). Nsight Compute's reading of the FP4 loop on the
# same card is in `09c`'s Performance. That chapter also has the FP8 rows after the batched quantizer's fix (Qwen3
# batched 194 → 150 µs replayed), from `bench_quant` at b7a0fbc:

# %%
quant_h100 = json.loads(find_bench_results("bench/quant_bench_h100_630ba9b.json").read_text())
print(format_bench_quant(quant_h100["quant"]))
test_eq(quant_h100["device"]["device_name"], "NVIDIA H100 80GB HBM3")

# %%
fp8_h100 = json.loads(find_bench_results("bench/quant_bench_fp8_h100_b7a0fbc.json").read_text())
print(format_bench_quant(fp8_h100["quant"]))
test_eq({r["scheme"] for r in fp8_h100["quant"]}, {"fp8_w8a8_block"})

# %% [markdown]
# The FP8 tiles re-tuned on the H100 at 26b1797 (`python nbs/bench/tune_quant.py OUT fp8`, 103 s with the bench after
# it; `tune_quant_fp8_h100_26b1797.json`, `quant_bench_fp8retune_h100_26b1797.json`) changed nothing worth a table
# edit: on each of the eight decode call sites the table's tile was the sweep's best or within 2.3 % of it (the
# largest gap, Qwen3's contiguous GEMM, 158.6 against 154.9 µs), under the run-to-run noise of these rows. That
# machine ran the unchanged bf16 batched GEMM 3.5 % slower than b7a0fbc's (644.7 against 622.7 µs, DeepSeek-V3), and
# FP8, replayed with the sweep's best tiles, at 87–93 % of the floor batched and 89–91 % contiguous, against 89–96 %
# and 89–95 % at b7a0fbc with the tables' tiles: the rows near 90 % (Qwen3 batched, gpt-oss contiguous, 89 % there)
# move across it with the card, not with the tile.

# %%
retune = json.loads(find_bench_results("bench/tune_quant_fp8_h100_26b1797.json").read_text())
test_eq(len(retune["sweeps"]), 8)                 # 4 decode scenarios x (batched, contiguous)
print(format_bench_quant(json.loads(find_bench_results("bench/quant_bench_fp8retune_h100_26b1797.json").read_text())["quant"]))

# %% [markdown]
# ### Split-K at decode, H200
#
# When a decode batch reaches one or a few experts, each expert GEMM is a grid of a few dozen programs on a 132-SM
# card, and the split-K axis of `06` divides each program's K loop. `nbs/bench/split_k_sweep.py` times every expert
# GEMM of four models (GEMM1 with SiLU and GEMM2, batched format, one row on each of 1 or 4 active experts of 8) at
# `SPLIT_K` 1, 2, 4 and 8 as CUDA-graph replays, in bf16 and three quantized schemes
# (`split_k_sweep_h200_0c2b3a1.json`). Below, for each GEMM: unsplit, the best split, and the split the launchers
# choose today (`split_k_factor` with each kernel's target: 4 programs an SM for FP4, half an SM for bf16 and FP8).

# %%
sweep = json.loads(find_bench_results("bench/split_k_sweep_h200_0c2b3a1.json").read_text())
dims = {name: (PRESETS[key].hidden_size, PRESETS[key].intermediate_size) for name, key in
        (("DeepSeek-V3", "deepseek-v3"), ("Qwen3-30B-A3B", "qwen3-30b-a3b"), ("Mixtral-8x7B", "mixtral-8x7b"),
         ("gpt-oss-120b", "gpt-oss-120b"))}
groups = {}
for r in sweep["rows"]: groups.setdefault((r["model"], r["scheme"], r["gemm"], r["active"]), []).append(r)
table = []
for (model, scheme, gemm, active), rs in groups.items():
    H, I = dims[model]
    K, n_out = (H, I) if gemm == "w13" else (I, H)
    tile, us = rs[0]["tile"], {r["split_k"]: r["us"] for r in rs}
    family = "16-bit" if scheme == "bf16" else "fp8" if QUANT_SCHEME_TABLE[scheme].is_fp8 else "fp4"
    target = SPLIT_K_PROGRAMS_PER_SM[family]
    pick = split_k_factor(-(-n_out // tile["BLOCK_N"]), active, -(-K // tile["BLOCK_K"]), sweep["num_sms"], target)
    best = min(us, key=us.get)
    table.append((model, scheme, gemm, active, rs[0]["floor_us"], us[1], best, us[best], pick, us[pick]))
print(f"{'model':<14}{'scheme':<16}{'gemm':<5}{'active':>7}{'floor':>7}{'S=1':>8}{'best':>12}{'chosen':>12}{'vs S=1':>8}")
for m, sc, g, a, fl, u1, b, ub, p, up in table:
    print(f"{m:<14}{sc:<16}{g:<5}{a:>7}{fl:>7.1f}{u1:>8.1f}{ub:>8.1f} S={b}{up:>8.1f} S={p}{u1 / up:>7.2f}x")
ratio = [up / ub for *_, ub, p, up in table]
gain = [u1 / up for *_, u1, b, ub, p, up in table]
print(f"chosen / best: median {sorted(ratio)[len(ratio) // 2]:.2f}, worst {max(ratio):.2f}; "
      f"speed-up over S=1: best {max(gain):.2f}x, worst {min(gain):.2f}x")
test_eq(len(table), 4 * 4 * 2 * 2)                # 4 models x 4 schemes x 2 GEMMs x 2 active counts

# %% [markdown]
# **Interpretation.** Splitting pays where the grid is small and K is long: one DeepSeek-V3 expert's GEMM1 (32
# programs of 64 rows, 56 K tiles) drops from 54–58 µs to 23–25 µs in FP4 and from 57 to 28 µs in bf16; Qwen3's FP4
# GEMM1 from 17–19 to 9 µs; Mixtral's FP4 GEMM2 for one expert from 58–65 to 31–32 µs. Where the grid already
# covers the card it costs: DeepSeek-V3's bf16 GEMM2 for one expert (112 programs) reads at its floor unsplit (7.0
# µs for 6.9) and takes 12.6 µs in two splits — each split is a program more to schedule and an fp32 partial tile to
# write and re-read, and the batched grid also repeats the programs of empty experts once per split. The targets
# above are read off this table. Even split, a one-expert FP4 GEMM stays far from its floor (24 µs for 3.7): a few
# programs per SM cannot hide the decode chain's latency, the remaining gap of issue-bound FP4 decode at small
# grids. In the whole layer (the seed scenario, `seed_scenario_h200_0c2b3a1.json`: DeepSeek-V3 EP8 rank 0, nixl_ep,
# CUDA-graph replays at T = 1) the quantized GEMMs of one token went from 93 to 41–43 µs (`profile_seed_t1_*.log`)
# and the layer from 124–143 µs to 95–106 µs.
