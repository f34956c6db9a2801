# %%
#| default_exp kernels.dispatch

# %% [markdown]
# # Dispatch and combine
# > Triton kernels that scatter each (token, slot) pair into its local expert's slab and return the experts' rows to their tokens as a weighted sum.

# %%
#| export
from __future__ import annotations
import torch
from moe_lit.kernels.batched import BatchedTritonExperts, check_kernel_device
from moe_lit.kernels.batched import _cdiv, _next_pow2, INTERPRET, launch_kernel, _await_producers
import triton
import triton.language as tl
from moe_lit.terms import check_int, check_tensor, check_bool, check_disjoint
from moe_lit.formats import dispatch_batched_reference
from moe_lit.placement import local_slot_table
from moe_lit.kernels.quant_act import _fp8_quantize_group, fp8_quantize_activations_reference

# %%
#| hide
from moe_lit.kernels.batched import DEVICE
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close, poison_rows
from moe_lit.kernels.dispatch import _batched_combine
from moe_lit.formats import combine_batched_reference, moe_reference_standard
from moe_lit.placement import determine_expert_map, round_robin_routing_tables, expert_block
from moe_lit.config import MoEConfig, ParallelConfig
from moe_lit.placement import Placement

# %% [markdown]
# In this notebook: `batched_dispatch` (kernel `_batched_dispatch_kernel`) and `batched_combine` (kernel
# `_batched_combine_kernel`), the in-process versions of what DeepEP low-latency and NIXL EP do across ranks, with
# their specs `dispatch_batched_reference` and `combine_batched_reference` from `05_formats`. Motivation → reference →
# kernel → launcher → tests.
#
# ## Motivation
#
# The batched format needs two data movements around the experts: before, every `(token, slot)` pair whose expert is
# local goes to the next free row of that expert's slab; after, every pair's output row goes back to its token,
# multiplied by the router weight and summed over the `top_k` slots. Both are pure memory traffic — `T·top_k·H`
# elements each way — and both must be exact about the edges: a non-local or `-1` slot contributes exactly 0, and a
# slab that would overflow its capacity is an error, never a silent drop (DeepEP#427 is a dispatch that miscounted
# under imbalance).
#
# ## Dispatch kernel
#
# ```
# for each pair (t, k) (one program each: at decode a token's top_k copies run in parallel):
#     local = local expert of topk_ids[t, k]  (through expert_map, or global_to_physical − physical_offset, or as is)
#     if local is not on this rank: slot_map[t, k] = −1; continue
#     row = atomic_add(counts[local], 1)                      # the next free row
#     if row >= max_tokens: counts[local] −= 1; overflow = 1; slot_map[t, k] = −1; continue
#     a[local, row, :] = hidden[t, :] (· topk_weights[t, k] when the weight is applied on the input)
#     (FP8 on the wire: the row quantized in 1 × group blocks on the way, its scales to a_scale[local, row, :])
#     slot_map[t, k] = local · max_tokens + row
# ```
#
# Grid `(T, TOP_K)`; constexprs `TOP_K`, `BLOCK_H` (the row is copied in `BLOCK_H` chunks: one up to 8192 columns, so at decode a pair's whole row is one load issued before its row is claimed, and one store), `MODE` (0: ids are already
# local, 1: `expert_map`, 2: `global_to_physical`), `SCALE` (apply the router weight on the input, in fp32), `QUANT_GROUP`
# (send the row as FP8 in `1 × QUANT_GROUP` groups, each with its fp32 scale: what DeepEP low-latency and NIXL EP do
# when the experts take block-FP8 activations; the group's math is `09b_kernels.quant_act`'s, so the slabs hold the
# same bits as quantizing them after the dispatch would give). Rows within an expert come in whatever order the atomics grant them — program order in the
# interpreter, any order on a GPU — so tests check values and permutations, never row order.
#
# A pair that finds its expert's slab full takes its count back, so each count ends at `min(pairs, max_tokens)`: a valid
# `expert_num_tokens` with no clamp launched after. No row is given twice: the first pair to overflow found every row
# taken (no count was given back before it), and from then on every count stays at or above its taken rows.

# %%
#| export
@triton.jit
def _batched_dispatch_kernel(
    hidden_ptr,         # [T, H]
    topk_ids_ptr,       # [T, TOP_K] int32/int64, global (or local, MODE 0) expert ids, -1 = none
    topk_weights_ptr,   # [T, TOP_K] fp32 (read when SCALE)
    map_ptr,            # MODE 1: expert_map [num_experts] int32; MODE 2: global_to_physical [num_experts] int64
    a_ptr,              # [E_local, max_tokens, W] output slabs (W >= H: the columns past H written as zeros)
    counts_ptr,         # [E_local] int32, zeroed; becomes expert_num_tokens (at most max_tokens)
    slot_map_ptr,       # [T, TOP_K] int64 output
    overflow_ptr,       # [1] int32, set to 1 when a pair does not fit
    H, W, num_local_experts, num_experts, max_tokens, physical_offset,
    stride_ht, stride_ae, stride_am,
    ascale_ptr,         # QUANT_GROUP: [E_local, max_tokens, G] fp32 output, each row's group scales beside it
    G, stride_ase, stride_asm,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, MODE: tl.constexpr, SCALE: tl.constexpr,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
    QUANT_GROUP: tl.constexpr = 0,      # > 0: each row sent as FP8 (e4m3) in 1 × QUANT_GROUP groups (it divides BLOCK_H)
    EMULATE_CAST: tl.constexpr = False, # the interpreter's e4m3 rounding (`09b`)
):
    """One (token, slot) pair: translate its expert id to a local expert, claim the next row of that expert's slab
    (`atomic_add` on its count), copy the token's hidden row there, zeros in its columns past H up to the slab's W (the
    backend's wire width; times the router weight with SCALE; FP8 with QUANT_GROUP, its group scales to `ascale`) and
    store the pair's slot `local·max_tokens + row`, or -1 when the
    expert is not local or its slab is full (the count is given back and the overflow flag set).

    grid = (T, TOP_K) (`_batched_dispatch`, launched only when T > 0); no program exits early: each stores its slot.
    Constexprs: `TOP_K` slots a token (grid axis 1); `BLOCK_H` columns a pass, max(min(8192, next_pow2(W)),
    QUANT_GROUP); `MODE` id translation: 0 ids already local, 1 `expert_map`, 2 `global_to_physical` − physical_offset;
    `SCALE` multiply the row by topk_weights[t, k] (fp32, cast once); `PDL` programmatic dependent launch
    (`launch_kernel` sets it on sm_90+ when PDL is on); `QUANT_GROUP` 0, or the FP8 group width (a power of two >= 32,
    dividing BLOCK_H); `EMULATE_CAST` the interpreter's e4m3 rounding (True in the interpreter)."""
    _await_producers(PDL)                                    # before any load or store
    t = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)                                     # one program per (token, slot) pair
    offs_h = tl.arange(0, BLOCK_H)
    gid = tl.load(topk_ids_ptr + t * TOP_K + k).to(tl.int64)
    in_range = (gid >= 0) & (gid < num_experts)
    local = gid
    if MODE == 1: local = tl.load(map_ptr + gid, mask=in_range, other=-1).to(tl.int64)
    if MODE == 2: local = tl.load(map_ptr + gid, mask=in_range, other=-1).to(tl.int64) - physical_offset
    ok = in_range & (local >= 0) & (local < num_local_experts)
    slot = gid * 0 - 1                                       # int64 -1: the pair is not here
    if ok:
        x = tl.load(hidden_ptr + t * stride_ht + offs_h, mask=offs_h < H, other=0.0)   # issued before the row is
        row = tl.atomic_add(counts_ptr + local, 1).to(tl.int64)            # claimed: the two latencies overlap
        if row < max_tokens:
            slot = local * max_tokens + row
            w = tl.load(topk_weights_ptr + t * TOP_K + k) if SCALE else 1.0
            for h0 in range(0, tl.cdiv(W, BLOCK_H)):                         # one pass when W <= BLOCK_H
                hm = h0 * BLOCK_H + offs_h < W                               # stored: the slab's row, pad included
                if h0 > 0: x = tl.load(hidden_ptr + t * stride_ht + h0 * BLOCK_H + offs_h,
                                       mask=h0 * BLOCK_H + offs_h < H, other=0.0)   # read: the token's (pad: zeros)
                if SCALE: x = (x.to(tl.float32) * w).to(hidden_ptr.dtype.element_ty)   # fp32 product, cast once
                dst = a_ptr + local * stride_ae + row * stride_am + h0 * BLOCK_H + offs_h
                if QUANT_GROUP > 0:                  # the row's groups, quantized as `09b`'s kernel does: same bits
                    NG: tl.constexpr = BLOCK_H // QUANT_GROUP
                    q, sc = _fp8_quantize_group(tl.reshape(x.to(tl.float32), (NG, QUANT_GROUP)), NG, QUANT_GROUP,
                                                EMULATE_CAST)
                    tl.store(dst, tl.reshape(q, (BLOCK_H,)), mask=hm)
                    offs_g = h0 * NG + tl.arange(0, NG)
                    tl.store(ascale_ptr + local * stride_ase + row * stride_asm + offs_g, sc, mask=offs_g < G)
                else: tl.store(dst, x, mask=hm)
        else:                                            # no row: give the count back, so that it ends at
            tl.atomic_add(counts_ptr + local, -1)          # max_tokens (see below), and raise the flag
            tl.atomic_max(overflow_ptr, 1)
    tl.store(slot_map_ptr + t * TOP_K + k, slot)

# %% [markdown]
# ## Dispatch launcher
#
# The launcher resolves which table turns a global id into a local slot — `expert_map` (linear or round-robin
# placement without physical ids), `global_to_physical` with this rank's `physical_offset` (DeepEP low-latency and
# NIXL EP with round-robin placement), or neither (the ids are already local) — and after the kernel checks the
# overflow flag. With `check_overflow=False` (inside a captured CUDA graph, where a host check is impossible) it
# returns the flag instead, and the caller must read it after the graph runs.

# %%
#| export
def batched_dispatch(hidden: torch.Tensor,                     # [num_tokens, hidden_size]
                     topk_ids: torch.Tensor,                   # [num_tokens, top_k] int32/int64 global ids, -1 = none
                     num_local_experts: int,                   # E_local: slabs on this rank
                     max_tokens: int,                          # rows per slab (capacity)
                     expert_map: torch.Tensor | None = None,   # [num_experts] int32, global -> local or -1
                     global_to_physical: torch.Tensor | None = None,  # [num_experts] int64 (round-robin tables)
                     physical_offset: int = 0,                 # first physical id of this rank (with the tables)
                     topk_weights: torch.Tensor | None = None, # [num_tokens, top_k] fp32: scale rows on input
                     out: torch.Tensor | None = None,          # [E_local, max_tokens, hidden_size] slab buffer
                     check_overflow: bool = True,              # raise on overflow (one host sync)
                     quant_group: int | None = None,           # send FP8 rows in 1 × quant_group groups (a power of 2)
                     out_scale: torch.Tensor | None = None,    # [E_local, max_tokens, G] fp32 buffer for their scales
                     hidden_width: int | None = None,          # W: the slabs' row width (None: H; more: zero columns)
                    ):
    """Scatter pairs into slabs: `(a [E_local, max_tokens, W], expert_num_tokens [E_local] int32, slot_map [T, top_k]
    int64)`, then `a_scale [E_local, max_tokens, G]` fp32 with `quant_group`, then the device overflow flag `[1]` int32
    when `check_overflow` is False. W = `hidden_width` (default H): a backend's wire width (`01_config`
    `padded_hidden_size`); the columns past H are sent as zeros, written by the same launch (no padded copy of
    `hidden`, no fill).

    With `quant_group`, each row is sent as FP8: `a` is float8_e4m3fn, quantized in `1 × quant_group` groups on the
    way (G = ceil(W / quant_group) scales a row, `09b`'s dynamic scaling, after the router weight when it is applied
    on the input), as DeepEP low-latency and NIXL EP send activations when the experts take block FP8 (their record's
    `quantizes_before_dispatch`, `01_config`). Rows past a slab's count, in `a` and `a_scale`, are not written.
    ValueError naming the argument for a shape, dtype, device, stride or overlap mismatch, a `hidden_width` under H,
    a `quant_group` that is not a power of two in [32, 8192], ids out of range, tables that are not one rank's
    (`04_placement.local_slot_table`: an `expert_map` holding each local slot once, a `global_to_physical` permuting the experts with
    `physical_offset + num_local_experts <= num_experts`) — host syncs, with `check_overflow` — and a capacity overflow
    (its own sync). Source: DeepEP's low-latency dispatch (https://github.com/deepseek-ai/DeepEP,
    `low_latency_dispatch(..., use_fp8=True)`)."""
    check_tensor("hidden", hidden, ndim=2, dtype=(torch.bfloat16, torch.float16, torch.float32))
    check_bool("check_overflow", check_overflow)
    T, H = hidden.shape
    W = H if hidden_width is None else check_int("hidden_width", hidden_width, lo=H)
    if quant_group is not None:
        check_int("quant_group", quant_group, lo=32, hi=8193)
        if quant_group & (quant_group - 1): raise ValueError(f"quant_group: expected a power of two, got {quant_group}")
    elif out_scale is not None: raise ValueError("out_scale: expected None without quant_group, got a tensor")
    check_tensor("topk_ids", topk_ids, shape=(T, None), dtype=(torch.int32, torch.int64))
    check_int("num_local_experts", num_local_experts, lo=1); check_int("max_tokens", max_tokens, lo=1, hi=2**31)   # int32 counts
    check_int("physical_offset", physical_offset, lo=0)
    if expert_map is not None and global_to_physical is not None:
        raise ValueError("expert_map: expected None when global_to_physical is given (one table decides), got a tensor")
    table, mode = (expert_map, 1) if expert_map is not None else (global_to_physical, 2) if global_to_physical is not None else (None, 0)
    if mode: table = check_tensor("expert_map" if mode == 1 else "global_to_physical", table, ndim=1,
                                  dtype=torch.int32 if mode == 1 else torch.int64).contiguous()   # read at unit stride
    num_experts = table.shape[0] if mode else num_local_experts
    if physical_offset and mode != 2:
        raise ValueError(f"physical_offset: expected 0 without global_to_physical (it offsets that table), got {physical_offset}")
    if topk_weights is not None: check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtype=torch.float32)
    check_kernel_device("hidden", hidden, topk_ids=topk_ids, expert_map=expert_map, global_to_physical=global_to_physical,
                        topk_weights=topk_weights, out=out)
    adt = hidden.dtype if quant_group is None else torch.float8_e4m3fn
    a = torch.empty(num_local_experts, max_tokens, W, dtype=adt, device=hidden.device) if out is None else \
        check_disjoint("out", check_tensor("out", out, shape=(num_local_experts, max_tokens, W), dtype=adt,
                                           writable=True), hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights,
                      expert_map=expert_map, global_to_physical=global_to_physical)
    for name, t in (("hidden", hidden), ("out", a)):
        if t.stride(-1) != 1: raise ValueError(f"{name}: expected a unit stride along hidden_size, got {t.stride(-1)}")
    quant = None
    if quant_group is not None:
        G = -(-W // quant_group)
        check_kernel_device("hidden", hidden, out_scale=out_scale)
        a_scale = torch.empty(num_local_experts, max_tokens, G, dtype=torch.float32, device=hidden.device) \
            if out_scale is None else check_disjoint(
                "out_scale", check_tensor("out_scale", out_scale, shape=(num_local_experts, max_tokens, G),
                                          dtype=torch.float32, writable=True),
                hidden=hidden, topk_ids=topk_ids, topk_weights=topk_weights, slabs=a)
        if a_scale.stride(-1) != 1: raise ValueError(f"out_scale: expected a unit stride along its groups, got {a_scale.stride(-1)}")
        quant = (quant_group, a_scale)
    if check_overflow and T and ((topk_ids < -1) | (topk_ids >= num_experts)).any():
        raise ValueError(f"topk_ids: expected values in [-1, {num_experts}), got "
                         f"{topk_ids.min().item()}..{topk_ids.max().item()}")
    if check_overflow and mode:   # one rank's tables, by placement's rule: each local slot once, a permutation
        local_slot_table(num_experts, num_local_experts, physical_offset, expert_map, global_to_physical)
    res = _batched_dispatch(hidden, topk_ids, num_local_experts, max_tokens, table, mode, num_experts,
                            physical_offset, topk_weights, a, check_overflow, quant=quant)
    return res if quant is None else (*res[:3], quant[1], *res[3:])

def _batched_dispatch(hidden, topk_ids, num_local_experts, max_tokens, table, mode, num_experts, physical_offset,
                      topk_weights, a, check_overflow,
                      zeroed=None,    # int32 [num_local_experts + 1] zeros the caller keeps (its combine zeroes them again)
                      quant=None):    # FP8 on the wire: (group, a_scale [E_local, max_tokens, G] fp32, unit stride)
    "`batched_dispatch` after its checks, `a` allocated: for a prepare whose ids and tables are its own (`10_modular`)."
    (T, H), W = hidden.shape, a.shape[2]                  # W >= H: the slabs' row width (the wire's), pad zeros
    if zeroed is None: zeroed = torch.zeros(num_local_experts + 1, dtype=torch.int32, device=hidden.device)   # both
    counts, flag = zeroed[:num_local_experts], zeroed[num_local_experts:]                    # the counts and the flag
    slot_map = torch.empty(T, topk_ids.shape[1], dtype=torch.int64, device=hidden.device)
    if T:
        group, asc = quant if quant is not None else (0, a)
        bh = max(min(8192, _next_pow2(W)), group)             # whole groups a pass
        launch_kernel(_batched_dispatch_kernel, (T, topk_ids.shape[1]))(
            hidden, topk_ids.contiguous(), topk_weights.contiguous() if topk_weights is not None else hidden,
            table if mode else counts, a, counts, slot_map, flag, H, W, num_local_experts, num_experts, max_tokens,
            physical_offset, hidden.stride(0), a.stride(0), a.stride(1),
            asc, asc.shape[2] if quant is not None else 0, asc.stride(0), asc.stride(1),
            TOP_K=topk_ids.shape[1], BLOCK_H=bh, MODE=mode, SCALE=topk_weights is not None,
            **(dict(QUANT_GROUP=group, EMULATE_CAST=INTERPRET) if quant is not None else {}),
            num_warps=8 if bh >= 4096 else 4)
    if not check_overflow: return a, counts, slot_map, flag      # counts end at most max_tokens: a valid contract
    if int(flag.item()):
        local = topk_ids.long()                                   # the busiest local expert's pairs, for the message
        if mode: local = torch.where(local >= 0, table.long()[local.clamp(min=0)] - (physical_offset if mode == 2 else 0), -1)
        local = local[(local >= 0) & (local < num_local_experts)]
        raise ValueError(f"max_tokens: expected >= {int(torch.bincount(local).max())} (the busiest local expert's pairs), "
                         f"got {max_tokens}: capacity overflow")
    return a, counts, slot_map

# %% [markdown]
# ## Combine kernel
#
# ```
# for each token t and H-block (one program):
#     for each pass over up to 32 of its slots:       # one pass at top_k <= 32
#         slots = slot_map[t, pass]                    # one vector load
#         rows  = expert_out.flat[slots, H-block]      # one [slots, BLOCK_H] load, masked where a slot is −1
#         acc  += Σ_k w[t, k] · rows[k]                # fp32
#     out[t, H-block] = acc                            # cast once
# ```
#
# Grid `(T, cdiv(H, BLOCK_H))`. A token's slots and rows, up to 32 a pass, are loaded at once as one masked 2-D load: at
# decode the kernel is a handful of programs whose time is memory latency, and a loop of `top_k` dependent
# (slot, row) loads would pay that latency `2·top_k` times. A `-1` slot is masked out, so its row is never loaded —
# `0 · NaN` would be NaN, and padding rows may hold anything — and its weight is read as 0. `BLOCK_H` shrinks at
# small T until the grid has a few hundred programs (`_combine_tile`), so the row is read by many SMs at once.
# The sum has a fixed order and no atomics, so the result is bitwise repeatable.

# %%
#| export
@triton.jit
def _batched_combine_kernel(
    expert_out_ptr,     # [E_local, max_tokens, H]
    topk_weights_ptr,   # [T, TOP_K] fp32
    slot_map_ptr,       # [T, TOP_K] int64, e·max_tokens + row, or -1 (PAIRS: local expert ids, int32/int64)
    out_ptr,            # [T, H]
    add_ptr,            # [T, add_cols] added to the sum in fp32 (ADD: the shared experts' output)
    H, max_tokens, stride_ee, stride_em, stride_ot, stride_at, add_cols,
    num_local,          # PAIRS: a pair's row exists iff 0 <= local id < num_local
    num_slots,          # rows of expert_out (E_local · max_tokens): a slot outside [0, num_slots) is skipped, not read
    TOP_K: tl.constexpr, SLOTS: tl.constexpr,   # SLOTS: slots loaded at once (a power of two, _combine_tile)
    BLOCK_H: tl.constexpr, WEIGHTED: tl.constexpr,
    PAIRS: tl.constexpr,  # expert_out is [1, T·TOP_K, H], one row per pair: slot = t·TOP_K + k where the id is local
    ADD: tl.constexpr = False,
    reset_ptr=None,     # RESET: int32 [n_reset] zeroed by program (0, 0): the dispatch counts this combine ends
    n_reset=0, BLOCK_R: tl.constexpr = 1, RESET: tl.constexpr = False,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    """Token t's columns [h·BLOCK_H, (h+1)·BLOCK_H) of the combine: the fp32 sum over its TOP_K slots of the expert
    rows they name (times the router weights with WEIGHTED), plus the addend with ADD, cast once; slots outside
    [0, num_slots) are masked and add 0. With RESET, program (0, 0) also zeroes `reset_ptr`'s n_reset entries.

    grid = (T, cdiv(H, BLOCK_H)) in both launchers (`_batched_combine`, `_combine_pairs`), launched only when T and H
    are > 0; no program exits early.
    Constexprs: `TOP_K` slots a token; `SLOTS` slots loaded a pass, min(32, next_pow2(TOP_K)); `BLOCK_H` columns a
    program, min(1024, next_pow2(H), 8192 / SLOTS), halved (not below 128) while T·cdiv(H, BLOCK_H) < 256 outside the
    interpreter (`_combine_tile`); `WEIGHTED` multiply by topk_weights (False when applied on the input, and for pair
    rows); `PAIRS` slot_map holds local ids and expert_out a row per pair (`_combine_pairs`); `ADD` add `add_ptr`'s
    first add_cols columns in fp32; `BLOCK_R` next_pow2(n_reset); `RESET` zero the kept dispatch counts; `PDL`
    programmatic dependent launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if RESET:                                                 # the GEMMs that read the counts have completed
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            offs_r = tl.arange(0, BLOCK_R)
            tl.store(reset_ptr + offs_r, tl.zeros((BLOCK_R,), tl.int32), mask=offs_r < n_reset)
    hm = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k0 in range(0, TOP_K, SLOTS):                         # one pass for top_k <= 32
        ks = k0 + tl.arange(0, SLOTS)
        km = ks < TOP_K
        slot = tl.load(slot_map_ptr + t * TOP_K + ks, mask=km, other=-1).to(tl.int64)
        if PAIRS: slot = tl.where((slot >= 0) & (slot < num_local) & km, t * TOP_K + ks, -1)
        valid = (slot >= 0) & (slot < num_slots)
        e, r = slot // max_tokens, slot % max_tokens
        y = tl.load(expert_out_ptr + e[:, None] * stride_ee + r[:, None] * stride_em + offs_h[None, :],
                    mask=valid[:, None] & hm[None, :], other=0.0).to(tl.float32)          # [SLOTS, BLOCK_H]
        if WEIGHTED: y = y * tl.load(topk_weights_ptr + t * TOP_K + ks, mask=valid, other=0.0)[:, None]
        acc += tl.sum(y, axis=0)
    if ADD: acc += tl.load(add_ptr + t * stride_at + offs_h, mask=offs_h < add_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs_h, acc.to(out_ptr.dtype.element_ty), mask=hm)

def _combine_tile(T: int, H: int, top_k: int) -> tuple[int, int]:
    "`(SLOTS, BLOCK_H)` of the combine: up to 32 slots a pass; BLOCK_H <= 1024, halved (not below 128) while T·blocks < 256."
    slots = min(32, _next_pow2(top_k))
    bh = min(1024, _next_pow2(H), 8192 // slots)
    while not INTERPRET and bh > 128 and T * _cdiv(H, bh) < 256: bh //= 2    # the interpreter pays per program
    return slots, bh

# %%
#| export
def batched_combine(expert_out: torch.Tensor,           # [E_local, max_tokens, hidden_size]
                    topk_weights: torch.Tensor,         # [num_tokens, top_k] fp32
                    slot_map: torch.Tensor,             # [num_tokens, top_k] int64 from batched_dispatch
                    out: torch.Tensor | None = None,    # [num_tokens, hidden_size], expert_out's dtype
                    apply_router_weight_on_input: bool = False,  # weights were applied at dispatch: sum with 1
                    validate: bool = True,              # check slot_map's range on the host (one sync)
                   ) -> torch.Tensor:                   # `out`
    """Weighted sum over each token's slots: `out[t] = Σ_k w[t,k]·expert_out.flat[slot_map[t,k]]`, fp32 accumulation.
    ValueError naming `expert_out`, `topk_weights`, `slot_map`, `out` (shape, dtype, device, overlap, a non-unit stride
    along hidden_size), `apply_router_weight_on_input` or `validate` (not bools), and with `validate` a `slot_map` value
    outside [-1, E·max_tokens). Source: the weighted combine of vLLM's batched finalize
    (`TopKWeightAndReduceNaiveBatched`) and of DeepEP LL's `low_latency_combine`, in one process."""
    check_tensor("expert_out", expert_out, ndim=3, dtype=(torch.bfloat16, torch.float16, torch.float32))
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input); check_bool("validate", validate)
    E, M, H = expert_out.shape
    check_tensor("topk_weights", topk_weights, ndim=2, dtype=torch.float32)
    T, top_k = topk_weights.shape
    check_tensor("slot_map", slot_map, shape=(T, top_k), dtype=torch.int64)
    check_kernel_device("expert_out", expert_out, topk_weights=topk_weights, slot_map=slot_map, out=out)
    out = torch.empty(T, H, dtype=expert_out.dtype, device=expert_out.device) if out is None else \
        check_disjoint("out", check_tensor("out", out, shape=(T, H), dtype=expert_out.dtype, writable=True), expert_out=expert_out,
                      topk_weights=topk_weights, slot_map=slot_map)
    for name, x in (("expert_out", expert_out), ("out", out)):
        if x.stride(-1) != 1: raise ValueError(f"{name}: expected a unit stride along hidden_size, got {x.stride(-1)}")
    if validate and T and ((slot_map < -1) | (slot_map >= E * M)).any():
        raise ValueError(f"slot_map: expected values in [-1, {E * M}), got {slot_map.min().item()}..{slot_map.max().item()}")
    return _batched_combine(expert_out, topk_weights, slot_map, out, apply_router_weight_on_input)

def _batched_combine(expert_out, topk_weights, slot_map, out, apply_router_weight_on_input,
                     addend=None, reset=None) -> torch.Tensor:
    """`batched_combine` after its checks, `out` allocated: for a finalize that holds its own dispatch's slot map.

    `addend` `[T, H']` (`H' <= H`, unit stride along it) is added to each token's first `H'` columns in the fp32 sum,
    before the one cast: the finalize's shared experts (on slabs padded past the hidden size too), without a launch
    of their own. `reset`, a contiguous int32 tensor, is zeroed by the launch (when it runs: T and H > 0) — the
    dispatch counts of the forward this combine ends, so that a prepare that keeps them launches no fill."""
    (M, H), (T, top_k) = expert_out.shape[1:], topk_weights.shape
    if T and H:
        slots, bh = _combine_tile(T, H, top_k)
        launch_kernel(_batched_combine_kernel, (T, _cdiv(H, bh)))(
            expert_out, topk_weights.contiguous(), slot_map.contiguous(), out, addend if addend is not None else out,
            H, M, expert_out.stride(0), expert_out.stride(1), out.stride(0),
            addend.stride(0) if addend is not None else 0, addend.shape[1] if addend is not None else 0, 0,
            expert_out.shape[0] * M, TOP_K=top_k, SLOTS=slots, BLOCK_H=bh,
            WEIGHTED=not apply_router_weight_on_input, PAIRS=False, ADD=addend is not None,
            **({} if reset is None else dict(reset_ptr=reset, n_reset=reset.numel(), BLOCK_R=_next_pow2(reset.numel()),
                                             RESET=True)))
    return out

def combine_pairs(y: torch.Tensor,           # [T·top_k, H] one row per (token, slot) pair, router weights applied
                  local_ids: torch.Tensor,   # [T, top_k] int32/int64 local expert per slot; others have no row
                  num_local: int,            # local experts: ids outside [0, num_local) are skipped, never read
                 ) -> torch.Tensor:          # [T, H], y's dtype
    """Each token's sum of its pairs' rows (the Standard format's finish), in one launch: `out[t] = Σ_k y[t·top_k + k]`.
    ValueError naming `local_ids`, `y` (shape, dtype, device, non-unit stride along H) or `num_local`. Source: vLLM's
    `ops.moe_sum` over top_k after GEMM2 (fused_moe.py); skipping non-local pairs (vLLM sums their zeroed rows) is
    moe-lit's own."""
    check_tensor("local_ids", local_ids, ndim=2, dtype=(torch.int32, torch.int64))
    T, k = local_ids.shape
    check_tensor("y", y, shape=(T * k, None), dtype=(torch.bfloat16, torch.float16, torch.float32))
    check_int("num_local", num_local, lo=0, hi=2**31)
    check_kernel_device("y", y, local_ids=local_ids)
    if y.stride(-1) != 1: raise ValueError(f"y: expected a unit stride along hidden_size, got {y.stride(-1)}")
    return _combine_pairs(y, local_ids, num_local)

def _combine_pairs(y, local_ids, num_local,
                   addend=None,   # [T, H] (unit stride along H) added in the fp32 sum: the shared experts' output
                   join=None,     # called before the launch: the stream that computes `addend` joins here (a graph)
                  ) -> torch.Tensor:
    "`combine_pairs` after its checks: for callers that built `y` and hold checked ids (`TritonExperts`)."
    (T, k), H = local_ids.shape, y.shape[1]
    out = torch.empty(T, H, dtype=y.dtype, device=y.device)
    if join is not None: join()
    if T and H:
        slots, bh = _combine_tile(T, H, k)
        launch_kernel(_batched_combine_kernel, (T, _cdiv(H, bh)))(
            y, y, local_ids.contiguous(), out, out if addend is None else addend, H, max(T * k, 1), 0, y.stride(0),
            out.stride(0), 0 if addend is None else addend.stride(0), 0 if addend is None else H, num_local,
            T * k, TOP_K=k, SLOTS=slots, BLOCK_H=bh, WEIGHTED=False, PAIRS=True, ADD=addend is not None)
    return out

def check_addend(addend: torch.Tensor | None, hidden: torch.Tensor,
                 dtype: torch.dtype | None = None):   # the output's dtype, where it is not hidden's (FP8 hidden)
    """A public experts call's `addend` (the shared experts' output): None, or `[T, H]` in the output's dtype (hidden's)
    and hidden's device, unit stride along H. ValueError naming `addend` (shape, dtype, device, stride) or `hidden` (not
    on a GPU without the interpreter). Source: moe-lit's own."""
    if addend is None: return
    check_tensor("addend", addend, shape=tuple(hidden.shape), dtype=dtype or hidden.dtype)
    check_kernel_device("hidden", hidden, addend=addend)
    if hidden.shape[1] and addend.stride(-1) != 1:
        raise ValueError(f"addend: expected a unit stride along hidden_size, got {addend.stride(-1)}")

def _no_pairs(T: int, H: int, like: torch.Tensor, addend=None, join=None,
              dtype: torch.dtype | None = None) -> torch.Tensor:   # the output's dtype (default like's)
    "The Standard experts' output when no pair has a row here (no token, or no local expert): zeros, or the addend."
    if join is not None: join()
    return like.new_zeros(T, H, dtype=dtype or like.dtype) if addend is None else addend.clone()

# %% [markdown]
# ## Local slots in one launch
#
# The Standard format does not dispatch: its experts take each pair's local slot on this rank, `-1` where the expert
# lives elsewhere — `04_placement.local_slot`, a gather from the placement's `slot_table`. In torch that is a clamp,
# an int32 → int64 copy of the ids and the gather: three launches at decode (about 8 µs on an H200 for DeepSeek-V3's
# allgather deployment at T = 1, `nbs/bench/profile_small_t_h200_016c6b0.log`). `local_slots` is the same gather in one:
# an id outside `[0, num_experts)`, `-1` included, reads nothing and gives `-1`, so no read leaves the table whatever
# the ids hold (nor trusts the table's last entry), and the offsets are int64.

# %%
#| export
@triton.jit
def _local_slot_kernel(ids_ptr,      # [n] int32/int64 global ids, -1 = none
                       table_ptr,    # [num_experts + 1] int64 slot table, last entry -1
                       out_ptr,      # [n] int64 local slots
                       n, num_experts, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """BLOCK consecutive ids: `out[i] = table[ids[i]]` for ids in [0, num_experts), else -1 (nothing read).

    grid = (cdiv(n, 1024),) with BLOCK = 1024 (`_local_slots`, launched only when n > 0); no program exits early,
    lanes past n are masked.
    Constexprs: `BLOCK` ids a program (1024); `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+
    when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(ids_ptr + offs, mask=m, other=-1).to(tl.int64)
    here = m & (g >= 0) & (g < num_experts)                          # -1 and anything outside: -1, nothing read
    tl.store(out_ptr + offs, tl.load(table_ptr + g, mask=here, other=-1), mask=m)

def local_slots(topk_ids: torch.Tensor,     # [T, top_k] int32/int64 global (physical) ids, -1 = none
                slot_table: torch.Tensor,   # [num_experts + 1] int64 (`Placement.slot_table`), last entry -1
               ) -> torch.Tensor:           # [T, top_k] int64 local slot on this rank, -1 = not local
    """`Placement.local_slot(topk_ids, validate=False)` in one launch: ids outside `[0, num_experts)` give -1;
    ValueError on a shape, dtype or device mismatch. (It names `topk_ids` or `slot_table`.) Source: moe-lit's own (the
    table is vLLM's `expert_map` plus a -1 entry)."""
    check_tensor("topk_ids", topk_ids, ndim=2, dtype=(torch.int32, torch.int64))
    check_tensor("slot_table", slot_table, ndim=1, dtype=torch.int64)
    if slot_table.shape[0] < 1: raise ValueError("slot_table: expected [num_experts + 1] entries, got 0")
    check_kernel_device("topk_ids", topk_ids, slot_table=slot_table)
    return _local_slots(topk_ids.contiguous(), slot_table.contiguous())

def _local_slots(topk_ids, slot_table) -> torch.Tensor:
    "`local_slots` after its checks (contiguous ids and table): the Standard prepare's hot path (`10_modular`)."
    out = torch.empty(topk_ids.shape, dtype=torch.int64, device=topk_ids.device)
    n = topk_ids.numel()
    if n: launch_kernel(_local_slot_kernel, (_cdiv(n, 1024),))(topk_ids, slot_table, out, n, slot_table.shape[0] - 1,
                                                               BLOCK=1024)
    return out

# %% [markdown]
# ## Tests
#
# Dispatch against its spec: the same counts, each pair's row holds its token's hidden state, the slot map is a
# permutation of the valid rows, and non-local and `-1` slots are `-1`. All three id translations are covered.

# %%
#| export
def check_dispatch(hidden, topk_ids, num_local_experts, max_tokens, local_ids, **kw):
    """Check `batched_dispatch` against `dispatch_batched_reference` on the local ids it should produce (test body).
    Returns `(a, counts, slot_map)`. AssertionError on any mismatch; ValueError from `batched_dispatch` for bad
    arguments. Source: moe-lit's own."""
    res = batched_dispatch(hidden, topk_ids, num_local_experts, max_tokens, **kw)
    a, counts, slot_map = res[:3]
    _, want_counts, want_map = dispatch_batched_reference(hidden.cpu(), local_ids.cpu(), num_local_experts, max_tokens)
    assert torch.equal(counts.cpu(), want_counts), (counts, want_counts)
    sm = slot_map.cpu()
    assert torch.equal(sm >= 0, want_map >= 0)                                    # the same pairs are local
    assert torch.equal(torch.where(sm >= 0, sm // max_tokens, -1), local_ids.cpu().long().clamp(min=-1))
    valid = sm[sm >= 0]
    assert valid.unique().numel() == valid.numel()                                 # no row given twice
    assert ((valid % max_tokens) < counts.cpu().long()[valid // max_tokens]).all()  # rows are the leading ones
    W = a.shape[2]                                                               # the wire's width: past H, zeros
    sent = torch.nn.functional.pad(hidden.cpu(), (0, W - hidden.shape[1]))       # (`hidden_width`)
    rows = a.reshape(-1, W)[slot_map.clamp(min=0)].cpu()                         # [T, top_k, W]
    src = sent[:, None, :].expand_as(rows)
    if (group := kw.get("quant_group")) is not None:                             # FP8 on the wire: `09b`'s spec, bit
        q, s = fp8_quantize_activations_reference(sent, "group", group_k=group)  # for bit, and each row's
        assert a.dtype == torch.float8_e4m3fn, a.dtype                           # scales beside it
        assert torch.equal(rows.float()[sm >= 0], q.float()[:, None, :].expand_as(rows)[sm >= 0])
        got = res[3].reshape(-1, s.shape[1])[slot_map.clamp(min=0)].cpu()
        assert torch.equal(got[sm >= 0], s[:, None, :].expand_as(got)[sm >= 0])
        past = torch.arange(max_tokens)[None, :] >= counts.cpu()[:, None]         # rows past the counts: not written
        if kw.get("out_scale") is not None: assert res[3].cpu()[past].isnan().all()
        return a, counts, slot_map
    scale = kw.get("topk_weights")
    if scale is not None and hidden.dtype != torch.float32:   # the fp32 product cast once: nearest on a GPU, truncated
        f = src.float() * scale.cpu()[..., None]              # by the interpreter, so within one unit of the last place
        torch.testing.assert_close(rows[sm >= 0].float(), f[sm >= 0], rtol=2.0 ** -7, atol=0)
        return a, counts, slot_map
    if scale is not None: src = src * scale.cpu()[..., None]
    assert torch.equal(rows[sm >= 0], src[sm >= 0])
    return a, counts, slot_map

# %%
#| test dispatch_all_translations
g = torch.Generator().manual_seed(0)
T, H, E, k, S = 13, 40, 9, 3, 2
hidden = torch.randn(T, H, generator=g).to(DEVICE)
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int(); ids[4, 2] = -1
ids = ids.to(DEVICE)
for rank in range(S):
    n_local, emap = determine_expert_map(S, rank, E, "linear")
    emap = emap.to(DEVICE)
    local = torch.where(ids >= 0, emap[ids.clamp(min=0).long()], -1)
    check_dispatch(hidden, ids, n_local, T, local, expert_map=emap)                    # linear, expert_map
    n_local, emap = determine_expert_map(S, rank, E, "round_robin")
    g2p, emap = round_robin_routing_tables(E, S, rank)[0].to(DEVICE), emap.to(DEVICE)
    local = torch.where(ids >= 0, emap[ids.clamp(min=0).long()], -1)
    check_dispatch(hidden, ids.long(), n_local, T, local, global_to_physical=g2p,       # round robin, physical ids
                   physical_offset=expert_block(E, S, rank)[0])
local = torch.where(ids < 5, ids, -1)
check_dispatch(hidden.bfloat16(), local, 5, T, local)                                    # ids already local, bf16
check_dispatch(hidden, local, 5, T, local, topk_weights=torch.rand(T, k, generator=g).to(DEVICE))   # weight on input
wide = torch.randn(3, 8192 + 72, generator=g).to(DEVICE, torch.bfloat16)     # a row past one block: two passes
check_dispatch(wide, local[:3], 5, 3, local[:3], topk_weights=torch.rand(3, k, generator=g).to(DEVICE))
check_dispatch(wide, local[:3], 5, 3, local[:3])
x = (torch.randn(T, 320, generator=g) * torch.logspace(-3, 3, T)[:, None]).to(DEVICE, torch.bfloat16)  # FP8 on the
n_local, emap = determine_expert_map(S, 1, E, "round_robin")                          # wire: 3 groups of 128, the
g2p, emap = round_robin_routing_tables(E, S, 1)[0].to(DEVICE), emap.to(DEVICE)         # last one partial; rows of
local = torch.where(ids >= 0, emap[ids.clamp(min=0).long()], -1)                       # very different scales
check_dispatch(x, ids.long(), n_local, T, local, global_to_physical=g2p, physical_offset=expert_block(E, S, 1)[0],
               quant_group=128, out_scale=torch.full((n_local, T, 3), float("nan"), device=DEVICE))
check_dispatch(x.half()[:, :40], local, 5, T, local, quant_group=32)                   # H below the group, fp16
check_dispatch(wide, local[:3], 5, 3, local[:3], quant_group=128)                      # two passes of whole groups
nan = lambda *shape, dtype=torch.bfloat16: torch.full(shape, float("nan"), device=DEVICE).to(dtype)
check_dispatch(hidden.bfloat16(), local, 5, T, local, hidden_width=64, out=nan(5, T, 64))   # a wire wider than the
check_dispatch(wide, local[:3], 5, 3, local[:3], hidden_width=8192 + 256,                   # rows: zeros sent past H
               topk_weights=torch.rand(3, k, generator=g).to(DEVICE), out=nan(5, 3, 8192 + 256))   # (two passes)
check_dispatch(x[:, :200], local, 5, T, local, quant_group=128, hidden_width=384,            # FP8: the third group
               out_scale=nan(5, T, 3, dtype=torch.float32))                                  # all zeros, as the spec's
test_fail(lambda: batched_dispatch(hidden, local, 5, T, hidden_width=39), contains="hidden_width: expected >= 40")

# %%
#| test dispatch_overflow_and_bad_input
hidden, ids = torch.randn(6, 8, device=DEVICE), torch.zeros(6, 2, dtype=torch.int32, device=DEVICE)
ids[:, 1] = 1                                                                            # 6 pairs on each of 2 experts
test_fail(lambda: batched_dispatch(hidden, ids, 2, 5), contains="max_tokens: expected >= 6")
a, counts, slot_map, flag = batched_dispatch(hidden, ids, 2, 5, check_overflow=False)   # graph-safe: the flag says so
test_eq(flag.item(), 1); test_eq(int((slot_map >= 0).sum()), 10); test_eq(counts.tolist(), [5, 5])   # capped
rows = slot_map[slot_map >= 0]; test_eq(rows.unique().numel(), 10)                      # no row given twice
emap = torch.tensor([-1, 0, -1, 1], dtype=torch.int32, device=DEVICE)                    # through a table: global 1, 3
test_fail(lambda: batched_dispatch(hidden, ids * 2 + 1, 2, 4, expert_map=emap), contains="max_tokens: expected >= 6")
g2p = torch.tensor([2, 0, 3, 1], dtype=torch.int64, device=DEVICE)                       # physical 0, 1 on this rank
a, counts, slot_map, flag = batched_dispatch(hidden, ids * 2 + 1, 2, 4, global_to_physical=g2p, check_overflow=False)
test_eq((flag.item(), counts.tolist(), int((slot_map >= 0).sum())), (1, [4, 4], 8))
test_fail(lambda: batched_dispatch(hidden, ids * 2 + 1, 2, 4, global_to_physical=g2p), contains="max_tokens: expected >= 6")
test_fail(lambda: batched_dispatch(hidden, ids + 5, 2, 6), contains="topk_ids: expected values in [-1, 2)")
test_fail(lambda: batched_dispatch(hidden, ids.float(), 2, 6), contains="topk_ids: expected dtype")
test_fail(lambda: batched_dispatch(hidden[:, None], ids, 2, 6), contains="hidden: expected a 2-D tensor")
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, expert_map=torch.zeros(4, dtype=torch.int64, device=DEVICE)), contains="expert_map: expected dtype torch.int32")
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, expert_map=torch.zeros(4, dtype=torch.int32, device=DEVICE),
                                   global_to_physical=torch.zeros(4, dtype=torch.int64, device=DEVICE)), contains="expert_map: expected None")
test_fail(lambda: batched_dispatch(hidden, ids, 0, 6), contains="num_local_experts: expected >= 1")
test_fail(lambda: batched_dispatch(hidden.to(torch.float8_e4m3fn), ids, 2, 6), contains="hidden: expected dtype")
for bad, msg in ((100, "quant_group: expected a power of two"), (16, "quant_group: expected"), (128.0, "quant_group: expected an int")):
    test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, quant_group=bad), contains=msg)
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, out_scale=torch.ones(2, 6, 1, device=DEVICE)), contains="out_scale: expected None")
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, quant_group=32, out_scale=torch.ones(2, 5, 1, device=DEVICE)),
          contains="out_scale: expected shape")
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, quant_group=32, out=torch.zeros(2, 6, 8, device=DEVICE)),
          contains="out: expected dtype torch.float8_e4m3fn")
emap = torch.tensor([0, 1, -1, -1], dtype=torch.int32, device=DEVICE)                    # a strided table: read as its values
strided = torch.stack([emap, torch.full_like(emap, 99)], 1)[:, 0]
test_eq(batched_dispatch(hidden, ids, 2, 6, expert_map=strided)[1].tolist(), batched_dispatch(hidden, ids, 2, 6, expert_map=emap)[1].tolist())
test_fail(lambda: batched_dispatch(torch.randn(8, 6, device=DEVICE).t(), ids, 2, 6), contains="hidden: expected a unit stride")
slabs = torch.zeros(2, 6, 8, device=DEVICE)                                   # out whose memory also holds the ids
test_fail(lambda: batched_dispatch(hidden, slabs.view(-1)[:12].view(torch.int32).view(6, 2), 2, 6, out=slabs),
          contains="out: expected a buffer that does not overlap topk_ids")
for bad, msg in (([0, 5, -1, -1], "expert_map: expected values in [-1, 2), got [0, 5, -1, -1]"),   # the tables are
                 ([0, 0, -1, 1], "expert_map: expected the local slots 0..1 once each")):      # one rank's, by
    test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, expert_map=torch.tensor(bad, dtype=torch.int32, device=DEVICE)),
              contains=msg)                                                                   # local_slot_table's rule
for bad in ([0, -5, 1, 2], [0, 1, 2, 9], [2, 2, 0, 1]):          # out of range or two experts on one physical id
    test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, global_to_physical=torch.tensor(bad, device=DEVICE)),
              contains="global_to_physical: expected a permutation of 0..3")
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, global_to_physical=g2p, physical_offset=3),
          contains="physical_offset: expected physical_offset + num_local_experts <= num_experts = 4")
test_fail(lambda: batched_dispatch(hidden, ids, 2, 6, physical_offset=2),
          contains="physical_offset: expected 0 without global_to_physical")

# %% [markdown]
# `local_slots` equals the placement's own lookup for every rank of a linear and a round-robin deployment, on ids that
# include `-1` and, through the public call, ids outside the range (they read `-1`, as `local_slot` without validation).

# %%
#| test local_slots_match_placement
g = torch.Generator().manual_seed(2)
for strategy in ("linear", "round_robin"):
    par = ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend="allgather_reducescatter")
    cfg = MoEConfig(num_experts=16, top_k=3, hidden_size=8, intermediate_size=8, parallel=par)
    for rank in range(4):
        p = Placement.build(cfg, strategy, ep_rank=rank)
        ids = torch.stack([torch.randperm(16, generator=g)[:3] for _ in range(9)]).int(); ids[2, 1] = -1
        for dt in (torch.int32, torch.int64):
            got = local_slots(ids.to(DEVICE, dt), p.slot_table.to(DEVICE))
            test_eq(got.dtype, torch.int64); test_eq(got.cpu().tolist(), p.local_slot(ids).tolist())
wild = torch.tensor([[-7, 16], [99, 3]], dtype=torch.int32, device=DEVICE)
test_eq(local_slots(wild, p.slot_table.to(DEVICE)).cpu().tolist(), p.local_slot(wild.cpu(), validate=False).tolist())
test_eq(local_slots(ids[:0].to(DEVICE), p.slot_table.to(DEVICE)).shape, (0, 3))
test_fail(lambda: local_slots(ids.float(), p.slot_table), contains="topk_ids: expected dtype")
test_fail(lambda: local_slots(ids, p.slot_table.int()), contains="slot_table: expected dtype torch.int64")
odd = p.slot_table.clone(); odd[-1] = 7                                    # a table whose last entry is not -1:
test_eq(local_slots(wild, odd.to(DEVICE)).cpu().tolist(), p.local_slot(wild.cpu(), validate=False).tolist())   # unread

# %% [markdown]
# Combine against its spec on slabs whose padding is poisoned (NaN, then 1e30): a `-1` slot or a padding row would
# show.

# %%
#| test combine_matches_reference
g = torch.Generator().manual_seed(1)
T, H, E, k = 11, 48, 4, 3
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int(); ids[0] = -1; ids[3, 1] = -1
ids, wts = ids.to(DEVICE), torch.rand(T, k, generator=g).to(DEVICE)
for dtype in (torch.float32, torch.bfloat16):
    for poison in (float("nan"), 1e30):
        a, counts, slot_map = batched_dispatch(torch.randn(T, H, generator=g).to(DEVICE, dtype), ids, E, T)
        poison_rows(a, counts, poison)
        want = combine_batched_reference(a.double(), wts, slot_map)
        got = batched_combine(a, wts, slot_map)
        assert_close(got, want); test_eq(got[0].abs().max().item(), 0.0)               # a token with no local slot
        assert_close(batched_combine(a, wts, slot_map, apply_router_weight_on_input=True),
                     combine_batched_reference(a.double(), wts, slot_map, apply_router_weight_on_input=True))
z = torch.randn(T, H, generator=g).to(DEVICE, dtype)                          # an addend (the shared experts' output)
assert_close(_batched_combine(a, wts, slot_map, torch.empty_like(z), False, z),   # in the same fp32 sum, one cast
             combine_batched_reference(a.double(), wts, slot_map) + z.double())
got = _batched_combine(a, wts, slot_map, torch.empty_like(z), False, z[:, :H - 8].contiguous())   # slabs past it
assert_close(got, combine_batched_reference(a.double(), wts, slot_map) + torch.nn.functional.pad(z[:, :H - 8].double(), (0, 8)))
test_fail(lambda: batched_combine(a, wts, slot_map + 1000), contains="slot_map: expected values in [-1, 44)")
wild = slot_map.clone(); wild[1, 0] = 2**40; wild[2, 1] = 44                   # unchecked: past the slabs, skipped
keep = wild.clone(); keep[1, 0] = keep[2, 1] = -1
assert_close(batched_combine(a, wts, wild, validate=False), combine_batched_reference(a.double(), wts, keep))
test_fail(lambda: batched_combine(a, wts.double(), slot_map), contains="topk_weights: expected dtype torch.float32")
test_fail(lambda: batched_combine(a, wts, slot_map.int()), contains="slot_map: expected dtype torch.int64")
buf32, a32 = torch.rand(T, H, device=DEVICE), a.float()                      # out whose memory also holds the weights
test_fail(lambda: batched_combine(a32, buf32[:, :k], slot_map, out=buf32), contains="out: expected a buffer that does not overlap topk_weights")
# more slots than one pass loads (32): a token's 40 slots in two passes
E2, k2 = 48, 40
ids2 = torch.stack([torch.randperm(E2, generator=g)[:k2] for _ in range(3)]).int().to(DEVICE); ids2[1, 5] = -1
wts2 = torch.rand(3, k2, generator=g).to(DEVICE)
a2, counts2, slot_map2 = batched_dispatch(torch.randn(3, H, generator=g).to(DEVICE), ids2, E2, 3)
poison_rows(a2, counts2, float("nan"))
assert_close(batched_combine(a2, wts2, slot_map2), combine_batched_reference(a2.double(), wts2, slot_map2))

# %% [markdown]
# ## The whole batched path
#
# Dispatch → `BatchedTritonExperts` (GEMM1 + SiLU-and-mul, GEMM2) → combine equals the float64 Standard reference,
# for each rank of a round-robin deployment, with `-1` ids, `top_k = 1` and `top_k = E`.

# %%
#| export
def batched_moe_triton(hidden: torch.Tensor,         # [T, H] bf16/fp16/fp32
                       w13: torch.Tensor,            # [E_local, 2·I, H] hidden's dtype
                       w2: torch.Tensor,             # [E_local, H, I] hidden's dtype
                       topk_weights: torch.Tensor,   # [T, top_k] fp32
                       topk_ids: torch.Tensor,       # [T, top_k] int32/int64 global ids, -1 = none
                       num_local_experts: int,       # E_local
                       max_tokens: int,              # rows per slab (capacity)
                       expected_m: int | None = None,  # expected rows per slab (the GEMM's tile choice)
                       apply_router_weight_on_input: bool = False,
                       **table) -> torch.Tensor:     # [T, H] hidden's dtype: this rank's share
    """Dispatch -> batched experts -> combine on Triton; `table` is `expert_map=` or `global_to_physical=,
    physical_offset=`. ValueError as `batched_dispatch` (shapes, tables, capacity overflow: host syncs),
    `BatchedTritonExperts.apply` and `batched_combine` raise. Source: vLLM's batched experts path
    (`BatchedTritonExperts`, fused_moe/fused_batched_moe.py) behind DeepEP low-latency / NIXL EP dispatch."""
    a, counts, slot_map = batched_dispatch(hidden, topk_ids, num_local_experts, max_tokens,
                                           topk_weights=topk_weights if apply_router_weight_on_input else None, **table)
    y = BatchedTritonExperts().apply(a, counts, w13, w2, expected_m=expected_m)
    return batched_combine(y, topk_weights, slot_map, apply_router_weight_on_input=apply_router_weight_on_input,
                           validate=False)

# %% [markdown]
# `combine_pairs` is the Standard format's finish (`08_kernels.contiguous`): one row per pair, summed per token; the
# rows of pairs whose expert is not local (-1, or any id outside `[0, num_local)`) are poisoned and must never be read.

# %%
#| test combine_pairs_skips_other_ranks
torch.manual_seed(5)
T, k, H = 6, 3, 40
ids = torch.randint(-1, 5, (T, k), device=DEVICE)                              # local experts 0..3; 4 and -1 are not
y = torch.randn(T * k, H, device=DEVICE)
local = (ids >= 0) & (ids < 4)
y[~local.flatten()] = float("nan")                                             # never read
want = torch.where(local[..., None], y.view(T, k, H).double(), 0.0).sum(1)
assert_close(combine_pairs(y, ids, 4), want)
test_fail(lambda: combine_pairs(y.double(), ids, 4), contains="y: expected dtype")
test_fail(lambda: combine_pairs(y[:-1], ids, 4), contains="y: expected shape [18, *]")
ids = torch.randint(-1, 5, (2, 40), device=DEVICE); y = torch.randn(80, H, device=DEVICE)   # 40 slots: two passes
local = (ids >= 0) & (ids < 4); y[~local.flatten()] = float("nan")
assert_close(combine_pairs(y, ids, 4), torch.where(local[..., None], y.view(2, 40, H).double(), 0.0).sum(1))

# %%
#| test batched_path_end_to_end
g = torch.Generator().manual_seed(2)
E, H, I, S = 6, 32, 16, 2
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
for T, k in ((9, 2), (5, 1), (4, E)):                                        # top_k = 1 and top_k = E
    hidden = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    if k > 1: ids[1, 0] = -1
    wts = torch.rand(T, k, generator=g)
    dev = lambda *ts: [t.to(DEVICE) for t in ts]
    for dtype in (torch.float32, torch.bfloat16):
        want = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, ids)
        total = torch.zeros(T, H, dtype=torch.float64)
        for rank in range(S):
            n_local, emap = determine_expert_map(S, rank, E, "round_robin")
            g2p, _, l2g = round_robin_routing_tables(E, S, rank)
            h_, w13_, w2_, wts_, ids_, g2p_ = dev(hidden.to(dtype), w13[l2g].to(dtype), w2[l2g].to(dtype), wts, ids.long(), g2p)
            total += batched_moe_triton(h_, w13_, w2_, wts_, ids_, n_local, T, global_to_physical=g2p_,
                                        physical_offset=expert_block(E, S, rank)[0]).double().cpu()
        assert_close(total.to(dtype), want, name=f"T={T} top_k={k} {dtype}")

# %% [markdown]
# On the GPU, at DeepSeek-V3 EP8 shapes (4096 tokens, hidden 7168, 32 of 256 experts local, top-8), where the
# atomics really race: counts, permutation and values still match the spec.

# %%
#| test dispatch_combine_real_shapes
#| gpu
T, H, E, k, S, rank = 4096, 7168, 256, 8, 8, 3
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int().cuda()
hidden = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
n_local, emap = determine_expert_map(S, rank, E, "linear")
local = torch.where(ids >= 0, emap.cuda()[ids.clamp(min=0).long()], -1)
a, counts, slot_map = check_dispatch(hidden, ids, n_local, T, local, expert_map=emap.cuda())
wts = torch.rand(T, k, device="cuda")
assert_close(batched_combine(a, wts, slot_map), combine_batched_reference(a.double(), wts, slot_map))
