# %%
#| default_exp quant_weights

# %% [markdown]
# # Quantized expert weights
# > The container of a layer's FP8 / MXFP4 / NVFP4 expert weights (codes, scales, global scales), quantizing a layer's experts one at a time, and test weights whose scales differ block by block.

# %%
#| export
from __future__ import annotations
from dataclasses import dataclass
import torch
from fastcore.basics import patch
from moe_lit.terms import check_int, check_tensor, check_choice, check_finite, check_dense, FLOAT_DTYPES, default_device, check_device
from moe_lit.quant import (QUANT_SCHEMES, QUANT_SCHEME_TABLE, quantize_fp8, dequantize_fp8, quantize_mxfp4, dequantize_mxfp4,
                           quantize_nvfp4, dequantize_nvfp4, pack_fp4, unpack_fp4, fp8_nan_codes, FP8_MAX)

# %%
#| hide
import itertools
from fastcore.test import test_eq, test_fail
import dataclasses

# %% [markdown]
# In this notebook: the weight container `QuantizedExpertWeights` (its `dequantize`, `select`, `to`, `nbytes`,
# `relayout`, `for_kernels`), the re-laid FP4 byte orders (split64: `split_fp4_codes`, `unsplit_fp4_codes`; mma128:
# `mma_fp4_codes`, `unmma_fp4_codes`; both through `fp4_codes_from_plain` / `fp4_codes_to_plain`),
# `quantize_expert_weights` and `quant_weight_shapes`; test weights `random_expert_weights` and `random_activations`;
# two figures, `plot_mma128_layout` and `plot_weight_scales`. A **reference** page. It is plain torch, no Triton: a checkpoint reader and the
# layer hold quantized weights without importing a kernel. The formats and their torch quantizers come from
# `09_quant`; the activation quantizer is `09b_kernels.quant_act` and the GEMMs that read these weights are
# `09c_kernels.quant`.
#
# ## Motivation
#
# At decode an MoE layer is a weight-streaming problem: each active expert's `w13` and `w2` are read once per step
# for a handful of rows, so time is bytes of weight over memory bandwidth. Storing the weights in 8 or 4 bits cuts
# those bytes by 2× or ~3.7× against bf16. The two families differ in what the tensor cores then do:
#
# - **FP8 w8a8**: weights *and* activations are e4m3; Hopper's tensor cores multiply fp8 × fp8 into fp32 at twice
#   the bf16 peak rate (NVIDIA's H200 datasheet: 1979 vs 989 dense TFLOP/s), so the GEMM itself runs in fp8 and only
#   the scales are applied in fp32.
# - **FP4 w4a16** (MXFP4, NVFP4): weights are e2m1 codes with a shared scale per 32 or 16 elements; activations stay
#   bf16/fp16. **On Hopper this is an emulation**: sm_90 has no FP4 tensor-core instruction (Blackwell's
#   `tcgen05.mma` with `kind::mxf4`/`mxf4nvf4`, reached through `tl.dot_scaled`, is the native path), so the kernel
#   unpacks and scales the codes to bf16 in registers inside the K loop and uses the bf16 MMA. It saves the memory
#   traffic (0.53–0.56 bytes per weight instead of 2) but not the compute, and it pays ALU work per weight element.
#
# ## What each scheme stores
#
# Per expert, for a weight `[N, K]` (`w13`: N = 2·I, K = H; `w2`: N = H, K = I). `K_pad` rounds K up to the FP4 group
# (32 or 16) with zero columns; the unpadded K is kept in the container, and activations are never padded. (The
# table gives the checkpoint's byte order, `fp4_layout="plain"`. The layer re-lays FP4 weights into the **mma128**
# order described below, where `K_pad` rounds up to 128; the older **split64** order rounds up to 64.)
#
# | scheme | codes | weight scale | activation (quantized per call) | bytes per weight element |
# |---|---|---|---|---|
# | `fp8_w8a8_tensor` | `[N, K]` e4m3 | one fp32 per expert: `[E]` | e4m3, one fp32 scale per tensor | 1 + 4/(N·K) |
# | `fp8_w8a8_channel` | `[N, K]` e4m3 | fp32 per output row: `[E, N, 1]` | e4m3, one scale per token | 1 + 4/K |
# | `fp8_w8a8_block` | `[N, K]` e4m3 | fp32 per 128×128 block: `[E, ⌈N/128⌉, ⌈K/128⌉]` | e4m3, one scale per 1×128 group | 1 + 4/16384 ≈ 1.0002 |
# | `mxfp4_w4a16` | `[N, K_pad/2]` uint8, two e2m1 | e8m0 (uint8) per 32 along K: `[E, N, K_pad/32]` | bf16 / fp16 as is | 0.5 + 1/32 = 0.531 |
# | `nvfp4_w4a16` | `[N, K_pad/2]` uint8, two e2m1 | e4m3 per 16 along K: `[E, N, K_pad/16]`, and an fp32 global `[E]` | bf16 / fp16 as is | 0.5 + 1/16 (+ 4/(N·K)) = 0.5625 |
#
# The activation granularity follows the weight's as vLLM pairs them for its Triton experts: tensor ↔ tensor,
# channel ↔ token, 128×128 block ↔ 1×128 groups (the group width equals the weight block's K, so one activation scale
# and one weight scale cover each K tile). Nibble order is `09_quant`'s: element `2j` in the low nibble of byte `j`.
#
# > **One activation scale for the whole batch.** With `fp8_w8a8_tensor` every token an expert receives shares one
# > dynamic scale (per GEMM input, so again for the intermediate). A token far larger than the rest sets it, and the
# > others keep only the bottom of e4m3's range: with one value of 1e4 among unit-sized ones their rows come out about
# > 100 % wrong, with no NaN to show it. A non-finite value anywhere, or one that overflows in GEMM1, makes the shared
# > scale NaN and so every row of that expert NaN — loudly, by design (`09c`). That is what per-tensor dynamic
# > quantization means (vLLM's `fp8_w8a8` per-tensor path behaves the same); where tokens must stay independent of
# > each other, use `fp8_w8a8_channel` (a scale per token) or `fp8_w8a8_block` (per 1×128 group), whose bad token
# > spoils only its own row.

# %%
#| export
_FP8 = [s for s in QUANT_SCHEME_TABLE.values() if s.is_fp8]                  # read from `09_quant`'s table
WEIGHT_GRANULARITY = {s.name: s.weight_scales for s in _FP8}
ACTIVATION_GRANULARITY = {s.name: s.activations for s in _FP8}
FP4_GROUP = {s.name: s.group_size for s in QUANT_SCHEME_TABLE.values() if not s.is_fp8}   # K elements per scale

def _is_fp8(scheme: str) -> bool: return scheme in WEIGHT_GRANULARITY

FP4_LAYOUTS = ("plain", "split64", "mma128")   # the checkpoint's byte order, and two re-laid at load (below)
FP4_KERNEL_LAYOUT = "mma128"         # the one the FP4 GEMMs read fastest (`09c_kernels.quant`, Performance): what
                                     # `for_kernels` gives the layer, the benchmark and the tuner
SPLIT_CHUNK = 64                     # codes per chunk of the split64 layout
MMA_CHUNK = 128                      # codes per chunk of the mma128 layout (the kernels' K tile with it)
FP4_CHUNK = {"split64": SPLIT_CHUNK, "mma128": MMA_CHUNK}   # a re-laid layout pads K to its whole chunks

def _storage_cols(scheme: str, K: int, layout: str = "plain") -> int:
    "Columns of the code tensor for a weight of K columns: K fp8 bytes, or K_pad/2 bytes of two e2m1 codes."
    if _is_fp8(scheme): return K
    pad = FP4_CHUNK.get(layout, FP4_GROUP[scheme])                        # K_pad: a whole group, or a whole chunk
    return -(-K // pad) * pad // 2

def _scale_shape(scheme: str, E: int, N: int, K: int, block: tuple | None, layout: str = "plain") -> tuple:
    "The weight-scale shape of one `[E, N, K]` weight (ceil-div for partial blocks, K_pad for FP4)."
    if scheme == "fp8_w8a8_tensor": return (E,)
    if scheme == "fp8_w8a8_channel": return (E, N, 1)
    if scheme == "fp8_w8a8_block": return (E, -(-N // block[0]), -(-K // block[1]))
    return (E, N, 2 * _storage_cols(scheme, K, layout) // FP4_GROUP[scheme])

# %%
#| export
def _check_block_shape(scheme: str, block) -> tuple | None:
    "The scale group of `scheme`: fixed for FP4, None for tensor/channel, a (rows, power-of-2 ≥ 32 cols) pair for block."
    if block is not None and not isinstance(block, (tuple, list)):
        raise ValueError(f"block_shape: expected None or a (rows, cols) pair, got {block!r}")
    if scheme in FP4_GROUP:
        want = (1, FP4_GROUP[scheme])
        if block is not None and tuple(block) != want: raise ValueError(f"block_shape: expected {want} for {scheme}, got {block!r}")
        return want
    if scheme != "fp8_w8a8_block":
        if block is not None: raise ValueError(f"block_shape: expected None for {scheme}, got {block!r}")
        return None
    block = (128, 128) if block is None else block
    if not (isinstance(block, (tuple, list)) and len(block) == 2):
        raise ValueError(f"block_shape: expected a pair of ints, got {block!r}")
    check_int("block_shape[0]", block[0], lo=1, hi=2**16 + 1); check_int("block_shape[1]", block[1], lo=32, hi=2**16 + 1)
    if block[1] & (block[1] - 1): raise ValueError(f"block_shape[1]: expected a power of 2, got {block[1]}")
    return tuple(block)

def quant_weight_shapes(scheme: str,      # one of QUANT_SCHEMES
                        E: int, N: int, K: int,   # experts, rows and (unpadded) columns of one weight [E, N, K]
                        block_shape: tuple | None = None,  # FP8 block scale group, default (128, 128)
                       ) -> tuple[tuple, tuple]:
    """`(codes shape, scale shape)` of a weight `[E, N, K]` stored in `scheme` (what a checkpoint loader allocates).
    ValueError naming `scheme` (a full name: short names are refused), `E` (< 0), `N`, `K` (< 1) or `block_shape`.
    Source: vLLM's quantized FusedMoE parameter shapes (ModelOpt NVFP4 `w13_weight [E, 2I, H/2]`, MXFP4 scales
    `[E, 2I, H/32]`; FP8 block scales ceil-div, vLLM #48173)."""
    check_choice("scheme", scheme, QUANT_SCHEMES)
    for name, v in (("E", E), ("N", N), ("K", K)): check_int(name, v, lo=0 if name == "E" else 1)
    block = _check_block_shape(scheme, block_shape)
    return (E, N, _storage_cols(scheme, K)), _scale_shape(scheme, E, N, K, block)

# %%
#| test scheme_tables
test_eq(quant_weight_shapes("mxfp4_w4a16", 4, 160, 80), ((4, 160, 48), (4, 160, 3)))   # K 80 -> K_pad 96: 48 bytes
test_eq(quant_weight_shapes("nvfp4_w4a16", 4, 160, 80), ((4, 160, 40), (4, 160, 5)))   # 80 = 5·16: no padding
test_eq(quant_weight_shapes("fp8_w8a8_block", 4, 384, 192)[1], (4, 3, 2))    # I = 192 per rank: partial blocks
test_eq(quant_weight_shapes("fp8_w8a8_channel", 4, 384, 192)[1], (4, 384, 1))
test_eq(quant_weight_shapes("fp8_w8a8_tensor", 4, 384, 192), ((4, 384, 192), (4,)))
test_eq(set(ACTIVATION_GRANULARITY), set(WEIGHT_GRANULARITY))
test_fail(lambda: quant_weight_shapes("fp8", 4, 8, 8), contains="scheme: expected one of")

# %% [markdown]
# ## The weight container
#
# `QuantizedExpertWeights` holds both weights of a layer's (local) experts in one scheme and checks every shape and
# dtype on construction, so a kernel never sees a scale tensor of the wrong layout. `block_shape` is the scale group
# `(rows, cols)`: `(128, 128)` for FP8 block, `(1, 32)` for MXFP4, `(1, 16)` for NVFP4, `None` for tensor/channel.

# %%
#| export
@dataclass(frozen=True)
class QuantizedExpertWeights:
    """The quantized `w13`/`w2` of `E` experts in one scheme: codes, scales, NVFP4 global scales and the unpadded K.
    Construction raises ValueError naming `scheme`, `fp4_layout`, `hidden_size`, `intermediate_size`, `block_shape`,
    or the tensor at fault (`w13`, `w2`, `*_scale`, `*_global_scale`: shape, dtype, device, density, NaN codes or
    scales, mma128 alignment, chunk padding). Source: vLLM's quantized FusedMoE parameters (`w13_weight`,
    `w13_weight_scale`, NVFP4's `w13_weight_scale_2` global); the re-laid `fp4_layout`s are moe-lit's own."""
    scheme: str                      # one of QUANT_SCHEMES
    w13: torch.Tensor                # [E, 2·I, H] float8_e4m3fn, or [E, 2·I, H_pad/2] uint8 (two e2m1 codes a byte)
    w13_scale: torch.Tensor          # quant_weight_shapes(...)[1]: fp32 (fp8), uint8 e8m0 (MXFP4), e4m3 (NVFP4)
    w2: torch.Tensor                 # [E, H, I] float8_e4m3fn, or [E, H, I_pad/2] uint8
    w2_scale: torch.Tensor           # quant_weight_shapes(scheme, E, H, I)[1]
    hidden_size: int                 # H, unpadded: K of GEMM1
    intermediate_size: int           # I, unpadded: K of GEMM2
    w13_global_scale: torch.Tensor | None = None   # [E] fp32, NVFP4 only
    w2_global_scale: torch.Tensor | None = None    # [E] fp32, NVFP4 only
    block_shape: tuple | None = None               # scale group (rows, cols); filled in for block/FP4 schemes
    fp4_layout: str = "plain"                      # FP4 byte order: "plain" (checkpoint), "split64" or "mma128" (`relayout`);
                                                   # trusted, as bytes cannot show their order: build "plain" from a
                                                   # checkpoint and let `relayout` / `for_kernels` make the others

    def __post_init__(self):
        check_choice("scheme", self.scheme, QUANT_SCHEMES)
        check_choice("fp4_layout", self.fp4_layout, FP4_LAYOUTS)
        if _is_fp8(self.scheme) and self.fp4_layout != "plain":
            raise ValueError(f"fp4_layout: expected 'plain' for the FP8 scheme {self.scheme}, got {self.fp4_layout!r}")
        check_int("hidden_size", self.hidden_size, lo=1); check_int("intermediate_size", self.intermediate_size, lo=1)
        block = _check_block_shape(self.scheme, self.block_shape)
        object.__setattr__(self, "block_shape", block)
        check_tensor("w13", self.w13, ndim=3)
        E, H, I = self.w13.shape[0], self.hidden_size, self.intermediate_size
        largest = {name: _check_weight_parts(self, name, E, N, K, block) for name, N, K in (("w13", 2 * I, H), ("w2", H, I))}
        # MXFP4: the largest e8m0 byte of each weight, from the value check's one pass (the kernels' decode folds a
        # constant into the scale when it is <= 128, `09c`); None for the other schemes
        object.__setattr__(self, "e8m0_max", largest if self.scheme == "mxfp4_w4a16" else None)
        object.__setattr__(self, "checked_versions", quant_tensor_versions(self))   # what `recheck_if_edited` compares
        self.__dict__.pop("_kernel_args", None)              # facts the launchers kept of the tensors (`09c`): stale

# %%
#| export
def _check_weight_parts(qw, name: str, E: int, N: int, K: int, block) -> int | None:
    "Codes, scale and global scale of one weight against the scheme's layout (shape, dtype, device); MXFP4: its largest scale byte."
    s = qw.scheme
    codes, scale, gs = getattr(qw, name), getattr(qw, name + "_scale"), getattr(qw, name + "_global_scale")
    layout = qw.fp4_layout
    check_dense(name, check_tensor(name, codes, shape=(E, N, _storage_cols(s, K, layout)),
                                   dtype=torch.float8_e4m3fn if _is_fp8(s) else torch.uint8))
    sdt = {"mxfp4_w4a16": torch.uint8, "nvfp4_w4a16": torch.float8_e4m3fn}.get(s, torch.float32)
    check_dense(name + "_scale", check_tensor(name + "_scale", scale, shape=_scale_shape(s, E, N, K, block, layout), dtype=sdt))
    if s == "nvfp4_w4a16":                                   # read as a flat [E] array; checked once, here
        check_tensor(name + "_global_scale", gs, shape=(E,), dtype=torch.float32, contiguous=True)
    elif gs is not None: raise ValueError(f"{name}_global_scale: expected None for {s}, got a tensor")
    for n, t in ((name, codes), (name + "_scale", scale), (name + "_global_scale", gs)):   # before any value is read
        if t is not None and t.device != qw.w13.device: raise ValueError(f"{n}: expected device {qw.w13.device}, got {t.device}")
    if s == "nvfp4_w4a16" and E and not bool(((gs > 0) & (gs <= NVFP4_GLOBAL_SCALE_MAX)).all()):   # (NaN fails both)
        raise ValueError(f"{name}_global_scale: expected values in (0, {NVFP4_GLOBAL_SCALE_MAX:.4g}] (6 × 448 × global "
                         f"scale stays a finite fp32), got {gs.tolist()[:8]}")
    if _is_fp8(s) and codes.numel() and bool((nan := fp8_nan_codes(codes)).any()):   # the loader's check, for any maker
        raise ValueError(f"{name}: expected FP8 e4m3 codes, none NaN (0x7F/0xFF), got NaN at index "
                         f"{[int(i) for i in nan.nonzero()[0]]} (expert, row, column)")
    largest = _check_scale_values(name + "_scale", scale, s)
    if layout == "mma128":         # the kernels read int32 code words and (16-code groups) uint16 scale pairs
        for n, t, w in ((name, codes, 4), (name + "_scale", scale, 2 if s == "nvfp4_w4a16" else 0)):
            if w and (t.stride(-1) != 1 or t.stride(-2) % w or t.stride(0) % w or t.data_ptr() % w):
                raise ValueError(f"{n}: expected mma128 rows aligned to {w} bytes (unit last stride, row and expert "
                                 f"strides multiples of {w}: what relayout('mma128') makes), got strides {t.stride()} "
                                 f"at an address {t.data_ptr() % w} bytes past a multiple of {w}")
    if layout != "plain" and codes.shape[-1] != _storage_cols(s, K):       # the padding reads as 0, never NaN
        _check_chunk_padding(name, codes, scale, K, s, layout)
    return largest

FP8_SCALE_MAX = torch.finfo(torch.float32).max / FP8_MAX   # the largest FP8 scale whose largest code is a finite fp32
NVFP4_GLOBAL_SCALE_MAX = torch.finfo(torch.float32).max / (6 * FP8_MAX)   # e2m1's 6 × e4m3's 448 × it: finite fp32

def _check_scale_values(name: str, scale: torch.Tensor, scheme: str) -> int | None:
    "Scales that decode to a number (one pass at construction): fp32 in [0, FP8_SCALE_MAX] (a zero block may carry 0; 448 × scale finite); no e8m0 255 or e4m3 NaN byte. MXFP4: returns the largest byte."
    if not scale.numel(): return 0 if scheme == "mxfp4_w4a16" else None
    largest = None
    if scheme == "mxfp4_w4a16":
        largest = int(scale.max()); bad = largest > 240             # 255 encodes NaN; 2^114 and up overflow the decode
    elif scheme == "nvfp4_w4a16": bad = bool((scale.view(torch.uint8) >= 0x7F).any())   # a NaN, or the sign bit set
    else: bad = not bool(((scale >= 0) & (scale <= FP8_SCALE_MAX)).all())             # (NaN fails both)
    if bad:
        want = {"mxfp4_w4a16": "e8m0 bytes <= 240 (2^113; 255 is NaN, and the kernels' fp32 decode overflows above 2^113)",
                "nvfp4_w4a16": "e4m3 scales that are not negative and not NaN (bytes 0x00-0x7E)"}
        ok = {"mxfp4_w4a16": lambda t: t <= 240, "nvfp4_w4a16": lambda t: t.view(torch.uint8) < 0x7F}.get(
            scheme, lambda t: (t >= 0) & (t <= FP8_SCALE_MAX))
        at = tuple(int(i) for i in (~ok(scale)).nonzero()[0])
        raise ValueError(f"{name}: expected {want.get(scheme, f'scales in [0, {FP8_SCALE_MAX:.4g}] (448 × scale stays a finite fp32)')}, "
                         f"got {scale[at].item()} at index {list(at)} (expert, row, group)")
    return largest

def _check_chunk_padding(name: str, codes, scale, K: int, scheme: str, layout: str):
    "Re-laid weights: the codes past K's group padding are 0 and their groups' scales 1 (what `relayout` writes)."
    g, plain, chunk = FP4_GROUP[scheme], 2 * _storage_cols(scheme, K), FP4_CHUNK[layout]   # codes of the plain layout
    tail = unpack_fp4(fp4_codes_to_plain(codes[..., -(chunk // 2):], layout))          # the last chunk, K order
    start = plain - (codes.shape[-1] * 2 - chunk)                                       # first padded code in it
    one = torch.full((), 127 if scheme == "mxfp4_w4a16" else 1.0, device=scale.device).to(scale.dtype)
    if bool(tail[..., start:].any()) or not bool((scale[..., plain // g:].view(torch.uint8) == one.view(torch.uint8)).all()):
        raise ValueError(f"{name}: expected the {layout} padding past K = {K} to hold code 0 with scale 1 (as relayout "
                         f"writes it), got other values")

# %% [markdown]
# Reading back: `dequantize_weight` gives one expert's weight in fp32 (or float64 for references) with the K padding
# cropped; `dequantize` gives both weights of all experts. `nbytes` and `bytes_per_element` count the bytes as stored
# (in the re-laid layouts below, the padding of K to whole 64- or 128-code chunks too — none when K is a multiple of
# 128, as in every preset but gpt-oss's, whose 2880 pads to 2944, 2.2 % more; a layer with H = 64 stores twice its
# codes in mma128);
# the benchmark's weight-bytes floor counts the checkpoint's (plain) bytes. `select` keeps a subset of experts (one EP rank's), `to` moves everything.

# %%
#| export
@patch
def weight_parts(self: QuantizedExpertWeights, which: str) -> tuple:
    """`(codes, scale, global scale or None, N, K)` of `which` in ('w13', 'w2'); K is the unpadded K. ValueError
    naming `which` for any other name. Source: moe-lit's own."""
    check_choice("which", which, ("w13", "w2"))
    codes = getattr(self, which)
    K = self.hidden_size if which == "w13" else self.intermediate_size
    return codes, getattr(self, which + "_scale"), getattr(self, which + "_global_scale"), codes.shape[1], K

@patch
def dequantize_weight(self: QuantizedExpertWeights, which: str, expert: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`[N, K]` weight of one expert, dequantized into `dtype` (K padding cropped). ValueError naming `which`, `expert` (outside [0, E)) or `dtype` (not a float dtype). Source: `09_quant`'s dequantizers, after
    undoing a re-laid `fp4_layout`."""
    codes, scale, gs, N, K = self.weight_parts(which)
    check_int("expert", expert, lo=0, hi=codes.shape[0])
    c, s = codes[expert], scale[expert]
    if self.fp4_layout != "plain":                  # back to the plain bytes, K_pad cropped to the plain one
        cols = _storage_cols(self.scheme, K)
        c, s = fp4_codes_to_plain(c, self.fp4_layout)[..., :cols], s[..., :2 * cols // FP4_GROUP[self.scheme]]
    if self.scheme == "fp8_w8a8_tensor": return dequantize_fp8(c, s.reshape(1), "tensor", dtype=dtype)
    if self.scheme == "fp8_w8a8_channel": return dequantize_fp8(c, s, "channel", dtype=dtype)
    if self.scheme == "fp8_w8a8_block": return dequantize_fp8(c, s, "block", self.block_shape, dtype=dtype)
    if self.scheme == "mxfp4_w4a16": return dequantize_mxfp4(c, s, dtype)[:, :K]
    return dequantize_nvfp4(c, s, float(gs[expert]), dtype)[:, :K]

@patch
def dequantize(self: QuantizedExpertWeights, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`(w13 [E, 2·I, H], w2 [E, H, I])` dequantized into `dtype`: the reference weights of every kernel here.
    ValueError naming `dtype` (not float64/32/16 or bf16). Source: `09_quant`'s dequantizers, one expert at a time."""
    check_choice("dtype", dtype, FLOAT_DTYPES)
    E, out = self.w13.shape[0], []
    for w in ("w13", "w2"):                        # filled one expert at a time: no second copy of the stack
        shape = (2 * self.intermediate_size, self.hidden_size) if w == "w13" else (self.hidden_size, self.intermediate_size)
        t = torch.empty(E, *shape, dtype=dtype, device=self.w13.device)
        for e in range(E): t[e] = self.dequantize_weight(w, e, dtype)
        out.append(t)
    return tuple(out)

# %%
#| export
QUANT_TENSORS = ("w13", "w13_scale", "w2", "w2_scale", "w13_global_scale", "w2_global_scale")   # a container's tensors

def _tensors(qw) -> dict:
    return {f: getattr(qw, f) for f in QUANT_TENSORS}

def _version(t) -> int | None:
    "A tensor's in-place edit count (None for None, or an inference tensor: it keeps none)."
    if t is None: return None
    try: return t._version
    except RuntimeError: return None

def quant_tensor_versions(qw) -> tuple:
    """The in-place edit counts of a container's tensors, `QUANT_TENSORS` order: what `recheck_if_edited` compares with
    its check's. Checks nothing: a `qw` without those attributes raises AttributeError. Source: moe-lit's own (torch's
    `Tensor._version` counter)."""
    return tuple(_version(getattr(qw, f)) for f in QUANT_TENSORS)

@patch
def recheck_if_edited(self: QuantizedExpertWeights) -> bool:
    """Check the container again, as its construction did (values, the MXFP4 scale facts the decode folds), if one of
    its tensors was edited in place since the last check; True when it was. ValueError as at construction. An edit
    through `.data`, or of an inference tensor, keeps no count and is not seen: build a new container after those.
    Source: moe-lit's own."""
    if quant_tensor_versions(self) == self.checked_versions: return False
    self.__post_init__()
    return True

def check_quant_weights(qw, name: str = "qw") -> QuantizedExpertWeights:
    """`qw` if it is a `QuantizedExpertWeights` (checked again after an in-place edit: `recheck_if_edited`); ValueError
    naming `name` otherwise (or the construction's ValueError after a bad edit). Source: moe-lit's own."""
    if not isinstance(qw, QuantizedExpertWeights): raise ValueError(f"{name}: expected a QuantizedExpertWeights, got {type(qw).__name__}")
    qw.recheck_if_edited()
    return qw

def _qw_replace(qw, fn):
    "A new container with `fn` applied to every tensor (validated again on construction)."
    t = {k: (None if v is None else fn(v)) for k, v in _tensors(qw).items()}
    return QuantizedExpertWeights(qw.scheme, hidden_size=qw.hidden_size, intermediate_size=qw.intermediate_size,
                                  block_shape=qw.block_shape, fp4_layout=qw.fp4_layout, **t)

@patch
def select(self: QuantizedExpertWeights, experts) -> QuantizedExpertWeights:
    """The weights of a subset of experts (`experts`: a list or 1-D integer tensor of ids in [0, E), or a slice), e.g.
    one EP rank's. ValueError naming `experts` (another type, a bool, a non-int or non-positive slice step, a tensor
    not 1-D int32/int64 or on a third device, ids outside [0, E)). Source: moe-lit's own (an EP rank's slice, as vLLM
    loads only the experts its `expert_map` keeps)."""
    E = self.num_experts
    if isinstance(experts, slice):
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (experts.start, experts.stop, experts.step)) \
                or (experts.step is not None and experts.step < 1):
            raise ValueError(f"experts: expected a slice of int bounds and a positive step, got {experts!r}")
        ids = torch.arange(E)[experts]
    elif isinstance(experts, torch.Tensor):
        if experts.device.type != "cpu" and experts.device != self.device:
            raise ValueError(f"experts: expected ids on {' or '.join(dict.fromkeys(['cpu', str(self.device)]))}, got device {experts.device}")
        if experts.dim() != 1 or experts.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"experts: expected a 1-D int32/int64 tensor of expert ids, got {experts.dtype} of shape {tuple(experts.shape)}")
        ids = experts.cpu().long()
    elif isinstance(experts, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in experts):
        if experts and not 0 <= min(experts) <= max(experts) < E:         # before a tensor: ints past int64 too
            raise ValueError(f"experts: expected ids in [0, {E}), got values in [{min(experts)}, {max(experts)}]")
        ids = torch.tensor(list(experts), dtype=torch.long)
    else: raise ValueError(f"experts: expected a list or 1-D tensor of expert ids, or a slice, got {experts!r:.80}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= E):
        raise ValueError(f"experts: expected ids in [0, {E}), got values in [{int(ids.min())}, {int(ids.max())}]")
    return _qw_replace(self, lambda t: t[ids.to(t.device)].contiguous())

@patch
def to(self: QuantizedExpertWeights, device) -> QuantizedExpertWeights:
    """Every tensor moved to `device` (cpu, or cuda on a machine with a GPU: codes and scales are values, so not meta);
    ValueError naming `device` otherwise. Source: moe-lit's own (`torch.Tensor.to` on each tensor)."""
    device = check_device(device)
    return _qw_replace(self, lambda t: t.to(device))

@patch(as_prop=True)
def nbytes(self: QuantizedExpertWeights) -> int:
    """Bytes of codes, scales and global scales: what streaming these experts' weights reads. Raises nothing. Source:
    moe-lit's own."""
    return sum(t.numel() * t.element_size() for t in _tensors(self).values() if t is not None)

@patch(as_prop=True)
def num_experts(self: QuantizedExpertWeights) -> int:
    "E, the experts held (`w13.shape[0]`). Raises nothing. Source: moe-lit's own."
    return self.w13.shape[0]

@patch(as_prop=True)
def device(self: QuantizedExpertWeights) -> torch.device:
    "The device of every tensor (checked equal at construction). Raises nothing. Source: moe-lit's own."
    return self.w13.device

@patch(as_prop=True)
def bytes_per_element(self: QuantizedExpertWeights) -> float:
    """Bytes of codes and scales per logical weight element (3·H·I elements per expert); 0.0 when E = 0. Raises
    nothing. Source: moe-lit's own."""
    return self.nbytes / max(1, 3 * self.num_experts * self.hidden_size * self.intermediate_size)

@patch
def __repr__(self: QuantizedExpertWeights) -> str:
    return (f"QuantizedExpertWeights({self.scheme}, E={self.num_experts}, H={self.hidden_size}, "
            f"I={self.intermediate_size}, block_shape={self.block_shape}, "
            f"{'' if _is_fp8(self.scheme) else f'fp4_layout={self.fp4_layout}, '}{self.bytes_per_element:.4f} bytes/element, "
            f"device={self.device})")

# %% [markdown]
# ## The split layout: FP4 bytes re-laid for the Hopper kernels
#
# A checkpoint stores two codes a byte in K order: byte `j` holds codes `2j` (low nibble) and `2j+1` (high). A
# kernel that decodes a byte gets its two values for two *neighbouring* K positions, so it must interleave the
# low-nibble and high-nibble values along K (`tl.join` and a reshape: register shuffles in the K loop) before the
# MMA. The **split64** layout moves that work to load time. Each row's codes are cut into chunks of 64; within a
# chunk, byte `j` (`j < 32`) holds code `j` in its low nibble and code `32 + j` in its high nibble:
#
# ```
# K position in a chunk   0 1 2 … 31 | 32 33 … 63
# plain bytes             [0|1] [2|3] … [62|63]              byte j = code 2j | code 2j+1 << 4
# split64 bytes           [0|32] [1|33] … [31|63]            byte j = code j  | code 32+j << 4
# a program's K tile      BLOCK_K/2 bytes a row (BLOCK_K a multiple of 64): as many contiguous bytes as the plain
#                         layout's tile; low nibbles = the chunk's first 32 K positions, high nibbles = its last 32
# ```
#
# (`[a|b]` is one byte: the code at K position `a` in its low nibble, the one at `b` in its high nibble.)
#
# The decoded low nibbles of a tile are then a `[BLOCK_N, BLOCK_K/2]` operand for the activations' columns
# `{64c + j}`, the high nibbles one for `{64c + 32 + j}`: two MMAs with the activation tile loaded in those two column
# orders, and no shuffle of the weights at all. A byte's two codes are 32 apart, so they always fall in different
# scale groups — `2c` and `2c + 1` with MXFP4's 32-wide groups, `4c + j/16` and `4c + 2 + j/16` with NVFP4's 16-wide
# ones: the kernel gives each nibble its own scale. The scales themselves keep the plain layout (one per group, in K
# order), padded at the end to whole chunks. K is padded to a whole chunk with zero codes, and the padded groups get the scale 1, so the
# padding is 0 and never NaN.
#
# `relayout("split64")` makes the copy once; `relayout("plain")` gives back the checkpoint's bytes exactly;
# `dequantize_weight` reads either. The measured gain is in `09c_kernels.quant`'s Performance section. split64 is no
# longer the layer's layout: mma128, next, moves the rest of the shuffling to load time.
#
# ## The mma128 layout: a thread's codes in one word
#
# split64 removed the interleave, but the decoded weights still had to be *moved* before the MMA: Hopper's `wgmma`
# takes its A operand (the weights: the FP4 GEMMs swap the operands) from registers in a fixed pattern. In a warp
# group's 64 rows, lane `l` holds rows `l / 4` and `l / 4 + 8` of its warp's 16, and in every 16-wide K step the K
# positions `2t, 2t+1, 2t+8, 2t+9` with `t = l % 4`. A tile decoded from bytes in K order sits elsewhere, so the
# compiler sends it through shared memory (stores, `ldmatrix` loads, a barrier for each round) or, when it hoists the
# move onto the code bytes, shuffles single bytes into words with `prmt`. On sm_90 either way was about a third of
# the K loop's instructions (counted in the SASS: 09c, Performance).
#
# **mma128** stores each row's codes so that the four lanes of a row quad read exactly their own: per 128-code chunk,
# lane `t`'s 32 codes are four consecutive 32-bit words, and each word decodes into two of its operand registers.
#
# ```
# a 128-code chunk of one row: 16 words, word 4t + c (t = 0..3 the lane in the quad, c = 0..3 a 32-code piece)
# word 4t + c holds the codes at K = 32c + 16·j2 + 8·j1 + 2t + j0       (j = 4·j2 + 2·j1 + j0 = 0..7)
# pair p = codes 2p, 2p+1 (K 2t, 2t+1 for p = 0): one bf16x2 register of the MMA operand, low half first
# ```
#
# Within the word the 32 code bits are not in nibbles: each bit sits where the decode (`09c`) takes it from. A bf16
# whose sign is bit 15 and whose bits 8, 7, 6 are e2m1's exponent and mantissa, every other bit 0, is the code's
# value times 2^-126 (09c); so a pair of codes is decoded once its eight bits sit at `E2M1_BF16_MASK` = 0x81C081C0,
# and one bf16x2 multiply does the rest. `FP4_WORD_PAIRS` says how each pair gets there — pair 0 is already there
# (one `and`), pairs 1 and 2 after a rotation of the word by 10 and 13 bits (a funnel shift and an `and`), pair 3
# after an `and` with 0x001B001B and a multiply by 0x4108 (= 2^3 + 2^8 + 2^14, three shifted copies that never
# overlap) and an `and` — and `FP4_WORD_BITS` (computed from it) where bit b of code j is stored:
#
# ```
# word bit  31 30 29 28 27 26 25 24 23 22 21 20 19 18 17 16 | 15 14 13 12 11 10  9  8  7  6  5  4  3  2  1  0
# code.bit  1s 2e 2e 2m 4e 4e 4m 1e 1e 1m 3s 7e 7m 5s 7s 7e | 0s 3e 3e 3m 5e 5e 5m 0e 0e 0m 2s 6e 6m 4s 6s 6e
# ```
#
# (`s` the sign, `e` an exponent bit, `m` the mantissa: code 0's bits are at 15, 8-6, code 1's at 31, 24-22.) That is
# eight integer operations for eight codes where nibbles took fourteen (two byte permutes, then a mask, a multiply
# and a mask a pair). Each pair of codes lands in the register that holds it in the MMA: the kernel loads words,
# decodes eight codes a word, and restores K order with joins, a reshape and a permute that lower to register
# renaming. A 32-code piece is one MXFP4 group or two NVFP4 groups (codes 0-3 of a word in the first, 4-7 in the
# second). The scales keep the plain layout, padded like the codes; K is padded to a
# whole chunk with zero codes and scale 1, as for split64. The kernels' K tile with mma128 is one chunk, 128 codes.
# `relayout("mma128")` is what `for_kernels` makes at load (`FP4_KERNEL_LAYOUT`), once, on every device; the
# interpreter's decode reads the same words (portable arithmetic in place of the PTX block).

# %%
#| export
def _check_whole_chunks(name: str, t: torch.Tensor, chunk: int):
    "`t`'s last dim holds whole chunks of `chunk` FP4 codes (`chunk / 2` bytes each); ValueError naming `name`."
    if t.dim() < 1 or t.shape[-1] % (chunk // 2):
        raise ValueError(f"{name}: expected a last dim that is a multiple of {chunk // 2} bytes, got shape {tuple(t.shape)}")

def split_fp4_codes(packed: torch.Tensor,   # [..., K/2] uint8 in the plain order, K a multiple of 64
                   ) -> torch.Tensor:       # [..., K/2] uint8 in the split64 order
    """Plain FP4 bytes (byte j = code 2j | code 2j+1 << 4) -> split64 (in each 64-code chunk, byte j = code j | code
    32+j << 4). ValueError naming `packed` (not a uint8 tensor, 0 dims, a last dim not a multiple of 32 bytes).
    Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    codes = unpack_fp4(packed)
    _check_whole_chunks("packed", packed, SPLIT_CHUNK)
    c = codes.unflatten(-1, (-1, 2, SPLIT_CHUNK // 2))                       # [..., chunk, half, 32]
    return (c[..., 0, :] | (c[..., 1, :] << 4)).flatten(-2)

def unsplit_fp4_codes(split: torch.Tensor,  # [..., K/2] uint8 in the split64 order
                     ) -> torch.Tensor:     # [..., K/2] uint8 in the plain order
    """Inverse of `split_fp4_codes`, exact. ValueError naming `split` (not a uint8 tensor, 0 dims, a last dim not a
    multiple of 32 bytes). Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    check_tensor("split", split, dtype=torch.uint8)
    _check_whole_chunks("split", split, SPLIT_CHUNK)
    c = split.unflatten(-1, (-1, SPLIT_CHUNK // 2))                          # [..., chunk, 32]
    return pack_fp4(torch.stack([c & 0xF, c >> 4], -2).flatten(-3))          # [..., chunk, half, 32] -> K order

# The word decode's recipe for each pair p of a word (`09c`: codes 2p and 2p+1 become the low and high bf16 of one
# register): ("rot", r) rotates the word left by r bits; ("mul", m, k) keeps the bits of m and multiplies by k (mod
# 2^32, no two partial products on one bit, so no carries). Either way the pair's eight bits then sit where
# `E2M1_BF16_MASK` keeps them: code bit b at `E2M1_BF16_BITS[b]` of its half (mantissa 6, exponent 7-8, sign 15).
E2M1_BF16_MASK = 0x81C081C0
E2M1_BF16_BITS = (6, 7, 8, 15)
FP4_WORD_PAIRS = (("rot", 0), ("rot", 10), ("rot", 13), ("mul", 0x001B001B, 0x4108))

def _check_word_pairs(pairs) -> tuple:
    "Four decode recipes, each `('rot', r)` with 0 <= r < 32 or `('mul', m, k)` with 32-bit m, k whose partial products never share a bit."
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 4:
        raise ValueError(f"pairs: expected four recipes (one a pair of codes), got {pairs!r:.80}")
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
    for p, r in enumerate(pairs):
        ok = isinstance(r, (tuple, list)) and (
            (len(r) == 2 and r[0] == "rot" and is_int(r[1]) and 0 <= r[1] < 32) or
            (len(r) == 3 and r[0] == "mul" and all(is_int(v) and 0 < v < 2**32 for v in r[1:])))
        if not ok: raise ValueError(f"pairs[{p}]: expected ('rot', r) with an int 0 <= r < 32 or ('mul', m, k) with "
                                    f"ints 0 < m, k < 2^32, got {r!r:.80}")
        if r[0] == "mul":                 # the multiply is exact bit placement only if no two partial products meet
            sums = [i + t for i in range(32) if r[1] >> i & 1 for t in range(32) if r[2] >> t & 1 and i + t < 32]
            if len(sums) != len(set(sums)):
                raise ValueError(f"pairs[{p}]: expected a multiply whose partial products never share a bit (no carries), "
                                 f"got mask {r[1]:#x} times {r[2]:#x}")
    return tuple(tuple(r) for r in pairs)

def fp4_word_bit_positions(pairs: tuple = FP4_WORD_PAIRS) -> tuple:
    """`[8][4]`: the bit of an mma128 word that holds bit b of its code j, as `pairs` reads it (ValueError if it reads
    none or two). ValueError naming `pairs` or `pairs[p]` (not four recipes, a malformed recipe, a multiply whose
    partial products share a bit, a word bit used twice or never). Source: moe-lit's own decode (no counterpart in
    vLLM)."""
    pairs, pos = _check_word_pairs(pairs), []
    for j in range(8):
        recipe, row = pairs[j // 2], []
        for b in range(4):
            q = E2M1_BF16_BITS[b] + 16 * (j % 2)                         # where the decode wants it
            if recipe[0] == "rot": src = [(q - recipe[1]) % 32]
            else: src = [i for i in range(32) for t in range(32) if recipe[1] >> i & 1 and recipe[2] >> t & 1 and i + t == q]
            if len(src) != 1: raise ValueError(f"pairs: expected one word bit for code {j}'s bit {b}, got {src}")
            row.append(src[0])
        pos.append(tuple(row))
    if len({p for row in pos for p in row}) != 32: raise ValueError("pairs: expected the 32 bits of a word, each once")
    return tuple(pos)

FP4_WORD_BITS = fp4_word_bit_positions()

def fp4_codes_to_words(codes: torch.Tensor,  # [..., W, 8] uint8 codes 0..15: code j of each of W words
                      ) -> torch.Tensor:     # [..., 4·W] uint8: the words' bytes, little-endian
    """Eight e2m1 codes a 32-bit word, bit b of code j at `FP4_WORD_BITS[j][b]` (mma128's placement within a word).
    ValueError naming `codes` (not a uint8 tensor, not `[..., W, 8]`, a value above 15).
    Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    check_tensor("codes", codes, dtype=torch.uint8)
    if codes.dim() < 2 or codes.shape[-1] != 8:
        raise ValueError(f"codes: expected [..., W, 8] (eight codes a word), got shape {tuple(codes.shape)}")
    if codes.numel() and not codes.is_meta and int(codes.max()) > 15:
        raise ValueError(f"codes: expected e2m1 codes 0..15, got {int(codes.max())}")
    out = codes.new_zeros(*codes.shape[:-1], 4)
    for j, row in enumerate(FP4_WORD_BITS):
        for b, p in enumerate(row): out[..., p // 8] |= ((codes[..., j] >> b) & 1) << (p % 8)
    return out.flatten(-2)

def fp4_words_to_codes(words: torch.Tensor,  # [..., 4·W] uint8: words as `fp4_codes_to_words` makes them
                      ) -> torch.Tensor:     # [..., W, 8] uint8 codes 0..15
    """Inverse of `fp4_codes_to_words`, exact. ValueError naming `words` (not a uint8 tensor, 0 dims, a last dim not a
    multiple of 4). Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    check_tensor("words", words, dtype=torch.uint8)
    if words.dim() < 1 or words.shape[-1] % 4: raise ValueError(f"words: expected a last dim that is a multiple of 4 bytes, got shape {tuple(words.shape)}")
    w = words.unflatten(-1, (-1, 4))
    codes = words.new_zeros(*w.shape[:-1], 8)
    for j, row in enumerate(FP4_WORD_BITS):
        for b, p in enumerate(row): codes[..., j] |= ((w[..., p // 8] >> (p % 8)) & 1) << b
    return codes

# MMA-order permutation of one 128-code chunk: (c, j2, j1, t, j0) K order <-> (t, c, j2, j1, j0) stored order
_MMA_K_DIMS, _MMA_STORE_PERM = (4, 2, 2, 4, 2), (3, 0, 1, 2, 4)

def mma_fp4_codes(packed: torch.Tensor,     # [..., K/2] uint8 in the plain order, K a multiple of 128
                 ) -> torch.Tensor:         # [..., K/2] uint8 in the mma128 order
    """Plain FP4 bytes -> mma128: in each 128-code chunk, word `4t + c` holds the eight codes a thread's MMA registers
    need. ValueError naming `packed` (not a uint8 tensor, 0 dims, a last dim not a multiple of 64 bytes). Source:
    moe-lit's own, after the register layout of Hopper's `wgmma` A operand (NVIDIA PTX ISA)."""
    codes = unpack_fp4(packed)
    _check_whole_chunks("packed", packed, MMA_CHUNK)
    c = codes.unflatten(-1, (-1, *_MMA_K_DIMS))                              # [..., chunk, c, j2, j1, t, j0]
    lead = c.dim() - 5
    c = c.permute(*range(lead), *(lead + d for d in _MMA_STORE_PERM))       # [..., chunk, t, c, j2, j1, j0]
    return fp4_codes_to_words(c.flatten(-3).flatten(-4, -2))                 # [..., 16·chunks, 8]: code j of a word

def unmma_fp4_codes(mma: torch.Tensor,      # [..., K/2] uint8 in the mma128 order
                   ) -> torch.Tensor:       # [..., K/2] uint8 in the plain order
    """Inverse of `mma_fp4_codes`, exact. ValueError naming `mma` (not a uint8 tensor, 0 dims, a last dim not a
    multiple of 64 bytes). Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    check_tensor("mma", mma, dtype=torch.uint8)
    _check_whole_chunks("mma", mma, MMA_CHUNK)
    c = fp4_words_to_codes(mma).unflatten(-2, (-1, 16)).flatten(-2)          # [..., chunk, 128] stored order
    c = c.unflatten(-1, tuple(_MMA_K_DIMS[d] for d in _MMA_STORE_PERM))     # [..., chunk, t, c, j2, j1, j0]
    lead = c.dim() - 5
    inv = [_MMA_STORE_PERM.index(d) for d in range(5)]
    return pack_fp4(c.permute(*range(lead), *(lead + d for d in inv)).flatten(-6))

def fp4_codes_from_plain(packed: torch.Tensor, layout: str) -> torch.Tensor:
    """Plain FP4 bytes (K a multiple of the layout's chunk) in `layout`'s order. ValueError naming `layout`, or
    `packed` from `split_fp4_codes` / `mma_fp4_codes`; 'plain' returns `packed` unchecked.
    Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    return {"plain": lambda x: x, "split64": split_fp4_codes, "mma128": mma_fp4_codes}[check_choice("layout", layout, FP4_LAYOUTS)](packed)

def fp4_codes_to_plain(codes: torch.Tensor, layout: str) -> torch.Tensor:
    """FP4 bytes in `layout`'s order back in the plain order, exact. ValueError naming `layout`, or `split` / `mma`
    from the inverse it calls; 'plain' returns `codes` unchecked. Source: moe-lit's own FP4 re-layout
    (no counterpart in vLLM)."""
    return {"plain": lambda x: x, "split64": unsplit_fp4_codes, "mma128": unmma_fp4_codes}[check_choice("layout", layout, FP4_LAYOUTS)](codes)

def mma128_slot_to_k() -> torch.Tensor:
    """`[128]` int64: the K position (within a 128-code chunk) of code j of mma128 word w, at slot 8w + j (a word is 8
    slots). Takes nothing, raises nothing. Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    return torch.arange(MMA_CHUNK).unflatten(0, _MMA_K_DIMS).permute(_MMA_STORE_PERM).flatten()

def plot_mma128_layout():
    """Figure: one row's 128-code chunk in K order and as mma128 stores it, each code coloured by the lane that reads
    it. Takes nothing; ImportError without matplotlib. Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    slot_to_k = mma128_slot_to_k()
    lane_of_k = (torch.arange(MMA_CHUNK) // 2) % 4                         # the MMA's A fragment: K 2t, 2t+1 (+8, +16 ...)
    fig, axes = plt.subplots(2, 1, figsize=(11, 2.6))
    for ax, lanes, title in ((axes[0], lane_of_k, "K order (the checkpoint's, two codes a byte): lane t = (K // 2) % 4"),
                             (axes[1], lane_of_k[slot_to_k], "mma128 storage: lane t reads bytes 16t .. 16t+15, four int32 words")):
        ax.imshow(lanes[None, :].numpy(), aspect="auto", cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
        ax.set_yticks([]); ax.set_title(title, fontsize=8)
        ax.set_xticks(range(0, MMA_CHUNK + 1, 16), [str(i // 2) for i in range(0, MMA_CHUNK + 1, 16)], fontsize=7)
        ax.set_xlabel("byte", fontsize=7, labelpad=1)
    for w in range(16):                                                       # word boundaries and the K it holds first
        axes[1].axvline(8 * w - 0.5, color="w", lw=0.8)
        axes[1].text(8 * w + 3.5, 0, f"w{w}\nK{int(slot_to_k[8 * w])}", ha="center", va="center", fontsize=5.5, color="w")
    fig.tight_layout(); plt.close(fig)
    return fig

@patch
def relayout(self: QuantizedExpertWeights,
             layout: str,                   # "mma128" (the Hopper kernels'), "split64" or "plain" (the checkpoint's)
            ) -> QuantizedExpertWeights:
    """The same weights with their FP4 bytes in `layout` (a copy; `self` when already there). Exact both ways.
    ValueError naming `layout` (not in `FP4_LAYOUTS`, or not 'plain' for an FP8 scheme).
    Source: moe-lit's own FP4 re-layout (no counterpart in vLLM)."""
    check_choice("layout", layout, FP4_LAYOUTS)
    if layout == self.fp4_layout: return self
    if _is_fp8(self.scheme): raise ValueError(f"layout: expected 'plain' for the FP8 scheme {self.scheme}, got {layout!r}")
    g, parts = FP4_GROUP[self.scheme], {}
    for name, K in (("w13", self.hidden_size), ("w2", self.intermediate_size)):
        codes, scale = getattr(self, name), getattr(self, name + "_scale")
        cols = _storage_cols(self.scheme, K, layout)
        if self.fp4_layout != "plain":             # through the plain bytes
            plain = _storage_cols(self.scheme, K)
            codes, scale = fp4_codes_to_plain(codes, self.fp4_layout)[..., :plain], scale[..., :2 * plain // g]
        if layout != "plain":                      # zero codes, scale 1 on the padding: 0, never NaN
            pad = cols - codes.shape[-1]
            one = torch.full((), 127 if self.scheme == "mxfp4_w4a16" else 1.0, device=scale.device).to(scale.dtype)
            codes = fp4_codes_from_plain(torch.cat([codes, codes.new_zeros(*codes.shape[:-1], pad)], -1), layout)
            scale = torch.cat([scale, one.expand(*scale.shape[:-1], 2 * pad // g)], -1)
        parts[name], parts[name + "_scale"] = codes.contiguous(), scale.contiguous()
        parts[name + "_global_scale"] = getattr(self, name + "_global_scale")
    return QuantizedExpertWeights(self.scheme, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                                  block_shape=self.block_shape, fp4_layout=layout, **parts)

@patch
def for_kernels(self: QuantizedExpertWeights) -> QuantizedExpertWeights:
    """These weights as the GEMMs read them fastest: FP4 re-laid into `FP4_KERNEL_LAYOUT` (once, at load), FP8 as is.
    Raises nothing of its own (a constructed container re-lays). Source: moe-lit's own FP4 re-layout
    (no counterpart in vLLM)."""
    return self if _is_fp8(self.scheme) else self.relayout(FP4_KERNEL_LAYOUT)


# %% [markdown]
# The chunk as the figure shows it: in K order the four lanes of a row quad interleave every two codes; in mma128 each
# lane's 32 codes are 16 contiguous bytes (words `4t .. 4t+3`), so one 16-byte load a lane a chunk, and the decode
# hands each lane exactly its MMA registers.

# %%
#| test mma128_layout_figure
slot_to_k = mma128_slot_to_k()
test_eq(sorted(slot_to_k.tolist()), list(range(128)))                        # a permutation of the chunk
for shift in range(8):                                                       # the figure's map is the one the bytes get
    c = ((torch.arange(128) >> (shift % 4 * 2)) & 3) | ((torch.arange(128) >> 6 + shift // 4) & 1) << 2   # 8 passes spell each K
    test_eq(fp4_words_to_codes(mma_fp4_codes(pack_fp4(c.to(torch.uint8)))).flatten().long(), c[slot_to_k].long())
lanes = ((slot_to_k // 2) % 4).tolist()
test_eq(lanes, sorted(lanes))                                                # each lane's codes contiguous
test_eq(len(plot_mma128_layout().axes), 2)

# %%
plot_mma128_layout()

# %%
#| test fp4_word_bits
test_eq(sorted(p for row in FP4_WORD_BITS for p in row), list(range(32)))    # every bit of a word, once
g = torch.Generator().manual_seed(1)
codes = torch.randint(0, 16, (64, 8), generator=g, dtype=torch.uint8)
codes[:16] = (torch.arange(16)[:, None] + 3 * torch.arange(8)) % 16          # every code at every position
test_eq(fp4_words_to_codes(fp4_codes_to_words(codes)), codes)
for w, cs in zip(fp4_codes_to_words(codes).view(torch.int32).tolist(), codes.tolist()):
    w &= 0xFFFFFFFF
    for p, recipe in enumerate(FP4_WORD_PAIRS):                              # each recipe puts its pair where bf16 wants it
        x = (w << recipe[1] | w >> 32 - recipe[1]) if recipe[0] == "rot" else (w & recipe[1]) * recipe[2]
        want = sum((cs[2 * p + h] >> b & 1) << E2M1_BF16_BITS[b] + 16 * h for h in range(2) for b in range(4))
        test_eq(x & E2M1_BF16_MASK, want)
table = {FP4_WORD_BITS[j][b]: f"{j}{'meeS'[b]}" for j in range(8) for b in range(4)}   # the table above, bit 31 first
test_eq(" ".join(table[i] for i in range(31, -1, -1)).lower(),
        "1s 2e 2e 2m 4e 4e 4m 1e 1e 1m 3s 7e 7m 5s 7s 7e 0s 3e 3e 3m 5e 5e 5m 0e 0e 0m 2s 6e 6m 4s 6s 6e")
test_fail(lambda: fp4_word_bit_positions((("rot", 0),) * 4), contains="expected the 32 bits of a word, each once")
test_fail(lambda: fp4_word_bit_positions((("rot", 0), ("rot", 10), ("rot", 13), ("mul", 0x1B001B, 0x410A))),
          contains="pairs[3]: expected a multiply whose partial products never share a bit")   # carries: refused
for bad, msg in ((None, "pairs: expected four recipes"), (FP4_WORD_PAIRS[:3], "pairs: expected four recipes"),
                 ((("rot", 10.0),) + FP4_WORD_PAIRS[1:], "pairs[0]: expected ('rot', r)"),
                 ((("rot", False),) + FP4_WORD_PAIRS[1:], "pairs[0]: expected ('rot', r)"),
                 ((("shl", 3),) + FP4_WORD_PAIRS[1:], "pairs[0]: expected ('rot', r)"),
                 (FP4_WORD_PAIRS[:3] + (("mul", 0x1B001B),), "pairs[3]: expected ('rot', r)"),
                 (FP4_WORD_PAIRS[:3] + (("mul", 0x1B001B, 2**32 + 0x4108),), "pairs[3]: expected ('rot', r)")):
    test_fail(lambda: fp4_word_bit_positions(bad), contains=msg)
test_fail(lambda: fp4_codes_to_words(codes[:, :4]), contains="codes: expected [..., W, 8]")
test_fail(lambda: fp4_codes_to_words(codes[0]), contains="codes: expected [..., W, 8]")
test_fail(lambda: fp4_codes_to_words(codes | 16), contains="codes: expected e2m1 codes 0..15, got")

# %% [markdown]
# ## Quantizing the weights
#
# `quantize_expert_weights` runs `09_quant`'s quantizers expert by expert (so a per-tensor or NVFP4 global scale is
# one per expert, as in checkpoints, and memory stays one expert wide on big layers). FP4 needs K to be a multiple
# of its group: K is padded with zero columns to the next multiple of 32 (MXFP4) or 16 (NVFP4) before quantizing —
# the zeros cost nothing in the GEMM because the kernel masks the activation past the unpadded K.

# %%
#| export
def _quantize_one(w: torch.Tensor, scheme: str, block) -> tuple:
    "(codes, scale, global scale or None) of one expert's `[N, K]` weight."
    if _is_fp8(scheme):
        q, s = quantize_fp8(w, WEIGHT_GRANULARITY[scheme], block or (128, 128))
        return q, (s.reshape(()) if scheme == "fp8_w8a8_tensor" else s), None
    g = FP4_GROUP[scheme]
    wp = torch.nn.functional.pad(w, (0, -w.shape[-1] % g))            # zero columns up to a whole group
    if scheme == "mxfp4_w4a16": return (*quantize_mxfp4(wp), None)
    p, s, gs = quantize_nvfp4(wp)
    return p, s, torch.tensor(gs, dtype=torch.float32, device=w.device)

def check_quantizable(name: str, w: torch.Tensor, scheme: str) -> torch.Tensor:
    """`w` (float, any shape), checked as `quantize_expert_weights` needs it for `scheme`: finite values, and for
    mxfp4_w4a16 |values| <= 6·2^113 (the largest e8m0 scale the kernels decode, 2^113, times e2m1's 6); ValueError
    naming `name` otherwise (also not a float tensor, or meta), or `scheme`. One pass over `w` (a host sync); returns
    `w`. Source: moe-lit's own (the 2^113 bound is its kernels' e8m0 decode)."""
    check_choice("scheme", scheme, QUANT_SCHEMES)
    check_tensor(name, w, dtype=FLOAT_DTYPES)
    if w.is_meta: raise ValueError(f"{name}: expected a tensor with values, got a meta tensor")
    check_finite(name, w)
    if scheme == "mxfp4_w4a16" and w.numel() and float(w.abs().amax()) > 6 * 2.0 ** 113:
        raise ValueError(f"{name}: expected |values| <= 6·2^113 (about 6.2e34) for mxfp4_w4a16, whose e8m0 scales "
                         f"stop at 2^113 here, got a max of {float(w.abs().amax()):.3g}")
    return w

def quantize_expert_weights(w13: torch.Tensor,        # [E, 2·I, H] float, gate rows then up rows
                            w2: torch.Tensor,         # [E, H, I] float
                            scheme: str,              # one of QUANT_SCHEMES
                            block_shape: tuple | None = None,  # FP8 block scales: (rows, cols), default (128, 128)
                           ) -> QuantizedExpertWeights:
    """Quantize both expert weights into `scheme`, one expert at a time (09_quant's quantizers). ValueError naming
    `scheme` (a full name), `block_shape`, `w13` (not a 3-D float tensor, empty, odd 2·I, non-finite, too large for
    MXFP4) or `w2` (shape, dtype, device, values). Source: vLLM's MoE weight formats (FP8 block as DeepSeek-V3, MXFP4
    as gpt-oss, NVFP4 as ModelOpt), quantized with moe-lit's own `09_quant` code."""
    check_choice("scheme", scheme, QUANT_SCHEMES)
    block = _check_block_shape(scheme, block_shape)
    check_tensor("w13", w13, ndim=3, dtype=FLOAT_DTYPES)
    E, two_i, H = w13.shape
    if two_i % 2 or two_i == 0 or E == 0 or H == 0:
        raise ValueError(f"w13: expected a non-empty [E, 2·I, H] with an even 2·I, got shape {tuple(w13.shape)}")
    check_tensor("w2", w2, shape=(E, H, two_i // 2), dtype=w13.dtype)
    if w2.device != w13.device: raise ValueError(f"w2: expected w13's device {w13.device}, got {w2.device}")
    parts = {}
    for name, w in (("w13", w13), ("w2", w2)):
        check_quantizable(name, w, scheme)                             # before any expert is quantized
        first = _quantize_one(w[0], scheme, block)                     # sizes the outputs, filled expert by expert
        out = [None if t is None else torch.empty(E, *t.shape, dtype=t.dtype, device=t.device) for t in first]
        for e in range(E):
            for o, t in zip(out, first if e == 0 else _quantize_one(w[e], scheme, block)):
                if o is not None: o[e] = t
        parts[name], parts[name + "_scale"], parts[name + "_global_scale"] = out
    return QuantizedExpertWeights(scheme, hidden_size=H, intermediate_size=two_i // 2, block_shape=block, **parts)

# %% [markdown]
# ### Test weights that a permuted scale cannot fool
#
# Random Gaussian weights have the same magnitude everywhere, so every block gets nearly the same scale and a kernel
# that reads the scales in the wrong order would still pass. `random_expert_weights` gives every 128×128 block its
# own power-of-two magnitude (2^-3 … 2^3), every 16-column group a further 2^-2 … 2^2, and every block an offset so
# values are not symmetric about zero. `random_activations` does the same to activation rows per 64 columns.

# %%
#| export
def _structured(N: int, K: int, g: torch.Generator) -> torch.Tensor:
    "`[N, K]` Gaussian values whose power-of-two magnitude changes per 128×128 block and per 16-column group, with a per-block offset."
    kw = dict(generator=g, device=g.device)
    up = lambda t, bn, bk: t.repeat_interleave(bn, 0)[:N].repeat_interleave(bk, 1)[:, :K]
    nb, kb = -(-N // 128), -(-K // 128)
    blk = up(torch.randint(-3, 4, (nb, kb), **kw).float(), 128, 128)
    fine = up(torch.randint(-2, 3, (N, -(-K // 16)), **kw).float(), 1, 16)
    off = up(torch.rand((nb, kb), **kw) - 0.5, 128, 128)
    return (torch.randn((N, K), **kw) + off) * torch.exp2(blk + fine)

def random_expert_weights(E: int, H: int, I: int, seed: int = 0, device=None,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """`(w13 [E, 2·I, H], w2 [E, H, I])` with block-wise exponents (see above), scaled so outputs are O(1); built on
    `device`. Checks nothing: a negative size raises torch's RuntimeError, a zero H or I gives empty weights, and an
    integer `dtype` silently truncates the values (mostly to 0). Source: moe-lit's own test weights."""
    device = torch.device(device or default_device())
    g = torch.Generator(device=device).manual_seed(seed)            # one expert at a time: memory stays one expert wide
    w13, w2 = torch.empty(E, 2 * I, H, dtype=dtype, device=device), torch.empty(E, H, I, dtype=dtype, device=device)
    for e in range(E):
        w13[e], w2[e] = _structured(2 * I, H, g) / (4 * H**0.5), _structured(H, I, g) / (4 * I**0.5)
    return w13, w2

def random_activations(shape: tuple, dtype: torch.dtype, seed: int = 0, device=None) -> torch.Tensor:
    """Activations `[..., K]` whose magnitude changes by powers of two (2^-2 … 2^2) every 64 columns of each row, in
    `dtype` on `device`. Checks nothing: `shape=()` raises an unnamed ValueError, a negative size torch's RuntimeError,
    and an integer `dtype` silently truncates. Source: moe-lit's own test activations."""
    g = torch.Generator().manual_seed(seed)
    *lead, K = shape
    e = torch.randint(-2, 3, (*lead, -(-K // 64)), generator=g).float().repeat_interleave(64, -1)[..., :K]
    return (torch.randn(shape, generator=g) * torch.exp2(e)).to(device=device or default_device(), dtype=dtype)

# %%
#| test quantize_expert_weights_round_trip
E, H, I = 3, 144, 80                                     # H, I not multiples of 128 (or of 32 for MXFP4)
w13, w2 = random_expert_weights(E, H, I, seed=1, device="cpu")
for scheme, cos_min in (("fp8_w8a8_tensor", 0.99), ("fp8_w8a8_channel", 0.999), ("fp8_w8a8_block", 0.999),
                        ("mxfp4_w4a16", 0.98), ("nvfp4_w4a16", 0.99)):
    qw = quantize_expert_weights(w13, w2, scheme)
    d13, d2 = qw.dequantize()
    test_eq((d13.shape, d2.shape), (w13.shape, w2.shape))                       # K padding cropped
    for d, w in ((d13, w13), (d2, w2)):
        assert torch.nn.functional.cosine_similarity(d.flatten(), w.flatten(), dim=0) > cos_min, scheme
    test_eq(qw.select([2, 0]).dequantize_weight("w2", 0), qw.dequantize_weight("w2", 2))
qw = quantize_expert_weights(w13, w2, "mxfp4_w4a16")
test_eq((qw.w13.shape, qw.w13_scale.shape, qw.w2.shape), ((E, 160, 80), (E, 160, 5), (E, 144, 48)))  # K_pad 160 / 96
test_eq(qw.block_shape, (1, 32))
test_eq(quantize_expert_weights(w13, w2, "fp8_w8a8_block").w13_scale.shape, (E, 2, 2))   # ceil(160/128), ceil(144/128)
assert "bytes/element" in repr(qw)

# %%
#| test fp4_split_layout
b = pack_fp4(torch.arange(64, dtype=torch.uint8) % 16)                       # codes 0..15 repeated, K order
sp = split_fp4_codes(b)
test_eq(sp[0].item(), 0 | (32 % 16) << 4); test_eq(sp[5].item(), 5 | (37 % 16) << 4)      # byte j = code j | code 32+j
test_eq(unsplit_fp4_codes(sp), b)
g = torch.Generator().manual_seed(0)
codes = torch.randint(0, 16, (3, 256), generator=g, dtype=torch.uint8)       # two 128-code chunks, random codes
mm = fp4_words_to_codes(mma_fp4_codes(pack_fp4(codes)))                      # [3, 32 words, 8 codes]
for ch, t, c, j2, j1, j0 in itertools.product(range(2), range(4), range(4), range(2), range(2), range(2)):
    test_eq(mm[:, 16 * ch + 4 * t + c, 4 * j2 + 2 * j1 + j0],                 # word 4t + c of the chunk, code j
            codes[:, 128 * ch + 32 * c + 16 * j2 + 8 * j1 + 2 * t + j0])
test_eq(unmma_fp4_codes(mma_fp4_codes(pack_fp4(codes))), pack_fp4(codes))
for scheme, layout in itertools.product(("mxfp4_w4a16", "nvfp4_w4a16"), ("split64", "mma128")):
    chunk = FP4_CHUNK[layout]
    for H, I in ((256, 128), (80, 48)):                                      # whole chunks; K padded to the chunk
        qw = quantize_expert_weights(*random_expert_weights(3, H, I, seed=4), scheme)
        q2 = qw.relayout(layout)
        test_eq((q2.fp4_layout, q2.w13.shape[-1], q2.w2.shape[-1]), (layout, -(-H // chunk) * chunk // 2, -(-I // chunk) * chunk // 2))
        for back in (q2.relayout("plain"), q2.relayout("split64" if layout == "mma128" else "mma128").relayout("plain")):
            for f in ("w13", "w13_scale", "w2", "w2_scale"):                 # the round trips are bit-exact
                test_eq(getattr(back, f).view(torch.uint8).cpu(), getattr(qw, f).view(torch.uint8).cpu())
        for w in ("w13", "w2"):                                              # and it decodes to the same weights
            test_eq(q2.dequantize_weight(w, 2).cpu(), qw.dequantize_weight(w, 2).cpu())
        if H == 256: assert not torch.equal(q2.w13, qw.w13)                 # the bytes did move
        assert q2.relayout(layout) is q2 and f"fp4_layout={layout}" in repr(q2)
        test_eq(qw.for_kernels().fp4_layout, FP4_KERNEL_LAYOUT)
test_fail(lambda: quantize_expert_weights(*random_expert_weights(2, 128, 64), "fp8_w8a8_block").relayout("split64"),
          contains="layout: expected 'plain' for the FP8 scheme")
test_fail(lambda: qw.relayout("split"), contains="layout: expected one of")
test_fail(lambda: split_fp4_codes(torch.zeros(2, 16, dtype=torch.uint8)), contains="multiple of 32 bytes")
test_fail(lambda: mma_fp4_codes(torch.zeros(2, 32, dtype=torch.uint8)), contains="multiple of 64 bytes")
test_fail(lambda: unmma_fp4_codes(torch.zeros(2, 32, dtype=torch.uint8)), contains="multiple of 64 bytes")
test_fail(lambda: quant_weight_shapes("mxfp4_w4a16", 1, 2, 64, block_shape=5), contains="block_shape: expected None or a (rows, cols) pair")
test_fail(lambda: dataclasses.replace(qw, fp4_layout="split64"), contains="w13: expected shape")
q2 = quantize_expert_weights(*random_expert_weights(2, 80, 16, seed=4), "mxfp4_w4a16").relayout("split64")   # K padded
bad_scale = q2.w2_scale.clone(); bad_scale[..., -1] = 3                              # a padded group's scale not 1
test_fail(lambda: dataclasses.replace(q2, w2_scale=bad_scale), contains="w2: expected the split64 padding")
bad_codes = q2.w13.clone(); bad_codes[..., -1] = 0x70                                # a padded code (K >= 80) not 0
test_fail(lambda: dataclasses.replace(q2, w13=bad_codes), contains="w13: expected the split64 padding")
q3 = q2.relayout("mma128"); bad_codes = q3.w13.clone(); bad_codes[..., -1] = 0x70     # mma128: the same check
test_fail(lambda: dataclasses.replace(q3, w13=bad_codes), contains="w13: expected the mma128 padding")
nan_scale = q2.w13_scale.clone(); nan_scale[0, 0, 0] = 255                           # e8m0 NaN
test_fail(lambda: dataclasses.replace(q2, w13_scale=nan_scale), contains="w13_scale: expected e8m0 bytes <= 240")
nan_scale[0, 0, 0] = 241                                                            # 2^114: past the decode's range
test_fail(lambda: dataclasses.replace(q2, w13_scale=nan_scale), contains="w13_scale: expected e8m0 bytes <= 240")
qn = quantize_expert_weights(*random_expert_weights(2, 80, 16, seed=4), "nvfp4_w4a16")
for byte in (0x7F, 0xFF, 0x80 | 0x38):                                              # NaN, NaN, -1.0: no NVFP4 scale
    bad_scale = qn.w13_scale.clone(); bad_scale.view(torch.uint8)[1, 2, 0] = byte    # is negative (amax / 6 / global)
    test_fail(lambda: dataclasses.replace(qn, w13_scale=bad_scale), contains="w13_scale: expected e4m3 scales that are not negative and not NaN")
    test_fail(lambda: dataclasses.replace(qn, w13_scale=bad_scale), contains="at index [1, 2, 0]")
q8 = quantize_expert_weights(*random_expert_weights(2, 128, 64, seed=4), "fp8_w8a8_block")
for v in (float("nan"), -1.0, float("inf"), 3e38):                                    # 3e38 × 448: inf weights
    bad8 = q8.w2_scale.clone(); bad8.view(-1)[0] = v
    test_fail(lambda: dataclasses.replace(q8, w2_scale=bad8), contains="w2_scale: expected scales in [0, 7.596e+35]")
for bad, msg in (("bogus", "device: expected 'cpu', 'cuda' or a torch.device, got 'bogus'"),
                 ("meta", "device: expected a cpu or cuda device, got meta"), ("mps", "got mps")):
    test_fail(lambda: q8.to(bad), contains=msg)
edge = q8.w2_scale.clone(); edge.view(-1)[0] = FP8_SCALE_MAX                            # the bound itself: taken
test_eq(dataclasses.replace(q8, w2_scale=edge).scheme, "fp8_w8a8_block")
for byte in (0x7F, 0xFF):                                                            # e4m3fn's two NaN codes
    nan_codes = q8.w13.clone(); nan_codes.view(torch.uint8)[1, 2, 3] = byte
    test_fail(lambda: dataclasses.replace(q8, w13=nan_codes), contains="w13: expected FP8 e4m3 codes, none NaN (0x7F/0xFF), got NaN at index [1, 2, 3]")

# %% [markdown]
# ### What the scales look like
#
# `plot_weight_scales` draws, for one expert's weight, the scale each element's code is multiplied by (log2): FP8 block
# scales tile the weight in 128×128 squares (partial at the right and bottom edges), MXFP4 and NVFP4 give every row
# its own scale per 32 or 16 columns. The test weights' deliberate block structure is visible in both.

# %%
#| export
def _element_scales(qw: QuantizedExpertWeights, which: str, expert: int) -> torch.Tensor:
    "`[N, K]` fp32: the factor each weight element's code is multiplied by (NVFP4: block scale · global scale)."
    codes, scale, gs, N, K = qw.weight_parts(which)
    check_int("expert", expert, lo=0, hi=qw.num_experts)
    s = torch.exp2(scale[expert].float() - 127) if qw.scheme == "mxfp4_w4a16" else scale[expert].float()
    if qw.scheme in ("fp8_w8a8_tensor", "fp8_w8a8_channel"): return s.reshape(-1, 1).expand(N, K)
    gn, gk = qw.block_shape
    out = s.repeat_interleave(gn, 0)[:N].repeat_interleave(gk, 1)[:, :K]
    return out * float(gs[expert]) if gs is not None else out

def plot_weight_scales(qw: QuantizedExpertWeights, which: str = "w13", expert: int = 0, title: str = ""):
    """Heat-map of log2 of the scale each element of one expert's weight gets; returns the Figure. ValueError naming
    `weight` (for `which`) or `expert`; a `qw` that is not a container raises AttributeError. Source: moe-lit's own."""
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = _element_scales(qw, which, expert).cpu()
    fig, ax = plt.subplots(figsize=(6, 3))
    im = ax.imshow(torch.log2(s).numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel(f"K (column of {which})"); ax.set_ylabel("N (row)")
    ax.set_title(title or f"{qw.scheme}: log2 of each element's scale, {which}[{expert}]", fontsize=9)
    fig.colorbar(im, ax=ax, label="log2 scale"); fig.tight_layout(); plt.close(fig)
    return fig

# %%
demo_w13, demo_w2 = random_expert_weights(1, 256, 192, seed=11, device="cpu")   # w13 [384, 256]: 3 × 2 blocks
plot_weight_scales(quantize_expert_weights(demo_w13, demo_w2, "fp8_w8a8_block"))

# %%
plot_weight_scales(quantize_expert_weights(demo_w13, demo_w2, "mxfp4_w4a16"))

# %%
#| test plot_weight_scales
qw = quantize_expert_weights(*random_expert_weights(2, 64, 32, device="cpu"), "nvfp4_w4a16")
fig = plot_weight_scales(qw, "w2", 1)
test_eq(fig.axes[0].images[0].get_array().shape, (64, 32))
test_fail(lambda: plot_weight_scales(qw, "w2", 2), contains="expert: expected <= 1")

# %% [markdown]
# Bytes per weight element, measured on one expert (every term is per element, so one is enough): FP8 is 1 byte plus
# its scales, the FP4 formats are 0.53 and 0.56 — the numbers the benchmark's weight-bytes floor divides by. The
# channel scales cost `4/K` per element: `4/H` for `w13` and `4/I` for `w2`, weighted by their sizes (2 : 1).

# %%
#| test bytes_per_element
H, I = 1024, 256
w13, w2 = torch.randn(1, 2 * I, H) * 0.02, torch.randn(1, H, I) * 0.02
got = {s: quantize_expert_weights(w13, w2, s).bytes_per_element for s in QUANT_SCHEMES}
assert abs(got["fp8_w8a8_block"] - (1 + 4 / 128**2)) < 1e-9
assert abs(got["fp8_w8a8_tensor"] - (1 + 8 / (3 * H * I))) < 1e-9
assert abs(got["fp8_w8a8_channel"] - (1 + (2 * 4 / H + 4 / I) / 3)) < 1e-9
assert abs(got["mxfp4_w4a16"] - (0.5 + 1 / 32)) < 1e-9
assert abs(got["nvfp4_w4a16"] - (0.5 + 1 / 16 + 8 / (3 * H * I))) < 1e-9

# %%
#| test quant_weights_bad_input
w13, w2 = torch.randn(2, 64, 48), torch.randn(2, 48, 32)
test_fail(lambda: quantize_expert_weights(w13, w2, "int4_w4a16"), contains="scheme: expected one of")
bad = w13.clone(); bad[1, 5, 7] = float("nan")
test_fail(lambda: quantize_expert_weights(bad, w2, "fp8_w8a8_block"), contains="w13: expected finite values, got nan at [1, 5, 7]")
test_fail(lambda: quantize_expert_weights(w13, w2[:, :, :16], "fp8_w8a8_block"), contains="w2: expected shape [2, 48, 32]")
test_fail(lambda: quantize_expert_weights(w13[:, :63], w2, "fp8_w8a8_block"), contains="w13: expected a non-empty [E, 2·I, H]")
test_fail(lambda: quantize_expert_weights(w13, w2, "fp8_w8a8_block", (128, 96)), contains="block_shape[1]: expected a power of 2")
test_fail(lambda: quantize_expert_weights(w13, w2, "fp8_w8a8_block", (10**9, 32)), contains="block_shape[0]: expected <= 65536, got 1000000000")
test_fail(lambda: quantize_expert_weights(w13, w2, "mxfp4_w4a16", (1, 16)), contains="block_shape: expected (1, 32)")
qw = quantize_expert_weights(w13, w2, "fp8_w8a8_block")
t = {k: getattr(qw, k) for k in ("w13", "w13_scale", "w2", "w2_scale")}
mk = lambda **kw: QuantizedExpertWeights("fp8_w8a8_block", hidden_size=48, intermediate_size=32, **{**t, **kw})
test_fail(lambda: mk(w13_scale=torch.ones(2, 2, 1)), contains="w13_scale: expected shape [2, 1, 1], got [2, 2, 1]")
test_fail(lambda: mk(w13_scale=qw.w13_scale.double()), contains="w13_scale: expected dtype torch.float32")
test_fail(lambda: mk(w2_scale=torch.ones(2, 1, 2)), contains="w2_scale: expected shape [2, 1, 1]")
test_fail(lambda: mk(w2=qw.w2.float()), contains="w2: expected dtype torch.float8_e4m3fn")
test_fail(lambda: mk(w13_global_scale=torch.ones(2)), contains="w13_global_scale: expected None")
test_fail(lambda: QuantizedExpertWeights("fp8_w8a8_block", hidden_size=40, intermediate_size=32, **t),
          contains="w13: expected shape [2, 64, 40]")
nv = quantize_expert_weights(w13, w2, "nvfp4_w4a16")
test_fail(lambda: dataclasses.replace(nv, w2_global_scale=nv.w2_global_scale[:1]),
          contains="w2_global_scale: expected shape [2]")
test_fail(lambda: dataclasses.replace(nv, w2_global_scale=None),
          contains="w2_global_scale: expected a torch.Tensor")
for bad in (-nv.w2_global_scale, nv.w2_global_scale * 1e38 / nv.w2_global_scale.max(), nv.w2_global_scale * float("nan")):
    test_fail(lambda: dataclasses.replace(nv, w2_global_scale=bad), contains="w2_global_scale: expected values in (0, 1.266e+35]")
test_fail(lambda: dataclasses.replace(nv, w2_global_scale=nv.w2_global_scale.repeat(2)[::2]),
          contains="w2_global_scale: expected a contiguous tensor")
test_fail(lambda: qw.dequantize_weight("w3", 0), contains="which: expected one of ['w13', 'w2']")
mx = quantize_expert_weights(w13, w2, "mxfp4_w4a16")
test_fail(lambda: quantize_expert_weights(w13 * 1e36, w2, "mxfp4_w4a16"), contains="w13: expected |values| <= 6·2^113")
test_fail(lambda: quantize_expert_weights(w13.to("meta"), w2.to("meta"), "mxfp4_w4a16"), contains="w13: expected a tensor with values")
test_fail(lambda: check_quantizable("state_dict['w2']", w2 * 1e36, "mxfp4_w4a16"), contains="state_dict['w2']: expected |values| <= 6·2^113")
qw = quantize_expert_weights(w13, w2, "mxfp4_w4a16")                       # an in-place edit after construction:
assert not qw.recheck_if_edited()                                         # (none yet)
qw.w13_scale.fill_(200)
assert qw.recheck_if_edited() and qw.e8m0_max["w13"] == 200 and not qw.recheck_if_edited()   # the facts follow it
qw.w13_scale[0, 0, 0] = 255                                               # and a NaN byte is refused, every time
for _ in range(2): test_fail(lambda: check_quant_weights(qw), contains="w13_scale: expected e8m0 bytes <= 240")
test_fail(lambda: check_quant_weights("codes"), contains="qw: expected a QuantizedExpertWeights, got str")
test_eq(quantize_expert_weights(w13 / w13.abs().amax() * 6 * 2.0 ** 113, w2, "mxfp4_w4a16").w13_scale.max().item(), 240)   # the edge fits
for bad_ids, msg in ((1, "experts: expected a list or 1-D tensor"), ([5], "experts: expected ids in [0, 2), got values in [5, 5]"),
                     ([-1], "expected ids in [0, 2)"), (torch.tensor([0.0]), "expected a 1-D int32/int64 tensor"),
                     (torch.tensor([[0]]), "expected a 1-D int32/int64 tensor"), ([True], "expected a list or 1-D tensor"),
                     (torch.tensor([1], device="meta"), "experts: expected ids on cpu, got device meta")):
    test_fail(lambda: mx.select(bad_ids), contains=msg)
test_eq(nv.select(slice(None, None, 2)).num_experts, 1)                  # a slice: the global scales stay contiguous
for bad_slice in (slice(None, None, 0), slice(None, None, -1), slice(0.5, 2)):
    test_fail(lambda: mx.select(bad_slice), contains="experts: expected a slice of int bounds and a positive step")
test_fail(lambda: mx.select([2 ** 63]), contains="experts: expected ids in [0, 2)")
test_eq(mx.select(torch.tensor([1])).w13, mx.w13[1:2])
test_fail(lambda: dataclasses.replace(nv, w13_global_scale=nv.w13_global_scale.to("meta")),
          contains="w13_global_scale: expected device cpu, got meta")    # the device before any value is read
test_fail(lambda: dataclasses.replace(mx, **{k: getattr(mx, k).to("meta") for k in ("w13", "w13_scale", "w2", "w2_scale")}),
          contains="w13: expected a dense tensor with values, got a meta tensor")
bad = mx.w13_scale.clone(); bad[1, 5, 0] = 255
test_fail(lambda: dataclasses.replace(mx, w13_scale=bad), contains="got 255 at index [1, 5, 0]")
mm = quantize_expert_weights(torch.randn(2, 64, 128), torch.randn(2, 128, 32), "nvfp4_w4a16").relayout("mma128")
buf = torch.zeros(mm.w13.numel() + 1, dtype=torch.uint8)                 # the same bytes one byte off a 4-byte boundary
odd = buf[1:].view(mm.w13.shape); odd.copy_(mm.w13)
test_fail(lambda: dataclasses.replace(mm, w13=odd), contains="w13: expected mma128 rows aligned to 4 bytes")
test_eq(dataclasses.replace(mm, w13=odd.clone()).w13, mm.w13)   # a fresh copy is aligned
