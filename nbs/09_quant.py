# %%
#| default_exp quant

# %% [markdown]
# # Quantization formats
# > FP8 e4m3 with per-tensor, per-channel, per-token and 128×128 block scales; MXFP4 and NVFP4 (e2m1 values, two per byte) — quantize and dequantize in plain torch, exact where the format can be exact.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
import torch
from moe_lit.terms import check_int, check_tensor, check_choice, check_positive_real, check_finite, FLOAT_DTYPES
from moe_lit.config import SIZE_LIMIT

# %%
#| hide
from fastcore.test import test_eq, test_fail
from moe_lit.testing import assert_close

# %% [markdown]
# In this notebook: the e2m1 code (`E2M1_VALUES`, `e2m1_encode`, `pack_fp4`, `unpack_fp4`), FP8 (`quantize_fp8`,
# `dequantize_fp8`), MXFP4 (`quantize_mxfp4`, `dequantize_mxfp4`) and NVFP4 (`quantize_nvfp4`, `dequantize_nvfp4`).
# A **reference** page: these are the specs the quantized kernels will be checked against. Formats follow vLLM's
# `vllm/model_executor/layers/quantization/` and the OCP Microscaling (MX) specification v1.0.
#
# The quantized schemes moe-lit runs are a descriptor table, like the backends': one frozen record per scheme with
# every fact the rest of the package asks about it — the weight code, how weights and activations are scaled, the FP4
# group, the short name of `--quant`, the `quant_method` of a checkpoint stored that way. The kernels of
# `09a_quant_weights`, `09c_kernels.quant`, the oracle, the layer, the checkpoint reader, the tolerances and the command read these
# records; nothing tests a scheme's name for a prefix. (The oracle adds `unquantized`.)

# %%
#| export
@dataclass(frozen=True)
class QuantScheme:
    """One quantization scheme of the experts: its weight code, its scales, its activations, and the names it goes by.
    A frozen record; it checks nothing and raises nothing (`QUANT_SCHEME_TABLE` is its only producer; `quant_scheme`
    refuses unknown names). Source: moe-lit's own descriptor table; the names follow vLLM's `FusedMoEQuantConfig`
    schemes (`fp8_w8a8`, `mxfp4_w4a16`, `nvfp4_w4a16`; fused_moe/config.py)."""
    name: str                           # e.g. 'fp8_w8a8_block'
    weight: str                         # the weight code: 'fp8_e4m3', or 'e2m1' (FP4, two codes a byte)
    weight_scales: str                  # FP8: 'tensor', 'channel' or 'block' (128×128); FP4: 'group' (along K)
    activations: str | None             # FP8 activations scaled per 'tensor', 'token' or 'group' (1×128); None: 16-bit
    group_size: int | None = None       # FP4: K elements sharing a scale (MXFP4 32, e8m0; NVFP4 16, e4m3 + fp32 global)
    alias: str | None = None            # the short name `moe-lit --quant` accepts
    hf_quant_method: str | None = None  # config.json `quantization_config.quant_method` of checkpoints stored this way

    @property
    def is_fp8(self) -> bool:
        """FP8 weights and activations (w8a8); otherwise FP4 weights with 16-bit activations (w4a16). Raises nothing.
        Source: moe-lit's own (read from the record's `weight`)."""
        return self.weight == "fp8_e4m3"

QUANT_SCHEME_TABLE = {s.name: s for s in (
    QuantScheme("fp8_w8a8_tensor", "fp8_e4m3", "tensor", "tensor"),
    QuantScheme("fp8_w8a8_channel", "fp8_e4m3", "channel", "token"),
    QuantScheme("fp8_w8a8_block", "fp8_e4m3", "block", "group", alias="fp8", hf_quant_method="fp8"),   # DeepSeek-V3
    QuantScheme("mxfp4_w4a16", "e2m1", "group", None, group_size=32, alias="mxfp4", hf_quant_method="mxfp4"),  # gpt-oss
    QuantScheme("nvfp4_w4a16", "e2m1", "group", None, group_size=16, alias="nvfp4"),
)}
QUANT_SCHEMES = tuple(QUANT_SCHEME_TABLE)

QUANT_ALIASES = {s.alias: s.name for s in QUANT_SCHEME_TABLE.values() if s.alias}   # short names ('fp8'), from the table

def quant_scheme_name(name: str, arg: str = "quant") -> str:
    """The full name `name` stands for: 'unquantized' or a scheme name as it is, a short name resolved; ValueError
    naming `arg` otherwise. Source: moe-lit's own (`QUANT_SCHEME_TABLE` and its `alias` column)."""
    if isinstance(name, str) and name in QUANT_ALIASES: return QUANT_ALIASES[name]
    if isinstance(name, str) and (name == "unquantized" or name in QUANT_SCHEME_TABLE): return name
    raise ValueError(f"{arg}: expected one of {['unquantized', *QUANT_SCHEMES]} or a short name {list(QUANT_ALIASES)}, "
                     f"got {name!r}")

def quant_scheme(name: str) -> QuantScheme | None:
    """The record of scheme `name` (a full or short name); None for 'unquantized'. Raises ValueError naming the
    schemes for anything else. Source: moe-lit's own (`QUANT_SCHEME_TABLE`)."""
    name = quant_scheme_name(name)
    return None if name == "unquantized" else QUANT_SCHEME_TABLE[name]

# %%
#| test quant_scheme_table
test_eq([s.name for s in QUANT_SCHEME_TABLE.values() if s.is_fp8], ["fp8_w8a8_tensor", "fp8_w8a8_channel", "fp8_w8a8_block"])
test_eq({s.alias: s.name for s in QUANT_SCHEME_TABLE.values() if s.alias},
        {"fp8": "fp8_w8a8_block", "mxfp4": "mxfp4_w4a16", "nvfp4": "nvfp4_w4a16"})
assert all((s.group_size is None) == s.is_fp8 and (s.activations is None) != s.is_fp8 for s in QUANT_SCHEME_TABLE.values())
test_eq(quant_scheme("unquantized"), None)
test_fail(lambda: quant_scheme("int4"), contains="quant: expected one of ['unquantized', 'fp8_w8a8_tensor'")
test_eq(quant_scheme("fp8"), quant_scheme("fp8_w8a8_block"))                        # a short name, the same record

# %% [markdown]
# ## e2m1, two values per byte
#
# FP4 e2m1 has 1 sign, 2 exponent and 1 mantissa bit; codes 0–7 are the magnitudes
# `0, 0.5, 1, 1.5, 2, 3, 4, 6` and bit 3 is the sign. **Packing:** element `2j` goes in the **low** nibble of byte `j`,
# element `2j + 1` in the high nibble (vLLM's and ModelOpt's order). Rounding is to the nearest value, ties to the
# even mantissa (the thresholds 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5), and magnitudes above 6 saturate to 6.

# %%
#| export

def _check_float_input(name: str, x, min_dim: int = 1) -> torch.Tensor:
    """A floating tensor of at least `min_dim` dims with finite values (a NaN or inf would poison its whole scale
    group). float64 values past fp32's range are refused; those below its smallest subnormal (1.4e-45) quantize to 0,
    as they would in fp32, which the scales and codes are computed in."""
    check_tensor(name, x, dtype=FLOAT_DTYPES)
    if x.dim() < min_dim: raise ValueError(f"{name}: expected at least {min_dim} dims, got shape {tuple(x.shape)}")
    check_finite(name, x)
    if x.dtype == torch.float64 and x.numel():          # the scales are computed in fp32: inf past its range
        big = x.abs().max().item()
        if big > torch.finfo(torch.float32).max:
            raise ValueError(f"{name}: expected values within the fp32 range (|x| <= 3.4e38: the scales are fp32), "
                             f"got |x| up to {big:.3g}")
    return x

def _check_out_dtype(dtype) -> torch.dtype:
    if dtype not in FLOAT_DTYPES: raise ValueError(f"dtype: expected one of {list(FLOAT_DTYPES)}, got {dtype!r}")
    return dtype

_TINY = torch.finfo(torch.float32).tiny      # smallest normal fp32: a scale never collapses below it

# %%
#| export
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_UP = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])     # boundaries between neighbouring magnitudes
_TIE_UP = torch.tensor([False, True, False, True, False, True, False])  # at a tie, round up iff the upper is even

def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 code (uint8 0–15, sign in bit 3) of each element of float `x`, ties to even, saturating at ±6.
    `x` any shape (0-D too), float64/32/16 or bf16; the codes have its shape. ValueError naming `x` (not a float
    tensor, NaN or inf, float64 past fp32's range). Source: the OCP Microscaling Formats (MX) v1.0 spec's E2M1; the
    thresholds are those of vLLM's `ref_nvfp4_quant`."""
    _check_float_input("x", x, min_dim=0)
    a = x.abs().float()
    up = _E2M1_UP.to(a.device)
    code = (a[..., None] > up).sum(-1) + ((a[..., None] == up) & _TIE_UP.to(a.device)).sum(-1)
    return (code + 8 * (x < 0)).to(torch.uint8)

def _check_codes(name, codes):
    check_tensor(name, codes, dtype=torch.uint8)
    if codes.numel() and int(codes.max()) > 15: raise ValueError(f"{name}: expected values in [0, 15], got {int(codes.max())}")

def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """float32 values of uint8 e2m1 codes (any shape; the values have its shape). ValueError naming `code` (not a
    uint8 tensor, a value above 15). Source: the OCP Microscaling Formats (MX) v1.0 spec's E2M1 table."""
    _check_codes("code", code)
    v = E2M1_VALUES.to(code.device)[(code & 7).long()]
    return torch.where(code & 8 > 0, -v, v)

# %%
#| test e2m1_round_trip
vals = torch.cat([E2M1_VALUES, -E2M1_VALUES[1:]])
test_eq(e2m1_decode(e2m1_encode(vals)), vals)                                  # every representable value is exact
test_eq(e2m1_decode(e2m1_encode(torch.tensor([0.25, 0.75, 1.25, 2.5, 5.0, 7.0, -100.0]))).tolist(),
        [0.0, 1.0, 1.0, 2.0, 4.0, 6.0, -6.0])                                 # ties to even mantissa; saturation

# %%
#| export
def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 e2m1 codes `[..., K]` (K even) two per byte: `[..., K/2]`, element 2j in the low nibble.
    ValueError naming `codes` (not a uint8 tensor, a value above 15, 0 dims or an odd last dim). Source: vLLM's and
    ModelOpt's nibble order for NVFP4 and MXFP4 (low nibble = even element)."""
    _check_codes("codes", codes)
    if codes.dim() < 1 or codes.shape[-1] % 2: raise ValueError(f"codes: expected an even last dim, got shape {tuple(codes.shape)}")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)

def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_fp4`: `[..., K/2]` uint8 -> `[..., K]` uint8 codes. ValueError naming `packed` (not a uint8
    tensor, or 0 dims). Source: vLLM's and ModelOpt's nibble order (low nibble = even element)."""
    check_tensor("packed", packed, dtype=torch.uint8)
    if packed.dim() < 1: raise ValueError(f"packed: expected at least 1 dim, got shape {tuple(packed.shape)}")
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)

# %%
#| test fp4_nibble_order
codes = torch.tensor([[1, 2, 3, 15]], dtype=torch.uint8)
test_eq(pack_fp4(codes).tolist(), [[0x21, 0xF3]])                              # element 0 low, element 1 high
test_eq(unpack_fp4(pack_fp4(codes)), codes)
test_fail(lambda: pack_fp4(codes[:, :3]), contains="codes: expected an even last dim")

# %% [markdown]
# ## FP8 e4m3
#
# `float8_e4m3fn` holds magnitudes up to 448. A scale maps each group's absolute maximum to 448: `q = fp8(x / s)`,
# `x̂ = q · s`. Granularities: **tensor** (one scale), **channel** (one per row of a weight `[N, K]`: scale `[N, 1]`),
# **token** (one per row of activations: the same shape rule), **block** (one per `128 × 128` tile: scale
# `[ceil(N/128), ceil(K/128)]`). Partial last blocks take the maximum over the elements they have — the shapes use
# ceil-div (a per-rank intermediate of 192 with block 128 gives 2 blocks, vLLM #48173).
#
# > **Per-tensor activations share one scale across the batch.** `fp8_w8a8_tensor` quantizes the activations of a
# > launch with one dynamic scale, the maximum over every row that shares the launch. One token with a large
# > magnitude then coarsens every other token's codes — at 1e6 among rows of order 1 the others round to 0 — and one
# > NaN or inf makes the scale NaN and every row's output NaN. The per-token, per-channel and 128-block schemes keep
# > such a row to itself. This is the scheme, not a fault of the kernels (vLLM's dynamic per-tensor FP8 behaves the
# > same); serve models whose activations can hold outliers with a finer granularity.

# %%
#| export
FP8_MAX = 448.0

def fp8_nan_codes(codes: torch.Tensor,   # float8_e4m3fn (any shape)
                  ) -> torch.Tensor:     # bool, same shape: True where the byte is one of e4m3fn's two NaNs
    """Where `codes` hold NaN: e4m3fn has no infinities, and its only NaNs are the bytes 0x7F and 0xFF (OCP FP8 spec).
    ValueError naming `codes` (not a float8_e4m3fn tensor: another dtype's bytes mean something else). Metadata check
    only. Source: the OCP 8-bit Floating Point Specification (OFP8), E4M3."""
    check_tensor("codes", codes, dtype=torch.float8_e4m3fn)
    return (codes.view(torch.uint8) & 0x7F) == 0x7F

def _group_amax(x: torch.Tensor, granularity: str, block: tuple) -> torch.Tensor:
    "Absolute maximum per scale group, shaped like the scale."
    a = x.abs().float()
    if granularity == "tensor": return a.amax().reshape(1)
    if granularity in ("channel", "token"): return a.amax(-1, keepdim=True)
    bn, bk = block
    *lead, N, K = a.shape
    pad = torch.nn.functional.pad(a, (0, -K % bk, 0, -N % bn))
    return pad.reshape(*lead, pad.shape[-2] // bn, bn, pad.shape[-1] // bk, bk).amax((-3, -1))

def _check_block(block):
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise ValueError(f"block: expected a pair of ints, got {block!r}")
    check_int("block[0]", block[0], lo=1, hi=SIZE_LIMIT); check_int("block[1]", block[1], lo=1, hi=SIZE_LIMIT)

def _expand(scale: torch.Tensor, shape, granularity: str, block: tuple) -> torch.Tensor:
    if granularity != "block": return scale
    bn, bk = block
    return scale.repeat_interleave(bn, -2)[..., : shape[-2], :].repeat_interleave(bk, -1)[..., : shape[-1]]

# %%
#| export
def quantize_fp8(x: torch.Tensor,                  # [..., N, K] (weights) or [..., T, K] (activations), float
                 granularity: str = "block",       # 'tensor', 'channel', 'token' or 'block'
                 block: tuple = (128, 128),        # block shape for 'block'
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q float8_e4m3fn like x, scale fp32)`: each group's |max| maps to 448 (E4M3's largest finite value); scale
    shapes use ceil-div — `[1]` for 'tensor', `[..., N, 1]` for 'channel' and 'token', `[..., ceil(N/bn), ceil(K/bk)]`
    for 'block'. ValueError naming `x` (not float, fewer than 2 dims, empty, non-finite, past fp32's range),
    `granularity` or `block`.
    Source: the OCP 8-bit floating point spec (E4M3) and vLLM's FP8 scaling (`scaled_fp8_quant`,
    `per_token_group_quant_fp8`)."""
    _check_float_input("x", x, min_dim=2)
    check_choice("granularity", granularity, ("tensor", "channel", "token", "block"))
    _check_block(block)
    if x.numel() == 0: raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    amax = _group_amax(x, granularity, block)
    scale = (amax / torch.full_like(amax, FP8_MAX)).clamp(min=_TINY)   # a tensor divisor: torch's CUDA division by a
                                                                      # Python scalar multiplies by 1/448, 1 ulp off
    q = (x.float() / _expand(scale, x.shape, granularity, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale

def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, granularity: str = "block", block: tuple = (128, 128),
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`q · scale` broadcast over each group, in `dtype`: `q [..., N, K]` float8_e4m3fn and `scale` fp32 shaped as
    `quantize_fp8` returns it. ValueError naming `q` (dtype, fewer than 2 dims), `scale` (dtype or shape),
    `granularity`, `block` or `dtype`. Source: the inverse of `quantize_fp8`, as vLLM dequantizes block FP8."""
    check_tensor("q", q, dtype=torch.float8_e4m3fn)
    check_choice("granularity", granularity, ("tensor", "channel", "token", "block"))
    _check_block(block); _check_out_dtype(dtype)
    if q.dim() < 2: raise ValueError(f"q: expected at least 2 dims, got shape {tuple(q.shape)}")
    *lead, N, K = q.shape
    want = {"tensor": (1,), "channel": (*lead, N, 1), "token": (*lead, N, 1),
            "block": (*lead, -(-N // block[0]), -(-K // block[1]))}[granularity]
    check_tensor("scale", scale, shape=want, dtype=torch.float32)
    return (q.float() * _expand(scale, q.shape, granularity, block)).to(dtype)

# %%
#| test fp8_block_scales_partial_blocks
g = torch.Generator().manual_seed(0)
E, H, I = 4, 256, 192                                     # I per rank 192: not a multiple of 128 (vLLM #48173)
w13, w2 = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
q13, s13 = quantize_fp8(w13); q2, s2 = quantize_fp8(w2)
test_eq((tuple(s13.shape), tuple(s2.shape)), ((E, 3, 2), (E, 2, 2)))           # ceil(384/128)=3, ceil(192/128)=2
for w, q, s in ((w13, q13, s13), (w2, q2, s2)):
    d = dequantize_fp8(q, s)
    per_elem_scale = dequantize_fp8(torch.ones_like(q), s)                      # each element's scale
    assert ((d - w).abs() <= 16 * per_elem_scale + 1e-6).all()                 # half an e4m3 ulp at 448 is 16
    assert torch.nn.functional.cosine_similarity(d.flatten(), w.flatten(), dim=0) > 0.999
for gran, shape in (("tensor", (1,)), ("channel", (E, 2 * I, 1))):
    q, s = quantize_fp8(w13, gran); test_eq(tuple(s.shape), shape)
    assert torch.nn.functional.cosine_similarity(dequantize_fp8(q, s, gran).flatten(), w13.flatten(), dim=0) > 0.999
rows = w13 * torch.logspace(-3, 3, 2 * I)[None, :, None]          # rows six decades apart: one scale a row, or they flush
q, s = quantize_fp8(rows, "channel")
test_eq(s[..., 0], rows.abs().amax(-1) / 448)                      # each row's own max on e4m3's 448
d = dequantize_fp8(q, s, "channel")
assert ((d - rows).norm(dim=-1) / rows.norm(dim=-1)).max() < 0.04  # every row to e4m3's precision, the smallest too

# %%
#| test fp8_exact_on_representable
s_true = torch.tensor([[2.0 ** -3, 2.0 ** 4]])                                 # two blocks, different exponents
x = torch.cat([torch.tensor([448.0, -3.5, 0.125, 1.0] * 32)[None] * s_true[0, 0],
               torch.tensor([-448.0, 6.0, -0.5, 2.0] * 32)[None] * s_true[0, 1]], dim=1)   # [1, 256]: asymmetric
q, s = quantize_fp8(x, "block", (1, 128))
test_eq(s, s_true)
test_eq(dequantize_fp8(q, s, "block", (1, 128)), x)                             # bit-exact

# %% [markdown]
# ## MXFP4 (OCP MX)
#
# 32 consecutive elements along K share one **e8m0** scale (a uint8 exponent: value `2^(e − 127)`), chosen as
# `floor(log2(amax)) − 2` so the block's largest magnitude lands in e2m1's top binade (6 = 1.5·2²); elements are
# e2m1, packed two per byte. No global scale.

# %%
#| export
def quantize_mxfp4(x: torch.Tensor,   # [..., K] float, K a multiple of 32
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(packed uint8 [..., K/2], scales uint8 e8m0 [..., K/32])` per the OCP MX spec (nearest, ties to even). An empty
    `x` gives empty codes and scales (no scale is shared across blocks, unlike FP8's and NVFP4's global ones).
    ValueError naming `x` (not a float tensor, 0 dims, NaN or inf, float64 past fp32's range, a last dim not a
    multiple of 32). Source: the OCP Microscaling Formats (MX) v1.0 spec (scale exponent floor(log2 amax) − 2)."""
    _check_float_input("x", x)
    if x.shape[-1] % 32: raise ValueError(f"x: expected a last dim that is a multiple of 32, got {tuple(x.shape)}")
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // 32, 32)   # (not -1: ambiguous for 0 rows)
    amax = blocks.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -127))) - 2, torch.full_like(amax, -127))
    exp = exp.clamp(-127, 127)
    codes = e2m1_encode(blocks / torch.exp2(exp)[..., None]).reshape(x.shape)
    return pack_fp4(codes), (exp + 127).to(torch.uint8)

def dequantize_mxfp4(packed: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`e2m1(code) · 2^(scale − 127)` over groups of 32, in `dtype`: `[..., K]`, from `packed` uint8 `[..., K/2]` and
    `scales` uint8 e8m0 `[..., K/32]`. ValueError naming `dtype`, `packed` (0 dims, a last dim not a multiple of 16,
    not uint8, not a tensor) or `scales` (shape or dtype). The e8m0 byte 255 is NaN, as the spec has it: its
    group decodes to NaN. Source: the OCP Microscaling Formats (MX) v1.0 spec (vLLM calls quark's
    `dq_mxfp4`)."""
    _check_out_dtype(dtype); check_tensor("packed", packed)
    if packed.dim() < 1 or packed.shape[-1] % 16:
        raise ValueError(f"packed: expected a last dim that is a multiple of 16 (32 values), got shape {tuple(packed.shape)}")
    v = e2m1_decode(unpack_fp4(packed))
    check_tensor("scales", scales, shape=(*packed.shape[:-1], v.shape[-1] // 32), dtype=torch.uint8)
    groups = v.reshape(*v.shape[:-1], v.shape[-1] // 32, 32)          # explicit sizes: also right for 0 rows
    scale = torch.exp2(scales.float() - 127).masked_fill(scales == 255, float("nan"))   # 255: e8m0's NaN
    return (groups * scale[..., None]).reshape(v.shape).to(dtype)

# %%
#| test mxfp4_exact_and_accurate
test_eq(dequantize_mxfp4(torch.zeros(0, 3, 16, dtype=torch.uint8), torch.zeros(0, 3, 1, dtype=torch.uint8)).shape, (0, 3, 32))
blocks = [torch.tensor([6.0, -0.5, 1.5, 3.0] * 8) * 2.0 ** -4,                 # different exponents per block,
          torch.tensor([-4.0, 2.0, 0.0, 1.0] * 8) * 2.0 ** 5]                   # asymmetric values
x = torch.cat(blocks)[None]
p, s = quantize_mxfp4(x)
test_eq(s.tolist(), [[127 - 4, 127 + 5]])                                       # floor(log2 amax) - 2 per block
test_eq(dequantize_mxfp4(p, s), x)                                              # bit-exact on representable values
w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
d = dequantize_mxfp4(*quantize_mxfp4(w))
assert torch.nn.functional.cosine_similarity(d.flatten(), w.flatten(), dim=0) > 0.99
assert ((d - w).norm() / w.norm()) < 0.15                                       # 4-bit: ~10% relative error
test_fail(lambda: quantize_mxfp4(torch.zeros(2, 48)), contains="x: expected a last dim that is a multiple of 32")

# %% [markdown]
# ## NVFP4
#
# 16 consecutive elements along K share one **float8 e4m3** block scale, and the whole tensor one fp32 **global**
# scale, so that block scales stay inside fp8's range: `global = amax(x) / (6 · 448)`, `s = fp8(amax_block / (6 ·
# global))`, `q = e2m1(x / (s · global))`, `x̂ = q · s · global`.

# %%
#| export
def quantize_nvfp4(x: torch.Tensor,                        # [..., K] float, K a multiple of 16
                   global_scale: float | None = None,      # fp32 global scale; default amax(x) / (6·448)
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`(packed uint8 [..., K/2], block scales float8_e4m3fn [..., K/16], global_scale)` (NVIDIA's NVFP4).
    ValueError naming `x` (not a float tensor, 0 dims, empty, NaN or inf, float64 past fp32's range, a last dim not a
    multiple of 16) or `global_scale` (not a finite number > 0; so small the block scales pass 448; so large they fall
    below e4m3's smallest normal). Source: NVIDIA's NVFP4 as ModelOpt stores it and vLLM's `ref_nvfp4_quant`."""
    _check_float_input("x", x)
    if x.shape[-1] % 16: raise ValueError(f"x: expected a last dim that is a multiple of 16, got {tuple(x.shape)}")
    if x.numel() == 0: raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")   # (its global
    blocks = x.float().reshape(*x.shape[:-1], -1, 16)                                                 # scale: amax)
    given = global_scale is not None
    if global_scale is None: global_scale = max(float(x.abs().max()) / (6.0 * FP8_MAX), _TINY)
    global_scale = check_positive_real("global_scale", global_scale)
    amax = float(x.abs().max())
    if amax / (6.0 * global_scale) > FP8_MAX * 1.0001:      # block scales would saturate e4m3: values clipped
        raise ValueError(f"global_scale: expected >= amax(x)/(6·448) = {amax / (6 * FP8_MAX):.3g}, got {global_scale:.3g}")
    # a caller's scale that puts even the largest block scale below e4m3's smallest normal: subnormal, or zero
    if given and amax and amax / (6.0 * global_scale) < 2.0**-6:
        raise ValueError(f"global_scale: expected <= amax(x)/(6·2^-6) = {amax / 6 * 64:.3g} (larger, the e4m3 block "
                         f"scales lose their precision and then underflow to 0), got {global_scale:.3g}")
    s = (blocks.abs().amax(-1) / (6.0 * global_scale)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    denom = (s.float() * global_scale)[..., None]
    codes = e2m1_encode(torch.where(denom > 0, blocks / torch.where(denom > 0, denom, 1.0), 0.0)).reshape(x.shape)
    return pack_fp4(codes), s, float(global_scale)

def dequantize_nvfp4(packed: torch.Tensor, scales: torch.Tensor, global_scale: float,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`e2m1(code) · fp32(block scale) · global_scale` over groups of 16, in `dtype`: `[..., K]` from `packed` uint8
    `[..., K/2]` and `scales` float8_e4m3fn `[..., K/16]`. ValueError naming `global_scale` (not a finite number > 0),
    `dtype`, `packed` (0 dims, a last dim not a multiple of 8, not uint8, not a tensor) or `scales` (shape or dtype).
    Source: vLLM's NVFP4 weight dequant (`e2m1 · block scale · weight_scale_2`)."""
    global_scale = check_positive_real("global_scale", global_scale); _check_out_dtype(dtype); check_tensor("packed", packed)
    if packed.dim() < 1 or packed.shape[-1] % 8:
        raise ValueError(f"packed: expected a last dim that is a multiple of 8 (16 values), got shape {tuple(packed.shape)}")
    v = e2m1_decode(unpack_fp4(packed))
    check_tensor("scales", scales, shape=(*packed.shape[:-1], v.shape[-1] // 16), dtype=torch.float8_e4m3fn)
    return (v.reshape(*v.shape[:-1], -1, 16) * scales.float()[..., None] * global_scale).reshape(v.shape).to(dtype)

# %%
#| test nvfp4_exact_and_accurate
x = torch.cat([torch.tensor([6.0, -1.5, 0.5, 3.0] * 4) * 0.25, torch.tensor([-6.0, 3.0, 1.0, 0.0] * 4) * 2.0])[None]
p, s, gs = quantize_nvfp4(x, global_scale=1.0)                                  # block scales 0.25 and 2: exact in e4m3
test_eq(s.float().tolist(), [[0.25, 2.0]])
test_eq(dequantize_nvfp4(p, s, gs), x)                                          # bit-exact on representable values
w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
d = dequantize_nvfp4(*quantize_nvfp4(w))
assert torch.nn.functional.cosine_similarity(d.flatten(), w.flatten(), dim=0) > 0.99
assert ((d - w).norm() / w.norm()) < 0.12
for tiny in (1e-30, 1e-34):                                  # tiny but normal fp32 weights: scaled, not flushed to 0
    d, want = dequantize_nvfp4(*quantize_nvfp4(w * tiny)).double(), (w * tiny).double()   # (fp32 norms underflow)
    assert ((d - want).norm() / want.norm()) < 0.12, tiny

# %%
#| test quant_bad_input
test_fail(lambda: quantize_fp8(torch.zeros(8)), contains="x: expected at least 2 dims")
test_fail(lambda: quantize_fp8(torch.zeros(2, 8), "row"), contains="granularity: expected one of")
test_fail(lambda: quantize_fp8(torch.zeros(2, 8, dtype=torch.int32)), contains="x: expected dtype")
test_fail(lambda: dequantize_fp8(torch.zeros(2, 8), torch.ones(1)), contains="q: expected dtype torch.float8_e4m3fn")
test_fail(lambda: quantize_nvfp4(torch.zeros(2, 24)), contains="x: expected a last dim that is a multiple of 16")
p, s = quantize_mxfp4(torch.randn(2, 64))
test_fail(lambda: dequantize_mxfp4(p, s[:, :1]), contains="scales: expected shape [2, 2]")
test_fail(lambda: dequantize_mxfp4(p.tolist(), s), contains="packed: expected a torch.Tensor, got list")
test_fail(lambda: fp8_nan_codes(torch.zeros(2, 3)), contains="codes: expected dtype torch.float8_e4m3fn")
nan_group = s.clone(); nan_group[1, 0] = 255                                    # e8m0's NaN: that group only
d = dequantize_mxfp4(p, nan_group)
assert d[1, :32].isnan().all() and not d[1, 32:].isnan().any() and not d[0].isnan().any()
test_fail(lambda: unpack_fp4(p.int()), contains="packed: expected dtype torch.uint8")
for shape in ((0, 16), (4, 0)):                    # empty: refused by name where a global scale needs an amax ...
    test_fail(lambda: quantize_nvfp4(torch.zeros(shape)), contains=f"x: expected a non-empty tensor, got shape {shape}")
for shape in ((0, 64), (4, 0), (2, 0, 32)):         # ... and empty codes and scales where every scale is a block's
    p, s = quantize_mxfp4(torch.zeros(shape))
    test_eq((p.shape, s.shape), ((*shape[:-1], shape[-1] // 2), (*shape[:-1], shape[-1] // 32)))
    test_eq(dequantize_mxfp4(p, s).shape, shape)

# %%
#| test quant_refuses_non_finite_and_bad_scales
x = torch.randn(8, 64)
for bad in (float("nan"), float("inf")):
    xb = x.clone(); xb[1, 3] = bad
    for f in (lambda: quantize_fp8(xb), lambda: quantize_mxfp4(xb), lambda: quantize_nvfp4(xb), lambda: e2m1_encode(xb)):
        test_fail(f, contains="x: expected finite values")
tiny = x * 1e-20                                                                 # tiny magnitudes do not collapse to 0
q, s_ = quantize_fp8(tiny, "tensor")
d = dequantize_fp8(q, s_, "tensor").double()
assert (d - tiny.double()).norm() / tiny.double().norm() < 0.05                 # not all zeros (a fixed 1e-12 floor was)
test_fail(lambda: quantize_nvfp4(x, 0.0), contains="global_scale: expected a finite number > 0")
test_fail(lambda: quantize_nvfp4(x, 1e-12), contains="global_scale: expected >=")
test_fail(lambda: quantize_nvfp4(x, 1e3), contains="global_scale: expected <= amax(x)/(6·2^-6)")   # all codes 0 otherwise
assert (dequantize_nvfp4(*quantize_nvfp4(torch.zeros(1, 16), 1e3)) == 0).all()                # nothing to lose: allowed
quantize_nvfp4(torch.full((1, 16), 1e-39))                                       # the default scale (clamped): not refused
huge = x.double(); huge[0, 0] = 1e300                                            # finite, but not in the fp32 scales
for f in (lambda: quantize_fp8(huge, "token"), lambda: quantize_mxfp4(huge), lambda: quantize_nvfp4(huge)):
    test_fail(f, contains="x: expected values within the fp32 range")
below = torch.full((1, 32), 1e-50, dtype=torch.float64)                         # below fp32's subnormals: 0, as in fp32
assert (quantize_fp8(below, "token")[0].float() == 0).all() and (quantize_mxfp4(below)[0] == 0).all()
q, s_ = quantize_fp8(torch.randn(256, 256))
test_fail(lambda: dequantize_fp8(q, torch.ones(3, 3)), contains="scale: expected shape [2, 2]")
test_fail(lambda: dequantize_fp8(q, s_, dtype=torch.int8), contains="dtype: expected one of")
test_fail(lambda: quantize_fp8(x, "block", 128), contains="block: expected a pair of ints")
test_fail(lambda: pack_fp4(torch.tensor([16, 1], dtype=torch.uint8)), contains="codes: expected values in [0, 15], got 16")
p_, s2 = quantize_mxfp4(torch.randn(4, 64))
test_fail(lambda: dequantize_mxfp4(p_[:, :10], s2), contains="packed: expected a last dim that is a multiple of 16")
