# %%
#| default_exp kernels.contiguous

# %% [markdown]
# # The contiguous path: alignment and the fused-MoE GEMM
# > moe_align_block_size sorts the (token, slot) pairs by expert into blocks of BLOCK_M rows; a grouped GEMM then runs one expert per block over the flat Standard-format tokens.

# %%
#| export
from __future__ import annotations
import functools
import torch
from moe_lit.kernels.batched import INTERPRET, launch_kernel, _await_producers
import triton
import triton.language as tl
from moe_lit.terms import check_int, check_tensor, check_choice, check_bool, check_disjoint
from moe_lit.config import ActivationFormat
from moe_lit.formats import Activation, SILU
from moe_lit.kernels.batched import lookup_tile_config, fit_shared_memory, check_tile_config, check_kernel_device, TILE_DEFAULTS
from moe_lit.placement import local_slot_table
from moe_lit.kernels.batched import check_activation, check_expert_bias, epilogue_args, epilogue_constants, add_expert_bias, gated_activation
from moe_lit.kernels.batched import _cdiv, _next_pow2, _tile_config_root, _split_k_sum, split_k_launch, SPLIT_K_PROGRAMS_PER_SM
from moe_lit.kernels.batched import _split_k_choice, _split_k_buffers, _last_to_arrive, arrival_counters
import moe_lit.kernels.batched as _batched
from moe_lit.kernels.dispatch import _combine_pairs, _no_pairs, check_addend

# %%
#| hide
from moe_lit.kernels.batched import DEVICE
from unittest import mock
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close, record_launches, assert_compiles_for_gpu
from moe_lit.formats import moe_reference_standard
from moe_lit.placement import determine_expert_map
from moe_lit.kernels.contiguous import _fused_moe_gemm
from moe_lit.kernels.dispatch import _combine_pairs

# %% [markdown]
# In this notebook: the spec `moe_align_block_size_reference`, the Triton `moe_align_block_size`, the grouped GEMM
# `fused_moe_gemm` over the aligned blocks, and `TritonExperts`, the Standard-format experts (GEMM1 with the expert bias
# and the gated activation — SiLU or gpt-oss's clamped SwiGLU —, GEMM2 with the expert bias and the router weight,
# then the weighted sum over the slots). Motivation → reference → kernels → launchers → tests.
#
# ## Motivation
#
# In the Standard format the experts receive the flat token list `a1 [T, H]` with `topk_ids [T, top_k]`. A grouped GEMM
# wants each tile of rows to belong to one expert. `moe_align_block_size` therefore sorts the `T·top_k` (token, slot)
# pairs by expert and pads each expert's run to a multiple of `BLOCK_M` with a sentinel, so block `b` of the sorted
# list belongs to the single expert `expert_ids[b]`. The GEMM then gathers its rows through the sorted list — no
# activation is copied.
#
# **Contract** (vLLM's `moe_align_block_size`: `vllm/model_executor/layers/fused_moe/moe_align_block_size.py`, `csrc/moe/moe_align_sum_kernels.cu`):
# - `sorted_token_ids [max_padded]` int32: the flat pair index `t·top_k + k` of every pair routed to an expert,
#   each exactly once, grouped by expert in ascending expert order; every expert's run is padded to a multiple of
#   `block_size` with the sentinel `T·top_k`; positions past `num_tokens_post_padded` hold the sentinel too.
#   `max_padded = T·top_k + num_experts·(block_size − 1)` bounds the padded length.
# - `expert_ids [max_padded / block_size]` int32: the expert of each block — the *local* expert through `expert_map`,
#   `-1` for a block of an expert that is not local (its rows are computed by nobody and contribute 0).
# - `num_tokens_post_padded [1]` int32: `Σ_e ceil(cnt_e / B)·B`.
# - Slots with id `-1` (no expert) are not placed at all: they cannot be counted towards expert `E − 1` (vLLM #46408).
#
# ## Reference

# %%
#| export
def _check_align_args(topk_ids, block_size, num_experts, expert_map, validate=True):
    check_tensor("topk_ids", topk_ids, ndim=2, dtype=(torch.int32, torch.int64))
    if topk_ids.is_meta: raise ValueError("topk_ids: expected a tensor with values, got a meta tensor")   # before a read
    check_int("block_size", block_size, lo=1, hi=4097)
    check_int("num_experts", num_experts, lo=1, hi=2**16 + 1)         # the work buffers grow with E·block_size
    if validate and topk_ids.numel() and ((topk_ids < -1) | (topk_ids >= num_experts)).any():   # one host sync
        raise ValueError(f"topk_ids: expected values in [-1, {num_experts}), got {topk_ids.min().item()}..{topk_ids.max().item()}")
    if expert_map is not None:
        check_tensor("expert_map", expert_map, shape=(num_experts,), dtype=torch.int32)
        if validate and expert_map.device.type != "meta":   # one rank's map: each local slot 0..n-1 once (placement's rule)
            local_slot_table(num_experts, int((expert_map >= 0).sum()), 0, expert_map)

def moe_align_block_size_reference(topk_ids: torch.Tensor,     # [T, top_k] int32/int64, -1 = no expert
                                   block_size: int,            # BLOCK_M of the GEMM
                                   num_experts: int,           # global experts (ids are < num_experts)
                                   expert_map: torch.Tensor | None = None,  # [num_experts] int32 global -> local/-1
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spec: `(sorted_token_ids, expert_ids, num_tokens_post_padded)` with pairs in ascending (expert, pair) order. All
    int32, on the CPU. ValueError naming `topk_ids` (rank, dtype, ids outside [-1, num_experts)), `block_size`,
    `num_experts` or `expert_map` (shape, dtype, not one rank's map). Source: vLLM's `moe_align_block_size`
    (fused_moe/moe_align_block_size.py), its `ignore_invalid_experts=False` mode: count globally, then map to local."""
    _check_align_args(topk_ids, block_size, num_experts, expert_map)
    n, sentinel = topk_ids.numel(), topk_ids.numel()
    flat = topk_ids.reshape(-1).long().cpu()
    max_padded = n + num_experts * (block_size - 1)
    sorted_ids = torch.full((max_padded,), sentinel, dtype=torch.int32)
    expert_ids = torch.full((-(-max_padded // block_size),), -1, dtype=torch.int32)
    pos = 0
    for e in range(num_experts):
        pairs = (flat == e).nonzero()[:, 0]
        padded = -(-len(pairs) // block_size) * block_size
        sorted_ids[pos:pos + len(pairs)] = pairs.int()
        local = e if expert_map is None else int(expert_map[e])
        expert_ids[pos // block_size:(pos + padded) // block_size] = local
        pos += padded
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32)

# %%
#| test align_reference_worked_example
ids = torch.tensor([[2, 0], [2, -1], [1, 2]], dtype=torch.int32)    # pairs 0..5; pair 3 has no expert
s, e, n = moe_align_block_size_reference(ids, 2, 3)
test_eq(n.tolist(), [8])                                           # expert 0: 1 pair -> 2 rows, expert 1: 1 -> 2, expert 2: 3 -> 4
test_eq(s[:8].tolist(), [1, 6, 4, 6, 0, 2, 5, 6])                   # sentinel 6 pads each run
test_eq(e[:4].tolist(), [0, 1, 2, 2])

# %% [markdown]
# ## Alignment kernels
#
# Four small launches, all on int32 work buffers that are **zeroed before use** (sglang#3339 read uninitialised
# count buffers):
#
# ```
# count   (grid cdiv(T·top_k, BLOCK)):  counts[id] += 1 for every pair with 0 <= id < E     (atomics)
# offsets (grid 1):                     padded = ceil(counts / B)·B; offsets = exclusive cumsum(padded);
#                                       num_tokens_post_padded = Σ padded
# ids     (grid E):                     expert_ids[blocks of e] = local(e)  (its local id, or -1)
# scatter (grid cdiv(T·top_k, BLOCK)):  sorted[offsets[id] + atomic_add(cursor[id], 1)] = pair
# ```
#
# Within an expert's run the pairs come in the order the atomics grant them (program order in the interpreter, any
# order on a GPU): tests check the permutation and the padding, not the order inside a run.

# %%
#| export
@triton.jit
def _align_count_kernel(ids_ptr, counts_ptr, n, num_experts, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """BLOCK pairs of the flat ids: `counts[id] += 1` (atomics) for each id in [0, num_experts); others are skipped.

    grid = (cdiv(T·top_k, BLOCK),) with BLOCK = 256 (`moe_align_block_size`, launched only when T·top_k > 0); no
    program exits early, lanes past n are masked.
    Constexprs: `BLOCK` pairs a program (256); `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+
    when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
    tl.atomic_add(counts_ptr + ids, 1, mask=(ids >= 0) & (ids < num_experts))   # in bounds even if unvalidated

@triton.jit
def _align_offsets_kernel(counts_ptr, offsets_ptr, ntpp_ptr, num_experts,
                          BLOCK_SIZE: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    """Every expert at once: each count padded to a multiple of BLOCK_SIZE, their exclusive prefix sum stored to
    `offsets`, and the padded total to `num_tokens_post_padded`.

    grid = (1,) (`moe_align_block_size`, always launched).
    Constexprs: `BLOCK_SIZE` the alignment block (the GEMM's BLOCK_M); `BLOCK_E` next_pow2(num_experts), all counts in
    one block; `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    e = tl.arange(0, BLOCK_E)
    cnt = tl.load(counts_ptr + e, mask=e < num_experts, other=0)
    padded = (cnt + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
    ends = tl.cumsum(padded, axis=0)
    tl.store(offsets_ptr + e, ends - padded, mask=e < num_experts)
    tl.store(ntpp_ptr, tl.sum(padded, axis=0))

@triton.jit
def _align_expert_ids_kernel(counts_ptr, offsets_ptr, map_ptr, expert_ids_ptr,
                             BLOCK_SIZE: tl.constexpr, HAS_MAP: tl.constexpr, PDL: tl.constexpr = False):
    """Expert x's blocks: `expert_ids[b]` = its local id (x, or expert_map[x], -1 when not local) for the
    cdiv(counts[x], BLOCK_SIZE) blocks from offsets[x] / BLOCK_SIZE; an expert without pairs writes nothing.

    grid = (num_experts,), one program per global expert (`moe_align_block_size`, always launched).
    Constexprs: `BLOCK_SIZE` the alignment block (the GEMM's BLOCK_M); `HAS_MAP` translate through expert_map (else
    the id is the local id); `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    x = tl.program_id(0)                                        # one program per expert: its blocks get its id
    c = tl.load(counts_ptr + x)
    start = tl.load(offsets_ptr + x) // BLOCK_SIZE
    local = x
    if HAS_MAP: local = tl.load(map_ptr + x)                    # local id, or -1 for a non-local expert
    for b in range(start, start + (c + BLOCK_SIZE - 1) // BLOCK_SIZE):
        tl.store(expert_ids_ptr + b, local)

@triton.jit
def _align_scatter_kernel(ids_ptr, offsets_ptr, cursor_ptr, sorted_ptr, n, num_experts, BLOCK: tl.constexpr,
                          PDL: tl.constexpr = False):
    """BLOCK pairs of the flat ids: each pair p with an id in [0, num_experts) is written to
    `sorted[offsets[id] + atomic_add(cursor[id], 1)]` (its run, in the order the atomics grant).

    grid = (cdiv(T·top_k, BLOCK),) with BLOCK = 256 (`moe_align_block_size`, launched only when T·top_k > 0); no
    program exits early, lanes past n are masked.
    Constexprs: `BLOCK` pairs a program (256); `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+
    when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < n, other=-1)
    ok = (ids >= 0) & (ids < num_experts)
    rank = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
    start = tl.load(offsets_ptr + ids, mask=ok, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=ok)

# %%
#| export
def moe_align_block_size(topk_ids: torch.Tensor,     # [T, top_k] int32/int64, -1 = no expert
                         block_size: int,            # BLOCK_M of the GEMM that consumes the blocks
                         num_experts: int,           # global experts
                         expert_map: torch.Tensor | None = None,  # [num_experts] int32, global -> local or -1
                         validate: bool = True,      # check the id range on the host (one sync; off in hot paths)
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort pairs by expert, each run padded to `block_size`: `(sorted_token_ids [max_padded] int32 (pair index, T·top_k
    the padding sentinel), expert_ids [max_padded / block_size] int32 (local id, -1 not here), num_tokens_post_padded
    [1] int32)`, max_padded = T·top_k + num_experts·(block_size − 1). ValueError naming `topk_ids` (rank, dtype; with
    `validate` ids outside [-1, num_experts), one host sync), `block_size`, `num_experts`, or `expert_map` (shape,
    dtype; with `validate`, not one rank's map: placement's rule). Source: vLLM's `moe_align_block_size`
    (csrc/moe/moe_align_sum_kernels.cu, fused_moe/moe_align_block_size.py)."""
    _check_align_args(topk_ids, block_size, num_experts, expert_map, validate)
    check_kernel_device("topk_ids", topk_ids, expert_map=expert_map)   # the Triton launchers' own (not the spec's)
    dev, n = topk_ids.device, topk_ids.numel()
    max_padded = n + num_experts * (block_size - 1)
    sorted_ids = torch.full((max_padded,), n, dtype=torch.int32, device=dev)           # sentinel everywhere first
    expert_ids = torch.full((-(-max_padded // block_size),), -1, dtype=torch.int32, device=dev)
    work = torch.zeros(3 * num_experts + 1, dtype=torch.int32, device=dev)             # one fill for four buffers
    counts, cursor, offsets, ntpp = work.split([num_experts, num_experts, num_experts, 1])
    flat = topk_ids.reshape(-1)                  # int64 ids out of int32's range would wrap onto an expert: -1 first
    flat = (flat.clamp(-1, num_experts) if flat.dtype == torch.int64 else flat).to(torch.int32).contiguous()
    BLOCK = 256
    if n: launch_kernel(_align_count_kernel, (_cdiv(n, BLOCK),))(flat, counts, n, num_experts, BLOCK=BLOCK)
    launch_kernel(_align_offsets_kernel, (1,))(counts, offsets, ntpp, num_experts, BLOCK_SIZE=block_size,
                                               BLOCK_E=_next_pow2(num_experts))
    launch_kernel(_align_expert_ids_kernel, (num_experts,))(
        counts, offsets, expert_map if expert_map is not None else counts, expert_ids, BLOCK_SIZE=block_size,
        HAS_MAP=expert_map is not None)
    if n: launch_kernel(_align_scatter_kernel, (_cdiv(n, BLOCK),))(flat, offsets, cursor, sorted_ids, n, num_experts,
                                                                   BLOCK=BLOCK)
    return sorted_ids, expert_ids, ntpp

# %% [markdown]
# ### The aligned layout
#
# The figure shows `sorted_token_ids` for 10 tokens with top-2 over 5 experts and `block_size = 4`: each column is
# a position, coloured by the expert of its block; grey cells hold the sentinel (padding); vertical lines separate
# blocks, one expert per block.

# %%
#| export
def plot_aligned_layout(sorted_token_ids: torch.Tensor,  # [max_padded] int32
                        expert_ids: torch.Tensor,        # [num_blocks] int32
                        num_tokens_post_padded,          # [1] int32 tensor or int
                        block_size: int, num_pairs: int, title: str = ""):
    """Strip of the sorted, padded positions: colour = block's expert, grey = sentinel; returns the Figure. No argument
    checks: ImportError without matplotlib, ZeroDivisionError for `block_size` 0. Source: moe-lit's own."""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = int(num_tokens_post_padded)
    s, e = sorted_token_ids[:n].cpu(), expert_ids[: n // block_size].cpu()
    colour = e.repeat_interleave(block_size).float()
    colour[s >= num_pairs] = float("nan")                                     # sentinel
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * n), 1.6))
    cmap = plt.get_cmap("tab10").copy(); cmap.set_bad("lightgrey")
    ax.imshow(colour[None, :].numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=9, interpolation="nearest")
    for i, v in enumerate(s.tolist()):
        ax.text(i, 0, "·" if v >= num_pairs else str(v), ha="center", va="center", fontsize=7)
    for b in range(1, n // block_size): ax.axvline(b * block_size - 0.5, color="k", lw=1)
    ax.set_yticks([]); ax.set_xlabel("sorted position (number = pair t·top_k + k; · = sentinel)")
    ax.set_title(title or f"blocks of {block_size}; experts {e.tolist()}", fontsize=9)
    fig.tight_layout(); plt.close(fig)
    return fig

# %%
demo_ids = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(t))[:2] for t in range(10)]).int()
plot_aligned_layout(*moe_align_block_size_reference(demo_ids, 4, 5), block_size=4, num_pairs=20)

# %% [markdown]
# ## Tests of the alignment
#
# Invariants rather than a fixed order: every pair with an expert appears exactly once; each expert's run starts at
# its offset, holds exactly its pairs and is padded with the sentinel to a multiple of the block; the padded total
# is `Σ_e ceil(cnt_e / B)·B`; positions after it are sentinel; `expert_ids` match the reference (local ids, `-1` for
# non-local experts).

# %%
#| export
def check_alignment(topk_ids, block_size, num_experts, expert_map=None):
    """Compare `moe_align_block_size` with its spec through order-free invariants (the test body). Returns the kernel's
    `(sorted_token_ids, expert_ids, num_tokens_post_padded)` on the CPU. AssertionError on a broken invariant;
    ValueError from the alignment for bad arguments. Source: moe-lit's own."""
    s, e, n = moe_align_block_size(topk_ids, block_size, num_experts, expert_map)
    rs, re_, rn = moe_align_block_size_reference(topk_ids.cpu(), block_size, num_experts,
                                                 None if expert_map is None else expert_map.cpu())
    s, e, n = s.cpu(), e.cpu(), n.cpu()
    assert torch.equal(n, rn), (n, rn)
    total, sentinel = int(n), topk_ids.numel()
    assert torch.equal(e[: total // block_size], re_[: total // block_size])
    for b in range(total // block_size):                          # same pairs per block, in any order
        assert torch.equal(s[b * block_size:(b + 1) * block_size].sort().values,
                           rs[b * block_size:(b + 1) * block_size].sort().values) or \
               _same_run(s, rs, b, e, block_size), f"block {b}"
    assert (s[total:] == sentinel).all()
    placed = s[s != sentinel].long()
    flat = topk_ids.reshape(-1).cpu()
    assert torch.equal(placed.sort().values, (flat >= 0).nonzero()[:, 0])   # each pair with an expert once
    return s, e, n

def _same_run(s, rs, b, e, block_size):
    "Blocks of one expert may split its pairs differently; compare the expert's whole run instead."
    run = (e == e[b]).nonzero()[:, 0]
    lo, hi = int(run.min()) * block_size, (int(run.max()) + 1) * block_size
    return torch.equal(s[lo:hi].sort().values, rs[lo:hi].sort().values)

# %%
#| test align_invariants
g = torch.Generator().manual_seed(0)
for T, k, E, B in ((1, 1, 4, 16), (7, 2, 5, 4), (33, 8, 64, 16), (16, 4, 4, 64), (5, 3, 3, 1)):
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    ids[0, 0] = -1                                                        # a slot with no expert
    check_alignment(ids.to(DEVICE), B, E)
ids = torch.zeros(12, 2, dtype=torch.int64); ids[:, 1] = 3                     # every pair on two experts
check_alignment(ids.to(DEVICE), 8, 5)
n_local, emap = determine_expert_map(2, 1, 6, "round_robin")                    # non-local experts' blocks are -1
ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(9)]).int()
_, e, n = check_alignment(ids.to(DEVICE), 4, 6, emap.to(DEVICE))
assert set(e[: int(n) // 4].tolist()) <= {-1, 0, 1, 2}
check_alignment(torch.empty(0, 2, dtype=torch.int32, device=DEVICE), 16, 8)   # zero tokens
test_fail(lambda: moe_align_block_size(torch.tensor([[8]], device=DEVICE), 16, 8), contains="topk_ids: expected values in [-1, 8)")
s, e, n = moe_align_block_size(torch.tensor([[0, 100000], [1, 3]], device=DEVICE), 4, 2, validate=False)
test_eq(n.item(), 8)                                               # out-of-range ids are skipped, never indexed
s, e, n = moe_align_block_size(torch.tensor([[2**32, 2**32 + 1]], device=DEVICE), 4, 2, validate=False)
test_eq((n.item(), e.cpu().tolist()), (0, [-1, -1]))               # int64 ids past int32: skipped, not wrapped to 0, 1
test_fail(lambda: moe_align_block_size(torch.tensor([[1]], device=DEVICE), 0, 8), contains="block_size: expected >= 1")

# %% [markdown]
# ## A cheaper layout for tiny batches: one block per pair
#
# Alignment costs four launches and two atomic passes whatever the batch; at decode with a handful of tokens that
# fixed cost rivals the GEMMs (measured below). When the pairs are few, every pair can simply get its own block:
# position `p·B` holds pair `p`, the other `B − 1` rows of the block are the sentinel, and `expert_ids[p]` is the
# pair's local expert. One launch builds it, with no counting and no atomics. The GEMMs accept it unchanged — it is
# a valid aligned layout whose runs are one pair long — but each block reads its expert's whole weight slice, so two
# pairs of the same expert read it twice. With `T·top_k` pairs over many experts that is rare at `T ≤ 4` and
# common at larger `T`. `TritonExperts` uses pair blocks while the pairs are at most `pair_blocks_max_pairs` *and* at
# most a quarter of the model's experts (`num_experts`, global), so that few pairs share an expert: on Mixtral
# (8 experts, top-2) 32 pairs put 4 on every expert and the pair layout reads every weight 4 times (the layer
# benchmark of `14a_bench_layer` measured 2.5× the floor at T = 16 before this rule).
#
# Inside `TritonExperts` the layout is not even built: block `p` is pair `p`, so the GEMMs read the local ids
# themselves (`PAIR_IDS`: the block's expert is `local_ids[p]`, its one row pair `p`), and GEMM2 sums each token's
# slots itself (`COMBINE`, below): the experts take two launches at decode — GEMM1, then GEMM2 with the slot sum —
# where the built layout took four. `moe_pair_blocks` remains the
# public builder of the same layout (and what the GEMMs' public entry takes).

# %%
#| export
@triton.jit
def _pair_blocks_kernel(ids_ptr, map_ptr, sorted_ptr, expert_ids_ptr, ntpp_ptr, n, num_experts,
                        BLOCK_SIZE: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """BLOCK positions of the pair-block layout: position p·BLOCK_SIZE holds pair p and the rest the sentinel n;
    `expert_ids[p]` is pair p's local expert (through expert_map with HAS_MAP; -1 for an id outside [0, num_experts));
    program 0 also stores `num_tokens_post_padded` = n·BLOCK_SIZE.

    grid = (cdiv(n·block_size, BLOCK),) with BLOCK = max(256, next_pow2(block_size)) (`moe_pair_blocks`, launched only
    when n = T·top_k > 0); no program exits early, positions past n·BLOCK_SIZE are masked.
    Constexprs: `BLOCK_SIZE` the block (the GEMM's BLOCK_M); `HAS_MAP` translate through expert_map; `BLOCK` positions a
    program; `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)            # sorted positions
    ok = offs < n * BLOCK_SIZE
    pair = offs // BLOCK_SIZE
    first = (offs % BLOCK_SIZE) == 0
    tl.store(sorted_ptr + offs, tl.where(first, pair, n), mask=ok)   # pair p at p·B, sentinel elsewhere
    ids = tl.load(ids_ptr + pair, mask=ok & first, other=-1)
    in_range = (ids >= 0) & (ids < num_experts)
    local = tl.where(in_range, ids, -1)
    if HAS_MAP: local = tl.load(map_ptr + ids, mask=in_range, other=-1)   # global -> local or -1
    tl.store(expert_ids_ptr + pair, local, mask=ok & first)
    if tl.program_id(0) == 0: tl.store(ntpp_ptr, n * BLOCK_SIZE)

def moe_pair_blocks(topk_ids: torch.Tensor,     # [T, top_k] int32/int64, -1 = no expert
                    block_size: int,            # BLOCK_M of the GEMM
                    num_experts: int,           # global experts
                    expert_map: torch.Tensor | None = None,  # [num_experts] int32, global -> local or -1
                    validate: bool = True,      # check the id range on the host (one sync)
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block per (token, k) pair, in one launch: `(sorted_token_ids, expert_ids, num_tokens_post_padded)`. All
    int32: `[max(1, T·top_k)·block_size]`, `[max(1, T·top_k)]`, `[1]`. ValueError naming `topk_ids`, `block_size`,
    `num_experts` or `expert_map`, as `moe_align_block_size`. Source: vLLM's naive block assignment
    (`naive_block_assignment` in fused_moe.py: block `p` holds pair `p` alone)."""
    _check_align_args(topk_ids, block_size, num_experts, expert_map, validate)
    check_kernel_device("topk_ids", topk_ids, expert_map=expert_map)   # the Triton launchers' own (not the spec's)
    dev, n = topk_ids.device, topk_ids.numel()
    sorted_ids = torch.empty(max(1, n) * block_size, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(max(1, n), dtype=torch.int32, device=dev)
    ntpp = torch.empty(1, dtype=torch.int32, device=dev)
    if n == 0: return sorted_ids.fill_(0), expert_ids.fill_(-1), ntpp.fill_(0)
    BLOCK = max(256, _next_pow2(block_size))
    launch_kernel(_pair_blocks_kernel, (_cdiv(n * block_size, BLOCK),))(
        topk_ids.reshape(-1).contiguous(), expert_map if expert_map is not None else expert_ids, sorted_ids,
        expert_ids, ntpp, n, num_experts, BLOCK_SIZE=block_size, HAS_MAP=expert_map is not None, BLOCK=BLOCK)
    return sorted_ids, expert_ids, ntpp

# %%
#| test pair_blocks_layout
g = torch.Generator().manual_seed(3)
ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(3)]).int()
ids[1, 0] = -1
s, e, n = moe_pair_blocks(ids.to(DEVICE), 4, 6)
test_eq(n.item(), 24)
test_eq(s.cpu().view(6, 4)[:, 0].tolist(), list(range(6)))                  # pair p heads block p
assert (s.cpu().view(6, 4)[:, 1:] == 6).all()                               # the rest is the sentinel
test_eq(e.cpu().tolist(), ids.flatten().tolist())
n_local, emap = determine_expert_map(2, 1, 6, "linear")                     # rank 1 owns experts 3..5
_, e, _ = moe_pair_blocks(ids.to(DEVICE), 4, 6, emap.to(DEVICE))
test_eq(e.cpu().tolist(), [int(emap[i]) if i >= 0 else -1 for i in ids.flatten().tolist()])
_, e, n = moe_pair_blocks(torch.empty(0, 2, dtype=torch.int32, device=DEVICE), 16, 4)
test_eq((n.item(), e.cpu().tolist()), (0, [-1]))
_, e, _ = moe_pair_blocks(torch.tensor([[0, 99]], device=DEVICE), 4, 2, validate=False)
test_eq(e.cpu().tolist(), [0, -1])                                          # out-of-range ids: skipped, not indexed
test_fail(lambda: moe_pair_blocks(torch.tensor([[8]], device=DEVICE), 16, 8), contains="topk_ids: expected values in [-1, 8)")
for layout in (moe_align_block_size, moe_pair_blocks):        # a map is one rank's: each local slot once (placement's rule)
    for bad, msg in (([0, 7, -1, -1], "expert_map: expected values in [-1, 2), got [0, 7, -1, -1]"),
                     ([0, 0, -1, 1], "expert_map: expected the local slots 0..2 once each")):     # two experts, one slot
        test_fail(lambda: layout(torch.tensor([[0, 1]], device=DEVICE), 4, 4, torch.tensor(bad, dtype=torch.int32, device=DEVICE)),
                  contains=msg)

# %% [markdown]
# ## The grouped GEMM over aligned blocks
#
# ```
# for each block b of BLOCK_M sorted positions and N-tile n (one program):
#     if b·BLOCK_M >= num_tokens_post_padded or expert_ids[b] == -1: return       # no weight is read
#     pairs = sorted_token_ids[b-block];  valid = pairs < T·top_k                   # sentinel rows are masked
#     rows  = pairs // top_k  (GEMM1 reads token rows)   or   pairs  (GEMM2 reads pair rows)
#     acc   = A[rows] @ W[expert_ids[b], n-tile]ᵀ                                   # fp32
#     GEMM1: acc = act(w·gate + b_gate, w·up + b_up) with w = router weight when applied on the input (else 1)
#     GEMM2: acc = w·(acc + b) when the router weight is applied on the output (else acc + b)
#     C[pairs, n-tile] = acc                                                        # valid rows only
# ```
#
# Grid `(num_m_blocks · cdiv(N_out, BLOCK_N), SPLIT_K)` with `num_m_blocks = expert_ids.numel()` — `cdiv(max_padded,
# BLOCK_M)` for the aligned layout, `T·top_k` for pair blocks — N-tile major so consecutive programs share the
# weight tile; the split-K axis (`06`'s, 1 unless few experts are busy) divides a tile's K loop between programs. Row offsets are int64: `T·top_k·N` passes 2^31 at long prefills (sglang#4727: 56k tokens × top-8 × 7168).
# `-1` blocks write nothing; the final weighted sum (`combine_pairs` over the pair rows) skips the pairs that were
# never computed, so unwritten rows are never read. With the router weight on the input, a linear GEMM1 lets the
# weight scale the accumulators before the activation: `W1·(w·x) = w·(W1·x)`.
#
# **The epilogue** is the batched kernel's (`06_kernels.batched`): the same helpers `add_expert_bias` and
# `gated_activation` under the same constexprs `GATED`, `ACTIVATION` (`Activation.code`) and `HAS_BIAS`, with the
# runtime `alpha` and `limit`. The bias row is the block's expert `expert_ids[b]` — every row of an aligned block
# belongs to it. Its place relative to the router weight `w` follows the expert contract
# `out[t] = Σ_k w_tk · (W2·act(W13·x_t + b13) + b2)`:
#
# - router weight on the output: GEMM2 adds `b2` first, then multiplies by `w`, so the bias is weighted like the
#   rest of the expert's output;
# - router weight on the input: the weight scaled `x`, not the bias, so GEMM1 scales the accumulators by `w` first
#   and adds `b13` after: `W13·(w·x) + b13`; GEMM2 adds `b2` unweighted.
#
# > With `SILU` and no bias the kernel compiles exactly as before: the bias and clamp branches are constexpr-gated,
# > the bias pointer is `None`, and the tuned tiles are looked up under the same `fused_moe_gemm` keys.

# %%
#| export
@triton.jit
def _block_pairs(pid_m, expert_ids_ptr, sorted_ptr, ntpp_ptr, num_pairs, num_sorted, num_local,
                 BLOCK_M: tl.constexpr, PAIR_IDS: tl.constexpr):
    "`(live, e, pairs)` of block `pid_m`: whether it has work, its local expert (int64) and its `BLOCK_M` pair ids (`num_pairs` = empty row)."
    if PAIR_IDS:                                                # the pair-block layout read straight from the ids:
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)        # block p is pair p, in row 0, the rest empty
        pairs = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs).to(tl.int64)
        live = (e >= 0) & (e < num_local)
    else:                                                       # `moe_align_block_size`'s (or `moe_pair_blocks`') layout
        live = pid_m * BLOCK_M < tl.load(ntpp_ptr)
        e = tl.load(expert_ids_ptr + pid_m).to(tl.int64)        # pid_m < the blocks: always in bounds
        live = live & (e >= 0) & (e < num_local)
        offs_s = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_ptr + offs_s, mask=tl.where(live, offs_s < num_sorted, False), other=num_pairs).to(tl.int64)
    return live, e, pairs

# %%
#| export
@triton.jit
def _fused_moe_kernel(
    a_ptr,                 # [T, K] (GEMM1, token rows) or [T·top_k, K] (GEMM2, pair rows)
    w_ptr,                 # [E_local, N_w, K]
    w_desc,                # None, or a descriptor over w viewed as [E_local·N_w, K], box [BLOCK_N, BLOCK_K]
    c_ptr,                 # [T·top_k, N_OUT]
    sorted_ptr, expert_ids_ptr, ntpp_ptr,
    weights_ptr,           # [T·top_k] fp32 router weights (read when WEIGHT != 0)
    bias_ptr,              # [E_local, N_w] bf16/fp16/fp32, read as fp32 (None unless HAS_BIAS)
    part_ptr, lock_ptr,    # split-K workspace and counters (`06`'s `_split_k_sum`; unused with SPLIT_K = 1)
    N_OUT, N_W, K, num_pairs, num_m_blocks, num_sorted, num_local,
    alpha, limit,          # fp32, read only when ACTIVATION == 1
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_be, stride_bn,
    TOP_K: tl.constexpr, A_PER_PAIR: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PAIR_IDS: tl.constexpr = False,   # expert_ids_ptr holds the [T·top_k] local ids: block p is pair p alone (no alignment)
    # COMBINE (GEMM2 with PAIR_IDS): the last of a token's local pairs to store its row sums the token's rows (the slot
    # sum of `07`'s `_combine_pairs`, no launch of its own) into comb_out [T, N_OUT], plus comb_add in fp32 (ADD)
    comb_out_ptr=None, comb_add_ptr=None,
    comb_count_ptr=None,   # [T, cdiv(N_OUT, BLOCK_N)] int32 arrival counters, 0 before the launch and after it
    stride_ot=0, stride_at=0, add_cols=0,
    COMBINE: tl.constexpr = False, K_PAD: tl.constexpr = 1, ADD: tl.constexpr = False,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    """One `[BLOCK_M, BLOCK_N]` output tile of the grouped GEMM over aligned blocks: block pid_m's pairs (with PAIR_IDS
    pair pid_m alone) gather their a rows (token rows pair // TOP_K, or pair rows with A_PER_PAIR), times the block's
    expert's weight tile pid_n over split s's share of K; the epilogue (router weight, bias, activation) runs on the
    full sum and the valid pairs' rows are stored. With COMBINE the last of a token's local pairs to store also writes
    the token's sum of their rows (plus the addend with ADD) to comb_out.

    grid = (num_m_blocks·cdiv(N_OUT, BLOCK_N), SPLIT_K) with num_m_blocks = expert_ids.numel(): cdiv(max_padded,
    BLOCK_M) for `moe_align_block_size`'s layout, T·top_k for pair blocks (`_fused_moe_gemm`). A block past
    num_tokens_post_padded, or whose expert is outside [0, num_local) (-1: another rank's), exits before reading a
    weight; with SPLIT_K > 1 every split but the last to arrive returns after storing its partial. With COMBINE, a
    token none of whose pairs is local gets its row (0, or the addend) from the programs of its first slot (split 0)
    before they exit. (`w_desc`, a runtime argument, is None for pointer loads or a descriptor for TMA.)
    Constexprs: `TOP_K` slots a token; `A_PER_PAIR` a has a row per pair (GEMM2), else per token (GEMM1); `GATED`,
    `ACTIVATION`, `HAS_BIAS`, `UPCAST`, `EVEN_K`, `EVEN_N`, `PRECISION` as `06`'s `_batched_moe_gemm_kernel`'s;
    `WEIGHT` router weight: 0 none, 1 on the input (scales the accumulators before the bias), 2 on the output (after
    the bias); `GROUP_M` program order: 0 N-tile major, else grouped by GROUP_M blocks (the tile's); `BLOCK_M` the
    alignment block; `BLOCK_N`, `BLOCK_K` tile sizes; `SPLIT_K` K splits, grid axis 1 (1 with TMA); `PAIR_IDS`
    expert_ids holds the [T·top_k] local ids, block p = pair p; `COMBINE` sum each token's pair rows here (GEMM2 with
    PAIR_IDS); `K_PAD` next_pow2(TOP_K) (COMBINE); `ADD` add comb_add's first add_cols columns in fp32 (COMBINE);
    `PDL` programmatic dependent launch (`launch_kernel` sets it on sm_90+ when PDL is on)."""
    _await_producers(PDL)                                    # before any load or store
    pid, split = tl.program_id(0), tl.program_id(1)
    if GROUP_M == 0:                                            # N-tile major: a weight tile serves every block
        pid_n, pid_m = pid // num_m_blocks, pid % num_m_blocks
    else:                                                       # grouped order (Triton matmul tutorial): A reuse
        num_n = tl.cdiv(N_OUT, BLOCK_N)
        first_m = (pid // (GROUP_M * num_n)) * GROUP_M
        rows_in_group = tl.minimum(num_m_blocks - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * num_n)) % rows_in_group
        pid_n = (pid % (GROUP_M * num_n)) // rows_in_group
    live, e, pairs = _block_pairs(pid_m, expert_ids_ptr, sorted_ptr, ntpp_ptr, num_pairs, num_sorted, num_local,
                                  BLOCK_M, PAIR_IDS)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if COMBINE:                                                 # block pid_m is pair pid_m, of token pid_m // TOP_K
        tok = (pid_m // TOP_K).to(tl.int64)
        ks = tl.arange(0, K_PAD)
        ids = tl.load(expert_ids_ptr + tok * TOP_K + ks, mask=ks < TOP_K, other=-1)
        mine = (ids >= 0) & (ids < num_local) & (ks < TOP_K)   # the token's pairs with a row here
        n_live = tl.sum(mine.to(tl.int32), axis=0)
        if (n_live == 0) & (pid_m % TOP_K == 0) & (split == 0):  # none: the token's row is the addend, or 0
            _combine_store(tl.zeros((BLOCK_N,), dtype=tl.float32), comb_out_ptr, comb_add_ptr, tok, offs_n, N_OUT,
                           stride_ot, stride_at, add_cols, ADD)
    if not live: return                                         # past the padded end, or another rank's expert: no read
    valid = (pairs >= 0) & (pairs < num_pairs)                  # sentinel (and any out-of-range) rows are masked
    rows = pairs if A_PER_PAIR else pairs // TOP_K
    n_kt = tl.cdiv(K, BLOCK_K)
    kt_lo, kt_hi = split * n_kt // SPLIT_K, (split + 1) * n_kt // SPLIT_K   # this program's K tiles (all without split-K)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (kt_lo * BLOCK_K + offs_k)[None, :] * stride_ak
    w_ptrs = w_ptr + e * stride_we + offs_n[None, :] * stride_wn + (kt_lo * BLOCK_K + offs_k)[:, None] * stride_wk
    row_w = (e * N_W + pid_n * BLOCK_N).to(tl.int32)           # descriptor row (E·N_w < 2^31 is checked on the host)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(kt_lo, kt_hi):
        k_ok = offs_k < K - k * BLOCK_K
        if EVEN_K: a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)
        else: a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w, w_up = _load_w(w_ptrs, w_desc, row_w, k * BLOCK_K, N_OUT * stride_wn, k_ok, offs_n < N_OUT, N_OUT,
                          GATED, EVEN_K, EVEN_N)
        if UPCAST: a, w, w_up = a.to(tl.float32), w.to(tl.float32), w_up.to(tl.float32)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if GATED: acc_up = tl.dot(a, w_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk
    if SPLIT_K > 1:                                             # only the last split to arrive goes on
        acc, acc_up, last = _split_k_sum(acc, acc_up, part_ptr, lock_ptr, pid, tl.num_programs(0), split, GATED,
                                         SPLIT_K, BLOCK_M, BLOCK_N)
        if not last: return
    if WEIGHT != 0: rw = tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    if WEIGHT == 1: acc, acc_up = acc * rw, acc_up * rw         # on the input: scales the linear GEMM1, not its bias
    if HAS_BIAS:                                                # the block's expert's row, fp32
        acc, acc_up = add_expert_bias(acc, acc_up, bias_ptr + e * stride_be, offs_n, offs_n < N_OUT, N_OUT,
                                       stride_bn, GATED)
    if WEIGHT == 2: acc = acc * rw                              # on the output (GEMM2), bias included, in fp32
    if GATED: acc = gated_activation(acc, acc_up, alpha, limit, ACTIVATION)
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N_OUT))
    if COMBINE:                                                 # counted in after the store; the last sums, in k order
        if _last_to_arrive(comb_count_ptr + tok * tl.cdiv(N_OUT, BLOCK_N) + pid_n, n_live):
            y = tl.load(c_ptr + (tok * TOP_K + ks)[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                        mask=mine[:, None] & (offs_n[None, :] < N_OUT), other=0.0).to(tl.float32)   # [K_PAD, BLOCK_N]
            _combine_store(tl.sum(y, axis=0), comb_out_ptr, comb_add_ptr, tok, offs_n, N_OUT, stride_ot, stride_at,
                           add_cols, ADD)

@triton.jit
def _combine_store(acc, out_ptr, add_ptr, tok, offs_n, N_OUT, stride_ot, stride_at, add_cols, ADD: tl.constexpr):
    "Token `tok`'s columns `offs_n` of the combined output: `acc` (fp32), plus the addend's (ADD), cast once."
    if ADD: acc += tl.load(add_ptr + tok * stride_at + offs_n, mask=offs_n < add_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + tok * stride_ot + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N_OUT)

@triton.jit
def _load_w(w_ptrs, w_desc, row_w, k0, up_off, k_ok, n_ok, N_OUT, GATED: tl.constexpr, EVEN_K: tl.constexpr,
            EVEN_N: tl.constexpr):
    "The `[BLOCK_K, BLOCK_N]` weight tile (and the up tile when gated): through the descriptor, or masked pointer loads."
    if w_desc is not None:                                      # TMA: whole boxes (the host allows it for even N)
        w = w_desc.load([row_w, k0]).T
        w_up = w
        if GATED: w_up = w_desc.load([row_w + N_OUT, k0]).T
    else:
        if EVEN_K and EVEN_N:
            w = tl.load(w_ptrs)
            w_up = w
            if GATED: w_up = tl.load(w_ptrs + up_off)
        else:
            mask = k_ok[:, None] & n_ok[None, :]
            w = tl.load(w_ptrs, mask=mask, other=0.0)
            w_up = w
            if GATED: w_up = tl.load(w_ptrs + up_off, mask=mask, other=0.0)
    return w, w_up

# %%
#| export
def fused_moe_gemm(a: torch.Tensor,                  # [T, K] token rows (GEMM1) or [T·top_k, K] pair rows (GEMM2)
                   w: torch.Tensor,                  # [E_local, N, K]; gate rows then up rows when gated
                   sorted_token_ids: torch.Tensor,   # [max_padded] int32 from moe_align_block_size
                   expert_ids: torch.Tensor,         # [max_padded / BLOCK_M] int32, local expert or -1
                   num_tokens_post_padded: torch.Tensor,  # [1] int32
                   top_k: int,                       # slots per token
                   block_m: int,                     # the block size the alignment used
                   activation: Activation | str | None = None,  # None, an Activation, or "silu_and_mul" (SILU)
                   topk_weights: torch.Tensor | None = None,  # [T, top_k] fp32, applied per `weight_stage`
                   weight_stage: str | None = None,  # None, "input" (GEMM1) or "output" (GEMM2)
                   out: torch.Tensor | None = None,  # [T·top_k, N or N/2]; rows of uncomputed pairs untouched
                   config: dict | None = None,       # tile override (BLOCK_M is fixed by the alignment)
                   rows: str = "token",              # "token": a has a row per token (GEMM1); "pair": per pair (GEMM2)
                   expected_m: int | None = None,    # expected rows per expert (tile lookup); default pairs / E
                   bias: torch.Tensor | None = None, # [E_local, N] bf16/fp16/fp32: fp32 add before act / router weight
                   active_experts: int | None = None,  # expected local experts with pairs (split-K; default min(E, pairs))
                  ) -> torch.Tensor:
    """Grouped GEMM over aligned blocks: `out[pair] = act(a[row(pair)] @ w[e]ᵀ + bias[e])`, e = expert(block) (vLLM's
    fused_moe_kernel). ValueError naming the argument: `a`, `w` (odd N when gated), `out`, `bias`, the layout
    (`sorted_token_ids`, `expert_ids`, `num_tokens_post_padded`: `check_aligned_args`), `top_k`, `block_m`,
    `weight_stage`, `topk_weights`, `activation`, `rows`, `config`, `expected_m`, `active_experts`, or a tensor on
    another device. The layout's values are not read on the host: blocks whose expert is outside [0, E_local) are
    skipped."""
    check_tensor("a", a, ndim=2, dtype=(torch.bfloat16, torch.float16, torch.float32))
    check_tensor("w", w, shape=(None, None, a.shape[1]), dtype=a.dtype)
    check_kernel_device("a", a, w=w, out=out, sorted_token_ids=sorted_token_ids, expert_ids=expert_ids,
                        num_tokens_post_padded=num_tokens_post_padded, topk_weights=topk_weights)
    act = check_activation(activation)
    per_pair = check_choice("rows", rows, ("token", "pair")) == "pair"
    check_int("top_k", top_k, lo=1)
    num_pairs = (a.shape[0] if per_pair else a.shape[0] * top_k)
    check_aligned_args(sorted_token_ids, expert_ids, num_tokens_post_padded, top_k, block_m, weight_stage,
                        topk_weights, num_pairs, gated=act is not None)
    check_tile_config(config)
    E, N, K = w.shape
    if K == 0 and num_pairs and E: raise ValueError(f"a: expected at least one column (K >= 1), got shape {list(a.shape)}")
    if act and N % 2: raise ValueError(f"w: expected an even N (gate rows, then up rows) for {act.name}, got {N}")
    check_expert_bias("bias", bias, E, N, a.device)
    n_out = N // 2 if act else N
    if out is not None: check_disjoint("out", check_tensor("out", out, shape=(num_pairs, n_out), dtype=a.dtype, writable=True), a=a, w=w,
                                        sorted_token_ids=sorted_token_ids, expert_ids=expert_ids, topk_weights=topk_weights, bias=bias)
    if expected_m is not None: check_int("expected_m", expected_m, lo=1)
    if active_experts is not None: check_int("active_experts", active_experts, lo=0)
    return _fused_moe_gemm(a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k, block_m, act,
                           topk_weights, weight_stage, out, config, per_pair, expected_m, bias, active_experts)

def _fused_moe_gemm(a, w, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k, block_m, act, topk_weights,
                    weight_stage, out, config, per_pair, expected_m, bias, active_experts=None,
                    combine=None,   # GEMM2 on pair blocks (`PAIR_IDS`): `(out [T, N], addend [T, N] or None)`, summed in
                   ) -> torch.Tensor:
    """`fused_moe_gemm` after its checks: for callers that built every argument themselves (`TritonExperts`). With
    `combine`, the launch also writes each token's sum of its local pairs' rows (plus the addend) to `combine[0]`: the
    slot sum of `_combine_pairs`, done by the last of the token's pairs to finish (`COMBINE`)."""
    E, N, K = w.shape
    n_out = N // 2 if act else N
    num_pairs = a.shape[0] if per_pair else a.shape[0] * top_k
    if out is None: out = torch.empty(num_pairs, n_out, dtype=a.dtype, device=a.device)
    if num_pairs == 0 or E == 0: return out                     # nothing to compute (no expert on this rank: all -1)
    pair_ids = sorted_token_ids is None                         # None: `_align_pairs`' pair blocks
    tiles, split, bm, bn, bk, tma, kw = _fused_plan(
        E, N, K, a.shape[0], a.stride(), w.stride(), out.stride(), w.data_ptr() & 15, a.dtype, top_k, block_m, act,
        weight_stage, None if config is None else tuple(sorted(config.items())), per_pair, expected_m,
        None if bias is None else bias.stride(), active_experts, expert_ids.numel(),
        -1 if pair_ids else sorted_token_ids.numel(), a.device, _tile_config_root(), SPLIT_K_PROGRAMS_PER_SM["16-bit"],
        _batched.SPLIT_K_WORKSPACE_BYTES)
    w_desc = None
    if tma:                                                     # whole boxes: the up tile never crosses rows
        from triton.tools.tensor_descriptor import TensorDescriptor
        w_desc = TensorDescriptor.from_tensor(w.view(E * N, K), [bn, bk])
    if pair_ids: sorted_token_ids = num_tokens_post_padded = expert_ids           # (unread pointers)
    part, locks = _split_k_buffers(split, tiles, bm, bn, a.device)
    comb = {}
    if combine is not None:                                     # counters past the split-K ones: disjoint in the launch
        (comb_out, addend), nb, used = combine, _cdiv(kw["N_OUT"], bn), 0 if locks is None else locks.numel()
        comb = dict(comb_out_ptr=comb_out, comb_add_ptr=comb_out if addend is None else addend,
                    comb_count_ptr=arrival_counters(used + comb_out.shape[0] * nb, a.device)[used:],
                    stride_ot=comb_out.stride(0), stride_at=0 if addend is None else addend.stride(0),
                    add_cols=0 if addend is None else addend.shape[1], COMBINE=True, K_PAD=_next_pow2(top_k),
                    ADD=addend is not None)
    launch_kernel(_fused_moe_kernel, (tiles, split))(
        a, w, w_desc, out, sorted_token_ids, expert_ids, num_tokens_post_padded, part_ptr=part, lock_ptr=locks,
        weights_ptr=topk_weights.contiguous() if topk_weights is not None else out, bias_ptr=bias, **kw, **comb)
    return out

@functools.lru_cache(maxsize=4096)
def _fused_plan(E, N, K, rows, a_strides, w_strides, out_strides, w_misalign, dtype, top_k, block_m, act, weight_stage,
                config_items, per_pair, expected_m, bias_strides, active_experts, num_m_blocks, num_sorted, device,
                config_dir, programs_per_sm, workspace_bytes) -> tuple:
    """What `_fused_moe_gemm` launches with besides its tensors, worked out once per shape and kept: `(tiles, SPLIT_K,
    BLOCK_M, BLOCK_N, BLOCK_K, TMA, keyword arguments)`. Its arguments are everything that work reads (the split-K
    knobs and the tile tables' folder included), so a changed one is a new entry, never a stale plan."""
    n_out = N // 2 if act else N
    num_pairs = rows if per_pair else rows * top_k
    if expected_m is None: expected_m = max(1, num_pairs // E)
    bm, bn, bk, tma, group_m, rest = _fused_tile(E, N, K, expected_m, dtype, block_m, act is not None, config_items,
                                                 config_dir)
    contiguous = w_strides == (N * K, K, 1)
    tma = bool(tma and n_out % bn == 0 and contiguous and (K * dtype.itemsize) % 16 == 0 and w_misalign == 0
               and E * N < 2**31)       # a descriptor needs a contiguous w, 16-byte aligned rows and base
    tiles, rest = num_m_blocks * _cdiv(n_out, bn), dict(rest)
    split = 1 if tma else _split_k_choice(rest, _cdiv(n_out, bn), min(E, num_pairs if active_experts is None else active_experts),
                                         _cdiv(K, bk), tiles, bm, bn, programs_per_sm)   # (TMA does not split)
    rest.pop("SPLIT_K", None)
    ep = epilogue_constants(act, bias_strides)
    kw = dict(N_OUT=n_out, N_W=N, K=K, num_pairs=num_pairs, num_m_blocks=num_m_blocks,
              num_sorted=num_m_blocks if num_sorted < 0 else num_sorted, num_local=E,
              stride_am=a_strides[0], stride_ak=a_strides[1], stride_we=w_strides[0], stride_wn=w_strides[1],
              stride_wk=w_strides[2], stride_cm=out_strides[0], stride_cn=out_strides[1], **ep,
              TOP_K=top_k, A_PER_PAIR=per_pair, WEIGHT={None: 0, "input": 1, "output": 2}[weight_stage],
              UPCAST=INTERPRET and dtype == torch.bfloat16, EVEN_K=K % bk == 0, EVEN_N=n_out % bn == 0, GROUP_M=group_m,
              PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
              SPLIT_K=split, PAIR_IDS=num_sorted < 0, **rest)
    return tiles, split, bm, bn, bk, tma, kw

@functools.lru_cache(maxsize=1024)
def _gemm1_block_m(E, N, K, expected_m, dtype, config_dir) -> int:
    "The tuned GEMM1 tile's BLOCK_M, which the experts align to, checked (a table's value) and resolved once per shape."
    bm = lookup_tile_config("fused_moe_gemm", E, N, K, expected_m, dtype, config_dir=config_dir)["BLOCK_M"]
    try: return check_block_m(bm)
    except ValueError as e:                                     # a tile table's value: name where it came from
        raise ValueError(f"{e} (GEMM1's BLOCK_M, the alignment block, from the fused_moe_gemm tile table for E={E}, "
                         f"N={N} in {config_dir or 'the package configs'})") from None

@functools.lru_cache(maxsize=1024)
def _fused_tile(E, N, K, expected_m, dtype, block_m, gated, config_items, config_dir) -> tuple:
    "`(BLOCK_M, BLOCK_N, BLOCK_K, TMA, GROUP_M, {num_warps, num_stages})` of one GEMM shape, resolved once (no per-call lookups)."
    cfg = dict(config_items) if config_items is not None else \
        lookup_tile_config("fused_moe_gemm", E, N, K, expected_m, dtype, config_dir=config_dir)
    cfg = {**TILE_DEFAULTS, **cfg, "BLOCK_M": block_m}
    if not INTERPRET: cfg = fit_shared_memory(cfg, gated, dtype.itemsize)
    cfg.pop("WARP_SPECIALIZE", None)
    return (cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K"), cfg.pop("TMA", False), cfg.pop("GROUP_M", 0),
            cfg)

def check_aligned_args(sorted_token_ids, expert_ids, num_tokens_post_padded, top_k, block_m, weight_stage,
                        topk_weights, num_pairs,
                        gated: bool = False):       # a gated activation is fused: the router weight cannot go on its output
    """The aligned layout and router-weight arguments every grouped GEMM over aligned blocks takes (devices: the
    caller's `check_kernel_device`). ValueError naming `top_k`, `block_m`, `weight_stage` ('output' with `gated` too; None with `topk_weights`),
    `sorted_token_ids` (dtype, contiguity, a length that does not fit `num_pairs`), `expert_ids`,
    `num_tokens_post_padded` or `topk_weights`. Source: moe-lit's own checks of vLLM's aligned layout
    (`moe_align_block_size`'s outputs)."""
    check_int("top_k", top_k, lo=1); check_block_m(block_m)
    check_choice("weight_stage", weight_stage, (None, "input", "output"))
    if gated and weight_stage == "output":
        raise ValueError("weight_stage: expected None or 'input' with a gated activation (a router weight on GEMM1's "
                         "output would scale only the gate half before the activation), got 'output'")
    check_tensor("sorted_token_ids", sorted_token_ids, ndim=1, dtype=torch.int32, contiguous=True)
    # The layouts' lengths: moe_align_block_size's pairs + num_experts · (block_m - 1), moe_pair_blocks' pairs · block_m
    # — both pairs + a multiple of block_m - 1. Their padding id is their pair count: with another count here, padding
    # would be read as a pair, or pairs dropped. The length catches most such mismatches (not every one: the number
    # of experts is the alignment's, not known here); with no pairs nothing is read or written.
    extra = sorted_token_ids.numel() - num_pairs
    if num_pairs and (extra < 0 or (extra % (block_m - 1) if block_m > 1 else extra)):
        raise ValueError(
            f"sorted_token_ids: expected {num_pairs} + a multiple of {block_m - 1} entries (the length moe_align_block_size "
            f"and moe_pair_blocks give the {num_pairs} pairs of these rows at top_k={top_k}, block_m={block_m}), got "
            f"{sorted_token_ids.numel()}: align the same rows with the same top_k and block_m")
    check_tensor("expert_ids", expert_ids, shape=(-(-sorted_token_ids.numel() // block_m),), dtype=torch.int32, contiguous=True)
    check_tensor("num_tokens_post_padded", num_tokens_post_padded, shape=(1,), dtype=torch.int32, contiguous=True)
    if weight_stage is not None:
        check_tensor("topk_weights", topk_weights, shape=(num_pairs // top_k, top_k), dtype=torch.float32)
    elif topk_weights is not None:                          # given, and silently not applied: refused
        raise ValueError("weight_stage: expected 'input' or 'output' with topk_weights given (where the router weight "
                         "multiplies), got None")

def check_local_ids(local_ids: torch.Tensor, num_local: int, validate: bool):
    """With `validate`, local ids in [-1, num_local) (one host sync); the experts' hot paths pass False. ValueError
    naming `validate` (not a bool) or `local_ids`. Source: moe-lit's own."""
    check_bool("validate", validate)
    if validate and local_ids.numel() and ((local_ids < -1) | (local_ids >= num_local)).any():
        raise ValueError(f"local_ids: expected values in [-1, {num_local}), got {local_ids.min().item()}..{local_ids.max().item()}")

def check_block_m(block_m) -> int:
    """BLOCK_M of the alignment and the GEMM: a power of two, at least 16 for the tensor cores (1 in the interpreter).
    At most 256. ValueError naming `block_m`. Source: moe-lit's own (`tl.dot`'s 16-row minimum on a GPU)."""
    check_int("block_m", block_m, lo=16 if not INTERPRET else 1, hi=257)
    if block_m & (block_m - 1): raise ValueError(f"block_m: expected a power of two, got {block_m}")
    return block_m

# %% [markdown]
# The GEMM alone, against a float64 spec, through every code path of the kernel: even and ragged K and N (masked
# loads), the grouped program order, and the weight tile through a tensor descriptor. Rows of pairs that have no
# local expert are poisoned with NaN first and must come back untouched; every other row must be written.

# %%
#| test fused_moe_gemm_paths
g, launches = torch.Generator().manual_seed(4), []
for H, I in ((64, 64), (48, 40)):                                          # even, then ragged K and N
    E, T, k = 4, 13, 2
    x, w = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g) / H**0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    ids[2, 1] = ids[7, 0] = -1
    gate, up = torch.einsum("th,enh->ten", x.double(), w.double()).split(I, dim=-1)
    want = (torch.nn.functional.silu(gate) * up)[torch.arange(T)[:, None], ids.long().clamp(min=0)].reshape(T * k, I)
    aligned = moe_align_block_size(ids.to(DEVICE), 16, E)
    for cfg in (dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1), dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=2),
                dict(BLOCK_N=32, BLOCK_K=32, TMA=True), dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=3),   # split-K, uneven,
                dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=2, SPLIT_K=2)):                            # and grouped order
        out = torch.full((T * k, I), float("nan"), device=DEVICE)
        with record_launches() as seen:
            fused_moe_gemm(x.to(DEVICE), w.to(DEVICE), *aligned, k, 16, "silu_and_mul", out=out, config=cfg)
        launches += seen
        out, live = out.cpu(), (ids.flatten() >= 0)
        assert out[~live].isnan().all(), f"{cfg}: a pair without a local expert was written"
        assert_close(out[live], want[live], name=f"H={H} I={I} {cfg}")
res = assert_compiles_for_gpu(launches)               # every path, descriptors too, with programmatic dependent launch
assert len(res) >= 5 and all(r["pdl_wait"] for r in res), [(r["kernel"], r["pdl_wait"]) for r in res]

# %% [markdown]
# The epilogue with expert biases and gpt-oss's clamped SwiGLU, through the same code paths — including split-K
# (`06`), whose last program runs the epilogue on the summed partials. `limit = 0.5` sits far
# below the O(1) pre-activations, so both clamps bite. GEMM1 is checked with the router weight on the input (it
# scales the product, not the bias) and without; GEMM2 adds its bias before the router weight on the output. The
# spec is written out with `Activation`, the definition in `moe_lit.formats`.

# %%
#| test fused_moe_gemm_swigluoai_bias
g = torch.Generator().manual_seed(7)
act = Activation("swigluoai", limit=0.5)
for H, I in ((64, 64), (48, 40)):                                          # even, then ragged K and N
    E, T, k = 4, 13, 2
    x, w13, w2 = torch.randn(T, H, generator=g), torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
    b13, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    ids[2, 1] = ids[7, 0] = -1
    wts, live = torch.rand(T, k, generator=g), ids.flatten() >= 0
    e_of = ids.long().clamp(min=0)                                          # [T, k], the pair's expert
    pre = torch.einsum("th,enh->ten", x.double(), w13.double())[torch.arange(T)[:, None], e_of]   # [T, k, 2I]
    assert (pre > 0.5).any() and (pre[..., I:].abs() > 0.5).any()          # both clamps bite
    h = torch.randn(T * k, I, generator=g)
    want2 = (torch.einsum("pi,phi->ph", h.double(), w2.double()[e_of.flatten()]) + b2.double()[e_of.flatten()]) * wts.double().flatten()[:, None]
    aligned = moe_align_block_size(ids.to(DEVICE), 16, E)
    for cfg in (dict(BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1), dict(BLOCK_N=64, BLOCK_K=64, GROUP_M=2),
                dict(BLOCK_N=32, BLOCK_K=32, TMA=True), dict(BLOCK_N=32, BLOCK_K=16, SPLIT_K=3),   # split-K, uneven,
                dict(BLOCK_N=64, BLOCK_K=32, GROUP_M=2, SPLIT_K=2)):                            # and grouped order
        for on_in, bias_dtype in ((False, torch.float32), (True, torch.bfloat16)):
            rw = wts.double()[..., None] if on_in else 1.0
            want1 = act(pre * rw + b13.to(bias_dtype).double()[e_of]).reshape(T * k, I)
            out = fused_moe_gemm(x.to(DEVICE), w13.to(DEVICE), *aligned, k, 16, act, wts.to(DEVICE) if on_in else None,
                                 "input" if on_in else None,
                                 out=torch.full((T * k, I), float("nan"), device=DEVICE), config=cfg, bias=b13.to(DEVICE, bias_dtype)).cpu()
            assert out[~live].isnan().all(), f"{cfg}: a pair without a local expert was written"
            assert_close(out[live], want1[live], name=f"GEMM1 H={H} I={I} on_input={on_in} {cfg}")
        out = fused_moe_gemm(h.to(DEVICE), w2.to(DEVICE), *aligned, k, 16, None, wts.to(DEVICE), "output", rows="pair",
                             out=torch.full((T * k, H), float("nan"), device=DEVICE), config=cfg, bias=b2.to(DEVICE)).cpu()
        assert out[~live].isnan().all(); assert_close(out[live], want2[live], name=f"GEMM2 H={H} I={I} {cfg}")

# %% [markdown]
# On the GPU, the int32-overflow class: `T·top_k·N > 2^31` output elements, so the last pairs' row offsets only
# fit in int64 (sglang#4727 wrapped here). Only the rows past the 2^31 boundary are checked, against torch.

# %%
#| test fused_moe_gemm_int64_offsets
#| gpu
E, I, H, T, k = 8, 128, 7168, 40000, 8                          # 320,000 pairs x 7168 = 2.29e9 outputs
g = torch.Generator(device="cuda").manual_seed(5)
h = torch.randn(T * k, I, device="cuda", dtype=torch.bfloat16, generator=g)
w2 = (torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) / I**0.5)
ids = torch.randint(0, E, (T, k), device="cuda", dtype=torch.int32, generator=g)
wts = torch.rand(T, k, device="cuda", generator=g)
aligned = moe_align_block_size(ids, 64, E)
out = fused_moe_gemm(h, w2, *aligned, k, 64, None, wts, "output", rows="pair")
assert T * k * H > 2**31
tail = torch.arange(T * k - 4096, T * k, device="cuda")             # rows whose offsets pass 2^31
per_expert = torch.stack([h[tail].double() @ w2[e].double().T for e in range(E)])    # [E, 4096, H]
want = per_expert[ids.flatten()[tail].long(), torch.arange(4096, device="cuda")] * wts.flatten()[tail, None].double()
assert_close(out[tail], want, name="rows past 2^31")

# %% [markdown]
# ## The Standard-format experts
#
# `TritonExperts` chains the pieces: align the pairs by local expert, GEMM1 with the expert bias and the gated
# activation over token rows, GEMM2 with the expert bias and the router weight over pair rows, and the sum over each
# token's slots — `combine_pairs` (`07_kernels.dispatch`), one launch that reads only the pairs whose expert is on this rank;
# on pair blocks that sum is GEMM2's own last step (`combine_in_gemm2`). The block size follows the expected rows per
# expert.
#
# It computes `out[t] = Σ_k w_tk · (W2·act(W13·x_t + b13) + b2)` over the slots with a local expert — or, with the
# router weight on the input, `Σ_k W2·act(W13·(w_tk·x_t) + b13) + b2` — where `w13_bias [E_local, 2·I]` and
# `w2_bias [E_local, H]` are optional (bf16/fp16/fp32) and `activation` is an `Activation` (`SILU` by default;
# `Activation("swigluoai")` for gpt-oss).

# %%
#| export
def _align_pairs(local_ids: torch.Tensor,        # [T, top_k] int32/int64 local expert per slot, -1 = not here (in range)
                block_m: int,                   # BLOCK_M of the GEMMs
                num_local: int,                 # E_local
                num_experts: int | None = None, # the model's experts, global (default E_local)
                max_pairs: int = 32,            # at most this many pairs take one block each
               ) -> tuple:
    """The aligned layout of the Standard experts: `moe_align_block_size`'s (four launches), or for a few pairs spread
    over many experts `(None, local_ids flattened, None)`: one block per pair, which the GEMMs read straight from the
    ids (`PAIR_IDS`, no launch; `moe_pair_blocks` is the same layout built on its own)."""
    spread = (num_local if num_experts is None else check_int("num_experts", num_experts, lo=num_local)) // 4
    tiny = local_ids.numel() <= min(max_pairs, max(1, spread))    # few pairs, rarely two on one expert
    if tiny: return None, local_ids.reshape(-1).contiguous(), None
    return moe_align_block_size(local_ids, block_m, num_local, validate=False)   # ids from a placement: in range

# %%
#| export
class TritonExperts:
    """Standard-format experts on Triton: align -> GEMM1 + bias + activation -> GEMM2 + bias (x router weight) -> sum
    over slots. Construction takes nothing and raises nothing; `apply` checks its arguments (and `combine_in_gemm2`).
    Source: vLLM's `TritonExperts` (fused_moe.py's `fused_moe_kernel` path), with the activation fused into GEMM1."""
    activation_format = ActivationFormat.Standard
    pair_blocks_max_pairs = 32          # at most this many (token, k) pairs: one block per pair, no alignment
    combine_in_gemm2 = "auto"           # on pair blocks GEMM2 sums the slots (no launch of its own): "auto" (without
                                        # an addend or a w2 bias, where it was measured faster), "always", "never"

    def apply(self, hidden: torch.Tensor,        # [T, H]
              w13: torch.Tensor,                 # [E_local, 2·I, H]
              w2: torch.Tensor,                  # [E_local, H, I]
              topk_weights: torch.Tensor,        # [T, top_k] fp32
              local_ids: torch.Tensor,           # [T, top_k] local expert per slot, -1 = not on this rank
              apply_router_weight_on_input: bool = False,
              block_m: int | None = None,        # alignment block (default: the tuned tile's BLOCK_M)
              expected_m: int | None = None,     # expected rows per local expert (default T·top_k / E_local)
              validate: bool = True,             # check local_ids on the host (one sync; ids from a placement skip it)
              w13_bias: torch.Tensor | None = None,  # [E_local, 2·I] bf16/fp16/fp32, added before the activation
              w2_bias: torch.Tensor | None = None,   # [E_local, H] bf16/fp16/fp32, added before the router weight
              activation: Activation = SILU,     # the gated activation between the GEMMs
              num_experts: int | None = None,    # the model's experts, global (the pair-block rule); default E_local
              active_experts: int | None = None, # expected local experts with pairs (split-K; default min(E, T·top_k))
              addend: torch.Tensor | None = None,  # [T, H] hidden's dtype: the shared experts' output, in the fp32 sum
             ) -> torch.Tensor:                  # [T, H], hidden's dtype
        """This rank's share of the MoE output for the flat token list; raises ValueError on bad shapes or ids, and on a
        `combine_in_gemm2` other than "auto", "always" or "never". Source: vLLM's `TritonExperts.apply` (align, GEMM1,
        activation, GEMM2 with `MUL_ROUTED_WEIGHT`, `moe_sum`; fused_moe.py)."""
        check_tensor("hidden", hidden, ndim=2, dtype=(torch.bfloat16, torch.float16, torch.float32))
        if hidden.shape[1] == 0: raise ValueError("hidden: expected at least one column (hidden_size >= 1), got 0")
        check_tensor("w13", w13, shape=(None, None, hidden.shape[1]), dtype=hidden.dtype)
        E, N, H = w13.shape
        if N % 2 or N == 0: raise ValueError(f"w13: expected a positive even number of rows (gate, then up), got {N}")
        check_tensor("w2", w2, shape=(E, H, N // 2), dtype=hidden.dtype)
        check_tensor("local_ids", local_ids, shape=(hidden.shape[0], None), dtype=(torch.int32, torch.int64))
        check_tensor("topk_weights", topk_weights, shape=tuple(local_ids.shape), dtype=torch.float32)
        check_kernel_device("hidden", hidden, w13=w13, w2=w2, local_ids=local_ids, topk_weights=topk_weights)
        check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
        if not isinstance(activation, Activation):
            raise ValueError(f"activation: expected an Activation, got {type(activation).__name__}")
        check_expert_bias("w13_bias", w13_bias, E, N, hidden.device)
        check_expert_bias("w2_bias", w2_bias, E, H, hidden.device)
        check_local_ids(local_ids, E, validate)
        if expected_m is not None: check_int("expected_m", expected_m, lo=1)
        if active_experts is not None: check_int("active_experts", active_experts, lo=0)
        if block_m is not None: check_block_m(block_m)
        check_addend(addend, hidden)
        return self._apply(hidden, w13, w2, topk_weights, local_ids, apply_router_weight_on_input, block_m, expected_m,
                           w13_bias, w2_bias, activation, num_experts, active_experts, addend)

    def _apply(self, hidden, w13, w2, topk_weights, local_ids, apply_router_weight_on_input=False, block_m=None,
               expected_m=None, w13_bias=None, w2_bias=None, activation: Activation = SILU, num_experts=None,
               active_experts=None,
               addend=None, join=None) -> torch.Tensor:   # the shared experts' [T, H], in the combine's sum (`07`)
        "`apply` after its checks: for a layer whose weights (checked once), ids and activations are its own (`10_modular`)."
        (E, N, H), (T, k) = w13.shape, local_ids.shape
        mode = self.combine_in_gemm2
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"combine_in_gemm2: expected 'auto', 'always' or 'never', got {mode!r}")
        if T == 0 or E == 0 or k == 0: return _no_pairs(T, H, hidden, addend, join)   # no pair: no token, no slot, or
                                                                                      # no expert on this rank
        expected_m = expected_m or max(1, T * k // E)
        if block_m is None:       # the tuned GEMM1 tile's BLOCK_M (one lookup per shape, cached)
            block_m = _gemm1_block_m(E, N, H, expected_m, hidden.dtype, _tile_config_root())
        s, e, n = _align_pairs(local_ids, block_m, E, num_experts, self.pair_blocks_max_pairs)
        on_in = apply_router_weight_on_input
        # the launches below skip `fused_moe_gemm`'s checks: every argument was checked above or built here
        h = _fused_moe_gemm(hidden.contiguous(), w13, s, e, n, k, block_m, activation, topk_weights,
                            "input" if on_in else None, None, None, False, expected_m, w13_bias, active_experts)
        if s is None and mode != "never" and (mode == "always" or (addend is None and w2_bias is None)):
            out = torch.empty(T, H, dtype=hidden.dtype, device=hidden.device)   # pair blocks: GEMM2 sums the slots
            if join is not None: join()
            _fused_moe_gemm(h, w2, s, e, n, k, block_m, None, topk_weights, None if on_in else "output", None, None,
                            True, expected_m, w2_bias, active_experts, combine=(out, addend))
            return out
        y = _fused_moe_gemm(h, w2, s, e, n, k, block_m, None, topk_weights, None if on_in else "output", None, None,
                            True, expected_m, w2_bias, active_experts)
        return _combine_pairs(y, local_ids, E, addend, join)   # router weights already applied; y is unit-stride

# %% [markdown]
# ## One expert on every token: the shared experts
#
# A shared expert (DeepSeek, Llama 4) is a gated-SiLU MLP that every token goes through: the grouped GEMM with one
# expert and every token's row in order. The aligned layout of that case needs no alignment kernel — block `b` holds
# rows `b·BLOCK_M …`, the rows past T are masked by the kernel as sentinels — so it is made once per token count and
# kept (`_dense_blocks`). Two launches on the layer's path to the GPU, in place of torch's six or seven (the fp32
# GEMM, the activation's split, SiLU, product and cast, the second GEMM and its cast), with the numerics of a routed
# expert: fp32 products and sums, one rounding of the activation to the input dtype, one of the output.
#
# **Tiles.** The two GEMMs look their tiles up as any grouped GEMM does, with E = 1 and the token count as the
# expected rows. Tuned at decode for DeepSeek-V3's shape (`nbs/bench/tune_shared.py`, each GEMM alone in CUDA-graph
# replays, H200, `tune_shared_h200_de5b979.json`), GEMM1 (`[T, 7168] × [4096, 7168]`) took 19.6 µs at T = 1 with
# `BLOCK_N 32, BLOCK_K 128, SPLIT_K 4` against 23.6 on the heuristic's tile, and 18.4 against 22.7 at T = 2 with
# `BLOCK_K 256, SPLIT_K 2`; no GEMM2 tile beat the heuristic's by 3 %. In the whole layer, where the shared experts
# run on a side stream beside the routed ones, only the T = 1 tile pays (`nbs/bench/shared_ab.py`, one process, both
# tables alternately, `shared_ab_h200_e5da0e7.log` and `shared_ab_h200_180e7d2.log`): replays 54.0 → 51.8 µs
# (nixl_ep) and 53.6 → 51.5 (allgather) at T = 1, the same bits; the T = 2 tile was 0.9 and 5.7 µs *slower* there
# (its wider grid takes SMs from the routed GEMMs), so the table's T = 2 entry is the heuristic's own tile. Only the
# H200's table exists; the H100 reads it (`TILE_TABLE_SIBLINGS`), not yet timed there.

# %%
#| export
_DENSE_BLOCKS: dict = {}         # (T, BLOCK_M, device) -> `_dense_blocks`' layout, made outside a graph capture

def _dense_blocks(T: int, block_m: int, device: torch.device) -> tuple:
    """`(sorted_token_ids, expert_ids, num_tokens_post_padded)` of T rows on one expert, in order: made once and kept
    (read-only). One made while a CUDA graph is captured belongs to that graph and is not kept: a capture records its
    kernels without running them, so its values exist only once the graph replays."""
    key = (T, block_m, device)
    blocks = _DENSE_BLOCKS.get(key)
    if blocks is not None: return blocks
    n = _cdiv(T, block_m) * block_m
    blocks = (torch.arange(n, dtype=torch.int32, device=device), torch.zeros(n // block_m, dtype=torch.int32, device=device),
              torch.full((1,), n, dtype=torch.int32, device=device))     # kernels only: capturable, no host copy
    if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
        if len(_DENSE_BLOCKS) >= 256: _DENSE_BLOCKS.clear()           # (token counts seen: a bound, not a policy)
        _DENSE_BLOCKS[key] = blocks
    return blocks

def shared_expert_mlp(hidden: torch.Tensor,   # [T, H] bf16/fp16/fp32
                      w13: torch.Tensor,      # [2·I_s, H] gate rows, then up rows, hidden's dtype
                      w2: torch.Tensor,       # [H, I_s] hidden's dtype
                     ) -> torch.Tensor:       # [T, H] hidden's dtype
    """`w2 · silu_and_mul(w13 · x)` for every row of `hidden`: the grouped GEMMs with one expert (two launches, no
    alignment kernel), fp32 accumulation, the activation rounded once to hidden's dtype. ValueError naming the
    argument for a shape, dtype or device mismatch. Source: the shared experts of DeepSeek-V2/V3 (arXiv:2405.04434)."""
    check_tensor("hidden", hidden, ndim=2, dtype=(torch.bfloat16, torch.float16, torch.float32))
    if hidden.shape[1] == 0: raise ValueError("hidden: expected at least one column (hidden_size >= 1), got 0")
    check_tensor("w13", w13, shape=(None, hidden.shape[1]), dtype=hidden.dtype)
    if w13.shape[0] == 0 or w13.shape[0] % 2:
        raise ValueError(f"w13: expected a positive even number of rows (gate, then up), got {w13.shape[0]}")
    check_tensor("w2", w2, shape=(hidden.shape[1], w13.shape[0] // 2), dtype=hidden.dtype)
    check_kernel_device("hidden", hidden, w13=w13, w2=w2)
    return _shared_expert_mlp(hidden, w13.contiguous(), w2.contiguous())

def _shared_expert_mlp(hidden, w13, w2) -> torch.Tensor:
    "`shared_expert_mlp` after its checks, for contiguous weights (`10_modular.SharedExperts` checked them once)."
    T, (N, H) = hidden.shape[0], w13.shape
    if T == 0: return hidden.new_empty(0, H)
    bm = _gemm1_block_m(1, N, H, T, hidden.dtype, _tile_config_root())
    s, e, n = _dense_blocks(T, bm, hidden.device)
    h = _fused_moe_gemm(hidden if hidden.stride(-1) == 1 else hidden.contiguous(), w13[None], s, e, n, 1, bm, SILU,
                        None, None, None, None, False, T, None, 1)
    return _fused_moe_gemm(h, w2[None], s, e, n, 1, bm, None, None, None, None, None, True, T, None, 1)

# %%
#| test triton_experts_match_reference
g = torch.Generator().manual_seed(1)
E, H, I = 6, 48, 32
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
for T, k in ((9, 2), (1, 1), (5, E), (40, 3)):                         # top_k = 1, top_k = E, T < BLOCK_M
    hidden = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
    if k > 1: ids[0, 1] = -1
    wts = torch.rand(T, k, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        for on_in in (False, True):
            want = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, ids,
                                          apply_router_weight_on_input=on_in)
            got = TritonExperts().apply(*(t.to(DEVICE) for t in (hidden.to(dtype), w13.to(dtype), w2.to(dtype), wts, ids)),
                                        apply_router_weight_on_input=on_in)
            assert_close(got, want, name=f"T={T} top_k={k} {dtype} on_input={on_in}")
    aligned = TritonExperts(); aligned.pair_blocks_max_pairs = 0                 # the aligned layout at every size
    got = aligned.apply(*(t.to(DEVICE) for t in (hidden, w13, w2, wts, ids)))
    assert_close(got, moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, ids), name=f"aligned T={T}")
test_eq(TritonExperts.activation_format, ActivationFormat.Standard)
# at decode the GEMMs read the pair blocks from the ids: three launches, no alignment kernel, the same result
T, k, E64 = 2, 4, 64                                   # 8 pairs of a 64-expert model, 6 of them local here
ids = torch.stack([torch.randperm(E64, generator=g)[:k] for _ in range(T)]).int()
local = torch.where(ids < E, ids, -1); local[0, :2] = torch.tensor([1, 4]); local[1, 0] = 1     # expert 1 twice
hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
with record_launches() as seen:
    got = TritonExperts().apply(*(t.to(DEVICE) for t in (hidden, w13, w2, wts, local)), num_experts=E64)
test_eq([kern.fn.__name__ for kern, _, _ in seen], ["_fused_moe_kernel", "_fused_moe_kernel"])   # GEMM2 sums the slots
test_eq((seen[0][2]["PAIR_IDS"], seen[1][2]["COMBINE"]), (True, True))
assert_compiles_for_gpu(seen)                                               # and Hopper compiles that variant
assert_close(got, moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, local), name="pair ids")

# %% [markdown]
# On pair blocks GEMM2 sums each token's slots itself (`COMBINE`): the program that stores a token's pair row counts
# itself in on the token's counter for its column block (`06`'s `_last_to_arrive`, the pattern of split-K), and the
# last of the token's local pairs to arrive sums their rows, in slot order, as `_combine_pairs` would — one launch
# fewer at decode. A token with no local pair gets its row from the program of its first slot: 0, or the addend.
#
# Each program pays for it at its end: the barrier and the acquire-release atomic wait until its row's stores are
# visible across the GPU before the SM takes its next program. Measured on an H200 in CUDA-graph replays of the
# whole layer (`nbs/bench/eager_vs_replay.py --ab combine`, `eager_vs_replay_combine_h200_c51e71e.log`, slot sum in
# its own launch → in GEMM2, µs): Qwen3-30B-A3B T = 1, 2, 4 30.4 → 29.7, 48.3 → 46.7, 80.0 → 78.9; Mixtral T = 1 184.4 →
# 183.8; but gpt-oss-120b (a w2 bias) 66.8 → 68.0, 111.3 → 112.6, 187.4 → 191.3, and DeepSeek-V3 with the shared
# experts' addend 84.0 → 86.1 at T = 1 (GEMM2 must then wait for the side stream, which otherwise overlaps it). The
# cause of gpt-oss's loss is not isolated. A likely one, from the compiled code (`nbs/bench/sass_gemm2.py`, sm_90,
# `sass_gemm2_cpu.log`): its GEMM2 tile takes 120 KB of shared memory, so one program an SM and two waves of
# programs already at T = 1 (180 programs), and each program's end waits for its fence before the next starts;
# Qwen3's takes 40 KB (five an SM: one wave up to T = 2). The slot sum adds 0–20 registers and 10–18 instructions to
# the K loop. So the default (`combine_in_gemm2 = "auto"`) sums in GEMM2 only without an addend and without a w2
# bias, the rule the measurements support; `"always"` and `"never"` force one way, and the
# outputs are the same bits either way in every deployment measured. Tested against the float64 reference and the
# three-launch path: tokens with two pairs on one expert, one pair and none, with and without an addend or a w2 bias,
# K split two ways, fp32 and bf16, each launch twice (the counters are left at zero for the next).

# %%
#| test combine_in_gemm2
g = torch.Generator().manual_seed(5)
E, H, I, T, k, E64 = 6, 40, 48, 3, 4, 64
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
local = torch.tensor([[2, -1, 5, 2], [-1, -1, -1, -1], [-1, 0, -1, -1]], dtype=torch.int32)
hidden, wts, addend = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g), torch.randn(T, H, generator=g)
base = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, local)
for dtype in (torch.float32, torch.bfloat16):
    args = [t.to(DEVICE) for t in (hidden.to(dtype), w13.to(dtype), w2.to(dtype), wts, local)]
    for add in (None, addend.to(DEVICE, dtype)):
        want = base if add is None else base + add.double().cpu()
        for mode, n in (("auto", 3 if add is not None else 2), ("always", 2), ("never", 3)):
            ex = TritonExperts(); ex.combine_in_gemm2 = mode
            for _ in range(2):
                with record_launches() as seen: got = ex.apply(*args, num_experts=E64, addend=add)
                test_eq(len(seen), n)
                assert_close(got, want, name=f"{dtype} addend={add is not None} {mode}")
    b2 = torch.randn(E, H, generator=g)                                     # a w2 bias: "auto" keeps the launch
    want = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, local, w2_bias=b2.double())
    for mode, n in (("auto", 3), ("always", 2)):
        ex = TritonExperts(); ex.combine_in_gemm2 = mode
        with record_launches() as seen: got = ex.apply(*args, num_experts=E64, w2_bias=b2.to(DEVICE, dtype))
        test_eq(len(seen), n)
        assert_close(got, want, name=f"{dtype} w2 bias {mode}")
    h = torch.randn(T * k, I, generator=g).to(DEVICE, dtype)                # GEMM2 alone, K split in two
    flat = local.reshape(-1).to(DEVICE)
    for split in (1, 2):
        cfg = dict(BLOCK_N=16, BLOCK_K=16, SPLIT_K=split)
        y = _fused_moe_gemm(h, args[2], None, flat, None, k, 16, None, args[3], "output", None, cfg, True, None, None)
        want = _combine_pairs(y, args[4], E, None)
        for _ in range(2):
            out = torch.full((T, H), float("nan"), dtype=dtype, device=DEVICE)
            with record_launches() as seen:
                _fused_moe_gemm(h, args[2], None, flat, None, k, 16, None, args[3], "output", None, cfg, True, None,
                                None, combine=(out, None))
            test_eq((seen[0][2]["SPLIT_K"], seen[0][2]["COMBINE"]), (split, True))
            assert_close(out, want, name=f"split {split} {dtype}")
            test_eq(out[1].abs().max().item(), 0)                             # no local pair: 0, NaN overwritten
assert_compiles_for_gpu(seen)
ex.combine_in_gemm2 = "sometimes"                                           # named, even where nothing launches
for a in (args, [args[0][:0], *args[1:3], args[3][:0], args[4][:0]]):
    test_fail(lambda: ex.apply(*a, num_experts=E64), contains="combine_in_gemm2: expected 'auto', 'always' or 'never', got 'sometimes'")
for mode in ("auto", "always", "never"):                                    # top_k = 0: no pair, 0 or the addend
    ex.combine_in_gemm2 = mode
    for add in (None, addend.to(DEVICE, dtype)):
        got = ex.apply(args[0], args[1], args[2], args[3][:, :0], args[4][:, :0], num_experts=E64, addend=add)
        test_eq(torch.equal(got, torch.zeros_like(got) if add is None else add), True)

# %% [markdown]
# The shared experts' MLP against the float64 reference (one expert, weight 1, every token): token counts around the
# block size, ragged `H` and `I`, fp32 and bf16, `hidden` a strided view whose rows past T are NaN (never read: the
# padded rows of the last block are masked), two launches that Hopper compiles, and each bad argument named.

# %%
#| test shared_expert_mlp_matches_reference
g = torch.Generator().manual_seed(21)
H, I = 40, 24
w13, w2 = torch.randn(2 * I, H, generator=g) / H**0.5, torch.randn(H, I, generator=g) / I**0.5
for T in (1, 5, 17):
    for dtype in (torch.float32, torch.bfloat16):
        buf = torch.full((T + 3, H + 8), float("nan"))
        buf[:T, :H] = torch.randn(T, H, generator=g)
        hidden = buf[:T, :H]                                                        # row stride H + 8
        want = moe_reference_standard(hidden.double(), w13[None].double(), w2[None].double(),
                                      torch.ones(T, 1), torch.zeros(T, 1, dtype=torch.long))
        with record_launches() as seen:
            got = shared_expert_mlp(buf.to(DEVICE, dtype)[:T, :H], w13.to(DEVICE, dtype), w2.to(DEVICE, dtype))
        test_eq([k.fn.__name__ for k, _, _ in seen], ["_fused_moe_kernel"] * 2)
        assert_close(got, want, name=f"shared T={T} {dtype}")
assert_compiles_for_gpu(seen)
test_eq(shared_expert_mlp(torch.zeros(0, H, device=DEVICE), w13.to(DEVICE), w2.to(DEVICE)).shape, (0, H))
x = torch.randn(3, H, device=DEVICE)
test_fail(lambda: shared_expert_mlp(x, w13[:-1].to(DEVICE), w2.to(DEVICE)), contains="w13: expected a positive even number")
test_fail(lambda: shared_expert_mlp(x, w13.to(DEVICE), w2[:, :-1].to(DEVICE)), contains="w2: expected shape [40, 24]")
test_fail(lambda: shared_expert_mlp(x, w13.to(DEVICE).bfloat16(), w2.to(DEVICE)), contains="w13: expected dtype")
test_fail(lambda: shared_expert_mlp(x.double(), w13.to(DEVICE), w2.to(DEVICE)), contains="hidden: expected dtype")
test_fail(lambda: shared_expert_mlp(torch.randn(2, 0, device=DEVICE), torch.randn(4, 0, device=DEVICE),
                                    torch.randn(0, 2, device=DEVICE)), contains="hidden: expected at least one column")

# %% [markdown]
# gpt-oss's experts — biases on both GEMMs, the clamped SwiGLU with a small `limit` — against the float64 reference of
# `moe_lit.formats`, in fp32 and bf16, with the router weight on the output and on the input, through both layouts
# (one block per pair, and the aligned blocks). Expert 4 has no tokens; ragged `H = 48`, `I = 40` leave partial N
# and K tiles in both GEMMs; token 0 has no local expert at all and its hidden row is NaN: it must never be read,
# and its output row is 0.

# %%
#| test triton_experts_swigluoai_bias
g = torch.Generator().manual_seed(8)
E, H, I = 6, 48, 40
act = Activation("swigluoai", limit=0.5)
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
b13, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
pool = torch.tensor([0, 1, 2, 3, 5])                                        # expert 4 gets no tokens
for T, k in ((9, 2), (2, 1), (40, 3)):
    hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    ids = pool[torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(T)])].int()
    ids[0] = -1; hidden[0] = float("nan")                                   # a token with no local expert
    for dtype in (torch.float32, torch.bfloat16):
        ws = [t.to(dtype) for t in (hidden, w13, w2, b13, b2)]
        for on_in in (False, True):
            want = moe_reference_standard(*(t.double() for t in ws[:3]), wts, ids, apply_router_weight_on_input=on_in,
                                          w13_bias=ws[3].double(), w2_bias=ws[4].double(), activation=act)
            for layout_max_pairs in (32, 0):                                # one block per pair when small; aligned
                experts = TritonExperts(); experts.pair_blocks_max_pairs = layout_max_pairs
                got = experts.apply(*(t.to(DEVICE) for t in (ws[0], ws[1], ws[2], wts, ids)), apply_router_weight_on_input=on_in,
                                    w13_bias=ws[3].to(DEVICE), w2_bias=ws[4].to(DEVICE), activation=act).cpu()
                assert (got[0] == 0).all(), "a token with no local expert"
                assert_close(got, want, name=f"T={T} top_k={k} {dtype} on_input={on_in} max_pairs={layout_max_pairs}")

# %% [markdown]
# On a rank of an EP deployment the local ids come from the placement; non-local slots are `-1` and contribute 0.
# Two ranks sum to the single-device result.

# %%
#| test triton_experts_two_ranks
g = torch.Generator().manual_seed(2)
E, H, I, T, k = 8, 32, 16, 11, 3
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int()
total = torch.zeros(T, H, dtype=torch.float64)
for rank in range(2):
    n_local, emap = determine_expert_map(2, rank, E, "linear")
    local = torch.where(ids >= 0, emap[ids.long()], -1).int()
    owned = (emap >= 0).nonzero()[:, 0]
    total += TritonExperts().apply(*(t.to(DEVICE) for t in (hidden, w13[owned], w2[owned], wts, local))).double().cpu()
assert_close(total.float(), moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, ids))

# %% [markdown]
# Bad input: aligned arrays that were not made by the alignment (a negative or huge pair index, an expert id past the
# local experts) are masked inside the kernel — nothing is read or written outside the tensors given — and shapes,
# block sizes, tile overrides and ids that the host can check raise a ValueError naming the argument.

# %%
#| hide
from moe_lit.kernels.batched import tile_config_path
import json, tempfile
import moe_lit.kernels.contiguous as kc

# %%
#| test contiguous_bad_input
with tempfile.TemporaryDirectory() as d:                    # a tuned table's GEMM1 BLOCK_M is the alignment block
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and DEVICE == "cuda" else "cpu"   # the tables' key
    p = tile_config_path("fused_moe_gemm", 2, 64, name, torch.bfloat16, d)
    p.parent.mkdir(parents=True); p.write_text(json.dumps({"2": dict(BLOCK_M=1024, BLOCK_N=64, BLOCK_K=64)}))
    test_fail(lambda: kc._gemm1_block_m(2, 64, 32, 2, torch.bfloat16, d),
              contains="(GEMM1's BLOCK_M, the alignment block, from the fused_moe_gemm tile table for E=2, N=64 in")
g = torch.Generator().manual_seed(6)
E, H, I, T, k = 2, 32, 32, 3, 2
x, w = torch.randn(T, H, generator=g).to(DEVICE), torch.randn(E, 2 * I, H, generator=g).to(DEVICE)
ids = torch.tensor([[0, 1], [1, 0], [0, -1]], dtype=torch.int32, device=DEVICE)
s, e, n = moe_align_block_size(ids, 16, E)
big = torch.full((20, I), float("nan"), device=DEVICE)
with mock.patch.dict(check_kernel_device.__globals__, INTERPRET=False):   # as on a GPU host: the CPU spec is no launcher,
    test_eq(moe_align_block_size_reference(ids.cpu(), 16, E)[2], moe_align_block_size_reference(ids.cpu(), 16, E)[2])   # and runs
for validate in (True, False):                                     # meta ids: named before any read of them
    test_fail(lambda: moe_align_block_size(ids.to("meta"), 16, E, validate=validate), contains="topk_ids: expected a tensor with values")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n, k, 16, "silu_and_mul", topk_weights=torch.ones(T, k, device=DEVICE)),
          contains="weight_stage: expected 'input' or 'output' with topk_weights given")   # not silently unweighted
test_fail(lambda: fused_moe_gemm(x[:, :0], w[:, :, :0], s, e, n, k, 16, "silu_and_mul"), contains="a: expected at least one column")
s_bad = s.clone(); s_bad[0] = -1                                   # a negative pair index: masked, not written
fused_moe_gemm(x, w, s_bad, e, n, k, 16, "silu_and_mul", out=big[10:16])
assert big[:10].isnan().all() and big[16:].isnan().all()
e_bad = e.clone(); e_bad[0] = 7                                    # an expert id past the local experts: block skipped
out = fused_moe_gemm(x, w, s, e_bad, n, k, 16, "silu_and_mul", out=torch.full((T * k, I), float("nan"), device=DEVICE))
assert out[s[:16][s[:16] < T * k].long()].isnan().all()
for top_k, rows in ((3, "token"), (1, "token"), (2, "pair")):     # not the alignment's pairs: its padding id (6) would
    xx = x if rows == "token" else torch.randn(T * 3, H, device=DEVICE)   # be a pair of another count, read as one
    test_fail(lambda: fused_moe_gemm(xx, w, s, e, n, top_k, 16, "silu_and_mul", rows=rows),
              contains=f"sorted_token_ids: expected {xx.shape[0] * (top_k if rows == 'token' else 1)} + a multiple of 15 entries")
for top_k in (1, 2):                                               # no pairs: nothing read or written, any layout
    for layout in (moe_align_block_size(ids[:0], 16, E), moe_pair_blocks(ids[:0], 16, E)):
        test_eq(fused_moe_gemm(x[:0], w, *layout, top_k, 16, "silu_and_mul").shape, (0, I))
wts = torch.rand(T, k, device=DEVICE)
test_fail(lambda: TritonExperts().apply(x, w, torch.randn(E, H, I, device=DEVICE), wts, ids + 5), contains="local_ids: expected values in [-1, 2)")
y = TritonExperts().apply(x, w, torch.randn(E, H, I, device=DEVICE), wts, torch.where(ids == 1, 9, ids).int(), validate=False)
assert y.isfinite().all()                                          # unchecked ids are dropped, never read as garbage
test_fail(lambda: TritonExperts().apply(x, w[:, :-1], torch.randn(E, H, I, device=DEVICE), wts, ids), contains="w13: expected a positive even")
test_fail(lambda: TritonExperts().apply(x[:, :0], w[..., :0], torch.randn(E, 0, I, device=DEVICE), wts, ids),
          contains="hidden: expected at least one column (hidden_size >= 1), got 0")
test_fail(lambda: TritonExperts().apply(x, w, torch.randn(E, H + 3, I, device=DEVICE), wts, ids), contains="w2: expected shape")
test_fail(lambda: TritonExperts().apply(x.int(), w, w, wts, ids), contains="hidden: expected dtype")
test_fail(lambda: TritonExperts().apply(x, w, torch.randn(E, H, I, device=DEVICE), wts, ids, block_m=24), contains="block_m: expected a power of two")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n, k, 16, "silu_and_mul", config=dict(BLOCK_K=32)), contains="config: expected a BLOCK_N")
test_fail(lambda: fused_moe_gemm(x, w[:, :-1], s, e, n, k, 16, "silu_and_mul"), contains="w: expected an even N")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n.float(), k, 16, "silu_and_mul"), contains="num_tokens_post_padded: expected dtype")
test_eq(TritonExperts().apply(x, w[:0], torch.randn(0, H, I, device=DEVICE), wts, torch.full_like(ids, -1)).abs().sum().item(), 0)
w2 = torch.randn(E, H, I, device=DEVICE)
test_fail(lambda: TritonExperts().apply(x, w, w2, wts, ids, w13_bias=torch.zeros(E, I, device=DEVICE)), contains="w13_bias: expected shape [2, 64]")
test_fail(lambda: TritonExperts().apply(x, w, w2, wts, ids, w2_bias=torch.zeros(E + 1, H, device=DEVICE)), contains="w2_bias: expected shape [2, 32]")
test_fail(lambda: TritonExperts().apply(x, w, w2, wts, ids, w2_bias=torch.zeros(E, H, device=DEVICE, dtype=torch.int32)), contains="w2_bias: expected dtype")
test_fail(lambda: TritonExperts().apply(x, w, w2, wts, ids, activation="swigluoai"), contains="activation: expected an Activation, got str")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n, k, 16, "silu_and_mul", bias=torch.zeros(E, I, device=DEVICE)), contains="bias: expected shape [2, 64]")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n, k, 16, "silu_and_mul", wts, "output"),   # would scale the gate half only
          contains="weight_stage: expected None or 'input' with a gated activation")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n, k, 16, "silu_and_mul", wts.to("meta"), "input"), contains="topk_weights: expected device")
test_fail(lambda: TritonExperts().apply(x, w, w2, wts.to("meta"), ids), contains="topk_weights: expected device")
test_fail(lambda: fused_moe_gemm(x, w, s, e, n, k, 16, "silu_and_mul", out=torch.empty(T * k, I, device="meta")),
          contains="out: expected device")
test_fail(lambda: TritonExperts().apply(x[:0], w, w2, wts[:0], ids[:0], active_experts=-1),   # checked before the
          contains="active_experts: expected >= 0, got -1")                                     # empty batch returns
test_eq(fused_moe_gemm(x, w[:0], s, torch.full_like(e, -1), n, k, 16, "silu_and_mul").shape, (T * k, I))   # no local expert

# %% [markdown]
# On the GPU: DeepSeek-V3 EP8 decode and prefill shapes (32 local experts, hidden 7168, expert width 2048, top-8).

# %%
#| test triton_experts_real_shapes
#| gpu
for T in (128, 2048):
    g, gpu = torch.Generator().manual_seed(T), torch.Generator("cuda").manual_seed(T)   # weights drawn on the GPU
    E, H, I, k = 32, 7168, 2048, 8
    w13 = torch.randn(E, 2 * I, H, generator=gpu, device="cuda", dtype=torch.bfloat16).div_(H**0.5)
    w2 = torch.randn(E, H, I, generator=gpu, device="cuda", dtype=torch.bfloat16).div_(I**0.5)
    hidden = torch.randn(T, H, generator=gpu, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(4 * E, generator=g)[:k] for _ in range(T)]).int()   # 3/4 of slots not local
    local = torch.where(ids < E, ids, -1).cuda()
    wts = torch.rand(T, k, generator=g).cuda()
    want = moe_reference_standard(hidden.double(), w13, w2, wts, local)
    assert_close(TritonExperts().apply(hidden, w13, w2, wts, local), want, name=f"T={T}")

# %% [markdown]
# On the GPU: gpt-oss-120b's expert shapes (hidden 2880, expert width 2880, top-4 routing of 64 tokens) in bf16, with
# its `alpha` and `limit` and both biases, against the float64 reference; the routing picks among 16 experts of which
# this rank holds 8, so about half of the slots are not local.

# %%
#| test triton_experts_gpt_oss_shapes
#| gpu
E, H, I, T, k = 8, 2880, 2880, 64, 4
g = torch.Generator().manual_seed(120)
w13 = (torch.randn(E, 2 * I, H, generator=g) * 2 / H**0.5).bfloat16().cuda()   # pre-activations up to ~10: clamps bite
w2 = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16().cuda()
b13, b2 = torch.randn(E, 2 * I, generator=g).bfloat16().cuda(), torch.randn(E, H, generator=g).bfloat16().cuda()
hidden = torch.randn(T, H, generator=g).bfloat16().cuda()
ids = torch.stack([torch.randperm(2 * E, generator=g)[:k] for _ in range(T)]).int()
local = torch.where(ids < E, ids, -1).cuda()
wts = torch.rand(T, k, generator=g).cuda()
act = Activation("swigluoai")
for on_in in (False, True):
    want = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, local, apply_router_weight_on_input=on_in,
                                  w13_bias=b13.double(), w2_bias=b2.double(), activation=act)
    got = TritonExperts().apply(hidden, w13, w2, wts, local, apply_router_weight_on_input=on_in, w13_bias=b13,
                                w2_bias=b2, activation=act)
    assert_close(got, want, name=f"gpt-oss-120b experts, on_input={on_in}")

# %% [markdown]
# ## Measured on an H200
#
# `moe-lit bench` at commit dba5a43 (`nbs/bench/batched_and_contiguous_h200_dba5a43.*`, bf16, tuned tiles from
# `moe-lit bench --tune contiguous`) times this GEMM1 on the benchmark's routed rows with `T = rows / top_k`:
#
# | scenario | contiguous, % of floor | batched, % of floor | alignment (eager) |
# |---|---|---|---|
# | DeepSeek-V3 EP8 decode | 99.5 | 100.7 | 69 µs |
# | DeepSeek-V3 EP8 prefill | 90.0 | 87.1 | 78 µs |
# | Qwen3-30B-A3B decode | 99.6 | 99.2 | 67 µs |
# | Mixtral-8x7B decode | 101.4 | 103.6 | 127 µs |
# | gpt-oss-120b decode | 105.6 | 106.5 | 66 µs |
#
# The first, untuned run (commit 7665e29) measured 88.9, 70.0, 84.0, 88.9 and 87.3%: a 64-row block for 4 rows per
# expert, masked loads on even shapes, and pointer loads for the prefill weight tile. The tuned tiles use 16-row
# blocks where experts get 4 rows, unmasked loads when K and N divide, and at prefill a 128×256×64 tile, 8 warps,
# with the weight tile through a tensor descriptor (the token rows stay gathered pointer loads: Hopper's TMA cannot
# gather rows). The prefill row is not stable between runs: 79.0% in the tuning run (90.8% in its sweep), 90.0% here,
# 76.7% in a later run (`nbs/bench/bench_h200_5412918.log`) — the 80% bar holds in one run of three.
#
# Alignment is a fixed cost outside the GEMM: 8.8 µs of GPU time at T = 1…16 (replayed as a CUDA graph), but
# 70–200 µs for an eager Python caller, where its four launches are host-bound. The pair-block layout costs 1.1 µs
# of GPU time and one launch; `14_bench` shows the whole experts stage with each layout and why the switch is at 32
# pairs.
