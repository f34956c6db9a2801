# %%
#| default_exp modular

# %% [markdown]
# # The modular kernel
# > Prepare/finalize (dispatch and combine) and experts as separate parts, composed only when their activation formats match — and the shared experts added exactly once.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
import torch
from moe_lit.terms import check_int, check_tensor, check_bool, check_choice, FLOAT_DTYPES, gradient_wanted
from moe_lit.config import ActivationFormat, MoEConfig
from moe_lit.routing import matmul_acc
from moe_lit.quant_weights import QuantizedExpertWeights, ACTIVATION_GRANULARITY
from moe_lit.formats import (moe_reference_standard, dispatch_batched_reference, experts_reference_batched,
                             combine_batched_reference, Activation, SILU)

# %%
#| hide
from moe_lit.kernels.batched import DEVICE
from moe_lit.formats import expert_mlp
from fastcore.test import test_eq, test_fail
import dataclasses
from moe_lit.testing import assert_close, record_launches
from moe_lit.config import BACKENDS, ParallelConfig
from moe_lit.placement import Placement
from moe_lit.quant_weights import quantize_expert_weights
import copy, pickle

# %% [markdown]
# In this notebook: `Prepared` (what prepare hands to the experts), the prepare/finalize implementations
# `StandardPrepareFinalize` and `BatchedPrepareFinalize`, the experts `TorchStandardExperts`, `TorchBatchedExperts`
# (and the Triton `TritonExperts`, `BatchedTritonExperts` from the kernel chapters), `SharedExperts`,
# `ModularKernel`, and the factories `make_prepare_finalize` / `make_experts` that the layer uses. An
# **explanation** page.
#
# ## The composition rule
#
# vLLM splits a fused-MoE forward into `[router] → [quantize + dispatch] → [experts] → [combine]` and pairs the
# dispatch and the combine in one *prepare/finalize* object, because their collectives must match. The experts in
# between must accept the layout the prepare produces — its **activation format**. In vLLM the oracles computed that
# format from the parallel config while the experts were built from the prepare/finalize's format: two sources of
# truth, and the NIXL EP bug was the two disagreeing. Here the rule is structural:
#
# 1. the prepare/finalize is built first, from the backend's descriptor record;
# 2. the experts are chosen *by the prepare/finalize's format*;
# 3. `ModularKernel` refuses a pair whose formats differ, naming both formats and both classes.
#
# ## What prepare hands over

# %%
#| export
@dataclass
class Prepared:
    """The output of `prepare`: the activations in the prepare/finalize's format plus what finalize needs. Raises
    nothing: a plain dataclass, not checked at construction; a finalize checks it against the experts' output
    (`prepared`, `expert_out`, `prepared.topk_weights`, `prepared.slot_map`). Source: vLLM's `PrepareResultType` (`(a1q,
    a1q_scale, ExpertTokensMetadata, topk_ids, topk_weights)`, fused_moe/modular_kernel.py), as one record."""
    format: ActivationFormat
    a: torch.Tensor                          # Standard: [T, H]; BatchedExperts: [E_local, max_tokens, H]
    topk_weights: torch.Tensor               # [T, top_k] fp32
    local_ids: torch.Tensor | None = None    # Standard: [T, top_k] local expert per slot, -1 = not on this rank
    expert_num_tokens: torch.Tensor | None = None  # BatchedExperts: [E_local] int32
    slot_map: torch.Tensor | None = None     # BatchedExperts: [T, top_k] int64, e·max_tokens + row or -1
    apply_router_weight_on_input: bool = False
    hidden_size: int | None = None           # columns of the caller's hidden (before any dispatch padding)
    expected_m: int | None = None            # expected rows per local expert (tile choice), from the routing
    num_experts: int | None = None           # the model's experts, global (the Standard experts' layout choice)
    active_experts: int | None = None        # expected local experts with rows (the GEMMs' split-K choice)
    max_active_experts: int | None = None    # at most this many local experts have rows (the batched grids' slots)
    a_scale: torch.Tensor | None = None      # a quantized before dispatch (float8_e4m3fn): its group scales, fp32
                                             # [E_local, max_tokens, G] (`dispatch_quantization`)
    out_dtype: torch.dtype | None = None     # with a_scale: the experts' output dtype (the caller's hidden's)
    num_local_experts: int | None = None     # Standard: the experts local_ids index (the weights must hold them);
                                             # BatchedExperts: a's slabs (None: a.shape[0])

# %% [markdown]
# ## Prepare/finalize
#
# Both in-process implementations leave the caller's `hidden` untouched (a shared expert reads it afterwards —
# vLLM #28939 read it after an in-place routed pass). Neither reduces across ranks: `output_is_reduced` is False and
# the sum over ranks is the deployment's all-reduce or combine, done once by the caller. Both declare `adds_shared`:
# their `finalize` takes the shared experts' output and adds it — the batched one on Triton inside the combine's fp32
# sum, one cast and no launch of its own. The Standard one's finalize has no launch to add it in, so trusted Standard
# experts on Triton declare `adds_shared` too and take it into *their* combine's fp32 sum (`07`'s `_combine_pairs`
# `addend`), after a `join` of the side stream the shared experts ran on in a CUDA graph: eager and replayed forwards
# do the same arithmetic. A prepare/finalize without `adds_shared` (the transports of `13a`) gets the output added
# after its finalize, so that its communication still overlaps the shared experts.

# %%
#| export
def check_prepare_args(hidden, topk_weights, topk_ids, placement):
    """What every prepare needs: `hidden [T, H]` float, `topk_ids` and `topk_weights [T, top_k]`, a Placement.
    `topk_ids` int32/int64, `topk_weights` fp32. ValueError naming `hidden`, `topk_ids`, `topk_weights` or `placement`;
    metadata only (no id range: that is the placement's `local_slot`). Source: moe-lit's own, for the arguments of
    vLLM's `FusedMoEPrepareAndFinalize.prepare`."""
    from moe_lit.placement import Placement
    check_tensor("hidden", hidden, ndim=2, dtype=FLOAT_DTYPES)
    check_tensor("topk_ids", topk_ids, shape=(hidden.shape[0], None), dtype=(torch.int32, torch.int64))
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtype=torch.float32)
    if not isinstance(placement, Placement): raise ValueError(f"placement: expected a Placement, got {type(placement).__name__}")

# %%
#| export
def expected_load(topk_ids: torch.Tensor,   # [T, top_k] this rank's routing (only its shape is read: no sync)
                  placement,                # the Placement: global and local expert counts
                 ) -> dict:                 # Prepared's `expected_m`, `active_experts` and `max_active_experts`
    """What the kernels' tile choices assume of a batch, from shapes alone: rows per local expert, local experts with
    rows, their bound. ValueError naming `topk_ids` (not a 2-D tensor) or `placement` (not a Placement). Source:
    moe-lit's own (uniform routing; vLLM looks tiles up by the padded capacity instead,
    `BatchedTritonExperts.apply`)."""
    from moe_lit.placement import Placement
    check_tensor("topk_ids", topk_ids, ndim=2)
    if not isinstance(placement, Placement): raise ValueError(f"placement: expected a Placement, got {type(placement).__name__}")
    return _expected_load(topk_ids, placement)

def _expected_load(topk_ids, placement) -> dict:
    "`expected_load` for arguments already checked (the prepares' hot path, after `check_prepare_args`)."
    pairs, E, E_local = topk_ids.numel(), placement.num_experts, placement.num_local_experts
    return dict(expected_m=max(1, pairs // E),                          # uniform routing: pairs / global experts
                active_experts=min(E_local, max(1, -(-pairs * E_local // E))),   # this rank's share of the pairs
                max_active_experts=min(E_local, pairs))                 # a bound: every pair on a different local expert

# %%
#| test expected_load
par = ParallelConfig.make(tp_size=1, dp_size=2, enable_expert_parallel=True, all2all_backend="nixl_ep")
p = Placement.build(MoEConfig(64, 8, 16, 16, parallel=par))                     # 32 of 64 experts on this rank
test_eq(expected_load(torch.zeros(1, 8, dtype=torch.int32), p), dict(expected_m=1, active_experts=4, max_active_experts=8))
test_eq(expected_load(torch.zeros(64, 8, dtype=torch.int32), p), dict(expected_m=8, active_experts=32, max_active_experts=32))
test_fail(lambda: expected_load([[0, 1]], p), contains="topk_ids: expected a torch.Tensor")
test_fail(lambda: expected_load(torch.zeros(1, 8), None), contains="placement: expected a Placement, got NoneType")

# %%
#| export
def _check_prepared(prepared, fmt: ActivationFormat, expert_out: torch.Tensor):
    "A finalize's `prepared`: a `Prepared` of this format whose tensors agree with `expert_out` (metadata only)."
    if not isinstance(prepared, Prepared):
        raise ValueError(f"prepared: expected the Prepared this prepare/finalize's prepare returned, got {type(prepared).__name__}")
    if prepared.format != fmt:
        raise ValueError(f"prepared: expected a {fmt.value} Prepared (from this prepare/finalize), got {prepared.format.value}")
    check_tensor("expert_out", expert_out, shape=tuple(prepared.a.shape),        # the slabs' / rows' (quantized before
                 dtype=prepared.a.dtype if prepared.a_scale is None else prepared.out_dtype)   # dispatch: the caller's)
    if expert_out.device != prepared.a.device:
        raise ValueError(f"expert_out: expected device {prepared.a.device}, got {expert_out.device}")
    wts = check_tensor("prepared.topk_weights", prepared.topk_weights, ndim=2, dtype=torch.float32)
    if fmt == ActivationFormat.BatchedExperts:
        check_tensor("prepared.slot_map", prepared.slot_map, shape=tuple(wts.shape), dtype=torch.int64)
        for n, t in (("prepared.topk_weights", wts), ("prepared.slot_map", prepared.slot_map)):
            if t.device != expert_out.device: raise ValueError(f"{n}: expected device {expert_out.device}, got {t.device}")
    hs = prepared.hidden_size
    if hs is not None and not (isinstance(hs, int) and 0 <= hs <= expert_out.shape[-1]):
        raise ValueError(f"prepared.hidden_size: expected an int in [0, {expert_out.shape[-1]}] (the experts' columns), got {hs!r}")

def _check_shared(shared, T: int, H: int, like: torch.Tensor):
    "A finalize's `shared` addend: None, or `[T, H]` in the experts' dtype on their device (metadata only)."
    if shared is None: return
    check_tensor("shared", shared, shape=(T, H), dtype=like.dtype)
    if shared.device != like.device: raise ValueError(f"shared: expected device {like.device}, got {shared.device}")

class StandardPrepareFinalize:
    """No dispatch: the flat token list with this rank's local ids; finalize returns the experts' summed rows.
    ValueError at construction naming `topk_indices_dtype` (int32 or int64), `validate` or `use_triton` (bools). Source:
    vLLM's `MoEPrepareAndFinalizeNoDPEPModular` (fused_moe/prepare_finalize/no_dp_ep.py), without its quantization."""
    activation_format = ActivationFormat.Standard
    output_is_reduced = False
    adds_shared = True             # finalize takes the shared experts' output and adds it
    num_dispatchers = 1
    max_num_tokens_per_rank = None

    def __init__(self, topk_indices_dtype: torch.dtype = torch.int32,
                 validate: bool = True,    # check topk_ids' range in prepare (one host sync); False for a router's own ids
                 use_triton: bool = False):   # the local slots in one Triton launch (07_kernels.dispatch.local_slots)
        self.topk_indices_dtype = check_choice("topk_indices_dtype", topk_indices_dtype, (torch.int32, torch.int64))
        self.validate = check_bool("validate", validate)
        self.use_triton = check_bool("use_triton", use_triton)

    def prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input=False) -> Prepared:
        """`Prepared` with `a = hidden` (not copied, not modified) and `local_ids = placement.local_slot(topk_ids)`.
        ValueError naming `hidden`, `topk_ids`, `topk_weights`, `placement` (`check_prepare_args`),
        `apply_router_weight_on_input`, and with `validate` ids outside [-1, num_experts) (`topk_ids`). Source: vLLM's
        `MoEPrepareAndFinalizeNoDPEPModular.prepare` (no_dp_ep.py)."""
        check_prepare_args(hidden, topk_weights, topk_ids, placement)
        check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
        return self._prepare(hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)

    def _prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input) -> Prepared:
        "`prepare` after its checks (an owning ModularKernel's caller checked every argument)."
        if placement.holds_every_expert and not self.validate:   # ids in range by construction: the slot is the id
            local = topk_ids                                     # (no gather; every experts path skips ids outside [0, E))
        elif self.use_triton and not self.validate and placement.slot_table is not None and \
                placement.slot_table.device == topk_ids.device and placement.slot_table.is_contiguous():   # the layer's table
            from moe_lit.kernels.dispatch import _local_slots
            local = _local_slots(topk_ids.contiguous(), placement.slot_table)
        else: local = placement.local_slot(topk_ids, self.validate)
        return Prepared(self.activation_format, hidden, topk_weights, local_ids=local,
                        apply_router_weight_on_input=apply_router_weight_on_input, hidden_size=hidden.shape[1],
                        num_experts=placement.num_experts, num_local_experts=placement.num_local_experts,
                        **_expected_load(topk_ids, placement))

    def finalize(self, expert_out: torch.Tensor, prepared: Prepared,
                 shared: torch.Tensor | None = None) -> torch.Tensor:   # [T, H] the shared experts' output, added
        """The Standard experts already weighted and summed each token's slots: `[T, H]` as it is (plus `shared`).
        ValueError naming `prepared` (not a Standard Prepared, a bad `hidden_size`), `expert_out` (shape, dtype,
        device), `prepared.topk_weights` or `shared` (not `[T, H]` in the experts' dtype and device). Source: vLLM's
        no-DP/EP finalize, where `TritonExperts`' `TopKWeightAndReduceNoOP` leaves the summed rows as they are."""
        _check_prepared(prepared, self.activation_format, expert_out)
        _check_shared(shared, expert_out.shape[0], prepared.hidden_size or expert_out.shape[1], expert_out)
        return self._finalize(expert_out, prepared, shared)

    def _finalize(self, expert_out, prepared, shared=None) -> torch.Tensor:
        "`finalize` after its checks (an owning ModularKernel's own prepare and experts made both)."
        return expert_out if shared is None else expert_out + shared

# %%
#| export
def check_quant_block(quant_block) -> tuple | None:
    """`quant_block` — None, or `(1, group)` of ints with `group` a power of two in [32, 65536] (the activation
    quantizer's widest group): the scale groups of rows sent as FP8 (`dispatch_quantization`'s block) — returned as it
    is; ValueError naming it otherwise. Source: moe-lit's own; DeepEP LL's FP8 dispatch in 1×128 groups
    (vLLM's `DeepEPLLPrepareAndFinalize`) is the usual value."""
    if quant_block is not None and not (isinstance(quant_block, tuple) and len(quant_block) == 2
                                        and type(quant_block[0]) is int and quant_block[0] == 1
                                        and type(quant_block[1]) is int and 32 <= quant_block[1] <= 65536
                                        and not quant_block[1] & (quant_block[1] - 1)):
        raise ValueError(f"quant_block: expected None or (1, group) of ints with group a power of two in [32, 65536], "
                         f"got {quant_block!r}")
    return quant_block

class BatchedPrepareFinalize:
    """In-process dispatch into per-expert slabs and the weighted combine (the DeepEP-LL / NIXL EP contract). ValueError
    at construction naming `max_num_tokens_per_rank`, `num_dispatchers`, `padded_hidden_size` (ints >= 1), `use_triton`,
    `validate` (bools), `topk_indices_dtype`, or `quant_block` (bad, or given without `use_triton`). Source: vLLM's
    `BatchedPrepareAndFinalize` (fused_moe/prepare_finalize/batched.py)."""
    activation_format = ActivationFormat.BatchedExperts
    output_is_reduced = False
    adds_shared = True             # finalize takes the shared experts' output: on Triton, in the combine's own sum

    def __init__(self, max_num_tokens_per_rank: int, num_dispatchers: int, use_triton: bool = False,
                 topk_indices_dtype: torch.dtype = torch.int64, padded_hidden_size: int | None = None,
                 validate: bool = True,    # check ids and capacity in prepare (host syncs); False for a router's own ids
                 quant_block: tuple | None = None):   # (1, group): rows sent as FP8 in groups (`dispatch_quantization`)
        self.max_num_tokens_per_rank = check_int("max_num_tokens_per_rank", max_num_tokens_per_rank, lo=1)
        if check_quant_block(quant_block) is not None and not use_triton:
            raise ValueError(f"quant_block: expected None without use_triton (the FP8 dispatch is a Triton launch), got {quant_block}")
        self.quant_block = quant_block
        self.padded_hidden_size = None if padded_hidden_size is None else check_int("padded_hidden_size", padded_hidden_size, lo=1)
        self.num_dispatchers = check_int("num_dispatchers", num_dispatchers, lo=1)
        self.use_triton = check_bool("use_triton", use_triton)
        self.topk_indices_dtype = check_choice("topk_indices_dtype", topk_indices_dtype, (torch.int32, torch.int64))
        self.validate = check_bool("validate", validate)

    def prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input=False) -> Prepared:
        """Slabs `[E_local, max_num_tokens_per_rank · num_dispatchers, H]` through the placement's id translation.
        ValueError naming `hidden`, `topk_ids`, `topk_weights`, `placement` (`check_prepare_args`),
        `apply_router_weight_on_input`, `hidden` again (more columns than `padded_hidden_size`; on Triton a dtype the
        dispatch does not take), and with `validate` ids out of range or a slab overflow (`max_tokens`). Source: vLLM's
        `BatchedPrepareAndFinalize.prepare` (batched.py: each expert's pairs in token order)."""
        check_prepare_args(hidden, topk_weights, topk_ids, placement)
        check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
        return self._prepare(hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)

    def _prepare(self, hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input) -> Prepared:
        "`prepare` after its checks (an owning ModularKernel's caller checked every argument)."
        cap, scale = self.max_num_tokens_per_rank * self.num_dispatchers, topk_weights if apply_router_weight_on_input else None
        H = hidden.shape[1]
        W = H if self.padded_hidden_size is None else self.padded_hidden_size   # the backend's wire size: zeros past H
        if W < H: raise ValueError(f"hidden: expected at most padded_hidden_size={W} columns, got {H}")
        if W != H and not self.use_triton: hidden = torch.nn.functional.pad(hidden, (0, W - H))   # (Triton: the
        a_scale, dtype = None, hidden.dtype                                                        # dispatch sends them)
        if self.use_triton:
            ok = (torch.bfloat16, torch.float16) if self.quant_block else (torch.bfloat16, torch.float16, torch.float32)
            if hidden.dtype not in ok:                                           # the dispatch kernel's / quantizer's
                raise ValueError(f"hidden: expected {' or '.join(map(str, ok))} for the Triton dispatch (use_triton=True"
                                 f"{', quant_block=' + str(self.quant_block) if self.quant_block else ''}), got {hidden.dtype}")
            from moe_lit.kernels.dispatch import batched_dispatch, _batched_dispatch
            p, hidden = placement, hidden.contiguous()
            g2p, emap = p.global_to_physical, p.expert_map
            table, mode = (g2p, 2) if g2p is not None else (emap, 1) if emap is not None else (None, 0)
            group = self.quant_block[1] if self.quant_block else None   # FP8 on the wire: quantized in the dispatch
            if self.validate or (mode and table.device != hidden.device):        # checked, tables moved: the public call
                kw = (dict(global_to_physical=g2p.to(hidden.device), physical_offset=p.physical_offset) if mode == 2 else
                      dict(expert_map=emap.to(hidden.device)) if mode == 1 else {})
                res = batched_dispatch(hidden, topk_ids, p.num_local_experts, cap, topk_weights=scale,
                                       check_overflow=self.validate, quant_group=group, hidden_width=W, **kw)
                a, counts, slot_map = res[:3]
                if group: a_scale = res[3]
            else:   # the layer's hot path: ids from its router, the placement's tables on its device (checked above)
                E_ = p.num_local_experts
                a = torch.empty(E_, cap, W, dtype=torch.float8_e4m3fn if group else hidden.dtype, device=hidden.device)
                if group: a_scale = torch.empty(E_, cap, -(-W // group), dtype=torch.float32, device=hidden.device)
                a, counts, slot_map, _ = _batched_dispatch(hidden, topk_ids, E_, cap, table, mode,
                                                           table.shape[0] if mode else E_,
                                                           p.physical_offset if mode == 2 else 0, scale, a, False,
                                                           self._kept_counts(E_, hidden),
                                                           (group, a_scale) if group else None)
        else:
            a, counts, slot_map = dispatch_batched_reference(hidden, placement.local_slot(topk_ids, self.validate),
                                                             placement.num_local_experts, cap, scale)
        return Prepared(self.activation_format, a, topk_weights, expert_num_tokens=counts, slot_map=slot_map,
                        apply_router_weight_on_input=apply_router_weight_on_input, hidden_size=H,
                        a_scale=a_scale, out_dtype=None if a_scale is None else dtype,
                        **_expected_load(topk_ids, placement))   # not the padded capacity

    def _kept_counts(self, num_local_experts: int, hidden: torch.Tensor) -> torch.Tensor:
        """int32 `[num_local_experts + 1]` zeros for the hot path's dispatch (the counts, then the overflow flag), kept:
        the finalize's combine zeroes them again, so no fill is launched per forward. A prepare whose finalize did not
        run (an error in between) leaves them dirty: the next one zeroes them first. One made inside a CUDA graph
        capture is not kept (its memory is the graph's). One forward at a time, as the layer that owns this object."""
        kept = self.__dict__.get("_counts")
        if kept is None or kept.numel() != num_local_experts + 1 or kept.device != hidden.device:
            with torch.inference_mode(False):      # a normal tensor: its zero_ below runs in or out of inference mode
                kept = torch.zeros(num_local_experts + 1, dtype=torch.int32, device=hidden.device)
            if hidden.is_cuda and torch.cuda.is_current_stream_capturing(): return kept
            self._counts = kept
        elif self.__dict__.get("_counts_dirty"): kept.zero_()
        if hidden.shape[0]: self._counts_dirty = True  # the dispatch counts: until a finalize's combine zeroes them
        return kept

    def finalize(self, expert_out: torch.Tensor, prepared: Prepared,
                 shared: torch.Tensor | None = None) -> torch.Tensor:   # [T, H] the shared experts' output, added
        """Each pair's row back to its token, weighted (unless applied at dispatch) and summed in fp32 (with `shared`,
        on Triton in the same sum). `[T, hidden_size]` in the experts' dtype. ValueError naming `prepared`,
        `expert_out`, `prepared.topk_weights`, `prepared.slot_map` (shape, dtype, device) or `shared`; metadata only.
        Source: vLLM's `TopKWeightAndReduceNaiveBatched`, the finalize of `BatchedPrepareAndFinalize`."""
        _check_prepared(prepared, self.activation_format, expert_out)
        _check_shared(shared, prepared.topk_weights.shape[0], prepared.hidden_size or expert_out.shape[2], expert_out)
        return self._finalize(expert_out, prepared, shared)            # (a hand-built Prepared may not say its width)

    def _finalize(self, expert_out, prepared, shared=None) -> torch.Tensor:
        "`finalize` after its checks (an owning ModularKernel's own prepare and experts made both)."
        on_in = prepared.apply_router_weight_on_input
        T, H = prepared.topk_weights.shape[0], expert_out.shape[2]
        if self.use_triton:
            from moe_lit.kernels.dispatch import _batched_combine
            if expert_out.stride(-1) != 1: expert_out = expert_out.contiguous()
            kept = self.__dict__.get("_counts")
            reset = kept if kept is not None and prepared.expert_num_tokens is not None and T and H and \
                prepared.expert_num_tokens.data_ptr() == kept.data_ptr() else None        # this object's own dispatch
            out = _batched_combine(expert_out, prepared.topk_weights, prepared.slot_map,     # slots come from our own
                                   torch.empty(T, H, dtype=expert_out.dtype, device=expert_out.device), on_in,   # dispatch
                                   None if shared is None else shared.contiguous(),    # in the sum (its columns)
                                   reset)                                              # the counts: zero again
            if reset is not None: self._counts_dirty = False
        else:
            out = combine_batched_reference(expert_out, prepared.topk_weights, prepared.slot_map, on_in)
            if shared is not None: out = out[:, :prepared.hidden_size] + shared
        return out[:, :prepared.hidden_size] if out.shape[1] != prepared.hidden_size else out   # padding never leaks

# %% [markdown]
# **Padded hidden sizes.** DeepEP low-latency and NIXL EP send only the hidden sizes their record lists, so
# gpt-oss's 2880 travels as 3072 (`MoEConfig.padded_hidden_size`). The batched prepare pads the activations with
# zero columns, the layer pads its expert weights with zero columns (w13) and zero rows (w2), and finalize slices
# the output back: zero columns add nothing to any product, and the public output keeps the unpadded shape
# (vLLM #40794 and its follow-ups leaked the padded shape).
#
# ## Experts
#
# Each experts class declares its format and takes the `Prepared` of that format. The torch classes are the
# references; the Triton ones live in the kernel chapters and are wrapped here so every experts class has the same
# `apply(prepared, w13, w2)`.

# %%
#| export
class TorchStandardExperts:
    """Standard-format experts, torch reference: per local expert, gather its pairs, run it, weighted-add. Stateless:
    construction raises nothing. Source: moe-lit's own reference (`05_formats.moe_reference_standard`) in the role of
    vLLM's Standard `FusedMoEPermuteExpertsUnpermute` (modular_kernel.py)."""
    activation_format = ActivationFormat.Standard
    def apply(self, prepared: Prepared, w13: torch.Tensor, w2: torch.Tensor, w13_bias=None, w2_bias=None,
              activation: Activation = SILU) -> torch.Tensor:
        """`[T, H]` in `prepared.a`'s dtype: `moe_reference_standard` on the prepared rows and local ids. ValueError
        naming `w13` (holding another number of experts than the prepared rows' local experts) or, from
        `moe_reference_standard`, `w2`, the biases or `activation`; AttributeError for a `prepared` that is not a
        Prepared (its format is ModularKernel's check). Source: moe-lit's own reference (`05_formats`)."""
        _check_holds_local_experts(prepared, w13)
        return moe_reference_standard(prepared.a, w13, w2, prepared.topk_weights, prepared.local_ids,
                                      apply_router_weight_on_input=prepared.apply_router_weight_on_input,
                                      w13_bias=w13_bias, w2_bias=w2_bias, activation=activation)
    def workspace_shapes(self, T, H, I, top_k, E_local, max_tokens=None):
        """Shapes of (intermediate, per-expert output, result): `[T·top_k, I]`, `[T·top_k, H]`, `[T, H]`. No checks;
        raises nothing of its own (integer arithmetic on its arguments). Source: vLLM's `workspace_shapes`
        (modular_kernel.py), which returns (workspace13, workspace2, output)."""
        return (T * top_k, I), (T * top_k, H), (T, H)

class TorchBatchedExperts:
    """Batched-format experts, torch reference: each expert on the valid rows of its slab. Stateless: construction
    raises nothing. Source: vLLM's `NaiveBatchedExperts` (experts/fused_batched_moe.py), here
    `05_formats.experts_reference_batched`."""
    activation_format = ActivationFormat.BatchedExperts
    def apply(self, prepared: Prepared, w13: torch.Tensor, w2: torch.Tensor, w13_bias=None, w2_bias=None,
              activation: Activation = SILU) -> torch.Tensor:
        """`[E_local, max_tokens, H]` in `prepared.a`'s dtype, padding rows NaN. ValueError from
        `experts_reference_batched` naming `a` (a Standard Prepared's 2-D rows too), `expert_num_tokens`, `w13`, `w2` or
        the biases. Source: vLLM's `NaiveBatchedExperts.apply` (per-expert loop, fused_batched_moe.py)."""
        return experts_reference_batched(prepared.a, prepared.expert_num_tokens, w13, w2, w13_bias=w13_bias,
                                         w2_bias=w2_bias, activation=activation)
    def workspace_shapes(self, T, H, I, top_k, E_local, max_tokens):
        """Shapes of (intermediate, output, result): `[E_local, max_tokens, I]`, `[E_local, max_tokens, H]`, `[T, H]`.
        No checks; raises nothing of its own (integer arithmetic on its arguments). Source: vLLM's `workspace_shapes`
        (modular_kernel.py), which returns (workspace13, workspace2, output)."""
        return (E_local, max_tokens, I), (E_local, max_tokens, H), (T, H)

# %% [markdown]
# The Triton kernels' experts take their own arguments; an adapter gives each the `apply(prepared, w13, w2, …)` of the
# experts above. Each adapter is named after the class it wraps, plus `Adapter`: `TritonExpertsAdapter` wraps
# `08_kernels.contiguous.TritonExperts`, `BatchedTritonExpertsAdapter` wraps `06_kernels.batched.BatchedTritonExperts`,
# and the two quantized ones wrap `09d_kernels.quant_experts`' `TritonQuantExperts` and `BatchedTritonQuantExperts`.

# %%
#| export
def _check_fits_prepared(prepared, w13):
    """What every Triton adapter not owned by a layer checks of its weights against the prepared rows, trusted or not
    (metadata only): they hold the rows' local experts — fewer would be read past their end (a batched slab per expert)
    or drop pairs (Standard ids past them) — and take the prepare's FP8 groups (`_check_prepared_groups`)."""
    _check_holds_local_experts(prepared, w13)
    _check_prepared_groups(prepared, w13)

def _check_holds_local_experts(prepared, w13):
    "ValueError naming `w13` when the weights hold another number of experts than the prepared rows' (metadata only)."
    want = prepared.num_local_experts
    if want is None and prepared.format is ActivationFormat.BatchedExperts: want = prepared.a.shape[0]
    held = w13.num_experts if isinstance(w13, QuantizedExpertWeights) else \
        w13.shape[0] if isinstance(w13, torch.Tensor) and w13.dim() == 3 else None   # (anything else: named later)
    if want is not None and held is not None and held != want:
        raise ValueError(f"w13: expected the weights of the prepared rows' {want} local experts, got {held}")

def _check_trusted_weights(a: torch.Tensor, w13, w2):
    "What trusted experts still check of their weights each call, metadata only: shapes against the prepared `a`, dtype, device."
    H = a.shape[-1]
    if isinstance(w13, QuantizedExpertWeights):
        if w13.hidden_size != H or w13.device != a.device:
            raise ValueError(f"w13: expected quantized weights of hidden_size {H} on {a.device}, got {w13.hidden_size} on {w13.device}")
        return
    check_tensor("w13", w13, shape=(None, None, H), dtype=a.dtype)
    E, N = w13.shape[:2]
    if N % 2 or N == 0: raise ValueError(f"w13: expected a positive even number of rows (gate, then up), got {N}")
    check_tensor("w2", w2, shape=(E, H, N // 2), dtype=a.dtype)
    for name, t in (("w13", w13), ("w2", w2)):
        if t.device != a.device: raise ValueError(f"{name}: expected device {a.device}, got {t.device}")

class TritonExpertsAdapter(TorchStandardExperts):
    """Standard-format experts on Triton (`08_kernels.contiguous.TritonExperts`). Construction raises nothing; `apply`
    checks. Source: moe-lit's adapter to vLLM's `TritonExperts` (fused_moe.py)."""
    trusted = False     # True (`make_experts(..., trusted=True)`): the caller's weights were checked once, at its
                        # construction, and its prepare built the rest: the launches skip the per-call checks but
                        # the weights' shapes, dtype and device (`_check_trusted_weights`, metadata only)
    weights_checked = False   # True in an owning ModularKernel: the owner checks its weights (`FusedMoE`) instead
    adds_shared = True  # `apply` takes the shared experts' output (`shared`): trusted or not, the same arithmetic
    def apply(self, prepared, w13, w2, w13_bias=None, w2_bias=None, activation: Activation = SILU,
              shared=None, join=None):   # (adds_shared) added in the combine's fp32 sum; `join` before that launch
        """`[T, H]`: `TritonExperts` on the prepared rows, plus `shared [T, H]` in its fp32 sum. ValueError naming `w13`
        (not the prepared rows' local experts), `quant_block` (FP8 rows for these weights), and `TritonExperts.apply`'s
        own; trusted, only the weights' metadata (`_check_trusted_weights`), and in an owning ModularKernel nothing per
        call. Source: vLLM's `TritonExperts.apply` through the modular experts interface (modular_kernel.py)."""
        from moe_lit.kernels.contiguous import TritonExperts
        if not self.weights_checked: _check_fits_prepared(prepared, w13)
        if self.trusted:
            if not self.weights_checked: _check_trusted_weights(prepared.a, w13, w2)
            return TritonExperts()._apply(prepared.a, w13, w2, prepared.topk_weights, prepared.local_ids,
                                          prepared.apply_router_weight_on_input, expected_m=prepared.expected_m,
                                          w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
                                          num_experts=prepared.num_experts, active_experts=prepared.active_experts,
                                          addend=shared, join=join)
        if join is not None: join()            # before the combine reads `shared` (no overlap: the checked path)
        out = TritonExperts().apply(prepared.a, w13, w2, prepared.topk_weights, prepared.local_ids,
                                    prepared.apply_router_weight_on_input, expected_m=prepared.expected_m,
                                    num_experts=prepared.num_experts, active_experts=prepared.active_experts,
                                    validate=False, w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
                                    addend=shared)     # local ids come from the placement: in range by construction
        return out

class BatchedTritonExpertsAdapter(TorchBatchedExperts):
    """Batched-format experts on Triton (`06_kernels.batched.BatchedTritonExperts`). Construction raises nothing;
    `apply` checks. Source: moe-lit's adapter to vLLM's `BatchedTritonExperts` (experts/fused_batched_moe.py)."""
    trusted = weights_checked = False     # as TritonExpertsAdapter's
    def apply(self, prepared, w13, w2, w13_bias=None, w2_bias=None, activation: Activation = SILU):
        """`[E_local, max_tokens, H]`: `BatchedTritonExperts` on the prepared slabs (counts not re-validated: the
        dispatch clamps them). ValueError naming `w13` (not the slabs' experts), `quant_block`, and
        `BatchedTritonExperts.apply`'s own; trusted, only the weights' metadata. Source: vLLM's
        `BatchedTritonExperts.apply` (experts/fused_batched_moe.py)."""
        from moe_lit.kernels.batched import BatchedTritonExperts
        if not self.weights_checked: _check_fits_prepared(prepared, w13)
        if self.trusted:
            if not self.weights_checked: _check_trusted_weights(prepared.a, w13, w2)
            return BatchedTritonExperts()._apply(prepared.a, prepared.expert_num_tokens, w13, w2, prepared.expected_m,
                                                 w13_bias, w2_bias, activation, prepared.active_experts,
                                                 prepared.max_active_experts)
        return BatchedTritonExperts().apply(prepared.a, prepared.expert_num_tokens, w13, w2, expected_m=prepared.expected_m,
                                            active_experts=prepared.active_experts,
                                            max_active_experts=prepared.max_active_experts,
                                            w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
                                            validate=False)   # counts from the dispatch: clamped to the capacity

def _check_prepared_groups(prepared, w13):
    "A prepare's FP8 rows (`a_scale`) against the weights: block-FP8 weights, the same 1×g activation groups (metadata only)."
    a, sc = prepared.a, prepared.a_scale
    if sc is None or not isinstance(w13, QuantizedExpertWeights): return
    gran = ACTIVATION_GRANULARITY.get(w13.scheme)
    if gran != "group":                          # FP4 takes 16-bit rows; FP8 per token or tensor, its own scales
        raise ValueError(f"quant_block: expected None for {w13.scheme} experts (they take " + (
            "16-bit activations" if gran is None else f"FP8 activations scaled per {gran}") +
            f", not FP8 rows in 1×g groups), got a prepare that sends FP8 rows with {sc.shape[-1]} scales a row")
    if sc.shape[-1:] != (-(-a.shape[-1] // w13.block_shape[1]),):
        raise ValueError(f"quant_block: expected the prepare's FP8 groups to be the weights' activation groups (1, "
                         f"{w13.block_shape[1]}), got {sc.shape[-1]} scales for {a.shape[-1]} columns")

class TritonQuantExpertsAdapter(TorchStandardExperts):
    """Standard-format experts on quantized weights (`09d_kernels.quant_experts.TritonQuantExperts`): `w13` is the
    QuantizedExpertWeights, `w2` None. Construction raises nothing; `apply` checks. Source: moe-lit's adapter; vLLM's
    counterpart is `TritonExperts` with a quantized `FusedMoEQuantConfig` (fused_moe.py)."""
    trusted = weights_checked = False     # as TritonExpertsAdapter's
    adds_shared = True                    # as TritonExpertsAdapter's
    takes_quantized_input = True          # FP8 rows with their scales (`13a`'s all-gather that quantizes before it sends)
    def apply(self, prepared, w13, w2=None, w13_bias=None, w2_bias=None, activation: Activation = SILU,
              shared=None, join=None):
        """`[T, H]` in the caller's dtype (`prepared.out_dtype` for FP8 rows). ValueError naming `w13` (not the prepared
        rows' local experts; not a QuantizedExpertWeights: named `qw`), `quant_block`, and `TritonQuantExperts.apply`'s
        own; trusted, only the weights' metadata. Source: vLLM's quantized `TritonExperts.apply` (fused_moe.py)."""
        from moe_lit.kernels.quant_experts import TritonQuantExperts
        if not self.weights_checked: _check_fits_prepared(prepared, w13)
        if self.trusted:
            if not self.weights_checked: _check_trusted_weights(prepared.a, w13, w2)
            return TritonQuantExperts()._apply(prepared.a, w13, prepared.topk_weights, prepared.local_ids,
                                               prepared.apply_router_weight_on_input, expected_m=prepared.expected_m,
                                               w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
                                               num_experts=prepared.num_experts, active_experts=prepared.active_experts,
                                               addend=shared, join=join, a_scale=prepared.a_scale,
                                               out_dtype=prepared.out_dtype)
        if join is not None: join()
        out = TritonQuantExperts().apply(prepared.a, w13, prepared.topk_weights, prepared.local_ids,
                                         prepared.apply_router_weight_on_input, expected_m=prepared.expected_m,
                                         num_experts=prepared.num_experts, active_experts=prepared.active_experts,
                                         validate=False,     # ids from the placement
                                         w13_bias=w13_bias, w2_bias=w2_bias, activation=activation, addend=shared,
                                         a_scale=prepared.a_scale, out_dtype=prepared.out_dtype)
        return out

class BatchedTritonQuantExpertsAdapter(TorchBatchedExperts):
    """Batched-format experts on quantized weights (`09d_kernels.quant_experts.BatchedTritonQuantExperts`): `w13` is the
    QuantizedExpertWeights. Construction raises nothing; `apply` checks. Source: moe-lit's adapter; vLLM's counterpart
    is `BatchedTritonExperts` with a quantized config (experts/fused_batched_moe.py)."""
    trusted = weights_checked = False     # as TritonExpertsAdapter's
    takes_quantized_input = True          # FP8 slabs with their scales (a prepare that quantizes before dispatch)
    def apply(self, prepared, w13, w2=None, w13_bias=None, w2_bias=None, activation: Activation = SILU):
        """`[E_local, max_tokens, H]` in the caller's dtype. ValueError naming `w13` (not the slabs' experts; not a
        QuantizedExpertWeights: named `qw`), `quant_block`, and `BatchedTritonQuantExperts.apply`'s own; trusted, only
        the weights' metadata. Source: vLLM's quantized `BatchedTritonExperts.apply` (experts/fused_batched_moe.py)."""
        from moe_lit.kernels.quant_experts import BatchedTritonQuantExperts
        a, quantized = prepared.a, prepared.a_scale is not None
        if not self.weights_checked: _check_fits_prepared(prepared, w13)
        if self.trusted and (a.dtype in (torch.bfloat16, torch.float16) or quantized):   # the layer's own slabs
            if not self.weights_checked: _check_trusted_weights(a, w13, w2)
            return BatchedTritonQuantExperts()._apply(a, prepared.expert_num_tokens, w13, prepared.expected_m,
                                                      w13_bias, w2_bias, activation, prepared.active_experts,
                                                      prepared.max_active_experts, prepared.a_scale, prepared.out_dtype)
        return BatchedTritonQuantExperts().apply(a, prepared.expert_num_tokens, w13, expected_m=prepared.expected_m,
                                                 active_experts=prepared.active_experts,
                                                 max_active_experts=prepared.max_active_experts, w13_bias=w13_bias, w2_bias=w2_bias, activation=activation,
                                                 a_scale=prepared.a_scale, out_dtype=prepared.out_dtype,
                                                 validate=False)   # counts from the dispatch: clamped

EXPERTS = {("torch", ActivationFormat.Standard): TorchStandardExperts,
           ("torch", ActivationFormat.BatchedExperts): TorchBatchedExperts,
           ("triton", ActivationFormat.Standard): TritonExpertsAdapter,
           ("triton", ActivationFormat.BatchedExperts): BatchedTritonExpertsAdapter,
           ("triton_quant", ActivationFormat.Standard): TritonQuantExpertsAdapter,
           ("triton_quant", ActivationFormat.BatchedExperts): BatchedTritonQuantExpertsAdapter}

# %% [markdown]
# ## Shared experts
#
# A shared expert is an always-on gated MLP applied to every token. It is added **once**, to the final output, on the
# original input and on the unpadded hidden size: never scaled by `routed_scaling_factor` (that factor belongs to the
# routed weights — sglang#28237 scaled the shared expert by its inverse on one path), and never reduced a second time
# (vLLM #49378 reduced Aria's twice under TP).

# %%
#| export
class SharedExperts(torch.nn.Module):
    """The always-on experts as one gated SiLU MLP `w13 [2·I_s, H]` (gate then up), `w2 [H, I_s]`; optionally gated per
    token. ValueError at construction naming `w13` (not 2-D float, odd or zero rows, zero columns), `w2` or `gate`
    (shape, dtype, another device). Source: DeepSeekMoE's shared experts (arXiv:2401.06066); the sigmoid gate is
    Qwen2-MoE's `shared_expert_gate` (transformers' `Qwen2MoeSparseMoeBlock`)."""
    def __init__(self, w13: torch.Tensor, w2: torch.Tensor,
                 gate: torch.Tensor | None = None):   # [1, H]: output scaled by sigmoid(x · gateᵀ) (Qwen2-MoE)
        super().__init__()
        check_tensor("w13", w13, ndim=2, dtype=FLOAT_DTYPES)
        if w13.shape[0] == 0 or w13.shape[0] % 2:
            raise ValueError(f"w13: expected a positive even number of rows (gate then up), got {w13.shape[0]}")
        if w13.shape[1] == 0: raise ValueError("w13: expected at least one column (hidden_size >= 1), got 0")
        check_tensor("w2", w2, shape=(w13.shape[1], w13.shape[0] // 2), dtype=w13.dtype)
        if gate is not None: check_tensor("gate", gate, shape=(1, w13.shape[1]), dtype=w13.dtype)
        for n, t in (("w2", w2), ("gate", gate)):
            if t is not None and t.device != w13.device: raise ValueError(f"{n}: expected w13's device {w13.device}, got {t.device}")
        self.w13, self.w2 = torch.nn.Parameter(w13, requires_grad=False), torch.nn.Parameter(w2, requires_grad=False)
        self.gate = None if gate is None else torch.nn.Parameter(gate, requires_grad=False)

    def forward(self, hidden: torch.Tensor,      # [T, H] float, on the weights' device
                use_triton: bool = False,   # ungated, in the weights' dtype: moe-lit's grouped GEMM (08), two launches
               ) -> torch.Tensor:
        """`[T, H]` in hidden's dtype; computed like a routed expert (fp32 products, one cast), then gated. ValueError
        naming `hidden` or `use_triton` for a shape, dtype or device mismatch. Source: DeepSeekMoE (arXiv:2401.06066)."""
        check_tensor("hidden", hidden, shape=(None, self.w13.shape[1]), dtype=FLOAT_DTYPES)
        check_bool("use_triton", use_triton)
        if hidden.device != self.w13.device:       # (torch would read a meta weight as uninitialised memory)
            raise ValueError(f"hidden: expected a tensor on the shared experts' device {self.w13.device}, got {hidden.device}")
        if use_triton and self._on_triton(hidden):   # a device the kernels run on (a GPU, or the interpreter)
            from moe_lit.kernels.batched import check_kernel_device
            check_kernel_device("hidden", hidden, w13=self.w13, w2=self.w2)
        return self._run(hidden, use_triton)

    def _on_triton(self, hidden) -> bool:
        "Whether `use_triton` takes the kernels: ungated, in the weights' dtype, not fp64, and no gradient wanted."
        return (self.gate is None and hidden.dtype == self.w13.dtype and hidden.dtype != torch.float64
                and gradient_wanted((("hidden", hidden), ("w13", self.w13), ("w2", self.w2))) is None)   # (the kernels
                                                                                    # keep no autograd graph)

    def _run(self, hidden, use_triton=False) -> torch.Tensor:
        "`forward` after its checks (an owning ModularKernel's caller checked `hidden`)."
        if use_triton and self._on_triton(hidden):
            from moe_lit.kernels.contiguous import _shared_expert_mlp
            return _shared_expert_mlp(hidden, self.w13.contiguous(), self.w2.contiguous())
        h = SILU(matmul_acc(hidden, self.w13)).to(hidden.dtype)         # [T, I_s]: GEMM1 in fp32, cast once
        y = matmul_acc(h, self.w2)                                      # [T, H] accumulation dtype
        if self.gate is not None: y = y * torch.sigmoid(matmul_acc(hidden, self.gate))   # [T, 1]
        return y.to(hidden.dtype)

# %% [markdown]
# ## ModularKernel
#
# In a captured CUDA graph the shared experts do not wait for the routed ones: they depend on the tokens only, so
# they run on a side stream forked before dispatch and joined before the final sum (`overlap_shared`, on by default),
# and the graph's two branches become parallel nodes (replayed, DeepSeek-V3 EP8 at T = 1: 109.8 µs against 131.6 in
# line, `nbs/bench/overlap_ab_h200_efa90f1.log`). Eager forwards run them in line: at decode an eager forward is
# bound by the host, and the fork and join cost more host time than the overlap saves (H200, T = 1, in line against a
# side stream: DeepSeek-V3 nixl_ep 365 against 435 µs, allgather 494 against 584; `eager_vs_replay.py --ab overlap`,
# `nbs/bench/eager_vs_replay_overlap_h200_eae306d.log`). The side stream is made at the first eager forward, with the
# split-K arrival counters its launches will take (`06`'s `arrival_counters`, kept per stream): made inside the
# capture, fresh counters would be a fill recorded in the graph, at the head of the shared experts' branch — the
# longer branch at decode for DeepSeek-V3. With a
# prepare/finalize on Triton (the layer's, unless its experts are torch's) an ungated shared expert runs through
# moe-lit's own grouped GEMM over one expert (`08_kernels.contiguous.shared_expert_mlp`): two launches, where torch
# took six or seven (the fp32-result GEMM, the activation's split, SiLU, product and cast, the second GEMM and its
# cast). Otherwise — torch experts, fp64, a gated shared expert (Qwen2-MoE) — its GEMMs are cuBLAS calls with an fp32
# result (`matmul_acc`), never an upcast copy of the weights.
#
# A ModularKernel built by `FusedMoE` is **owned** (`owned=True`): the layer checked `hidden` and a caller's `topk` on
# each call, made the ids with its own router, and checks its weights where they change (at load, and when one is
# swapped or edited in place). Its prepare, experts and finalize then run their unchecked twins (`_prepare`,
# `_finalize`, the experts without `_check_trusted_weights`). With the rest of that change, the layer's own Python per
# forward on the 2-core CPU of `host_overhead_cpu.py` went from 98–236 to 84–219 µs over the benchmark's deployments
# (Qwen3 100 → 84 µs, Qwen3 EP2 141 → 125; `nbs/bench/host_overhead_cpu_5502af9.log`, both in the same hour). A
# ModularKernel built by hand checks everything.

# %%
#| export
class ModularKernel:
    """A prepare/finalize and experts of the same activation format, plus optional shared experts. ValueError naming
    `prepare_finalize, experts` when either declares no activation format, `experts` when its format differs from the
    prepare/finalize's (the NIXL EP bug class: a batched dispatch must never meet Standard experts) or it cannot take
    the FP8 rows a quantizing dispatch sends, and `shared_experts` when it is not SharedExperts or None.
    Source: vLLM's `FusedMoEModularKernel` (fused_moe/modular_kernel.py)."""
    def __init__(self, prepare_finalize, experts, shared_experts: SharedExperts | None = None,
                 owned: bool = False):   # the caller (`FusedMoE`) checked the arguments of every call and owns the weights
        pf_fmt, ex_fmt = getattr(prepare_finalize, "activation_format", None), getattr(experts, "activation_format", None)
        if not isinstance(pf_fmt, ActivationFormat) or not isinstance(ex_fmt, ActivationFormat):
            raise ValueError(f"prepare_finalize, experts: expected objects declaring an activation_format, got "
                             f"{type(prepare_finalize).__name__} and {type(experts).__name__}")
        if pf_fmt is not ex_fmt:
            raise ValueError(f"experts: expected {pf_fmt.value} experts to pair with {type(prepare_finalize).__name__} "
                             f"({pf_fmt.value}), got {type(experts).__name__} ({ex_fmt.value})")
        if shared_experts is not None and not isinstance(shared_experts, SharedExperts):
            raise ValueError(f"shared_experts: expected a SharedExperts or None, got {type(shared_experts).__name__}")
        if getattr(prepare_finalize, "quant_block", None) and not getattr(experts, "takes_quantized_input", False):
            raise ValueError(f"experts: expected experts that take FP8 rows with their scales (the Triton quantized experts) "
                             f"beside a prepare that quantizes before dispatch (quant_block={prepare_finalize.quant_block}), "
                             f"got {type(experts).__name__}")
        self.prepare_finalize, self.experts, self.shared_experts = prepare_finalize, experts, shared_experts
        self.overlap_shared = True     # in a CUDA graph, the shared experts on a side stream beside the routed ones
        self._shared_triton = getattr(prepare_finalize, "use_triton", False)   # the shared experts on Triton too
        self._shared = None if shared_experts is None else shared_experts._run if owned else shared_experts.forward
        # owned: prepare, experts and finalize skip their per-call metadata checks where they have an unchecked twin
        self.owned = check_bool("owned", owned)
        if owned and getattr(experts, "trusted", False): experts.weights_checked = True
        own = owned and hasattr(prepare_finalize, "_prepare") and hasattr(prepare_finalize, "_finalize")
        self._prepare = prepare_finalize._prepare if own else None
        self._finalize = prepare_finalize._finalize if own else prepare_finalize.finalize

    def __getstate__(self) -> dict:
        "A copy or a pickle (a layer's `torch.save`, `deepcopy`) leaves the side stream behind: the copy makes its own."
        state = self.__dict__.copy()
        state.pop("_side_stream", None)                 # a stream belongs to this process, and cannot be pickled
        return state

    def _make_side_stream(self, device: torch.device):
        "The shared experts' stream in a captured graph, made outside the capture with its split-K counters (kept)."
        from moe_lit.kernels.batched import arrival_counters, COUNTERS_MIN   # (Triton: imported once a GPU runs)
        side = self._side_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(side): arrival_counters(COUNTERS_MIN, device)   # zeros, on that stream, before any use

    def forward(self, hidden, w13, w2, topk_weights, topk_ids, placement, apply_router_weight_on_input=False,
                add_shared: bool = True, timings: dict | None = None, w13_bias=None, w2_bias=None,
                activation: Activation = SILU) -> torch.Tensor:
        """Routed experts of this rank (prepare -> experts -> finalize), plus the shared experts once when `add_shared`:
        `[T, H]` in hidden's dtype. `hidden [T, H]`, `w13 [E_local, 2·I, H]` and `w2 [E_local, H, I]` (or their
        QuantizedExpertWeights), `topk_weights [T, top_k]` fp32, `topk_ids [T, top_k]` int32/int64 global ids,
        `placement` this rank's Placement; `timings` (a dict) gets each stage's seconds, synchronized. Unless `owned`:
        ValueError naming `hidden`, `add_shared` or `w13` (not the placement's local expert count), and the
        prepare/finalize's and experts' own errors. Source: vLLM's `FusedMoEModularKernel.forward`
        (fused_moe/modular_kernel.py: prepare, experts, finalize; shared experts as in its older version)."""
        if not self.owned:
            check_bool("add_shared", add_shared)
            if not isinstance(hidden, torch.Tensor): raise ValueError(f"hidden: expected a torch.Tensor, got {type(hidden).__name__}")
            held = w13.num_experts if isinstance(w13, QuantizedExpertWeights) else \
                w13.shape[0] if isinstance(w13, torch.Tensor) and w13.dim() else None
            local = getattr(placement, "num_local_experts", held)      # not a Placement: prepare names it
            if held != local:              # a Triton path would skip the ids past the weights: a silent partial sum
                raise ValueError(f"w13: expected the weights of placement.num_local_experts={local} experts, got {held}")
            if add_shared and self.shared_experts is not None:
                check_tensor("hidden", hidden, shape=(None, self.shared_experts.w13.shape[1]), dtype=FLOAT_DTYPES)
        clock = _Clock(timings, hidden.device)         # seconds of each stage, synchronized, when `timings` is a dict
        shared, side = None, None
        if add_shared and self.shared_experts is not None:
            if hidden.is_cuda and self.overlap_shared and timings is None and torch.cuda.is_current_stream_capturing():
                side = self._side_stream = getattr(self, "_side_stream", None) or torch.cuda.Stream(hidden.device)
                side.wait_stream(torch.cuda.current_stream(hidden.device))   # a graph's parallel branch, joined below
                with torch.cuda.stream(side): shared = self._shared(hidden, self._shared_triton)
            else:
                if hidden.is_cuda and self.overlap_shared and "_side_stream" not in self.__dict__:
                    self._make_side_stream(hidden.device)       # for a later capture
                shared = self._shared(hidden, self._shared_triton)
        prepared = self._prepare(hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input) if self._prepare \
            else self.prepare_finalize.prepare(hidden, topk_weights, topk_ids, placement, apply_router_weight_on_input)
        clock("prepare_s")
        join = lambda: side is not None and torch.cuda.current_stream(hidden.device).wait_stream(side)
        if shared is not None and getattr(self.experts, "adds_shared", False) \
                and getattr(self.prepare_finalize, "adds_shared", False):      # trusted Standard experts on Triton:
            expert_out = self.experts.apply(prepared, w13, w2, w13_bias, w2_bias, activation, shared=shared, join=join)
            clock("experts_s")                                                  # the shared output in their combine
            out = self._finalize(expert_out, prepared)
            clock("finalize_s")
            return out
        expert_out = self.experts.apply(prepared, w13, w2, w13_bias, w2_bias, activation)
        clock("experts_s")
        if shared is not None and getattr(self.prepare_finalize, "adds_shared", False):
            join()                                                              # the shared output is added in
            out = self._finalize(expert_out, prepared, shared)                  # finalize's own sum
        else:
            out = self._finalize(expert_out, prepared)                          # (a transport's finalize overlaps
            join()                                                              # the shared experts)
            if shared is not None: out = out + shared
        clock("finalize_s")
        return out

    __call__ = forward

# %%
#| export
class _Clock:
    "Records the seconds since the last call under a name in `timings` (after a device sync); a no-op when None."
    def __init__(self, timings, device):
        if timings is not None and not isinstance(timings, dict): raise ValueError(f"timings: expected a dict or None, got {type(timings).__name__}")
        self.timings, self.cuda = timings, torch.device(device).type == "cuda"
        self.t = self._now() if timings is not None else 0.0
    def _now(self):
        import time
        if self.cuda: torch.cuda.synchronize()
        return time.perf_counter()
    def __call__(self, name: str):
        if self.timings is None: return
        t = self._now(); self.timings[name] = self.timings.get(name, 0.0) + t - self.t; self.t = t

# %% [markdown]
# ## Building the parts from the descriptor

# %%
#| export
def dispatch_quantization(config: MoEConfig,     # the deployment: its backend record and format
                          experts: str = "torch",  # the experts implementation ('torch', 'triton', 'triton_quant')
                          qweights=None,           # the experts' QuantizedExpertWeights, or None (unquantized)
                          across_processes: bool = False,   # the transport of `13a_transport`, not this process's
                         ) -> tuple:               # (block, reason): (1, group) or None, and one line saying why
    """Whether this deployment's prepare quantizes the activations to FP8 before dispatch — `block`, the scale group
    `(1, 128)`, or None — and why. Read from the backend record (`quantizes_before_dispatch`, `dispatch_quant_block`,
    the activation format) and the experts: only FP8 block experts (1×g activation groups, g the record's) take FP8
    slabs as they are, and only the batched format moves rows in this process. Then GEMM1 launches no quantizer: the
    dispatch quantizes each row it sends (after the router weight, when that is applied on the input) and the slabs
    hold FP8 and its scales — half the bytes. With `across_processes` the question is the transport of
    `13a_transport` (real ranks): the same rules, except that a group of one sends nothing, and the Standard format
    moves rows too (its all-gather sends each token's FP8 row and scales once, as DeepEP high-throughput's dispatch
    does). ValueError naming `config`, `experts`, `qweights` or
    `across_processes` for a wrong type or value. Source: vLLM's DeepEP low-latency and NIXL EP
    prepare/finalize (vllm-project/vllm `deepep_ll_prepare_finalize.py`), which send block-FP8 activations when the
    experts' quant config asks for 128-wide groups; DeepEP's `low_latency_dispatch(..., use_fp8=True)`."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    check_choice("experts", experts, ("torch", "triton", "triton_quant")); check_bool("across_processes", across_processes)
    if qweights is not None and not isinstance(qweights, QuantizedExpertWeights):
        raise ValueError(f"qweights: expected a QuantizedExpertWeights or None, got {type(qweights).__name__}")
    b = config.backend
    if not b.quantizes_before_dispatch:
        return None, f"backend {b.name!r} sends activations as they are (its record: quantizes_before_dispatch=False)"
    if across_processes and config.ep_size == 1:
        return None, f"one rank: nothing travels between ranks (backend {b.name!r} would send FP8)"
    if across_processes and not config.use_all2all_kernels:   # TP+EP with one DP rank: the record is not in use
        return None, (f"backend {b.name!r} is requested but not used on this deployment (no all2all kernels), so its "
                      f"record does not apply: rows travel as they are")
    if config.activation_format is not ActivationFormat.BatchedExperts and not across_processes:
        return None, (f"backend {b.name!r} sends FP8 between ranks, but its {config.activation_format.value}-format "
                      f"prepare copies no rows in this process: the experts quantize their own input")
    if qweights is None:
        return None, "the weights are unquantized: rows travel in the model's dtype"
    if config.dtype not in (torch.bfloat16, torch.float16):
        return None, f"the model's dtype is {config.dtype}: FP8 rows are quantized from 16-bit rows, so rows travel as they are"
    if experts != "triton_quant":
        return None, (f"the {experts!r} experts compute on the {qweights.scheme} weights dequantized, in the model's "
                      f"dtype: rows travel in it (the Triton quantized experts take FP8 from the wire)")
    gran, blk = ACTIVATION_GRANULARITY.get(qweights.scheme), tuple(b.dispatch_quant_block)
    if gran != "group":
        return None, (f"the experts' scheme {qweights.scheme} takes " + ("16-bit activations" if gran is None else
                      f"FP8 activations scaled per {gran}") + f", not the wire's {blk} groups: rows travel unquantized")
    if (1, qweights.block_shape[1]) != blk:
        return None, (f"the experts' activation groups (1, {qweights.block_shape[1]}) differ from the wire's {blk}: "
                      f"rows travel unquantized")
    return blk, (f"backend {b.name!r} quantizes before dispatch in {blk} groups (its record), which the "
                 f"{qweights.scheme} experts take as they are: rows travel as FP8 with their scales" + (
                     "" if config.activation_format is ActivationFormat.BatchedExperts else
                     f" (the {config.activation_format.value} format's all-gather: each token's row once to every rank)")
                 + ", GEMM1 quantizes nothing")

def make_prepare_finalize(config: MoEConfig, num_tokens: int, use_triton: bool = False, validate: bool = True,
                          quant_block: tuple | None = None):   # from `dispatch_quantization` (batched format only)
    """The prepare/finalize of `config`'s deployment, from its backend record (format and topk id dtype), sized for
    `num_tokens` in all (the batched format: ceil(num_tokens / ep_size) a rank). ValueError naming `config`,
    `num_tokens` (< 0, or past `max_num_tokens` a rank) or `quant_block` (given for the Standard format). Source: vLLM's
    `maybe_make_prepare_finalize` and its prepare/finalize classes (fused_moe/prepare_finalize/)."""
    if not isinstance(config, MoEConfig): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
    check_int("num_tokens", num_tokens, lo=0)
    if config.activation_format is ActivationFormat.BatchedExperts:
        per_rank = -(-num_tokens // config.ep_size)
        if per_rank > config.max_num_tokens:
            raise ValueError(f"num_tokens: expected at most max_num_tokens={config.max_num_tokens} per rank "
                             f"({config.max_num_tokens * config.ep_size} in all), got {per_rank} per rank")
        return BatchedPrepareFinalize(max(per_rank, 1), config.ep_size, use_triton, config.topk_indices_dtype,
                                      config.padded_hidden_size, validate, quant_block)
    if quant_block is not None:
        raise ValueError(f"quant_block: expected None for the {config.activation_format.value} format (no rows move "
                         f"in this process), got {quant_block}")
    return StandardPrepareFinalize(config.topk_indices_dtype, validate, use_triton)

def make_experts(prepare_finalize, implementation: str = "torch",
                 trusted: bool = False):   # weights checked once by the caller (`FusedMoE`): unchecked launches
    """Experts chosen by the prepare/finalize's format — the one source of truth — in `implementation` 'torch', 'triton'
    or 'triton_quant'. ValueError naming `implementation`, `prepare_finalize` (no activation format) or `trusted`.
    Source: the format check vLLM #40412 added for NIXL EP, made the only way to choose."""
    check_choice("implementation", implementation, ("torch", "triton", "triton_quant"))
    fmt = getattr(prepare_finalize, "activation_format", None)
    if not isinstance(fmt, ActivationFormat):
        raise ValueError(f"prepare_finalize: expected a prepare/finalize declaring an activation_format, got "
                         f"{type(prepare_finalize).__name__}")
    experts = EXPERTS[(implementation, fmt)]()
    if check_bool("trusted", trusted) and hasattr(experts, "trusted"): experts.trusted = True
    return experts

# %% [markdown]
# ## Tests
#
# Every backend × every experts class: exactly the format-compatible pairs compose; the others raise the clear
# error. The prepare/finalize is built from the backend record, so NIXL EP and DeepEP low-latency can only take
# batched experts.

# %%
#| test composition_walk
for name, d in BACKENDS.items():
    cfg = MoEConfig(8, 2, 16, 8, parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=name))
    pf = make_prepare_finalize(cfg, 4)
    test_eq(pf.activation_format, cfg.activation_format)
    for (impl, fmt), cls in EXPERTS.items():
        if fmt is pf.activation_format: ModularKernel(pf, cls())
        else: test_fail(lambda: ModularKernel(pf, cls()), contains=f"got {cls.__name__} ({fmt.value})")
    test_eq(make_experts(pf).activation_format, pf.activation_format)
test_fail(lambda: ModularKernel(StandardPrepareFinalize(), TorchBatchedExperts()),
          contains="expected standard experts to pair with StandardPrepareFinalize (standard), got TorchBatchedExperts (batched_experts)")
test_fail(lambda: ModularKernel(object(), TorchStandardExperts()), contains="expected objects declaring an activation_format")
test_fail(lambda: make_experts(object(), "torch"), contains="prepare_finalize: expected a prepare/finalize declaring an activation_format, got object")
mk0 = ModularKernel(StandardPrepareFinalize(), TorchStandardExperts())
h0, w0, ids0 = torch.randn(2, 4), torch.rand(2, 1), torch.zeros(2, 1, dtype=torch.int32)
test_fail(lambda: mk0(h0, torch.zeros(1, 2, 4), torch.zeros(1, 4, 1), w0, ids0, None), contains="placement: expected a Placement")
test_fail(lambda: mk0(h0[0], torch.zeros(1, 2, 4), torch.zeros(1, 4, 1), w0, ids0, None), contains="hidden: expected a 2-D tensor")
test_fail(lambda: mk0(None, torch.zeros(1, 2, 4), torch.zeros(1, 4, 1), w0, ids0, None), contains="hidden: expected a torch.Tensor, got NoneType")
test_fail(lambda: StandardPrepareFinalize(topk_indices_dtype="junk"), contains="topk_indices_dtype: expected one of")
test_fail(lambda: BatchedPrepareFinalize(8, 1, topk_indices_dtype=torch.int16), contains="topk_indices_dtype: expected one of")
test_fail(lambda: SharedExperts(torch.randn(17, 16), torch.randn(16, 8)), contains="w13: expected a positive even number")

# %%
#| test shared_experts_gate
torch.manual_seed(2)
H, I = 16, 8
w13, w2, gate = torch.randn(2 * I, H, dtype=torch.float64), torch.randn(H, I, dtype=torch.float64), torch.randn(1, H, dtype=torch.float64)
x = torch.randn(5, H, dtype=torch.float64)
g, u = (x @ w13.T).chunk(2, dim=-1)
want = torch.sigmoid(x @ gate.T) * ((torch.nn.functional.silu(g) * u) @ w2.T)      # Qwen2MoeSparseMoeBlock's definition
assert_close(SharedExperts(w13, w2, gate)(x), want)
assert not torch.allclose(SharedExperts(w13, w2)(x), want)                           # the gate matters
test_fail(lambda: SharedExperts(w13, w2, gate[:, :5]), contains="gate: expected shape [1, 16]")
test_fail(lambda: SharedExperts(w13, w2.to("meta")), contains="w2: expected w13's device cpu, got meta")
test_fail(lambda: SharedExperts(w13.to("meta"), w2.to("meta"))(x), contains="hidden: expected a tensor on the shared experts' device meta, got cpu")
se = SharedExperts(w13.float(), w2.float())                     # each call's hidden, named (either path)
for bad, msg in ((x[:, :-1].float(), "hidden: expected shape [*, 16], got [5, 15]"), (x[0].float(), "hidden: expected a 2-D tensor"),
                 (x.long(), "hidden: expected dtype"), (x.tolist(), "hidden: expected a torch.Tensor")):
    for tri in (False, True): test_fail(lambda: se(bad, use_triton=tri), contains=msg)
test_fail(lambda: se(x.float(), use_triton="yes"), contains="use_triton: expected a bool")
se.w13.requires_grad_(True)                                    # a weight that wants a gradient: torch's path
assert se(x.float(), use_triton=True).requires_grad
se.w13.requires_grad_(False)
sem = SharedExperts(w13.float().to("meta"), w2.float().to("meta"))
test_fail(lambda: sem(x.float().to("meta"), use_triton=True), contains="hidden: expected")
test_fail(lambda: SharedExperts(torch.randn(4, 0), torch.randn(0, 2)), contains="w13: expected at least one column")

# %% [markdown]
# Both formats, torch and Triton (the interpreter on a CPU), compute the same layer — checked against the float64
# reference, with a shared expert, weights applied on the input for `top_k > 1`, and a rank of a round-robin
# deployment.

# %%
#| test modular_kernels_agree
g = torch.Generator().manual_seed(0)
E, H, I, T, k = 8, 32, 16, 9, 3
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
sh = SharedExperts(torch.randn(2 * I, H, generator=g) / H**0.5, torch.randn(H, I, generator=g) / I**0.5)
hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).long()
for name in ("none", "nixl_ep"):
    for on_in in (False, True):
        for rank in range(2):
            cfg = MoEConfig(E, k, H, I, dtype=torch.float32, routing_method="grouped_topk", num_expert_group=2, topk_group=1,
                            parallel=ParallelConfig.make(1, 2, dp_rank=rank, enable_expert_parallel=True, all2all_backend=name))
            p = Placement.build(cfg, "round_robin")
            want = moe_reference_standard(hidden.double(), w13[p.local_to_global].double(), w2[p.local_to_global].double(),
                                          wts, p.local_slot(ids), apply_router_weight_on_input=on_in)
            pad = cfg.padded_hidden_size - H                           # NIXL EP sends 2048 columns: zero-pad weights
            w13_r = torch.nn.functional.pad(w13[p.local_to_global], (0, pad))
            w2_r = torch.nn.functional.pad(w2[p.local_to_global], (0, 0, 0, pad))
            for impl in ("torch", "triton"):
                pf = make_prepare_finalize(cfg, T, use_triton=impl == "triton")
                mk = ModularKernel(pf, make_experts(pf, impl), sh)
                dev = lambda t: t.to(DEVICE) if impl == "triton" else t
                got = mk(dev(hidden), dev(w13_r), dev(w2_r), dev(wts), dev(ids), p, on_in, add_shared=False)
                assert_close(got.cpu(), want, name=f"{name} {impl} rank {rank} on_input={on_in}")
                if impl == "triton":                                   # trusted experts (the layer's): same launches,
                    mk_t = ModularKernel(pf, make_experts(pf, impl, trusted=True), sh)   # no per-call checks
                    assert mk_t.experts.trusted and not mk.experts.trusted
                    got_t = mk_t(dev(hidden), dev(w13_r), dev(w2_r), dev(wts), dev(ids), p, on_in, add_shared=False)
                    test_eq(torch.equal(got_t, got), True)
                    for bad13, bad2, msg in ((w13_r[:, :-1], w2_r, "w13: expected a positive even number of rows"),
                                             (w13_r[..., :-8], w2_r, "w13: expected shape"),
                                             (w13_r, w2_r[..., :-2], "w2: expected shape"),
                                             (w13_r, w2_r.double(), "w2: expected dtype"), (w13_r, None, "w2: expected a torch.Tensor")):
                        test_fail(lambda: mk_t(dev(hidden), dev(bad13), bad2 if bad2 is None else dev(bad2), dev(wts),
                                               dev(ids), p, on_in, add_shared=False), contains=msg)
# the shared expert is added once, on the original input, whatever the routed path did
pf = StandardPrepareFinalize(); mk = ModularKernel(pf, TorchStandardExperts(), sh)
p1 = Placement.build(MoEConfig(E, k, H, I, dtype=torch.float32))
x = hidden.clone()
out = mk(x, w13, w2, wts, ids, p1)
assert torch.equal(x, hidden)                                                   # prepare did not modify the input
assert_close(out, moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, ids)
             + expert_mlp(hidden.double(), sh.w13.double(), sh.w2.double()))
test_fail(lambda: mk(x[:, :-1], w13, w2, wts, ids, p1), contains="hidden: expected shape [*, 32], got [9, 31]")
# a copy or a pickle leaves the side stream (made at a GPU's first forward) behind; the original keeps its own
mk._side_stream = torch.Stream(device="cpu")                                    # a stream cannot be pickled
for c in (copy.deepcopy(mk), pickle.loads(pickle.dumps(mk))):
    assert "_side_stream" not in c.__dict__ and torch.equal(c(x, w13, w2, wts, ids, p1), out)
assert mk._side_stream is not None
# weights of fewer experts than the placement holds are refused: the Triton experts would skip those pairs silently
for impl in ("torch", "triton"):
    pf = make_prepare_finalize(MoEConfig(E, k, H, I, dtype=torch.float32), T, use_triton=impl == "triton")
    mk, dev = ModularKernel(pf, make_experts(pf, impl)), (lambda t: t.to(DEVICE)) if impl == "triton" else (lambda t: t)
    test_fail(lambda: mk(dev(hidden), dev(w13[:E - 1]), dev(w2[:E - 1]), dev(wts), dev(ids), p1),
              contains=f"w13: expected the weights of placement.num_local_experts={E} experts, got {E - 1}")
# experts (a caller's own class) whose output does not have the slabs' shape are refused at finalize
class _CroppedExperts(TorchBatchedExperts):
    def apply(self, prepared, *args, **kwargs): return prepared.a[..., :-3].clone()
cfg_b = MoEConfig(E, k, H, I, dtype=torch.float32,
                  parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
p_b, pf_b = Placement.build(cfg_b, "round_robin"), make_prepare_finalize(cfg_b, T)
test_fail(lambda: ModularKernel(pf_b, _CroppedExperts())(hidden, w13[:E // 2], w2[:E // 2], wts, ids, p_b),
          contains="expert_out: expected shape")
class _HalfExperts(TorchStandardExperts):                                    # a caller's experts in another dtype
    def apply(self, prepared, *args, **kwargs): return super().apply(prepared, *args, **kwargs).half()
test_fail(lambda: ModularKernel(StandardPrepareFinalize(), _HalfExperts())(hidden, w13, w2, wts, ids, p1),
          contains="expert_out: expected dtype torch.float32, got torch.float16")

# %% [markdown]
# Trusted Standard experts on Triton add the shared experts' output in their own combine: the last launch is the
# combine with `ADD`, there is no separate add, and the sum is the reference's; with no tokens the output is the
# (empty) shared output. Experts that are not trusted refuse a `shared` argument.

# %%
#| test standard_experts_add_the_shared_output
g = torch.Generator().manual_seed(7)
E, H, I, T, k = 8, 32, 16, 5, 2
w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
sh = SharedExperts((torch.randn(2 * I, H, generator=g) / H**0.5).to(DEVICE), (torch.randn(H, I, generator=g) / I**0.5).to(DEVICE))
hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).long()
cfg = MoEConfig(E, k, H, I, dtype=torch.float32)
p = Placement.build(cfg)
pf = make_prepare_finalize(cfg, T, use_triton=True, validate=False)
mk = ModularKernel(pf, make_experts(pf, "triton", trusted=True), sh, owned=True)
assert mk.experts.adds_shared and make_experts(pf, "triton").adds_shared   # checked or not: the same arithmetic
args = [t.to(DEVICE) for t in (hidden, w13, w2, wts, ids)]
with record_launches() as seen: got = mk(*args, p)
want = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, ids) + \
    expert_mlp(hidden.double(), sh.w13.double().cpu(), sh.w2.double().cpu())
assert_close(got.cpu(), want)
kern, _, kw = seen[-1]
test_eq((kern.fn.__name__, kw["ADD"], kw["PAIRS"]), ("_batched_combine_kernel", True, True))
test_eq(mk(args[0][:0], *args[1:3], args[3][:0], args[4][:0], p).shape, (0, H))
prepared = pf.prepare(args[0], args[3], args[4], p)
shared_out = sh(args[0])                      # checked experts add it in the same fp32 sum: bit-equal to the owned path
assert torch.equal(make_experts(pf, "triton").apply(prepared, args[1], args[2], shared=shared_out),
                   make_experts(pf, "triton", trusted=True).apply(prepared, args[1], args[2], shared=shared_out))
test_fail(lambda: make_experts(pf, "triton").apply(prepared, args[1], args[2], shared=shared_out[:, :8]),
          contains=f"addend: expected shape [{T}, {H}]")

# %% [markdown]
# The padding never shows: a gpt-oss-sized hidden (2880) over NIXL EP is dispatched as 3072 columns and comes back
# as 2880, equal to the unpadded computation.

# %%
#| test padded_hidden_never_leaks
g = torch.Generator().manual_seed(5)
E, H, I, T, k = 4, 2880, 8, 3, 2
cfg = MoEConfig(E, k, H, I, dtype=torch.float32, parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
test_eq(cfg.padded_hidden_size, 3072)
p = Placement.build(cfg)
w13, w2 = torch.randn(p.num_local_experts, 2 * I, H, generator=g) / H**0.5, torch.randn(p.num_local_experts, H, I, generator=g)
hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).long()
pf = make_prepare_finalize(cfg, T)
prepared = pf.prepare(hidden, wts, ids, p)
test_eq(prepared.a.shape[-1], 3072)                                          # the wire size
pad = 3072 - H
out = ModularKernel(pf, TorchBatchedExperts())(hidden, torch.nn.functional.pad(w13, (0, pad)),
                                               torch.nn.functional.pad(w2, (0, 0, 0, pad)), wts, ids, p)
test_eq(out.shape, (T, H))
assert_close(out, moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, p.local_slot(ids)))
# a finalize checks the Prepared it is handed (metadata only): kind, format, shapes, the unpadded width
y = torch.zeros_like(prepared.a)
std = StandardPrepareFinalize().prepare(hidden, wts, ids, p)
test_fail(lambda: pf.finalize(y, None), contains="prepared: expected the Prepared this prepare/finalize's prepare returned, got NoneType")
test_fail(lambda: pf.finalize(y, dataclasses.replace(std, a=prepared.a)), contains="prepared: expected a batched_experts Prepared")
test_fail(lambda: StandardPrepareFinalize().finalize(hidden, prepared), contains="prepared: expected a standard Prepared")
test_fail(lambda: pf.finalize(y, dataclasses.replace(prepared, slot_map=torch.zeros(T, k + 3, dtype=torch.int64))),
          contains=f"prepared.slot_map: expected shape [{T}, {k}]")
test_fail(lambda: pf.finalize(y, dataclasses.replace(prepared, slot_map=None)), contains="prepared.slot_map: expected a torch.Tensor")
test_fail(lambda: pf.finalize(y, dataclasses.replace(prepared, hidden_size=4000)), contains="prepared.hidden_size: expected an int in [0, 3072]")
for use_triton in (False, True):                                             # fp64 on Triton's dispatch: refused
    bpf = BatchedPrepareFinalize(T, 1, use_triton=use_triton, validate=False)
    if use_triton: test_fail(lambda: bpf.prepare(hidden.double(), wts, ids, p), contains="hidden: expected torch.bfloat16")
    else: test_eq(bpf.prepare(hidden.double(), wts, ids, p).a.dtype, torch.float64)   # the torch reference takes it

# %% [markdown]
# On the layer's hot path (an owned ModularKernel, the router's own ids) the batched prepare launches no fill for its
# dispatch counts: it keeps one zeroed int32 buffer (the counts, then the overflow flag), the dispatch counts into it,
# and the finalize's combine — which runs after every GEMM that reads the counts — zeroes it again in its first
# program (`07_kernels.dispatch._batched_combine`'s `reset`). A forward that fails between the two leaves the buffer
# dirty; the next prepare sees that (a host flag, no sync) and zeroes it first. The test counts three forwards into
# the same buffer, then makes the experts fail once.

# %%
#| test batched_hot_path_keeps_its_counts
g = torch.Generator().manual_seed(6)
E, H, I, T, k = 8, 32, 16, 5, 3
cfg = MoEConfig(E, k, H, I, dtype=torch.float32,
                parallel=ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep"))
p = Placement.build(cfg, "round_robin").to(DEVICE)    # the tables on the kernels' device, as a layer holds them
pad = cfg.padded_hidden_size - H
w13 = torch.randn(p.num_local_experts, 2 * I, H, generator=g) / H**0.5
w2 = torch.randn(p.num_local_experts, H, I, generator=g) / I**0.5
w13_r = torch.nn.functional.pad(w13, (0, pad)).to(DEVICE)
w2_r = torch.nn.functional.pad(w2, (0, 0, 0, pad)).to(DEVICE)
pf = make_prepare_finalize(cfg, T, use_triton=True, validate=False)
mk = ModularKernel(pf, make_experts(pf, "triton", trusted=True), owned=True)
def forward_and_check(hidden, wts, ids, what):
    got = mk(hidden.to(DEVICE), w13_r, w2_r, wts.to(DEVICE), ids.to(DEVICE), p)
    want = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, p.local_slot(ids))
    assert_close(got.cpu(), want, name=what)
    test_eq(pf._counts.cpu().tolist(), [0] * (p.num_local_experts + 1)); assert not pf._counts_dirty
for i in range(3):                                 # each forward counts into the same kept zeros and leaves them zero
    hidden, wts = torch.randn(T, H, generator=g), torch.rand(T, k, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).long()
    forward_and_check(hidden, wts, ids, f"call {i}")
kept, apply = pf._counts, mk.experts.apply
def failing(*args, **kwargs): raise RuntimeError("the experts failed")
mk.experts.apply = failing                          # an error between dispatch and combine: the counts stay dirty
test_fail(lambda: mk(hidden.to(DEVICE), w13_r, w2_r, wts.to(DEVICE), ids.to(DEVICE), p), contains="the experts failed")
assert pf._counts_dirty and int(kept.sum()) > 0
mk.experts.apply = apply                            # the next forward zeroes them first
forward_and_check(hidden, wts, ids, "after a failed forward")
assert pf._counts is kept

# %% [markdown]
# ## FP8 before dispatch
#
# DeepEP low-latency and NIXL EP send FP8 when the experts want block-FP8 activations: their records say
# `quantizes_before_dispatch=True` with `dispatch_quant_block=(1, 128)` (`01_config`). `dispatch_quantization` reads
# the record and the experts and returns the block, or None, with the reason; the layer asks it once, at construction
# (`FusedMoE.dispatch_quant`, `dispatch_quant_reason`). When the answer is a block, the batched prepare's
# dispatch quantizes each row as it sends it, in the same launch (`07_kernels.dispatch`, with `09b`'s group math), and
# GEMM1 takes the slabs as they are. Before, GEMM1 quantized the slabs — `E_local × max_tokens` rows of which a few
# are valid at decode — in a launch of its own (`nbs/bench/ncu_fp8_h100_2345c90.txt` found it costing as much as a
# third of the GEMM before its tile was cut to 8 rows). The quantization is a function of one row's group, so the
# output is the same, bit for bit, on either side of the dispatch: the test compares the two, checked and owned, on
# a round-robin rank, with the router weight applied on the input too, then the decision on each record and the
# refusals.

# %%
#| test fp8_before_dispatch
g = torch.Generator().manual_seed(7)
E, H, I, T, k = 8, 256, 64, 7, 2
par = lambda b: ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=b)
cfg = MoEConfig(E, k, H, I, dtype=torch.bfloat16, parallel=par("nixl_ep"))
p = Placement.build(cfg, "round_robin").to(DEVICE)
Hp = cfg.padded_hidden_size                                          # NIXL EP sends 2048 columns: zero-padded weights
w13 = torch.nn.functional.pad(torch.randn(p.num_local_experts, 2 * I, H, generator=g) / H**0.5, (0, Hp - H))
w2 = torch.nn.functional.pad(torch.randn(p.num_local_experts, H, I, generator=g) / I**0.5, (0, 0, 0, Hp - H))
qw = quantize_expert_weights(w13.to(DEVICE, torch.bfloat16), w2.to(DEVICE, torch.bfloat16), "fp8_w8a8_block").for_kernels()
blk, why = dispatch_quantization(cfg, "triton_quant", qw)
test_eq(blk, (1, 128)); assert "rows travel as FP8 with their scales" in why, why
hidden = torch.randn(T, H, generator=g).to(DEVICE, torch.bfloat16)
wts, ids = torch.rand(T, k, generator=g).to(DEVICE), torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(DEVICE)
outs = {}
for qb in (None, blk):
    for owned in (False, True):
        pf = make_prepare_finalize(cfg, T, use_triton=True, validate=not owned, quant_block=qb)
        mk = ModularKernel(pf, make_experts(pf, "triton_quant", trusted=owned), owned=owned)
        outs[qb, owned] = mk(hidden, qw, None, wts, ids, p)
    prep = make_prepare_finalize(cfg, T, use_triton=True, quant_block=qb).prepare(hidden, wts, ids, p)
    test_eq(prep.a.dtype, torch.float8_e4m3fn if qb else torch.bfloat16)
    test_eq(None if prep.a_scale is None else tuple(prep.a_scale.shape), (p.num_local_experts, -(-T // 2) * 2, Hp // 128) if qb else None)   # slabs of ceil(T / 2) · 2 rows
for key, out in outs.items(): assert torch.equal(out, outs[None, False]), f"quant_block={key[0]} owned={key[1]}"
on_in = {qb: ModularKernel(pf := make_prepare_finalize(cfg, T, use_triton=True, quant_block=qb),   # the weight first
                           make_experts(pf, "triton_quant"))(hidden, qw, None, wts[:, :1], ids[:, :1], p, True)
         for qb in (None, blk)}
assert torch.equal(on_in[None], on_in[blk])
# the decision, on every record and kind of experts
one = lambda **kw: quantize_expert_weights(torch.randn(2, 128, 256), torch.randn(2, 256, 64), **kw)
for backend, experts, weights, want, says in (
        ("deepep_low_latency", "triton_quant", qw, (1, 128), "quantizes before dispatch in (1, 128) groups"),
        ("allgather_reducescatter", "triton_quant", qw, None, "sends activations as they are"),
        ("deepep_high_throughput", "triton_quant", qw, None, "copies no rows in this process"),
        ("nixl_ep", "triton", None, None, "the weights are unquantized"),
        ("nixl_ep", "torch", qw, None, "the 'torch' experts compute on the fp8_w8a8_block weights dequantized"),
        ("nixl_ep", "triton_quant", one(scheme="mxfp4_w4a16"), None, "takes 16-bit activations"),
        ("nixl_ep", "triton_quant", one(scheme="fp8_w8a8_channel"), None, "scaled per token"),
        ("nixl_ep", "triton_quant", one(scheme="fp8_w8a8_block", block_shape=(128, 64)), None, "(1, 64) differ from the wire's")):
    got = dispatch_quantization(cfg.replace(parallel=par(backend)), experts, weights)
    test_eq(got[0], want); assert says in got[1], (backend, got[1])
f32 = dispatch_quantization(cfg.replace(parallel=par("nixl_ep"), dtype=torch.float32), "triton_quant", qw)
assert f32[0] is None and "FP8 rows are quantized from 16-bit rows" in f32[1], f32
ht = dispatch_quantization(cfg.replace(parallel=par("deepep_high_throughput")), "triton_quant", qw, across_processes=True)
assert ht[0] == (1, 128) and "the standard format's all-gather: each token's row once to every rank" in ht[1], ht
one = dispatch_quantization(cfg.replace(parallel=ParallelConfig.make(1, 1, all2all_backend="nixl_ep")), "triton_quant", qw,
                            across_processes=True)                           # a group of one: nothing travels
assert one[0] is None and one[1].startswith("one rank: nothing travels"), one
tpep = dispatch_quantization(cfg.replace(parallel=ParallelConfig.make(2, 1, enable_expert_parallel=True,
                                                                     all2all_backend="nixl_ep")), "triton_quant", qw,
                             across_processes=True)                   # TP+EP, one DP rank: no all2all, whatever named
assert tpep[0] is None and "requested but not used on this deployment" in tpep[1], tpep
# refusals
pf = make_prepare_finalize(cfg, T, use_triton=True, quant_block=blk)
test_fail(lambda: ModularKernel(pf, make_experts(pf, "triton")), contains="experts: expected experts that take FP8 rows")
test_fail(lambda: pf.prepare(hidden.float(), wts, ids, p), contains="hidden: expected torch.bfloat16 or torch.float16 for the Triton")
test_fail(lambda: BatchedPrepareFinalize(4, 2, quant_block=blk), contains="quant_block: expected None without use_triton")
for bad in ((1, 100), (2, 128), [1, 128], (1, 16)):
    test_fail(lambda: BatchedPrepareFinalize(4, 2, True, quant_block=bad), contains="quant_block: expected None or (1, group)")
test_fail(lambda: make_prepare_finalize(MoEConfig(E, k, H, I), T, quant_block=blk), contains="quant_block: expected None for the standard format")
test_fail(lambda: dispatch_quantization(cfg, "cuda"), contains="experts: expected one of")
test_fail(lambda: dispatch_quantization(cfg, "triton_quant", "codes"), contains="qweights: expected a QuantizedExpertWeights")
test_fail(lambda: dispatch_quantization("nixl_ep"), contains="config: expected a MoEConfig")
for trusted in (False, True):                                       # adapters used directly, not owned: the
    prep = make_prepare_finalize(cfg, T, use_triton=True, quant_block=blk).prepare(hidden, wts, ids, p)   # weights
    few = quantize_expert_weights(w13[:2].to(DEVICE, torch.bfloat16), w2[:2].to(DEVICE, torch.bfloat16),   # must hold
                                  "fp8_w8a8_block").for_kernels()                                          # the slabs
    test_fail(lambda: make_experts(pf, "triton_quant", trusted=trusted).apply(prep, few),
              contains=f"w13: expected the weights of the prepared rows' {p.num_local_experts} local experts, got 2")
    wide = make_prepare_finalize(cfg, T, use_triton=True, quant_block=(1, 64)).prepare(hidden, wts, ids, p)
    test_fail(lambda: make_experts(pf, "triton_quant", trusted=trusted).apply(wide, qw),
              contains="quant_block: expected the prepare's FP8 groups to be the weights' activation groups (1, 128)")
    std = StandardPrepareFinalize(use_triton=True).prepare(hidden, wts, ids, p)
    for impl, w in (("triton", (w13[:2].to(DEVICE, torch.bfloat16), w2[:2].to(DEVICE, torch.bfloat16))), ("triton_quant", (few,))):
        test_fail(lambda: make_experts(StandardPrepareFinalize(), impl, trusted=trusted).apply(std, *w),
                  contains=f"w13: expected the weights of the prepared rows' {p.num_local_experts} local experts, got 2")
std = StandardPrepareFinalize().prepare(hidden.cpu(), wts.cpu(), ids.cpu(), p)          # the torch reference names
test_fail(lambda: TorchStandardExperts().apply(std, w13[:2].cpu(), w2[:2].cpu()),      # the weights too
          contains=f"w13: expected the weights of the prepared rows' {p.num_local_experts} local experts, got 2")

# %% [markdown]
# Each stage can be timed (the distributed runs report dispatch, experts and combine per rank): pass a dict as
# `timings`; the stages synchronize the device before each reading, so only ask for it when measuring.

# %%
#| test modular_stage_timings
cfg = MoEConfig(8, 2, 16, 8, dtype=torch.float32)
pf = make_prepare_finalize(cfg, 4)
mk = ModularKernel(pf, make_experts(pf))
g = torch.Generator().manual_seed(0)
hidden, w13, w2 = torch.randn(4, 16, generator=g), torch.randn(8, 16, 16, generator=g), torch.randn(8, 16, 8, generator=g)
ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(4)]).int()
t = {}
out = mk(hidden, w13, w2, torch.rand(4, 2, generator=g), ids, Placement.build(cfg), timings=t)
test_eq(set(t), {"prepare_s", "experts_s", "finalize_s"}); assert all(v >= 0 for v in t.values())
test_fail(lambda: mk(hidden, w13, w2, torch.rand(4, 2), ids, Placement.build(cfg), timings=[]), contains="timings: expected a dict")
