# %%
#| default_exp formats

# %% [markdown]
# # Activation formats and the reference MoE
# > The tensor contract of each activation format, and a plain-torch MoE in both formats that every kernel is checked against.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
import torch
from moe_lit.terms import check_int, check_tensor, check_bool, check_choice, check_positive_real, FLOAT_DTYPES, acc_dtype
from moe_lit.config import ACTIVATIONS

# %%
#| hide
import math
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close, poison_rows

# %% [markdown]
# In this notebook: the expert MLP (`silu_and_mul`, `expert_mlp`), the Standard-format reference
# `moe_reference_standard`, and the BatchedExperts-format reference in its three steps — `dispatch_batched_reference`,
# `experts_reference_batched`, `combine_batched_reference` — composed by `moe_reference_batched`. A **reference**
# page with an explanation of the two contracts.
#
# ## The two contracts
#
# **Standard** (no dispatch, all-gather/reduce-scatter, DeepEP high-throughput): the experts receive the tokens as one
# flat list `a1 [num_tokens, hidden_size]` together with `topk_ids [num_tokens, top_k]` (int32 or int64) and
# `topk_weights [num_tokens, top_k]` (float32). An id that is not local to the rank (`expert_map[id] == -1`) contributes
# exactly 0.
#
# **BatchedExperts** (DeepEP low-latency, NIXL EP): the dispatch has already grouped the tokens by local expert:
# `a1 [num_local_experts, max_tokens, hidden_size]` and `expert_num_tokens [num_local_experts]` int32. Only the first
# `expert_num_tokens[e]` rows of expert `e`'s slab are valid; the rest are garbage that must never be read into a valid
# row. An expert with zero tokens costs no weight reads. More rows than `max_tokens` is an error, never a silent
# truncation. The combine returns each slot's output to its token and applies the router weight there.
#
# Both formats compute the same function: for each token `t`,
# `out[t] = Σ_k topk_weights[t, k] · expert_{topk_ids[t, k]}(hidden[t])`, summed over the slots whose expert is local.
#
# **Weights.** The weights may be stored in a lower precision than the computation: a float64 reference runs on the
# model's bf16 weights by upcasting one expert at a time, which keeps its memory at one expert's worth.
# `w13 [num_local_experts, 2·intermediate_size, hidden_size]` holds the gate rows *then* the up rows
# (a declared layout, as vLLM's `w13`); `w2 [num_local_experts, hidden_size, intermediate_size]`. An expert is the
# gated SiLU MLP `w2 · (SiLU(w13_gate · x) ⊙ (w13_up · x))`.
#
# > **Precision.** Low-precision inputs (bf16, fp16, fp32) are computed close to the way the Triton kernels compute
# > them: matrix products accumulate in fp32 and SiLU-and-mul runs in fp32 and is cast to the input dtype once (the
# > fused epilogue). The Standard reference then keeps each expert's output in fp32 and casts once after the sum over
# > the `top_k` slots; the batched reference and the Triton paths round each slot's output to the input dtype first
# > and sum in fp32 — a difference of one rounding, inside every dtype's tolerance. float64 inputs run entirely in
# > float64: that is the reference every test compares with.

# %% [markdown]
# ## The expert MLP

# %%
#| export

def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SiLU of the first half of the last dim times the second half: `[..., 2·I] -> [..., I]`, same dtype as `x`
    (computed in fp32, fp64 for fp64). ValueError naming `x` (not a float tensor, or an odd or missing last dim).
    Source: vLLM's `silu_and_mul` (`SiluAndMul`, vllm/model_executor/layers/activation.py)."""
    check_tensor("x", x, dtype=FLOAT_DTYPES)
    if x.dim() < 1 or x.shape[-1] % 2:
        raise ValueError(f"x: expected an even last dim (gate then up), got shape {tuple(x.shape)}")
    gate, up = x.float().chunk(2, dim=-1) if x.dtype != torch.float64 else x.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)

# %%
#| test silu_and_mul
x = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
assert_close(silu_and_mul(x), torch.tensor([[0.0 * 2.0, 1.0 / (1.0 + math.exp(-1.0)) * 3.0]], dtype=torch.float64))
test_fail(lambda: silu_and_mul(torch.zeros(2, 3)), contains="x: expected an even last dim")
test_fail(lambda: silu_and_mul(torch.tensor(1.0)), contains="x: expected an even last dim")
test_fail(lambda: silu_and_mul(torch.zeros(2, 4, dtype=torch.int32)), contains="x: expected dtype")

# %% [markdown]
# ### The activation is part of the expert contract
#
# Most MoE models gate with SiLU. gpt-oss uses a clamped SwiGLU (`swigluoai` in vLLM's naming; the definition is
# `GptOssExperts._apply_gate` in transformers' `modeling_gpt_oss.py` and the `swiglu` of OpenAI's
# [gpt-oss reference](https://github.com/openai/gpt-oss/blob/main/gpt_oss/torch/model.py)):
# `gate = min(gate, limit)`, `up = clamp(up, -limit, limit)`, `out = (up + 1) · gate · σ(α · gate)` with `α = 1.702`,
# `limit = 7.0`. `Activation` is the one definition: the references and torch experts call it, and the Triton
# epilogues take its `code`, `alpha` and `limit` (their specs are checked against it). Its input is always in
# moe-lit's `w13` layout — gate columns, then up columns; checkpoints that interleave them (gpt-oss) are
# de-interleaved at load.

# %%
#| export
@dataclass(frozen=True)
class Activation:
    """The experts' gated activation `[..., 2·I]` (gate then up) `-> [..., I]`, computed in fp32 (fp64 for fp64).
    ValueError on construction naming `activation` (not in ACTIVATIONS), `alpha` or `limit` (not a normal float32
    > 0). Source: vLLM's `SiluAndMul` / `SwigluOAIAndMul` (layers/activation.py); swigluoai is gpt-oss's clamped
    SwiGLU as transformers' `GptOssExperts` computes it."""
    name: str = "silu"        # one of ACTIVATIONS
    alpha: float = 1.702      # swigluoai: gate · σ(alpha · gate)
    limit: float = 7.0        # swigluoai: gate <= limit, |up| <= limit

    def __post_init__(self):
        check_choice("activation", self.name, ACTIVATIONS)
        check_positive_real("alpha", self.alpha, fp32=True); check_positive_real("limit", self.limit, fp32=True)

    @classmethod
    def of(cls, config) -> "Activation":
        """The activation of a MoEConfig. ValueError naming `config` when it has no `swiglu_limit` (another object that
        has one but lacks `activation` gives AttributeError), or from `Activation` for its values. Source: moe-lit's
        own (MoEConfig's `activation`, `swiglu_alpha`, `swiglu_limit`)."""
        if not hasattr(config, "swiglu_limit"): raise ValueError(f"config: expected a MoEConfig, got {type(config).__name__}")
        return cls(config.activation, config.swiglu_alpha, config.swiglu_limit)

    def __repr__(self):
        return f"Activation({self.name!r})" if self.name == "silu" else f"Activation({self.name!r}, alpha={self.alpha}, limit={self.limit})"

    @property
    def code(self) -> int:
        """The Triton epilogues' constexpr: the index in ACTIVATIONS (0 silu, 1 swigluoai). Raises nothing (`name` was
        checked on construction). Source: moe-lit's own."""
        return ACTIVATIONS.index(self.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The activation of `x [..., 2·I]` in the accumulation dtype's precision, cast back to `x.dtype`. ValueError
        naming `x` (not a float tensor, or an odd last dim). Source: vLLM's `silu_and_mul` / `swigluoai_and_mul`:
        `(up + 1) · gate · σ(alpha · gate)` with gate <= limit and |up| <= limit."""
        if self.name == "silu": return silu_and_mul(x)
        check_tensor("x", x, dtype=FLOAT_DTYPES)
        if x.dim() < 1 or x.shape[-1] % 2:
            raise ValueError(f"x: expected an even last dim (gate then up), got shape {tuple(x.shape)}")
        gate, up = x.to(acc_dtype(x.dtype)).chunk(2, dim=-1)
        gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return ((up + 1) * gate * torch.sigmoid(self.alpha * gate)).to(x.dtype)

SILU = Activation()

# %%
#| test activation_definitions
x = torch.tensor([[1.0, 9.0, 3.0, -8.0]], dtype=torch.float64)   # gates (1, 9), ups (3, -8)
assert_close(Activation()(x), silu_and_mul(x))
g, u = torch.tensor([1.0, 7.0], dtype=torch.float64), torch.tensor([3.0, -7.0], dtype=torch.float64)   # clamped
assert_close(Activation("swigluoai")(x), ((u + 1) * g * torch.sigmoid(1.702 * g))[None])
test_eq(Activation("swigluoai").code, 1); test_eq(SILU.code, 0)
test_eq(Activation("swigluoai")(x.bfloat16()).dtype, torch.bfloat16)
test_fail(lambda: Activation("gelu"), contains="activation: expected one of")
test_fail(lambda: Activation("swigluoai")(torch.zeros(2, 3)), contains="x: expected an even last dim")

# %%
#| export
def gate_up_from_interleaved(t: torch.Tensor,   # [..., 2·I, ...] gate/up alternating along `dim` (gate at even positions)
                             dim: int = 1,       # the 2·I dimension (rows of w13 [E, 2·I, H]; columns of a bias [E, 2·I])
                            ) -> torch.Tensor:   # same shape and dtype (codes too): gate half, then up half
    """Reorder gate/up interleaved entries (gpt-oss's layout) into moe-lit's `w13` order: all gates, then all ups.
    ValueError naming `t` (not a tensor, `dim` out of range, or an odd size along `dim`)."""
    check_tensor("t", t)
    if not -t.dim() <= dim < t.dim() or t.shape[dim] % 2:
        raise ValueError(f"t: expected an even size along dim {dim}, got shape {tuple(t.shape)}")
    n = t.shape[dim]
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)]).to(t.device)
    return t.index_select(dim, order)

# %%
#| test gate_up_from_interleaved
x = torch.tensor([[10, 20, 11, 21, 12, 22]], dtype=torch.uint8)   # gate j at 2j, up j at 2j + 1
test_eq(gate_up_from_interleaved(x).tolist(), [[10, 11, 12, 20, 21, 22]])
test_eq(gate_up_from_interleaved(x.T, dim=0).T.tolist(), [[10, 11, 12, 20, 21, 22]])
test_fail(lambda: gate_up_from_interleaved(x[:, :5]), contains="t: expected an even size along dim 1")

# %%
#| export
def expert_mlp(x: torch.Tensor,   # [n, hidden_size], rows routed to one expert
               w13: torch.Tensor, # [2·intermediate_size, hidden_size], gate rows then up rows
               w2: torch.Tensor,  # [hidden_size, intermediate_size]
               w13_bias: torch.Tensor | None = None,  # [2·intermediate_size], added to GEMM1's output
               w2_bias: torch.Tensor | None = None,   # [hidden_size], added to GEMM2's output
               activation: Activation = SILU,         # the gated activation between the GEMMs
              ) -> torch.Tensor:  # [n, hidden_size] in the accumulation dtype (fp32, or fp64 for fp64 inputs)
    """One gated expert, with the kernels' precision: fp32 products (+ bias), the activation cast once to the input
    dtype. ValueError naming `x`, `w13`, `w2`, `w13_bias` or `w2_bias` (shape, float dtype, or another device than
    `x`) or `activation` (not an Activation). Source: the expert of vLLM's fused MoE (GEMM1 on w13, the gated
    activation, GEMM2 on w2; fused_moe.py)."""
    check_tensor("x", x, ndim=2, dtype=FLOAT_DTYPES)
    check_tensor("w13", w13, shape=(None, x.shape[1]), dtype=FLOAT_DTYPES)
    check_tensor("w2", w2, shape=(x.shape[1], w13.shape[0] // 2), dtype=FLOAT_DTYPES)
    if w13_bias is not None: check_tensor("w13_bias", w13_bias, shape=(w13.shape[0],), dtype=FLOAT_DTYPES)
    if w2_bias is not None: check_tensor("w2_bias", w2_bias, shape=(w2.shape[0],), dtype=FLOAT_DTYPES)
    if not isinstance(activation, Activation):
        raise ValueError(f"activation: expected an Activation, got {type(activation).__name__}")
    for n, t in (("w13", w13), ("w2", w2), ("w13_bias", w13_bias), ("w2_bias", w2_bias)):
        if t is not None and t.device != x.device: raise ValueError(f"{n}: expected device {x.device}, got {t.device}")
    acc = acc_dtype(x.dtype)
    h = x.to(acc) @ w13.to(acc).T
    if w13_bias is not None: h = h + w13_bias.to(acc)
    h = activation(h).to(x.dtype)                               # the fused GEMM1 epilogue writes x.dtype
    y = h.to(acc) @ w2.to(acc).T
    return y if w2_bias is None else y + w2_bias.to(acc)

# %%
#| test expert_mlp_matches_definition
torch.manual_seed(0)
x, w13, w2 = torch.randn(5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
g, u = x @ w13[:3].T, x @ w13[3:].T
assert_close(expert_mlp(x, w13, w2), (g * torch.sigmoid(g) * u) @ w2.T)
test_eq(expert_mlp(x.bfloat16(), w13.bfloat16(), w2.bfloat16()).dtype, torch.float32)
test_fail(lambda: expert_mlp(x[:, :7], w13, w2), contains="w13: expected shape [*, 7]")
test_fail(lambda: expert_mlp(x[0], w13, w2), contains="x: expected a 2-D tensor")

# %%
#| test expert_mlp_bias_and_swigluoai
torch.manual_seed(0)
x, w13, w2 = torch.randn(5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
b13, b2 = torch.randn(6, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
h = x @ w13.T + b13
want = Activation("swigluoai")(h) @ w2.T + b2
assert_close(expert_mlp(x, w13, w2, b13, b2, Activation("swigluoai")), want)
test_fail(lambda: expert_mlp(x, w13, w2, b13[:5]), contains="w13_bias: expected shape [6]")
test_fail(lambda: expert_mlp(x, w13, w2, activation="silu"), contains="activation: expected an Activation")

# %% [markdown]
# ## Standard format
#
# The reference loops over local experts. For each expert it gathers the `(token, slot)` pairs routed to it, runs the
# expert once on those rows, and adds the weighted result into an accumulator. An expert with no pairs is skipped
# before its weights are touched; a non-local id (`-1` after `expert_map`) never matches an expert, so it contributes
# exactly 0 — it cannot wrap around to expert `E - 1` as a negative index would (vLLM #46408).

# %%
#| export
def _local_ids(topk_ids, num_local_experts, expert_map):
    "Map global ids to local slots through `expert_map` (-1 stays -1); without a map the ids must be local."
    if expert_map is None:
        bad = (topk_ids >= num_local_experts) | (topk_ids < -1)
        if bad.any(): raise ValueError(f"topk_ids: expected values in [-1, {num_local_experts}) without an expert_map, "
                                       f"got {topk_ids[bad][0].item()}")
        return topk_ids.long()
    check_tensor("expert_map", expert_map, ndim=1, dtype=torch.int32)
    if expert_map.numel() and ((expert_map < -1) | (expert_map >= num_local_experts)).any():
        raise ValueError(f"expert_map: expected values in [-1, {num_local_experts}), got "
                         f"{expert_map.min().item()}..{expert_map.max().item()}")
    if ((topk_ids >= expert_map.shape[0]) | (topk_ids < -1)).any():
        raise ValueError(f"topk_ids: expected values in [-1, {expert_map.shape[0]}), got {topk_ids.min().item()}.."
                         f"{topk_ids.max().item()}")
    return torch.where(topk_ids >= 0, expert_map.to(topk_ids.device)[topk_ids.clamp(min=0).long()].long(), -1)

# %%
#| export
def _check_moe_args(hidden, w13, w2, topk_weights, topk_ids, ids_name="topk_ids"):
    check_tensor("hidden", hidden, ndim=2, dtype=FLOAT_DTYPES)
    T, H = hidden.shape
    check_tensor("w13", w13, ndim=3, dtype=FLOAT_DTYPES)
    E, two_i = w13.shape[0], w13.shape[1]
    check_tensor("w13", w13, shape=(E, None, H))
    if two_i % 2: raise ValueError(f"w13: expected an even dim 1 (2·intermediate_size), got {two_i}")
    check_tensor("w2", w2, shape=(E, H, two_i // 2), dtype=w13.dtype)
    check_tensor(ids_name, topk_ids, shape=(T, None), dtype=(torch.int32, torch.int64))
    check_tensor("topk_weights", topk_weights, shape=tuple(topk_ids.shape), dtype=torch.float32)
    return T, H, E

def _check_expert_bias(w13_bias, w2_bias, w13, w2, activation):
    "Expert biases, when given, have one row per local expert (`w13_bias [E, 2·I]`, `w2_bias [E, H]`); an Activation."
    if w13_bias is not None: check_tensor("w13_bias", w13_bias, shape=tuple(w13.shape[:2]), dtype=FLOAT_DTYPES)
    if w2_bias is not None: check_tensor("w2_bias", w2_bias, shape=tuple(w2.shape[:2]), dtype=FLOAT_DTYPES)
    if not isinstance(activation, Activation):        # checked even when no expert gets a token
        raise ValueError(f"activation: expected an Activation, got {type(activation).__name__}")

def _row(t, e):
    "Row `e` of an optional per-expert tensor."
    return None if t is None else t[e]

# %%
#| export
def moe_reference_standard(hidden: torch.Tensor,        # [num_tokens, hidden_size] f64/f32/f16/bf16
                           w13: torch.Tensor,           # [num_local_experts, 2·intermediate_size, hidden_size]
                           w2: torch.Tensor,            # [num_local_experts, hidden_size, intermediate_size]
                           topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
                           topk_ids: torch.Tensor,      # [num_tokens, top_k] int32/int64, global ids (-1 = none)
                           expert_map: torch.Tensor | None = None,  # [num_experts] int32, global -> local or -1
                           apply_router_weight_on_input: bool = False,  # scale the input row, not the output
                           accumulate_into: torch.Tensor | None = None,  # [num_tokens, hidden_size] fp32/fp64
                           w13_bias: torch.Tensor | None = None,  # [num_local_experts, 2·intermediate_size]
                           w2_bias: torch.Tensor | None = None,   # [num_local_experts, hidden_size]
                           activation: Activation = SILU,         # the experts' gated activation
                          ) -> torch.Tensor:            # [num_tokens, hidden_size], hidden's dtype
    """Standard-format MoE: per local expert, gather its (token, slot) pairs, run the expert, weighted-add the rows.
    ValueError naming `hidden`, `w13`, `w2`, `topk_weights`, `topk_ids` (shape, dtype, or ids outside the map's or
    the local range), `expert_map`, a bias, `activation`, `apply_router_weight_on_input` or `accumulate_into` (not
    `[T, H]` in the accumulation dtype). Source: the Standard path of vLLM's modular kernel (reference study §2.1),
    written as a loop over experts."""
    T, H, E = _check_moe_args(hidden, w13, w2, topk_weights, topk_ids)
    _check_expert_bias(w13_bias, w2_bias, w13, w2, activation)
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    local = _local_ids(topk_ids, E, expert_map)
    acc = acc_dtype(hidden.dtype)
    out = torch.zeros(T, H, dtype=acc, device=hidden.device) if accumulate_into is None else accumulate_into
    check_tensor("accumulate_into", out, shape=(T, H), dtype=acc)
    for e in range(E):
        tok, slot = (local == e).nonzero(as_tuple=True)
        if tok.numel() == 0: continue                       # no pairs: the weights are never read
        w = topk_weights[tok, slot].to(acc)[:, None]
        x = hidden[tok]
        if apply_router_weight_on_input: x = (x.to(acc) * w).to(hidden.dtype)
        y = expert_mlp(x, w13[e], w2[e], _row(w13_bias, e), _row(w2_bias, e), activation)
        out.index_add_(0, tok, y if apply_router_weight_on_input else y * w)
    return out if accumulate_into is not None else out.to(hidden.dtype)

# %% [markdown]
# The definition, written once more as directly as possible — a loop over tokens and slots in float64 — pins the
# reference. `-1` ids and ids mapped to `-1` contribute nothing; the output dtype is the input's.

# %%
#| test standard_matches_definition
torch.manual_seed(1)
T, H, I, E, k = 7, 16, 8, 5, 3
hidden = torch.randn(T, H, dtype=torch.float64)
w13, w2 = torch.randn(E, 2 * I, H, dtype=torch.float64) / 4, torch.randn(E, H, I, dtype=torch.float64) / 3
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int(); ids[2, 1] = -1
wts = torch.rand(T, k)
want = torch.zeros(T, H, dtype=torch.float64)
for t in range(T):
    for j in range(k):
        if ids[t, j] < 0: continue
        g, u = (w13[ids[t, j]] @ hidden[t]).chunk(2)
        want[t] += wts[t, j].double() * (w2[ids[t, j]] @ (torch.nn.functional.silu(g) * u))
got = moe_reference_standard(hidden, w13, w2, wts, ids)
test_eq(got.dtype, torch.float64); assert_close(got, want)
for dt in (torch.float32, torch.float16, torch.bfloat16):   # the low-precision paths stay within the dtype's tolerance
    assert_close(moe_reference_standard(hidden.to(dt), w13.to(dt), w2.to(dt), wts, ids), want, name=str(dt))

# %% [markdown]
# With an `expert_map`, a rank computes only its local experts; summing the ranks' outputs gives the single-device
# result. The test splits 6 experts over 2 ranks.

# %%
#| test standard_expert_map_split
torch.manual_seed(2)
T, H, I, E, k = 9, 8, 4, 6, 2
hidden = torch.randn(T, H, dtype=torch.float64)
w13, w2 = torch.randn(E, 2 * I, H, dtype=torch.float64), torch.randn(E, H, I, dtype=torch.float64)
ids, wts = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int(), torch.rand(T, k)
full = moe_reference_standard(hidden, w13, w2, wts, ids)
parts = []
for owned in (torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])):
    emap = torch.full((E,), -1, dtype=torch.int32); emap[owned] = torch.arange(3, dtype=torch.int32)
    parts.append(moe_reference_standard(hidden, w13[owned], w2[owned], wts, ids, expert_map=emap))
assert_close(parts[0] + parts[1], full)
test_fail(lambda: moe_reference_standard(hidden, w13[:3], w2[:3], wts, ids), contains="topk_ids: expected values in [-1, 3)")
bad_map = torch.tensor([0, 1, 2, 7, -1, -1], dtype=torch.int32)                  # 7 is no local expert of 3
test_fail(lambda: moe_reference_standard(hidden, w13[:3], w2[:3], wts, ids, expert_map=bad_map),
          contains="expert_map: expected values in [-1, 3), got -1..7")

# %% [markdown]
# `accumulate_into` lets a caller stream the experts in chunks into one fp32 (or fp64) buffer; adding the chunks
# in ascending expert order gives **bitwise** the same accumulator as one call over all experts, because each expert's
# rows and the order of the additions are the same. `moe-lit run` uses this to compute the single-device result of a
# model whose weights do not fit in memory at once.

# %%
#| test standard_chunked_is_bitwise_equal
torch.manual_seed(3)
T, H, I, E, k = 12, 16, 8, 8, 3
hidden = torch.randn(T, H).bfloat16()
w13, w2 = (torch.randn(E, 2 * I, H) / 4).bfloat16(), (torch.randn(E, H, I) / 3).bfloat16()
ids, wts = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int(), torch.rand(T, k)
acc = torch.zeros(T, H)
for chunk in (torch.arange(0, 3), torch.arange(3, 8)):
    emap = torch.full((E,), -1, dtype=torch.int32); emap[chunk] = torch.arange(len(chunk), dtype=torch.int32)
    moe_reference_standard(hidden, w13[chunk], w2[chunk], wts, ids, expert_map=emap, accumulate_into=acc)
assert torch.equal(acc.bfloat16(), moe_reference_standard(hidden, w13, w2, wts, ids))

# %%
#| test standard_bad_input
h, w13, w2 = torch.zeros(4, 8), torch.zeros(2, 6, 8), torch.zeros(2, 8, 3)
ids, wts = torch.zeros(4, 1, dtype=torch.int32), torch.ones(4, 1)
test_fail(lambda: moe_reference_standard(h[0], w13, w2, wts, ids), contains="hidden: expected a 2-D tensor")
test_fail(lambda: moe_reference_standard(h, w13[:, :, :4], w2, wts, ids), contains="w13: expected shape [2, *, 8]")
test_fail(lambda: moe_reference_standard(h, w13, w2[:, :, :2], wts, ids), contains="w2: expected shape [2, 8, 3]")
test_fail(lambda: moe_reference_standard(h, w13, w2, wts.double(), ids), contains="topk_weights: expected dtype torch.float32")
test_fail(lambda: moe_reference_standard(h, w13, w2, wts, ids.float()), contains="topk_ids: expected dtype")
test_fail(lambda: moe_reference_standard(h, w13, w2, wts[:3], ids[:3]), contains="topk_ids: expected shape [4, *]")
test_fail(lambda: moe_reference_standard(h, w13.double(), w2, wts, ids), contains="w2: expected dtype torch.float64")
test_fail(lambda: moe_reference_standard(h, w13.int(), w2, wts, ids), contains="w13: expected dtype")

# %% [markdown]
# ## BatchedExperts format
#
# Three steps, each the plain-torch spec of a later Triton kernel.
#
# **Dispatch** scatters each `(token, slot)` pair routed to a local expert into the next free row of that expert's
# slab. Rows are filled in ascending `(token, slot)` order, which makes the reference deterministic (a GPU dispatch
# may order them differently; tests check values, not row order). The `slot_map [num_tokens, top_k]` records where
# each pair went as `e · max_tokens + row`, or `-1` when its expert is not local. The caller passes local ids — the
# placement turns global ids into local ones through `expert_map` or the round-robin `global_to_physical` table
# (`Placement.local_slot`), so one dispatch serves both.

# %%
#| export
def dispatch_batched_reference(hidden: torch.Tensor,     # [num_tokens, hidden_size]
                               local_ids: torch.Tensor,  # [num_tokens, top_k] int32/int64, local expert or -1
                               num_local_experts: int,   # E_local, slabs to fill
                               max_tokens: int,          # rows per slab (capacity)
                               topk_weights: torch.Tensor | None = None,  # [num_tokens, top_k] fp32: scale rows
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scatter pairs into `a [E_local, max_tokens, H]` (padding NaN); returns `(a, expert_num_tokens, slot_map)`.
    ValueError naming `hidden`, `local_ids` (shape, dtype, values outside [-1, E_local)), `topk_weights`,
    `num_local_experts` or `max_tokens` (not an int >= 1, or a capacity overflow). Source: the prepare step of vLLM's
    `BatchedPrepareAndFinalize` (which zero-fills where this pads with NaN)."""
    check_tensor("hidden", hidden, ndim=2, dtype=FLOAT_DTYPES)
    T, H = hidden.shape
    check_tensor("local_ids", local_ids, shape=(T, None), dtype=(torch.int32, torch.int64))
    if topk_weights is not None:
        check_tensor("topk_weights", topk_weights, shape=tuple(local_ids.shape), dtype=torch.float32)
    check_int("num_local_experts", num_local_experts, lo=1)
    check_int("max_tokens", max_tokens, lo=1)
    if ((local_ids < -1) | (local_ids >= num_local_experts)).any():
        raise ValueError(f"local_ids: expected values in [-1, {num_local_experts}), got "
                         f"{local_ids.min().item()}..{local_ids.max().item()}")
    flat = local_ids.reshape(-1).long()
    counts = torch.bincount(flat[flat >= 0], minlength=num_local_experts)
    if counts.numel() and counts.max() > max_tokens:
        raise ValueError(f"max_tokens: expected >= {counts.max().item()} (the busiest local expert's pairs), "
                         f"got {max_tokens}: capacity overflow")
    onehot = (flat[:, None] == torch.arange(num_local_experts, device=flat.device)[None, :]).long()
    row = (onehot.cumsum(0) - 1).gather(1, flat.clamp(min=0)[:, None])[:, 0]   # rank of the pair in its expert
    slot_map = torch.where(flat >= 0, flat * max_tokens + row, -1)
    a = torch.full((num_local_experts * max_tokens, H), float("nan"), dtype=hidden.dtype, device=hidden.device)
    src = hidden.repeat_interleave(local_ids.shape[1], dim=0)
    if topk_weights is not None:
        src = (src.to(acc_dtype(hidden.dtype)) * topk_weights.reshape(-1, 1).to(acc_dtype(hidden.dtype))).to(hidden.dtype)
    a[slot_map[slot_map >= 0]] = src[slot_map >= 0]
    return a.view(num_local_experts, max_tokens, H), counts.int(), slot_map.view(T, local_ids.shape[1])

# %%
#| test dispatch_batched
h = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 2)        # token t's row is [t, t]
ids = torch.tensor([[1, 0], [1, -1], [2, 1], [0, 2]], dtype=torch.int32)
a, counts, slot_map = dispatch_batched_reference(h, ids, 3, 4)
test_eq(counts.tolist(), [2, 3, 2]); test_eq(counts.dtype, torch.int32)
test_eq(a[1, :3, 0].tolist(), [0.0, 1.0, 2.0])                          # expert 1 received tokens 0, 1, 2 in order
test_eq(slot_map.tolist(), [[4, 0], [5, -1], [8, 6], [1, 9]])
assert a[0, 2:].isnan().all() and a[1, 3:].isnan().all()                # padding is NaN: readers are caught
test_fail(lambda: dispatch_batched_reference(h, ids, 3, 2), contains="max_tokens: expected >= 3")
test_fail(lambda: dispatch_batched_reference(h, ids, 2, 4), contains="local_ids: expected values in [-1, 2)")
test_fail(lambda: dispatch_batched_reference(h, ids, 3, 4, topk_weights=torch.ones(2, 4)), contains="topk_weights: expected shape [4, 2]")
test_fail(lambda: dispatch_batched_reference(h.long(), ids, 3, 4), contains="hidden: expected dtype")
a, counts, slot_map = dispatch_batched_reference(h[:0], ids[:0], 3, 4)                  # zero tokens
test_eq((tuple(slot_map.shape), counts.tolist()), ((0, 2), [0, 0, 0]))

# %% [markdown]
# **Experts** run on the valid rows of each slab only. Rows `>= expert_num_tokens[e]` of the output are left exactly as
# they were (NaN when the reference allocates the output), and experts with no rows are skipped before their weights
# are read.

# %%
#| export
def slab_counts(expert_num_tokens: torch.Tensor,  # [E] int32/int64, valid leading rows of each expert's slab
                E: int,                           # experts (slabs)
                max_tokens: int,                  # rows a slab holds
                dtype=(torch.int32, torch.int64), # dtypes accepted
               ) -> list[int]:
    """The counts as a Python list, each checked to lie in `[0, max_tokens]`: a negative count would slice rows from
    the end of a slab and a larger one be cut to it, both silently. One device sync: for specs and validated paths,
    never the hot path. ValueError naming `expert_num_tokens` (not `[E]` of `dtype`, or a count outside the range).
    Source: moe-lit's own (the batched format's count contract, vLLM's `expert_num_tokens`)."""
    check_tensor("expert_num_tokens", expert_num_tokens, shape=(E,), dtype=dtype)
    counts = expert_num_tokens.tolist()
    if any(not 0 <= n <= max_tokens for n in counts):
        raise ValueError(f"expert_num_tokens: expected values in [0, {max_tokens}] (max_tokens), got {counts}")
    return counts

# %%
#| test slab_counts
test_eq(slab_counts(torch.tensor([0, 3, 4], dtype=torch.int32), 3, 4), [0, 3, 4])
for bad in ([-1, 0, 0], [0, 5, 0]):              # -1 would slice all but the last row, 5 be cut to the slab's 4
    test_fail(lambda: slab_counts(torch.tensor(bad), 3, 4), contains=f"expert_num_tokens: expected values in [0, 4] (max_tokens), got {bad}")
test_fail(lambda: slab_counts(torch.tensor([1, 2]), 3, 4), contains="expert_num_tokens: expected shape [3]")
test_fail(lambda: slab_counts(torch.tensor([1., 2., 3.]), 3, 4), contains="expert_num_tokens: expected dtype")

# %%
#| export
def experts_reference_batched(a: torch.Tensor,                  # [E_local, max_tokens, hidden_size]
                              expert_num_tokens: torch.Tensor,  # [E_local] int32, valid leading rows
                              w13: torch.Tensor,                # [E_local, 2·intermediate_size, hidden_size]
                              w2: torch.Tensor,                 # [E_local, hidden_size, intermediate_size]
                              out: torch.Tensor | None = None,  # [E_local, max_tokens, hidden_size], a's dtype
                              w13_bias: torch.Tensor | None = None,  # [E_local, 2·intermediate_size]
                              w2_bias: torch.Tensor | None = None,   # [E_local, hidden_size]
                              activation: Activation = SILU,         # the experts' gated activation
                             ) -> torch.Tensor:                 # `out`; rows >= count untouched
    """Batched-format experts: `out[e, :n_e] = expert_e(a[e, :n_e])`; padding rows are never read or written.
    ValueError naming `a`, `expert_num_tokens` (not `[E]` int32, or a count outside [0, max_tokens]), `w13`, `w2`,
    a bias, `activation` or `out`. Source: the contract of vLLM's `BatchedTritonExperts`
    (experts/fused_batched_moe.py)."""
    check_tensor("a", a, ndim=3, dtype=FLOAT_DTYPES)
    E, M, H = a.shape
    counts = slab_counts(expert_num_tokens, E, M, torch.int32)
    check_tensor("w13", w13, shape=(E, None, H), dtype=a.dtype)
    if w13.shape[1] % 2: raise ValueError(f"w13: expected an even dim 1 (2·intermediate_size), got {w13.shape[1]}")
    check_tensor("w2", w2, shape=(E, H, w13.shape[1] // 2), dtype=a.dtype)
    _check_expert_bias(w13_bias, w2_bias, w13, w2, activation)
    out = torch.full_like(a, float("nan")) if out is None else check_tensor("out", out, shape=(E, M, H), dtype=a.dtype)
    for e, n in enumerate(counts):
        if n: out[e, :n] = expert_mlp(a[e, :n], w13[e], w2[e], _row(w13_bias, e), _row(w2_bias, e), activation).to(a.dtype)
    return out

# %% [markdown]
# **Combine** returns each pair's output row to its token and applies the router weight there (unless it was applied
# on the input at dispatch). Pairs with `slot_map == -1` are *selected out* (`torch.where`), not multiplied by zero —
# `0 · NaN` is NaN, and the padding of the slabs is NaN.

# %%
#| export
def combine_batched_reference(expert_out: torch.Tensor,    # [E_local, max_tokens, hidden_size]
                              topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
                              slot_map: torch.Tensor,      # [num_tokens, top_k] int64, e·max_tokens+row or -1
                              apply_router_weight_on_input: bool = False,  # weights were applied at dispatch
                             ) -> torch.Tensor:            # [num_tokens, hidden_size], expert_out's dtype
    """Weighted sum over the `top_k` slots of each token: `out[t] = Σ_k w[t,k]·expert_out.flat[slot_map[t,k]]`.
    ValueError naming `expert_out`, `topk_weights`, `slot_map` (shape, dtype, values outside [-1, E·max_tokens)) or
    `apply_router_weight_on_input`. Source: the finalize of vLLM's `BatchedPrepareAndFinalize`
    (`TopKWeightAndReduceNaiveBatched`)."""
    check_tensor("expert_out", expert_out, ndim=3, dtype=FLOAT_DTYPES)
    check_tensor("topk_weights", topk_weights, ndim=2, dtype=torch.float32)
    check_tensor("slot_map", slot_map, shape=tuple(topk_weights.shape), dtype=torch.int64)
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    E, M, H = expert_out.shape
    if E * M == 0:                                     # an empty slab: nothing is local, every token gets 0
        if (slot_map >= 0).any(): raise ValueError(f"slot_map: expected only -1 for an empty expert_out, got {slot_map.max().item()}")
        return torch.zeros(slot_map.shape[0], H, dtype=expert_out.dtype, device=expert_out.device)
    if ((slot_map < -1) | (slot_map >= E * M)).any():
        raise ValueError(f"slot_map: expected values in [-1, {E * M}), got {slot_map.min().item()}..{slot_map.max().item()}")
    acc = acc_dtype(expert_out.dtype)
    rows = expert_out.reshape(E * M, H)[slot_map.clamp(min=0)].to(acc)          # [T, top_k, H]
    w = torch.ones_like(topk_weights) if apply_router_weight_on_input else topk_weights
    valid = (slot_map >= 0)[..., None]
    return torch.where(valid, rows * w[..., None].to(acc), 0).sum(1).to(expert_out.dtype)

# %% [markdown]
# `moe_reference_batched` composes the three steps. It equals the Standard reference on the same inputs — the test
# below checks it for several dtypes, with the slabs' padding poisoned twice (NaN, then 1e30) so a leaking row shows.

# %%
#| export
def moe_reference_batched(hidden: torch.Tensor,        # [num_tokens, hidden_size]
                          w13: torch.Tensor,           # [E_local, 2·intermediate_size, hidden_size]
                          w2: torch.Tensor,            # [E_local, hidden_size, intermediate_size]
                          topk_weights: torch.Tensor,  # [num_tokens, top_k] float32
                          local_ids: torch.Tensor,     # [num_tokens, top_k] int32/int64, local expert or -1
                          max_tokens: int | None = None,  # slab capacity; default: the busiest local expert's pairs
                          apply_router_weight_on_input: bool = False,
                          w13_bias: torch.Tensor | None = None,  # [E_local, 2·intermediate_size]
                          w2_bias: torch.Tensor | None = None,   # [E_local, hidden_size]
                          activation: Activation = SILU,         # the experts' gated activation
                         ) -> torch.Tensor:            # [num_tokens, hidden_size], hidden's dtype
    """BatchedExperts-format MoE: dispatch -> experts on valid rows -> weighted combine. ValueError as
    `moe_reference_standard`'s for the tensors (`local_ids` in place of `topk_ids`), and from the three steps
    below (`max_tokens` too small: capacity overflow). Source: vLLM's `BatchedPrepareAndFinalize` with batched
    experts (reference study §2.2)."""
    _check_moe_args(hidden, w13, w2, topk_weights, local_ids, "local_ids")
    check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
    if max_tokens is None:                              # enough for any routing, duplicates in a row included
        flat = local_ids.reshape(-1).long()
        max_tokens = max(1, int(torch.bincount(flat[flat >= 0], minlength=1).max()) if flat.numel() else 1)
    check_int("max_tokens", max_tokens, lo=1)
    a, counts, slot_map = dispatch_batched_reference(
        hidden, local_ids, w13.shape[0], max_tokens, topk_weights if apply_router_weight_on_input else None)
    y = experts_reference_batched(a, counts, w13, w2, w13_bias=w13_bias, w2_bias=w2_bias, activation=activation)
    return combine_batched_reference(y, topk_weights, slot_map, apply_router_weight_on_input)

# %%
#| test batched_equals_standard
torch.manual_seed(4)
T, H, I, E, k = 10, 16, 8, 4, 2
hidden = torch.randn(T, H, dtype=torch.float64)
w13, w2 = torch.randn(E, 2 * I, H, dtype=torch.float64) / 4, torch.randn(E, H, I, dtype=torch.float64) / 3
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int(); ids[0, 0] = -1; ids[5, 1] = -1
ids[:, 0] = torch.where(ids[:, 0] == 3, -1, ids[:, 0])                          # expert 3 gets fewer tokens
wts = torch.rand(T, k)
want = moe_reference_standard(hidden, w13, w2, wts, ids)
assert_close(moe_reference_batched(hidden, w13, w2, wts, ids), want)
for dt in (torch.float32, torch.bfloat16):
    assert_close(moe_reference_batched(hidden.to(dt), w13.to(dt), w2.to(dt), wts, ids), want, name=str(dt))
dup = torch.zeros(T, k, dtype=torch.int32)                                     # every slot on expert 0, twice per token
assert_close(moe_reference_batched(hidden, w13, w2, wts, dup), moe_reference_standard(hidden, w13, w2, wts, dup))
test_eq(moe_reference_batched(hidden[:0], w13, w2, wts[:0], ids[:0]).shape, (0, H))   # zero tokens
test_fail(lambda: moe_reference_batched(hidden, w13, w2, wts, ids, max_tokens=0), contains="max_tokens: expected >= 1")
for poison in (float("nan"), 1e30):                                            # padding can never leak
    a, counts, slot_map = dispatch_batched_reference(hidden, ids, E, T)
    poison_rows(a, counts, poison)
    y = experts_reference_batched(a, counts, w13, w2, out=poison_rows(torch.zeros_like(a), counts, poison))
    assert_close(combine_batched_reference(y, wts, slot_map), want)
    pad = torch.arange(T)[None, :] >= counts[:, None]                           # [E, T] rows past the count
    assert y[pad].isnan().all() if poison != poison else (y[pad] == poison).all()  # padding rows untouched

# %%
#| test biased_swigluoai_both_formats
torch.manual_seed(5)
T, H, I, E, k = 10, 16, 8, 4, 2
hidden = torch.randn(T, H, dtype=torch.float64)
w13, w2 = torch.randn(E, 2 * I, H, dtype=torch.float64) / 4, torch.randn(E, H, I, dtype=torch.float64) / 3
ids = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int(); ids[0, 0] = -1
wts = torch.rand(T, k)
b13, b2 = torch.randn(E, 2 * I, dtype=torch.float64), torch.randn(E, H, dtype=torch.float64)
act = Activation("swigluoai", limit=0.5)                                          # small limit: the clamps bite
want = torch.zeros(T, H, dtype=torch.float64)
for t in range(T):
    for j in range(k):
        e = int(ids[t, j])
        if e < 0: continue
        want[t] += wts[t, j].double() * (w2[e] @ act((w13[e] @ hidden[t] + b13[e])[None])[0] + b2[e])
kw = dict(w13_bias=b13, w2_bias=b2, activation=act)
assert_close(moe_reference_standard(hidden, w13, w2, wts, ids, **kw), want)
assert_close(moe_reference_batched(hidden, w13, w2, wts, ids, **kw), want)
test_fail(lambda: moe_reference_standard(hidden, w13, w2, wts, ids, w2_bias=b2[:, :3]), contains="w2_bias: expected shape")

# %% [markdown]
# Applying the router weight on the input (Llama-4 does it with `top_k = 1`) means `out[t] = Σ_k E_k(w_tk · x_t)`.
# Unlike vLLM, which supports it only for `top_k = 1`, it is defined here for any `top_k`, because each `(token, slot)`
# pair has its own row. The weight is applied exactly once — at dispatch — and the combine then sums with weight 1
# (vLLM #43694 applied it twice). The test compares both formats with the explicit definition.

# %%
#| test router_weight_on_input
torch.manual_seed(5)
T, H, I, E, k = 6, 8, 4, 3, 2
hidden = torch.randn(T, H, dtype=torch.float64)
w13, w2 = torch.randn(E, 2 * I, H, dtype=torch.float64), torch.randn(E, H, I, dtype=torch.float64)
ids, wts = torch.stack([torch.randperm(E)[:k] for _ in range(T)]).int(), torch.rand(T, k)
on_in_std = moe_reference_standard(hidden, w13, w2, wts, ids, apply_router_weight_on_input=True)
assert_close(moe_reference_batched(hidden, w13, w2, wts, ids, apply_router_weight_on_input=True), on_in_std)
# explicit definition: out[t] = Σ_k E_k(w·x)
want = torch.zeros(T, H, dtype=torch.float64)
for t in range(T):
    for j in range(k):
        want[t] += expert_mlp((wts[t, j].double() * hidden[t])[None], w13[ids[t, j]], w2[ids[t, j]])[0]
assert_close(on_in_std, want)
