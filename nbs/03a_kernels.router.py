# %%
#| default_exp kernels.router

# %% [markdown]
# # The router kernel
# > Every routing method of 03_routing — softmax or sigmoid scores, the correction bias, grouped top-k, renormalisation, routed scaling, Llama-4's top-1 sigmoid — in one Triton launch per batch, and at decode the router GEMV before it in one more, with the torch routers as its spec.

# %%
#| export
from __future__ import annotations
import torch
import triton
import triton.language as tl
from dataclasses import dataclass
from moe_lit.terms import check_tensor, check_int, check_choice, check_bool, check_positive_real, check_finite
from moe_lit.config import MoEConfig
from moe_lit.kernels.batched import check_kernel_device, launch_kernel
from moe_lit.kernels.batched import _next_pow2, _cdiv, _last_to_arrive, _await_producers
from moe_lit.routing import ungroupable_reason, matmul_acc, warn_grouped_fallback

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.kernels.batched import DEVICE, INTERPRET
from moe_lit.routing import select_experts, router_logits, RoutingFallbackWarning
import warnings
from moe_lit.kernels.router import _router_logits_kernel, _route_tokens, ROUTER_BLOCK_K, ROUTER_SELECT_MAX_TOKENS
import dataclasses
from moe_lit.testing import assert_close, record_launches, assert_compiles_for_gpu

# %% [markdown]
# In this notebook: `route_topk` (kernel `_route_topk_kernel`), the routers of `03_routing` fused into one launch,
# and `route_tokens` (kernel `_router_logits_kernel` before it), the logits from hidden states at decode.
# Motivation → kernel → logits at decode → launcher → tests against the torch routers.
#
# ## Motivation
#
# The torch routers of `03_routing` are the definition: float32 scores, a stable sort so that ties go to the lower
# expert id, NaN rows routed to experts `0..top_k-1` with weight 0. They are also a dozen launches (softmax, `isnan`,
# `masked_fill`, sort, gathers, sums, the group reduction) — at decode, where the experts of one token take a few
# microseconds, routing that way costs more than the experts. One program per token can do all of it in registers:
# a token's row of scores fits in one block (up to `ROUTER_MAX_EXPERTS` = 65536 experts).
#
# ## The kernel
#
# ```
# for each token t (one program):
#     x = logits[t, :]                               (fp32; lanes past num_experts are not experts)
#     invalid = any(score is NaN)                     (the whole row is then routed to 0..top_k-1 with weight 0)
#     score = softmax(x) | sigmoid(x) | x (llama4)
#     choice = score + bias                           (selection only; the weight is the unbiased score)
#     if grouped: keep the topk_group best groups     (a group's score: its max, or the sum of its top 2 with a bias)
#     repeat top_k times: take the largest available choice, ties to the lower id; mark it taken
#     weights = score[ids] (or sigmoid(x[ids]) for llama4), renormalised, times routed_scaling_factor
# ```
#
# Selection by repeated arg-max is exact: the same comparisons as a stable sort, `top_k` times. (The ids equal the
# torch router's except where two scores differ by about one ulp: Triton's `exp` and torch's may round such a pair
# into a tie on one side only, and the tie then goes to the lower id on that side.) "Available" is a
# mask, not a `-inf` fill, so that a legitimate `-inf` logit (Llama-4 selects on raw logits) still ranks above the
# lanes that are not experts and the experts of dropped groups.

# %%
#| export
@triton.jit
def _take_max(choice, avail, offs, BLOCK_E: tl.constexpr):
    "Index of the largest available entry, ties to the lower index (every lane available counts, -inf included)."
    best = tl.max(tl.where(avail, choice, float("-inf")), axis=0)
    return tl.min(tl.where(avail & (choice == best), offs, BLOCK_E), axis=0)

@triton.jit
def _route_topk_kernel(
    logits_ptr,          # [SPLIT, T, E] fp32/bf16/fp16 router logits, or SPLIT partial sums of them (summed here)
    bias_ptr,            # [E] fp32 correction bias (HAS_BIAS)
    gate_bias_ptr,       # [E] the router's own bias, added to the logits (HAS_GATE_BIAS: gpt-oss)
    weights_ptr,         # [T, TOP_K] fp32 out
    ids_ptr,             # [T, TOP_K] int32/int64 out
    E, stride_s, stride_t, scale,
    TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr,   # K_PAD: TOP_K to a power of two
    SCORING: tl.constexpr,      # 0 softmax, 1 sigmoid, 2 llama4 (select on logits, weight sigmoid(logit))
    HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
    NUM_GROUPS: tl.constexpr, G_PAD: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr,
    TOP2: tl.constexpr,         # a group's score is the sum of its top 2 (else its max)
    SPLIT: tl.constexpr = 1, HAS_GATE_BIAS: tl.constexpr = False,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    """One token's routing: program t sums the SPLIT planes of its logits row (plus the gate bias), scores it, selects
    its TOP_K experts and stores their weights and ids (`_select_token`).

    grid = (T,), one program per token (launched only when T > 0); no program exits early.
    Constexprs: `TOP_K` experts a token; `K_PAD` TOP_K to a power of two (lanes past TOP_K never stored);
    `BLOCK_E` max(next_pow2(E), 16), a token's row in one block; `SCORING` 0 softmax, 1 sigmoid, 2 llama4;
    `HAS_BIAS` add the correction bias for selection; `RENORMALIZE` weights divided by their sum (when > 0);
    `NUM_GROUPS` expert groups (1: no grouping); `G_PAD` NUM_GROUPS to a power of two; `TOPK_GROUP` groups kept;
    `GROUP_SIZE` E / NUM_GROUPS; `TOP2` a group's score is its top-2 sum (else its max); `SPLIT` logits planes summed
    (1: plain [T, E] logits); `HAS_GATE_BIAS` add the router's own bias to the logits; `PDL` programmatic dependent
    launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    _select_token(logits_ptr, bias_ptr, gate_bias_ptr, weights_ptr, ids_ptr, tl.program_id(0).to(tl.int64), E,
                  stride_s, stride_t, scale, TOP_K, K_PAD, BLOCK_E, SCORING, HAS_BIAS, RENORMALIZE, NUM_GROUPS, G_PAD,
                  TOPK_GROUP, GROUP_SIZE, TOP2, SPLIT, HAS_GATE_BIAS)

@triton.jit
def _select_token(logits_ptr, bias_ptr, gate_bias_ptr, weights_ptr, ids_ptr,   # as `_route_topk_kernel`'s
                  t,                                                        # the token (int64)
                  E, stride_s, stride_t, scale,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_E: tl.constexpr, SCORING: tl.constexpr,
                  HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr, NUM_GROUPS: tl.constexpr, G_PAD: tl.constexpr,
                  TOPK_GROUP: tl.constexpr, GROUP_SIZE: tl.constexpr, TOP2: tl.constexpr, SPLIT: tl.constexpr,
                  HAS_GATE_BIAS: tl.constexpr):
    "One token's selection: its top_k weights and ids stored (the body of `_route_topk_kernel`, one program's work)."
    offs = tl.arange(0, BLOCK_E)
    is_expert = offs < E
    x = tl.load(logits_ptr + t * stride_t + offs, mask=is_expert, other=float("-inf")).to(tl.float32)
    for s in tl.static_range(1, SPLIT):                  # the K slices' partial logits, summed in slice order
        x += tl.load(logits_ptr + s * stride_s + t * stride_t + offs, mask=is_expert, other=0.0)
    if HAS_GATE_BIAS: x += tl.load(gate_bias_ptr + offs, mask=is_expert, other=0.0).to(tl.float32)
    if SCORING == 0:
        e = tl.exp(x - tl.max(x, axis=0))
        score = e / tl.sum(e, axis=0)
    elif SCORING == 1:
        score = tl.sigmoid(x)
    else:
        score = x
    nan = is_expert & (score != score)
    if SCORING == 2: nan = is_expert & (x != x)
    invalid = tl.sum(nan.to(tl.int32), axis=0) > 0
    choice = score
    if HAS_BIAS: choice = choice + tl.load(bias_ptr + offs, mask=is_expert, other=0.0)
    choice = tl.where(invalid, 0.0, choice)              # an invalid row: every expert ties -> ids 0..top_k-1
    choice = tl.where(choice != choice, float("-inf"), choice)   # a NaN correction bias (unchecked): never chosen
    avail = is_expert
    if NUM_GROUPS > 1:                                   # keep the TOPK_GROUP best groups (ties: lower group)
        group = offs // GROUP_SIZE
        g_offs = tl.arange(0, G_PAD)
        g_score = tl.full((G_PAD,), float("-inf"), tl.float32)
        for g in tl.static_range(NUM_GROUPS):
            in_g = is_expert & (group == g)
            first = _take_max(choice, in_g, offs, BLOCK_E)
            s = tl.max(tl.where(in_g, choice, float("-inf")), axis=0)
            if TOP2: s = s + tl.max(tl.where(in_g & (offs != first), choice, float("-inf")), axis=0)
            g_score = tl.where(g_offs == g, s, g_score)
        g_avail = g_offs < NUM_GROUPS
        for _ in tl.static_range(TOPK_GROUP):
            g_best = _take_max(g_score, g_avail, g_offs, G_PAD)
            g_avail = g_avail & (g_offs != g_best)
        kept = offs < 0                                  # all False
        for g in tl.static_range(NUM_GROUPS):
            chosen = tl.sum(tl.where((g_offs == g) & g_avail, 1, 0), axis=0) == 0   # taken, so no longer available
            kept = kept | ((group == g) & chosen)
        avail = avail & kept
    ids = tl.zeros((K_PAD,), tl.int32)
    w = tl.zeros((K_PAD,), tl.float32)
    k_offs = tl.arange(0, K_PAD)
    for k in tl.static_range(TOP_K):
        i = _take_max(choice, avail, offs, BLOCK_E)
        avail = avail & (offs != i)
        wi = tl.sum(tl.where(offs == i, score, 0.0), axis=0)
        if SCORING == 2: wi = tl.sigmoid(wi)
        ids = tl.where(k_offs == k, i, ids)
        w = tl.where(k_offs == k, wi, w)
    w = tl.where(invalid, 0.0, w)
    if RENORMALIZE:
        total = tl.sum(w, axis=0)
        w = tl.where(total > 0, w / total, w)
    tl.store(weights_ptr + t * TOP_K + k_offs, w * scale, mask=k_offs < TOP_K)
    tl.store(ids_ptr + t * TOP_K + k_offs, ids.to(ids_ptr.dtype.element_ty), mask=k_offs < TOP_K)

# %% [markdown]
# ## The logits at decode
#
# The logits `hidden · gateᵀ` are a GEMV at decode: one or a few rows against a router weight of `num_experts ×
# hidden_size` (3.7 MB in bf16 for DeepSeek-V3, 7.3 MB in fp32). cuBLAS serves it with a copy of `hidden` to fp32
# (when the gate is fp32), a GEMV or at T = 2 a SIMT GEMM plus a split-K reduction, and then the selection kernel runs:
# three or four launches and 10–26 µs on an H200 for DeepSeek-V3 at T = 1–2 (`nbs/bench/profile_small_t_h200_016c6b0.log`),
# where reading the weight takes about 1–2 µs. `_router_logits_kernel` reads the weight once, spread over the whole GPU:
#
# ```
# for each block of BLOCK_EL experts and each K slice of ROUTER_BLOCK_K columns (one program):
#     w = gate[experts, slice]                         (one load, fp32 in registers; bf16 or fp32 as stored)
#     for each token t < T (unrolled to T_PAD, a power of two ≤ ROUTER_GEMV_MAX_TOKENS):
#         partial[slice, t, experts] = Σ_slice w · hidden[t, slice]     (fp32 products and sum)
# ```
#
# and the selection kernel sums the slices' partials in slice order (a fixed order: the logits are the same bits
# every run) and adds the router's own bias, before selecting as above. Two launches, no copy of `hidden`.
#
# **One launch at decode.** Up to `ROUTER_SELECT_MAX_TOKENS` tokens the selection needs no launch of its own: each
# logits program counts itself in on an arrival counter after its stores (`06_kernels.batched._last_to_arrive`, an
# acquire-release atomic after a barrier, the pattern of split-K), and the program that arrives last — when every
# partial is in — runs `_select_token` for each token in turn and sets the counter back to 0. The selection code is
# the same function the selection kernel runs, on the same partials in the same order: the same bits. The counter
# must be 0 before the launch and nobody else's: the layer keeps one (so one forward of a layer runs at a time), and
# the public `route_tokens` takes two launches. Past a few tokens the serial selections in one program would cost
# more than the launch they save.
#
# It saves host time, not GPU time. In CUDA-graph replays on an H200 the two launches are the faster
# (`nbs/bench/profile_small_t_sel0_h200_6f16892.log` against `…_sel2_…`, the selection in its own launch against in the
# logits launch up to 2 tokens): Qwen3-30B-A3B 40.7 against 42.3 µs at T = 1 and 60.9 against 66.1 at T = 2,
# DeepSeek-V3 EP8 (nixl_ep) 54.5 against 58.1 at T = 1 — one program's serial selection, with the block's
# cross-warp reductions, takes longer than a one-warp kernel of its own, and a launch inside a graph costs about
# nothing. In eager the host is the bottleneck (each launch is several µs of Python and driver time), so the layer
# selects in the logits launch in eager and in a kernel of its own while a graph is captured (`_route_tokens` decides,
# by `ROUTER_SELECT_IN_GRAPHS`).
# The products are fp32 products of the stored values, as `03_routing.matmul_acc` defines them; only the order of the
# sum differs from cuBLAS's. Past `ROUTER_GEMV_MAX_TOKENS` tokens the weight is re-read per token block and a GEMM
# is the better tool: the logits come from `matmul_acc` (one cuBLAS call), and only the bias moves into the selection.
#
# Measured in CUDA-graph replays of the whole layer on an H200 (`nbs/bench/profile_small_t.py`, logs
# `profile_small_t_h200_016c6b0.log` before and `profile_small_t_h200_1839958.log` after; the benchmark's gate fp32
# before, bf16 after): DeepSeek-V3 at T = 1, copy 3.6 + GEMV 6.7 + selection 4.4 µs → logits 2.7 + selection 4.8;
# at T = 2, 3.9 + 12.3 + 5.1 + 4.3 → 3.1 + 4.8. Qwen3-30B-A3B at T = 1, 3.1 + 2.8 + 1.6 + 2.4 → 1.7 + 2.5. The
# selection of DeepSeek-V3 (grouped, with a correction bias) is the larger of the two.

# %%
#| export
ROUTER_MAX_EXPERTS = 65536      # a token's scores are one block of registers (Triton's blocks hold at most 2^20)
ROUTER_BLOCK_K = 1024           # columns of one program's K slice in the decode logits kernel
ROUTER_GEMV_MAX_TOKENS = 16     # at most this many tokens take `_router_logits_kernel`; more take one cuBLAS GEMM
ROUTER_TARGET_PROGRAMS = 256    # the logits grid grows its expert blocks down to 1 expert until it has this many
ROUTER_SELECT_MAX_TOKENS = 2    # at most this many tokens are selected in the logits launch's last program
ROUTER_SELECT_IN_GRAPHS = False  # also while a CUDA graph is captured (else a graph selects in a launch of its own)

@triton.jit
def _router_logits_kernel(
    hidden_ptr,          # [T, H] bf16/fp16/fp32, unit stride along H
    gate_ptr,            # [E, H] bf16/fp16/fp32 router weight, unit stride along H
    out_ptr,             # [SPLIT, T, E] fp32 partial logits: slice s of K in plane s
    T, E, H, stride_ht, stride_ge,
    T_PAD: tl.constexpr, BLOCK_EL: tl.constexpr, BLOCK_K: tl.constexpr,
    # SELECT: the program that finishes last also selects (`_select_token`, each token in turn), one launch in all
    count_ptr=None,      # [1] int32 arrival counter, 0 before the launch and after it (SELECT)
    bias_ptr=None, gate_bias_ptr=None, weights_ptr=None, ids_ptr=None, scale=1.0,   # as `_route_topk_kernel`'s
    SELECT: tl.constexpr = False, TOP_K: tl.constexpr = 1, K_PAD: tl.constexpr = 1, BLOCK_E: tl.constexpr = 1,
    SCORING: tl.constexpr = 0, HAS_BIAS: tl.constexpr = False, RENORMALIZE: tl.constexpr = False,
    NUM_GROUPS: tl.constexpr = 1, G_PAD: tl.constexpr = 1, TOPK_GROUP: tl.constexpr = 1, GROUP_SIZE: tl.constexpr = 1,
    TOP2: tl.constexpr = False, SPLIT: tl.constexpr = 1, HAS_GATE_BIAS: tl.constexpr = False,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    """The decode router GEMV: program (b, s) multiplies experts [b·BLOCK_EL, (b+1)·BLOCK_EL) of the gate by columns
    [s·BLOCK_K, (s+1)·BLOCK_K) of each of the T hidden rows and stores the fp32 partial logits in plane s of `out`.
    With SELECT the program that arrives last then selects every token in turn (`_select_token` on the partials).

    grid = (cdiv(E, BLOCK_EL), cdiv(H, ROUTER_BLOCK_K)), launched by `_route_tokens` for 0 < T <= ROUTER_GEMV_MAX_TOKENS
    and H > 0; no program exits early (experts past E and tokens past T are masked).
    Constexprs: `T_PAD` next_pow2(T), the unrolled token loop; `BLOCK_EL` experts a program (8, 4, 2 or 1:
    `_router_block_el`); `BLOCK_K` columns of a K slice (ROUTER_BLOCK_K = 1024); `SELECT` the last program also selects
    (`_route_tokens`: up to ROUTER_SELECT_MAX_TOKENS tokens, with the caller's counter); with SELECT, `TOP_K`, `K_PAD`,
    `BLOCK_E`, `SCORING`, `HAS_BIAS`, `RENORMALIZE`, `NUM_GROUPS`, `G_PAD`, `TOPK_GROUP`, `GROUP_SIZE`, `TOP2`, `SPLIT`
    (= grid axis 1, the planes summed) and `HAS_GATE_BIAS` as `_route_topk_kernel`'s (unused without SELECT); `PDL`
    programmatic dependent launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    offs_e = tl.program_id(0) * BLOCK_EL + tl.arange(0, BLOCK_EL)
    s = tl.program_id(1)
    offs_k = s * BLOCK_K + tl.arange(0, BLOCK_K)
    e_ok, k_ok = offs_e < E, offs_k < H
    w = tl.load(gate_ptr + offs_e.to(tl.int64)[:, None] * stride_ge + offs_k[None, :],
                mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)          # [BLOCK_EL, BLOCK_K]
    for t in tl.static_range(T_PAD):                     # unrolled: every token's row load is issued at once
        x = tl.load(hidden_ptr + tl.cast(t, tl.int64) * stride_ht + offs_k, mask=tl.where(t < T, k_ok, False),   # int64: a
                    other=0.0).to(tl.float32)                                         # strided view may pass 2^31
        p = tl.sum(w * x[None, :], axis=1)               # [BLOCK_EL]
        tl.store(out_ptr + (s * T + t).to(tl.int64) * E + offs_e, p, mask=tl.where(t < T, e_ok, False))
    if SELECT:
        if _last_to_arrive(count_ptr, tl.num_programs(0) * tl.num_programs(1)):   # every partial is in
            for row in range(T):
                _select_token(out_ptr, bias_ptr, gate_bias_ptr, weights_ptr, ids_ptr, tl.cast(row, tl.int64), E, T * E,
                              E, scale, TOP_K, K_PAD, BLOCK_E, SCORING, HAS_BIAS, RENORMALIZE, NUM_GROUPS, G_PAD,
                              TOPK_GROUP, GROUP_SIZE, TOP2, SPLIT, HAS_GATE_BIAS)

# %% [markdown]
# ## The launcher
#
# `route_topk` takes the config's routing method and its options, resolved once by `router_plan` (the grouped
# fall-back to plain top-k when the experts cannot be split, said once there with the `RoutingFallbackWarning` that
# `03_routing.grouped_topk` gives on each call) — so the hot path
# checks only the shapes and dtypes of its arguments, never their values. The correction bias is checked finite once,
# by whoever owns it (the layer, at construction).
#
# `tl.arange` needs a power of two: a `top_k` that is not one (6 in DeepSeek-V2-Lite, 10 in Qwen3-Next) runs in
# registers of the next power of two, with the extra lanes left 0 and never stored.

# %%
#| export
@dataclass(frozen=True)
class RouterPlan:
    """A config's routing method as the router kernel's constants (made by `router_plan`, once per layer). ValueError
    on construction naming the field: `num_experts` (not in [1, ROUTER_MAX_EXPERTS]), `TOP_K`, `SCORING` (not 0, 1 or
    2), a flag not a bool, `NUM_GROUPS`, `TOPK_GROUP`, `GROUP_SIZE` (not E / NUM_GROUPS), `scale` or an impossible
    `TOP2`. Source: moe-lit's own (the rules of vLLM's `fused_topk` and `grouped_topk` as kernel constants)."""
    num_experts: int
    TOP_K: int
    SCORING: int            # 0 softmax, 1 sigmoid, 2 llama4
    HAS_BIAS: bool
    RENORMALIZE: bool
    NUM_GROUPS: int         # 1: no groups (also the grouped fall-back)
    TOPK_GROUP: int
    GROUP_SIZE: int
    TOP2: bool              # a group's score is its top-2 sum (with a correction bias)
    scale: float            # routed_scaling_factor (1 for llama4)

    def __post_init__(self):   # the kernel trusts these constants: a plan made by hand is checked like one from a config
        E = check_int("num_experts", self.num_experts, lo=1)
        if E > ROUTER_MAX_EXPERTS:                                    # a row is one Triton block
            raise ValueError(f"num_experts: expected at most {ROUTER_MAX_EXPERTS} for the Triton router (a token's "
                             f"scores are one block of registers; the torch router has no such limit), got {E}")
        check_int("TOP_K", self.TOP_K, lo=1, hi=E + 1); check_choice("SCORING", check_int("SCORING", self.SCORING), (0, 1, 2))
        for n in ("HAS_BIAS", "RENORMALIZE", "TOP2"): check_bool(n, getattr(self, n))
        g = check_int("NUM_GROUPS", self.NUM_GROUPS, lo=1, hi=E + 1)
        check_int("TOPK_GROUP", self.TOPK_GROUP, lo=1, hi=g + 1)
        if g * check_int("GROUP_SIZE", self.GROUP_SIZE, lo=1) != E:
            raise ValueError(f"GROUP_SIZE: expected num_experts / NUM_GROUPS = {E} / {g}, got {self.GROUP_SIZE}")
        if self.TOP_K > self.TOPK_GROUP * self.GROUP_SIZE:
            raise ValueError(f"TOP_K: expected <= TOPK_GROUP * GROUP_SIZE = {self.TOPK_GROUP * self.GROUP_SIZE}, got {self.TOP_K}")
        check_positive_real("scale", self.scale, fp32=True)
        if self.TOP2 and not (self.HAS_BIAS and g > 1 and self.GROUP_SIZE >= 2):      # a group's top-2 needs two experts
            raise ValueError(f"TOP2: expected True only with a correction bias, groups and >= 2 experts a group, got "
                             f"HAS_BIAS={self.HAS_BIAS}, NUM_GROUPS={g}, GROUP_SIZE={self.GROUP_SIZE}")

def router_plan(config: MoEConfig) -> RouterPlan:
    """The routing method of `config` as the kernel's constants, computed once. A grouped method that cannot group
    (`ungroupable_reason`) routes as plain top-k and says so here, once, with a `RoutingFallbackWarning` (the torch
    router says it on each call). ValueError: `config` not a MoEConfig, `top_k` above what the kept groups hold, or
    (from `RouterPlan`) more than ROUTER_MAX_EXPERTS experts. Source: moe-lit's own."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    c = config
    groups, topk_group = 1, 1
    reason = ungroupable_reason(c.num_experts, c.num_expert_group, c.has_correction_bias) \
        if c.routing_method == "grouped_topk" else None
    if reason is not None: warn_grouped_fallback(reason)
    elif c.routing_method == "grouped_topk":
        groups, topk_group = c.num_expert_group, c.topk_group
        most = topk_group * (c.num_experts // groups)
        if c.top_k > most: raise ValueError(f"top_k: expected <= topk_group * experts per group = {most}, got {c.top_k}")
    llama4 = c.routing_method == "llama4"
    return RouterPlan(c.num_experts, c.top_k, 2 if llama4 else {"softmax": 0, "sigmoid": 1}[c.scoring_func],
                      c.has_correction_bias, c.renormalize and not llama4, groups, topk_group, c.num_experts // groups,
                      groups > 1 and c.has_correction_bias, 1.0 if llama4 else float(c.routed_scaling_factor))

def _check_plan_args(plan, bias, ids_dtype, validate) -> torch.Tensor | None:
    "What both launchers check first: a RouterPlan, the id dtype, and the correction bias iff the plan has one (returned contiguous; finite when `validate`)."
    if not isinstance(plan, RouterPlan): raise ValueError(f"plan: expected a RouterPlan (router_plan(config)), got {type(plan).__name__}")
    if ids_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids_dtype: expected torch.int32 or torch.int64, got {ids_dtype}")
    check_bool("validate", validate)
    if (bias is None) == plan.HAS_BIAS:
        raise ValueError(f"bias: expected {'a [num_experts] fp32 tensor' if plan.HAS_BIAS else 'None'}, got "
                         f"{'None' if bias is None else 'a tensor'}")
    if bias is None: return None
    check_tensor("bias", bias, shape=(plan.num_experts,), dtype=torch.float32)
    if validate: check_finite("bias", bias)                   # one sync: a NaN or inf would decide the choice
    return bias.contiguous()

def route_topk(plan: RouterPlan,                    # router_plan(config)
               logits: torch.Tensor,                # [T, num_experts] fp32/bf16/fp16 (fp64 is selected in fp32)
               bias: torch.Tensor | None = None,    # [num_experts] fp32 correction bias, iff the plan has one
               ids_dtype: torch.dtype = torch.int32,  # topk_ids dtype (the backend's topk_indices_dtype)
               validate: bool = True,               # check the bias is finite (one sync), as `select_experts` does
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(topk_weights [T, top_k] fp32, topk_ids [T, top_k] ids_dtype)` in one launch; the same result as
    `select_experts`. ValueError naming `plan`, `ids_dtype` (not int32/int64), `validate`, `bias` (given iff the plan
    has one; `[num_experts]` fp32, finite when `validate`: one sync) or `logits` (shape, dtype, a CPU tensor without
    the interpreter, or another device than `bias`). Source: moe-lit's own Triton kernel, in place of vLLM's CUDA
    `topk_softmax` / `topk_sigmoid` / `grouped_topk` ops."""
    bias = _check_plan_args(plan, bias, ids_dtype, validate)
    check_tensor("logits", logits, shape=(None, plan.num_experts), dtype=(torch.float32, torch.bfloat16, torch.float16, torch.float64))
    check_kernel_device("logits", logits, bias=bias)
    if logits.dtype == torch.float64: logits = logits.float()          # selection is fp32 by contract
    if logits.stride(-1) != 1: logits = logits.contiguous()
    return _route_topk(plan, logits, bias, ids_dtype)

def _route_topk(plan, logits, bias, ids_dtype, gate_bias=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_topk` after its checks: for a layer whose plan, bias and unit-stride fp32 logits are its own (`12_layer`).

    `logits` may also be `[SPLIT, T, E]` contiguous partial sums (`_router_logits_kernel`), summed in plane order, and
    `gate_bias` `[E]` (any float dtype, contiguous) is added to the logits before the scores."""
    E, top_k = plan.num_experts, plan.TOP_K
    split, T = (logits.shape[0], logits.shape[1]) if logits.dim() == 3 else (1, logits.shape[0])
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=ids_dtype, device=logits.device)
    if T:
        sel = _selection_constants(plan, split, gate_bias is not None)
        launch_kernel(_route_topk_kernel, (T,))(
            logits, bias if bias is not None else logits,
            gate_bias if gate_bias is not None else logits, w, ids, E,
            T * E if split > 1 else 0, logits.stride(-2), plan.scale, **sel,
            num_warps=1 if sel["BLOCK_E"] <= 256 else 2)   # one warp: reductions stay in shuffles
    return w, ids

def _selection_constants(plan, split, has_gate_bias) -> dict:
    "The selection's compile-time constants (`_select_token`'s), from the plan: one place for both kernels that select."
    return dict(TOP_K=plan.TOP_K, K_PAD=_next_pow2(plan.TOP_K), BLOCK_E=max(_next_pow2(plan.num_experts), 16),
                SCORING=plan.SCORING, HAS_BIAS=plan.HAS_BIAS, RENORMALIZE=plan.RENORMALIZE,
                NUM_GROUPS=plan.NUM_GROUPS, G_PAD=_next_pow2(plan.NUM_GROUPS), TOPK_GROUP=plan.TOPK_GROUP,
                GROUP_SIZE=plan.GROUP_SIZE, TOP2=plan.TOP2, SPLIT=split, HAS_GATE_BIAS=has_gate_bias)

def route_tokens(plan: RouterPlan,                      # router_plan(config)
                 hidden: torch.Tensor,                  # [T, hidden_size] bf16/fp16/fp32
                 gate: torch.Tensor,                    # [num_experts, hidden_size] bf16/fp16/fp32 router weight
                 gate_bias: torch.Tensor | None = None, # [num_experts] bf16/fp16/fp32: the router's bias (gpt-oss)
                 bias: torch.Tensor | None = None,      # [num_experts] fp32 correction bias, iff the plan has one
                 ids_dtype: torch.dtype = torch.int32,  # topk_ids dtype (the backend's topk_indices_dtype)
                 validate: bool = True,                 # check the bias is finite (one sync), as `select_experts` does
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(topk_weights [T, top_k] fp32, topk_ids [T, top_k] ids_dtype)` from `hidden`: the logits (fp32 products and sums) and the selection.

    Two launches up to `ROUTER_GEMV_MAX_TOKENS` tokens (`_router_logits_kernel`, then `_route_topk_kernel` summing its
    partials); past that one cuBLAS GEMM (`03_routing.matmul_acc`) and the selection kernel. The same result as
    `select_experts(config, router_logits(hidden, gate, gate_bias), bias)` except where two logits differ by about an
    ulp (the sum's order differs). ValueError naming the argument for a shape, dtype or device mismatch, and for a
    NaN or inf correction bias when `validate` (the one value read; the layer checks its weights once and calls
    `_route_tokens`). Ids are in `[0, num_experts)` whatever the values. Source: moe-lit's own (the router GEMV with
    the selection fused into its last program; vLLM runs the gate Linear, then its top-k op)."""
    bias = _check_plan_args(plan, bias, ids_dtype, validate)
    E, fl = plan.num_experts, (torch.bfloat16, torch.float16, torch.float32)
    check_tensor("hidden", hidden, ndim=2, dtype=fl)
    check_tensor("gate", gate, shape=(E, hidden.shape[1]), dtype=fl)
    if gate_bias is not None: gate_bias = check_tensor("gate_bias", gate_bias, shape=(E,), dtype=fl).contiguous()
    check_kernel_device("hidden", hidden, gate=gate, gate_bias=gate_bias, bias=bias)
    return _route_tokens(plan, hidden if hidden.stride(-1) == 1 else hidden.contiguous(),
                         gate if gate.stride(-1) == 1 else gate.contiguous(), gate_bias, bias, ids_dtype)

def _router_block_el(E: int, split: int) -> int:
    "Experts per program of the logits kernel: the most of 8, 4, 2 that keeps `ROUTER_TARGET_PROGRAMS` programs, else 1."
    return next((b for b in (8, 4, 2) if _cdiv(E, b) * split >= ROUTER_TARGET_PROGRAMS), 1)

def _route_tokens(plan, hidden, gate, gate_bias, bias, ids_dtype,
                  counter: torch.Tensor | None = None,   # [1] int32, 0: the caller's own arrival counter (a layer's)
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`route_tokens` after its checks (unit strides along hidden_size): the layer's hot path (`12_layer`). With the
    caller's `counter` (zero, and left zero), up to `ROUTER_SELECT_MAX_TOKENS` tokens route in one launch (while a CUDA
    graph is captured, only with `ROUTER_SELECT_IN_GRAPHS`). A counter
    that is not 0 leaves the outputs unset or selects early — wrong ids, which the layer's kernels skip where they
    fall outside its experts; the layer with `debug=True` checks it before each forward."""
    T, H = hidden.shape
    E = plan.num_experts
    if not (0 < T <= ROUTER_GEMV_MAX_TOKENS and H):                         # (no column: the GEMM path's zeros)
        return _route_topk(plan, matmul_acc(hidden, gate), bias, ids_dtype, gate_bias)
    split = _cdiv(H, ROUTER_BLOCK_K)
    parts = torch.empty(split, T, E, dtype=torch.float32, device=hidden.device)
    bel = _router_block_el(E, split)
    launch = launch_kernel(_router_logits_kernel, (_cdiv(E, bel), split))
    args = (hidden, gate, parts, T, E, H, hidden.stride(0), gate.stride(0))
    tiles = dict(T_PAD=_next_pow2(T), BLOCK_EL=bel, BLOCK_K=ROUTER_BLOCK_K, num_warps=8 if bel == 8 else 4)
    if counter is not None and not ROUTER_SELECT_IN_GRAPHS and hidden.is_cuda and torch.cuda.is_current_stream_capturing():
        counter = None                                  # (measured: the two launches replay the faster, above)
    if counter is None or T > ROUTER_SELECT_MAX_TOKENS:
        launch(*args, **tiles)
        return _route_topk(plan, parts if split > 1 else parts[0], bias, ids_dtype, gate_bias)
    w = torch.empty(T, plan.TOP_K, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(T, plan.TOP_K, dtype=ids_dtype, device=hidden.device)
    launch(*args, count_ptr=counter, bias_ptr=bias if bias is not None else parts,
           gate_bias_ptr=gate_bias if gate_bias is not None else parts, weights_ptr=w, ids_ptr=ids, scale=plan.scale,
           SELECT=True, **_selection_constants(plan, split, gate_bias is not None), **tiles)
    return w, ids

# %% [markdown]
# ## Tests
#
# The kernel against the torch routers on fresh random logits for every routing method, with experts counts and
# `top_k` that are not powers of two, groups of 20 experts, int64 ids, bf16 logits, rows with NaN, and rows of exact
# ties. The ids must be equal, the weights equal to fp32 rounding.

# %%
#| test route_topk_matches_select_experts
torch.manual_seed(0)
cases = [dict(num_experts=8, top_k=2),
         dict(num_experts=60, top_k=4, renormalize=False),
         dict(num_experts=128, top_k=8),
         dict(num_experts=256, top_k=8, scoring_func="sigmoid", routing_method="grouped_topk", num_expert_group=8,
              topk_group=4, routed_scaling_factor=2.5, has_correction_bias=True),        # DeepSeek-V3
         dict(num_experts=160, top_k=6, routing_method="grouped_topk", num_expert_group=8, topk_group=3),   # V2
         dict(num_experts=64, top_k=6, routing_method="grouped_topk", num_expert_group=1, topk_group=1),
         dict(num_experts=512, top_k=10),                                               # Qwen3-Next
         dict(num_experts=16, top_k=1, routing_method="llama4", scoring_func="sigmoid", renormalize=False),
         dict(num_experts=32, top_k=4, scoring_func="sigmoid", has_correction_bias=True),
         dict(num_experts=12, top_k=3, routing_method="grouped_topk", num_expert_group=3, topk_group=2)]  # 3 groups
for i, kw in enumerate(cases):
    cfg = MoEConfig(hidden_size=16, intermediate_size=16, **kw)
    plan = router_plan(cfg)
    E, T = cfg.num_experts, 19
    logits = torch.randn(T, E, device=DEVICE)
    logits[3] = float("nan"); logits[5, E // 2] = float("nan")                    # invalid rows
    logits[7] = 0.25; logits[9, : E // 2] = logits[9, E // 2:E // 2 * 2]           # exact ties
    bias = torch.randn(E, device=DEVICE) * 0.1 if cfg.has_correction_bias else None
    for dt in (torch.float32, torch.bfloat16):
        want_w, want_ids = select_experts(cfg, logits.to(dt), bias)
        ids_dtype = (torch.int32, torch.int64)[i % 2]                            # both id dtypes across the cases
        w, ids = route_topk(plan, logits.to(dt), bias, ids_dtype)
        test_eq(ids.dtype, ids_dtype)
        assert torch.equal(ids.long().cpu(), want_ids.long().cpu()), (kw, dt, (ids.cpu() != want_ids.cpu()).nonzero()[:4])
        assert_close(w, want_w.double(), rtol=2e-6, name=str(kw))
    test_eq(w[3].abs().sum().item(), 0.0); test_eq(ids[3].tolist(), list(range(cfg.top_k)))
    w0, ids0 = route_topk(plan, logits[:0], bias)                                # zero tokens
    test_eq((tuple(w0.shape), tuple(ids0.shape)), ((0, cfg.top_k), (0, cfg.top_k)))

# %% [markdown]
# A grouped method that cannot group (one expert a group with a correction bias: a group's score is its top two) routes
# as plain top-k in both routers, and both say so: the plan once, the torch router on each call.

# %%
#| test router_plan_warns_on_the_grouped_fallback
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=16, routing_method="grouped_topk",
                num_expert_group=8, topk_group=2, scoring_func="sigmoid", has_correction_bias=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    plan = router_plan(cfg)
test_eq([(type(c.message), "falling back to fused_topk" in str(c.message)) for c in caught], [(RoutingFallbackWarning, True)])
test_eq((plan.NUM_GROUPS, plan.TOPK_GROUP, plan.TOP2), (1, 1, False))
logits, bias = torch.randn(5, 8, device=DEVICE), torch.randn(8, device=DEVICE) * 0.1
with warnings.catch_warnings():
    warnings.simplefilter("ignore", RoutingFallbackWarning)
    want_w, want_ids = select_experts(cfg, logits, bias)
w, ids = route_topk(plan, logits, bias)
test_eq(ids.long().cpu().tolist(), want_ids.long().cpu().tolist())
assert_close(w, want_w.double(), rtol=2e-6, name="fallback weights")
with warnings.catch_warnings():
    warnings.simplefilter("error", RoutingFallbackWarning)
    test_fail(lambda: router_plan(cfg), contains="falling back to fused_topk")
    router_plan(cfg.replace(num_expert_group=4))                                 # two experts a group: groups, no warning

# %% [markdown]
# `route_tokens` from hidden states against the torch path (`router_logits`, then `select_experts`): fp32 and bf16
# gates, bf16 and fp32 hidden, a router bias, `hidden_size` past one K slice with a partial last slice, T at 1, a
# token count that is not a power of two, the largest T of the decode kernel and one past it (the cuBLAS path), and a
# NaN row. The decode kernel's partial logits sum to the float64 logits within fp32 rounding. The order of the sum
# differs from cuBLAS's, so two logits an ulp apart may rank the other way: an id may differ only where the float64
# choices of the two experts are that close.

# %%
#| test route_tokens_matches_torch_router
g = torch.Generator().manual_seed(3)
H = 1100                                                                       # two K slices, the second partial
for kw in (dict(num_experts=64, top_k=8),
           dict(num_experts=256, top_k=8, scoring_func="sigmoid", routing_method="grouped_topk", num_expert_group=8,
                topk_group=4, routed_scaling_factor=2.5, has_correction_bias=True),       # DeepSeek-V3
           dict(num_experts=16, top_k=1, routing_method="llama4", scoring_func="sigmoid", renormalize=False),
           dict(num_experts=12, top_k=4, renormalize=False)):
    cfg = MoEConfig(hidden_size=H, intermediate_size=16, **kw)
    plan, E = router_plan(cfg), cfg.num_experts
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE) if cfg.has_correction_bias else None
    for T, gdt, hdt, with_gb in ((1, torch.float32, torch.bfloat16, False), (3, torch.bfloat16, torch.bfloat16, True),
                                 (16, torch.float32, torch.float32, True), (17, torch.bfloat16, torch.bfloat16, False)):
        if E == 256 and T in (3, 17): continue                                   # the interpreter's time
        gate = (torch.randn(E, H, generator=g) / H ** 0.5).to(DEVICE, gdt)
        gb = torch.randn(E, generator=g).to(DEVICE, gdt) if with_gb else None
        hidden = torch.randn(T, H, generator=g).to(DEVICE, hdt)
        if T > 2: hidden[1] = float("nan")                                       # an invalid row
        want_w, want_ids = select_experts(cfg, router_logits(hidden, gate, gb), bias)
        w, ids = route_tokens(plan, hidden, gate, gb, bias, torch.int64)
        exact = hidden.double() @ gate.double().T + (gb.double() if gb is not None else 0)
        choice = exact.sigmoid() if cfg.scoring_func == "sigmoid" and cfg.routing_method != "llama4" else exact
        if bias is not None: choice = choice + bias.double()
        for t in range(T):
            if torch.equal(ids[t].cpu(), want_ids[t].cpu()): continue
            a, b = ids[t].cpu(), want_ids[t].cpu()                               # a near-tie: the differing choices
            d = (choice[t, a[a != b]] - choice[t, b[a != b]]).abs().max().item()  # are within fp32 rounding
            assert d < 1e-5, (kw, T, t, a.tolist(), b.tolist(), d)
        ok = (ids.cpu() == want_ids.cpu()).all(-1)
        assert_close(w[ok], want_w[ok].double(), rtol=1e-4, name=f"{kw} T={T}")
        if T > 2: test_eq(ids[1].tolist(), list(range(cfg.top_k))); test_eq(w[1].abs().sum().item(), 0.0)
# the partial logits of the decode kernel: sum to the float64 logits
T, E = 5, 40
hidden, gate = torch.randn(T, H, generator=g).to(DEVICE), torch.randn(E, H, generator=g).to(DEVICE)
parts = torch.full((2, T, E), float("nan"), device=DEVICE)
_router_logits_kernel[(E, 2)](hidden, gate, parts, T, E, H, H, H, T_PAD=8, BLOCK_EL=1, BLOCK_K=ROUTER_BLOCK_K)
assert_close(parts.sum(0), hidden.double() @ gate.double().T, rtol=1e-5, name="partial logits")

# %% [markdown]
# With an arrival counter of the caller's (the layer keeps one), up to `ROUTER_SELECT_MAX_TOKENS` tokens route in
# one launch: the logits program that arrives last selects, reading the other programs' partials after its acquire,
# and resets the counter. Same code, same order of the sum: the same bits as the two launches, for every routing
# method, and the counter is 0 again after each launch (a second call, and a third past the limit, agree too).
# The first call's outputs are filled with NaN and -1 and freed before the second, whose outputs the allocator hands
# back: a launch that selected nothing would fail the comparison.

# %%
#| test router_selects_in_the_logits_launch
g = torch.Generator().manual_seed(5)
counter = torch.zeros(1, dtype=torch.int32, device=DEVICE)
for kw in (dict(num_experts=64, top_k=8),
           dict(num_experts=256, top_k=8, scoring_func="sigmoid", routing_method="grouped_topk", num_expert_group=8,
                topk_group=4, routed_scaling_factor=2.5, has_correction_bias=True),       # DeepSeek-V3
           dict(num_experts=16, top_k=1, routing_method="llama4", scoring_func="sigmoid", renormalize=False)):
    cfg = MoEConfig(hidden_size=1100, intermediate_size=16, **kw)
    plan, E = router_plan(cfg), cfg.num_experts
    bias = (torch.randn(E, generator=g) * 0.1).to(DEVICE) if cfg.has_correction_bias else None
    gate = (torch.randn(E, 1100, generator=g) / 33).to(DEVICE, torch.bfloat16)
    gb = torch.randn(E, generator=g).to(DEVICE, torch.bfloat16)
    for T in sorted({1, ROUTER_SELECT_MAX_TOKENS, ROUTER_SELECT_MAX_TOKENS + 1}):
        hidden = torch.randn(T, 1100, generator=g).to(DEVICE, torch.bfloat16)
        want = _route_tokens(plan, hidden, gate, gb, bias, torch.int64)             # two launches
        with record_launches() as seen:
            got = _route_tokens(plan, hidden, gate, gb, bias, torch.int64, counter)
        test_eq(len(seen), 1 if T <= ROUTER_SELECT_MAX_TOKENS else 2)
        test_eq(counter.item(), 0)                                               # left ready for the next launch
        assert torch.equal(got[1].cpu(), want[1].cpu()) and torch.equal(got[0].cpu(), want[0].cpu()), (kw, T)
        got[0].fill_(float("nan")); got[1].fill_(-1); del got                       # poisoned and freed: the next call's
        again = _route_tokens(plan, hidden, gate, gb, bias, torch.int64, counter)    # outputs (the allocator's reuse)
        assert torch.equal(again[1].cpu(), want[1].cpu()) and torch.equal(again[0].cpu(), want[0].cpu()), (kw, T)

# %% [markdown]
# Arguments are checked on their metadata — shapes and dtypes — and the correction bias for NaN or inf when
# `validate` (one sync, as `select_experts`; the layer checks its bias once and calls the unchecked twins). Without the
# check a NaN bias entry is never chosen and the ids stay in range. A strided `hidden` whose rows lie more than 2^31
# elements apart is read with int64 offsets.

# %%
#| test route_topk_bad_arguments
cfg = MoEConfig(num_experts=8, top_k=2, hidden_size=16, intermediate_size=16)
plan = router_plan(cfg)
test_fail(lambda: route_topk(plan, torch.randn(3, 7)), contains="logits: expected shape [*, 8], got [3, 7]")
test_fail(lambda: route_topk(plan, torch.randn(3, 8).long()), contains="logits: expected dtype")
test_fail(lambda: route_topk(plan, torch.randn(3, 8), torch.zeros(8)), contains="bias: expected None, got a tensor")
test_fail(lambda: router_plan("x"), contains="config: expected a MoEConfig")
test_fail(lambda: route_topk({}, torch.randn(3, 8)), contains="plan: expected a RouterPlan")
for field, value, msg in (("TOP_K", 9, "TOP_K: expected <= 8"), ("num_experts", 0, "num_experts: expected >= 1"),
                          ("SCORING", 7, "SCORING: expected one of"), ("NUM_GROUPS", 3, "GROUP_SIZE: expected num_experts / NUM_GROUPS"),
                          ("TOP_K", -1, "TOP_K: expected >= 1"), ("RENORMALIZE", 1, "RENORMALIZE: expected a bool"),
                          ("SCORING", True, "SCORING: expected an int"), ("TOP2", True, "TOP2: expected True only with")):
    test_fail(lambda: dataclasses.replace(plan, **{field: value}), contains=msg)   # a hand-made plan is checked too
test_fail(lambda: route_topk(plan, torch.randn(3, 8), ids_dtype=torch.int8), contains="ids_dtype: expected torch.int32 or torch.int64")
for v in (1, "no", None):                             # checked whether or not the plan has a bias to check
    test_fail(lambda: route_topk(plan, torch.randn(3, 8), validate=v), contains="validate: expected a bool")
strided = router_plan(cfg.replace(has_correction_bias=True, scoring_func="sigmoid"))
base = torch.tensor([0., 9, 1, 9, 2, 9, 3, 9, 4, 9, 5, 9, 6, 9, 7, 9], device=DEVICE) / 16
b = base[::2]                                        # a strided view: read as its values 0..7/16, not as base[:8]
assert b.stride(0) == 2
x = torch.zeros(2, 8, device=DEVICE)
test_eq(route_topk(strided, x, b)[1].tolist(), select_experts(cfg.replace(has_correction_bias=True, scoring_func="sigmoid"), x, b)[1].tolist())
if not INTERPRET and DEVICE == "cpu":
    test_fail(lambda: route_topk(plan, torch.randn(3, 8)), contains="logits: expected a CUDA tensor")
biased = router_plan(cfg.replace(has_correction_bias=True))
test_fail(lambda: route_topk(biased, torch.randn(3, 8)), contains="bias: expected a [num_experts] fp32 tensor, got None")
test_fail(lambda: route_topk(biased, torch.randn(3, 8), torch.zeros(8).double()), contains="bias: expected dtype torch.float32")
h16, gate8 = torch.randn(3, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE)     # route_tokens: hidden and the gate
test_fail(lambda: route_tokens(plan, h16, gate8[:, :15]), contains="gate: expected shape [8, 16], got [8, 15]")
test_fail(lambda: route_tokens(plan, h16.double(), gate8), contains="hidden: expected dtype")
test_fail(lambda: route_tokens(plan, h16, gate8.long()), contains="gate: expected dtype")
test_fail(lambda: route_tokens(plan, h16, gate8, torch.zeros(7, device=DEVICE)), contains="gate_bias: expected shape [8]")
test_fail(lambda: route_tokens(biased, h16, gate8), contains="bias: expected a [num_experts] fp32 tensor, got None")
test_fail(lambda: route_tokens(plan, h16, gate8, ids_dtype=torch.int16), contains="ids_dtype: expected torch.int32 or torch.int64")
test_fail(lambda: route_tokens(None, h16, gate8), contains="plan: expected a RouterPlan")
test_eq(route_tokens(plan, h16[:, :0], gate8[:, :0])[1].tolist(), select_experts(cfg, torch.zeros(3, 8, device=DEVICE))[1].tolist())
test_fail(lambda: dataclasses.replace(plan, num_experts=2**20, GROUP_SIZE=2**20), contains="num_experts: expected at most 65536 for the Triton router")
test_eq(route_tokens(plan, h16[:, ::2].contiguous(), gate8[:, ::2])[1].tolist(),    # a strided gate: read as its values
        route_tokens(plan, h16[:, ::2].contiguous(), gate8[:, ::2].contiguous())[1].tolist())
w0, ids0 = route_tokens(plan, h16[:0], gate8)                                      # zero tokens
test_eq((tuple(w0.shape), tuple(ids0.shape)), ((0, 2), (0, 2)))
for bad in (float("nan"), float("inf")):                                           # a non-finite correction bias
    nb = torch.zeros(8, device=DEVICE); nb[3] = bad
    test_fail(lambda: route_topk(strided, x, nb), contains=f"bias: expected finite values, got {bad} at [3]")
    test_fail(lambda: route_tokens(strided, h16, gate8, bias=nb), contains="bias: expected finite values")
for nb in (torch.full((8,), float("nan"), device=DEVICE), torch.tensor([float("nan")] * 7 + [0.0], device=DEVICE)):
    for ids in (route_topk(strided, x, nb, validate=False)[1], route_tokens(strided, h16, gate8, bias=nb, validate=False)[1]):
        assert ((ids >= 0) & (ids < 8)).all() and (ids[:, 0] != ids[:, 1]).all(), ids.tolist()   # unchecked: in range
far = torch.empty(15 * 143165577 + 16, dtype=torch.bfloat16, device=DEVICE)      # rows 143165577 apart: (T-1)·stride > 2^31
hf = far.as_strided((16, 16), (143165577, 1)); hf.copy_(torch.randn(16, 16, generator=torch.Generator().manual_seed(3)))
test_eq(route_tokens(plan, hf, gate8.bfloat16())[1].tolist(), route_tokens(plan, hf.contiguous(), gate8.bfloat16())[1].tolist())
del far, hf

# %% [markdown]
# Both kernels as Hopper compiles them (`00_testing.assert_compiles_for_gpu`, no GPU needed): every routing method,
# the decode logits with one and several K slices, fp32 and bf16 gates, the router's own bias.

# %%
#| test router_kernels_compile_for_sm90
g = torch.Generator().manual_seed(9)
with record_launches() as seen:
    for kw in (dict(), dict(renormalize=False), dict(routing_method="llama4", scoring_func="sigmoid", top_k=1, renormalize=False),
               dict(scoring_func="sigmoid", routing_method="grouped_topk", num_expert_group=4, topk_group=2,
                    routed_scaling_factor=2.5, has_correction_bias=True)):                 # DeepSeek-V3's method
        c = MoEConfig(**dict(dict(num_experts=16, top_k=4, hidden_size=1100, intermediate_size=16), **kw))
        plan, b = router_plan(c), torch.zeros(16, device=DEVICE) if c.has_correction_bias else None
        for T, dt in ((1, torch.bfloat16), (5, torch.float32)):
            h, gate = torch.randn(T, 1100, generator=g).to(DEVICE, dt), torch.randn(16, 1100, generator=g).to(DEVICE, dt)
            route_tokens(plan, h, gate, bias=b)
            route_tokens(plan, h[:, :1000], gate[:, :1000], torch.zeros(16, device=DEVICE, dtype=dt), bias=b)  # one slice
        route_topk(plan, torch.randn(20, 16, generator=g).to(DEVICE), b)
res = assert_compiles_for_gpu(seen)
test_eq({r["kernel"] for r in res}, {"_router_logits_kernel", "_route_topk_kernel"})
