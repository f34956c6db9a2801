# %%
#| default_exp testing

# %% [markdown]
# # Testing policy
# > One way to compare a result with its float64 reference, used by every test in moe-lit, and the poison that makes unwritten rows visible.

# %%
#| export
from __future__ import annotations
import inspect, math, os, sys
import torch
from moe_lit.terms import check_int, check_bool, check_tensor, check_positive_real, triton_interpreting, check_dense, check_finite, FLOAT_DTYPES
from moe_lit.quant import QUANT_SCHEMES, quant_scheme

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.kernels.batched import DEVICE
import triton, triton.language as tl
from moe_lit.kernels.router import route_topk, router_plan
from moe_lit.config import MoEConfig

# %% [markdown]
# In this notebook: `tolerance` (the dtype table), `assert_close` (the one comparison) and `poison_rows` (fill the rows
# a kernel must not touch with NaN or a huge value). A **reference** page.
#
# ## Contract
#
# - The reference is computed in **float64** on the CPU; the result under test keeps its own dtype.
# - The result's dtype and shape are asserted first.
# - `|actual - expected| <= atol + rtol·|expected|` elementwise, with `rtol` from the dtype table and
#   `atol = rtol · rms(expected)`. A NaN or an infinity where the reference is finite always fails.
# - Failures print the worst indices, their values and the count of violations.
#
# > **Why atol scales with the reference's RMS and not with a separate reduction length.** For a dot product of
# > length `n` over random inputs, both the output and its rounding error grow as `√n`; their ratio is set by the
# > dtype's unit roundoff. Taking `atol` relative to the RMS of the reference therefore already scales it with the
# > reduction length (`hidden_size` or `intermediate_size`), and it stays meaningful for elements that cancel to
# > nearly 0, where a pure relative test would fail on noise.

# %%
#| export
_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,   # IEEE fp32 on the CPU; GPU fp32 GEMMs may use tf32 (~1e-3)
    torch.float16: 4e-3,   # unit roundoff 2^-11, plus the rounding of the intermediate activation
    torch.bfloat16: 3e-2,  # unit roundoff 2^-8, plus the rounding of the intermediate activation
}

def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the result dtype `dtype` against a float64 reference (the package's one table).
    ValueError naming `dtype` for anything but float64/32/16 and bfloat16. Source: moe-lit's own (unit roundoffs)."""
    if not isinstance(dtype, torch.dtype) or dtype not in _RTOL: raise ValueError(f"dtype: expected one of {list(_RTOL)}, got {dtype}")
    return _RTOL[dtype]

# %%
#| test tolerance_table
assert tolerance(torch.bfloat16) > tolerance(torch.float16) > tolerance(torch.float32) > tolerance(torch.float64)
test_fail(lambda: tolerance(torch.int32), contains="dtype: expected one of")

# %%
#| export
def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 rtol: float | None = None, name: str = "result"):
    """Assert `actual` matches the float64 `expected` within the dtype's tolerance; report the worst elements.
    AssertionError naming `name` for another dtype, shape or values (NaN and inf must match exactly); ValueError naming
    `actual`/`expected` (not tensors), `dtype` (no tolerance) or `rtol`. Source: moe-lit's own policy (DESIGN §9)."""
    check_tensor("actual", actual); check_tensor("expected", expected)
    dtype = actual.dtype if dtype is None else dtype
    if actual.dtype != dtype: raise AssertionError(f"{name}: expected dtype {dtype}, got {actual.dtype}")
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: expected shape {tuple(expected.shape)}, got {tuple(actual.shape)}")
    a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
    rtol = tolerance(dtype) if rtol is None else rtol
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"rtol: expected a finite number >= 0, got {rtol!r}")
    fin = e[e.isfinite()]
    atol = rtol * (fin.square().mean().sqrt().item() if fin.numel() else 0.0)   # scale of the finite reference
    close = (a - e).abs() <= atol + rtol * e.abs()    # NaN in `a` compares False, so it is bad
    same = (a == e) | (a.isnan() & e.isnan())          # where the reference is ±inf or NaN, only the same value
    bad = ~torch.where(e.isfinite(), close, same)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        worst = ", ".join(f"{tuple(i)}: got {a[tuple(i)].item():.6g}, want {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.numel()} elements outside rtol={rtol:g}, "
                             f"atol={atol:.3g}; first: {worst}")

# %%
#| test assert_close_policy
torch.manual_seed(0)
ref = torch.randn(16, 32, dtype=torch.float64)
assert_close(ref.to(torch.bfloat16), ref)                      # bf16 rounding is inside the bf16 tolerance
test_fail(lambda: assert_close(ref.float(), ref, dtype=torch.bfloat16), contains="expected dtype torch.bfloat16")
test_fail(lambda: assert_close(ref.float()[:8], ref), contains="expected shape")
off = ref.float().clone(); off[3, 5] += 0.5
test_fail(lambda: assert_close(off, ref), contains="(3, 5)")  # the worst index is named
nan = ref.float().clone(); nan[0, 0] = float("nan")
test_fail(lambda: assert_close(nan, ref), contains="1 of 512")  # NaN where the reference is finite fails
inf_ref = torch.tensor([float("inf"), 100.0, 3.0, float("-inf")], dtype=torch.float64)
assert_close(torch.tensor([float("inf"), 100.0, 3.0, float("-inf")]), inf_ref)          # equal infinities match
test_fail(lambda: assert_close(torch.tensor([1.0, 100.0, 3.0, float("-inf")]), inf_ref), contains="(0,)")
test_fail(lambda: assert_close(torch.tensor([float("-inf"), 100.0, 3.0, float("-inf")]), inf_ref), contains="(0,)")
nan_ref = torch.tensor([float("nan"), 5.0], dtype=torch.float64)
assert_close(torch.tensor([float("nan"), 5.0]), nan_ref)                      # a NaN in the reference spoils nothing else
test_fail(lambda: assert_close(ref.float(), ref, rtol=-1.0), contains="rtol: expected a finite number >= 0")
test_fail(lambda: assert_close([1.0], ref), contains="actual: expected a torch.Tensor")

# %% [markdown]
# ## Poisoned rows
#
# In the batched format only the first `expert_num_tokens[e]` rows of expert `e`'s slab are valid. Tests fill every
# other row — of the input *and* of the output buffer, before the call — with NaN (and, separately, 1e30, which
# survives code that zeroes NaN) so that a kernel which reads a padded row into a valid one, or writes a row it
# should not, is caught.

# %%
#| export
def poison_rows(slab: torch.Tensor, expert_num_tokens: torch.Tensor, value: float = float("nan")) -> torch.Tensor:
    """Fill rows `>= expert_num_tokens[e]` of `slab [E, max_tokens, ...]` with `value`, in place; returns `slab`.
    ValueError naming `slab` (fewer than 2 dims, not float or bool) or `expert_num_tokens` (not `[E]` int32/int64).
    Source: moe-lit's own (DESIGN §9: padded rows poisoned with NaN)."""
    check_tensor("slab", slab)
    if slab.dim() < 2: raise ValueError(f"slab: expected at least 2 dims [E, max_tokens, ...], got shape {tuple(slab.shape)}")
    check_tensor("expert_num_tokens", expert_num_tokens, shape=(slab.shape[0],), dtype=(torch.int32, torch.int64))
    if slab.dtype not in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.bool):
        raise ValueError(f"slab: expected a floating dtype, got {slab.dtype}")
    rows = torch.arange(slab.shape[1], device=slab.device)
    pad = rows[None, :] >= expert_num_tokens.to(slab.device)[:, None].long()   # [E, max_tokens]
    slab[pad] = value
    return slab

# %%
#| test poison_rows
s = poison_rows(torch.zeros(3, 4, 2), torch.tensor([0, 2, 4], dtype=torch.int32))
test_eq(s.isnan().all(-1).sum(-1).tolist(), [4, 2, 0])
test_eq(s[1, :2].isnan().any().item(), False)
test_fail(lambda: poison_rows(torch.zeros(4), torch.tensor([1])), contains="slab: expected at least 2 dims")
test_fail(lambda: poison_rows(torch.zeros(3, 4), torch.tensor([1, 2])), contains="expert_num_tokens: expected shape [3]")
test_fail(lambda: poison_rows(torch.zeros(3, 4, dtype=torch.int32), torch.tensor([1, 2, 3])), contains="slab: expected a floating dtype")

# %% [markdown]
# ## Runs and quantized kernels: one tolerance policy
#
# Everything above is the elementwise policy for a result against its float64 reference. Two more judgements rest on
# it and live here too, so there is one place for every tolerance in moe-lit:
#
# - **a run's check** (`check_tolerance`, `check_output`), used by the layer's emulated EP run, the distributed run
#   and the reports: the dtype's `rtol` and a minimum cosine, wider for w8a8 kernels, which round activations twice
#   where the float64 reference does not. How much wider was measured: a small FP8-block layer (the pre-quantized
#   checkpoint of `12c_real_models`' test, bf16, 6 tokens) on 300 random inputs needed an `rtol` of 0.118 at the
#   median, 0.217 at the 99th percentile and 0.235 at most (the e4m3 rounding of an activation is up to 6.25 %, on
#   terms that can cancel), with every cosine above 0.998; `rtol` 0.15 failed 35 of the 300. The bound is 0.3;
# - **quantized kernels against their specs** (`quant_error`, `assert_quant_close`, `experts_tolerance`): the relative
#   error `‖got − want‖/‖want‖` and the cosine, since an elementwise bound is meaningless for 4-bit weights.

# %%
#| export
def check_tolerance(dtype: torch.dtype, quant: str = "unquantized", implementation: str = "torch") -> tuple[float, float]:
    """`(rtol, minimum cosine)` of a run's output against its float64 reference: the dtype's, wider where w8a8 rounds
    activations. ValueError from `tolerance` naming `dtype` or from `quant_scheme` naming `quant`; `implementation`
    is not checked (an unknown name gets the dtype's bound). Source: moe-lit's own (measured bounds above)."""
    rtol = tolerance(dtype)
    s = quant_scheme(quant)
    if s is not None and s.is_fp8 and implementation == "triton_quant": return max(rtol, 0.3), 0.995   # (measured: above)
    return rtol, 0.999

# %%
#| export
def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    "max |a - b| / max |b| (0 for an all-zero b)."
    a, b = a.double().cpu(), b.double().cpu()
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300) if b.numel() else 0.0

def check_output(actual: torch.Tensor,      # [T, H] a run's output (any float dtype, any device)
                 reference: torch.Tensor,   # [T, H] float64 reference (or a second run, upcast)
                 dtype: torch.dtype,        # the layer's dtype: picks the tolerance
                 quant: str = "unquantized", implementation: str = "torch",
                 between_runs: bool = False,   # `reference` is a second run: each is within rtol of float64, so the
                ) -> dict:                     # two are held to 2·rtol (and twice the cosine gap)
    """A run's check as data: `{max_rel_err, rtol, cosine, cosine_min, ok, detail}` under `check_tolerance`. A failed
    comparison is data, not an exception, but bad arguments still raise: ValueError from `check_tolerance` (`dtype`,
    `quant`) or `assert_close` (non-tensors), and torch's RuntimeError when the element counts differ. Source:
    moe-lit's own."""
    rtol, cos_min = check_tolerance(dtype, quant, implementation)
    if between_runs: rtol, cos_min = 2 * rtol, 1 - 2 * (1 - cos_min)
    try: assert_close(actual, reference, dtype=dtype, rtol=rtol); ok, msg = True, ""
    except AssertionError as e: ok, msg = False, str(e)
    a, b = actual.double().flatten().cpu(), reference.double().flatten().cpu()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item() if b.numel() and b.abs().max() > 0 else 1.0
    if ok and cos < cos_min: ok, msg = False, f"cosine {cos:.6f} < {cos_min}"
    return {"max_rel_err": _max_rel(actual, reference), "rtol": rtol, "cosine": cos, "cosine_min": cos_min, "ok": ok,
            "detail": msg}

def quantization_error(actual: torch.Tensor,               # [T, H] a quantized run's output
                       unquantized: torch.Tensor | None,   # [T, H] float64 on the weights before quantization, or None
                       dtype: torch.dtype) -> dict | None:
    """`{max_rel_err, cosine}` of a quantized run against the float64 result of its weights before quantization —
    information, not a check (what quantizing cost) — or None without that reference (a checkpoint's stored codes).
    Raises as `check_output` does (ValueError naming `dtype`; RuntimeError for different element counts). Source:
    moe-lit's own."""
    if unquantized is None: return None
    c = check_output(actual, unquantized, dtype)
    return {"max_rel_err": c["max_rel_err"], "cosine": c["cosine"]}

# %% [markdown]
# Two runs that each pass against float64 can still differ from each other by the sum of their errors: an element
# 0.8·rtol above the reference in one run and 0.8·rtol below it in the other. Comparing two runs (the EP sum against
# the single-device run) therefore takes `between_runs=True`, which holds them to twice the tolerance.

# %%
#| test check_output_between_runs
ref = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(8, 8)
rtol = check_tolerance(torch.bfloat16)[0]
up, down = (ref * (1 + 0.8 * rtol)).bfloat16(), (ref * (1 - 0.8 * rtol)).bfloat16()
assert check_output(up, ref, torch.bfloat16)["ok"] and check_output(down, ref, torch.bfloat16)["ok"]   # each vs float64
assert not check_output(up, down.double(), torch.bfloat16)["ok"]                       # vs each other, the 1x tolerance
r = check_output(up, down.double(), torch.bfloat16, between_runs=True)
assert r["ok"] and r["rtol"] == 2 * rtol, r
assert not check_output((ref * (1 + 3 * rtol)).bfloat16(), down.double(), torch.bfloat16, between_runs=True)["ok"]

# %%
#| export
def quant_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """`(relative error ‖got − want‖/‖want‖, cosine similarity)` in float64 over all elements (any shapes with the same
    element count). ValueError naming `got` when the counts differ. Source: moe-lit's own."""
    g, w = got.detach().double().flatten().cpu(), want.detach().double().flatten().cpu()
    if g.shape != w.shape: raise ValueError(f"got: expected {tuple(w.shape)} elements, got {tuple(g.shape)}")
    top = max(g.abs().max().item(), w.abs().max().item()) if w.numel() else 0.0
    if 0.0 < top < float("inf"): g, w = g / top, w / top   # both by one power: the norms neither overflow nor underflow
    rel = ((g - w).norm() / w.norm().clamp(min=1e-300)).item()
    gn, wn = g.norm().item(), w.norm().item()          # (cosine_similarity's eps = 1e-8 would bend tiny vectors)
    cos = 1.0 if gn == wn == 0.0 else 0.0 if gn * wn == 0.0 else (g @ w).item() / (gn * wn)
    return rel, cos

def assert_quant_close(got: torch.Tensor, want: torch.Tensor, rel_tol: float = 1e-2, cos_min: float = 0.9999,
                       name: str = "result"):
    """Assert finite `got` with relative error < `rel_tol` and cosine > `cos_min` against `want` (float64 spec).
    AssertionError naming `name` (a non-finite value, or a bound missed); ValueError from `quant_error` naming `got`
    when the element counts differ. Source: moe-lit's own."""
    if got.dtype.itemsize == 1 and got.is_floating_point(): got = got.float()   # fp8: no isfinite of its own
    if not torch.isfinite(got).all():
        bad = (~torch.isfinite(got)).nonzero()[0].tolist()
        raise AssertionError(f"{name}: non-finite value at {bad}: {got[tuple(bad)].item()}")
    if not want.numel(): return
    rel, cos = quant_error(got, want)
    if not (rel < rel_tol and cos > cos_min):
        raise AssertionError(f"{name}: relative error {rel:.3g} (limit {rel_tol:g}), cosine {cos:.6f} (limit {cos_min:g})")

# %%
#| test quant_error_measures
w = torch.randn(1000, dtype=torch.float64)
rel, cos = quant_error(w * 1.01, w)
assert abs(rel - 0.01) < 1e-9 and cos > 0.99999
assert_quant_close(w.float(), w)
test_fail(lambda: assert_quant_close(-w, w), contains="cosine -1")
test_fail(lambda: assert_quant_close(torch.full((3,), float("nan")), w[:3]), contains="non-finite value at [0]")
test_fail(lambda: assert_quant_close(w * 1.05, w), contains="relative error 0.05")
assert_quant_close(w * 1e-10, w * 1e-10)                        # tiny but equal: cosine 1, not bent by an eps
for scale in (1e-170, 1e160):                                   # float64's extremes: the norms are taken scaled
    assert_quant_close(w * scale, w * scale)
    test_fail(lambda: assert_quant_close(-w * scale, w * scale), contains="cosine -1")
assert_quant_close(w[:8].to(torch.float8_e4m3fn), w[:8].to(torch.float8_e4m3fn).double())   # fp8 `got`
test_eq(quant_error(torch.zeros(3), torch.zeros(3))[1], 1.0)
test_fail(lambda: assert_quant_close(torch.zeros(3, dtype=torch.float64), w[:3]), contains="cosine 0.000000")

# %%
#| export
def experts_tolerance(scheme: str) -> tuple[float, float]:
    """`(relative error bound, cosine bound)` of a quantized experts class (two GEMMs) against its spec. ValueError
    naming `scheme` unless it is a full QUANT_SCHEMES name other than 'unquantized'. Source: moe-lit's own."""
    if scheme not in QUANT_SCHEMES: raise ValueError(f"scheme: expected one of {list(QUANT_SCHEMES)}, got {scheme!r}")
    return (5e-2, 0.998) if quant_scheme(scheme).is_fp8 else (2e-2, 0.9995)

def check_spec_output(actual: torch.Tensor,   # [T, H] a run's output on the Triton quantized experts
                      spec: torch.Tensor,     # [T, H] float64: `09d`'s spec of those experts (activations rounded)
                      quant: str,             # the experts' scheme (a QUANT_SCHEMES name)
                     ) -> dict:
    """A quantized run's check against its kernels' spec as data — `{rel_err, rtol, cosine, cosine_min, ok, detail}`
    under `experts_tolerance(quant)`, the bound the kernel tests hold the experts to. The spec rounds the activations
    as the kernels do, so this bound is several times tighter than the float64 check's for w8a8. A failed check is
    data, not an exception; ValueError naming the argument for a `quant` that is not a quantized scheme (short names
    are taken), an `actual` that is not a dense float tensor, or a `spec` that is not a finite float64 tensor of
    `actual`'s shape. Source: moe-lit's own."""
    from moe_lit.quant import quant_scheme_name
    scheme = quant_scheme_name(quant)
    if scheme not in QUANT_SCHEMES: raise ValueError(f"quant: expected one of {list(QUANT_SCHEMES)}, got {quant!r}")
    rtol, cos_min = experts_tolerance(scheme)
    check_dense("actual", check_tensor("actual", actual, dtype=FLOAT_DTYPES))
    check_finite("spec", check_dense("spec", check_tensor("spec", spec, shape=tuple(actual.shape), dtype=torch.float64)))
    finite = bool(torch.isfinite(actual).all())
    rel, cos = quant_error(actual, spec)
    ok = finite and rel < rtol and cos > cos_min
    detail = "" if ok else ("non-finite values; " if not finite else "") + \
        f"relative error {rel:.3g} (limit {rtol:g}), cosine {cos:.6f} (limit {cos_min:g})"
    return dict(rel_err=rel, rtol=rtol, cosine=cos, cosine_min=cos_min, ok=ok, detail=detail)

# %%
#| test check_spec_output
w = torch.randn(64, 32, dtype=torch.float64)
good = check_spec_output((w * 1.01).bfloat16(), w, "fp8_w8a8_block")
assert good["ok"] and good["rtol"] == 0.05 and abs(good["rel_err"] - 0.01) < 5e-3, good
bad = check_spec_output((w * 1.08).bfloat16(), w, "fp8_w8a8_block")             # FP8's bound is 5 %: 8 % fails
assert not bad["ok"] and "relative error 0.08" in bad["detail"], bad
assert not check_spec_output((w * 1.03).bfloat16(), w, "mxfp4_w4a16")["ok"]      # FP4's (16-bit activations): 2 %
nan = w.clone(); nan[0, 0] = float("nan")
assert check_spec_output(nan, w, "fp8")["detail"].startswith("non-finite values")          # a short name
test_fail(lambda: check_spec_output(w, w, "unquantized"), contains="quant: expected one of")
test_fail(lambda: check_spec_output(w.flatten(), w, "fp8"), contains="spec: expected a 1-D tensor, got shape (64, 32)")
test_fail(lambda: check_spec_output(w.float(), w.float(), "fp8"), contains="spec: expected dtype torch.float64")
test_fail(lambda: check_spec_output(w.int(), w, "fp8"), contains="actual: expected dtype")
test_fail(lambda: check_spec_output(w, nan, "fp8"), contains="spec: expected finite values")

# %% [markdown]
# ## Tiny Hugging Face models
#
# transformers' own MoE blocks are the numerical reference for every model family, and the tests build their models
# and checkpoints with transformers itself — nothing is downloaded. `tiny_hf_model` makes a seeded model of one
# family with a few experts and a small hidden size (its last decoder layers are MoE; DeepSeek's first is dense, as
# in the real checkpoints); `hf_moe_output` runs one layer's MoE block on `[T, H]` rows, whatever the family's block
# returns. transformers is an optional dependency (`pip install moe-lit[hf]`), imported only here.

# %%
#| export
TINY_HF = {   # model_type -> config.json keys of a tiny model of that family (2 decoder layers, hidden 32)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                      norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True),
    "qwen3_next": dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                       head_dim=16, linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8,
                       linear_value_head_dim=8),
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=1.5,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=8),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, n_shared_experts=1,
                        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=None,
                        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, swiglu_limit=0.5),   # the clamps bite
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=32, head_dim=16),
    "minimax_m2": dict(num_local_experts=6, num_experts_per_tok=2, head_dim=16),
}

def tiny_hf_model(model_type: str,       # a key of TINY_HF
                  seed: int = 0,         # torch seed of the random initialisation
                  dtype: torch.dtype = torch.float32,
                  **overrides):          # config keys to change
    """A seeded transformers causal LM of `model_type` with tiny sizes (2 layers, hidden 32), biases and buffers
    randomised. ValueError naming `model_type` outside TINY_HF; ImportError without transformers; `overrides` are
    passed unchecked to transformers' config. Source: transformers' `AutoConfig.for_model` and model classes."""
    if model_type not in TINY_HF: raise ValueError(f"model_type: expected one of {sorted(TINY_HF)}, got {model_type!r}")
    import transformers
    kw = dict(hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              vocab_size=64, **TINY_HF[model_type])
    cfg = transformers.AutoConfig.for_model(model_type, **{**kw, **overrides})
    torch.manual_seed(seed)
    model = (transformers.Llama4ForCausalLM(cfg) if model_type == "llama4_text"
             else transformers.AutoModelForCausalLM.from_config(cfg)).to(dtype).eval()
    model.set_experts_implementation("eager")   # the plain per-expert loop: the reference (grouped_mm has no fp64)
    with torch.no_grad():                 # zero-initialised biases and buffers would hide a dropped bias
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith(("router.bias", "_proj_bias", "e_score_correction_bias")): t.normal_(0, 0.5)
    for m in model.modules():             # transformers < 5.2x hard-codes gpt-oss's alpha and limit: use the config's
        if type(m).__name__ == "GptOssExperts": m.alpha, m.limit = getattr(cfg, "swiglu_alpha", 1.702), cfg.swiglu_limit
    return model

def hf_moe_block(model, layer_index: int):
    """The MoE block (router + experts + shared) of decoder layer `layer_index` of a transformers model. Raises nothing
    of its own: IndexError for a layer past the model, AttributeError for a model without `model.layers`. Source:
    transformers' decoder layers (`mlp`, Llama-4's `feed_forward`)."""
    layer = model.model.layers[layer_index]
    return getattr(layer, "feed_forward", None) or layer.mlp          # Llama-4 calls it feed_forward

def hf_moe_output(block, x: torch.Tensor) -> torch.Tensor:
    """`[T, H]` output of a transformers MoE block on `x [T, H]` (blocks that also return router data are unwrapped).
    Raises nothing of its own: a bad `x` fails inside the block. Source: transformers' MoE block `forward`."""
    with torch.no_grad(): out = block(x[None])
    out = out[0] if isinstance(out, tuple) else out
    return out.reshape(x.shape)

# %%
#| test tiny_hf_models
for t in TINY_HF:                                 # transformers is a test dependency: this fails without it
    block = hf_moe_block(tiny_hf_model(t), 1)
    test_eq(hf_moe_output(block, torch.randn(3, 32)).shape, (3, 32))
    biases = [p for n, p in [*block.named_parameters(), *block.named_buffers()] if n.endswith(("bias",))]
    assert all(b.abs().sum() > 0 for b in biases), t                 # no zero bias hides a dropped one
test_fail(lambda: tiny_hf_model("bert"), contains="model_type: expected one of")

# %% [markdown]
# ## Pre-quantized checkpoints
#
# Two checkpoints written by hand in the layouts of the released ones, from codes made by moe-lit's own quantizer:
# DeepSeek-V3's FP8 (per-projection `weight` e4m3 codes and fp32 `weight_scale_inv` per 128×128 block, two shards and
# an index; `quantization_config.quant_method = "fp8"`) and gpt-oss's MXFP4 (`*_blocks [E, N, K/32, 16]` uint8,
# `*_scales [E, N, K/32]` e8m0, gate and up rows interleaved, bf16 biases; `quant_method = "mxfp4"`). Each writer
# returns the `QuantizedExpertWeights` it stored, so a test can check the codes read back bit for bit.

# %%
#| export
def write_fp8_block_checkpoint(directory,                 # an existing empty directory
                               E: int = 4, H: int = 320, I: int = 128,   # H = 2.5 blocks: a partial block column
                               seed: int = 0) -> dict:
    """A DeepSeek-V3-style FP8 block checkpoint (layer 1 MoE): returns `{experts, shared, gate, bias}` as stored.
    ValueError naming `E`, `H` or `I` (`I` a positive multiple of 128: the gate and up halves split the scale rows);
    OSError for a missing `directory`. Source: DeepSeek-V3's checkpoint layout (`weight_scale_inv`, 128x128 blocks)."""
    import json
    check_int("E", E, lo=1); check_int("H", H, lo=1); check_int("I", I, lo=128)
    if I % 128: raise ValueError(f"I: expected a multiple of 128 (one scale row per 128 rows of gate and of up), got {I}")
    from safetensors.torch import save_file
    from moe_lit.quant_weights import quantize_expert_weights
    torch.manual_seed(seed)
    P, r = "model.layers.1.mlp.", I // 128                      # r: scale rows of the gate half
    qw = quantize_expert_weights(torch.randn(E, 2 * I, H) / H**0.5, torch.randn(E, H, I) / I**0.5, "fp8_w8a8_block")
    shared = quantize_expert_weights(torch.randn(1, 2 * I, H) / H**0.5, torch.randn(1, H, I) / I**0.5, "fp8_w8a8_block")
    gate, bias = torch.randn(E, H).bfloat16(), torch.randn(E)
    tensors = {P + "gate.weight": gate, P + "gate.e_score_correction_bias": bias}
    for name, q, e in [(f"experts.{e}.", qw, e) for e in range(E)] + [("shared_experts.", shared, 0)]:
        for proj, codes, scale in (("gate_proj", q.w13[e, :I], q.w13_scale[e, :r]),
                                   ("up_proj", q.w13[e, I:], q.w13_scale[e, r:]), ("down_proj", q.w2[e], q.w2_scale[e])):
            tensors[f"{P}{name}{proj}.weight"], tensors[f"{P}{name}{proj}.weight_scale_inv"] = codes.clone(), scale.clone()
    config = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "first_k_dense_replace": 1, "n_routed_experts": E,
              "num_experts_per_tok": 2, "hidden_size": H, "moe_intermediate_size": I, "intermediate_size": 512,
              "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                      "weight_block_size": [128, 128]}}
    json.dump(config, open(f"{directory}/config.json", "w"))
    shard = {k: f"model-0000{1 + ('experts.2' in k or 'experts.3' in k)}-of-00002.safetensors" for k in tensors}
    for f in set(shard.values()): save_file({k: v for k, v in tensors.items() if shard[k] == f}, f"{directory}/{f}")
    json.dump({"metadata": {}, "weight_map": shard}, open(f"{directory}/model.safetensors.index.json", "w"))
    return {"experts": qw, "shared": shared, "gate": gate, "bias": bias, "tensors": tensors}

# %%
#| export
def write_mxfp4_checkpoint(directory, E: int = 4, H: int = 96, I: int = 64, seed: int = 0,
                           swiglu_limit: float = 7.0) -> dict:
    """A gpt-oss-style MXFP4 checkpoint (one layer): returns `{experts, w13_bias, w2_bias, tensors}` as stored.
    ValueError naming `E`, `H` or `I` (`H` and `I` positive multiples of 32, the MXFP4 block); OSError for a missing
    `directory`. Source: gpt-oss's checkpoint layout (`*_blocks`/`*_scales`, gate and up rows interleaved)."""
    import json
    check_int("E", E, lo=1)
    for n, v in (("H", H), ("I", I)):
        if check_int(n, v, lo=32) % 32: raise ValueError(f"{n}: expected a multiple of 32 (the MXFP4 block), got {v}")
    from safetensors.torch import save_file
    from moe_lit.quant_weights import quantize_expert_weights
    torch.manual_seed(seed)
    P = "model.layers.0.mlp."
    qw = quantize_expert_weights(torch.randn(E, 2 * I, H) / H**0.5, torch.randn(E, H, I) / I**0.5, "mxfp4_w4a16")
    b13, b2 = (torch.randn(E, 2 * I) * 0.1).bfloat16(), (torch.randn(E, H) * 0.1).bfloat16()
    inter = torch.stack([torch.arange(I), torch.arange(I, 2 * I)], 1).flatten()   # stored row 2j: gate j, 2j + 1: up j
    tensors = {P + "router.weight": torch.randn(E, H).bfloat16(), P + "router.bias": torch.randn(E).bfloat16(),
               P + "experts.gate_up_proj_blocks": qw.w13[:, inter].reshape(E, 2 * I, H // 32, 16).contiguous(),
               P + "experts.gate_up_proj_scales": qw.w13_scale[:, inter].contiguous(),
               P + "experts.gate_up_proj_bias": b13[:, inter],
               P + "experts.down_proj_blocks": qw.w2.reshape(E, H, I // 32, 16).clone(),
               P + "experts.down_proj_scales": qw.w2_scale.clone(), P + "experts.down_proj_bias": b2}
    config = {"model_type": "gpt_oss", "num_hidden_layers": 1, "num_local_experts": E, "num_experts_per_tok": 2,
              "hidden_size": H, "intermediate_size": I, "swiglu_limit": swiglu_limit, "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "mxfp4"}}
    json.dump(config, open(f"{directory}/config.json", "w")); save_file(tensors, f"{directory}/model.safetensors")
    return {"experts": qw, "w13_bias": b13, "w2_bias": b2, "tensors": tensors}

# %%
#| test checkpoint_writers_refuse_bad_shapes
for bad, msg in ((dict(I=64), "I: expected >= 128"), (dict(I=192), "I: expected a multiple of 128"),
                 (dict(E=0), "E: expected >= 1")):       # checked before anything is written: no directory needed
    test_fail(lambda: write_fp8_block_checkpoint("/nonexistent", **bad), contains=msg)
for bad, msg in ((dict(H=40), "H: expected a multiple of 32"), (dict(I=16), "I: expected >= 32"),
                 (dict(I=48), "I: expected a multiple of 32")):
    test_fail(lambda: write_mxfp4_checkpoint("/nonexistent", **bad), contains=msg)

# %% [markdown]
# ## The kernels as the GPU compiles them, on any machine
#
# The interpreter runs a kernel's Python, not its compilation: a construct the GPU compiler rejects (a method on a
# constexpr, a mask of an unsupported type, a shared-memory budget passed) is green on the CPU. Triton ships its own
# `ptxas`, so every kernel can still be **compiled for Hopper (`cuda:90`) without a GPU**. `record_launches` notes
# each Triton launch a block of code makes (the kernel still runs); `launch_spec` turns one into what the compiler
# needs — the signature (a tensor is a pointer to its dtype, an int `i32` or `i64`, 1 a constant, as Triton's own
# specialisation does, with 16-divisible pointers and ints marked so), the constexprs and the launch options — and
# `compile_for_gpu` compiles the distinct specs in a subprocess without `TRITON_INTERPRET` (the kernels' modules
# import in their GPU form there: module-level constexprs such as the interpreter's workarounds take their GPU
# values). The constexprs that only the interpreter sets (`UPCAST`, fp32 `PRECISION`, `EMULATE_CAST`) are given
# their GPU values, so the compiled variant is the one a GPU launch of the same call would run; the tiles stay the
# interpreter's (a GPU picks its own from the tables). The compiled kernel's shared memory is reported: an H200 SM
# offers 227 KiB to one program. Programmatic dependent launch (`PDL`, `06_kernels.batched`) is compiled on, and
# `pdl_wait` says whether the kernel's PTX waits for the grid before it (`griddepcontrol.wait`) ahead of its first
# global memory access — the compiler may not move a load above it, and the PTX shows it did not. A host tensor
# descriptor (a TMA operand) becomes the `tensordesc<dtype[box]>` type Triton gives it.

# %%
#| export
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                 torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                 torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}
GPU_CONSTEXPRS = {"UPCAST": False, "PRECISION": "tf32", "EMULATE_CAST": False,   # the interpreter's switches, off
                  "PDL": True}   # and programmatic dependent launch on: its instructions compile too

class record_launches:
    """Context manager: `with record_launches() as seen:` appends `(kernel, args, kwargs)` of every Triton launch (the
    launch still runs). Raises nothing of its own (ImportError without Triton). Source: moe-lit's own (it wraps
    Triton's `JITFunction.run`, or `InterpretedFunction.run` under the interpreter)."""
    def __enter__(self) -> list:
        import triton
        from triton.runtime.interpreter import InterpretedFunction
        self.cls = InterpretedFunction if triton_interpreting() else triton.runtime.jit.JITFunction
        self.orig, seen = self.cls.run, []          # (`launch_kernel` goes through the JIT while `run` is replaced)
        orig = self.orig
        def run(kernel, *args, **kwargs):
            seen.append((kernel, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))
            return orig(kernel, *args, **kwargs)
        self.cls.run = run
        return seen
    def __exit__(self, *exc):
        self.cls.run = self.orig

# aten ops that write a constant or a range: a launch each on a GPU (a constant pad: its fill, then a copy)
FILL_OPS = frozenset({"zeros", "zeros_like", "new_zeros", "zero_", "full", "full_like", "new_full", "fill_", "ones",
                      "ones_like", "new_ones", "arange", "constant_pad_nd"})

class record_fills:
    """Context manager: `with record_fills() as seen:` appends `(aten op, moe-lit frames)` of every op that writes a
    constant or a range (`FILL_OPS`: zeros, full, fill_, zero_, ones, arange, their `_like` / `new_` forms, and a
    constant pad, `F.pad`) made inside it; with `capturing=True` (default) only those made while the current CUDA
    stream is being captured, which a graph replays as a launch of their own on every replay. The frames are
    `file:line function` of moe-lit's code, innermost first (at most 4). The ops still run. ValueError naming `capturing` for a non-bool; RuntimeError when
    one instance is entered again inside itself. Source: moe-lit's own, on torch's `TorchDispatchMode`."""
    def __init__(self, capturing: bool = True): self.capturing, self.mode = check_bool("capturing", capturing), None
    def __enter__(self) -> list:
        import traceback
        if self.mode is not None: raise RuntimeError("record_fills: already entered (nest another instance instead)")
        from torch.utils._python_dispatch import TorchDispatchMode
        seen, capturing = [], self.capturing
        class _Fills(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                wanted = not capturing or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
                if wanted and func.overloadpacket.__name__ in FILL_OPS:
                    frames = [f for f in traceback.extract_stack() if f"{os.sep}moe_lit{os.sep}" in f.filename
                              and f.name != "__torch_dispatch__"][-4:]
                    seen.append((name, [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(frames)]))
                return func(*args, **(kwargs or {}))
        self.mode = _Fills()
        self.mode.__enter__()
        return seen
    def __exit__(self, *exc):
        self.mode.__exit__(*exc); self.mode = None

def _source_hash(fn) -> str:
    import hashlib
    return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]

def launch_spec(kernel, args: tuple, kwargs: dict) -> dict:
    "One recorded launch as a JSON-ready compile spec: `{module, kernel, source, signature, constexprs, divisible, options}` (ValueError for an argument it cannot type)."
    fn = getattr(kernel, "fn", None)
    if not (callable(fn) and hasattr(kernel, "run")):
        raise ValueError(f"kernel: expected a @triton.jit function (as record_launches notes it), got {type(kernel).__name__}")
    if not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise ValueError(f"args, kwargs: expected a tuple and a dict, got {type(args).__name__} and {type(kwargs).__name__}")
    params = inspect.signature(fn).parameters
    if len(args) > len(params):
        raise ValueError(f"args: expected at most {len(params)} positional arguments for {fn.__name__}, got {len(args)}")
    bound = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    sig, consts, div = {}, {}, []
    for name, p in params.items():
        v = bound.get(name, p.default)
        if v is inspect.Parameter.empty: raise ValueError(f"{fn.__name__}: expected a value for {name}, got none")
        if "constexpr" in str(p.annotation) or v is None:
            if not isinstance(v, (int, float, str, type(None))):      # bool is an int
                raise ValueError(f"{fn.__name__}: expected an int, float, bool, str or None for constexpr {name}, got "
                                 f"{type(v).__name__}")
            sig[name], consts[name] = "constexpr", GPU_CONSTEXPRS.get(name, v)
        elif isinstance(v, torch.Tensor):
            if v.dtype not in _TRITON_TYPES:
                raise ValueError(f"{fn.__name__}: expected a tensor of {', '.join(map(str, _TRITON_TYPES))} for {name}, got {v.dtype}")
            sig[name] = "*" + _TRITON_TYPES[v.dtype]
            if v.data_ptr() % 16 == 0: div.append(name)
        elif type(v).__name__ == "TensorDescriptor" and isinstance(getattr(v, "base", None), torch.Tensor):
            if v.base.dtype not in _TRITON_TYPES:      # a host-side tensor descriptor (TMA): its type names dtype and box
                raise ValueError(f"{fn.__name__}: expected a descriptor over a tensor of {', '.join(map(str, _TRITON_TYPES))} "
                                 f"for {name}, got {v.base.dtype}")
            sig[name] = f"tensordesc<{_TRITON_TYPES[v.base.dtype]}[{','.join(map(str, v.block_shape))}]>"
        elif isinstance(v, bool): sig[name] = "i1"
        elif isinstance(v, int):
            if v == 1: sig[name], consts[name] = "constexpr", 1            # Triton's specialisation of 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0: div.append(name)
        elif isinstance(v, float): sig[name] = "fp32"
        else: raise ValueError(f"{fn.__name__}: expected a tensor, tensor descriptor, int, float, bool or None for {name}, got {type(v).__name__}")
    options = {k: v for k, v in kwargs.items() if k not in params and k in ("num_warps", "num_stages", "maxnreg")}
    module = fn.__module__
    if module == "__main__": module = _twin_module(fn)          # a notebook's kernel: its exported twin, same source
    elif getattr(getattr(sys.modules.get(module), fn.__name__, None), "fn", None) is not fn:
        raise ValueError(f"kernel: expected a module-level @triton.jit function (the compiling process imports it by "
                         f"name), got {fn.__name__} of {module}, not found there")
    return dict(module=module, kernel=fn.__name__, source=_source_hash(fn), signature=sig, constexprs=consts,
                divisible=div, options=options)

def _twin_module(fn) -> str:
    "The moe_lit module holding a jitted function of `fn`'s name and source (a running notebook's kernel, exported); ValueError if none."
    import importlib, pkgutil, moe_lit
    for info in sorted(pkgutil.walk_packages(moe_lit.__path__, "moe_lit."), key=lambda i: not i.name.startswith("moe_lit.kernels")):
        try: mod = importlib.import_module(info.name)
        except ImportError: continue                      # an optional extra's module (transformers) without the extra
        twin = getattr(getattr(mod, fn.__name__, None), "fn", None)
        if twin is not None and _source_hash(twin) == _source_hash(fn): return info.name
    raise ValueError(f"kernel: expected {fn.__name__}, defined in __main__, to be a moe_lit kernel (the subprocess that "
                     f"compiles imports it by module), found no moe_lit function of that name and source")

def _find_kernel(module: str, name: str, source: str):
    "The jitted kernel `name` of `module`, whose source must hash to `source` (what was recorded is what compiles)."
    import importlib
    fn = getattr(importlib.import_module(module), name)
    if _source_hash(fn.fn) != source:
        raise ValueError(f"kernel: expected {module}.{name} to have the recorded source, got another version")
    return fn

def _waits_first(ptx: str) -> bool:
    "Whether a kernel's PTX waits for the grid before it (`griddepcontrol.wait`) ahead of its first global memory access."
    import re
    body = ptx[ptx.find("{", ptx.find(".entry")):] if ".entry" in ptx else ""
    wait = body.find("griddepcontrol.wait")
    first = re.search(r"\b(ld|st|atom|red|prefetch)\.global|\bcp\.async", body)
    return wait >= 0 and (first is None or wait < first.start())

def _resource_usage(cubin: bytes) -> tuple[int, int]:
    "`(registers a thread, stack bytes a thread)` of a compiled kernel, read by the cuobjdump Triton bundles; (-1, -1) without it."
    import re, subprocess, tempfile, triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool): return -1, -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin); f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m[1]), int(m[2])) if m else (-1, -1)

def _compile_specs(specs: list, capability: int) -> list:
    "In a process without the interpreter: compile each spec for `cuda:capability`."
    import importlib, time, triton
    from triton.backends.compiler import GPUTarget
    out = []
    for s in specs:
        fn = _find_kernel(s["module"], s["kernel"], s["source"])
        names, t0 = list(fn.arg_names), time.perf_counter()
        try:
            src = triton.compiler.ASTSource(fn=fn, signature=s["signature"],
                                            constexprs={(names.index(k),): v for k, v in s["constexprs"].items()},
                                            attrs={(names.index(n),): [["tt.divisibility", 16]] for n in s["divisible"]})
            c = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=s["options"])
            ptx = c.asm.get("ptx", "")
            regs, stack = _resource_usage(c.asm["cubin"])
            out.append(dict(kernel=s["kernel"], ok=True, error="", shared_bytes=int(c.metadata.shared),
                            seconds=time.perf_counter() - t0, pdl_wait=_waits_first(ptx),
                            prefetches=ptx.count("prefetch.global"), registers=regs, stack_bytes=stack))
        except Exception as e:   # the compiler's message, whatever its type: the finding
            # A failure in a @triton.jit helper is a chain: a CompilationError per call level, then the cause. The
            # deepest CompilationError names the line; its message ends with the source, the caret and the error.
            chain = [e]
            while chain[-1].__cause__ is not None: chain.append(chain[-1].__cause__)
            at = [c for c in chain if type(c).__name__ == "CompilationError"] or [e]
            cause = chain[-1]                                              # (shown when the message lacks it)
            why = "" if cause is at[-1] or str(cause) in str(at[-1]) else f" <- {type(cause).__name__}: {str(cause)[-500:]}"
            error = f"{type(at[-1]).__name__}: {str(at[-1])[-1500:]}{why}"
            out.append(dict(kernel=s["kernel"], ok=False, error=error, shared_bytes=0,
                            seconds=time.perf_counter() - t0, pdl_wait=False, prefetches=0, registers=-1, stack_bytes=-1))
    return out

def compile_for_gpu(launches: list,           # `record_launches`' list, or specs from `launch_spec`
                    capability: int = 90,      # the target: 90 = Hopper (H100/H200)
                    timeout: float = 900,      # seconds for the whole batch
                   ) -> list[dict]:            # per distinct spec: {kernel, ok, error, shared_bytes, seconds, pdl_wait, prefetches, registers, stack_bytes, spec}
    """Compile each distinct recorded launch for `cuda:capability` with Triton's bundled compiler, in a subprocess
    without the interpreter. ValueError naming `timeout`, `capability` or `launches` (or from `launch_spec`);
    RuntimeError when the subprocess fails, `subprocess.TimeoutExpired` past `timeout` seconds; a kernel that does
    not compile is a row with `ok=False`. Source: Triton's `triton.compile(ASTSource, target=GPUTarget)`."""
    import json, subprocess, sys
    check_positive_real("timeout", timeout)
    if isinstance(capability, bool) or not isinstance(capability, int) or not 70 <= capability < 200:
        raise ValueError(f"capability: expected an int compute capability such as 80, 90 or 100, got {capability!r}")
    if not isinstance(launches, (list, tuple)) or (isinstance(launches, tuple) and len(launches) == 3 and
                                                    isinstance(launches[2], dict)):      # one launch, not a list of them
        raise ValueError(f"launches: expected a list of (kernel, args, kwargs) launches or launch_spec dicts, got "
                         f"{type(launches).__name__}{' (one launch)' if isinstance(launches, tuple) else ''}")
    keys = {"module", "kernel", "source", "signature", "constexprs", "divisible", "options"}
    for x in launches:
        ok = isinstance(x, dict) and keys <= set(x) or isinstance(x, tuple) and len(x) == 3
        if not ok: raise ValueError(f"launches: expected (kernel, args, kwargs) tuples or launch_spec dicts, got {x!r:.80}")
    specs = [x if isinstance(x, dict) else launch_spec(*x) for x in launches]
    specs = list({json.dumps(s, sort_keys=True): s for s in specs}.values())       # distinct
    code = ("import json, sys; from moe_lit.testing import _compile_specs; "
            f"print(json.dumps(_compile_specs(json.load(sys.stdin), {int(capability)})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)      # the caller's modules import there too
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(specs), capture_output=True, text=True, env=env,
                       timeout=timeout)
    if r.returncode: raise RuntimeError(f"compile_for_gpu: the compiling process failed: {r.stderr[-3000:]}")
    return [dict(res, spec=s) for res, s in zip(json.loads(r.stdout.strip().splitlines()[-1]), specs)]

def assert_compiles_for_gpu(launches: list, capability: int = 90, max_shared_bytes: int = 227 * 1024) -> list[dict]:
    """`compile_for_gpu` and raise AssertionError naming each kernel that does not compile or needs more shared memory
    than an SM gives one program (227 KiB on Hopper). Source: moe-lit's own, on Triton's compiler."""
    res = compile_for_gpu(launches, capability)
    bad = [f"{r['kernel']}: " + (r["error"] or f"{r['shared_bytes']} B of shared memory, past {max_shared_bytes}") for r in res
           if not r["ok"] or r["shared_bytes"] > max_shared_bytes]
    if bad: raise AssertionError(f"{len(bad)} of {len(res)} kernels do not compile for cuda:{capability} or need more "
                                 f"shared memory than an SM gives: " + "; ".join(bad))
    if not res: raise AssertionError("launches: expected at least one recorded Triton launch, got none")
    return res

# %%
#| hide
from moe_lit.testing import _waits_first, _bf16_bits
from moe_lit.placement import determine_expert_map

# %%
#| test compile_for_gpu_bad_input
test_eq(_waits_first(".entry k(\n){\nld.param.u64 a;\ngriddepcontrol.wait;\nld.global.u32 b;\n}"), True)
test_eq(_waits_first(".entry k(\n){\nld.global.u32 b;\ngriddepcontrol.wait;\n}"), False)   # a load moved above it
test_eq(_waits_first(".entry k(\n){\ncp.async.bulk.tensor x;\ngriddepcontrol.wait;\n}"), False)
test_eq(_waits_first(".entry k(\n){\nld.global.u32 b;\n}"), False)                          # no wait at all
with record_launches() as seen:
    route_topk(router_plan(MoEConfig(8, 2, 16, 16)), torch.randn(3, 8).to(DEVICE))
test_eq([r["ok"] for r in compile_for_gpu(seen, capability=100)], [True])           # Blackwell too
for bad, msg in ((seen[0], "launches: expected a list of (kernel, args, kwargs) launches or launch_spec dicts, got tuple (one launch)"),
                 ([1, 2], "launches: expected (kernel, args, kwargs) tuples or launch_spec dicts, got 1"),
                 ([{"kernel": "x"}], "launches: expected (kernel, args, kwargs) tuples or launch_spec dicts")):
    test_fail(lambda: compile_for_gpu(bad), contains=msg)
for cap in (9.0, 0, True, 900): test_fail(lambda: compile_for_gpu(seen, capability=cap), contains="capability: expected an int")
test_fail(lambda: compile_for_gpu(seen, timeout=-1), contains="timeout: expected a finite number > 0")
k, args, kw = seen[0]
test_fail(lambda: launch_spec(k, (torch.zeros(2, dtype=torch.complex64),) + args[1:], kw), contains="expected a tensor of")
test_fail(lambda: launch_spec(k, args + (1,) * 40, kw), contains="args: expected at most")
test_fail(lambda: launch_spec(print, args, kw), contains="kernel: expected a @triton.jit function")
@triton.jit
def _local_copy(x_ptr, y_ptr, B: tl.constexpr):                                   # not a module attribute: refused
    """Copies B elements from x to y (a test helper defined in a cell, so not a module attribute).

    grid = (1,) at its one launch; no program exits early. Constexprs: `B` elements copied (a power of two)."""
    tl.store(y_ptr + tl.arange(0, B), tl.load(x_ptr + tl.arange(0, B)))
with record_launches() as mine: _local_copy[(1,)](torch.zeros(16, device=DEVICE), torch.zeros(16, device=DEVICE), B=16)
test_fail(lambda: compile_for_gpu(mine), contains="kernel: expected")
test_fail(lambda: assert_compiles_for_gpu(seen, max_shared_bytes=-1), contains="need more shared memory than an SM gives")

# %% [markdown]
# `record_fills` lists the constant and range writes (zeros, full, fill_, ones, arange) made inside it, each with the
# moe-lit lines that made it. A CUDA graph replays every one of them as a launch of its own, so the layer's tests
# capture a forward under it and ask for none (`12_layer`); `nbs/bench/capture_fills.py` prints them for every
# benchmark deployment.

# %%
#| test record_fills
with record_fills(capturing=False) as seen:
    torch.zeros(2); torch.full((1,), 3.0); torch.empty(4).zero_(); torch.arange(3) + 1; torch.empty(2)
    torch.ones(3).masked_fill(torch.tensor([True, False, True]), 0.0).nonzero()     # computed, not constants
test_eq([n for n, _ in seen], ["aten.zeros.default", "aten.full.default", "aten.zero_.default", "aten.arange.default",
                               "aten.ones.default"])
assert all(frames == [] for _, frames in seen), seen                          # made here, not in moe-lit's code
with record_fills(capturing=False) as seen: determine_expert_map(2, 1, 8)        # moe-lit's own fills, named
assert seen and all(f and f[0].startswith("placement.py:") for _, f in seen), seen
with record_fills() as seen: torch.zeros(2)                                   # no capture: nothing recorded
test_eq(seen, [])
test_fail(lambda: record_fills(capturing="no"), contains="capturing: expected a bool")
rec = record_fills(capturing=False)
def twice():
    with rec:
        with rec: pass
test_fail(twice, contains="record_fills: already entered")
with record_fills(capturing=False) as seen: torch.zeros(1)                      # the instance's mode was popped:
test_eq(len(seen), 1)                                                          # a fresh one records again
with rec as again: torch.zeros(1)                                              # and the refused one is usable
test_eq(len(again), 1)

# %% [markdown]
# ### Launch keys against Triton's specialisation
#
# `moe_lit.kernels.batched.launch_kernel` reuses a compiled kernel for every launch with the same *launch key*, so the
# key must separate any two launches Triton would compile apart. `check_launch_keys` asks Triton itself: it builds the
# JIT's argument binder for a Hopper target (no GPU needed) and, for each recorded launch and for copies of it with
# every tensor moved by 2–32 bytes, every int or bool replaced by 0, 1, 16, 17, 2³¹ and `True`, every int or bool
# constexpr by 0, 1, 2, 16, `True` and `False`, and other `num_warps` and `num_stages`, checks that
# equal keys always come with equal specialisations, and that the values `launch_kernel` hands the compiled kernel's
# launcher are the JIT's own bound arguments, in order.

# %%
#| export
_PERTURB_INTS = (0, 1, 16, 17, 2**31, True)

def _moved(t: torch.Tensor, offset: int) -> torch.Tensor:
    "A tensor like `t` whose address is `offset` bytes past a fresh 256-byte-aligned buffer (its shape and strides kept)."
    span = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1 if t.numel() else 1
    buf = torch.empty(span + (offset + 512) // t.element_size(), dtype=t.dtype, device=t.device)
    skip = (-buf.data_ptr() % 256 + offset) // t.element_size()
    return buf.as_strided(t.shape, t.stride(), skip)

def check_launch_keys(launches: list,   # `record_launches`' list of (kernel, args, kwargs)
                     ) -> int:          # launches checked, perturbed copies included
    """AssertionError where two launches share a `launch_key` but not Triton's specialisation, or `launch_values`
    differs from the JIT's bound arguments; ValueError naming `launches` when it is not a non-empty list. Source:
    moe-lit's own, against Triton's binder (`triton.runtime.jit.create_function_from_signature`)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature
    from moe_lit.kernels.batched import launch_key, launch_values
    if not isinstance(launches, list) or not launches:
        raise ValueError(f"launches: expected a non-empty list of recorded launches, got {launches!r:.80}")
    backend, binders, seen, checked = make_backend(GPUTarget("cuda", 90, 32)), {}, {}, 0
    def check(kernel, args, kwargs):
        nonlocal checked
        fn = kernel.fn
        if fn not in binders:
            jf = JITFunction(fn)
            binders[fn] = create_function_from_signature(jf.signature, jf.params, backend)
        bound, spec, options = binders[fn](*args, **kwargs)
        got = launch_values(kernel, args, kwargs)
        want = tuple(bound.values())
        same = len(got) == len(want) and all(a is b or (type(a) is type(b) and not isinstance(a, torch.Tensor) and a == b)
                                             for a, b in zip(got, want))
        assert same, f"{fn.__name__}: launch_values differs from the JIT's bound arguments"
        key, spec = (fn, launch_key(args, kwargs)), repr((spec, sorted(options.items())))   # the JIT's key has both
        assert seen.setdefault(key, spec) == spec, \
            f"{fn.__name__}: one launch key, two Triton specialisations:\n{seen[key]}\n{spec}"
        checked += 1
    def variants(a):
        if isinstance(a, torch.Tensor): return [_moved(a, o) for o in (2, 4, 8, 16, 24, 32) if o % a.element_size() == 0]
        return list(_PERTURB_INTS) if isinstance(a, int) else []
    for kernel, args, kwargs in launches:
        check(kernel, args, kwargs)
        params = inspect.signature(kernel.fn).parameters
        runtime = [n for n, p in params.items() if "constexpr" not in str(p.annotation)]   # Triton specialises these
        for i, (n, a) in enumerate(zip(params, args)):
            if n in runtime:
                for v in variants(a): check(kernel, args[:i] + (v,) + args[i + 1:], kwargs)
        for n, a in kwargs.items():
            if n in runtime:
                for v in variants(a): check(kernel, args, {**kwargs, n: v})
            elif n in params and type(a) in (int, bool):              # a constexpr: another value, another binary
                for v in {0, 1, 2, 16, True, False} - {a}: check(kernel, args, {**kwargs, n: v})
        for n, vals in (("num_warps", (2, 4, 8)), ("num_stages", (1, 2, 3, 4))):   # launch options
            for v in vals: check(kernel, args, {**kwargs, n: v})
    return checked

# %% [markdown]
# ## Inline PTX, executed on the CPU
#
# A kernel's `tl.inline_asm_elementwise` block runs only on the GPU: the interpreter takes the portable branch beside
# it. `emulate_ptx` executes the few PTX instructions moe-lit's decode blocks use, on Python integers, with PTX's
# semantics — `prmt` (byte permute), `shf.l.wrap` (funnel shift; a rotation when both words are one), `and`, `add`/`mul.lo`/`max` on `u32`, `mov` (including the packing and
# unpacking of two 16-bit halves), `cvt` between `u32`/`u16`, `e4m3x2 → f16x2` and `f16 → bf16`, and `fma.rn.bf16x2`
# (each half's product and sum exact — rational arithmetic — then one rounding to nearest even, subnormals kept) — so that a test can check
# such a block bit for bit against its definition on every input that matters. Operands are `$0, $1, …` in the
# constraint order: outputs first, then inputs, as Triton binds them. An instruction outside that set raises.

# %%
#| export
def _bf16_bits(v: float) -> int:
    "The bf16 nearest `v` (ties to even; exact float32 values only, as the decode blocks' results are), as 16 bits."
    import struct
    if v != v: return 0x7FC0
    if abs(v) >= 2.0 ** 128: return 0x7F80 | (0x8000 if v < 0 else 0)      # past float32: inf, as the rounding gives
    b = struct.unpack("<I", struct.pack("<f", v))[0]
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF

def _bf16_nearest(a: float, b: float, c: float) -> int:
    "The bf16 bits of `a · b + c` rounded once (ties to even, subnormals kept, overflow to inf), as `fma.rn.bf16x2` gives them."
    from fractions import Fraction
    import math
    d = a * b + c                                    # in double: the sign of a zero, and inf / NaN, as IEEE says
    if d == 0 or not math.isfinite(d) or not all(map(math.isfinite, (a, b, c))): return _bf16_bits(d)
    x = Fraction(a) * Fraction(b) + Fraction(c)      # exact (the double sum may round, and then again to bf16)
    if x == 0: return 0
    sign, m = (0x8000 if x < 0 else 0), abs(x)
    e = m.numerator.bit_length() - m.denominator.bit_length()
    if Fraction(2) ** e > m: e -= 1                  # 2^e <= m < 2^(e + 1)
    q = Fraction(2) ** (max(e, -126) - 7)            # the spacing of bf16 there: 8 significant bits, 2^-133 below 2^-126
    n, rest = divmod(m, q)
    n = int(n) + (rest > q / 2 or (rest == q / 2 and int(n) % 2))
    if n * q >= 2 ** 128: return sign | 0x7F80                     # past the largest bf16: inf
    return sign | _bf16_bits(float(n * q))           # exact in float32, so its top half is the bf16

def _bf16_value(h: int) -> float:
    import struct
    return struct.unpack("<f", struct.pack("<I", (h & 0xFFFF) << 16))[0]

_PTX_ARITY = {"mov.b32": 2, "and.b32": 3, "mul.lo.u32": 3, "add.u32": 3, "add.s32": 3, "max.u32": 3, "prmt.b32": 4,
              "shf.l.wrap.b32": 4, "cvt.u16.u32": 2, "cvt.rn.f16x2.e4m3x2": 2, "cvt.rn.bf16.f16": 2, "fma.rn.bf16x2": 4, "mul.rn.bf16x2": 3}

def emulate_ptx(src: str,          # the PTX text of an inline-asm block (braces and `.reg` lines allowed)
                operands: list,    # the `$n` values in constraint order, ints in [0, 2^32) (outputs' values are ignored)
               ) -> list:          # every operand's value after the block (outputs hold the results)
    "Execute the PTX subset of moe-lit's decode blocks on Python ints (32-bit `r`, 16-bit `h`); ValueError on anything else."
    import re
    if not isinstance(src, str): raise ValueError(f"src: expected PTX text, got {type(src).__name__}")
    if not isinstance(operands, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) and
                                                          0 <= v < 2**32 for v in operands):
        raise ValueError(f"operands: expected a list of ints in [0, 2^32), got {operands!r:.120}")
    regs = {f"${i}": int(v) for i, v in enumerate(operands)}
    def val(x):
        if re.fullmatch(r"\$\d+|[A-Za-z_]\w*", x):
            if x not in regs: raise ValueError(f"src: expected {x} to be an operand or written before it is read")
            return regs[x]
        try: v = int(x, 0)
        except ValueError: raise ValueError(f"src: expected a register or an integer literal, got {x!r}") from None
        if not -2**31 <= v < 2**32: raise ValueError(f"src: expected a 32-bit integer literal, got {x!r}")
        return v & 0xFFFFFFFF
    def dest(x):
        if not re.fullmatch(r"\$\d+|[A-Za-z_]\w*", x): raise ValueError(f"src: expected a register to write, got {x!r}")
        if x.startswith("$") and int(x[1:]) >= len(operands):
            raise ValueError(f"src: expected an operand $0..${len(operands) - 1} to write, got {x}")
        return x
    def halves(v): return v & 0xFFFF, (v >> 16) & 0xFFFF
    body = re.sub(r"//[^\n]*", "", src)
    body = "\n".join(l for l in body.split("\n") if l.strip() not in ("{", "}"))   # the block's own braces
    for line in body.split(";"):
        line = line.strip()
        if line.count("{") != line.count("}"): raise ValueError(f"src: expected balanced braces, got {line!r}")
        if not line or line.startswith(".reg"): continue
        op, rest = (re.split(r"\s+", line, maxsplit=1) + [""])[:2]
        if op not in _PTX_ARITY: raise ValueError(f"src: expected the PTX subset emulate_ptx runs, got {line!r}")
        args, depth, cur = [], 0, ""                                   # split at the commas outside braces
        for ch in rest:
            depth += (ch == "{") - (ch == "}")
            if ch == "," and depth == 0: args.append(cur.strip()); cur = ""
            else: cur += ch
        args = args + [cur.strip()] if rest.strip() else []
        if any(not a for a in args): raise ValueError(f"src: expected no empty operand, got {line!r}")
        if len(args) != _PTX_ARITY[op]:
            raise ValueError(f"src: expected {_PTX_ARITY[op]} operands for {op}, got {len(args)} in {line!r}")
        pair = lambda a: [t.strip() for t in a[1:-1].split(",")] if a.startswith("{") else None
        d, srcs = args[0], args[1:]
        if op == "mov.b32":
            dp, sp = pair(d), pair(srcs[0])
            if dp is not None:
                if len(dp) != 2: raise ValueError(f"src: expected two halves in {d}")
                regs[dest(dp[0])], regs[dest(dp[1])] = halves(val(srcs[0]))
            elif sp is not None:
                if len(sp) != 2: raise ValueError(f"src: expected two halves in {srcs[0]}")
                regs[dest(d)] = (val(sp[0]) & 0xFFFF) | ((val(sp[1]) & 0xFFFF) << 16)
            else: regs[dest(d)] = val(srcs[0])
            continue
        d = dest(d)
        if op == "and.b32": regs[d] = val(srcs[0]) & val(srcs[1])
        elif op == "mul.lo.u32": regs[d] = (val(srcs[0]) * val(srcs[1])) & 0xFFFFFFFF
        elif op in ("add.u32", "add.s32"): regs[d] = (val(srcs[0]) + val(srcs[1])) & 0xFFFFFFFF
        elif op == "max.u32": regs[d] = max(val(srcs[0]), val(srcs[1]))
        elif op == "shf.l.wrap.b32":                                    # funnel shift: the high word of (b:a) << n % 32
            a, b, n = val(srcs[0]), val(srcs[1]), val(srcs[2]) % 32
            regs[d] = ((((b << 32) | a) << n) >> 32) & 0xFFFFFFFF
        elif op == "prmt.b32":
            a, b, sel = val(srcs[0]), val(srcs[1]), val(srcs[2])
            pool = [(a >> (8 * k)) & 0xFF for k in range(4)] + [(b >> (8 * k)) & 0xFF for k in range(4)]
            out = 0
            for k in range(4):
                nib = (sel >> (4 * k)) & 0xF
                byte = pool[nib & 7]
                if nib & 8: byte = 0xFF if byte & 0x80 else 0          # sign replication
                out |= byte << (8 * k)
            regs[d] = out
        elif op == "cvt.u16.u32": regs[d] = val(srcs[0]) & 0xFFFF
        elif op == "cvt.rn.f16x2.e4m3x2":
            p = val(srcs[0])
            f = torch.tensor([p & 0xFF, (p >> 8) & 0xFF], dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float16)
            lo, hi = f.view(torch.int16).tolist()
            regs[d] = (lo & 0xFFFF) | ((hi & 0xFFFF) << 16)
        elif op == "cvt.rn.bf16.f16":
            h = torch.tensor([val(srcs[0]) & 0xFFFF], dtype=torch.int32).to(torch.int16).view(torch.float16)
            regs[d] = _bf16_bits(float(h.float()))
        else:                                                           # fma / mul.rn.bf16x2
            a, b = halves(val(srcs[0])), halves(val(srcs[1]))
            c = halves(val(srcs[2])) if op.startswith("fma") else (0x8000, 0x8000)   # mul: + (-0)
            r = [_bf16_nearest(_bf16_value(a[k]), _bf16_value(b[k]), _bf16_value(c[k])) for k in range(2)]
            regs[d] = r[0] | (r[1] << 16)
    return [regs[f"${i}"] for i in range(len(operands))]

# %%
#| test emulate_ptx_runs_the_subset
test_eq(emulate_ptx("prmt.b32 $0, $1, 0, 0x4140;", [0, 0xDDCCBBAA])[0], 0x00BB00AA)      # bytes 0, 1 into the halves
test_eq(emulate_ptx("mov.b32 {$0, $1}, $2;", [0, 0, 0x12345678])[:2], [0x5678, 0x1234])
test_eq(emulate_ptx("shf.l.wrap.b32 $0, $1, $1, 12;", [0, 0x80000001])[0], 0x00001800)   # a rotation left by 12
test_eq(emulate_ptx("shf.l.wrap.b32 $0, $1, $2, 36;", [0, 0xF0000000, 0x1])[0], 0x1F)     # (b:a) << 4, high word
test_eq(emulate_ptx("fma.rn.bf16x2 $0, $1, $2, $3;", [0, 0x3F803F80, 0x40004040, 0x80008000])[0], 0x40004040)  # 1·2, 1·3
test_eq(emulate_ptx("fma.rn.bf16x2 $0, $1, $2, $3;", [0, 0x3F81, 0x3F81, 0])[0] & 0xFFFF, 0x3F82)   # (1+2^-7)^2 rounds
test_eq(emulate_ptx("cvt.rn.f16x2.e4m3x2 $0, $1;", [0, 0x3840])[0], 0x3C004000)   # e4m3 0x40 = 2.0, 0x38 = 1.0 (f16)
test_eq(emulate_ptx("fma.rn.bf16x2 $0, $1, $2, $3;", [0, _bf16_bits(7.0), _bf16_bits(37.0), _bf16_bits(-2.0 ** -20)])[0]
        & 0xFFFF, _bf16_bits(258.0))     # 259 - 2^-20 rounds once to 258 (rounding to fp32 first would give the tie, 260)
test_fail(lambda: emulate_ptx("sub.u32 $0, $1, 1;", [0, 5]), contains="expected the PTX subset emulate_ptx runs")
test_eq(emulate_ptx("add.u32\t$0, $1, 2; add.u32 $0, $0, 3;", [0, 5])[0], 10)       # a tab, two instructions a line
for src, ops, msg in (("add.u32 $0, $1, 2, 3;", [0, 5], "expected 3 operands for add.u32, got 4"),
                      ("add.u32 $0, $2, 1;", [0, 5], "expected $2 to be an operand or written before it is read"),
                      ("mov.b32 {$0, $1, $2;", [0, 0, 5], "expected balanced braces"),
                      ("cvt.u16.u32 5, $1;", [0, 5], "expected a register to write, got '5'"),
                      ("add.u32 $0, $1, 0xZZ;", [0, 5], "expected a register or an integer literal, got '0xZZ'"),
                      ("add.u32 $0, $1, 0;", [0, 2**40], "operands: expected a list of ints in [0, 2^32)"),
                      ("add.u32 $0, $1, 0;", [0, -1], "operands: expected a list of ints in [0, 2^32)"),
                      ("add.u32 $0, $1, 0;", [0, 1.7], "operands: expected a list of ints in [0, 2^32)"),
                      ("mov.b32 $5, $1;", [0, 5], "expected an operand $0..$1 to write, got $5"),
                      ("and.b32 $0, $1, , 3;", [0, 5], "expected no empty operand"),
                      ("and.b32 $0, $1, 0x1FFFFFFFF;", [0, 5], "expected a 32-bit integer literal")):
    test_fail(lambda: emulate_ptx(src, ops), contains=msg)
test_fail(lambda: emulate_ptx(None, [0]), contains="src: expected PTX text, got NoneType")
