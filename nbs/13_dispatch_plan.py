# %%
#| default_exp dispatch_plan

# %% [markdown]
# # Where each token goes under expert parallelism
# > The plan of an expert-parallel dispatch, before any process talks: the owner rank and local slot of every (token, k) pair, what each rank sends to whom, and where each received row lands in the per-expert slabs — with a picture.

# %%
#| export
from __future__ import annotations
import torch
from moe_lit.terms import check_int, check_tensor, check_bool
from moe_lit.placement import Placement, expert_block, round_robin_routing_tables

# %%
#| hide
import matplotlib.pyplot as plt
from fastcore.test import test_eq, test_fail
from moe_lit.config import ParallelConfig, MoEConfig
from moe_lit.layer import rank_config

# %% [markdown]
# In this notebook: `dispatch_destinations` (owner rank and slot of every pair), `send_plan` and `receive_layout` (the
# counts a rank sends and where received rows land), `check_count_table`, `slab_sources` (which sender's pair fills
# each slab row) and the figure `plot_dispatch`. Plain torch on one process: `13a_transport` runs the same plan
# over `torch.distributed`. An **explanation** page.
#
# ## Dispatch and combine
#
# Under expert parallelism (EP) rank `r` holds `num_local_experts` whole experts and its own batch of tokens (its
# data-parallel share). A token must meet its `top_k` experts, which mostly live on other ranks: **dispatch** brings
# each token to them, the experts run, and **combine** brings the results back to the token's rank and sums its
# `top_k` slots with the router weights. The backend record decides the layout the experts receive, and that decides
# how the tokens travel:
#
# - **Standard format — all-gather / reduce-scatter** (`allgather_reducescatter`, and every backend whose tokens
#   arrive as a flat list). Prepare all-gathers every rank's tokens, `topk_ids` and `topk_weights`, so every rank holds
#   the whole batch `[Σ_r T_r, H]`; its local experts run on it with non-local ids masked to `-1` (the Standard
#   contract, through the placement). Each rank now holds a *partial* output for every token — the sum over its own
#   experts. Finalize reduce-scatters: the partial outputs of all ranks are summed and each rank keeps the rows of its
#   own tokens. Every rank sends and receives `(S − 1)·T·H` elements each way, whatever the routing. This is vLLM's
#   `allgather_reducescatter` backend (`AgRsAll2AllManager` in `vllm/distributed/device_communicators/all2all.py`, its "naive" DP/EP path).
# - **BatchedExperts format — all-to-all** (`deepep_low_latency`, `nixl_ep`). Each `(token, k)` pair travels only to
#   the rank owning its expert. The counts go first, so every receiver knows how many rows arrive from whom for which
#   local expert; then the rows. The receiver writes them into per-expert slabs `[E_local, max_num_tokens_per_rank · S,
#   H]` with `expert_num_tokens` — the contract of DeepEP low-latency and NIXL EP. Combine sends each row's expert
#   output back to its sender, in the order it came, and the sender applies the router weight (unless it was applied
#   on the input) and sums the slots in fp32. A rank sends `T·top_k·H` elements each way.
#
# > **Which rank owns an expert.** DeepEP low-latency and NIXL EP locate an expert by its *physical* id: rank `r` owns
# > the contiguous physical block `[offset_r, offset_r + count_r)` of a linear layout, and the local slot is
# > `physical − offset_r`. Linear placement is that layout already; round robin goes through `global_to_physical`
# > (`04_placement`). `dispatch_destinations` does exactly this, so one dispatch serves both placements, and EPLB's
# > physical replicas are simply more physical ids.
#
# ## Where each pair goes

# %%
#| export
def dispatch_destinations(
    placement: Placement,     # a rank's placement; every rank of the deployment gives the same answer
    topk_ids: torch.Tensor,   # [num_tokens, top_k] int32/int64, global (physical under EPLB) ids, -1 = empty slot
) -> tuple[torch.Tensor, torch.Tensor]:  # (dest_rank, dest_slot): [num_tokens, top_k] int64 each, -1 for empty slots
    """Owner rank and local slot of every `(token, k)` pair, found as DeepEP low-latency does: by physical id blocks.
    ValueError naming `placement` (not a Placement) or `topk_ids` (not 2-D int32/int64, or an id outside
    [-1, num_experts)). Source: vLLM's `DeepEPLLPrepareAndFinalize`, which sends `global_to_physical[topk_ids]` to
    DeepEP's `low_latency_dispatch` (fused_moe/prepare_finalize/deepep_ll.py)."""
    if not isinstance(placement, Placement): raise ValueError(f"placement: expected a Placement, got {type(placement).__name__}")
    check_tensor("topk_ids", topk_ids, ndim=2, dtype=(torch.int32, torch.int64))
    p, ids = placement, topk_ids.long()
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= p.num_experts):
        raise ValueError(f"topk_ids: expected ids in [-1, {p.num_experts}), got min {int(ids.min())}, max {int(ids.max())}")
    safe = ids.clamp(min=0)                                  # -1 must not index a table's last entry; masked below
    if p.global_to_physical is not None: phys = p.global_to_physical.to(ids.device)[safe]
    elif p.strategy == "round_robin":                        # round robin masked by expert_map: same numbering
        phys = round_robin_routing_tables(p.num_experts, p.ep_size, 0)[0].to(ids.device)[safe]
    else: phys = safe                                        # linear: physical id = global id
    offsets = torch.tensor([expert_block(p.num_experts, p.ep_size, r)[0] for r in range(p.ep_size)], device=ids.device)
    rank = torch.searchsorted(offsets, phys, right=True) - 1
    slot = phys - offsets[rank]
    return rank.masked_fill(ids < 0, -1), slot.masked_fill(ids < 0, -1)

# %% [markdown]
# The destination of a pair must be the rank whose own placement calls that id local, at the same slot — for linear
# and round-robin placement, with and without routing tables, and with EPLB replicas (bug class B.8: dispatch and the
# weights must agree on which expert a token meets).

# %%
#| test dispatch_destinations
def placements(E, S, backend, strategy, **kw):
    par = ParallelConfig.make(1, S, enable_expert_parallel=True, all2all_backend=backend, enable_eplb=kw.pop("eplb", False))
    cfg = MoEConfig(E, 2, 16, 16, routing_method="grouped_topk", num_expert_group=2, topk_group=1, parallel=par, **kw)
    return [Placement.build(rank_config(cfg, r), strategy) for r in range(S)]
for E, S, backend, strategy, kw in ((8, 2, "nixl_ep", "round_robin", {}), (9, 2, "nixl_ep", "round_robin", {}),
                                    (10, 4, "none", "round_robin", {}), (9, 4, "allgather_reducescatter", "linear", {}),
                                    (8, 2, "nixl_ep", "linear", dict(num_redundant_experts=2, eplb=True))):
    ps = placements(E, S, backend, strategy, **kw)
    ids = torch.arange(-1, ps[0].num_experts)[:, None].repeat(1, 2)           # every physical id, and -1
    for p in ps:
        rank, slot = dispatch_destinations(p, ids)
        test_eq((rank.dtype, rank.shape), (torch.int64, ids.shape))
        for r, q in enumerate(ps):                                           # r's own view: local exactly there
            test_eq(torch.where(rank == r, slot, -1), q.local_slot(ids))
test_eq(dispatch_destinations(ps[0], torch.tensor([[8, -1]]))[0].tolist(), [[1, -1]])   # replica 8 lives on rank 1
test_fail(lambda: dispatch_destinations(ps[0], torch.tensor([[10]])), contains="topk_ids: expected ids in [-1, 10)")
test_fail(lambda: dispatch_destinations("p", torch.tensor([[0]])), contains="placement: expected a Placement, got str")
test_fail(lambda: dispatch_destinations(ps[0], torch.tensor([0])), contains="topk_ids: expected a 2-D tensor")

# %% [markdown]
# ### The send plan and the receive layout
#
# A sender orders its valid pairs by `(destination rank, slot, position)` and counts them per `(destination rank,
# slot)`: one `[S, max_local]` table per rank (`max_local` is rank 0's expert count, the largest). Every rank
# all-gathers every rank's table, so after one collective each rank holds the same `[S_send, S_recv, max_local]`
# count table. From it alone the receiver knows where every arriving row goes: senders in rank order, each sender's
# rows slot by slot, and within a slot the rows of earlier senders first. Nothing but the rows themselves needs to
# travel afterwards — no ids, no slots.
#
# > **Capacity is decided by every rank at once.** The count table is identical on every rank, so each rank checks
# > every other rank's capacity too and raises the same `ValueError` at the same point, before any row moves. A rank
# > that raised alone would leave the others blocked in the next collective until the timeout; a silent truncation
# > would drop tokens (bug class E.24). The capacity is vLLM's: at most `max_num_tokens_per_rank` tokens per rank, and
# > so at most `max_num_tokens_per_rank · S` rows per local expert slab.

# %%
#| export
def send_plan(placement: Placement,     # this (sending) rank's placement
              topk_ids: torch.Tensor,    # [T, top_k] int32/int64 global (physical) ids, -1 = empty slot
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(order [n_send] int64 flat pair index t·top_k + k in send order, counts [S, max_local] int64)`.
    ValueError naming `placement` or `topk_ids`, from `dispatch_destinations`. Source: moe-lit's own (no counterpart
    in vLLM: DeepEP's dispatch kernel plans on the GPU)."""
    dest_rank, dest_slot = dispatch_destinations(placement, topk_ids)
    width = expert_block(placement.num_experts, placement.ep_size, 0)[1]    # rank 0 holds the most experts
    key = (dest_rank * width + dest_slot).flatten()
    valid = (dest_rank.flatten() >= 0).nonzero().flatten()
    sorted_key, perm = torch.sort(key[valid], stable=True)                  # stable: token order within a slot
    counts = torch.bincount(sorted_key, minlength=placement.ep_size * width).view(placement.ep_size, width)
    return valid[perm], counts

def receive_layout(recv_table: torch.Tensor,   # [S_send, max_local] int64, pairs each sender sends this rank per slot
                   num_local_experts: int,      # this rank's slabs (<= max_local)
                   capacity: int,               # rows of a slab (max_num_tokens_per_rank · S)
                   validate: bool = True,       # check the slabs' rows against capacity (one sync); off where the
                  ) -> tuple[torch.Tensor, torch.Tensor]:   # caller ran `check_count_table` on the same table
    """`(rows [n_recv] int64: e·capacity + row of each arriving pair, senders [n_recv] int64)` from
    `recv_table [S, max_local]`. ValueError naming `recv_table` (not 2-D int64), `num_local_experts` (not in
    `[0, max_local]`), `capacity` (not >= 1) or `expert_num_tokens` (a slab's rows over `capacity`: two pairs would
    share a row, with `validate`; callers that ran `check_count_table`, which raises it on every rank, pass False).
    Source: moe-lit's own order (senders in rank order
    within a slab) in the slab shape `[E_local, capacity, H]` of DeepEP low-latency's receive buffer."""
    check_tensor("recv_table", recv_table, ndim=2, dtype=torch.int64)
    check_int("num_local_experts", num_local_experts, lo=0, hi=recv_table.shape[1] + 1); check_int("capacity", capacity, lo=1)
    check_bool("validate", validate)
    cnt = recv_table[:, :num_local_experts]                                 # [S_send, E_local]
    rows = cnt.sum(0)                                                       # [E_local] rows of each slab
    if validate and rows.numel() and int(rows.max()) > capacity:
        raise ValueError(f"expert_num_tokens: expected at most capacity={capacity} rows per slab, got {rows.tolist()}")
    dev, flat = cnt.device, cnt.flatten()                                   # sender-major, as the rows arrive
    base = cnt.cumsum(0) - cnt                                              # rows of slot e taken by earlier senders
    start = torch.arange(num_local_experts, device=dev)[None, :] * capacity + base
    chunk = flat.cumsum(0) - flat                                           # where each (sender, slot) chunk begins
    within = torch.arange(int(flat.sum()), device=dev) - chunk.repeat_interleave(flat)
    senders = torch.arange(cnt.shape[0], device=dev).repeat_interleave(num_local_experts).repeat_interleave(flat)
    return start.flatten().repeat_interleave(flat) + within, senders

# %%
#| export
def check_count_table(table: torch.Tensor,       # [S_send, S_recv, max_local] int64, pairs per (sender, rank, slot)
                       token_counts: list,        # tokens of each rank (ints, rank order)
                       num_experts: int,          # physical experts placed
                       max_num_tokens_per_rank: int,   # per-rank token cap (tokens); slabs hold this · S rows
                      ) -> None:
    """Raise the same ValueError on every rank when any rank's tokens or any slab's rows exceed the capacity.
    ValueError naming `num_tokens` (a rank over `max_num_tokens_per_rank`), `expert_num_tokens` (a slab over
    `max_num_tokens_per_rank · S` rows) or `placement` (pairs for a slot a rank does not hold); the arguments' types are
    not checked (the callers build them). Source: vLLM's DeepEP low-latency capacity (`max_tokens_per_rank`, slabs of
    `max_tokens_per_rank × num_dispatchers` rows); raising on every rank is moe-lit's own (bug class E.24)."""
    S = len(token_counts)
    over = [r for r, n in enumerate(token_counts) if n > max_num_tokens_per_rank]
    if over:
        raise ValueError(f"num_tokens: expected at most max_num_tokens_per_rank={max_num_tokens_per_rank} tokens on "
                         f"every rank, got {token_counts} (ranks {over} over): capacity overflow, raised on every rank")
    rows, cap = table.sum(0), max_num_tokens_per_rank * S                   # [S_recv, max_local] rows per slab
    if rows.numel() and int(rows.max()) > cap:
        r, e = divmod(int(rows.argmax()), rows.shape[1])
        raise ValueError(f"expert_num_tokens: expected at most max_num_tokens_per_rank * num_ranks = {cap} rows per "
                         f"local expert, got {int(rows.max())} for local expert {e} of rank {r}: capacity overflow, "
                         f"raised on every rank")
    for r in range(S):                                                      # pairs for slots a rank does not have
        if rows[r, expert_block(num_experts, S, r)[1]:].any():
            raise ValueError(f"placement: expected every rank to place {num_experts} experts the same way, got pairs "
                             f"for a local slot rank {r} does not hold")

# %% [markdown]
# `slab_sources` runs the same plan in one process for a whole deployment — the placement and the `topk_ids` of every
# rank — and returns, for each receiving rank, which rank's token fills every row of its slabs. It is what
# `plot_dispatch` draws, and the distributed dispatch records the same table for the rows it really received, so the
# figure and the tests agree with the real thing.

# %%
#| export
def slab_sources(
    placements: list,               # one Placement per rank, rank order
    topk_ids: list,                 # one [T_r, top_k] int32/int64 tensor of dispatched ids per rank
    max_num_tokens_per_rank: int,   # per-rank token cap; slabs hold max_num_tokens_per_rank · S rows
) -> list:                          # per rank: [E_local, max_num_tokens_per_rank · S] int64, sender rank, -1 = padding
    """Single-process emulation of the all-to-all dispatch: the sender of every slab row on every rank.
    ValueError naming `placements` (empty, not Placements, not ranks 0..S-1 of one deployment), `topk_ids` (not one
    2-D int tensor per rank, or an id out of range), `max_num_tokens_per_rank` (< 1), or `check_count_table`'s
    capacity overflow. Source: moe-lit's own (the plan `AllToAllBatchedPrepareFinalize` runs across processes)."""
    if not isinstance(placements, (list, tuple)) or not placements or not all(isinstance(p, Placement) for p in placements):
        raise ValueError(f"placements: expected a non-empty list of Placement, got {placements!r:.80}")
    S = len(placements)
    if [(p.ep_size, p.ep_rank) for p in placements] != [(S, r) for r in range(S)]:
        raise ValueError(f"placements: expected ranks 0..{S - 1} of one {S}-rank deployment, got "
                         f"{[(p.ep_rank, p.ep_size) for p in placements]} as (rank, size)")
    if len({(p.num_experts, p.num_local_experts, p.strategy) for p in placements}) != 1:
        raise ValueError(f"placements: expected one num_experts, num_local_experts and strategy on every rank, got "
                         f"{[(p.num_experts, p.num_local_experts, p.strategy) for p in placements]}")
    if not isinstance(topk_ids, (list, tuple)) or len(topk_ids) != S:
        raise ValueError(f"topk_ids: expected a list of {S} tensors (one per rank), got {type(topk_ids).__name__}")
    check_int("max_num_tokens_per_rank", max_num_tokens_per_rank, lo=1)
    plans = [send_plan(p, ids) for p, ids in zip(placements, topk_ids)]
    table = torch.stack([c.cpu() for _, c in plans])
    check_count_table(table, [len(i) for i in topk_ids], placements[0].num_experts, max_num_tokens_per_rank)
    out, cap = [], max_num_tokens_per_rank * S
    for r, p in enumerate(placements):
        rows, senders = receive_layout(table[:, r], p.num_local_experts, cap, validate=False)   # checked above
        src = torch.full((p.num_local_experts * cap,), -1, dtype=torch.int64)
        src[rows] = senders
        out.append(src.view(p.num_local_experts, cap))
    return out

# %% [markdown]
# Two ranks, two experts each (linear). Rank 0 sends tokens 0 and 1, rank 1 sends token 2; every row of a slab is
# filled by sender order, and rows past `expert_num_tokens` are padding (`-1`). Capacity is checked first.

# %%
#| test slab_sources
par = lambda r: ParallelConfig.make(1, 2, dp_rank=r, enable_expert_parallel=True, all2all_backend="nixl_ep")
ps = [Placement.build(MoEConfig(4, 2, 16, 16, parallel=par(r))) for r in range(2)]
ids = [torch.tensor([[0, 3], [0, 1]]), torch.tensor([[3, 0]])]              # experts 0, 1 on rank 0; 2, 3 on rank 1
src = slab_sources(ps, ids, max_num_tokens_per_rank=2)
test_eq([s.shape for s in src], [(2, 4), (2, 4)])
test_eq(src[0].tolist(), [[0, 0, 1, -1], [0, -1, -1, -1]])                  # expert 0: rank 0 twice, then rank 1
test_eq(src[1].tolist(), [[-1] * 4, [0, 1, -1, -1]])                        # expert 2 receives nothing
test_eq([int((s >= 0).sum()) for s in src], [4, 2])                         # 6 pairs in all
empty = slab_sources(ps, [ids[0][:0], ids[1][:0]], 1)                      # no tokens anywhere
rows, senders = receive_layout(torch.tensor([[1, 0], [2, 1]]), 2, 4)       # slab 0: sender 0's row, then sender 1's two
test_eq((rows.tolist(), senders.tolist()), ([0, 1, 2, 4], [0, 1, 1, 1]))
test_fail(lambda: receive_layout(torch.tensor([[1, 0], [0, 1]]), 2, 0), contains="capacity: expected >= 1")
test_fail(lambda: receive_layout(torch.tensor([[2, 0], [1, 1]]), 2, 2),    # three rows for a slab of two: rows shared
          contains="expert_num_tokens: expected at most capacity=2 rows per slab, got [3, 1]")
test_fail(lambda: receive_layout(torch.tensor([[1, 0]]), 3, 2), contains="num_local_experts: expected <= 2, got 3")
test_eq([int((s >= 0).sum()) for s in empty], [0, 0])
test_fail(lambda: slab_sources(ps, ids, 1), contains="num_tokens: expected at most max_num_tokens_per_rank=1 tokens "
          "on every rank, got [2, 1] (ranks [0] over): capacity overflow")
dup = [torch.tensor([[0, 0], [0, 0]]), torch.tensor([[0, 0], [0, 0]])]      # duplicate ids: 8 rows for one slab
test_fail(lambda: slab_sources(ps, dup, 2), contains="expert_num_tokens: expected at most max_num_tokens_per_rank * "
          "num_ranks = 4 rows per local expert, got 8 for local expert 0 of rank 0")
test_fail(lambda: slab_sources(ps[::-1], ids, 2), contains="placements: expected ranks 0..1 of one 2-rank deployment")
test_fail(lambda: slab_sources(ps, ids[:1], 2), contains="topk_ids: expected a list of 2 tensors")
test_fail(lambda: slab_sources([], ids, 2), contains="placements: expected a non-empty list of Placement")

# %% [markdown]
# ### A picture of the dispatch
#
# `plot_dispatch` draws, for each receiving rank, its slabs as rows (one per local expert, labelled with the global id
# it holds) and their capacity as columns; a filled cell is coloured by the rank whose token it holds, padding is
# left white.

# %%
#| export
def plot_dispatch(
    placements: list,               # one Placement per rank
    topk_ids: list,                 # one [T_r, top_k] int32/int64 tensor of dispatched ids per rank
    max_num_tokens_per_rank: int,   # per-rank token cap (slab capacity = this · S)
):                                  # matplotlib Figure
    """One panel per receiving rank: its slabs `[E_local, capacity]`, each row coloured by the rank that sent it.
    ValueError as `slab_sources` raises it, before matplotlib is imported. Source: moe-lit's own figure."""
    sources = slab_sources(placements, topk_ids, max_num_tokens_per_rank)   # validates before importing matplotlib
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    S, cmap = len(placements), plt.get_cmap("tab10")
    fig, axes = plt.subplots(S, 1, figsize=(8, 0.45 * sum(p.num_local_experts for p in placements) + 0.9 * S),
                             squeeze=False)
    for r, (ax, src, p) in enumerate(zip(axes[:, 0], sources, placements)):
        img = torch.ones(*src.shape, 4)                                    # white padding
        for s in range(S): img[src == s] = torch.tensor(cmap(s % 10), dtype=img.dtype)
        ax.imshow(img.numpy(), aspect="auto", interpolation="nearest")
        ax.set_yticks(range(p.num_local_experts), [f"expert {int(g)}" for g in p.local_to_global])
        ax.set_title(f"rank {r} receives {int((src >= 0).sum())} pairs into {p.num_local_experts} slabs of "
                     f"{src.shape[1]} rows", fontsize=9)
    axes[-1, 0].set_xlabel("slab row")
    fig.legend(handles=[Patch(color=cmap(s % 10), label=f"token of rank {s}") for s in range(S)], loc="upper right",
               fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    return fig

# %% [markdown]
# Eight experts on four ranks, placed round robin (NIXL EP reads the routing tables), two experts per token, and
# uneven batches — rank 1 has no tokens at all. Rank 1 still *receives* rows: dispatch goes by expert, not by sender.

# %%
g = torch.Generator().manual_seed(0)
demo = MoEConfig(8, 2, 64, 32, routing_method="grouped_topk", num_expert_group=4, topk_group=2,
                 parallel=ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend="nixl_ep"))
demo_placements = [Placement.build(rank_config(demo, r), "round_robin") for r in range(4)]
demo_ids = [torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(n)]) if n else torch.empty(0, 2, dtype=torch.long)
            for n in (6, 0, 3, 5)]
fig = plot_dispatch(demo_placements, demo_ids, max_num_tokens_per_rank=6)
fig

# %%
#| test plot_dispatch
par = lambda r: ParallelConfig.make(1, 2, dp_rank=r, enable_expert_parallel=True, all2all_backend="nixl_ep")
ps = [Placement.build(MoEConfig(4, 2, 16, 16, parallel=par(r))) for r in range(2)]
fig = plot_dispatch(ps, [torch.tensor([[0, 3], [0, 1]]), torch.tensor([[3, 0]])], 2)
test_eq([ax.get_title() for ax in fig.axes], ["rank 0 receives 4 pairs into 2 slabs of 4 rows",
                                              "rank 1 receives 2 pairs into 2 slabs of 4 rows"])
plt.close(fig)
test_fail(lambda: plot_dispatch(ps, [torch.tensor([[0, 3]])], 2), contains="topk_ids: expected a list of 2 tensors")
