# %%
#| default_exp kernels.quant_act

# %% [markdown]
# # FP8 activation quantizer
# > Dynamic e4m3 quantization of activation rows on Triton — per tensor, per token or per 1×128 group, in the batched and the contiguous layout, skipping padding rows — value-exact against `09_quant`'s torch quantizer.

# %%
#| export
from __future__ import annotations
import torch
import triton
import triton.language as tl
from moe_lit.kernels.batched import INTERPRET, launch_kernel, _await_producers, check_kernel_device
from moe_lit.kernels.batched import _cdiv, _next_pow2
from moe_lit.terms import check_int, check_tensor, check_choice, check_bool
from moe_lit.quant import FP8_MAX, quantize_fp8
from moe_lit.formats import slab_counts

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.kernels.batched import DEVICE
from moe_lit.quant_weights import random_activations
from moe_lit.testing import poison_rows
from moe_lit.kernels.quant_act import _act_quant_block_rows

# %% [markdown]
# In this notebook: `fp8_quantize_activations` (a Triton kernel) and its spec `fp8_quantize_activations_reference`.
# The w8a8 GEMMs of `09c_kernels.quant` call it on their input when they are not handed pre-quantized activations,
# except for 1×128 groups and per-token scales, which they quantize inside their K loop with this chapter's helpers
# (`_fp8_quantize_group`, `_fp8_row_amax`, `_fp8_row_scales`, `_fp8_scaled`).
# A **reference** page in Triton's order: spec → kernel → launcher → tests.
#
# %% [markdown]
# ## Activations: quantized per call, by a Triton kernel
#
# For w8a8 the GEMM input is quantized on the fly with dynamic scales (vLLM's dynamic activation quantization):
# `scale = max(|x| over the group) / 448`, `q = e4m3(x / scale)`. The three granularities, with their scale shapes in
# the batched layout `[E, M, K]` (valid rows only) and the contiguous layout `[R, K]` (all rows):
#
# | granularity | batched scale | contiguous scale | used with |
# |---|---|---|---|
# | `tensor` | `[E, 1, 1]`: one per expert's valid rows | `[1, 1]` | `fp8_w8a8_tensor` |
# | `token` | `[E, M, 1]` | `[R, 1]` | `fp8_w8a8_channel` |
# | `group` | `[E, M, ⌈K/128⌉]` | `[R, ⌈K/128⌉]` | `fp8_w8a8_block` |
#
# This is a **Triton kernel** (`_quantize_fp8_rows_kernel`), not torch code: in the batched layout it skips the padding
# rows (at decode most of the slab), which torch would read and quantize along. One program handles `BLOCK_R` rows
# of one group; the per-tensor case runs it twice (an `atomic_max` pass for each expert's |max|, then a pass with
# that scale). Rows past `expert_num_tokens[e]` are neither read nor written.
#
# > **Exactness.** The kernel divides with `div_rn` (IEEE round-to-nearest, as torch does; Triton's `/` is an
# > approximate division on the GPU) and converts with round-to-nearest-even, so `q` and `scale` equal `09_quant`'s
# > `quantize_fp8` value for value. **Interpreter caveat:** Triton 3.6's interpreter converts fp32 → e4m3 wrongly when
# > rounding carries into the next power of two (−127.9 becomes −64, not −128). Under the interpreter the kernel
# > therefore rounds to the e4m3 grid itself (`_round_to_e4m3`, integer rounding of the mantissa) and converts an
# > exact value; on the GPU it uses the hardware conversion.

# %%
#| export
@triton.jit
def _round_to_e4m3(x):
    "fp32 -> the nearest e4m3 value, as fp32 (ties to even), for |x| <= 448; NaN passes. Interpreter-only workaround."
    ok = tl.abs(x) <= 448.0                    # false only for NaN: x was clamped to ±448 before
    a = tl.where(ok, tl.abs(x), 0.0)           # a NaN's bits would overflow the int32 add below
    bits = a.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # keep 3 mantissa bits
    sub = (a + 16384.0) - 16384.0              # below 2^-6 the e4m3 spacing is 2^-9, the fp32 spacing at 2^14
    r = tl.where(a < 0.015625, sub, normal)
    return tl.where(ok, tl.where(x < 0, -r, r), x)

# %% [markdown]
# The arithmetic of one group of rows lives in three `@triton.jit` helpers, so that the GEMMs of `09c` can quantize a
# block-scaled K tile inside their K loop with the very same instructions (and get the very same bits):
# `_fp8_row_amax` (|max| per row, and which rows hold a NaN: `tl.max` drops NaN), `_fp8_row_scales` (the scale, NaN
# for such a row) and `_fp8_scaled` (the value to convert: divided, clamped to ±448, NaN kept, on the e4m3 grid under
# the interpreter). `_fp8_quantize_group` chains them for a tile whose columns are one scale group.

# %%
#| export
@triton.jit
def _fp8_row_amax(x):
    "`(amax, nan_row)` of `x [R, G]` fp32: max |x| per row (masked entries loaded as 0 count as 0), and rows holding a NaN."
    amax = tl.max(tl.abs(x), axis=1)
    nan_row = tl.sum((x != x).to(tl.int32), axis=1) > 0           # tl.max drops NaN: carry it through the scale
    return amax, nan_row

@triton.jit
def _fp8_row_scales(amax, nan_row, ROWS: tl.constexpr):
    "`[ROWS]` fp32 dynamic scales `amax / 448` (IEEE division; at least the smallest normal), NaN for a row with a NaN or an inf."
    s = tl.maximum(tl.math.div_rn(amax, tl.full((ROWS,), 448.0, tl.float32)), 1.1754943508222875e-38)
    return tl.where(nan_row | (amax == float("inf")), float("nan"), s)   # one rule, whatever the tiling: its row is NaN

@triton.jit
def _fp8_scaled(x, s, ROWS: tl.constexpr, GROUP: tl.constexpr, EMULATE_CAST: tl.constexpr):
    "`x [ROWS, GROUP] / s[:, None]` clamped to ±448 with NaN kept: the fp32 value whose e4m3 conversion is q."
    y_raw = tl.math.div_rn(x, tl.broadcast_to(s[:, None], (ROWS, GROUP)))
    y = tl.minimum(tl.maximum(y_raw, -448.0), 448.0)
    y = tl.where(y_raw != y_raw, y_raw, y)                        # min/max would turn NaN into ±448
    if EMULATE_CAST: y = _round_to_e4m3(y)
    return y

@triton.jit
def _fp8_quantize_group(x, ROWS: tl.constexpr, GROUP: tl.constexpr, EMULATE_CAST: tl.constexpr):
    "`(q float8e4nv [ROWS, GROUP], s [ROWS] fp32)`: each row of `x` (fp32, one scale group wide) quantized with its own scale."
    amax, nan_row = _fp8_row_amax(x)
    s = _fp8_row_scales(amax, nan_row, ROWS)
    return _fp8_scaled(x, s, ROWS, GROUP, EMULATE_CAST).to(tl.float8e4nv), s

# %%
#| export
@triton.jit
def _quantize_fp8_rows_kernel(
    x_ptr,              # [E, M, K] bf16/fp16/fp32 (E = 1 in the contiguous layout), unit stride along K
    q_ptr,              # [E, M, K] float8_e4m3fn
    s_ptr,              # MODE 0: scales [E, M, G] fp32 (written); MODE 2: [E] fp32 per-tensor scales (read)
    amax_ptr,           # [E] fp32, zeroed: MODE 1 takes each expert's |max| into it
    counts_ptr,         # [E] int32 valid rows (HAS_COUNTS), else unused
    M, K, stride_xe, stride_xm, stride_qe, stride_qm, stride_se, stride_sm,
    MODE: tl.constexpr, HAS_COUNTS: tl.constexpr, EMULATE_CAST: tl.constexpr,
    BLOCK_R: tl.constexpr, GROUP: tl.constexpr,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    "grid = (_cdiv(M, BLOCK_R), _cdiv(K, GROUP), E); programs whose rows start past the count exit at once."
    _await_producers(PDL)                                    # before any load or store
    pid_r, g, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows_end = M
    if HAS_COUNTS: rows_end = tl.minimum(tl.load(counts_ptr + e), M)
    if pid_r * BLOCK_R >= rows_end: return
    e64 = e.to(tl.int64)
    offs_r = (pid_r * BLOCK_R).to(tl.int64) + tl.arange(0, BLOCK_R)   # int64 rows: rows × K may pass 2^31
    offs_k = g * GROUP + tl.arange(0, GROUP)
    row_ok = offs_r < rows_end
    mask = row_ok[:, None] & (offs_k < K)[None, :]
    x = tl.load(x_ptr + e64 * stride_xe + offs_r[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)                                          # also the interpreter's bf16 upcast
    amax, nan_row = _fp8_row_amax(x)                              # [BLOCK_R]; masked entries are 0
    if MODE == 1:                                                 # a NaN anywhere: +inf here, so the scale is NaN
        m = tl.where(tl.sum(nan_row.to(tl.int32), axis=0) > 0, float("inf"), tl.max(amax, axis=0))
        tl.atomic_max(amax_ptr + e, m)
    else:
        if MODE == 0:
            s = _fp8_row_scales(amax, nan_row, BLOCK_R)
            tl.store(s_ptr + e64 * stride_se + offs_r * stride_sm + g, s, mask=row_ok)
        else:
            s = tl.load(s_ptr + e) + tl.zeros((BLOCK_R,), tl.float32)
        y = _fp8_scaled(x, s, BLOCK_R, GROUP, EMULATE_CAST)
        tl.store(q_ptr + e64 * stride_qe + offs_r[:, None] * stride_qm + offs_k[None, :], y.to(q_ptr.dtype.element_ty), mask=mask)

# %% [markdown]
# The spec uses `09_quant`'s `quantize_fp8` on each expert's valid rows (`token`, `block` with a `(1, group_k)` block,
# or `tensor`). Rows past the count come back as q = 0, scale = 1 (the kernel leaves them unwritten).

# %%
#| export
_GRAN_09 = {"tensor": "tensor", "token": "token", "group": "block"}

def _check_act_quant_args(x, granularity, expert_num_tokens, group_k):
    check_choice("granularity", granularity, ("tensor", "token", "group"))
    check_int("group_k", group_k, lo=1, hi=2**16 + 1)               # one program holds a group of a row
    if group_k & (group_k - 1): raise ValueError(f"group_k: expected a power of two, got {group_k}")
    check_tensor("x", x, dtype=(torch.bfloat16, torch.float16, torch.float32))
    if expert_num_tokens is None:
        if x.dim() != 2: raise ValueError(f"x: expected a 2-D [rows, K] tensor without expert_num_tokens, got shape {tuple(x.shape)}")
    else:
        check_tensor("x", x, ndim=3)
        check_tensor("expert_num_tokens", expert_num_tokens, shape=(x.shape[0],), dtype=torch.int32, contiguous=True)
    if x.shape[-1] == 0: raise ValueError(f"x: expected at least one column, got shape {tuple(x.shape)}")
    _check_token_width(x, granularity)

def _check_token_width(x, granularity):
    "Per-token scales: a token's whole row is one program's block, so at most 2^16 columns (checked on every path)."
    if granularity == "token" and x.shape[-1] > 2**16:
        raise ValueError(f"x: expected at most {2**16} columns for per-token scales, got {x.shape[-1]}")

def fp8_quantize_activations_reference(x: torch.Tensor,            # [E, M, K] (batched) or [R, K] (contiguous)
                                       granularity: str,           # 'tensor', 'token' or 'group'
                                       expert_num_tokens: torch.Tensor | None = None,  # [E] int32 (batched)
                                       group_k: int = 128,         # group width for 'group'
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec of `fp8_quantize_activations`: 09_quant's `quantize_fp8` on each expert's valid rows; rows past a count
    get q = 0 and scale 1. ValueError naming `granularity`, `group_k`, `x` (dtype, shape, no columns, too wide for
    'token'; a NaN or inf in a valid row, where the kernel gives NaN scales) or `expert_num_tokens` (shape, dtype).
    A count outside `[0, M]` is refused (`slab_counts`). Source: vLLM's `batched_moe_kernel_quantize_input` (a loop over experts)."""
    _check_act_quant_args(x, granularity, expert_num_tokens, group_k)
    x3 = x[None] if expert_num_tokens is None else x
    E, M, K = x3.shape
    G = {"tensor": 1, "token": 1, "group": -(-K // group_k)}[granularity]
    q = torch.zeros(x3.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.ones(E, M if granularity != "tensor" else 1, G, dtype=torch.float32, device=x.device)
    counts = [M] * E if expert_num_tokens is None else slab_counts(expert_num_tokens, E, M)
    for e, n in enumerate(counts):
        if n == 0: continue
        qe, se = quantize_fp8(x3[e, :n], _GRAN_09[granularity], (1, group_k))
        q[e, :n] = qe
        s[e, : (n if granularity != "tensor" else 1)] = se.reshape(-1, G)
    return (q[0], s[0]) if expert_num_tokens is None else (q, s)

# %%
#| export
def fp8_quantize_activations(x: torch.Tensor,            # [E, M, K] (batched) or [R, K] (contiguous), float
                             granularity: str,           # 'tensor', 'token' or 'group' (1 x group_k)
                             expert_num_tokens: torch.Tensor | None = None,  # [E] int32: valid rows (batched)
                             group_k: int = 128,         # group width for 'group'
                             validate: bool = True,      # check counts on the host (one sync)
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic e4m3 quantization of activation rows on Triton: `(q float8_e4m3fn like x, scale fp32)`.

    Scales are `[E, M, G]` batched (`[R, G]` contiguous) with G = ceil(K / group_k) for 'group', 1 for 'token', and
    `[E, 1, 1]` (`[1, 1]`) for 'tensor'. Rows past an expert's count are unspecified in both outputs (not written; an
    empty expert's per-tensor scale is computed from |max| 0), where the spec writes q = 0 and scale 1: compare valid
    rows only. ValueError naming the argument for a bad granularity, dtype, shape, device (a CPU tensor without the
    interpreter, a meta tensor), group_k, `validate` that is not a bool, or (with `validate`, one host sync) counts
    outside [0, M]. Source: vLLM's `moe_kernel_quantize_input` / `batched_moe_kernel_quantize_input` (dynamic
    per-tensor, per-token and 1×128-group FP8, as `scaled_fp8_quant` and `per_token_group_quant_fp8`)."""
    _check_act_quant_args(x, granularity, expert_num_tokens, group_k)
    check_bool("validate", validate)
    check_kernel_device("x", x, expert_num_tokens=expert_num_tokens)
    M = x.shape[-2]
    if validate and expert_num_tokens is not None and x.shape[0] and ((expert_num_tokens < 0) | (expert_num_tokens > M)).any():
        raise ValueError(f"expert_num_tokens: expected values in [0, {M}], got {expert_num_tokens.tolist()}")
    return _fp8_quantize_activations(x, granularity, expert_num_tokens, group_k)

ACT_QUANT_BATCHED_ROWS = 8   # rows of one quantizer program in the batched layout (the contiguous one takes up to 64)

def _act_quant_block_rows(group: int,          # columns of one program (the scale group, or the padded row)
                          batched: bool) -> int:
    """Rows of one quantizer program: at most 8192 elements; 64 rows in the contiguous layout, `ACT_QUANT_BATCHED_ROWS`
    in the batched one. A batched program loads its whole tile under its expert's count mask, and decode's experts hold
    a few valid rows each, so short tiles finish sooner (`nbs/bench/act_quant_rows_h100_fd9e6e2.json`)."""
    return max(1, min(ACT_QUANT_BATCHED_ROWS if batched else 64, 8192 // group))

def _fp8_quantize_activations(x, granularity, expert_num_tokens, group_k):
    "`fp8_quantize_activations` after its checks: for the quantized GEMMs, whose callers checked the other arguments."
    _check_token_width(x, granularity)
    x3 = x[None] if expert_num_tokens is None else x
    E, M, K = x3.shape
    x3 = x3 if x3.stride(-1) == 1 else x3.contiguous()
    group = {"tensor": min(1024, _next_pow2(max(K, 1))), "token": _next_pow2(max(K, 1)),
             "group": group_k}[granularity]
    G = 1 if granularity != "group" else -(-K // group_k)
    q = torch.empty(x3.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = (torch.empty if E and M else torch.ones)(E, M if granularity != "tensor" else 1, G, dtype=torch.float32, device=x.device)
    if E and M and K:
        block_r = _act_quant_block_rows(group, expert_num_tokens is not None)
        grid = (_cdiv(M, block_r), _cdiv(K, group), E)
        if grid[1] > 65535 or E > 65535:           # CUDA's limit on a grid's y and z dimensions
            raise ValueError(f"x: expected at most 65535 experts and 65535 groups of {group} columns, got {E} and {grid[1]}")
        counts = expert_num_tokens if expert_num_tokens is not None else s
        common = dict(HAS_COUNTS=expert_num_tokens is not None, EMULATE_CAST=INTERPRET, BLOCK_R=block_r, GROUP=group)
        args = (M, K, x3.stride(0), x3.stride(1), q.stride(0), q.stride(1))
        if granularity == "tensor":
            amax = torch.zeros(E, dtype=torch.float32, device=x.device)
            launch_kernel(_quantize_fp8_rows_kernel, grid)(x3, q, s, amax, counts, *args, 0, 0, MODE=1, **common)
            scale = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=torch.finfo(torch.float32).tiny)
            s.copy_(torch.where(amax.isfinite(), scale, float("nan")).view(E, 1, 1))   # inf anywhere: NaN, not zeros
            launch_kernel(_quantize_fp8_rows_kernel, grid)(x3, q, s, amax, counts, *args, 1, 0, MODE=2, **common)
        else:
            launch_kernel(_quantize_fp8_rows_kernel, grid)(x3, q, s, s, counts, *args, s.stride(0), s.stride(1), MODE=0,
                                                           **common)
    return (q[0], s[0]) if expert_num_tokens is None else (q, s)

# %% [markdown]
# The kernel equals its spec value for value on the valid rows (signed zeros aside), for the three granularities, both
# layouts, and a group count that is not a whole number of 128s. The padding rows of the input are poisoned with
# NaN; the outputs' padding rows are not compared (they are unspecified), but the valid rows would turn NaN if a
# padding row leaked into a per-tensor |max|.

# %%
#| test fp8_activation_quantizer_matches_spec
E, M, K = 4, 24, 200                                      # K = 200: a partial last 128-group
x = random_activations((E, M, K), torch.bfloat16, seed=3)
cnt = torch.tensor([0, 1, 7, 24], dtype=torch.int32, device=DEVICE)
poison_rows(x, cnt)
valid = torch.arange(M)[None, :] < cnt.cpu()[:, None]
for gran in ("tensor", "token", "group"):
    q, s = fp8_quantize_activations(x, gran, cnt)
    rq, rs = fp8_quantize_activations_reference(x.cpu(), gran, cnt.cpu())
    test_eq(q.cpu()[valid].float(), rq[valid].float())                          # value-exact
    sv = valid if gran != "tensor" else (cnt.cpu() > 0)[:, None]
    test_eq(s.cpu()[sv], rs[sv])
    xc = random_activations((9, K), torch.float16, seed=4)                      # contiguous layout, fp16
    q, s = fp8_quantize_activations(xc, gran)
    rq, rs = fp8_quantize_activations_reference(xc.cpu(), gran)
    test_eq((q.cpu().float(), s.cpu()), (rq.float(), rs))
    test_eq(tuple(s.shape), {"tensor": (1, 1), "token": (9, 1), "group": (9, 2)}[gran])
test_eq([_act_quant_block_rows(g, b) for g in (128, 4096) for b in (False, True)], [64, 8, 2, 2])
test_fail(lambda: fp8_quantize_activations(x, "block", cnt), contains="granularity: expected one of")
test_fail(lambda: fp8_quantize_activations(x, "token"), contains="x: expected a 2-D [rows, K] tensor")
test_fail(lambda: fp8_quantize_activations(x, "token", cnt + 30), contains="expert_num_tokens: expected values in [0, 24]")
test_fail(lambda: fp8_quantize_activations_reference(x.cpu(), "token", cnt.cpu() - 1),     # its spec refuses them too
          contains="expert_num_tokens: expected values in [0, 24] (max_tokens), got [-1, 0, 6, 23]")
test_fail(lambda: fp8_quantize_activations(x, "token", cnt.repeat(2)[::2]), contains="expert_num_tokens: expected a contiguous tensor")
test_fail(lambda: fp8_quantize_activations(x, "group", cnt, group_k=2**17), contains="group_k: expected")
test_fail(lambda: fp8_quantize_activations(x[..., :0], "group", cnt), contains="x: expected at least one column")
test_eq(fp8_quantize_activations(torch.zeros(0, 64, device=DEVICE), "tensor")[1].cpu(), torch.ones(1, 1))   # no rows: scale 1, set
for bad in (1, "no", None): test_fail(lambda: fp8_quantize_activations(x, "group", cnt, validate=bad), contains="validate: expected a bool")
test_fail(lambda: fp8_quantize_activations(torch.ones(4, 8, device="meta"), "token"), contains="x: expected a tensor with values")

# %% [markdown]
# The activation quantizer equals `quantize_fp8` value for value on the GPU too (it uses `div_rn` and the hardware's
# round-to-nearest-even e4m3 conversion there), at a prefill-sized input:

# %%
#| test fp8_activation_quantizer_gpu
#| gpu
x = random_activations((2048, 7168), torch.bfloat16, seed=1, device="cuda")
xb = random_activations((32, 128, 7168), torch.bfloat16, seed=2, device="cuda")
cnt = torch.randint(0, 129, (32,), generator=torch.Generator().manual_seed(3)).int().cuda()
cnt[:3] = torch.tensor([0, 1, 128])
valid = (torch.arange(128, device="cuda")[None, :] < cnt[:, None])
for gran in ("tensor", "token", "group"):
    q, s = fp8_quantize_activations(x, gran)
    rq, rs = fp8_quantize_activations_reference(x, gran)
    assert torch.equal(q.float(), rq.float()) and torch.equal(s, rs), gran
    q, s = fp8_quantize_activations(xb, gran, cnt)
    rq, rs = fp8_quantize_activations_reference(xb, gran, cnt)
    assert torch.equal(q[valid].float(), rq[valid].float()), gran
    sv = valid if gran != "tensor" else (cnt > 0)[:, None]
    assert torch.equal(s[sv], rs[sv]), gran

# %% [markdown]
# Rows × K past 2^31: the input of GEMM2 at a long prefill has `T·top_k` rows of `I` columns (70 000 tokens × top-8
# × 4096 is 2.3e9 elements), and its row offsets need int64. The kernel computes them in int64; the last rows of an
# input just past the boundary, whose offsets need the 32nd bit, equal the spec.

# %%
#| test fp8_activation_quantizer_int64_offsets
#| gpu
x = torch.randn(524352, 4096, device="cuda", dtype=torch.bfloat16)   # 524352 · 4096 = 2^31 + 2^18 elements
for gran in ("group", "token", "tensor"):
    q, s = fp8_quantize_activations(x, gran)
    rows = slice(None) if gran == "tensor" else slice(-64, None)
    rq, rs = fp8_quantize_activations_reference(x[-64:] if gran != "tensor" else x, gran)
    assert torch.equal(q[-64:].float(), rq[-64:].float()) and torch.equal(s[rows], rs[rows]), gran
    del q, s, rq, rs
