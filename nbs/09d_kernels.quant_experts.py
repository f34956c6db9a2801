# %%
#| default_exp kernels.quant_experts

# %% [markdown]
# # Quantized experts
# > Both GEMMs of an expert layer on quantized weights in one call, in the BatchedExperts and the Standard format: expert biases, the clamped SwiGLU, and the intermediate re-quantized between the GEMMs for w8a8.

# %%
#| export
from __future__ import annotations
import torch
from moe_lit.terms import check_int, check_tensor, check_bool, check_disjoint, check_choice
from moe_lit.quant import QUANT_SCHEME_TABLE
from moe_lit.config import ActivationFormat
from moe_lit.formats import Activation, SILU
from moe_lit.quant_weights import QuantizedExpertWeights, ACTIVATION_GRANULARITY, check_quant_weights
from moe_lit.kernels.batched import check_expert_bias, check_kernel_device
from moe_lit.kernels.contiguous import check_block_m, check_local_ids, _align_pairs, TritonExperts
from moe_lit.kernels.dispatch import _combine_pairs, _no_pairs, check_addend
from moe_lit.kernels.batched import check_extent
from moe_lit.kernels.quant import ACTIVATION_DTYPES, batched_moe_gemm_quant, batched_gemm_quant_reference
from moe_lit.kernels.quant import fused_moe_gemm_quant_reference, quant_block_m
from moe_lit.kernels.quant import _weight_kernel_args, _prepare_activations, _fused_moe_gemm_quant, _batched_moe_gemm_quant
from moe_lit.kernels.quant import _check_act_scale_values

# %%
#| hide
from moe_lit.kernels.batched import DEVICE
from unittest import mock
from moe_lit.quant import QUANT_SCHEMES
from moe_lit.testing import poison_rows, assert_quant_close, quant_error, experts_tolerance
from moe_lit.quant_weights import quantize_expert_weights, random_expert_weights, random_activations
from moe_lit.kernels.quant_act import fp8_quantize_activations
from moe_lit.kernels.quant import fused_moe_gemm_quant
from moe_lit.kernels.contiguous import moe_align_block_size
from fastcore.test import test_eq, test_fail
from moe_lit.formats import moe_reference_standard

# %% [markdown]
# In this notebook: the experts `BatchedTritonQuantExperts` (BatchedExperts format) and `TritonQuantExperts`
# (Standard format), each beside its float64 spec (`quant_experts_reference_batched`,
# `quant_experts_reference_standard`). They chain the two quantized GEMMs of `09c_kernels.quant` — GEMM1 with the
# gated activation, GEMM2 — with the weights of `09a_quant_weights` and, for w8a8, the activation quantizer of
# `09b_kernels.quant_act` between them. `10_modular` wraps both classes as the layer's quantized experts.

# %% [markdown]
# ## The two classes
#
# Both classes run GEMM1 (with the expert bias and the gated activation), quantize the intermediate again for w8a8,
# and run GEMM2 (with its expert bias) — all in the chosen scheme. Their `apply` has the shape of the unquantized
# experts (`06`'s `BatchedTritonExperts`, `08`'s `TritonExperts`) with the two weight tensors replaced by **one
# `QuantizedExpertWeights`**: the scheme, codes, scales and the unpadded sizes travel together, so a call cannot pair
# `w13` of one scheme with `w2`'s scales of another. The activations keep their own dtype (bf16/fp16); the
# intermediate is stored in it between the GEMMs.
#
# The expert semantics are the unquantized experts': `activation` is an `Activation` (`SILU` by default;
# `Activation("swigluoai")` for gpt-oss), and the optional biases `w13_bias [E, 2·I]` and `w2_bias [E, H]`
# (bf16/fp16/fp32) stay unquantized — gpt-oss's MXFP4 checkpoints store them in bf16 beside the codes. Each is added
# to its GEMM's real-valued fp32 output: `b13` before the activation, `b2` before the router weight when that is
# applied on the output (Standard format) — the batched format leaves the router weight to the combine.
#
# > **Where the intermediate is quantized.** Between the GEMMs the Triton activation quantizer runs on the stored
# > intermediate (a separate launch, not fused into GEMM1's epilogue: a per-token scale needs the whole row, which
# > spans N tiles). In the Standard format the rows of pairs this rank does not compute are never written by GEMM1;
# > for the per-tensor scheme, whose one scale spans every row, the intermediate is zero-initialised so that those rows
# > cannot enter the |max|.

# %%
#| export
def _check_expert_semantics(qw, w13_bias, w2_bias, activation, device):
    "The experts' activation (an `Activation`) and biases (`w13_bias [E, 2·I]`, `w2_bias [E, H]`) against `qw`."
    check_quant_weights(qw)                                       # (checked again after an in-place edit)
    if not isinstance(activation, Activation):
        raise ValueError(f"activation: expected an Activation, got {type(activation).__name__}")
    E = qw.num_experts
    check_expert_bias("w13_bias", w13_bias, E, 2 * qw.intermediate_size, device)
    check_expert_bias("w2_bias", w2_bias, E, qw.hidden_size, device)

# %%
#| export
class BatchedTritonQuantExperts:
    """Batched-format experts, quantized: `h = act(a @ W13ᵀ + b13)`, `out = h @ W2ᵀ + b2` on valid rows (FP8 w8a8 or
    FP4 w4a16). Construction takes no argument and raises nothing; `apply` checks its inputs. Source: vLLM's
    `BatchedTritonExperts` (fused_moe/fused_batched_moe.py), with moe-lit's own FP4 decode."""
    activation_format = ActivationFormat.BatchedExperts

    def apply(self, a: torch.Tensor,                   # [E, max_tokens, H] bf16/fp16, or float8 with a_scale (w8a8)
              expert_num_tokens: torch.Tensor,         # [E] int32
              qw: QuantizedExpertWeights,              # both weights of the E local experts
              expected_m: int | None = None,           # expected valid rows per expert (tile choice)
              out: torch.Tensor | None = None,         # [E, max_tokens, H]; rows >= count never written
              a_scale: torch.Tensor | None = None,     # pre-quantized a's scales (see batched_moe_gemm_quant)
              out_dtype: torch.dtype | None = None,    # dtype of h and the output for fp8 a (default bf16)
              w13_bias: torch.Tensor | None = None,    # [E, 2·I] bf16/fp16/fp32, added before the activation
              w2_bias: torch.Tensor | None = None,     # [E, H] bf16/fp16/fp32, added to GEMM2's output
              activation: Activation = SILU,           # the gated activation between the GEMMs
              validate: bool = True,                   # check the counts on the host (one sync; off in hot paths)
              active_experts: int | None = None,       # expected experts with rows (split-K choice; default E)
              max_active_experts: int | None = None,   # a bound on the experts with rows (the grid's expert slots)
             ) -> torch.Tensor:
        """Run the quantized experts on the valid rows of each slab (the two launches share the count validation):
        `[E, max_tokens, H]`, `out_dtype` (bf16 for float8 `a`) or `a`'s dtype. ValueError naming `a`, `qw`,
        `activation`, `w13_bias`, `w2_bias`, `validate`, `out_dtype`, `out`, or `batched_moe_gemm_quant`'s arguments
        (`expert_num_tokens`, `a_scale`, `expected_m`, ...). Source: vLLM's `BatchedTritonExperts.apply`."""
        check_tensor("a", a, ndim=3)
        _check_expert_semantics(qw, w13_bias, w2_bias, activation, a.device)
        check_bool("validate", validate)
        if out_dtype is not None and out_dtype not in ACTIVATION_DTYPES:    # it is also GEMM2's input dtype
            raise ValueError(f"out_dtype: expected torch.bfloat16 or torch.float16 (the intermediate between the GEMMs "
                             f"and the output), or None, got {out_dtype}")
        if out is not None:                # its device, shape and size before GEMM1 launches (its dtype: GEMM1's below)
            check_tensor("out", out, shape=(a.shape[0], a.shape[1], qw.hidden_size), writable=True)
            check_kernel_device("a", a, out=out); check_extent("out", out)
        h = batched_moe_gemm_quant(a, qw, expert_num_tokens, activation, a_scale=a_scale, out_dtype=out_dtype,
                                   expected_m=expected_m, bias=w13_bias, validate=validate,   # checks a, qw, the counts
                                   active_experts=active_experts, max_active_experts=max_active_experts)
        (E, M, _), H = h.shape, qw.hidden_size
        wa2 = _weight_kernel_args(qw, "w2")
        if out is not None:
            check_disjoint("out", check_tensor("out", out, shape=(E, M, H), dtype=h.dtype, writable=True), a=a, h=h,
                           expert_num_tokens=expert_num_tokens, w2_bias=w2_bias, w2_codes=wa2["codes"],
                           w2_scale=wa2["scale"], w2_global_scale=wa2["gs"])
        else: out = torch.empty(E, M, H, dtype=h.dtype, device=h.device)
        for name, t in (("w2", wa2["codes"]), ("out", out)): check_extent(name, t)
        hq, hs, hs_st, _ = _prepare_activations(h, qw, expert_num_tokens, None, None, qw.intermediate_size, batched=True)
        return _batched_moe_gemm_quant(hq, hs, hs_st, wa2, expert_num_tokens, None, out, None, expected_m, w2_bias,
                                       active_experts, max_active_experts)

    def _apply(self, a, expert_num_tokens, qw, expected_m=None, w13_bias=None, w2_bias=None,
               activation: Activation = SILU, active_experts=None, max_active_experts=None,
               a_scale=None, out_dtype=None) -> torch.Tensor:
        """`apply` after its checks, 16-bit `a` (or FP8 `a` with its `a_scale`, quantized before dispatch): for a layer
        whose quantized weights (checked once) and dispatched slabs are its own (`10_modular`)."""
        (E, M, H), I = a.shape, qw.intermediate_size
        if a_scale is not None and ACTIVATION_GRANULARITY.get(qw.scheme) == "group":   # the layer's FP8 dispatch: its
            a_k, a_s, as_st, odt = a, a_scale, a_scale.stride(), out_dtype or torch.bfloat16   # own [E, M, G] scales
        else: a_k, a_s, as_st, odt = _prepare_activations(a, qw, expert_num_tokens, a_scale, out_dtype, H, batched=True)
        h = torch.empty(E, M, I, dtype=odt, device=a.device)
        for name, t in (("a", a), ("h", h)): check_extent(name, t)      # the slabs' size: a capacity the caller set
        h = _batched_moe_gemm_quant(a_k, a_s, as_st, _weight_kernel_args(qw, "w13"), expert_num_tokens, activation, h,
                                    None, expected_m, w13_bias, active_experts, max_active_experts)
        hq, hs, hs_st, _ = _prepare_activations(h, qw, expert_num_tokens, None, None, I, batched=True)
        return _batched_moe_gemm_quant(hq, hs, hs_st, _weight_kernel_args(qw, "w2"), expert_num_tokens, None,
                                       torch.empty(E, M, qw.hidden_size, dtype=odt, device=a.device), None, expected_m,
                                       w2_bias, active_experts, max_active_experts)

# %%
#| export
def quant_experts_reference_batched(a: torch.Tensor, expert_num_tokens: torch.Tensor, qw: QuantizedExpertWeights,
                                    a_scale: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                                    w13_bias: torch.Tensor | None = None,  # [E, 2·I]
                                    w2_bias: torch.Tensor | None = None,   # [E, H]
                                    activation: Activation = SILU,
                                   ) -> torch.Tensor:          # [E, max_tokens, H] float64, NaN past the counts
    """Spec of `BatchedTritonQuantExperts`: the two GEMM specs, with the intermediate stored in the activation dtype.
    ValueError naming `a` (3-D, `[E, M, H]`), `qw`, `activation`, `w13_bias`, `w2_bias` or `expert_num_tokens` (shape,
    int32, values outside [0, M]). Source: vLLM's `NaiveBatchedExperts` (dequantize, per-expert GEMMs)."""
    check_tensor("a", a, ndim=3)
    _check_expert_semantics(qw, w13_bias, w2_bias, activation, a.device)
    check_tensor("a", a, shape=(qw.num_experts, None, qw.hidden_size))
    check_tensor("expert_num_tokens", expert_num_tokens, shape=(qw.num_experts,), dtype=torch.int32)
    if ((expert_num_tokens < 0) | (expert_num_tokens > a.shape[1])).any():
        raise ValueError(f"expert_num_tokens: expected values in [0, {a.shape[1]}], got {expert_num_tokens.tolist()}")
    hdt = a.dtype if a.dtype in ACTIVATION_DTYPES else (out_dtype or torch.bfloat16)
    h = batched_gemm_quant_reference(a, qw, expert_num_tokens, activation, a_scale=a_scale, bias=w13_bias).to(hdt)
    return batched_gemm_quant_reference(h, qw, expert_num_tokens, bias=w2_bias)

# %% [markdown]
# The checks run every scheme on fresh random inputs with the slabs' padding poisoned, and against the spec. Through
# two GEMMs the bounds are wider than for one, and widest for w8a8: GEMM1's fp32 result and the spec's float64 one can
# round to different bf16 intermediates, and re-quantizing the intermediate is discontinuous — one bf16 ulp more in a
# row's |max| changes its scale and re-rounds every element of the row to fp8. The kernel and the spec then hold two
# equally valid fp8 intermediates, and their outputs differ by fp8 rounding noise: the bound for w8a8 is relative
# error < 5e-2 and cosine > 0.998 (measured 2.7% at worst here); for w4a16, whose intermediate stays bf16,
# 2e-2 and 0.9995. Each GEMM alone is held to 1e-2 and 0.9999 above.

# %%
#| test batched_quant_experts
E, M, H, I = 3, 16, 152, 72
cnt = torch.tensor([16, 0, 5], dtype=torch.int32, device=DEVICE)
valid = (torch.arange(M)[None, :] < cnt.cpu()[:, None])
for i, scheme in enumerate(QUANT_SCHEMES):
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=20 + i), scheme)
    a = poison_rows(random_activations((E, M, H), torch.bfloat16, seed=30 + i), cnt)
    out = poison_rows(torch.zeros(E, M, H, dtype=torch.bfloat16, device=DEVICE), cnt)
    got = BatchedTritonQuantExperts().apply(a, cnt, qw, out=out).cpu()
    assert_quant_close(got[valid], quant_experts_reference_batched(a, cnt, qw).cpu()[valid], *experts_tolerance(scheme), name=scheme)
    assert got[~valid].isnan().all()
test_eq(BatchedTritonQuantExperts.activation_format, ActivationFormat.BatchedExperts)

# %%
#| export
class TritonQuantExperts:
    """Standard-format experts, quantized: align -> GEMM1 + bias + activation -> GEMM2 + bias (x router weight) -> sum
    over slots. Construction takes no argument and raises nothing; `apply` checks its inputs. Source: vLLM's
    `TritonExperts` (fused_moe/fused_moe.py), with moe-lit's own FP4 decode."""
    activation_format = ActivationFormat.Standard
    pair_blocks_max_pairs = TritonExperts.pair_blocks_max_pairs   # the same layout rule as the unquantized experts

    def apply(self, hidden: torch.Tensor,        # [T, H] bf16/fp16, or float8_e4m3fn with a_scale (w8a8, quantized before)
              qw: QuantizedExpertWeights,        # both weights of the E local experts
              topk_weights: torch.Tensor,        # [T, top_k] fp32
              local_ids: torch.Tensor,           # [T, top_k] int32/int64, local expert per slot, -1 = not on this rank
              apply_router_weight_on_input: bool = False,
              block_m: int | None = None,        # alignment block (default: `quant_block_m`, GEMM1's tile)
              expected_m: int | None = None,     # expected rows per local expert (default T·top_k / E)
              validate: bool = True,             # check local_ids on the host (one sync; ids from a placement skip it)
              w13_bias: torch.Tensor | None = None,  # [E, 2·I] bf16/fp16/fp32, added before the activation
              w2_bias: torch.Tensor | None = None,   # [E, H] bf16/fp16/fp32, added before the router weight
              activation: Activation = SILU,     # the gated activation between the GEMMs
              num_experts: int | None = None,    # the model's experts, global (the pair-block rule); default E
              active_experts: int | None = None, # expected local experts with pairs (split-K choice; default min(E, T·top_k))
              addend: torch.Tensor | None = None,  # [T, H] the output's dtype: the shared experts' output, in the fp32 sum
              a_scale: torch.Tensor | None = None, # [T, G] fp32: float8 hidden's scales, as `fused_moe_gemm_quant` takes them
              out_dtype: torch.dtype | None = None,  # with float8 hidden: the intermediate's and output's dtype (bf16)
             ) -> torch.Tensor:                  # [T, H], hidden's dtype (out_dtype for float8 hidden)
        """This rank's share of the MoE output for the flat token list, with quantized expert weights. `hidden` may come
        quantized already (FP8 w8a8 schemes: e4m3 codes and `a_scale`, e.g. gathered as FP8 from other ranks, `13a`);
        GEMM1 then launches no quantizer. ValueError naming the argument on bad input. Source: vLLM's
        `TritonExperts.apply` (moe_align_block_size, two `fused_moe_kernel` launches, the sum over slots)."""
        check_quant_weights(qw)
        check_tensor("hidden", hidden, shape=(None, qw.hidden_size), dtype=(*ACTIVATION_DTYPES, torch.float8_e4m3fn))
        _check_expert_semantics(qw, w13_bias, w2_bias, activation, hidden.device)
        check_tensor("local_ids", local_ids, shape=(hidden.shape[0], None), dtype=(torch.int32, torch.int64))
        check_tensor("topk_weights", topk_weights, shape=tuple(local_ids.shape), dtype=torch.float32)
        check_kernel_device("hidden", hidden, local_ids=local_ids, topk_weights=topk_weights)
        check_bool("apply_router_weight_on_input", apply_router_weight_on_input)
        if expected_m is not None: check_int("expected_m", expected_m, lo=1)
        if active_experts is not None: check_int("active_experts", active_experts, lo=0)
        check_local_ids(local_ids, qw.num_experts, validate)
        if qw.device != hidden.device: raise ValueError(f"qw: expected device {hidden.device}, got {qw.device}")
        if block_m is not None: check_block_m(block_m)
        for name in ("w13", "w2"): check_extent(name, getattr(qw, name))
        odt = hidden.dtype
        if hidden.dtype == torch.float8_e4m3fn:    # a_scale's shape and dtype: checked in `_apply`, before any launch
            if not QUANT_SCHEME_TABLE[qw.scheme].is_fp8:
                raise ValueError(f"hidden: expected torch.bfloat16 or torch.float16 for the weight-only scheme {qw.scheme}, "
                                 f"got {hidden.dtype}")
            odt = check_choice("out_dtype", torch.bfloat16 if out_dtype is None else out_dtype, ACTIVATION_DTYPES)
            check_kernel_device("hidden", hidden, a_scale=a_scale)
            if validate and isinstance(a_scale, torch.Tensor) and a_scale.dtype == torch.float32:   # (its shape: below)
                _check_act_scale_values(a_scale)      # one host sync, as the ids' check: no quantizer's scale
        check_addend(addend, hidden, odt)
        return self._apply(hidden, qw, topk_weights, local_ids, apply_router_weight_on_input, block_m, expected_m,
                           w13_bias, w2_bias, activation, num_experts, active_experts, addend, a_scale=a_scale,
                           out_dtype=out_dtype)

    def _apply(self, hidden, qw, topk_weights, local_ids, apply_router_weight_on_input=False, block_m=None,
               expected_m=None, w13_bias=None, w2_bias=None, activation: Activation = SILU, num_experts=None,
               active_experts=None,
               addend=None, join=None,   # the shared experts' [T, H], in the combine's sum (`07`)
               a_scale=None, out_dtype=None) -> torch.Tensor:   # float8 hidden's [T, G] scales (quantized before)
        "`apply` after its checks: for a layer whose quantized weights (checked once), ids and activations are its own (`10_modular`)."
        (T, k), E, I, on_in = local_ids.shape, qw.num_experts, qw.intermediate_size, apply_router_weight_on_input
        # rows arrived as FP8 with their scales (`13a`'s all-gather): taken as they are, no quantizer launch
        x, xs, xs_st, odt = _prepare_activations(hidden.contiguous(), qw, None, a_scale, out_dtype, qw.hidden_size, False)
        if T == 0 or E == 0: return _no_pairs(T, qw.hidden_size, hidden, addend, join, odt)
        if block_m is None: block_m = quant_block_m(qw, max(1, expected_m or T * k // E), odt)   # checked; the
                                                                      # 16-bit rows' tile (FP8 rows: the same tile)
        wa13, wa2 = _weight_kernel_args(qw, "w13"), _weight_kernel_args(qw, "w2")
        s, e, n = _align_pairs(local_ids, block_m, E, num_experts, self.pair_blocks_max_pairs)   # ids: the placement's
        # the launches below skip the GEMMs' checks: every argument was checked above or is built here.
        # rows of h for pairs on other ranks are never written by GEMM1 nor read by GEMM2 - but a per-tensor activation
        # scale spans every row of h: for fp8_w8a8_tensor they must hold zeros, not uninitialised memory
        h0 = torch.zeros if ACTIVATION_GRANULARITY.get(qw.scheme) == "tensor" else torch.empty
        h = _fused_moe_gemm_quant(x, xs, xs_st, wa13, E, s, e, n, k, block_m, activation, topk_weights,
                                  "input" if on_in else None, h0(T * k, I, dtype=odt, device=hidden.device),
                                  False, None, w13_bias, active_experts)
        hq, hs, hs_st, _ = _prepare_activations(h, qw, None, None, None, I, False)
        y = _fused_moe_gemm_quant(hq, hs, hs_st, wa2, E, s, e, n, k, block_m, None, topk_weights,
                                  None if on_in else "output",
                                  torch.empty(T * k, qw.hidden_size, dtype=odt, device=hidden.device), True, None, w2_bias,
                                  active_experts)
        return _combine_pairs(y, local_ids, E, addend, join)   # router weights already applied; y is unit-stride

# %%
#| export
def quant_experts_reference_standard(hidden: torch.Tensor, qw: QuantizedExpertWeights, topk_weights: torch.Tensor,
                                     local_ids: torch.Tensor, apply_router_weight_on_input: bool = False,
                                     w13_bias: torch.Tensor | None = None,  # [E, 2·I]
                                     w2_bias: torch.Tensor | None = None,   # [E, H]
                                     activation: Activation = SILU,
                                    ) -> torch.Tensor:         # [T, H] float64
    """Spec of `TritonQuantExperts`: the two GEMM specs over the pairs, the intermediate in hidden's dtype, the slot
    sum. ValueError naming `hidden` (2-D bf16/fp16 `[T, H]`), `qw`, `activation`, `w13_bias`, `w2_bias`, `local_ids` or
    `topk_weights`; `apply_router_weight_on_input` is read for its truth. Source: moe-lit's own float64 spec (vLLM's
    tests check `TritonExperts` against `torch_moe` the same way)."""
    check_tensor("hidden", hidden, ndim=2, dtype=ACTIVATION_DTYPES)
    _check_expert_semantics(qw, w13_bias, w2_bias, activation, hidden.device)
    check_tensor("hidden", hidden, shape=(None, qw.hidden_size))
    check_tensor("local_ids", local_ids, shape=(hidden.shape[0], None), dtype=(torch.int32, torch.int64))
    check_tensor("topk_weights", topk_weights, shape=tuple(local_ids.shape), dtype=torch.float32)
    check_local_ids(local_ids, qw.num_experts, True)                       # a spec checks what the kernel may skip
    T, k = local_ids.shape
    if T == 0: return torch.zeros(0, qw.hidden_size, dtype=torch.float64, device=hidden.device)
    on_in, local = apply_router_weight_on_input, local_ids.to(hidden.device)
    h = fused_moe_gemm_quant_reference(hidden, qw, local, activation, topk_weights, "input" if on_in else None, bias=w13_bias)
    h = torch.where((local.reshape(-1) >= 0)[:, None], h, 0.0).to(hidden.dtype)   # uncomputed rows: zero (never read)
    y = fused_moe_gemm_quant_reference(h, qw, local, None, topk_weights, None if on_in else "output", rows="pair",
                                       bias=w2_bias)
    return torch.where((local >= 0)[..., None], y.view(T, k, -1), 0.0).sum(1)

# %% [markdown]
# Every scheme with router weights on the output; NVFP4 also with `top_k = 1` and the weights on the input (the
# contiguous catalog above covers the input stage for every scheme); slots on other ranks throughout.
# The last lines compare the spec itself with the unquantized float64 MoE of the original weights: the cost of each
# scheme in accuracy, which the kernels inherit. On these deliberately uneven weights (magnitudes spanning 2^10
# within a row) and a few tokens, FP8 measured about 5% relative error (tensor, block) and 10–13% (channel: one
# scale per row must span the whole row), the FP4 formats 15–25%; cosine ≥ 0.99 for FP8, ≥ 0.96 for FP4. The
# bounds below are loose sanity bounds on the spec (they catch a misreading that kernel and spec would share, such as
# a wrong nibble order), not accuracy claims.

# %%
#| test triton_quant_experts
g = torch.Generator().manual_seed(4)
E, H, I = 4, 152, 72
for i, scheme in enumerate(QUANT_SCHEMES):
    w13, w2 = random_expert_weights(E, H, I, seed=40 + i)
    qw = quantize_expert_weights(w13, w2, scheme)
    for T, k, on_in in ((9, 2, False), (5, 1, True))[: 2 if scheme == "nvfp4_w4a16" else 1]:
        ids = torch.stack([torch.randperm(E + 1, generator=g)[:k] for _ in range(T)]).int()
        local = torch.where(ids < E, ids, -1).to(DEVICE)
        wts, hidden = torch.rand(T, k, generator=g).to(DEVICE), random_activations((T, H), torch.bfloat16, 50 + i)
        got = TritonQuantExperts().apply(hidden, qw, wts, local, apply_router_weight_on_input=on_in)
        want = quant_experts_reference_standard(hidden, qw, wts, local, on_in)
        test_eq(got.dtype, torch.bfloat16)
        assert_quant_close(got, want, *experts_tolerance(scheme), name=f"{scheme} T={T} top_k={k} on_input={on_in}")
    exact = moe_reference_standard(hidden.double(), w13.double(), w2.double(), wts, local, apply_router_weight_on_input=on_in)
    rel, cos = quant_error(want, exact)
    rel_max, cos_min = (0.2, 0.98) if QUANT_SCHEME_TABLE[scheme].is_fp8 else (0.4, 0.9)   # loose: catches a shared misreading
    assert rel < rel_max and cos > cos_min, (scheme, rel, cos)
test_eq(TritonQuantExperts.activation_format, ActivationFormat.Standard)

# %% [markdown]
# On an EP deployment each rank holds a subset of the experts (`select`) and sees `-1` for the others; two ranks sum to
# the single-device spec.

# %%
#| test triton_quant_experts_two_ranks
E, H, I, T, k = 6, 96, 64, 7, 3
qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=60), "mxfp4_w4a16")
g = torch.Generator().manual_seed(5)
ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int().to(DEVICE)
hidden, wts = random_activations((T, H), torch.bfloat16, 61), torch.rand(T, k, generator=g).to(DEVICE)
total = torch.zeros(T, H, dtype=torch.float64)
for rank in range(2):
    owned = torch.arange(rank * E // 2, (rank + 1) * E // 2)
    local = torch.where((ids >= owned[0]) & (ids <= owned[-1]), ids - int(owned[0]), -1)
    total += TritonQuantExperts().apply(hidden, qw.select(owned.to(DEVICE)), wts, local).double().cpu()
assert_quant_close(total, quant_experts_reference_standard(hidden, qw, wts, ids).cpu(), *experts_tolerance(qw.scheme))

# %% [markdown]
# Rows may arrive quantized: a Standard-format transport that quantizes before it sends (`13a`'s all-gather for DeepEP
# high-throughput) hands the experts e4m3 codes and their scales, made by `09b`'s quantizer as the experts' own launch
# would make them. GEMM1 takes them as they are, and the output is the same bits as from the 16-bit rows.

# %%
#| test triton_quant_experts_prequantized
E, H, I, T, k = 4, 320, 64, 6, 2
g = torch.Generator().manual_seed(8)
ids = torch.stack([torch.randperm(E + 1, generator=g)[:k] for _ in range(T)]).int()
local = torch.where(ids < E, ids, -1).to(DEVICE)
wts, hidden = torch.rand(T, k, generator=g).to(DEVICE), random_activations((T, H), torch.bfloat16, 81)
for scheme, gran in (("fp8_w8a8_block", "group"), ("fp8_w8a8_channel", "token")):
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=82), scheme)
    q, sc = fp8_quantize_activations(hidden, gran)
    shared = random_activations((T, H), torch.bfloat16, 83)
    for on_in in (False, True):
        want = TritonQuantExperts().apply(hidden, qw, wts, local, apply_router_weight_on_input=on_in, addend=shared)
        got = TritonQuantExperts().apply(q, qw, wts, local, apply_router_weight_on_input=on_in, addend=shared, a_scale=sc)
        test_eq((got.dtype, got.shape), (torch.bfloat16, hidden.shape))
        assert torch.equal(got, want), (scheme, on_in)                 # the same codes, the same kernels: the same bits
    test_eq(TritonQuantExperts().apply(q, qw, wts, local, a_scale=sc, out_dtype=torch.float16).dtype, torch.float16)
    test_eq(TritonQuantExperts().apply(q[:0], qw, wts[:0], local[:0], a_scale=sc[:0]).dtype, torch.bfloat16)
qw4 = quantize_expert_weights(*random_expert_weights(E, H, I, seed=82), "mxfp4_w4a16")
test_fail(lambda: TritonQuantExperts().apply(q, qw4, wts, local, a_scale=sc), contains="hidden: expected torch.bfloat16 or "
          "torch.float16 for the weight-only scheme mxfp4_w4a16, got torch.float8_e4m3fn")
test_fail(lambda: TritonQuantExperts().apply(q, qw, wts, local), contains="a_scale: expected float32 scales of shape [6, 1]")
test_fail(lambda: TritonQuantExperts().apply(q, qw, wts, local, a_scale=sc[:3]), contains="a_scale: expected shape [6, 1]")
test_fail(lambda: TritonQuantExperts().apply(q, qw, wts, local, a_scale=sc, out_dtype=torch.float32),
          contains="out_dtype: expected one of")
test_fail(lambda: TritonQuantExperts().apply(q, qw, wts, local, a_scale=sc, addend=hidden.half()),
          contains="addend: expected dtype torch.bfloat16")
test_fail(lambda: TritonQuantExperts().apply(hidden, qw, wts, local, a_scale=sc), contains="a_scale: expected None for")
test_fail(lambda: TritonQuantExperts().apply(q, qw, wts, local, a_scale=-sc), contains="a_scale: expected scales in [0, ")

# %% [markdown]
# Both experts classes, for the two FP4 formats and FP8 blocks: the batched slabs with poisoned padding rows and
# output rows, and the Standard format with the router weight on the output and on the input, slots on other ranks,
# and a token with no local expert whose hidden row is NaN (it must never be read; its output row is 0). The last
# lines tie the spec to `moe_lit.formats`: for the weight-only formats, whose activations are not quantized, the
# spec equals `moe_reference_standard` on the dequantized weights up to the bf16 rounding of the intermediate.

# %%
#| test quant_experts_swigluoai_bias
act = Activation("swigluoai", limit=0.5)
E, M, H, I = 3, 16, 152, 72
cnt = torch.tensor([16, 0, 5], dtype=torch.int32, device=DEVICE)
valid = (torch.arange(M)[None, :] < cnt.cpu()[:, None])
g = torch.Generator().manual_seed(9)
for i, scheme in enumerate(("mxfp4_w4a16", "nvfp4_w4a16", "fp8_w8a8_block")):
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=90 + i), scheme)
    b13, b2 = torch.randn(E, 2 * I, generator=g).to(DEVICE, torch.bfloat16), torch.randn(E, H, generator=g).to(DEVICE)
    sem = dict(w13_bias=b13, w2_bias=b2, activation=act)
    a = poison_rows(random_activations((E, M, H), torch.bfloat16, seed=100 + i), cnt)
    out = poison_rows(torch.zeros(E, M, H, dtype=torch.bfloat16, device=DEVICE), cnt)
    got = BatchedTritonQuantExperts().apply(a, cnt, qw, out=out, **sem).cpu()
    want = quant_experts_reference_batched(a, cnt, qw, **sem).cpu()
    assert_quant_close(got[valid], want[valid], *experts_tolerance(scheme), name=f"{scheme} batched")
    assert got[~valid].isnan().all(), f"{scheme}: a padding row was written"
    T, k = 9, 2
    local = torch.stack([torch.randperm(E + 1, generator=g)[:k] for _ in range(T)]).int()
    local = torch.where(local < E, local, -1); local[0] = -1
    hidden, wts = random_activations((T, H), torch.bfloat16, seed=110 + i), torch.rand(T, k, generator=g).to(DEVICE)
    hidden[0] = float("nan")                                 # the token with no local expert: never read
    for on_in in (False, True):
        got = TritonQuantExperts().apply(hidden, qw, wts, local.to(DEVICE), on_in, **sem)
        want = quant_experts_reference_standard(hidden, qw, wts, local, on_in, **sem)
        test_eq(got.dtype, torch.bfloat16)
        assert (got[0] == 0).all(), f"{scheme}: a token with no local expert"
        assert_quant_close(got, want, *experts_tolerance(scheme), name=f"{scheme} standard on_input={on_in}")
        if scheme == "fp8_w8a8_block": continue                 # its spec quantizes the activations
        d13, d2 = (t.cpu() for t in qw.dequantize(torch.float64))
        exact = moe_reference_standard(hidden.double().cpu(), d13, d2, wts.cpu(), local, apply_router_weight_on_input=on_in,
                                       w13_bias=b13.double().cpu(), w2_bias=b2.double().cpu(), activation=act)
        assert_quant_close(want.cpu(), exact, *experts_tolerance(scheme), name=f"{scheme} spec vs moe_lit.formats")

# %% [markdown]
# The arguments are checked before any launch: a bias of the wrong shape, dtype or device, and an activation that is
# not an `Activation` (the launchers also take the older `"silu_and_mul"`, nothing else), raise a ValueError naming
# the argument.

# %%
#| test quant_experts_bias_bad_input
E, M, H, I = 2, 8, 96, 32
qw = quantize_expert_weights(*random_expert_weights(E, H, I), "mxfp4_w4a16")
a = random_activations((E, M, H), torch.bfloat16)
cnt = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
ids = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32, device=DEVICE)
wts = torch.rand(2, 2, device=DEVICE)
b13, b2 = torch.zeros(E, 2 * I, device=DEVICE), torch.zeros(E, H, device=DEVICE)
for run in (lambda **kw: BatchedTritonQuantExperts().apply(a, cnt, qw, **kw),
            lambda **kw: TritonQuantExperts().apply(a[0, :2], qw, wts, ids, **kw)):
    test_fail(lambda: run(w13_bias=b2), contains="w13_bias: expected shape [2, 64], got [2, 96]")
    test_fail(lambda: run(w2_bias=b13), contains="w2_bias: expected shape [2, 96], got [2, 64]")
    test_fail(lambda: run(w13_bias=b13[:1]), contains="w13_bias: expected shape [2, 64]")
    test_fail(lambda: run(w2_bias=b2.int()), contains="w2_bias: expected dtype")
    test_fail(lambda: run(w2_bias=b2.to("meta")), contains="w2_bias: expected device")
    test_fail(lambda: run(activation="swigluoai"), contains="activation: expected an Activation, got str")
    test_fail(lambda: run(activation=None), contains="activation: expected an Activation, got NoneType")
test_fail(lambda: batched_moe_gemm_quant(a, qw, cnt, "swigluoai"), contains="activation: expected one of")
test_fail(lambda: batched_moe_gemm_quant(a, qw, cnt, SILU, bias=b2), contains="bias: expected shape [2, 64], got [2, 96]")
s, e, n = moe_align_block_size(ids, 16, E)
test_fail(lambda: fused_moe_gemm_quant(a[0, :4, :I], qw, s, e, n, 2, 16, rows="pair", bias=b13),
          contains="bias: expected shape [2, 96], got [2, 64]")

# %% [markdown]
# On the GPU, at gpt-oss-120b's expert shapes (H = I = 2880) on a rank holding 8 of its experts, MXFP4 with bf16
# activations and biases and gpt-oss's own `alpha` and `limit`; the routing picks 4 of 16 experts, so about half of
# the slots are not local. The activations are doubled so that part of the pre-activations pass `limit = 7` (on the
# CPU, at the Standard test's seed: 16% of the gates and 32% of the ups), as the clamp is meant to catch outliers.

# %%
#| test quant_experts_gpt_oss_shapes_standard
#| gpu
E, H, I, T, k = 8, 2880, 2880, 64, 4
act = Activation("swigluoai")                                  # alpha 1.702, limit 7
qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=120, device="cuda", dtype=torch.bfloat16), "mxfp4_w4a16")
g = torch.Generator().manual_seed(121)
b13, b2 = torch.randn(E, 2 * I, generator=g).bfloat16().cuda(), torch.randn(E, H, generator=g).bfloat16().cuda()
hidden = random_activations((T, H), torch.bfloat16, 122, "cuda") * 2
ids = torch.stack([torch.randperm(2 * E, generator=g)[:k] for _ in range(T)]).int()
local = torch.where(ids < E, ids, -1).cuda()
wts = torch.rand(T, k, generator=g).cuda()
pre = fused_moe_gemm_quant_reference(hidden, qw, local, weight="w13", bias=b13)[local.reshape(-1) >= 0]
assert (pre[:, :I] > act.limit).any() and (pre[:, I:].abs() > act.limit).any()          # both clamps bite
for on_in in (False, True):
    got = TritonQuantExperts().apply(hidden, qw, wts, local, on_in, w13_bias=b13, w2_bias=b2, activation=act)
    want = quant_experts_reference_standard(hidden, qw, wts, local, on_in, w13_bias=b13, w2_bias=b2, activation=act)
    assert_quant_close(got, want, *experts_tolerance(qw.scheme), name=f"gpt-oss-120b standard, on_input={on_in}")

# %%
#| test quant_experts_gpt_oss_shapes_batched
#| gpu
E, H, I, M = 8, 2880, 2880, 64
act = Activation("swigluoai")
qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=123, device="cuda", dtype=torch.bfloat16), "mxfp4_w4a16")
g = torch.Generator().manual_seed(124)
b13, b2 = torch.randn(E, 2 * I, generator=g).bfloat16().cuda(), torch.randn(E, H, generator=g).bfloat16().cuda()
cnt = torch.randint(0, M + 1, (E,), generator=g).int(); cnt[:3] = torch.tensor([0, 1, M]); cnt = cnt.cuda()
a = poison_rows(random_activations((E, M, H), torch.bfloat16, 125, "cuda") * 2, cnt)
valid = torch.arange(M, device="cuda")[None, :] < cnt[:, None]
pre = batched_gemm_quant_reference(a, qw, cnt, weight="w13", bias=b13)[valid]
assert (pre[:, :I] > act.limit).any() and (pre[:, I:].abs() > act.limit).any()          # both clamps bite
out = poison_rows(torch.zeros(E, M, H, dtype=torch.bfloat16, device="cuda"), cnt)
got = BatchedTritonQuantExperts().apply(a, cnt, qw, out=out, w13_bias=b13, w2_bias=b2, activation=act)
want = quant_experts_reference_batched(a, cnt, qw, w13_bias=b13, w2_bias=b2, activation=act)
assert_quant_close(got[valid], want[valid], *experts_tolerance(qw.scheme), name="gpt-oss-120b batched")
assert got[~valid].isnan().all(), "a padding row was written"

# %% [markdown]
# Rows past 2^31 end to end: 70 000 tokens, top-8 of 8 experts, `I = 4096` make GEMM2's input 560 000 pair rows of
# 4096 columns (2.3e9 elements), which the FP8 activation quantizer and GEMM2 reach through int64 row offsets. The
# last tokens' outputs equal the spec computed on those tokens alone.

# %%
#| test quant_experts_rows_past_int32
#| gpu
E, H, I, T, k = 8, 256, 4096, 70000, 8
qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=70, device="cuda"), "fp8_w8a8_block")
hidden = random_activations((T, H), torch.bfloat16, seed=71, device="cuda")
ids = torch.argsort(torch.rand(T, E, device="cuda", generator=torch.Generator("cuda").manual_seed(72)), dim=1).int()
wts = torch.rand(T, k, device="cuda", generator=torch.Generator("cuda").manual_seed(73)).softmax(-1)
got = TritonQuantExperts().apply(hidden, qw, wts, ids)
assert got.isfinite().all()
want = quant_experts_reference_standard(hidden[-32:], qw, wts[-32:], ids[-32:])
assert_quant_close(got[-32:].cpu(), want.cpu(), *experts_tolerance(qw.scheme), name="T=70000 rows past 2^31")
# %% [markdown]
# Both experts classes at the two real shapes, against their specs:

# %%
#| test quant_experts_real_shapes
#| gpu
for scheme, E, H, I, T, k in (("fp8_w8a8_block", 32, 7168, 2048, 128, 8), ("mxfp4_w4a16", 128, 2880, 2880, 64, 4)):
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=5, device="cuda", dtype=torch.bfloat16), scheme)
    g = torch.Generator().manual_seed(6)
    ids = torch.stack([torch.randperm(4 * E, generator=g)[:k] for _ in range(T)]).int()   # 3/4 of slots not local
    local = torch.where(ids < E, ids, -1).cuda()
    hidden, wts = random_activations((T, H), torch.bfloat16, 7, "cuda"), torch.rand(T, k, generator=g).cuda()
    assert_quant_close(TritonQuantExperts().apply(hidden, qw, wts, local),
                       quant_experts_reference_standard(hidden, qw, wts, local), *experts_tolerance(scheme), name=f"{scheme} standard")
    M = 64
    cnt = torch.randint(0, M + 1, (E,), generator=g).int().cuda(); cnt[:3] = torch.tensor([0, 1, M])
    a = poison_rows(random_activations((E, M, H), torch.bfloat16, 8, "cuda"), cnt)
    got = BatchedTritonQuantExperts().apply(a, cnt, qw)
    valid = torch.arange(M, device="cuda")[None, :] < cnt[:, None]
    assert_quant_close(got[valid], quant_experts_reference_batched(a, cnt, qw)[valid], *experts_tolerance(scheme), name=f"{scheme} batched")

# %% [markdown]
# ## Bad input
#
# Every argument error names the argument, what was expected and what came; ids the host can check raise, and ids
# it is told not to check (`validate=False`, as the layer does for ids that come from its placement) are dropped
# in the kernels, never read out of bounds.

# %%
#| test quant_experts_bad_input
E, M, H, I = 2, 8, 64, 32
qw8 = quantize_expert_weights(*random_expert_weights(E, H, I), "fp8_w8a8_block")
a = random_activations((E, M, H), torch.bfloat16)
cnt = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
ids = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32, device=DEVICE)
wts = torch.rand(2, 2, device=DEVICE)
test_fail(lambda: TritonQuantExperts().apply(a[0, :2].float(), qw8, wts, ids), contains="hidden: expected dtype")
test_fail(lambda: TritonQuantExperts().apply(a[0, :2], qw8, wts[:, :1], ids), contains="topk_weights: expected shape [2, 2]")
test_fail(lambda: TritonQuantExperts().apply(a[0, :2, :32], qw8, wts, ids), contains="hidden: expected shape [*, 64]")
test_fail(lambda: BatchedTritonQuantExperts().apply(a, cnt, qw8.w13), contains="qw: expected a QuantizedExpertWeights")
test_fail(lambda: BatchedTritonQuantExperts().apply(a, cnt, qw8, validate=1), contains="validate: expected a bool")
test_fail(lambda: batched_moe_gemm_quant(a.to("meta"), qw8, cnt, "silu_and_mul"), contains="a: expected a tensor with values for the Triton kernels")
def _launched(*args, **kw): raise AssertionError("GEMM1 launched before out was checked")
with mock.patch.dict(BatchedTritonQuantExperts.apply.__globals__, batched_moe_gemm_quant=_launched):   # out's device
    for bad, want in ((torch.empty(E, M, H, device="meta"), "out: expected device"), (torch.empty(E, M, H - 1, device=DEVICE), "out: expected shape")):
        test_fail(lambda: BatchedTritonQuantExperts().apply(a, cnt, qw8, out=bad), contains=want)
q, s = fp8_quantize_activations(a.reshape(-1, H), "group")
test_fail(lambda: BatchedTritonQuantExperts().apply(q.view(E, M, H), cnt, qw8, a_scale=s.view(E, M, -1), out_dtype=torch.float32),
          contains="out_dtype: expected torch.bfloat16 or torch.float16")
# the specs check what the kernels may skip
test_fail(lambda: quant_experts_reference_standard(a[0, :2], qw8, wts, ids + 2), contains="local_ids: expected values in [-1, 2)")
test_fail(lambda: quant_experts_reference_standard(a[0, :2], qw8, wts[:, :1], ids), contains="topk_weights: expected shape [2, 2]")
test_fail(lambda: quant_experts_reference_batched(a, cnt - 4, qw8), contains="expert_num_tokens: expected values in [0, 8]")
test_fail(lambda: quant_experts_reference_batched(a, cnt[:1], qw8), contains="expert_num_tokens: expected shape [2]")
test_fail(lambda: quant_experts_reference_batched(a[:1], cnt, qw8), contains="a: expected shape [2, *, 64]")
test_eq(quant_experts_reference_standard(a[0, :0], qw8, wts[:0], ids[:0]).shape, (0, H))

# %%
#| test quant_experts_unchecked_ids_are_safe
w13, w2 = random_expert_weights(2, 64, 64, seed=7)
ids = torch.tensor([[0, 1], [1, 0], [0, -1]], dtype=torch.int32, device=DEVICE)
hid = random_activations((3, 64), torch.bfloat16, seed=8)
for scheme in ("fp8_w8a8_block", "mxfp4_w4a16"):
    qw = quantize_expert_weights(w13, w2, scheme)
    wts = torch.rand(3, 2, device=DEVICE)
    test_fail(lambda: TritonQuantExperts().apply(hid, qw, wts, ids + 5), contains="local_ids: expected values in [-1, 2)")
    y = TritonQuantExperts().apply(hid, qw, wts, torch.where(ids == 1, 9, ids).int(), validate=False)
    assert y.isfinite().all(), scheme                                           # unchecked ids dropped, no garbage
    test_fail(lambda: TritonQuantExperts().apply(hid, qw, wts, ids, block_m=24), contains="block_m: expected a power of two")
