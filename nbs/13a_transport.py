# %%
#| default_exp transport

# %% [markdown]
# # Expert parallelism across processes: the transport
# > Dispatch and combine over torch.distributed in both activation formats — all-gather/reduce-scatter for the Standard format, an all-to-all into per-expert slabs for BatchedExperts — as prepare/finalize objects the layer's modular kernel runs.

# %%
#| export
from __future__ import annotations
import datetime, importlib, importlib.util, math, os, socket
from dataclasses import dataclass
import torch
import torch.distributed as dist
from fastcore.basics import patch
from moe_lit.terms import check_int, check_choice, check_tensor, check_bool, check_positive_real, acc_dtype, check_dense
from moe_lit.routing import check_topk_ids
from moe_lit.config import ActivationFormat, MoEConfig, BACKENDS
from moe_lit.placement import Placement
from moe_lit.dispatch_plan import send_plan, receive_layout, check_count_table
from moe_lit.modular import Prepared, check_prepare_args, check_quant_block

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.config import BACKENDS, ParallelConfig, MoEConfig
from moe_lit.placement import Placement
from moe_lit.layer import rank_config
from moe_lit.testing import assert_close
from moe_lit.dispatch_plan import plot_dispatch
import contextlib, socket
from unittest import mock
from moe_lit.layer import FusedMoE
from moe_lit.formats import moe_reference_standard
from moe_lit.modular import ModularKernel, make_experts, BatchedPrepareFinalize
from moe_lit.kernels.quant_act import fp8_quantize_activations_reference
from moe_lit.quant_weights import quantize_expert_weights

# %%
#| helper
@contextlib.contextmanager
def one_process_group():
    "A gloo group of this process alone, for the in-chapter tests (destroyed on exit); `13c_launch` tests real groups."
    assert not dist.is_initialized(), "a process group is already initialized"
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try: yield
    finally: dist.destroy_process_group()

def one_rank_problem(seed: int = 0):
    "A small fp32 layer on one rank, a batch routed by it, and the float64 reference of its routed experts."
    cfg = MoEConfig(8, 2, 64, 32, dtype=torch.float32)
    layer = FusedMoE(cfg, experts="torch", seed=seed)
    hidden = torch.randn(5, 64, generator=torch.Generator().manual_seed(seed))
    wts, ids = layer.route(hidden)
    return layer, hidden, wts, ids, moe_reference_standard(hidden.double(), layer.w13.double(), layer.w2.double(), wts, ids)

# %% [markdown]
# In this notebook: the two prepare/finalize implementations over `torch.distributed` —
# `AllGatherReduceScatterPrepareFinalize` (Standard format) and `AllToAllBatchedPrepareFinalize` (BatchedExperts
# format) — the factory `make_distributed_prepare_finalize` with `transport_note`, and joining the process group
# (`init_distributed`, `free_port`). `13b_distributed` runs the main job over them; `13c_launch` starts the processes
# from Python and holds the tests across real processes. Where each pair goes — the plan these run — is
# `13_dispatch_plan`. An **explanation** page.

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

_GATHER_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
                  torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
                  torch.uint64, torch.bool, torch.complex64, torch.complex128)   # what travels as bytes, by index

def all_gather_rows(x: torch.Tensor,   # [counts[rank], ...] this rank's rows: a dense tensor of a _GATHER_DTYPES dtype
                    counts: list,        # rows of every rank (ints, the same list on every rank)
                    group,
                    check: bool = True,  # compare dtype, row shape and counts across ranks first (one small collective)
                   ) -> torch.Tensor:   # [sum(counts), ...] every rank's rows, in rank order
    """All-gather rows of uneven counts across `group`: pad to the max, gather, unpad (a collective: every rank calls
    it); ValueError on bad arguments, on every rank alike. ValueError naming `group` (`check_group`), `x` (not a dense
    tensor of rows of a `_GATHER_DTYPES` dtype), `check`, `counts` (not S ints >= 0, or `counts[rank]` not x's rows) or,
    with `check`, `x, counts` (ranks that disagree on dtype, row shape or counts). Source: torch.distributed's
    `all_gather_into_tensor` (`all_gather_single` where torch has it); the uneven-count gather of vLLM's
    `AgRsAll2AllManager.dispatch` (`all_gatherv`, vllm/distributed/device_communicators/all2all.py)."""
    group = check_group(group)
    check_dense("x", check_tensor("x", x, dtype=_GATHER_DTYPES))
    if x.is_quantized or x.is_nested: raise ValueError("x: expected a plain dense tensor, got a quantized or nested one")
    if x.dim() == 0: raise ValueError("x: expected a tensor of rows (at least 1-D), got a 0-D tensor")
    check_bool("check", check)
    x = x.resolve_conj().resolve_neg()
    S, rank = dist.get_world_size(group), dist.get_rank(group)
    if not isinstance(counts, (list, tuple)) or len(counts) != S or \
            any(not isinstance(c, int) or isinstance(c, bool) or c < 0 for c in counts):
        raise ValueError(f"counts: expected a list of {S} ints >= 0 (the rows of every rank), got {counts!r}")
    if counts[rank] != x.shape[0]:
        raise ValueError(f"counts: expected counts[{rank}] = this rank's rows of x ({x.shape[0]}), got {counts[rank]}")
    if check:                   # the bytes would be reinterpreted as this rank's dtype and shape: compare them first
        head = torch.tensor([_GATHER_DTYPES.index(x.dtype), hash(tuple(x.shape[1:])) & (2**62 - 1), *counts],
                            dtype=torch.int64, device=x.device)
        heads = head.new_empty(S * head.numel())
        _all_gather_into(heads, head, group=group)
        heads = heads.view(S, -1)
        if not bool((heads == heads[0]).all()):
            rows = [(str(_GATHER_DTYPES[int(h[0])]), h[2:].tolist()) for h in heads.cpu()]
            raise ValueError(f"x, counts: expected the same dtype, row shape and counts on every rank, got (dtype, "
                             f"counts) per rank {rows} (row shapes differ where those agree)")
    m = max(counts)
    if m == 0: return x.new_empty((0, *x.shape[1:]))
    # every dtype travels as its bytes: gloo has no fp8, int16 or unsigned wider than 8 bits; a gather moves bytes as is
    rows = x.detach().reshape(x.shape[0], math.prod(x.shape[1:]))              # [rows, elements of a row]
    if not rows.shape[1]: return x.new_empty((sum(counts), *x.shape[1:]))      # rows of no elements (same on every rank)
    if rows.stride() != (rows.shape[1], 1): rows = rows.new_empty(rows.shape).copy_(rows)   # dense rows: a byte view
    wire = rows.view(torch.uint8)
    buf = wire.new_zeros((m, wire.shape[1]))
    buf[:x.shape[0]] = wire
    out = wire.new_empty((S * m, wire.shape[1]))
    _all_gather_into(out, buf, group=group)
    keep = torch.cat([torch.arange(c, device=x.device) + r * m for r, c in enumerate(counts)])
    return out[keep].view(x.dtype).reshape(-1, *x.shape[1:])

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
    """`Prepared` plus the bookkeeping the distributed finalize needs to return the rows to their ranks.
    Raises nothing: a plain dataclass whose fields the prepares fill (nothing is checked). Source: moe-lit's own (vLLM's
    DeepEP prepare/finalize keeps the library's dispatch handle for the combine instead)."""
    token_counts: list | None = None          # tokens of each rank of the group
    send_order: torch.Tensor | None = None    # all-to-all: [n_send] int64, flat pair index t·top_k + k of each sent row
    send_counts: list | None = None           # all-to-all: rows sent to each rank
    recv_counts: list | None = None           # all-to-all: rows received from each rank
    recv_rows: torch.Tensor | None = None     # all-to-all: [n_recv] int64, e·capacity + row of each received pair
    total_pairs: int = 0                      # all-to-all: pairs dispatched by the whole group (0: nothing moves)

# %%
#| export
def check_group(group):
    """`group` (None = the default group) after checking that torch.distributed is initialized.
    ValueError naming `group` when no process group is initialized or `group` is neither a ProcessGroup nor None.
    Source: torch.distributed's `is_initialized` and `ProcessGroup`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: expected an initialized torch.distributed process group (call init_distributed, or "
                         "run under torchrun), got none")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group: expected a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    return group

def config_rank_in_group(config: MoEConfig,   # the deployment (its ep_size must be the group's size)
                         group) -> tuple[int, int]:   # (this process's rank in the group, the group's size)
    """This process's rank and the group's size after checking `config` and `group`; ValueError naming the mismatch:
    `config` (not a MoEConfig), `group` (`check_group`) or `config.parallel.ep_size` (not the group's size).
    Source: torch.distributed's `get_rank` / `get_world_size`; the check is moe-lit's own."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    group = check_group(group)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if config.ep_size != size:
        raise ValueError(f"config.parallel.ep_size: expected the group's world size {size}, got {config.ep_size}")
    return rank, size

def group_device(group) -> torch.device:
    """Where tensors of `group`'s collectives live: this process's GPU for NCCL, the CPU for gloo.
    ValueError from torch.distributed's `get_backend` when no process group is initialized (its message, no argument
    named). Source: torch.distributed's backends (NCCL moves CUDA tensors, gloo CPU ones)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")

def _pad_columns(x: torch.Tensor, width: int | None) -> torch.Tensor:
    "`x [n, H]` with zero columns up to the backend's wire size `width` (unchanged when None or equal)."
    if width is None or width == x.shape[1]: return x
    if width < x.shape[1]: raise ValueError(f"hidden: expected at most padded_hidden_size={width} columns, got {x.shape[1]}")
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))

def _fp8_wire_rows(rows: torch.Tensor, group: int) -> torch.Tensor:
    "`[n, Hw]` 16-bit rows as `[n, Hw + 4·G]` uint8: each row's e4m3 codes, then its G fp32 group scales (`09b`)."
    from moe_lit.kernels.quant_act import fp8_quantize_activations    # Triton: imported when FP8 is sent
    n, Hw = rows.shape
    if n == 0: return torch.empty(0, Hw + 4 * -(-Hw // group), dtype=torch.uint8, device=rows.device)
    q, scale = fp8_quantize_activations(rows.contiguous(), "group", group_k=group, validate=False)
    return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], 1)

# %%
#| export
class AllGatherReduceScatterPrepareFinalize:
    """Standard format over torch.distributed: all-gather the group's tokens and routing, reduce-scatter the outputs.
    The constructor raises ValueError naming `group` (`check_group`), `quant_block` (not None or (1, group) with group
    a power of two in [32, 65536]), `topk_indices_dtype` (not int32/int64) or `padded_hidden_size` (< 1).
    Source: vLLM's `allgather_reducescatter` backend, `AgRsAll2AllManager` (vllm/distributed/device_communicators/
    all2all.py)."""
    activation_format = ActivationFormat.Standard
    output_is_reduced = True                     # finalize returns this rank's tokens summed over every rank's experts
    max_num_tokens_per_rank = None               # no capacity: the gathered batch is as large as it needs to be

    def __init__(self, group=None,                          # the EP group (None: the default group)
                 topk_indices_dtype: torch.dtype = torch.int32,   # dtype of topk_ids the router should produce
                 padded_hidden_size: int | None = None,     # wire width of the hidden rows (None: as they come)
                 quant_block: tuple | None = None):         # (1, group): rows sent as FP8 (`dispatch_quantization`)
        self.group = check_group(group)
        self.quant_block = check_quant_block(quant_block)
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
    for name, t in (("topk_weights", topk_weights), ("topk_ids", topk_ids)):
        if t.device != hidden.device: raise ValueError(f"{name}: expected device {hidden.device} (hidden's), got {t.device}")
    check_topk_ids(topk_ids, placement.num_experts)         # distinct per token: the slabs' capacity relies on it

def _row_format(pf, hidden: torch.Tensor, topk_ids: torch.Tensor) -> list:
    """This rank's rows as ints, exchanged before anything moves: hidden's dtype (its `_GATHER_DTYPES` index), the wire
    width, the FP8 group (0: none), the capacity (0: none), hidden's width, top_k and the ids' dtype."""
    H = hidden.shape[1]
    return [_GATHER_DTYPES.index(hidden.dtype), pf.padded_hidden_size or H, pf.quant_block[1] if pf.quant_block else 0,
            pf.max_num_tokens_per_rank or 0, H, topk_ids.shape[1], _GATHER_DTYPES.index(topk_ids.dtype)]

def _check_row_formats(pf, formats: torch.Tensor, hidden: torch.Tensor):   # [S, 7] every rank's `_row_format`
    """Refuse ranks that would send rows of another size or read their peers' bytes as another dtype; then the checks
    that read the row format. The formats are the same on every rank, so each raises on every rank alike (a check that
    raised on one rank before the exchange would leave the others waiting in it)."""
    if not bool((formats == formats[0]).all()):
        got = [(str(_GATHER_DTYPES[int(f[0])]), int(f[1]), None if not f[2] else (1, int(f[2])), int(f[3]) or None,
                int(f[4]), int(f[5]), str(_GATHER_DTYPES[int(f[6])])) for f in formats]
        raise ValueError(f"hidden, topk_ids, quant_block, padded_hidden_size, max_num_tokens_per_rank: expected the same "
                         f"rows on every rank, got (dtype, wire width, quant_block, max_num_tokens_per_rank, hidden size, "
                         f"top_k, ids dtype) per rank {got}")
    wire = pf.padded_hidden_size
    if wire is not None and hidden.shape[1] > wire:
        raise ValueError(f"hidden: expected at most {wire} columns (the wire's hidden size), got shape {list(hidden.shape)}")
    if pf.quant_block and hidden.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"hidden: expected torch.bfloat16 or torch.float16 for FP8 on the wire (quant_block="
                         f"{pf.quant_block}), got {hidden.dtype}")

@patch(nm="prepare")
def _agrs_prepare(self: AllGatherReduceScatterPrepareFinalize,
                  hidden: torch.Tensor,              # [T, H] this rank's tokens (T may be 0)
                  topk_weights: torch.Tensor,        # [T, top_k] fp32
                  topk_ids: torch.Tensor,            # [T, top_k] int32/int64 global (physical) ids, -1 = none
                  placement: Placement,              # this rank's placement
                  apply_router_weight_on_input: bool = False) -> DistributedPrepared:
    """All-gather tokens `a [ΣT, H_wire]`, weights and ids of the group; ids become this rank's local slots (or -1).
    With `quant_block`, `a` is float8_e4m3fn and `a_scale [ΣT, G]` fp32: each rank quantizes its own tokens once
    (`09b`'s group quantizer) and sends codes and scales as one row of bytes. A collective: every rank calls it.
    ValueError, on every rank alike, for ranks whose rows differ (dtype, widths, FP8 group, top_k, ids dtype), a
    non-16-bit `hidden` with `quant_block` or a `hidden` wider than the wire; and, on the rank that passed them, for
    bad arguments. Source: vLLM's `AgRsAll2AllManager.dispatch` (`all_gatherv` of hidden states, topk weights and ids;
    vllm/distributed/device_communicators/all2all.py); the FP8 rows as vLLM quantizes before DeepEP's normal
    dispatch."""
    _check_dist_prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)
    mine = torch.tensor([[*_row_format(self, hidden, topk_ids), hidden.shape[0]]], device=hidden.device)
    table = all_gather_rows(mine, [1] * self.num_dispatchers, self.group, check=False).cpu()   # formats, token counts
    _check_row_formats(self, table[:, :-1], hidden)
    x = _pad_columns(hidden, self.padded_hidden_size)
    counts, (Hw, group) = table[:, -1].tolist(), (x.shape[1], self.quant_block[1] if self.quant_block else None)
    rows = _fp8_wire_rows(x, group) if group else x     # [T, Hw + 4·G] bytes: codes, then scales (as the all-to-all)
    a = all_gather_rows(rows, counts, self.group, check=False)                                   # the same code
    wts = all_gather_rows(topk_weights, counts, self.group, check=False)                         # on every rank
    local = placement.local_slot(all_gather_rows(topk_ids, counts, self.group, check=False))
    a_scale = None
    if group: a, a_scale = a[:, :Hw].contiguous().view(torch.float8_e4m3fn), a[:, Hw:].contiguous().view(torch.float32)
    self.stats = {"tokens": hidden.shape[0], "pairs_sent": int((topk_ids >= 0).sum()),
                  "pairs_received": int((local >= 0).sum()), "tokens_gathered": sum(counts),
                  "wire_bytes_per_token": rows.shape[1] * rows.element_size(), "wire_width": Hw}
    return DistributedPrepared(self.activation_format, a, wts, local_ids=local, hidden_size=hidden.shape[1],
                               num_local_experts=placement.num_local_experts,
                               apply_router_weight_on_input=apply_router_weight_on_input, token_counts=counts,
                               a_scale=a_scale, out_dtype=None if a_scale is None else x.dtype)

# %%
#| export
@patch(nm="finalize")
def _agrs_finalize(self: AllGatherReduceScatterPrepareFinalize,
                   expert_out: torch.Tensor,         # [ΣT, H_wire] this rank's partial sums for every gathered token
                   prepared: DistributedPrepared) -> torch.Tensor:   # [T, H] this rank's tokens, summed over ranks
    """Reduce-scatter the partial outputs in fp32 (fp64 for fp64) and keep this rank's rows, unpadded. A collective:
    every rank calls it. ValueError naming `expert_out` unless it is a dense tensor shaped as `prepared.a`. Source:
    vLLM's `AgRsAll2AllManager.combine` (`reduce_scatterv`; vllm/distributed/device_communicators/all2all.py)."""
    check_tensor("expert_out", expert_out, shape=tuple(prepared.a.shape))
    mine = _reduce_scatter_rows(expert_out.to(acc_dtype(expert_out.dtype)), prepared.token_counts, self.group)
    return mine[:, :prepared.hidden_size].to(expert_out.dtype)

# %% [markdown]
# In a group of one process the all-gather returns this rank's own tokens and the reduce-scatter its own sums: the
# pair through the layer's torch experts equals the float64 reference (`13c_launch` runs it across processes).

# %%
#| test allgather_reducescatter_one_process
layer, hidden, wts, ids, want = one_rank_problem()
with one_process_group():
    wide = AllGatherReduceScatterPrepareFinalize(padded_hidden_size=96)   # a wider wire: zero columns, cut in finalize
    prep = wide.prepare(hidden, wts, ids, layer.placement)
    test_eq((prep.token_counts, tuple(prep.a.shape), prep.local_ids.tolist()), ([5], (5, 96), ids.tolist()))
    assert (prep.a[:, 64:] == 0).all() and torch.equal(prep.a[:, :64], hidden)
    test_eq(wide.finalize(prep.a, prep), hidden)
    pf = AllGatherReduceScatterPrepareFinalize()
    got = ModularKernel(pf, make_experts(pf, "torch"))(hidden, layer.w13, layer.w2, wts, ids, layer.placement)
    test_eq(pf.stats["pairs_received"], 10)
assert_close(got, want, name="allgather/reduce-scatter, one process")


# %% [markdown]
# **FP8 on the wire.** DeepEP high-throughput's record says `quantizes_before_dispatch` with `(1, 128)` groups: vLLM
# quantizes the tokens before DeepEP's normal dispatch when the experts take block-FP8 activations. With `quant_block`
# the all-gather does the same: each rank quantizes its own tokens once with `09b`'s group quantizer and sends one row
# of bytes a token — the e4m3 codes, then the fp32 scales, as the all-to-all below sends a pair. Every rank gets `a`
# in float8_e4m3fn and `a_scale [ΣT, G]`, and the Triton quantized experts take them as they are: their GEMM1
# launches no quantizer. The bits are those the experts would have made from the 16-bit rows, so in a group of one
# the output equals the unquantized wire's bit for bit.

# %%
#| test allgather_fp8_on_the_wire
if not torch.cuda.is_available():                 # the interpreter (CPU); the GPU runs it in 13c over NCCL
    layer = FusedMoE(MoEConfig(8, 2, 256, 64, dtype=torch.bfloat16), experts="triton", quant="fp8", seed=3)
    hidden = torch.randn(5, 256, generator=torch.Generator().manual_seed(6)).bfloat16()
    wts, ids = layer.route(hidden)
    with one_process_group():
        blk = tuple(BACKENDS["deepep_high_throughput"].dispatch_quant_block)                       # (1, 128)
        pf = AllGatherReduceScatterPrepareFinalize(quant_block=blk)
        prep = pf.prepare(hidden, wts, ids, layer.placement)
        test_eq((prep.a.dtype, tuple(prep.a_scale.shape), prep.out_dtype), (torch.float8_e4m3fn, (5, 2), torch.bfloat16))
        test_eq(pf.stats["wire_bytes_per_token"], 256 + 4 * 2)                      # codes, then two fp32 scales
        q_ref, s_ref = fp8_quantize_activations_reference(hidden, "group", group_k=128)
        test_eq(prep.a.view(torch.uint8), q_ref.view(torch.uint8)); test_eq(prep.a_scale, s_ref)
        got = ModularKernel(pf, make_experts(pf, "triton_quant"))(hidden, layer.qweights, None, wts, ids, layer.placement)
        plain = AllGatherReduceScatterPrepareFinalize()                             # 16-bit rows: the experts quantize
        same = ModularKernel(plain, make_experts(plain, "triton_quant"))(hidden, layer.qweights, None, wts, ids, layer.placement)
        assert torch.equal(got, same)                                               # the same codes: the same bits
        test_fail(lambda: ModularKernel(pf, make_experts(pf, "triton")), contains="experts: expected experts that take FP8 rows")
        test_fail(lambda: pf.prepare(hidden.float(), wts, ids, layer.placement),
                  contains="hidden: expected torch.bfloat16 or torch.float16 for FP8 on the wire")
        narrow = AllGatherReduceScatterPrepareFinalize(quant_block=(1, 64))               # groups the weights do not take
        test_fail(lambda: ModularKernel(narrow, make_experts(narrow, "triton_quant"))(hidden, layer.qweights, None, wts, ids,
                  layer.placement), contains="quant_block: expected the prepare's FP8 groups to be the weights' activation groups (1, 128)")
        test_fail(lambda: AllGatherReduceScatterPrepareFinalize(quant_block=(1, 100)), contains="quant_block: expected None or (1, group)")
        for scheme, says in (("fp8_w8a8_channel", "FP8 activations scaled per token"), ("mxfp4_w4a16", "16-bit activations")):
            other = quantize_expert_weights(*layer.qweights.dequantize(torch.float32), scheme)   # not 1×128 groups
            test_fail(lambda: ModularKernel(pf, make_experts(pf, "triton_quant"))(hidden, other, None, wts, ids, layer.placement),
                      contains=f"quant_block: expected None for {scheme} experts (they take {says}")
    assert_close(got, layer(hidden), name="FP8 all-gather vs the layer")

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
#
# **FP8 on the wire.** Backends whose record says `quantizes_before_dispatch` (DeepEP low-latency, NIXL EP) send
# block-FP8 rows when the experts take them (`10_modular.dispatch_quantization` decides, with `across_processes=True`,
# and the layer's `dispatch_quant` is that decision). The sender quantizes each pair's row — after the router weight,
# when that goes on the input — with `09b`'s group quantizer, and sends one row of bytes: the `H` e4m3 codes, then the
# `G = ceil(H / group)` fp32 scales. For DeepSeek-V3 (H = 7168, groups of 128) that is 7392 bytes a pair instead of
# 14336. The receiver splits the bytes into the FP8 slabs and their scales `a_scale [E_local, capacity, G]`, both NaN
# past the counts, and GEMM1 takes them as they are (vLLM's DeepEP low-latency prepare does the same with DeepEP's
# `low_latency_dispatch(use_fp8=True)`; vllm-project/vllm `deepep_ll_prepare_finalize.py`).

# %%
#| export
class AllToAllBatchedPrepareFinalize:
    """BatchedExperts over torch.distributed all-to-all: pairs to their expert's owner, outputs back to their sender.
    The constructor raises ValueError naming `group` (`check_group`), `quant_block`, `max_num_tokens_per_rank` (< 1),
    `topk_indices_dtype` (not int32/int64) or `padded_hidden_size` (< 1). Source: the contract of vLLM's
    `DeepEPLLPrepareAndFinalize` and `NixlEPPrepareAndFinalize` (fused_moe/prepare_finalize/), carried by
    torch.distributed's `all_to_all_single`."""
    activation_format = ActivationFormat.BatchedExperts
    output_is_reduced = True                     # combine returns this rank's tokens with every slot summed

    def __init__(self, max_num_tokens_per_rank: int,        # per-rank token cap; slabs hold this · num_dispatchers rows
                 group=None,                                # the EP group (None: the default group)
                 topk_indices_dtype: torch.dtype = torch.int64,   # DeepEP low-latency and NIXL EP take int64 ids
                 padded_hidden_size: int | None = None,     # wire width of the hidden rows (None: as they come)
                 quant_block: tuple | None = None):         # (1, group): rows sent as FP8 (`dispatch_quantization`)
        self.group = check_group(group)
        self.quant_block = check_quant_block(quant_block)
        self.max_num_tokens_per_rank = check_int("max_num_tokens_per_rank", max_num_tokens_per_rank, lo=1)
        self.num_dispatchers, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.topk_indices_dtype = check_choice("topk_indices_dtype", topk_indices_dtype, (torch.int32, torch.int64))
        self.padded_hidden_size = None if padded_hidden_size is None else check_int("padded_hidden_size", padded_hidden_size, lo=1)
        self.stats = {}

    @property
    def capacity(self) -> int:
        """Rows of each local expert's slab: `max_num_tokens_per_rank · num_dispatchers` (DeepEP low-latency's sizing).
        Raises nothing (both factors are checked by the constructor). Source: DeepEP's low-latency receive buffer
        `[num_local_experts, num_max_dispatch_tokens_per_rank × num_ranks, hidden]`, as vLLM sizes it."""
        return self.max_num_tokens_per_rank * self.num_dispatchers

# %%
#| export
def _exchange_counts(pf, counts: torch.Tensor, hidden: torch.Tensor, topk_ids: torch.Tensor,
                     placement: Placement) -> tuple[torch.Tensor, list]:
    """All-gather every rank's `[S, max_local]` pair counts and token count, with its row format (`_row_format`): a
    rank that would send rows of another size or read its peers' bytes as another dtype is refused on every rank
    alike; then check capacity the same way on every rank."""
    S, fmt = pf.num_dispatchers, _row_format(pf, hidden, topk_ids)
    mine = torch.cat([counts.flatten(), torch.tensor([*fmt, hidden.shape[0]], device=counts.device)])
    table = all_gather_rows(mine[None], [1] * S, pf.group, check=False).cpu()   # [S, S·max_local + formats + 1]
    _check_row_formats(pf, table[:, -len(fmt) - 1:-1], hidden)
    token_counts, table = table[:, -1].tolist(), table[:, :-len(fmt) - 1].view(S, S, -1)   # [S_send, S_recv, max_local]
    check_count_table(table, token_counts, placement.num_experts, pf.max_num_tokens_per_rank)
    return table, token_counts

# %%
#| export
@patch(nm="prepare")
def _a2a_prepare(self: AllToAllBatchedPrepareFinalize,
                 hidden: torch.Tensor,              # [T, H] this rank's tokens (T may be 0)
                 topk_weights: torch.Tensor,        # [T, top_k] fp32
                 topk_ids: torch.Tensor,            # [T, top_k] int32/int64 global (physical) ids, -1 = none
                 placement: Placement,              # this rank's placement
                 apply_router_weight_on_input: bool = False) -> DistributedPrepared:
    """Slabs `a [E_local, capacity, H_wire]` (padding NaN) and `expert_num_tokens [E_local]` int32 of this rank; with
    `quant_block`, `a` float8_e4m3fn and `a_scale [E_local, capacity, G]` fp32 (both NaN past the counts). A collective:
    every rank calls it. ValueError, on every rank alike, for ranks whose rows differ (dtype, widths, FP8 group,
    capacity, top_k, ids dtype), a non-16-bit `hidden` with `quant_block`, a `hidden` wider than the wire, or a
    capacity overflow; and, on the rank that passed them, for bad arguments. Source: vLLM's
    `DeepEPLLPrepareAndFinalize.prepare` over DeepEP's `low_latency_dispatch` (`use_fp8=True` for FP8 rows;
    fused_moe/prepare_finalize/deepep_ll.py), here with torch.distributed's `all_to_all_single`."""
    _check_dist_prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)
    (T, H), k, dev, me = hidden.shape, topk_ids.shape[1], hidden.device, self.rank
    order, counts = send_plan(placement, topk_ids)
    table, token_counts = _exchange_counts(self, counts, hidden, topk_ids, placement)   # rows and capacity first
    x = _pad_columns(hidden, self.padded_hidden_size)
    send_counts, recv_counts = table[me].sum(1).tolist(), table[:, me].sum(1).tolist()
    rows = x[order // k]
    if apply_router_weight_on_input:                   # scaled once, at the sender (vLLM #43694 scaled twice)
        acc = acc_dtype(x.dtype)
        rows = (rows.to(acc) * topk_weights.flatten()[order, None].to(acc)).to(x.dtype)
    Hw, group = x.shape[1], self.quant_block[1] if self.quant_block else None
    if group: rows = _fp8_wire_rows(rows, group)       # [pairs, Hw + 4·G] bytes: codes, then scales
    total = int(table.sum())
    received = _all_to_all_rows(rows, send_counts, recv_counts, self.group) if total else rows[:0]
    E, cap = placement.num_local_experts, self.capacity
    recv_rows, senders = receive_layout(table[:, me].to(dev), E, cap, validate=False)   # check_count_table ran
    if group: a, a_scale = _fp8_slabs(received, recv_rows, E * cap, Hw, group)
    else:
        a, a_scale = torch.full((E * cap, Hw), float("nan"), dtype=x.dtype, device=dev), None
        a[recv_rows] = received
    expert_num_tokens = table[:, me, :E].sum(0).to(device=dev, dtype=torch.int32)
    _record_a2a_stats(self, T, order, recv_rows, senders, expert_num_tokens, topk_ids, E)
    self.stats.update(wire_bytes_per_pair=rows.shape[1] * rows.element_size(), wire_width=Hw)   # Hw: padded or not
    return DistributedPrepared(self.activation_format, a.view(E, cap, -1), topk_weights, expert_num_tokens=expert_num_tokens,
                               a_scale=None if a_scale is None else a_scale.view(E, cap, -1),
                               out_dtype=None if a_scale is None else x.dtype,
                               apply_router_weight_on_input=apply_router_weight_on_input, hidden_size=H,
                               expected_m=max(1, total // placement.num_experts), token_counts=token_counts,
                               active_experts=(busy := int((table[:, me, :E].sum(0) > 0).sum())),   # exact: the
                               max_active_experts=busy,                                            # counts are here
                               send_order=order, send_counts=send_counts, recv_counts=recv_counts, recv_rows=recv_rows,
                               total_pairs=total)

# %%
#| export
def _fp8_slabs(received: torch.Tensor, recv_rows: torch.Tensor, slots: int, Hw: int, group: int):
    "Wire rows into `(a float8_e4m3fn [slots, Hw], a_scale fp32 [slots, G])`; slots nobody filled are NaN in both."
    G = -(-Hw // group)
    codes = torch.full((slots, Hw), 0x7F, dtype=torch.uint8, device=received.device)   # 0x7F: e4m3fn's NaN
    a_scale = torch.full((slots, G), float("nan"), dtype=torch.float32, device=received.device)
    codes[recv_rows] = received[:, :Hw]
    a_scale[recv_rows] = received[:, Hw:].contiguous().view(torch.float32)
    return codes.view(torch.float8_e4m3fn), a_scale

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
@patch(nm="finalize")
def _a2a_finalize(self: AllToAllBatchedPrepareFinalize,
                  expert_out: torch.Tensor,         # [E_local, capacity, H_wire]; rows >= expert_num_tokens unread
                  prepared: DistributedPrepared) -> torch.Tensor:   # [T, H] this rank's tokens
    """Send each received row's output back to its sender, who weights (unless applied on input) and sums in fp32.
    A collective: every rank calls it. ValueError naming `expert_out` unless it is a dense tensor shaped
    `[E_local, capacity, H_wire]` (as `prepared.a`). Source: vLLM's DeepEP low-latency finalize, whose
    `low_latency_combine` weights and sums on the token's own rank (fused_moe/prepare_finalize/deepep_ll.py)."""
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


# %%
#| test all_to_all_batched_one_process
layer, hidden, wts, ids, want = one_rank_problem(1)
with one_process_group():
    pf = AllToAllBatchedPrepareFinalize(8)                              # 8 rows per expert: the 5 tokens fit
    prep = pf.prepare(hidden, wts, ids.long(), layer.placement)
    test_eq(prep.expert_num_tokens.sum().item(), 10)                    # every pair lands in its expert's slab
    test_eq(tuple(prep.a.shape), (8, 8, 64))
    got = ModularKernel(pf, make_experts(pf, "torch"))(hidden, layer.w13, layer.w2, wts, ids.long(), layer.placement)
    dup = ids.long().clone(); dup[2, 1] = dup[2, 0]                     # a token on one expert twice: refused
    test_fail(lambda: pf.prepare(hidden, wts, dup, layer.placement), contains="topk_ids: expected distinct ids per token")
    wide = AllToAllBatchedPrepareFinalize(8, padded_hidden_size=32)     # a wire narrower than hidden: refused
    test_fail(lambda: wide.prepare(hidden, wts, ids.long(), layer.placement), contains="hidden: expected at most 32 columns")
    test_fail(lambda: pf.prepare(hidden, wts.to("meta"), ids.long(), layer.placement), contains="topk_weights: expected device cpu")
assert_close(got, want, name="all-to-all batched, one process")

# %% [markdown]
# FP8 on the wire, in one process: each received slab row holds `09b`'s quantization of the token sent to it, codes
# and scales bit for bit; every other slot is NaN; the experts' output is the layer's own (one rank: its GEMM1
# quantizes the same rows with the same quantizer). The gloo group moves CPU tensors, so this runs the Triton experts
# in the interpreter; on a GPU, `13c_launch`'s NCCL job at world size 1 checks the same path natively.

# %%
#| test all_to_all_fp8_on_the_wire
if not torch.cuda.is_available():                 # the interpreter (CPU); the GPU runs it in 13c over NCCL
    layer = FusedMoE(MoEConfig(8, 2, 256, 64, dtype=torch.bfloat16), experts="triton", quant="fp8", seed=3)   # one rank:
    hidden = torch.randn(5, 256, generator=torch.Generator().manual_seed(5)).bfloat16()          # its GEMM1 quantizes
    wts, ids = layer.route(hidden)
    with one_process_group():
        pf = AllToAllBatchedPrepareFinalize(8, quant_block=tuple(BACKENDS["nixl_ep"].dispatch_quant_block))   # (1, 128)
        prep = pf.prepare(hidden, wts, ids.long(), layer.placement)
        test_eq((prep.a.dtype, tuple(prep.a_scale.shape), prep.out_dtype), (torch.float8_e4m3fn, (8, 8, 2), torch.bfloat16))
        test_eq(pf.stats["wire_bytes_per_pair"], 256 + 4 * 2)                      # codes, then two fp32 scales
        q_ref, s_ref = fp8_quantize_activations_reference(hidden, "group", group_k=128)   # per token
        tok = prep.send_order // 2                                                  # the token of each pair sent
        codes, scales = prep.a.view(-1, 256).view(torch.uint8), prep.a_scale.view(-1, 2)
        test_eq(codes[prep.recv_rows], q_ref[tok].view(torch.uint8))
        test_eq(scales[prep.recv_rows], s_ref[tok])
        rest = torch.ones(len(codes), dtype=torch.bool); rest[prep.recv_rows] = False
        assert (codes[rest] == 0x7F).all() and scales[rest].isnan().all()           # NaN past the counts
        got = ModularKernel(pf, make_experts(pf, "triton_quant"))(hidden, layer.qweights, None, wts, ids.long(), layer.placement)
        test_fail(lambda: ModularKernel(pf, make_experts(pf, "triton")), contains="experts: expected experts that take FP8 rows")
        test_fail(lambda: pf.prepare(hidden.float(), wts, ids.long(), layer.placement),
                  contains="hidden: expected torch.bfloat16 or torch.float16 for FP8 on the wire")
        for bad in ((1, 100), (True, 128), (1.0, 128), (1, 2**20), [1, 128]):
            test_fail(lambda: AllToAllBatchedPrepareFinalize(8, quant_block=bad), contains="quant_block: expected None or (1, group)")
        narrow = AllToAllBatchedPrepareFinalize(8, quant_block=(1, 64))                  # groups the weights do not take
        test_fail(lambda: ModularKernel(narrow, make_experts(narrow, "triton_quant"))(hidden, layer.qweights, None, wts, ids.long(),
                  layer.placement), contains="quant_block: expected the prepare's FP8 groups to be the weights' activation groups (1, 128)")
    here = BatchedPrepareFinalize(8, 1, use_triton=True, quant_block=pf.quant_block)      # the in-process FP8 dispatch
    same = ModularKernel(here, make_experts(here, "triton_quant"))(hidden, layer.qweights, None, wts, ids.long(), layer.placement)
    assert_close(got, same, name="FP8 across processes vs the in-process FP8 dispatch")   # same slabs; the sums of a
    assert_close(got, layer(hidden), name="FP8 across processes vs the layer")            # token's pairs in another order

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
    """One sentence: which implementation carries `config`'s dispatch across processes, and the real library's status.
    ValueError naming `config` when it is not a MoEConfig. Source: moe-lit's own (the library looked up with
    `importlib.util.find_spec`, never imported)."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    d, fmt = config.backend, config.activation_format
    impl = ("AllToAllBatchedPrepareFinalize (moe-lit's torch.distributed all-to-all into per-expert slabs)"
            if fmt is ActivationFormat.BatchedExperts else
            "AllGatherReduceScatterPrepareFinalize (moe-lit's torch.distributed all-gather / reduce-scatter)")
    if config.ep_size == 1: return f"{d.name}: one rank, nothing travels; {impl} runs as a no-op exchange"
    p = config.parallel
    if not config.use_all2all_kernels:        # this backend's transport is not used here: its library is beside the point
        if p.dp_size * p.pcp_size == 1:
            return (f"{d.name}: no all2all on this deployment: one DP rank, so every EP rank already holds every token "
                    f"(TP replicates them); `moe-lit run --distributed` does not take --tp yet")
        return f"{d.name}: no all2all on this deployment, so every rank all-gathers every token: {impl}"
    head = f"{d.name}: {fmt.value} format served by {impl}"
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
tp_ep = MoEConfig(8, 2, 16, 16, parallel=ParallelConfig.make(2, 1, enable_expert_parallel=True, all2all_backend="nixl_ep"))
note = transport_note(tp_ep)                     # EP over TP alone: nothing is dispatched, so no library is named
assert "every EP rank already holds every token" in note and "library" not in note and "nixl_ep: " in note, note
test_fail(lambda: transport_note("nixl_ep"), contains="config: expected a MoEConfig, got str")

# %%
#| export
def make_distributed_prepare_finalize(
    config: MoEConfig,                        # this rank's layer and deployment (ep_size = the group's size)
    group=None,                               # the EP group (None: the default group)
    max_num_tokens_per_rank: int | None = None,   # batched capacity per rank; None: config.max_num_tokens
    quant_block: tuple | None = None,         # (1, group): rows sent as FP8 (`dispatch_quantization`)
):
    """The prepare/finalize that carries `config`'s deployment across processes, chosen by its activation format:
    `AllToAllBatchedPrepareFinalize` (BatchedExperts) or `AllGatherReduceScatterPrepareFinalize` (Standard), both
    sending FP8 rows with `quant_block`. ValueError naming the argument for a config that is not this rank's of the
    group, or a bad capacity or `quant_block`. Source: vLLM's `maybe_make_prepare_finalize`, which picks the class by
    all2all backend; here the activation format picks it (the rule of vLLM #40412)."""
    rank, size = config_rank_in_group(config, group)
    if config.ep_rank != rank:
        raise ValueError(f"config.parallel.ep_rank: expected this process's rank in the group ({rank}), got {config.ep_rank}")
    if max_num_tokens_per_rank is not None: check_int("max_num_tokens_per_rank", max_num_tokens_per_rank, lo=1)
    if config.activation_format is ActivationFormat.BatchedExperts:
        cap = config.max_num_tokens if max_num_tokens_per_rank is None else max_num_tokens_per_rank
        return AllToAllBatchedPrepareFinalize(cap, group, config.topk_indices_dtype, config.padded_hidden_size,
                                              quant_block)                 # (each constructor checks quant_block)
    return AllGatherReduceScatterPrepareFinalize(group, config.topk_indices_dtype, config.padded_hidden_size,
                                                 quant_block)

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
with one_process_group():
    test_eq(make_distributed_prepare_finalize(MoEConfig(8, 2, 256, 64), quant_block=(1, 128)).quant_block, (1, 128))
    test_fail(lambda: make_distributed_prepare_finalize(MoEConfig(8, 2, 256, 64), quant_block=(1, 100)),
              contains="quant_block: expected None or (1, group)")

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
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it). OSError from `socket.bind` when none can be
    had; another process may take the port before it is used. Source: the bind-to-port-0 idiom of Python's `socket`
    (moe-lit's own helper)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

# %%
#| export
COLLECTIVE_TIMEOUT_MAX_S = 2**31 // 1000      # s: the largest timeout torch's TCP store holds (int32 milliseconds)

def _env_int(name: str, lo: int, hi: int | None = None) -> int:
    "The integer in environment variable `name` (set), within [lo, hi]; ValueError naming it otherwise."
    raw = os.environ[name]
    try: v = int(raw)
    except ValueError: v = None
    if v is None or v < lo or (hi is not None and v > hi):
        raise ValueError(f"{name}: expected an integer in [{lo}, {'...' if hi is None else hi}] (torchrun's "
                         f"environment), got {raw!r}")
    return v

def init_distributed(timeout_s: float = 600.0,      # seconds a collective may wait for its peers
                     backend: str | None = None,    # 'gloo' or 'nccl'; None: NCCL with a GPU, else gloo
                    ) -> tuple[int, int, torch.device]:   # (rank, world size, this process's device)
    """Join the process group torchrun's environment describes (or a one-process group without it). ValueError naming
    `timeout_s` (not a finite number > 0, or over COLLECTIVE_TIMEOUT_MAX_S), `backend` (not 'gloo' or 'nccl', or 'nccl'
    without a CUDA GPU), `environment` (some of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT unset), `WORLD_SIZE` (not an
    integer >= 1), `RANK` (not in [0, WORLD_SIZE)), `MASTER_PORT` (not in [1, 65535]) or `LOCAL_RANK` (not an integer
    >= 0, or no such GPU), all before any rendezvous; `init_process_group`'s own errors (a rendezvous that times out:
    a peer that never starts) propagate. Source: torch.distributed's
    `init_process_group` with the env:// variables torchrun sets."""
    if check_positive_real("timeout_s", timeout_s) > COLLECTIVE_TIMEOUT_MAX_S:   # the store counts milliseconds in
        raise ValueError(f"timeout_s: expected <= {COLLECTIVE_TIMEOUT_MAX_S} (24 days: the store's timeout is int32 "   # an int32
                         f"milliseconds), got {timeout_s:g}")
    backend = ("nccl" if torch.cuda.is_available() else "gloo") if backend is None else backend
    check_choice("backend", backend, ("gloo", "nccl"))
    if backend == "nccl" and not torch.cuda.is_available(): raise ValueError("backend: expected 'gloo' without a CUDA GPU, got 'nccl'")
    if dist.is_initialized(): return dist.get_rank(), dist.get_world_size(), group_device(None)   # already joined
    names = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    missing = [n for n in names if n not in os.environ]
    if missing and len(missing) < len(names):
        raise ValueError(f"environment: expected {', '.join(names)} (torchrun sets them), got {missing} unset")
    if not missing:                                # each value checked here: a wrong one would wait out the rendezvous
        _env_int("RANK", 0, _env_int("WORLD_SIZE", 1) - 1)
        _env_int("MASTER_PORT", 1, 65535)
    local = 0
    if "LOCAL_RANK" in os.environ:               # -1 on one process: "not distributed", as some launchers say
        local = max(0, _env_int("LOCAL_RANK", -1 if missing else 0))
    device = torch.device("cpu")
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK: expected < {torch.cuda.device_count()} (one GPU per process), got {local}")
        device = torch.device("cuda", local); torch.cuda.set_device(device)
    kw = dict(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1) if missing else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return dist.get_rank(), dist.get_world_size(), device


# %% [markdown]
# In a one-process group, `all_gather_rows` returns this rank's rows, and its arguments are checked before the
# collective: the counts must list every rank's rows, this rank's entry equal to the rows of `x`.

# %%
#| test all_gather_rows_one_process
assert not dist.is_initialized()
for bad in (1e10, 1e16): test_fail(lambda: init_distributed(bad), contains="timeout_s: expected <= 2147483 (24 days")
env = dict(RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", LOCAL_RANK="0")
for name, bad, want in (("RANK", "5", "RANK: expected an integer in [0, 1]"), ("RANK", "-1", "in [0, 1]"),
                        ("WORLD_SIZE", "abc", "WORLD_SIZE: expected an integer in [1, ...] (torchrun's environment), got 'abc'"),
                        ("WORLD_SIZE", "0", "WORLD_SIZE: expected"), ("MASTER_PORT", "99999", "MASTER_PORT: expected an integer in [1, 65535]"),
                        ("LOCAL_RANK", "abc", "LOCAL_RANK: expected an integer in [0, ...]")):
    with mock.patch.dict(os.environ, {**env, name: bad}):        # refused before a rendezvous that would wait
        test_fail(lambda: init_distributed(60, backend="gloo"), contains=want)
assert not dist.is_initialized()
with mock.patch.dict(os.environ, {"LOCAL_RANK": "-1"}):   # no torchrun environment: a one-process group (LOCAL_RANK=-1,
    init_distributed(60, backend="gloo")                 # "not distributed" as some launchers set it, is taken as 0)
try:
    x = torch.arange(6.).reshape(3, 2)
    test_eq(all_gather_rows(x, [3], None), x)
    test_eq(all_gather_rows(x[:0], [0], None).shape, (0, 2))
    q = x.to(torch.float8_e4m3fn)                       # fp8 rows travel as bytes (gloo has no fp8 collectives)
    test_eq(all_gather_rows(q, [3], None).view(torch.uint8), q.view(torch.uint8))
    for dt in (torch.int16, torch.uint16, torch.uint32, torch.uint64, torch.bool, torch.bfloat16):   # gloo lacks some:
        y = (torch.arange(24).reshape(3, 2, 4) % 7).to(dt)                                          # bytes travel
        test_eq(torch.equal(all_gather_rows(y, [3], None), y), True)
    test_eq(all_gather_rows(x.t().contiguous().t(), [3], None), x)                  # strided rows, a requires_grad one
    test_eq(all_gather_rows(x.clone().requires_grad_(), [3], None), x)
    test_eq(all_gather_rows(torch.zeros(2, 0), [2], None).shape, (2, 0))
    c = torch.tensor([[1 + 2j, 3 - 1j]]).conj()                                      # a conjugate view travels resolved
    test_eq(torch.equal(all_gather_rows(c, [1], None), c.resolve_conj()), True)
    for bad, msg in ((torch.eye(2).to_sparse(), "x: expected a dense (strided) tensor"), (torch.zeros(2, device="meta"), "x: expected a dense tensor"),
                     (torch.zeros(2, 2, dtype=torch.uint8).view(torch.bits8), "x: expected dtype")):
        test_fail(lambda: all_gather_rows(bad, [2], None), contains=msg)
    test_fail(lambda: all_gather_rows(x, [5], None), contains="counts: expected counts[0] = this rank's rows of x (3), got 5")
    for bad in ([], [3, 1], [-1], [3.0], [True], None):
        test_fail(lambda: all_gather_rows(x, bad, None), contains="counts: expected a list of 1 ints >= 0")
    test_fail(lambda: all_gather_rows(torch.tensor(1.0), [1], None), contains="x: expected a tensor of rows")
    test_fail(lambda: all_gather_rows([1.0], [1], None), contains="x: expected a torch.Tensor")
    test_fail(lambda: all_gather_rows(x, [3], "g"), contains="group: expected a torch.distributed ProcessGroup or None")
    test_fail(lambda: make_distributed_prepare_finalize(MoEConfig(8, 2, 16, 16), max_num_tokens_per_rank=-5),
              contains="max_num_tokens_per_rank: expected >= 1, got -5")
finally: dist.destroy_process_group()
