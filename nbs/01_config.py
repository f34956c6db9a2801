# %%
#| default_exp config

# %% [markdown]
# # Configuration
# > The backend descriptor table — every fact about an all2all backend declared once — and the parallel and MoE configs whose properties are one-line reads of it.

# %%
#| export
from __future__ import annotations
import dataclasses, enum
from dataclasses import dataclass, field
import torch
from fastcore.basics import patch
from moe_lit.terms import check_int, check_choice, check_bool, check_positive_real

# %%
#| hide
from fastcore.test import test_eq, test_fail

# %% [markdown]
# In this notebook: `ActivationFormat`, `BackendDescriptor` and the table `BACKENDS` (looked up with `get_backend`),
# `ParallelConfig` with `ParallelConfig.make` and its properties, `MoEConfig`, and `SIZE_LIMIT`, the bound on every
# size. An **explanation** page with the reference of each symbol.
#
# ## Why a table
#
# An all2all backend moves tokens between expert-parallel (EP) ranks. What the rest of the layer must do depends on a
# handful of facts about it: do tokens arrive as one flat list or grouped per local expert? Does it locate an
# expert's rank by a contiguous "physical" numbering, so round-robin placement needs translation tables? Does it
# quantize activations before sending them? What integer type does it want for expert ids?
#
# vLLM answers these questions with properties such as `use_deepep_ll_kernels`, and in several places asked "is this
# DeepEP low-latency?" where it meant "does this backend use the batched activation format?". When NIXL EP — a second
# batched backend — arrived, the places that asked the first question picked kernels of the wrong format (vLLM PR
# #40412). moe-lit declares each fact once per backend, in one frozen record, and derives every decision from the
# record. Adding a backend means adding one record.
#
# ## Activation formats

# %%
#| export
class ActivationFormat(enum.Enum):
    """How dispatched activations are laid out for the experts (mirrors vLLM's `FusedMoEActivationFormat`). Raises
    nothing of its own; `ActivationFormat(value)` with an unknown value raises the enum's ValueError."""
    Standard = "standard"                 # a1 [num_tokens, hidden_size]; ids travel beside it
    BatchedExperts = "batched_experts"    # a1 [num_local_experts, max_tokens, hidden_size] + expert_num_tokens

# %% [markdown]
# ## The backend descriptor table

# %%
#| export
@dataclass(frozen=True)
class BackendDescriptor:
    """Every fact moe-lit needs about one all2all backend; all backend-dependent decisions read these fields. Raises
    nothing: the fields are not checked (the records of `BACKENDS` are the module's constants, pinned by its tests).
    Source: moe-lit's own (DESIGN §4), the values from vLLM's prepare/finalize classes (see below)."""
    name: str                                  # the `all2all_backend` string, as vLLM spells it
    activation_format: ActivationFormat        # layout the experts receive
    moves_tokens: bool                         # True: tokens travel between ranks (an all2all); False: masking only
    needs_round_robin_routing_tables: bool     # dispatch locates ranks by contiguous physical ids
    quantizes_before_dispatch: bool            # activations may be quantized (FP8) before they are sent
    dispatch_quant_block: tuple | None         # block shape of that quantization, e.g. (1, 128)
    topk_id_dtype: torch.dtype                 # dtype of topk_ids the dispatch wants
    supported_hidden_sizes: tuple | None       # None = any; else the layer's hidden size is rounded up to one
    max_tokens_semantics: str                  # how the per-expert capacity of the batched format is sized
    summary: str                               # one line for reports
    native_library: str | None = None          # Python module of the library that implements it (None: moe-lit's own)

    def round_up_hidden_size(self, hidden_size: int) -> int:
        """Smallest supported hidden size >= `hidden_size` (elements of one token row). ValueError naming
        `hidden_size`: not an int >= 1 (`check_int`), or above the largest supported size. Source: vLLM's
        `maybe_roundup_layer_hidden_size` (DeepEP low-latency and NIXL EP sizes)."""
        check_int("hidden_size", hidden_size, lo=1)
        if self.supported_hidden_sizes is None: return hidden_size
        for h in sorted(self.supported_hidden_sizes):
            if h >= hidden_size: return h
        raise ValueError(f"hidden_size: expected <= {max(self.supported_hidden_sizes)} for all2all backend "
                         f"{self.name!r}, got {hidden_size}")

# %% [markdown]
# The values below come from vLLM's prepare/finalize implementations (vLLM's `vllm/model_executor/layers/fused_moe/` — `modular_kernel.py` and the `*_prepare_finalize.py` files):
# DeepEP low-latency and NIXL EP deliver `[E_local, max_tokens_per_rank · num_ranks, H]` slabs, locate an expert's
# rank by `physical_id // E_local`, quantize to FP8 in 128-element chunks before sending when the experts use
# 128×128 block FP8, want int64 expert ids, and accept only the hidden sizes listed. DeepEP high-throughput and the
# all-gather/reduce-scatter backend deliver flat token lists. `none` is the no-all2all case: a single device, or TP+EP
# with DP=1, where every rank sees every token and masks with `expert_map`.
#
# > Not verified against upstream and therefore conservative: whether `allgather_reducescatter` quantizes before
# > its all-gather (recorded as False) and the hidden-size limits of DeepEP high-throughput (recorded as none).

# %%
#| export
_LL_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)

_S, _B = ActivationFormat.Standard, ActivationFormat.BatchedExperts
_NO_SLABS = "not used (flat token lists)"
_LL_SLABS = "max_num_tokens_per_rank * num_dispatchers rows per local expert"
BACKENDS: dict[str, BackendDescriptor] = {d.name: d for d in (
    BackendDescriptor(
        name="none", activation_format=_S, moves_tokens=False, needs_round_robin_routing_tables=False,
        quantizes_before_dispatch=False, dispatch_quant_block=None, topk_id_dtype=torch.int32,
        supported_hidden_sizes=None, max_tokens_semantics="not used (no dispatch)",
        summary="no all2all: every rank sees all tokens, masks non-local experts, outputs are all-reduced"),
    BackendDescriptor(
        name="allgather_reducescatter", activation_format=_S, moves_tokens=True, needs_round_robin_routing_tables=False,
        quantizes_before_dispatch=False, dispatch_quant_block=None, topk_id_dtype=torch.int32,
        supported_hidden_sizes=None, max_tokens_semantics=_NO_SLABS,
        summary="all-gather tokens and ids over the EP group, run local experts, reduce-scatter outputs"),
    BackendDescriptor(
        name="deepep_high_throughput", activation_format=_S, moves_tokens=True, needs_round_robin_routing_tables=False,
        quantizes_before_dispatch=True, dispatch_quant_block=(1, 128), topk_id_dtype=torch.int64,
        supported_hidden_sizes=None, max_tokens_semantics=_NO_SLABS,
        summary="DeepEP normal kernels: token-level all2all into a flat list, FP8 block dispatch", native_library="deep_ep"),
    BackendDescriptor(
        name="deepep_low_latency", activation_format=_B, moves_tokens=True, needs_round_robin_routing_tables=True,
        quantizes_before_dispatch=True, dispatch_quant_block=(1, 128), topk_id_dtype=torch.int64,
        supported_hidden_sizes=_LL_HIDDEN, max_tokens_semantics=_LL_SLABS,
        summary="DeepEP low-latency kernels: per-expert slabs addressed by physical expert id", native_library="deep_ep"),
    BackendDescriptor(
        name="nixl_ep", activation_format=_B, moves_tokens=True, needs_round_robin_routing_tables=True,
        quantizes_before_dispatch=True, dispatch_quant_block=(1, 128), topk_id_dtype=torch.int64,
        supported_hidden_sizes=_LL_HIDDEN, max_tokens_semantics=_LL_SLABS,
        summary="NIXL EP: the DeepEP low-latency contract over NIXL, elastic EP ranks", native_library="nixl_ep"),
)}

def get_backend(name: str) -> BackendDescriptor:
    """The descriptor of all2all backend `name`; raises ValueError naming `all2all_backend` and listing the known
    backends. Source: moe-lit's own table; the names are vLLM's `all2all_backend` strings."""
    if not isinstance(name, str) or name not in BACKENDS:   # a list or dict must not reach the dict look-up
        raise ValueError(f"all2all_backend: expected one of {list(BACKENDS)}, got {name!r}")
    return BACKENDS[name]

# %%
#| test backend_table
test_eq(get_backend("nixl_ep").activation_format, ActivationFormat.BatchedExperts)
test_eq(get_backend("deepep_low_latency").round_up_hidden_size(2880), 3072)   # gpt-oss hidden size is padded
test_eq(get_backend("none").round_up_hidden_size(2880), 2880)
test_fail(lambda: get_backend("nixl_ep").round_up_hidden_size(9000), contains="hidden_size: expected <= 8192")
test_fail(lambda: get_backend("pplx"), contains="all2all_backend: expected one of ['none', 'allgather_reducescatter'")
test_fail(lambda: get_backend(["none"]), contains="all2all_backend: expected one of ['none'")   # no TypeError
for name, d in BACKENDS.items():
    test_eq(d.name, name)
    # a backend that needs round-robin tables addresses experts by physical id: only batched backends do
    assert not d.needs_round_robin_routing_tables or d.activation_format is ActivationFormat.BatchedExperts

# %% [markdown]
# ## Limits, and two more checks
#
# Every size and id in moe-lit — experts, ranks, hidden and intermediate widths, token caps — must be below
# `SIZE_LIMIT = 2**31`. Expert ids, expert maps and per-expert counts are int32 tensors (the dtype vLLM's kernels
# take), so a larger value would wrap silently when cast, and a size beyond it asks for tensors no device holds.
# Configs and table builders reject such values with the usual `ValueError` instead of failing inside an allocation.
# A layer's expert count has a tighter bound, `MAX_EXPERTS = 2**24`: placement, routing tables and a checkpoint's
# key lists hold a few entries per expert on every rank, so tens of millions of experts would take minutes and
# gigabytes before any check of the weights could run (the largest published MoE layers hold about a million).
#
# > Two private checks complete those of `moe_lit.terms` with the same `<argument>: expected <x>, got <y>` messages:
# > a flag must be a Python `bool` (`1`, `numpy.bool_` and a bool tensor are refused: `1 in (True, False)` is true,
# > and a tensor's truth value can raise), and a factor must be a finite `int` or `float` above zero.

# %%
#| export
SIZE_LIMIT = 2**31   # exclusive bound of every size and id: expert ids, maps and counts are int32 tensors
MAX_EXPERTS = 2**24  # inclusive bound of a layer's num_experts (per-expert tables on every rank: see above)


# %%
#| test size_limit
test_eq(SIZE_LIMIT - 1, torch.iinfo(torch.int32).max)   # the largest id an int32 table holds

# %% [markdown]
# ## ParallelConfig
#
# The layer sees one parallel configuration per device. vLLM's rule (`FusedMoEParallelConfig.make`) flattens tensor
# parallelism (TP) across data parallelism (DP) and prefill context parallelism (PCP): the flat group has
# `dp · pcp · tp` devices and device `(dp_rank, pcp_rank, tp_rank)` has flat rank
# `dp_rank · pcp · tp + pcp_rank · tp + tp_rank`. Without EP the flat group shards each expert (TP); with EP it owns
# whole experts (EP) and TP becomes 1.

# %%
#| export
@dataclass(frozen=True)
class ParallelConfig:
    """The MoE layer's view of the deployment on one device (mirrors vLLM's `FusedMoEParallelConfig`). ValueError on
    construction naming the field: a size not an int in [1, 2**31), a rank outside [0, size), `use_ep`/`enable_eplb`
    not a bool, an unknown `all2all_backend`, or a state the flattening rule of `make` cannot produce."""
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    pcp_size: int = 1
    pcp_rank: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    use_ep: bool = False
    all2all_backend: str = "none"
    enable_eplb: bool = False

    def __post_init__(self):
        for size, rank in (("tp_size", "tp_rank"), ("dp_size", "dp_rank"), ("pcp_size", "pcp_rank"),
                           ("ep_size", "ep_rank")):
            check_int(size, getattr(self, size), lo=1, hi=SIZE_LIMIT)
            check_int(rank, getattr(self, rank), lo=0, hi=getattr(self, size))
        check_bool("use_ep", self.use_ep); check_bool("enable_eplb", self.enable_eplb)
        get_backend(self.all2all_backend)
        _check_flat_group(self)

    @property
    def backend(self) -> BackendDescriptor:
        """The descriptor record of `all2all_backend`. Raises nothing (the name was checked when the config was made).
        Source: moe-lit's own (DESIGN §4)."""
        return get_backend(self.all2all_backend)

# %% [markdown]
# A `ParallelConfig` built by hand must be one that the flattening rule can produce, or the properties below would
# describe a deployment that does not exist. The flat group is the EP group when `use_ep` is true and the TP group
# otherwise; it spans every DP and PCP rank, so its size is `dp_size · pcp_size · tp` for the user's TP size `tp`, and
# device `(dp_rank, pcp_rank)` holds the flat ranks `[(dp_rank · pcp_size + pcp_rank) · tp, … + tp)`. Hence:
#
# - `use_ep` true means more than one EP rank and `tp_size = 1` (the EP group takes TP's devices);
# - `use_ep` false means `ep_size = 1`;
# - the flat size is a multiple of `dp_size · pcp_size`, and the flat rank lies in its device's block.
#
# With TP = 2, DP = 2 and EP on, for example, `ep_size = 4`, `dp_size = 2`, `tp_size = 1`, and DP rank 1 holds EP
# ranks 2 and 3.

# %%
#| export
def _check_flat_group(p: ParallelConfig) -> None:
    "Raise ValueError unless `p` is a state vLLM's flattening rule (see `make`) can produce."
    if p.use_ep and p.ep_size == 1:
        raise ValueError("use_ep: expected False when ep_size is 1 (one EP rank has nothing to split), got True")
    if not p.use_ep and p.ep_size > 1: raise ValueError(f"ep_size: expected 1 when use_ep is False, got {p.ep_size}")
    if p.use_ep and p.tp_size > 1:
        raise ValueError(f"tp_size: expected 1 when use_ep is True (the EP group takes TP's devices), got {p.tp_size}")
    flat, size, rank = ("ep", p.ep_size, p.ep_rank) if p.use_ep else ("tp", p.tp_size, p.tp_rank)
    outer = p.dp_size * p.pcp_size
    if size % outer:
        raise ValueError(f"{flat}_size: expected a multiple of dp_size * pcp_size = {outer} (the flat group spans "
                         f"every DP and PCP rank), got {size}")
    tp = size // outer                                   # the TP size the deployment was stated with
    first = (p.dp_rank * p.pcp_size + p.pcp_rank) * tp
    if not first <= rank < first + tp:
        raise ValueError(f"{flat}_rank: expected in [{first}, {first + tp}) for dp_rank={p.dp_rank}, "
                         f"pcp_rank={p.pcp_rank} (flat rank = (dp_rank * pcp_size + pcp_rank) * {tp} + tp rank), "
                         f"got {rank}")

# %%
#| test parallel_config_invariants
test_eq(ParallelConfig(ep_size=4, ep_rank=3, dp_size=2, dp_rank=1, use_ep=True).ep_size, 4)   # TP=2, DP=2, EP on
test_eq(ParallelConfig(tp_size=4, tp_rank=1, dp_size=2, dp_rank=0).tp_rank, 1)                # TP=2, DP=2, EP off
test_fail(lambda: ParallelConfig(use_ep=True), contains="use_ep: expected False when ep_size is 1")
test_fail(lambda: ParallelConfig(ep_size=2), contains="ep_size: expected 1 when use_ep is False, got 2")
test_fail(lambda: ParallelConfig(ep_size=2, tp_size=2, use_ep=True), contains="tp_size: expected 1 when use_ep is True")
test_fail(lambda: ParallelConfig(ep_size=2, dp_size=4, use_ep=True),
          contains="ep_size: expected a multiple of dp_size * pcp_size = 4")
test_fail(lambda: ParallelConfig(dp_size=2), contains="tp_size: expected a multiple of dp_size * pcp_size = 2")
test_fail(lambda: ParallelConfig(ep_size=4, ep_rank=1, dp_size=2, dp_rank=1, use_ep=True),
          contains="ep_rank: expected in [2, 4) for dp_rank=1, pcp_rank=0")
test_fail(lambda: ParallelConfig(use_ep="no"), contains="use_ep: expected a bool, got str 'no'")
test_fail(lambda: ParallelConfig(enable_eplb="no"), contains="enable_eplb: expected a bool, got str")
test_fail(lambda: ParallelConfig(all2all_backend=["x"]), contains="all2all_backend: expected one of")
test_fail(lambda: ParallelConfig(dp_size=2**31), contains="dp_size: expected <= 2147483647")

# %% [markdown]
# `make` takes the deployment as a user states it and applies the flattening rule.

# %%
#| export
@patch(cls_method=True)
def make(cls: ParallelConfig, tp_size: int, dp_size: int, pcp_size: int = 1, tp_rank: int = 0, dp_rank: int = 0,
          pcp_rank: int = 0, enable_expert_parallel: bool = False, all2all_backend: str = "none",
          enable_eplb: bool = False) -> ParallelConfig:
    "Flatten TP across DP and PCP; the flat group becomes the EP group when EP is on (vLLM's `make`)."
    check_int("tp_size", tp_size, lo=1); check_int("dp_size", dp_size, lo=1); check_int("pcp_size", pcp_size, lo=1)
    check_int("tp_rank", tp_rank, lo=0, hi=tp_size); check_int("dp_rank", dp_rank, lo=0, hi=dp_size)
    check_int("pcp_rank", pcp_rank, lo=0, hi=pcp_size)
    check_bool("enable_expert_parallel", enable_expert_parallel); check_bool("enable_eplb", enable_eplb)
    get_backend(all2all_backend)
    flat_size = dp_size * pcp_size * tp_size
    if flat_size >= 2**31:                # the ranks of one layer are int32 in every table built from them
        raise ValueError(f"tp_size, dp_size, pcp_size: expected a product <= 2147483647, got {tp_size} × {dp_size} × "
                         f"{pcp_size} = {flat_size}")
    flat_rank = dp_rank * pcp_size * tp_size + pcp_rank * tp_size + tp_rank
    use_ep = flat_size > 1 and enable_expert_parallel
    tp, ep = ((1, 0), (flat_size, flat_rank)) if use_ep else ((flat_size, flat_rank), (1, 0))
    return cls(tp_size=tp[0], tp_rank=tp[1], dp_size=dp_size, dp_rank=dp_rank, pcp_size=pcp_size,
               pcp_rank=pcp_rank, ep_size=ep[0], ep_rank=ep[1], use_ep=use_ep, all2all_backend=all2all_backend,
               enable_eplb=enable_eplb)


# %% [markdown]
# The six worked examples of vLLM's docstring, one row per device: `(TP, DP, EP)` as `(size, rank)` pairs.

# %%
#| test make_worked_examples
def views(tp, dp, ep):
    out = []
    for dp_rank in range(dp):
        for tp_rank in range(tp):
            c = ParallelConfig.make(tp_size=tp, dp_size=dp, tp_rank=tp_rank, dp_rank=dp_rank, enable_expert_parallel=ep)
            out.append(((c.tp_size, c.tp_rank), (c.dp_size, c.dp_rank), (c.ep_size, c.ep_rank)))
    return out
test_eq(views(1, 1, False), [((1, 0), (1, 0), (1, 0))])
test_eq(views(2, 1, False), [((2, 0), (1, 0), (1, 0)), ((2, 1), (1, 0), (1, 0))])
test_eq(views(1, 2, False), [((2, 0), (2, 0), (1, 0)), ((2, 1), (2, 1), (1, 0))])
test_eq(views(2, 2, False), [((4, 0), (2, 0), (1, 0)), ((4, 1), (2, 0), (1, 0)),
                             ((4, 2), (2, 1), (1, 0)), ((4, 3), (2, 1), (1, 0))])
test_eq(views(2, 1, True), [((1, 0), (1, 0), (2, 0)), ((1, 0), (1, 0), (2, 1))])
test_eq(views(1, 2, True), [((1, 0), (2, 0), (2, 0)), ((1, 0), (2, 1), (2, 1))])
test_eq(views(2, 2, True), [((1, 0), (2, 0), (4, 0)), ((1, 0), (2, 0), (4, 1)),
                            ((1, 0), (2, 1), (4, 2)), ((1, 0), (2, 1), (4, 3))])
assert not ParallelConfig.make(1, 1, enable_expert_parallel=True).use_ep    # one device: EP has nothing to split
test_eq(ParallelConfig.make(1, 2, pcp_size=2, dp_rank=1, pcp_rank=1, enable_expert_parallel=True).ep_rank, 3)
for tp in (1, 2):                                        # every state `make` produces passes the checks
    for dp in (1, 2, 3):
        for pcp in (1, 2):
            for ep in (False, True):
                for r in range(tp * dp * pcp):
                    ParallelConfig.make(tp, dp, pcp, tp_rank=r % tp, pcp_rank=r // tp % pcp, dp_rank=r // (tp * pcp),
                                        enable_expert_parallel=ep)

# %%
#| test make_bad_input
test_fail(lambda: ParallelConfig.make(0, 1), contains="tp_size: expected >= 1, got 0")
test_fail(lambda: ParallelConfig.make(2, 1, tp_rank=2), contains="tp_rank: expected <= 1, got 2")
test_fail(lambda: ParallelConfig.make(1, 2, dp_rank=-1), contains="dp_rank: expected >= 0, got -1")
test_fail(lambda: ParallelConfig.make(1, 2, all2all_backend="deepep"), contains="all2all_backend: expected one of")
test_fail(lambda: ParallelConfig(ep_size=2, ep_rank=2), contains="ep_rank: expected <= 1, got 2")
test_fail(lambda: ParallelConfig.make(1, 2, enable_expert_parallel="no"),
          contains="enable_expert_parallel: expected a bool, got str 'no'")
test_fail(lambda: ParallelConfig.make(1, 2, enable_expert_parallel=True, enable_eplb=1),
          contains="enable_eplb: expected a bool, got int 1")
test_fail(lambda: ParallelConfig.make(1, 2, all2all_backend=["none"]), contains="all2all_backend: expected one of")

# %% [markdown]
# ### Properties: reads of the descriptor
#
# `use_all2all_kernels` is vLLM's condition — EP on, and more than one DP or PCP rank (with DP = 1, TP+EP runs every
# token on every rank and masks) — and, in moe-lit, a backend that moves tokens at all (`none` does not). Every
# other property is `use_all2all_kernels` and one field of the record. The three `use_<backend>_kernels`
# properties exist because they are vLLM's vocabulary; no decision in moe-lit reads them.

# %%
#| export
def _prop(f):
    setattr(ParallelConfig, f.__name__, property(f))
    return f

@_prop
def use_all2all_kernels(self) -> bool:
    """Tokens are dispatched between EP ranks: EP on, DP or PCP > 1, and the backend moves tokens. Raises nothing.
    Source: vLLM's `FusedMoEParallelConfig.use_all2all_kernels` (fused_moe/config.py, without its sequence-parallel
    term), plus the record's `moves_tokens`."""
    return self.use_ep and (self.dp_size > 1 or self.pcp_size > 1) and self.backend.moves_tokens

@_prop
def use_batched_activation_format(self) -> bool:
    """Experts receive `[E_local, max_tokens, H]` slabs (DeepEP low-latency, NIXL EP, ...). Raises nothing. Source:
    vLLM's `FusedMoEParallelConfig.use_batched_activation_format` (NIXL EP added by vLLM PR #40412)."""
    return self.use_all2all_kernels and self.backend.activation_format is ActivationFormat.BatchedExperts

@_prop
def activation_format(self) -> ActivationFormat:
    """The format the experts receive on this deployment. Raises nothing. Source: moe-lit's own (vLLM's oracles
    compute the same from `use_batched_activation_format`)."""
    return ActivationFormat.BatchedExperts if self.use_batched_activation_format else ActivationFormat.Standard

@_prop
def needs_round_robin_routing_tables(self) -> bool:
    """Dispatch needs `global_to_physical` when experts are placed round robin. Raises nothing. Source: vLLM's
    `FusedMoEParallelConfig.needs_round_robin_routing_tables` (round robin with DeepEP-LL: vLLM PR #28449)."""
    return self.use_all2all_kernels and self.backend.needs_round_robin_routing_tables

@_prop
def topk_indices_dtype(self) -> torch.dtype:
    """dtype of `topk_ids` handed to dispatch (int32 when nothing is dispatched). Raises nothing. Source: vLLM's
    prepare/finalize `topk_indices_dtype()` (int64 for DeepEP-LL and NIXL EP)."""
    return self.backend.topk_id_dtype if self.use_all2all_kernels else torch.int32

# %%
#| export
def _is(name):
    def f(self) -> bool: return self.use_all2all_kernels and self.backend.name == name
    f.__doc__ = f"vLLM's name for: all2all kernels are in use and the backend is `{name}`. Raises nothing."
    return property(f)

ParallelConfig.use_ag_rs_all2all_kernels = _is("allgather_reducescatter")
ParallelConfig.use_deepep_ht_kernels = _is("deepep_high_throughput")
ParallelConfig.use_deepep_ll_kernels = _is("deepep_low_latency")
ParallelConfig.use_nixl_ep_kernels = _is("nixl_ep")

# %%
#| test properties_follow_the_table
for name, d in BACKENDS.items():
    on = ParallelConfig.make(tp_size=1, dp_size=4, dp_rank=3, enable_expert_parallel=True, all2all_backend=name)
    test_eq(on.use_all2all_kernels, d.moves_tokens)
    test_eq(on.activation_format, d.activation_format if d.moves_tokens else ActivationFormat.Standard)
    test_eq(on.use_batched_activation_format, on.activation_format is ActivationFormat.BatchedExperts)
    test_eq(on.needs_round_robin_routing_tables, d.moves_tokens and d.needs_round_robin_routing_tables)
    test_eq(on.topk_indices_dtype, d.topk_id_dtype if d.moves_tokens else torch.int32)
    # TP+EP with DP = 1, or EP off: no all2all, so Standard format whatever the backend says
    for off in (ParallelConfig.make(tp_size=4, dp_size=1, enable_expert_parallel=True, all2all_backend=name),
                ParallelConfig.make(tp_size=1, dp_size=4, enable_expert_parallel=False, all2all_backend=name)):
        assert not off.use_all2all_kernels and off.activation_format is ActivationFormat.Standard
test_eq(ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep").use_nixl_ep_kernels, True)
test_eq(ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="nixl_ep").use_deepep_ll_kernels, False)
test_eq(ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend="deepep_low_latency").use_deepep_ll_kernels, True)

# %% [markdown]
# ### Explaining the properties
#
# Every property can say why it has its value: `explain` returns one row per property with the inputs it read. The
# `moe-lit run` report prints these rows. A reason is worded from what decided the value, so it is true for `True`
# and for `False`: without all2all the backend's declared format and tables do not apply, and the rows say so.

# %%
#| export
@patch
def explain(self: ParallelConfig) -> list[tuple[str, object, str]]:
    """One `(property, value, reason)` row per derived property; each reason holds whichever value the row has.
    Raises nothing. Source: moe-lit's own (the `moe-lit run`/`explain` report)."""
    d, a2a = self.backend, self.use_all2all_kernels
    fmt, rr = d.activation_format.value, d.needs_round_robin_routing_tables
    why_a2a = (f"use_ep and (dp_size > 1 or pcp_size > 1) and the backend moves tokens: use_ep={self.use_ep}, "
               f"dp_size={self.dp_size}, pcp_size={self.pcp_size}, {d.name!r} declares moves_tokens={d.moves_tokens}")
    rows = [("use_all2all_kernels", a2a, why_a2a),
            ("activation_format", self.activation_format.value,
             f"{d.name!r} declares {fmt}" if a2a else f"no all2all: every rank gets the standard token list "
             f"(whatever {d.name!r} declares: {fmt})"),
            ("use_batched_activation_format", self.use_batched_activation_format,
             f"activation_format is {self.activation_format.value}"),
            ("needs_round_robin_routing_tables", self.needs_round_robin_routing_tables,
             f"{d.name!r} declares needs_round_robin_routing_tables={rr}" if a2a else
             "no all2all: nothing is dispatched by physical id, each rank masks with expert_map"),
            ("topk_indices_dtype", str(self.topk_indices_dtype).replace("torch.", ""),
             f"{d.name!r} declares {str(d.topk_id_dtype).replace('torch.', '')}" if a2a
             else "nothing is dispatched: int32")]
    for p in ("use_ag_rs_all2all_kernels", "use_deepep_ht_kernels", "use_deepep_ll_kernels", "use_nixl_ep_kernels"):
        rows.append((p, getattr(self, p), "vLLM's name; moe-lit decides by the rows above"))
    return rows


# %%
#| test explain_rows
rows = dict((p, (v, r)) for p, v, r in ParallelConfig.make(1, 8, enable_expert_parallel=True,
                                                            all2all_backend="nixl_ep").explain())
test_eq(rows["activation_format"][0], "batched_experts")
test_eq(rows["needs_round_robin_routing_tables"][0], True)
assert all(r for _, r in rows.values())   # every row has a reason

# %% [markdown]
# A reason must hold for either value of its row. TP+EP with one DP rank names a batched backend but dispatches
# nothing, so its rows must say "standard", never repeat what the backend would deliver as if it were used.

# %%
#| test explain_reasons_hold_for_both_values
for name in BACKENDS:
    for par in (ParallelConfig.make(1, 4, enable_expert_parallel=True, all2all_backend=name),   # all2all (if it moves)
                ParallelConfig.make(4, 1, enable_expert_parallel=True, all2all_backend=name)):  # TP+EP: none
        rows = {p: (v, r) for p, v, r in par.explain()}
        test_eq(rows["use_batched_activation_format"][1], f"activation_format is {rows['activation_format'][0]}")
        assert rows["activation_format"][1].startswith("no all2all") != par.use_all2all_kernels, (name, rows)
        assert f"needs_round_robin_routing_tables={par.backend.needs_round_robin_routing_tables}" in \
            rows["needs_round_robin_routing_tables"][1] or not par.use_all2all_kernels
        assert f"moves_tokens={par.backend.moves_tokens}" in rows["use_all2all_kernels"][1]
tp_ep = {p: r for p, _, r in ParallelConfig.make(2, 1, enable_expert_parallel=True,
                                                 all2all_backend="deepep_low_latency").explain()}
test_eq(tp_ep["use_batched_activation_format"], "activation_format is standard")
assert tp_ep["activation_format"].startswith("no all2all") and "expert_map" in tp_ep["needs_round_robin_routing_tables"]

# %% [markdown]
# ## MoEConfig
#
# The shapes of one MoE layer, its routing options and the deployment. The format-related properties delegate to the
# parallel config, so there is exactly one place that decides them.

# %%
#| export
ROUTING_METHODS = ("topk", "grouped_topk", "llama4")
SCORING_FUNCS = ("softmax", "sigmoid")
ACTIVATIONS = ("silu", "swigluoai")   # gated SiLU (most models); gpt-oss's clamped SwiGLU (see 05_formats)

@dataclass(frozen=True)
class MoEConfig:
    """One MoE layer: shapes, routing options, dtype and deployment. ValueError on construction (and in `replace`)
    naming the field that breaks a guarantee listed below. Source: vLLM's `FusedMoEConfig` (fused_moe/config.py),
    with moe-lit's own routing and expert fields."""
    num_experts: int                      # routed experts (global, logical)
    top_k: int                            # experts per token
    hidden_size: int                      # H
    intermediate_size: int                # I, per expert
    num_shared_experts: int = 0           # always-on experts (their width is `shared_intermediate_size`)
    shared_intermediate_size: int | None = None   # I of the shared MLP (default: num_shared_experts · intermediate_size)
    dtype: torch.dtype = torch.bfloat16   # activation and weight dtype
    routing_method: str = "topk"          # 'topk', 'grouped_topk' or 'llama4' (top-1 sigmoid on the raw logit)
    scoring_func: str = "softmax"         # 'softmax' or 'sigmoid'
    renormalize: bool = True              # divide the top_k weights by their sum
    num_expert_group: int | None = None   # grouped top-k: number of groups
    topk_group: int | None = None         # grouped top-k: groups kept per token
    routed_scaling_factor: float = 1.0    # multiplies routed weights (after renormalising)
    has_correction_bias: bool = False     # e_score_correction_bias selects experts (DeepSeek-V3 noaux_tc)
    apply_router_weight_on_input: bool = False   # scale the input by the weight (Llama-4, top_k = 1; with top_k > 1
                                                 # each pair's input by its own weight, where vLLM asserts top_k = 1)
    has_router_bias: bool = False         # the router is a Linear with a bias added to the logits (gpt-oss)
    activation: str = "silu"              # the experts' gated activation, one of ACTIVATIONS
    swiglu_alpha: float = 1.702           # swigluoai only: gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0             # swigluoai only: gate clamped above, up clamped to [-limit, limit]
    has_expert_bias: bool = False         # experts carry w13_bias [E, 2·I] and w2_bias [E, H] (gpt-oss)
    shared_expert_gate: bool = False      # shared output scaled per token by sigmoid(x · gate) (Qwen2-MoE, Qwen3-Next)
    num_redundant_experts: int = 0        # EPLB extra physical replicas
    max_num_tokens: int = 256             # per-rank token cap of the batched format (vLLM's default)
    name: str = ""                        # model name for reports
    model_type: str = ""                  # Hugging Face model_type of the family ('' when unknown): keys its caveats
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self):
        _check_moe_shapes(self); _check_moe_routing(self); _check_moe_deployment(self)

# %% [markdown]
# ### What a MoEConfig guarantees
#
# Every field is checked when the config is made (and again by `replace`), so no later function meets a config it
# cannot run:
#
# - **Shapes** are ints in range and below `SIZE_LIMIT`, and so are the physical experts
#   (`num_experts + num_redundant_experts`); `shared_intermediate_size` is `None` or at least 1; `name` is a str.
# - **Routing options** are of their type — the flags are bools, `routed_scaling_factor` is a number above 0 that
#   float32 holds as a normal value (it multiplies fp32 weights: 1e39 would be inf there, 1e-50 zero) — and `num_expert_group` and `topk_group`, whenever given, are ints >= 1 with
#   `topk_group <= num_expert_group`, even if the routing is not grouped (the placement reads `num_expert_group`).
# - **`grouped_topk`** needs both group counts, and when the experts split into groups it needs
#   `top_k <= topk_group · num_experts / num_expert_group` (the kept groups must hold `top_k` experts). When they do
#   not split — `num_experts % num_expert_group != 0`, or one expert per group with a correction bias — the config
#   is accepted: `grouped_topk` then falls back to plain top-k with a `RoutingFallbackWarning`, as vLLM does (silently)
#   for DeepSeek-V3's 8-expert, 8-group test model, and `top_k <= num_experts` is the only bound.
# - **Expert semantics**: `activation` is one of `ACTIVATIONS` (`silu`, or gpt-oss's clamped `swigluoai` whose
#   `swiglu_alpha` and `swiglu_limit` are above 0 and normal float32 values); `has_expert_bias` adds `w13_bias`/`w2_bias` to the
#   two GEMMs; `has_router_bias` adds a bias to the router logits (it changes which experts are chosen, unlike the
#   correction bias, which only selects); `shared_expert_gate` needs shared experts to gate.
# - **`llama4`** routes one expert by its raw logit and weighs it by the logit's sigmoid, with neither a correction
#   bias nor a scaling factor, so it needs `top_k = 1`, `has_correction_bias = False`, `routed_scaling_factor = 1`,
#   `scoring_func = 'sigmoid'` and `renormalize = False` (fields that said otherwise would be ignored).
# - **Deployment:** `parallel` is a `ParallelConfig`, and when tokens go through all2all kernels the backend can send
#   `hidden_size` — `round_up_hidden_size` of its record decides (DeepEP low-latency and NIXL EP stop at 8192).

# %%
#| export
def _check_moe_shapes(c: MoEConfig) -> None:
    "Shapes of a MoEConfig: ints in range and below SIZE_LIMIT; dtype and name of their types."
    check_int("num_experts", c.num_experts, lo=1, hi=MAX_EXPERTS + 1)
    check_int("top_k", c.top_k, lo=1, hi=c.num_experts + 1)
    check_int("hidden_size", c.hidden_size, lo=1, hi=SIZE_LIMIT)
    check_int("intermediate_size", c.intermediate_size, lo=1, hi=SIZE_LIMIT)
    check_int("num_shared_experts", c.num_shared_experts, lo=0, hi=SIZE_LIMIT)
    if c.shared_intermediate_size is not None:
        check_int("shared_intermediate_size", c.shared_intermediate_size, lo=1, hi=SIZE_LIMIT)
        if not c.num_shared_experts:                         # a width for nothing: a config that lost its count
            raise ValueError(f"shared_intermediate_size: expected None without shared experts (num_shared_experts 0), "
                             f"got {c.shared_intermediate_size}")
    check_int("num_redundant_experts", c.num_redundant_experts, lo=0, hi=SIZE_LIMIT)
    if c.num_experts + c.num_redundant_experts >= SIZE_LIMIT:
        raise ValueError(f"num_redundant_experts: expected num_experts + num_redundant_experts < {SIZE_LIMIT} "
                         f"(physical ids are int32), got {c.num_experts} + {c.num_redundant_experts}")
    check_int("max_num_tokens", c.max_num_tokens, lo=1, hi=SIZE_LIMIT)
    check_choice("dtype", c.dtype, (torch.float32, torch.float16, torch.bfloat16, torch.float64))
    for f in ("name", "model_type"):
        if not isinstance(getattr(c, f), str): raise ValueError(f"{f}: expected a str, got {type(getattr(c, f)).__name__} {getattr(c, f)!r}")

# %%
#| export
def _check_moe_routing(c: MoEConfig) -> None:
    "Routing options of a MoEConfig: types, group counts, and what grouped_topk and llama4 can run."
    check_choice("routing_method", c.routing_method, ROUTING_METHODS)
    check_choice("scoring_func", c.scoring_func, SCORING_FUNCS)
    for flag in ("renormalize", "has_correction_bias", "apply_router_weight_on_input", "has_router_bias",
                 "has_expert_bias", "shared_expert_gate"):
        check_bool(flag, getattr(c, flag))
    check_choice("activation", c.activation, ACTIVATIONS)
    check_positive_real("swiglu_alpha", c.swiglu_alpha, fp32=True); check_positive_real("swiglu_limit", c.swiglu_limit, fp32=True)
    if c.shared_expert_gate and not c.num_shared_experts:
        raise ValueError("shared_expert_gate: expected False for a layer without shared experts, got True")
    check_positive_real("routed_scaling_factor", c.routed_scaling_factor, fp32=True)
    for f in ("num_expert_group", "topk_group"):             # checked whenever given; required by grouped_topk
        if getattr(c, f) is not None or c.routing_method == "grouped_topk":
            check_int(f, getattr(c, f), lo=1, hi=SIZE_LIMIT)
    if c.num_expert_group is not None and c.topk_group is not None:
        check_int("topk_group", c.topk_group, lo=1, hi=c.num_expert_group + 1)
    if c.routing_method == "grouped_topk":
        size, rem = divmod(c.num_experts, c.num_expert_group)
        groupable = rem == 0 and (size >= 2 or not c.has_correction_bias)   # else routing falls back (03_routing)
        if groupable and c.top_k > c.topk_group * size:
            raise ValueError(f"top_k: expected <= topk_group * experts per group = {c.topk_group * size} for "
                             f"routing_method 'grouped_topk', got {c.top_k}")
    if c.routing_method == "llama4":
        if c.top_k != 1: raise ValueError(f"top_k: expected 1 for routing_method 'llama4', got {c.top_k}")
        if c.has_correction_bias:
            raise ValueError("has_correction_bias: expected False for routing_method 'llama4', got True")
        if c.routed_scaling_factor != 1:
            raise ValueError(f"routed_scaling_factor: expected 1.0 for routing_method 'llama4', "
                             f"got {c.routed_scaling_factor}")
        if c.scoring_func != "sigmoid":                     # what it runs: a field that says otherwise would be ignored
            raise ValueError(f"scoring_func: expected 'sigmoid' for routing_method 'llama4' (a sigmoid of the top "
                             f"logit), got {c.scoring_func!r}")
        if c.renormalize:
            raise ValueError("renormalize: expected False for routing_method 'llama4' (one expert, its sigmoid "
                             "weight), got True")

# %%
#| export
def _check_moe_deployment(c: MoEConfig) -> None:
    "The deployment of a MoEConfig: a ParallelConfig whose all2all backend, if used, can send `hidden_size`."
    if not isinstance(c.parallel, ParallelConfig):
        raise ValueError(f"parallel: expected a ParallelConfig, got {type(c.parallel).__name__}")
    if c.parallel.use_all2all_kernels:
        c.parallel.backend.round_up_hidden_size(c.hidden_size)   # ValueError above the largest size it sends

# %% [markdown]
# Delegation to the parallel config — the layer, the placement and the report all ask the `MoEConfig`, and it
# asks the one record.

# %%
#| export
def _delegate(name):
    def f(self): return getattr(self.parallel, name)
    f.__doc__ = (f"Delegated to `self.parallel.{name}`. Raises nothing (`parallel` was checked when the config was "
                 f"made). Source: " + ("vLLM's `FusedMoEConfig`, which delegates it to `moe_parallel_config` likewise."
                 if name in ("ep_size", "ep_rank", "use_ep", "needs_round_robin_routing_tables") else
                 "moe-lit's own delegation, so one record decides it."))
    setattr(MoEConfig, name, property(f))

for _n in ("use_batched_activation_format", "needs_round_robin_routing_tables", "activation_format",
           "use_all2all_kernels", "topk_indices_dtype", "ep_size", "ep_rank", "use_ep", "backend"):
    _delegate(_n)

@patch(as_prop=True)
def num_physical_experts(self: MoEConfig) -> int:
    """Physical experts: routed experts plus EPLB redundant replicas. Raises nothing (the sum was checked below
    2**31 on construction). Source: vLLM's `global_num_experts = num_experts + num_redundant_experts` (layer.py)."""
    return self.num_experts + self.num_redundant_experts

@patch
def replace(self: MoEConfig, **kw) -> MoEConfig:
    """A copy with the fields in `kw` changed (validated again on construction); ValueError naming an unknown field.
    Source: moe-lit's own (`dataclasses.replace`)."""
    fields = {f.name for f in dataclasses.fields(self) if f.init}
    if unknown := sorted(set(kw) - fields):
        raise ValueError(f"replace: expected fields of MoEConfig ({', '.join(sorted(fields))}), got {unknown}")
    return dataclasses.replace(self, **kw)

@patch(as_prop=True)
def padded_hidden_size(self: MoEConfig) -> int:
    """Hidden size the dispatch sends: rounded up to a size the backend supports when tokens travel (else unchanged).
    Raises nothing (the config refused a hidden size its backend cannot send). Source: vLLM's
    `maybe_roundup_layer_hidden_size`."""
    return self.backend.round_up_hidden_size(self.hidden_size) if self.use_all2all_kernels else self.hidden_size

# %%
#| test moe_config
par = ParallelConfig.make(tp_size=1, dp_size=8, dp_rank=2, enable_expert_parallel=True, all2all_backend="nixl_ep")
cfg = MoEConfig(num_experts=128, top_k=8, hidden_size=2048, intermediate_size=768, parallel=par)
test_eq(cfg.activation_format, ActivationFormat.BatchedExperts)
test_eq((cfg.use_batched_activation_format, cfg.needs_round_robin_routing_tables, cfg.ep_size, cfg.ep_rank),
        (True, True, 8, 2))
test_eq(cfg.replace(parallel=ParallelConfig()).activation_format, ActivationFormat.Standard)
test_eq(cfg.replace(hidden_size=2880).padded_hidden_size, 3072)            # gpt-oss over NIXL EP: padded
test_eq(cfg.replace(hidden_size=2880, parallel=ParallelConfig()).padded_hidden_size, 2880)   # nothing travels
test_fail(lambda: MoEConfig(8, 9, 16, 16), contains="top_k: expected <= 8, got 9")
test_fail(lambda: MoEConfig(8, 2, 16, 16, scoring_func="relu"), contains="scoring_func: expected one of")
test_fail(lambda: MoEConfig(8, 2, 16, 16, routing_method="grouped_topk"), contains="num_expert_group: expected an int")
test_fail(lambda: MoEConfig(8, 2, 16, 16, routing_method="llama4"), contains="top_k: expected 1")
test_fail(lambda: MoEConfig(8, 2, 16, 0), contains="intermediate_size: expected >= 1, got 0")

# %% [markdown]
# Each guarantee, one bad value at a time:

# %%
#| test moe_config_bad_input
bad = {"renormalize": ("yes", "renormalize: expected a bool, got str 'yes'"),
       "has_correction_bias": (1, "has_correction_bias: expected a bool, got int 1"),
       "apply_router_weight_on_input": ("no", "apply_router_weight_on_input: expected a bool"),
       "routed_scaling_factor": ("2", "routed_scaling_factor: expected a finite number > 0, got str '2'"),
       "num_expert_group": (0, "num_expert_group: expected >= 1, got 0"),        # checked although routing is topk
       "topk_group": ("a", "topk_group: expected an int, got str"),
       "shared_intermediate_size": (0, "shared_intermediate_size: expected >= 1, got 0"),
       "shared_intermediate_size ": (64, "shared_intermediate_size: expected None without shared experts"),
       "name": (3, "name: expected a str, got int 3"),
       "num_experts": (2**40, "num_experts: expected <= 16777216, got 1099511627776"),
       "hidden_size": (2**31, "hidden_size: expected <= 2147483647"),
       "num_redundant_experts": (2**31 - 8, "num_redundant_experts: expected num_experts + num_redundant_experts <")}
shapes = dict(num_experts=8, top_k=2, hidden_size=16, intermediate_size=16)
for field_name, (value, msg) in bad.items():
    test_fail(lambda: MoEConfig(**{**shapes, field_name.strip(): value}), contains=msg)
for x in (float("nan"), float("inf"), True, 0, -1.5, 10**400):
    test_fail(lambda: MoEConfig(8, 2, 16, 16, routed_scaling_factor=x),
              contains="routed_scaling_factor: expected a finite")
test_fail(lambda: MoEConfig(8, 2, 16, 16, num_expert_group=2, topk_group=3), contains="topk_group: expected <= 2, got 3")
test_eq(MoEConfig(8, 2, 16, 16, routed_scaling_factor=2).routed_scaling_factor, 2)   # an int factor is a number

# %% [markdown]
# Grouped top-k and Llama-4: what the router can run is what the config accepts. Experts that do not split into
# groups are accepted, because the router falls back to plain top-k (and warns).

# %%
#| test moe_config_routing_rules
grouped = dict(routing_method="grouped_topk", num_expert_group=4, topk_group=2)
test_eq(MoEConfig(16, 8, 16, 16, **grouped).top_k, 8)                    # 2 groups of 4 hold 8 experts
test_fail(lambda: MoEConfig(16, 9, 16, 16, **grouped), contains="top_k: expected <= topk_group * experts per group = 8")
test_eq(MoEConfig(10, 5, 16, 16, **grouped).top_k, 5)                    # 10 % 4 != 0: falls back, top_k <= 10
test_eq(MoEConfig(8, 8, 16, 16, routing_method="grouped_topk", num_expert_group=8, topk_group=4,
                  has_correction_bias=True).top_k, 8)                    # DeepSeek-V3's 8-expert test model
test_fail(lambda: MoEConfig(8, 8, 16, 16, routing_method="grouped_topk", num_expert_group=8, topk_group=4),
          contains="top_k: expected <= topk_group * experts per group = 4")   # no bias: 8 groups of 1 are valid
llama4 = dict(routing_method="llama4", scoring_func="sigmoid", renormalize=False)
test_fail(lambda: MoEConfig(16, 1, 16, 16, has_correction_bias=True, **llama4),
          contains="has_correction_bias: expected False for routing_method 'llama4', got True")
test_fail(lambda: MoEConfig(16, 1, 16, 16, routed_scaling_factor=2.0, **llama4),
          contains="routed_scaling_factor: expected 1.0 for routing_method 'llama4', got 2.0")
test_fail(lambda: MoEConfig(16, 1, 16, 16, routing_method="llama4", renormalize=False),   # the default softmax
          contains="scoring_func: expected 'sigmoid' for routing_method 'llama4'")
test_fail(lambda: MoEConfig(16, 1, 16, 16, **{**llama4, "renormalize": True}),
          contains="renormalize: expected False for routing_method 'llama4'")

# %%
#| test moe_config_expert_semantics
oss = MoEConfig(8, 2, 16, 16, activation="swigluoai", has_expert_bias=True, has_router_bias=True)
test_eq((oss.activation, oss.swiglu_alpha, oss.swiglu_limit), ("swigluoai", 1.702, 7.0))
test_fail(lambda: MoEConfig(8, 2, 16, 16, activation="gelu"), contains="activation: expected one of")
test_fail(lambda: MoEConfig(8, 2, 16, 16, swiglu_limit=float("inf")), contains="swiglu_limit: expected")
for f in ("routed_scaling_factor", "swiglu_limit", "swiglu_alpha"):   # inf or 0 in float32: NaN or 0 outputs
    for v in (1e39, 1e-50):
        test_fail(lambda: MoEConfig(8, 2, 16, 16, **{f: v}), contains=f"{f}: expected a number float32 holds")
test_fail(lambda: MoEConfig(8, 2, 16, 16, has_expert_bias=1), contains="has_expert_bias: expected a bool")
test_fail(lambda: MoEConfig(8, 2, 16, 16, shared_expert_gate=True),
          contains="shared_expert_gate: expected False for a layer without shared experts")
test_eq(MoEConfig(8, 2, 16, 16, num_shared_experts=1, shared_expert_gate=True).shared_expert_gate, True)

# %% [markdown]
# The hidden-size limit of a backend is enforced by the config, through the record: a deployment whose all2all
# cannot send the layer's rows is refused when it is made, whatever the backend is called.

# %%
#| test moe_config_hidden_size_limit
for name, d in BACKENDS.items():
    par = ParallelConfig.make(1, 2, enable_expert_parallel=True, all2all_backend=name)
    limited = par.use_all2all_kernels and d.supported_hidden_sizes is not None
    if limited: test_fail(lambda: MoEConfig(8, 2, 9000, 16, parallel=par), contains="hidden_size: expected <= 8192")
    else: test_eq(MoEConfig(8, 2, 9000, 16, parallel=par).hidden_size, 9000)
    test_eq(MoEConfig(8, 2, 2880, 16, parallel=par).hidden_size, 2880)   # padded when dispatched, not refused
tp_ep = ParallelConfig.make(2, 1, enable_expert_parallel=True, all2all_backend="nixl_ep")   # no all2all: no limit
test_eq(MoEConfig(8, 2, 9000, 16, parallel=tp_ep).hidden_size, 9000)
