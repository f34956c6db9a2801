# %%
#| default_exp distributed

# %% [markdown]
# # Expert parallelism across processes
# > Dispatch and combine over torch.distributed in both activation formats — all-gather/reduce-scatter for the Standard format, an all-to-all into per-expert slabs for BatchedExperts — and the main job run for real on N processes.

# %%
#| export
from __future__ import annotations
import argparse, datetime, importlib, importlib.util, json, os, socket, sys, time
from dataclasses import dataclass
import torch
import torch.distributed as dist
from moe_lit.terms import check_int, check_choice, check_tensor, check_bool, check_positive_real, use_triton_interpreter_without_gpu, acc_dtype
from moe_lit.config import ActivationFormat, MoEConfig, ParallelConfig, BACKENDS
from moe_lit.models import PRESETS, DEFAULT_PRESET, preset
from moe_lit.routing import select_experts, router_logits
from moe_lit.placement import Placement
from moe_lit.dispatch_plan import send_plan, receive_layout, check_count_table, slab_sources
from moe_lit.formats import moe_reference_standard
from moe_lit.modular import Prepared, ModularKernel, SharedExperts, make_experts, check_prepare_args
from moe_lit.layer import FusedMoE, RandomExpertWeights, rank_config
from moe_lit.testing import check_output

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.config import BACKENDS, ParallelConfig, MoEConfig
from moe_lit.placement import Placement
from moe_lit.layer import rank_config
from moe_lit.testing import assert_close
from moe_lit.dispatch_plan import plot_dispatch

# %% [markdown]
# In this notebook: the two prepare/finalize implementations over `torch.distributed` — `AllGatherReduceScatterPrepareFinalize` (Standard
# format) and `AllToAllBatchedPrepareFinalize` (BatchedExperts format) — the factory
# `make_distributed_prepare_finalize` with `transport_note`, the main job across processes (`init_distributed`,
# `run_distributed`, `format_distributed_report`, `run_job`, `main`). The launcher that starts the processes from
# Python, and the tests across real processes, are in `13b_launch`. An **explanation** page with a **how-to** (the
# command below). Where each pair goes — the plan these run — is `13_dispatch_plan`.
#
# ## Running it
#
# The main job of `moe-lit run`, for real, on N processes — one per GPU with NCCL on a GPU machine, over gloo on a CPU
# machine (the same command):
#
# ```bash
# torchrun --nproc-per-node 2 -m moe_lit.distributed --model qwen3-30b-a3b --ep 2 --all2all nixl_ep --tokens 64
# ```
#
# Every rank builds only its own experts' weights, routes only its own share of the tokens, dispatches them to the
# experts' owners and combines the results; rank 0 gathers the output, checks it against the single-process reference
# and the float64 reference, and prints the report. `--ep` must equal the number of processes (it defaults to it).

# %% [markdown]
# ## Collectives with uneven row counts
#
# `all_gather` and `reduce_scatter` move equal-sized pieces, but ranks hold different numbers of tokens (zero
# included). The count of each rank is all-gathered first; the pieces are then padded to the largest count, moved,
# and the padding dropped. `all_to_all_single` takes split sizes, so the all-to-all needs no padding.
#
# > The helpers use `all_gather_single` / `reduce_scatter_single` where this torch has them (2.13 deprecates the
# > `*_into_tensor` / `*_tensor` names) and the older names otherwise. When every rank has zero rows, every rank knows
# > it from the counts and none calls the collective.

# %%
#| export
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

def _gather_counts(n: int, group, device) -> list:
    "The value `n` of every rank of `group`, in rank order (one all-gather)."
    out = torch.empty(dist.get_world_size(group), dtype=torch.int64, device=device)
    _all_gather_into(out, torch.tensor([n], dtype=torch.int64, device=device), group=group)
    return out.tolist()

def _all_gather_rows(x: torch.Tensor, counts: list, group) -> torch.Tensor:
    "All-gather `x [counts[rank], ...]` of every rank into `[sum(counts), ...]`: pad to the max, gather, unpad."
    m, S = max(counts), len(counts)
    if m == 0: return x.new_empty((0, *x.shape[1:]))
    buf = x.new_zeros((m, *x.shape[1:]))
    buf[:x.shape[0]] = x
    out = x.new_empty((S * m, *x.shape[1:]))
    _all_gather_into(out, buf, group=group)
    keep = torch.cat([torch.arange(c, device=x.device) + r * m for r, c in enumerate(counts)])
    return out[keep]

# %%
#| export
def _reduce_scatter_rows(x: torch.Tensor, counts: list, group) -> torch.Tensor:
    "Sum `x [sum(counts), ...]` over the ranks and keep this rank's rows `[counts[rank], ...]` (one reduce-scatter)."
    m, S, rank = max(counts), len(counts), dist.get_rank(group)
    if m == 0: return x.new_empty((0, *x.shape[1:]))
    buf = x.new_zeros((S * m, *x.shape[1:]))
    buf[torch.cat([torch.arange(c, device=x.device) + r * m for r, c in enumerate(counts)])] = x
    out = x.new_empty((m, *x.shape[1:]))
    _reduce_scatter(out, buf, group=group)
    return out[:counts[rank]]

def _all_to_all_rows(x: torch.Tensor, send_counts: list, recv_counts: list, group) -> torch.Tensor:
    "Send `send_counts[r]` consecutive rows of `x` to rank r; receive `recv_counts[r]` from rank r, in rank order."
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    return out

# %% [markdown]
# ## The Standard format: all-gather and reduce-scatter
#
# Both distributed prepare/finalize classes hand the experts a `DistributedPrepared`: the `Prepared` of `10_modular`
# plus what finalize needs to send the rows back. They have the protocol attributes of `10_modular`'s classes, so
# `ModularKernel(pf, make_experts(pf, impl))` composes them with any experts of their format, torch or Triton. Both
# return each rank's *own* tokens, already summed over every rank's experts: `output_is_reduced` is True, and the
# shared experts, which `ModularKernel` adds after finalize on the rank's own input, are added once per token.

# %%
#| export
@dataclass
class DistributedPrepared(Prepared):
    "`Prepared` plus the bookkeeping the distributed finalize needs to return the rows to their ranks."
    token_counts: list | None = None          # tokens of each rank of the group
    send_order: torch.Tensor | None = None    # all-to-all: [n_send] int64, flat pair index t·top_k + k of each sent row
    send_counts: list | None = None           # all-to-all: rows sent to each rank
    recv_counts: list | None = None           # all-to-all: rows received from each rank
    recv_rows: torch.Tensor | None = None     # all-to-all: [n_recv] int64, e·capacity + row of each received pair
    total_pairs: int = 0                      # all-to-all: pairs dispatched by the whole group (0: nothing moves)

# %%
#| export
def _check_group(group):
    "`group` (None = the default group) after checking that torch.distributed is initialized."
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: expected an initialized torch.distributed process group (call init_distributed, or "
                         "run under torchrun), got none")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return group

def group_device(group) -> torch.device:
    "Where tensors of `group`'s collectives live: this process's GPU for NCCL, the CPU for gloo."
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")

def _pad_columns(x: torch.Tensor, width: int | None) -> torch.Tensor:
    "`x [n, H]` with zero columns up to the backend's wire size `width` (unchanged when None or equal)."
    if width is None or width == x.shape[1]: return x
    if width < x.shape[1]: raise ValueError(f"hidden: expected at most padded_hidden_size={width} columns, got {x.shape[1]}")
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))

# %%
#| export
class AllGatherReduceScatterPrepareFinalize:
    "Standard format over torch.distributed: all-gather the group's tokens and routing, reduce-scatter the outputs."
    activation_format = ActivationFormat.Standard
    output_is_reduced = True                     # finalize returns this rank's tokens summed over every rank's experts
    max_num_tokens_per_rank = None               # no capacity: the gathered batch is as large as it needs to be

    def __init__(self, group=None,                          # the EP group (None: the default group)
                 topk_indices_dtype: torch.dtype = torch.int32,   # dtype of topk_ids the router should produce
                 padded_hidden_size: int | None = None):    # wire width of the hidden rows (None: as they come)
        self.group = _check_group(group)
        self.num_dispatchers, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.topk_indices_dtype = check_choice("topk_indices_dtype", topk_indices_dtype, (torch.int32, torch.int64))
        self.padded_hidden_size = None if padded_hidden_size is None else check_int("padded_hidden_size", padded_hidden_size, lo=1)
        self.stats = {}                                     # what the last prepare moved (for reports)

# %%
#| export
def _check_dist_prepare(pf, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input):
    "The arguments every distributed prepare needs, and a placement of this rank of this group."
    check_prepare_args(hidden, topk_weights, topk_ids, placement)
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    if (placement.ep_size, placement.ep_rank) != (pf.num_dispatchers, pf.rank):
        raise ValueError(f"placement: expected the placement of rank {pf.rank} of {pf.num_dispatchers}, got rank "
                         f"{placement.ep_rank} of {placement.ep_size}")

def _agrs_prepare(self, hidden: torch.Tensor,        # [T, H] this rank's tokens (T may be 0)
                  topk_weights: torch.Tensor,        # [T, top_k] fp32
                  topk_ids: torch.Tensor,            # [T, top_k] int32/int64 global (physical) ids, -1 = none
                  placement: Placement,              # this rank's placement
                  apply_router_weight_on_input: bool = False) -> DistributedPrepared:
    "All-gather tokens `a [ΣT, H]`, weights and ids of the group; ids become this rank's local slots (or -1)."
    _check_dist_prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)
    counts = _gather_counts(hidden.shape[0], self.group, hidden.device)
    a = _all_gather_rows(_pad_columns(hidden, self.padded_hidden_size), counts, self.group)
    wts = _all_gather_rows(topk_weights, counts, self.group)
    local = placement.local_slot(_all_gather_rows(topk_ids, counts, self.group))
    self.stats = {"tokens": hidden.shape[0], "pairs_sent": int((topk_ids >= 0).sum()),
                  "pairs_received": int((local >= 0).sum()), "tokens_gathered": sum(counts)}
    return DistributedPrepared(self.activation_format, a, wts, local_ids=local, hidden_size=hidden.shape[1],
                               apply_router_weight_on_input=apply_router_weight_on_input, token_counts=counts)

# %%
#| export
def _agrs_finalize(self, expert_out: torch.Tensor,   # [ΣT, H_wire] this rank's partial sums for every gathered token
                   prepared: DistributedPrepared) -> torch.Tensor:   # [T, H] this rank's tokens, summed over ranks
    "Reduce-scatter the partial outputs in fp32 (fp64 for fp64) and keep this rank's rows, unpadded."
    check_tensor("expert_out", expert_out, shape=tuple(prepared.a.shape))
    mine = _reduce_scatter_rows(expert_out.to(acc_dtype(expert_out.dtype)), prepared.token_counts, self.group)
    return mine[:, :prepared.hidden_size].to(expert_out.dtype)

AllGatherReduceScatterPrepareFinalize.prepare = _agrs_prepare
AllGatherReduceScatterPrepareFinalize.finalize = _agrs_finalize

# %% [markdown]
# > The partial outputs are reduced in fp32 (float64 for float64 layers), not in the activation dtype: summing `S`
# > bf16-rounded partials in bf16 would add a rounding per rank. It doubles the reduce-scatter's bytes for bf16: a
# > trade of bandwidth for accuracy that a bandwidth-bound deployment may want to make the other way.
#
# ## The BatchedExperts format: all-to-all
#
# Prepare: plan, all-gather the count tables, check capacity (the same answer on every rank), send each pair's row to
# its owner with `all_to_all_single`, and write the arriving rows into the slabs. Slab rows past
# `expert_num_tokens[e]` are NaN, so an experts kernel that reads padding is caught (as the reference dispatch of
# `05_formats` does). With `apply_router_weight_on_input` the sender scales each pair's row before sending, once.

# %%
#| export
class AllToAllBatchedPrepareFinalize:
    "BatchedExperts over torch.distributed all-to-all: pairs to their expert's owner, outputs back to their sender."
    activation_format = ActivationFormat.BatchedExperts
    output_is_reduced = True                     # combine returns this rank's tokens with every slot summed

    def __init__(self, max_num_tokens_per_rank: int,        # per-rank token cap; slabs hold this · num_dispatchers rows
                 group=None,                                # the EP group (None: the default group)
                 topk_indices_dtype: torch.dtype = torch.int64,   # DeepEP low-latency and NIXL EP take int64 ids
                 padded_hidden_size: int | None = None):    # wire width of the hidden rows (None: as they come)
        self.group = _check_group(group)
        self.max_num_tokens_per_rank = check_int("max_num_tokens_per_rank", max_num_tokens_per_rank, lo=1)
        self.num_dispatchers, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.topk_indices_dtype = check_choice("topk_indices_dtype", topk_indices_dtype, (torch.int32, torch.int64))
        self.padded_hidden_size = None if padded_hidden_size is None else check_int("padded_hidden_size", padded_hidden_size, lo=1)
        self.stats = {}

    @property
    def capacity(self) -> int:
        "Rows of each local expert's slab: `max_num_tokens_per_rank · num_dispatchers` (DeepEP low-latency's sizing)."
        return self.max_num_tokens_per_rank * self.num_dispatchers

# %%
#| export
def _exchange_counts(pf, counts: torch.Tensor, num_tokens: int, placement: Placement) -> tuple[torch.Tensor, list]:
    "All-gather every rank's `[S, max_local]` pair counts and token count; check capacity the same way on every rank."
    S = pf.num_dispatchers
    mine = torch.cat([counts.flatten(), torch.tensor([num_tokens], device=counts.device)])
    table = _all_gather_rows(mine[None], [1] * S, pf.group).cpu()              # [S, S·max_local + 1]
    token_counts, table = table[:, -1].tolist(), table[:, :-1].view(S, S, -1)  # [S_send, S_recv, max_local]
    check_count_table(table, token_counts, placement.num_experts, pf.max_num_tokens_per_rank)
    return table, token_counts

# %%
#| export
def _a2a_prepare(self, hidden: torch.Tensor,        # [T, H] this rank's tokens (T may be 0)
                 topk_weights: torch.Tensor,        # [T, top_k] fp32
                 topk_ids: torch.Tensor,            # [T, top_k] int32/int64 global (physical) ids, -1 = none
                 placement: Placement,              # this rank's placement
                 apply_router_weight_on_input: bool = False) -> DistributedPrepared:
    "Slabs `a [E_local, capacity, H_wire]` (padding NaN) and `expert_num_tokens [E_local]` int32 of this rank."
    _check_dist_prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)
    (T, H), k, dev, me = hidden.shape, topk_ids.shape[1], hidden.device, self.rank
    x = _pad_columns(hidden, self.padded_hidden_size)
    order, counts = send_plan(placement, topk_ids)
    table, token_counts = _exchange_counts(self, counts, T, placement)        # counts first: sizes and capacity
    send_counts, recv_counts = table[me].sum(1).tolist(), table[:, me].sum(1).tolist()
    rows = x[order // k]
    if apply_router_weight_on_input:                   # scaled once, at the sender (vLLM #43694 scaled twice)
        acc = acc_dtype(x.dtype)
        rows = (rows.to(acc) * topk_weights.flatten()[order, None].to(acc)).to(x.dtype)
    total = int(table.sum())
    received = _all_to_all_rows(rows, send_counts, recv_counts, self.group) if total else rows[:0]
    E, cap = placement.num_local_experts, self.capacity
    recv_rows, senders = receive_layout(table[:, me].to(dev), E, cap)
    a = torch.full((E * cap, x.shape[1]), float("nan"), dtype=x.dtype, device=dev)
    a[recv_rows] = received
    expert_num_tokens = table[:, me, :E].sum(0).to(device=dev, dtype=torch.int32)
    _record_a2a_stats(self, T, order, recv_rows, senders, expert_num_tokens, topk_ids, E)
    return DistributedPrepared(self.activation_format, a.view(E, cap, -1), topk_weights, expert_num_tokens=expert_num_tokens,
                               apply_router_weight_on_input=apply_router_weight_on_input, hidden_size=H,
                               expected_m=max(1, total // placement.num_experts), token_counts=token_counts,
                               send_order=order, send_counts=send_counts, recv_counts=recv_counts, recv_rows=recv_rows,
                               total_pairs=total)

# %% [markdown]
# The statistics a report shows — and the tests compare with `slab_sources` — are kept by the last prepare.

# %%
#| export
def _record_a2a_stats(pf, T, order, recv_rows, senders, expert_num_tokens, topk_ids, E):
    "What the last all-to-all prepare moved: pairs each way, rows per expert, and the sender of every slab row."
    src = torch.full((E * pf.capacity,), -1, dtype=torch.int64)
    src[recv_rows.cpu()] = senders.cpu()
    pf.stats = {"tokens": T, "pairs_sent": len(order), "pairs_received": len(recv_rows),
                "expert_num_tokens": expert_num_tokens.tolist(), "slab_source": src.view(E, pf.capacity),
                "topk_ids": topk_ids.cpu()}

# %% [markdown]
# Combine: every received row's expert output goes back to its sender in the order it arrived, so the sender gets its
# pairs back in its own send order and adds them into its tokens, weighted, in fp32.

# %%
#| export
def _a2a_finalize(self, expert_out: torch.Tensor,   # [E_local, capacity, H_wire]; rows >= expert_num_tokens unread
                  prepared: DistributedPrepared) -> torch.Tensor:   # [T, H] this rank's tokens
    "Send each received row's output back to its sender, who weights (unless applied on input) and sums in fp32."
    E, cap, Hw = prepared.a.shape
    check_tensor("expert_out", expert_out, shape=(E, cap, Hw))
    out_rows = expert_out.reshape(E * cap, Hw)[prepared.recv_rows]          # valid rows only: padding never travels
    back = (_all_to_all_rows(out_rows, prepared.recv_counts, prepared.send_counts, self.group)
            if prepared.total_pairs else out_rows[:0])
    (T, k), acc = prepared.topk_weights.shape, acc_dtype(expert_out.dtype)
    w = prepared.topk_weights.flatten()[prepared.send_order].to(acc)
    if prepared.apply_router_weight_on_input: w = torch.ones_like(w)      # applied once, at dispatch
    out = torch.zeros(T, Hw, dtype=acc, device=expert_out.device)
    out.index_add_(0, prepared.send_order // k, back.to(acc) * w[:, None])
    return out[:, :prepared.hidden_size].to(expert_out.dtype)               # the wire padding never leaks

AllToAllBatchedPrepareFinalize.prepare = _a2a_prepare
AllToAllBatchedPrepareFinalize.finalize = _a2a_finalize

# %% [markdown]
# ## Choosing the transport
#
# The factory reads the deployment's activation format — a read of the backend's record — and never the backend's
# name: BatchedExperts gets the all-to-all, Standard the all-gather/reduce-scatter. On a deployment without all2all
# (the `none` backend with several DP ranks) every rank must still see every token, which across processes *is* the
# all-gather, so it gets that implementation too.
#
# DeepEP and NIXL EP are real libraries. When their record is chosen, `transport_note` says whether the library is
# installed (an import check that does not import it) and which implementation serves the backend. moe-lit has no
# adapter that drives them yet: the backend is served by moe-lit's implementation of the same contract, and the note
# says so — `moe-lit explain` can show it.

# %%
#| export
NATIVE_LIBRARIES = {n: d.native_library for n, d in BACKENDS.items() if d.native_library}   # read from the records

def _installed(module: str) -> bool:
    "Is `module` importable here (found by importlib, not imported)?"
    try: return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError): return False

# %%
#| export
def transport_note(config: MoEConfig) -> str:
    "One sentence: which implementation carries `config`'s dispatch across processes, and the real library's status."
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    d, fmt = config.backend, config.activation_format
    impl = ("AllToAllBatchedPrepareFinalize (moe-lit's torch.distributed all-to-all into per-expert slabs)"
            if fmt is ActivationFormat.BatchedExperts else
            "AllGatherReduceScatterPrepareFinalize (moe-lit's torch.distributed all-gather / reduce-scatter)")
    if config.ep_size == 1: return f"{d.name}: one rank, nothing travels; {impl} runs as a no-op exchange"
    head = (f"{d.name}: {fmt.value} format served by {impl}" if config.use_all2all_kernels else
            f"{d.name}: no all2all on this deployment, so every rank all-gathers every token: {impl}")
    module = d.native_library
    if module is None: return head
    if _installed(module):
        return f"{head}; the {module} library is installed, but moe-lit has no adapter for it yet, so it is not used"
    return f"{head}; the {module} library is not installed (moe-lit's implementation of the same contract is used)"

# %%
#| test transport_note
make = lambda name, dp=2: MoEConfig(8, 2, 16, 16, parallel=ParallelConfig.make(1, dp, enable_expert_parallel=True,
                                                                               all2all_backend=name))
for name, d in BACKENDS.items():
    note = transport_note(make(name))
    assert note.startswith(f"{name}: "), note
    batched = d.moves_tokens and d.activation_format is ActivationFormat.BatchedExperts
    assert ("AllToAllBatchedPrepareFinalize" in note) == batched, note      # the format decides, never the name
    assert ("library" in note) == (name in NATIVE_LIBRARIES), note
assert "no all2all on this deployment" in transport_note(make("none"))
assert "deep_ep library is not installed" in transport_note(make("deepep_low_latency")) or importlib.util.find_spec("deep_ep")
assert "one rank, nothing travels" in transport_note(make("nixl_ep", dp=1))
test_fail(lambda: transport_note("nixl_ep"), contains="config: expected a MoEConfig, got str")

# %%
#| export
def make_distributed_prepare_finalize(
    config: MoEConfig,                        # this rank's layer and deployment (ep_size = the group's size)
    group=None,                               # the EP group (None: the default group)
    max_num_tokens_per_rank: int | None = None,   # batched capacity per rank; None: config.max_num_tokens
):
    "The prepare/finalize that carries `config`'s deployment across processes, chosen by its activation format."
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    group = _check_group(group)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    if config.ep_size != size:
        raise ValueError(f"config.parallel.ep_size: expected the group's world size {size}, got {config.ep_size}")
    if config.ep_rank != rank:
        raise ValueError(f"config.parallel.ep_rank: expected this process's rank in the group ({rank}), got {config.ep_rank}")
    if config.activation_format is ActivationFormat.BatchedExperts:
        cap = config.max_num_tokens if max_num_tokens_per_rank is None else max_num_tokens_per_rank
        check_int("max_num_tokens_per_rank", cap, lo=1)
        return AllToAllBatchedPrepareFinalize(cap, group, config.topk_indices_dtype, config.padded_hidden_size)
    return AllGatherReduceScatterPrepareFinalize(group, config.topk_indices_dtype, config.padded_hidden_size)

# %% [markdown]
# Outside a process group the factory and both classes say what is missing:

# %%
#| test factory_needs_a_group
if not dist.is_initialized():
    cfg = MoEConfig(8, 2, 16, 16)
    test_fail(lambda: make_distributed_prepare_finalize(cfg), contains="group: expected an initialized torch.distributed")
    test_fail(lambda: AllToAllBatchedPrepareFinalize(4), contains="group: expected an initialized torch.distributed")
    test_fail(lambda: AllGatherReduceScatterPrepareFinalize(), contains="group: expected an initialized")
test_fail(lambda: make_distributed_prepare_finalize("cfg"), contains="config: expected a MoEConfig, got str")

# %% [markdown]
# ## Joining the process group
#
# `init_distributed` reads what `torchrun` puts in the environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`,
# `MASTER_PORT`, `LOCAL_RANK`) and joins with a timeout, so a collective that waits for a dead or stuck peer fails
# instead of hanging. Without a GPU it uses gloo and the CPU; with GPUs, NCCL and one GPU per process, the one named by
# `LOCAL_RANK`. Run without torchrun (none of the variables set) it makes a one-process group.

# %%
#| export
def free_port() -> int:
    "A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# %%
#| export
def init_distributed(timeout_s: float = 600.0,      # seconds a collective may wait for its peers
                     backend: str | None = None,    # 'gloo' or 'nccl'; None: NCCL with a GPU, else gloo
                    ) -> tuple[int, int, torch.device]:   # (rank, world size, this process's device)
    "Join the process group torchrun's environment describes (or a one-process group without it)."
    check_positive_real("timeout_s", timeout_s)
    backend = ("nccl" if torch.cuda.is_available() else "gloo") if backend is None else backend
    check_choice("backend", backend, ("gloo", "nccl"))
    if backend == "nccl" and not torch.cuda.is_available(): raise ValueError("backend: expected 'gloo' without a CUDA GPU, got 'nccl'")
    if dist.is_initialized(): return dist.get_rank(), dist.get_world_size(), group_device(None)   # already joined
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [n for n in names if n not in os.environ]
    if missing and len(missing) < len(names):
        raise ValueError(f"environment: expected {', '.join(names)} (torchrun sets them), got {missing} unset")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK: expected < {torch.cuda.device_count()} (one GPU per process), got {local}")
        device = torch.device("cuda", local); torch.cuda.set_device(device)
    kw = dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1) if missing else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return dist.get_rank(), dist.get_world_size(), device

# %% [markdown]
# ## The main job across processes
#
# `run_distributed` is the main job of `moe-lit run` on real processes. Every rank
#
# 1. takes its config from the deployment (`rank_config`: DP rank `r` of `S`, EP on) and builds its `Placement`;
# 2. builds its `FusedMoE` (`12_layer`) — the same object a single-process user gets: only its own experts' weights
#    (`RandomExpertWeights`: expert `g` depends only on `(seed, g)`; under EPLB a physical slot `p` holds logical
#    expert `p % num_experts`, vLLM's initial EPLB map), the replicated router, the placement's tables, the experts
#    the deployment's format and the device call for;
# 3. takes its share of the tokens — the batch is drawn from the shared seed exactly as `moe-lit run` draws it, so
#    both commands see the same tokens — and routes them with the layer's router (EPLB: each logical id then goes to
#    one of its physical replicas);
# 4. runs `ModularKernel(make_distributed_prepare_finalize(...), the layer's experts and shared experts)` on the
#    layer's weights and gets its own tokens' output. Only the prepare/finalize differs from the layer's own forward.
#
# Rank 0 gathers every rank's output and routing, and computes the single-process result the existing way — the
# Standard path over all experts, streamed in chunks of experts into an fp32 accumulator, and the same in float64 —
# from the logical routing the ranks used. It then checks the distributed output against both, with the package's one
# `assert_close` policy.

# %%
#| export
def split_tokens(num_tokens: int,   # tokens in the whole batch
                 num_ranks: int,    # ranks sharing it
                ) -> list:          # tokens of each rank
    "Split a batch over ranks as evenly as possible, the first `num_tokens % num_ranks` ranks taking one more."
    check_int("num_tokens", num_tokens, lo=0); check_int("num_ranks", num_ranks, lo=1)
    base, rem = divmod(num_tokens, num_ranks)
    return [base + (r < rem) for r in range(num_ranks)]

# %%
#| test split_tokens
test_eq(split_tokens(11, 4), [3, 3, 3, 2])
test_eq(split_tokens(1, 3), [1, 0, 0])
test_eq(split_tokens(0, 2), [0, 0])
test_fail(lambda: split_tokens(-1, 2), contains="num_tokens: expected >= 0, got -1")
test_fail(lambda: split_tokens(4, 0), contains="num_ranks: expected >= 1, got 0")

# %%
#| export
@dataclass
class DistributedRun:
    "What `run_distributed` returns on every rank; the references and the report on rank 0 only."
    config: MoEConfig                       # this rank's config
    placement: Placement                    # this rank's placement
    token_counts: list                      # tokens of each rank
    output_local: torch.Tensor              # [T_rank, H] config.dtype: this rank's tokens' output
    rank_stats: list                        # per rank: what its prepare moved, weights_s and forward_s (seconds)
    experts: tuple = ("torch", "")          # (implementation, reason)
    prepare_finalize: str = ""              # class name of the prepare/finalize
    output: torch.Tensor | None = None          # [T, H] config.dtype, every rank's output in rank order (CPU)
    topk_weights: torch.Tensor | None = None    # [T, top_k] fp32, every rank's router weights
    topk_ids: torch.Tensor | None = None        # [T, top_k] int64, the logical ids every rank routed to
    single_device: torch.Tensor | None = None   # rank 0: [T, H] config.dtype, the single-process result
    reference: torch.Tensor | None = None       # rank 0: [T, H] float64
    report: dict | None = None                  # rank 0: JSON-ready report

# %%
#| export
def _tokens(config: MoEConfig, num_tokens: int, seed: int) -> torch.Tensor:
    "The batch `[num_tokens, H]` in config.dtype on the CPU, drawn as `moe-lit run` draws it (seed + 7)."
    return torch.randn(num_tokens, config.hidden_size, generator=torch.Generator().manual_seed(seed + 7)).to(config.dtype)

def _route(cfg: MoEConfig, weights: RandomExpertWeights, hidden: torch.Tensor):
    "The single-process routing of rank 0's check: `(topk_weights fp32, logical topk_ids int64)`, `[T, top_k]`, by the spec."
    r = {k: t.to(hidden.device) for k, t in weights.router().items()}
    logits = router_logits(hidden, r["gate"], r.get("gate_bias"))
    wts, ids = select_experts(cfg, logits, r.get("e_score_correction_bias"))
    return wts, ids.long()

# %%
#| export
def _single_process(config: MoEConfig, weights: RandomExpertWeights, hidden: torch.Tensor, wts, ids):
    "`(single [T, H] config.dtype, reference [T, H] float64)`: all experts in chunks, fp32 and float64 accumulation."
    T, L = hidden.shape[0], config.num_experts
    acc = acc_dtype(config.dtype)
    single, ref = torch.zeros(T, config.hidden_size, dtype=acc), torch.zeros(T, config.hidden_size, dtype=torch.float64)
    kw = dict(apply_router_weight_on_input=config.apply_router_weight_on_input)
    step = max(1, -(-L // max(1, config.ep_size)))                  # one rank's worth of experts alive at a time
    for lo in range(0, L, step):
        chunk = list(range(lo, min(L, lo + step)))
        ex = weights.experts(chunk)
        w13, w2 = ex["w13"], ex["w2"]
        emap = torch.full((L,), -1, dtype=torch.long); emap[chunk] = torch.arange(len(chunk))
        local = torch.where(ids >= 0, emap[ids.clamp(min=0)], -1)
        moe_reference_standard(hidden, w13, w2, wts, local, accumulate_into=single, **kw)
        moe_reference_standard(hidden.double(), w13, w2, wts, local, accumulate_into=ref, **kw)
    shared = weights.shared()
    if shared is not None:
        sh = SharedExperts(**shared)
        single += sh(hidden).to(acc); ref += sh(hidden.double())
    return single.to(config.dtype), ref

# %%
#| export
def run_distributed(config: MoEConfig,                 # the model on its deployment: parallel.ep_size = world size
                    num_tokens: int = 64,              # tokens in the whole batch, split over the ranks
                    placement: str = "linear",         # requested placement: 'linear' or 'round_robin'
                    seed: int = 0,                     # seed of the weights and the tokens (shared by every rank)
                    experts: str = "auto",             # 'auto', 'torch' or 'triton'
                    token_counts: list | None = None,  # tokens of each rank (sum = num_tokens); None: split_tokens
                    max_num_tokens_per_rank: int | None = None,   # batched capacity; None: config.max_num_tokens
                    group=None) -> DistributedRun:     # the EP group (None: the default group)
    "The main job on every rank of `group`; rank 0 gathers the output and checks it against the single-process result."
    rank, S, counts = _check_run_args(config, num_tokens, seed, token_counts, group)   # the same answer on every rank
    device, cfg, t0 = group_device(group), rank_config(config, rank), time.perf_counter()
    weights = RandomExpertWeights(config, seed)
    layer = FusedMoE(cfg, weights, placement, experts=experts, device=device)   # its experts, router, tables
    hidden_all = _tokens(config, num_tokens, seed)
    hidden = hidden_all[sum(counts[:rank]):sum(counts[:rank + 1])].to(device)
    wts, ids = layer.route(hidden)                          # EPLB: physical ids, one replica per logical choice
    logical = ids.long() % config.num_experts               # physical p is a copy of logical p % num_experts
    pf = make_distributed_prepare_finalize(cfg, group, max_num_tokens_per_rank)
    place, impl = layer.placement, (layer.experts, layer.experts_reason)
    mk, t1 = ModularKernel(pf, make_experts(pf, layer.experts), layer.shared_experts), time.perf_counter()
    stages = {}                                             # dispatch (prepare), experts, combine (finalize) seconds
    out = mk(hidden, layer.w13, layer.w2, wts, ids, place, cfg.apply_router_weight_on_input, timings=stages,
             w13_bias=layer.w13_bias, w2_bias=layer.w2_bias, activation=layer.activation)
    if device.type == "cuda": torch.cuda.synchronize()
    stats = dict(pf.stats, weights_s=t1 - t0, forward_s=time.perf_counter() - t1, **stages)
    run = DistributedRun(cfg, place, counts, out, [None] * S, impl, type(pf).__name__)
    dist.all_gather_object(run.rank_stats, stats, group=group)
    run.output, run.topk_weights, run.topk_ids = (_all_gather_rows(t, counts, group).cpu() for t in (out, wts, logical))
    if rank == 0: _finish_on_rank0(run, config, weights, hidden_all, placement, seed, dist.get_backend(group), device)
    return run

# %%
#| export
def _check_run_args(config, num_tokens, seed, token_counts, group) -> tuple[int, int, list]:
    "`(rank, world size, tokens of each rank)` after checking the arguments of `run_distributed`."
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    group = _check_group(group)
    rank, S = dist.get_rank(group), dist.get_world_size(group)
    if config.ep_size != S:
        raise ValueError(f"config.parallel.ep_size: expected the group's world size {S}, got {config.ep_size}")
    if config.activation != "silu" or config.has_expert_bias:   # gpt-oss's experts run in FusedMoE / run_emulated_ep
        raise ValueError(f"config: expected SiLU experts without biases across processes, got activation "
                         f"{config.activation!r}, has_expert_bias={config.has_expert_bias}")
    check_int("num_tokens", num_tokens, lo=0, hi=65537); check_int("seed", seed, lo=0)
    counts = split_tokens(num_tokens, S) if token_counts is None else _check_token_counts(token_counts, num_tokens, S)
    seen = [None] * S
    dist.all_gather_object(seen, (num_tokens, counts, seed), group=group)     # every rank must agree, or all raise
    if any(x != seen[0] for x in seen):
        raise ValueError(f"token_counts: expected the same (num_tokens, token_counts, seed) on every rank, got {seen}")
    return rank, S, counts

def _check_token_counts(token_counts, num_tokens: int, num_ranks: int) -> list:
    "`token_counts` as a list of `num_ranks` ints >= 0 summing to `num_tokens`."
    if not isinstance(token_counts, (list, tuple)) or len(token_counts) != num_ranks:
        raise ValueError(f"token_counts: expected a list of {num_ranks} ints (one per rank), got {token_counts!r}")
    counts = [check_int("token_counts[r]", n, lo=0) for n in token_counts]
    if sum(counts) != num_tokens: raise ValueError(f"token_counts: expected a sum of num_tokens={num_tokens}, got {counts}")
    return counts

# %% [markdown]
# On rank 0 the run is checked and reported. For the batched format, the slab layout each rank really received is also
# compared with `slab_sources` computed from the ids the ranks dispatched — `13_dispatch_plan`'s figure is the real dispatch.

# %%
#| export
def _finish_on_rank0(run: DistributedRun, config, weights, hidden_all, placement, seed, backend, device) -> None:
    "Rank 0: the single-process result, the checks and the report, stored in `run`."
    t0, S, cfg = time.perf_counter(), len(run.token_counts), run.config
    run.single_device, run.reference = _single_process(config, weights, hidden_all, run.topk_weights, run.topk_ids)
    batched = cfg.activation_format is ActivationFormat.BatchedExperts
    slabs_ok = None
    if batched:
        places = [Placement.build(rank_config(config, r), placement) for r in range(S)]
        want = slab_sources(places, [s["topk_ids"] for s in run.rank_stats], run.rank_stats[0]["slab_source"].shape[1] // S)
        slabs_ok = all(torch.equal(w, s["slab_source"]) for w, s in zip(want, run.rank_stats))
    routed_here = _route(config, weights, hidden_all)[1]            # the whole batch routed in one process
    run.report = {"model": config.name, "world_size": S, "process_group": backend, "device": str(device),
                  "all2all_backend": cfg.backend.name, "activation_format": cfg.activation_format.value,
                  "transport": transport_note(cfg), "prepare_finalize": run.prepare_finalize,
                  "experts": {"implementation": run.experts[0], "reason": run.experts[1]},
                  "placement": {"requested": placement, "strategy": run.placement.strategy, "reason": run.placement.reason},
                  "num_tokens": sum(run.token_counts), "tokens_per_rank": run.token_counts, "seed": seed,
                  "pairs_sent_per_rank": [s["pairs_sent"] for s in run.rank_stats],
                  "pairs_received_per_rank": [s["pairs_received"] for s in run.rank_stats],
                  "expert_num_tokens_per_rank": [s["expert_num_tokens"] for s in run.rank_stats] if batched else None,
                  "slab_layout_matches_emulation": slabs_ok,
                  "routing_same_as_single_process": bool(torch.equal(routed_here, run.topk_ids)),
                  "check": {"distributed_vs_float64": check_output(run.output, run.reference, config.dtype),
                            "single_process_vs_float64": check_output(run.single_device, run.reference, config.dtype),
                            "distributed_vs_single_process": check_output(run.output, run.single_device.double(), config.dtype)},
                  "timing": {"weights_s_per_rank": [s["weights_s"] for s in run.rank_stats],
                             "forward_s_per_rank": [s["forward_s"] for s in run.rank_stats],
                             **{f"{k}_per_rank": [s.get(k) for s in run.rank_stats]
                                for k in ("prepare_s", "experts_s", "finalize_s")},
                             "reference_s": time.perf_counter() - t0}}

# %% [markdown]
# The report as text, for `main` (and, later, `moe-lit run --distributed`):

# %%
#| export
def format_distributed_report(report: dict) -> str:
    "The report of `run_distributed` as a few lines of text."
    if not isinstance(report, dict) or "check" not in report:
        raise ValueError(f"report: expected the report dict of run_distributed (rank 0), got {type(report).__name__}")
    r, c, t = report, report["check"], report["timing"]
    verdict = lambda x: f"{'ok' if x['ok'] else 'FAILED'} (max rel err {x['max_rel_err']:.2e}, rtol {x['rtol']:g})"
    procs = f"{r['world_size']} process" + ("es" if r["world_size"] > 1 else "")
    lines = [f"moe-lit distributed: {r['model'] or 'model'} on {procs} ({r['process_group']}, {r['device']})",
             f"  deployment   all2all {r['all2all_backend']!r} -> {r['activation_format']} format",
             f"  transport    {r['transport']}",
             f"  experts      {r['experts']['implementation']} ({r['experts']['reason']})",
             f"  placement    {r['placement']['strategy']} ({r['placement']['reason']})",
             f"  tokens       {r['num_tokens']} in all, per rank {r['tokens_per_rank']}",
             f"  pairs        sent per rank {r['pairs_sent_per_rank']}, received per rank {r['pairs_received_per_rank']}"]
    if r["expert_num_tokens_per_rank"] is not None:            # the text abridges; the report keeps every count
        rows = [f"{min(n, default=0)}-{max(n, default=0)} ({n.count(0)} empty)" for n in r["expert_num_tokens_per_rank"]]
        lines.append(f"  slabs        rows per local expert, per rank: {', '.join(rows)}; layout matches the "
                     f"emulation: {r['slab_layout_matches_emulation']}")
    lines += [f"  check        distributed vs float64: {verdict(c['distributed_vs_float64'])}",
              f"               distributed vs single process: {verdict(c['distributed_vs_single_process'])}",
              f"               single process vs float64: {verdict(c['single_process_vs_float64'])}",
              f"  time         forward {max(t['forward_s_per_rank']):.3f} s (slowest rank), weights "
              f"{max(t['weights_s_per_rank']):.3f} s, reference on rank 0 {t['reference_s']:.3f} s"]
    return "\n".join(lines)

# %% [markdown]
# ## The torchrun entry point
#
# `main` is what `torchrun ... -m moe_lit.distributed` runs on every process: a few options, the model from the
# presets, the deployment `--ep N` data-parallel ranks with EP on (`N` = the number of processes). Exit status: 0, 1
# when a check fails, 2 on bad input (the same on every rank: each rank validates the same arguments).

# %%
#| export
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m moe_lit.distributed",
                                 description="The moe-lit main job on N processes (one EP rank each).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="a built-in preset")
    ap.add_argument("--ep", type=int, default=None, help="EP ranks; must equal the number of processes (None: that number)")
    ap.add_argument("--all2all", default=None, choices=list(BACKENDS),
                    help="all2all backend; None: allgather_reducescatter with more than one rank, else none")
    ap.add_argument("--placement", default="linear", choices=["linear", "round_robin"], help="expert placement")
    ap.add_argument("--tokens", type=int, default=64, help="tokens in the whole batch, split over the ranks")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokens")
    ap.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="None: the model's own")
    ap.add_argument("--experts", default="auto", choices=["auto", "triton", "torch"], help="auto: Triton on a GPU")
    ap.add_argument("--max-tokens-per-rank", type=int, default=None, help="batched capacity; None: the model's")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait for its peers")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    return ap

# %%
#| export
def run_job(model: str = DEFAULT_PRESET,          # a preset
            ep: int | None = None,                 # EP ranks; None: the number of processes (which it must equal)
            all2all: str | None = None,            # None: allgather_reducescatter with more than one rank, else none
            placement: str = "linear", tokens: int = 64, seed: int = 0,
            dtype: str | None = None,              # 'bf16', 'fp16', 'fp32'; None: the model's own
            experts: str = "auto", max_tokens_per_rank: int | None = None,
            timeout: float = 600.0,                # seconds a collective may wait for its peers
            as_json: bool = False) -> int:         # exit status: 0, 1 when a check fails, 2 on bad input
    "The main job on this process's rank (what `main` and `moe-lit run --distributed` call); rank 0 prints the report."
    use_triton_interpreter_without_gpu()                # before any kernel module is imported
    try: rank, world, _ = init_distributed(timeout)
    except ValueError as e: print(f"moe-lit distributed: error: {e}", file=sys.stderr); return 2
    try:
        ep = world if ep is None else ep
        if ep != world: raise ValueError(f"--ep: expected the number of processes ({world}), got {ep}")
        all2all = all2all or ("allgather_reducescatter" if ep > 1 else "none")
        cfg = preset(model, ParallelConfig.make(1, ep, enable_expert_parallel=ep > 1, all2all_backend=all2all))
        if dtype: cfg = cfg.replace(dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
        run = run_distributed(cfg, tokens, placement, seed, experts, max_num_tokens_per_rank=max_tokens_per_rank)
    except ValueError as e:                             # every rank says it: torchrun may stop the others first
        sys.stderr.write(f"moe-lit distributed: rank {rank}: error: {e}\n"); sys.stderr.flush()   # one write: no interleaving
        dist.destroy_process_group(); return 2
    status = 0
    if rank == 0:
        print(json.dumps(run.report, indent=1) if as_json else format_distributed_report(run.report), flush=True)
        status = 0 if all(c["ok"] for c in run.report["check"].values()) else 1
    dist.destroy_process_group()
    return status

def main(argv: list | None = None) -> int:
    "`torchrun --nproc-per-node N -m moe_lit.distributed ...`: the main job on N processes; rank 0 prints the report."
    a = _parser().parse_args(argv)
    return run_job(a.model, a.ep, a.all2all, a.placement, a.tokens, a.seed, a.dtype, a.experts, a.max_tokens_per_rank,
                   a.timeout, a.json)

# %%
#| export
#| eval: false
if __name__ == "__main__": sys.exit(main())
