# %%
#| default_exp kernels.quant

# %% [markdown]
# # Quantized expert GEMMs
# > FP8 w8a8 (tensor, channel and 128×128 block scales) on the tensor cores' FP8 path, and MXFP4 / NVFP4 weight-only GEMMs that unpack e2m1 codes inside the K loop — in the batched and the contiguous format, with one K-step helper for every scheme.

# %%
#| export
from __future__ import annotations
import contextlib, functools, os
import torch
import triton
import triton.language as tl
from moe_lit.kernels.batched import INTERPRET, launch_kernel, _await_producers
from moe_lit.terms import check_int, check_tensor, check_choice, check_bool, check_disjoint, env_choice
from moe_lit.formats import Activation, slab_counts
from moe_lit.quant import QUANT_SCHEME_TABLE, FP8_MAX
from moe_lit.quant_weights import QuantizedExpertWeights, ACTIVATION_GRANULARITY, FP4_LAYOUTS
from moe_lit.quant_weights import FP4_WORD_PAIRS, E2M1_BF16_MASK, check_quant_weights
from moe_lit.kernels.quant_act import fp8_quantize_activations, fp8_quantize_activations_reference, _fp8_quantize_group
from moe_lit.kernels.quant_act import _fp8_quantize_activations
from moe_lit.kernels.quant_act import _fp8_row_amax, _fp8_row_scales, _fp8_scaled
from moe_lit.kernels.batched import lookup_tile_config, fit_shared_memory, check_tile_config, check_extent, check_kernel_device
from moe_lit.kernels.batched import default_tile_config
from moe_lit.kernels.batched import _cdiv, _tile_config_root, _split_k_sum, _slot_expert, expert_slots
from moe_lit.kernels.batched import _split_k_choice, _split_k_buffers, epilogue_constants
import moe_lit.kernels.batched as _batched
from moe_lit.kernels.batched import check_max_active, SPLIT_K_PROGRAMS_PER_SM
from moe_lit.kernels.batched import check_activation, check_expert_bias, add_expert_bias, gated_activation
from moe_lit.kernels.contiguous import check_aligned_args, _block_pairs

# %%
#| hide
from moe_lit.kernels.batched import DEVICE, split_k_factor, _num_sms
from moe_lit.kernels.contiguous import moe_align_block_size
from moe_lit.formats import SILU
from moe_lit.quant import QUANT_SCHEMES
from moe_lit.testing import poison_rows, assert_quant_close, quant_error
from moe_lit.quant_weights import quantize_expert_weights, random_expert_weights, random_activations, FP4_LAYOUTS
from moe_lit.quant_weights import fp4_codes_to_words, check_quant_weights
from fastcore.test import test_eq, test_fail, test_close
import itertools, json, os, tempfile
from moe_lit.kernels.batched import tile_config_path
from moe_lit.kernels.quant import _weight_kernel_args, _fp8_input, _E2M1_WORD_MX, _E2M1_WORD_NV, _E2M1X8_PTX
from moe_lit.kernels.quant import _E2M1_WORD_MX_FOLDED, _E2M1_WORD_NV_FOLDED
import dataclasses, subprocess, sys
from moe_lit.testing import record_launches, assert_compiles_for_gpu, emulate_ptx, _bf16_bits, _bf16_value
import subprocess, sys, moe_lit
from pathlib import Path

# %% [markdown]
# In this notebook: the one K-step helper `_quant_k_step` shared by both GEMM kernels; the batched GEMM
# `batched_moe_gemm_quant` and the contiguous GEMM `fused_moe_gemm_quant`, each beside its torch spec
# (`batched_gemm_quant_reference`, `fused_moe_gemm_quant_reference`). Both take the experts' semantics of `06`/`08`:
# an `Activation` (SiLU, or gpt-oss's clamped SwiGLU) and an optional expert bias, through the same epilogue
# helpers. The tests' own helpers `check_batched_gemm_quant` and `check_fused_gemm_quant` run a poisoned random
# problem against the spec. A **reference** page in Triton's order: spec → kernel → launcher → tests →
# interpretation. The weights come from `09a_quant_weights`, the activation quantizer from `09b_kernels.quant_act`;
# the unquantized kernels this chapter extends are in `06_kernels.batched` and `08_kernels.contiguous`, and
# `09d_kernels.quant_experts` chains the two GEMMs into the quantized experts.

# %%
#| export
_FMT = {"fp8_w8a8_tensor": 0, "fp8_w8a8_channel": 0, "fp8_w8a8_block": 1, "mxfp4_w4a16": 2, "nvfp4_w4a16": 3}  # kernel branch
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)   # the unquantized activation dtypes every quantized path takes
EMULATE_E4M3 = tl.constexpr(INTERPRET)   # `09b`'s interpreter workaround for the fp32 -> e4m3 conversion

# %% [markdown]
# ## The K loop, written once
#
# Both GEMM kernels (batched and contiguous) call the same `@triton.jit` helper for every K tile and every weight
# half (gate, then up when a gated activation is fused). It loads the weight tile, keeps it fp8 or turns FP4 codes into the
# activation dtype, runs `tl.dot`, and applies the scales that change along K. Scales that are constant along K are
# applied once, after the loop, by a second shared helper.
#
# | scheme | `FMT` | per K tile (`_quant_k_step`) | after the loop (`_quant_output_scales`) |
# |---|---|---|---|
# | `fp8_w8a8_tensor` | 0 | `acc += dot(a_fp8, w_fp8)` | `acc · a_scale · w_scale[e]` |
# | `fp8_w8a8_channel` | 0 | `acc += dot(a_fp8, w_fp8)` | `acc · a_scale[row] · w_scale[e, n]` |
# | `fp8_w8a8_block` | 1 | `acc += dot(a_fp8, w_fp8) · a_scale[row, k/128] · w_scale[e, n/128, k/128]` | — |
# | `mxfp4_w4a16` | 2 | `w = e2m1(code) · 2^(s−127)` → bf16; `acc = dot(a, w, acc)` | — |
# | `nvfp4_w4a16` | 3 | `w = e2m1(code) · e4m3(s)` → bf16; `acc = dot(a, w, acc)` | `acc · global_scale[e]` |
#
# > **Why a fresh `dot` per K tile for FP8.** On sm_90 Triton lets fp8 MMAs accumulate with reduced precision by
# > default (`max_num_imprecise_acc` = 2^30 on capability 9.0). Writing `acc += dot(a, w)` instead of
# > `dot(a, w, acc)` bounds that to one K tile (≤ 256 elements) and adds the tiles in full fp32 — the "promote every
# > 128 elements" recipe of the DeepSeek-V3 technical report (arXiv:2412.19437, §3.3.2). Triton's combine pass does
# > not fold the add back into the dot when `max_num_imprecise_acc` is non-zero (`CombineDotAddFPattern`, Triton 3.x).
# > The block scheme needs the per-tile product anyway, to apply that tile's scales.
#
# > **FP4: the weights are the left operand.** At decode an expert sees a handful of rows, so the weight tile is
# > what costs: every code is loaded once and decoded once per program, and the decode is integer work on the CUDA
# > cores. The FP4 loop therefore computes the transposed tile, `outᵀ = W · aᵀ` (the "swap AB" of decode kernels):
# > the weight tile `[BLOCK_N, BLOCK_K]` is loaded as stored — each row's `BLOCK_K/2` bytes are contiguous, so a row
# > is a few 16-byte loads — decoded in registers and fed to the tensor cores as the *left* operand (the one Hopper's
# > `wgmma` takes from registers rather than shared memory: the sm_90 SASS of these kernels shows it); the
# > few activation rows are the right operand `[BLOCK_K, BLOCK_M]`. A byte's two
# > codes are neighbours along K (low nibble first, the order of `09_quant`), so `tl.join` of the two nibbles and a
# > reshape give the K order without touching the activations. The group scale is loaded once per `(row, group)` and
# > broadcast over the group's codes. How a code becomes a number is the next section; the portable form (the
# > interpreter's, and fp16 NVFP4's) places its exponent and mantissa bits in an fp16's exponent and mantissa fields,
# > which makes an exact fp16 equal to the e2m1 value times 2^-14 (the e2m1 subnormal 0.5 lands on an fp16
# > subnormal), the 2^14 folded into the group scale. The e8m0 scale
# > becomes `2^(s−127)` by placing `s` in an fp32 exponent field; the NVFP4 global scale is left to the epilogue:
# > `code · block scale` is at most 6 · 448 and exact in bf16 and fp16, so the weight tile equals the fp32 dequantized
# > weight divided by the global scale. MXFP4 decodes in bf16 whatever the activations' dtype (fp16 activations are
# > rounded to bf16 for the MMA): an e8m0 scale can put a weight far outside fp16's range. The kernels read the three byte orders of `09a`
# > (the constexpr `LAYOUT`): the checkpoint's own (`[N, K/2]` bytes, `[N, K/G]` scales; a byte's two codes are K
# > neighbours, joined as above); **split64**, where a byte holds codes `j` and `j + 32` of a 64-code chunk, so the
# > low nibbles of a K tile are one MMA operand for the activation columns `64c + j` and the high nibbles another for
# > `64c + 32 + j` (`_fp4_split_tile`: two MMAs, no interleave); and **mma128**, the layout the layer re-lays its FP4
# > weights into at load (`QuantizedExpertWeights.for_kernels`), whose int32 words each hold the eight codes one
# > thread's MMA registers take (`_fp4_mma_tile`, the word decode below). The measured effect of each is in the
# > Performance section below.
# >
# > **The scales are loaded one K tile ahead.** The compiler pipelines the loads that feed a `tl.dot` (codes and
# > activations go global → shared memory by `cp.async`, stages ahead); the scale bytes reach the MMA only through the
# > decode, so a plain load of this tile's scales made every K step wait a DRAM round trip (the sm_90 SASS showed the
# > `LDG.U8` and its use in the same iteration). The loop carries the next tile's scales instead (`_fp4_scales` at
# > `k0 + BLOCK_K`, masked past K), and FP8's block scales the same way (`_fp8_tile_scales`).

# %%
#| export
@triton.jit
def _e2m1_fp16(code):
    "e2m1 `code` (uint8, sign in bit 3) as the fp16 whose value is the e2m1 value times 2^-14 (exact, 0.5 included)."
    c = code.to(tl.uint16)
    return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True)

# %%
#| export
@triton.jit
def _quant_k_step(acc,        # [BLOCK_M, BLOCK_N] fp32 accumulator
                  a,          # [BLOCK_M, BLOCK_K] float8 activations
                  a_s,        # [BLOCK_M] fp32 activation scale of this K tile (FMT 1), else unused
                  w_s,        # [BLOCK_N] fp32 weight scale of this K tile (FMT 1, `_fp8_tile_scales`), else unused
                  w_ptr,      # this expert's codes [N_w, K] float8
                  rows,       # [BLOCK_N] int, weight rows of the tile (gate rows, or up rows = gate + N_OUT)
                  row_ok,     # [BLOCK_N] bool
                  k0, K_W,    # first K index of the tile; stored columns (K)
                  stride_wn, stride_wk,
                  FMT: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    "One K tile of an FP8 GEMM: load the e4m3 weight tile, dot with the e4m3 activations, apply the K tile's scales."
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = tl.load(w_ptr + rows[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=row_ok[None, :] & (offs_k < K_W)[:, None], other=0.0)              # [BLOCK_K, BLOCK_N]
    part = tl.dot(a, w)                                           # fresh fp32 tile: bounded imprecise accumulation
    if FMT == 1:                                                  # one weight scale per (row block, K block)
        part = part * a_s[:, None] * w_s[None, :]
    acc += part
    return acc

@triton.jit
def _fp8_tile_scales(ws_ptr, rows, row_ok, k0, K, stride_wsn, stride_wsk, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr):
    "`[BLOCK_N]` fp32 block weight scales of the K tile at `k0` (FMT 1); 0 past the rows or past K (a prefetch past the end reads nothing)."
    return tl.load(ws_ptr + (rows // GROUP_N) * stride_wsn + (k0 // GROUP_K) * stride_wsk, mask=tl.where(k0 < K, row_ok, False), other=0.0)

# %% [markdown]
# ### The FP4 decode: eight codes per 32-bit word
#
# On the GPU (unless `MOE_LIT_FP4_DECODE=portable` is set before import) the bf16 path decodes with packed integer work in a few lines of PTX (`_e2m1_bf16_pairs`, through
# `tl.inline_asm_elementwise` with `pack=4`): one asm block takes four code bytes in one 32-bit register — eight
# codes — and returns four registers of two bf16 each, already multiplied by their group scales. The scheme, per
# 16-bit half of a register (one byte's nibble `s e1 e0 m` becomes one bf16):
#
# ```
# code byte b            7 6 5 4 3 2 1 0            prmt: bytes b0, b1 into the two halves of a register
#                        (hi nib) (lo nib)                  (b2, b3 into a second one)
# lo = half & 0x000F     . . . . s e e m
# lo · 0x1040            = lo<<6 + lo<<12  (disjoint: bits 6-9 and 12-15, so no carries)
#   & 0x81C0             s . . . . . . e   e m . . . . . .     bf16: sign 15 | exponent 14-7 | mantissa 6-0
#                        = the bf16 whose value is e2m1(code) · 2^-126 (0.5 is a bf16 subnormal, 0 is 0)
# fma.rn.bf16x2 · 2^126  = e2m1(code), exact
# fma.rn.bf16x2 · scale  = e2m1(code) · scale, exact (≤ 2 significant bits times the scale's ≤ 4: fits bf16's 8)
# hi: (half & 0x00F0) · 0x0104 & 0x81C0, the same with the nibble 4 bits higher
# ```
#
# That is 22 instructions for eight codes (2 `prmt`, then per pair of codes `and`, `mul.lo`, `and` and two bf16x2
# `fma`), against about nine per code for the portable form (five integer operations, an fp16 → fp32 conversion, the
# fp32 scale multiply, the bf16 conversion). The block takes one scale register pair for the low nibbles and one for
# the high: in the plain layout a byte's two codes share a group (groups are 16 or 32 codes) and the same scales go
# in both; in the split64 layout (below, and `09a`) they are 32 codes apart, in different groups. The exactness claims are checked by the GPU tests against the float64 spec (random codes
# cover all sixteen, both nibbles; weights of max |w| from 1e-6 to 1e5). The PTX needs `sm_80` (bf16x2 `fma`; nothing
# checks the GPU's capability: on an older GPU set `MOE_LIT_FP4_DECODE=portable`); fp16 NVFP4 keeps
# the portable decode (its weights stay fp16, as the activations), and so do tiles under 2048 code bytes (4096
# codes: with `pack=4` the block needs four bytes a thread, and smaller tiles leave fewer than eight a thread at 8 warps).
#
# **The word decode (mma128).** The block above takes bytes, and Triton holds an 8-bit tensor one element a register:
# four `prmt` gather each 32-bit operand first, and where the compiler moved the tile into the MMA's register pattern
# before the decode (it does, to move fewer bytes) it read the bytes from shared memory two at a time. With the
# mma128 layout (`09a`) the codes are loaded as int32 words, one element each, and `_E2M1_WORD_MX` / `_E2M1_WORD_NV`
# decode a word into eight bf16 outputs (`=h` operands); the pairs it forms are the pairs the MMA takes (codes 0-1,
# 2-3, 4-5, 6-7 of a word), so `mov.b32 {lo, hi}` out and the compiler's pack back in cancel. The load placed each
# code's four bits where the decode takes them (`09a`'s `FP4_WORD_PAIRS` and its bit table), so no byte permute
# gathers them: pair 0 is one `and` with 0x81C081C0, pairs 1 and 2 a funnel-shift rotation of the word (10, 13 bits)
# and the `and`, pair 3 an `and`, a multiply by 2^3 + 2^8 + 2^14 and the `and` — eight integer operations for eight
# codes, where nibbles took fourteen (two `prmt`, then `and`, `mul.lo`, `and` a pair). The portable decode
# (`_word_pair`, `_pair_code`) follows the same recipe, so the interpreter's tests read the same words. The word's scale bytes come in as one 32-bit operand and are decoded inside the block: e8m0 by a
# multiply that places the byte in both halves' exponent fields; NVFP4's two e4m3 groups (a word's codes 0-3 and
# 4-7) by `cvt.rn.f16x2.e4m3x2` then `cvt.rn.bf16.f16`, exact both (e4m3 values are exact in fp16 and bf16). One
# operand chain beside the codes matters: with the two NVFP4 scales as separate operands, or decoded by Triton ops
# before the block, the compiler chose their layout for the decode and moved the decoded tile through shared memory
# again (seen in the TTGIR: a `convert_layout` of the bf16 tile). The tile then goes back to K order by `tl.join`,
# a reshape and a permute (`_fp4_mma_tile`), which lower to register renaming: in the sm_90 SASS of the contiguous
# GEMM1 (`nbs/bench/sass_fp4.py`, compiled for sm_90 without a GPU) the K loop has no `ldmatrix`, and only the two
# small stores and three barriers every layout's loop has (its `cp.async` pipeline), where a moved tile adds 8–16 of each.
#
# **The scale fold (MXFP4).** The first `fma` of each pair only multiplies by the constant 2^126. An e8m0 scale is a
# power of two, 2^(s − 127), so the block can build 2^(s − 1) = 2^(s − 127) · 2^126 instead (exponent field s + 126:
# a multiply and an add, where the unfolded block has a multiply and a `max`) and do one `fma` a pair:
# `_E2M1_WORD_MX_FOLDED`, four `fma`s for eight codes instead of eight, the same bits. That scale is a bf16 only for
# s ≤ 128 (scales up to 2), which a checkpoint's expert weights meet by far (their largest |w| would have to pass 16 for
# a byte past 128), but not every container does: `QuantizedExpertWeights` reads each weight's largest scale byte once,
# when it is built (`e8m0_max`), and the launcher passes `SCALE_FOLD` only where it is ≤ 128. Compiled for sm_90
# (`nbs/bench/sass_fp4.py`), the mma128 K loop of GEMM1 goes from 612 to 533 instructions a warp (76.5 → 66.6 issue
# cycles per KB of codes; 8 warps: 74.8 → 64.9), half of the `HMUL2`s gone. What remained was integer work: 149
# `LOP3` and 100 `IMAD` (the `and`s and the `mul.lo` that placed the bits). With the bits placed at load (above) the
# folded MXFP4 loop is 437 instructions (54.6 a KB; 8 warps 426, 53.2), the unfolded 516, NVFP4 folded 489 (61.1):
# 96 fewer a loop in every variant, `PRMT` 40 → 8, `LOP3` 149 → 101, `IMAD` 101 → 53 (`sass_fp4_sm90.log`). Timed
# on an H100 against the revision before it (64cc9b4, same process order, same inputs, `nbs/bench/fp4_ab_gpu.sh`,
# `fp4_ab_*_h100_57a349f.json`), GEMM1 + SiLU at decode is 0–6 % faster: DeepSeek-V3 EP8 MXFP4 contiguous 380.4 →
# 356.5 µs replayed, batched 365.0 → 354.5; Qwen3 111–121 µs, 2 % faster; Mixtral and gpt-oss within 1 %. The
# instructions went, the time mostly did not: at 45–62 % of the floor the loop is not bound by its issue slots
# alone. Of the rest, each of the loop's 16 `HGMMA`s (A from registers) is waited for before the
# next one issues (`WARPGROUP.DEPBAR.LE gsb0, 0x0`). ptxas says why (`ptxas -v` on the kernel's PTX, note C7515:
# "wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a
# wgmma between start and end of the pipeline stage"): with two or more stages Triton's pipeliner splits each dot
# whose A is in registers into 16-wide K slices, each followed by a `wgmma.wait_group` that names the accumulator
# (so the next slice's decode may overlap the MMA), and that wait is the non-wgmma definition. Compiled with
# `num_stages=1` the dots stay whole — two waits a loop, 359 instructions (44.9 a KB) — but then nothing
# prefetches the code words, and a prefetch written in the kernel (the words carried to the next iteration) gave
# them a layout that sent the decoded tile through shared memory (16 `STSM` + 16 `LDSM` a loop), so it is not
# kept. Which costs less on the GPU, the serialized MMAs or the exposed loads, is for the tuner: `14_bench`'s FP4
# candidates include one stage (`sass_fp4.py` prints both forms, "MMAs waited on"). A one-stage loop can still have
# its words on the way: `MOE_LIT_FP4_PREFETCH=n` (read at import; 0, the default, as measured below) makes each iteration
# ask L2 for the code words n K tiles ahead (`prefetch.global.L2`, one a row: two `CCTL`s a loop, no register, no
# layout). `nbs/bench/fp4_stages.py` (`quant_gpu.sh stages`) times the table's tile, one stage, and one stage with
# the prefetch 2 and 4 tiles ahead, eager and replayed, against the floor. **Measured (H100, 57a349f,
# `fp4_stages_h100_57a349f.jsonl`): the serialized MMAs cost less than the exposed loads.** One stage is slower on
# every row, both schemes, both formats: replayed, Qwen3 MXFP4 batched 110.6 → 124.9 µs, Mixtral 268.5 → 317.0,
# DeepSeek-V3 NVFP4 batched 390.3 → 544.1 (65 → 58 %, 62 → 53 %, 47 → 33 % of the floor). The L2 prefetch two tiles
# ahead gives back a part on the largest rows (DeepSeek-V3 NVFP4 batched 544.1 → 444.0) and nothing on the rest
# (Mixtral 317.0 → 342.0). So the tables keep their staged tiles and the prefetch stays off; the tuner may still
# pick one stage where it wins.
#
# **The issue budget, counted without a GPU.** The folded MXFP4 mma128 loop of the tuned tile (32 rows, 64 weight
# rows, 4 warps, 3 stages) is 437 instructions an iteration for 8 KB of codes (gate and up). The decode is 229 of them
# (`LOP3` 101, `HMUL2` 64, `SHF` 32, `IMAD` 32: about 14 a word of eight codes, the word's scale included). The MMAs
# take 48: 16 `HGMMA`, each between a `WARPGROUP.ARRIVE` and a `WARPGROUP.DEPBAR`. The rest is addressing, the
# `cp.async` pipeline and the scale bytes.
#
# - **Issue rate.** An SM issues four warp-instructions a clock, so this loop moves at most 8192 / 437 = 18.75 B of
#   codes a clock an SM. The floor asks for about 16 B/clk/SM on the H200 (4.24 TB/s over 132 SMs at about 2 GHz)
#   and 12–13 on the H100. At this count, 80 % of the H200's floor needs about 69 % of all issue slots. The measured
#   45–62 % of the floor is about 40–48 % of them.
# - **Occupancy.** The kernel holds 112 registers a thread and 41 KB of shared memory a program (the sm_90 binary
#   read by `cuobjdump -res-usage`; `nbs/bench/sass_fp4.py`, `sass_fp4_sm90.log`). That is 4 programs, 16 warps, an
#   SM: 4 warps a scheduler to hide each decode chain's latency. The 16-row tile has 80 registers and 29 KB, so 6
#   programs fit. Five stages need 73 KB, so only 3 programs fit, which may be why more stages never won the sweep. The 128-row, 8-warp tile's 146 registers leave
#   one program an SM.
# - **What follows.** Reaching 80 % needs fewer instructions a code and more warps to issue them.
#   - The tuner now tries `maxnreg=96` on the decode tiles (`14_bench`): no spill, 454 instructions, 5 programs.
#   - Nsight Compute's stall reasons (`nbs/bench/ncu_fp4.sh`) will say which of the two bounds it.
#   - `tl.range(..., disallow_acc_multi_buffer=True)` on this loop leaves the MMAs serialized (still 16 of 16 waited
#     on), so it is not used.
#
# **Measured with Nsight Compute (H100, 1fe07b0, `nbs/bench/ncu_fp4.sh`, `ncu_fp4_h100_1fe07b0.txt` and
# `ncu_fp4_stalls_h100_1fe07b0.txt`).** The batched GEMM1 at decode, each launch profiled with the clocks left alone.
# DeepSeek-V3 ran the heuristic's 64-row tile: no H100 table existed yet.
#
# | row | tile (rows × weight rows, stages) | registers | warps an SM | issued / scheduler / cycle | DRAM % of peak | µs |
# |---|---|---|---|---|---|---|
# | DeepSeek-V3 MXFP4 / NVFP4 | 64 × 64, 3 | 164 | 11.7 | 0.40 / 0.40 | 43.7 / 41.2 | 358 / 399 |
# | Mixtral MXFP4 / NVFP4 | 32 × 64, 3 | 112 | 14.7 | 0.46 / 0.48 | 55.9 / 55.5 | 273 / 289 |
# | Qwen3 MXFP4 / NVFP4 | 16 × 64, 3 | 78 | 22.4 | 0.48 / 0.51 | 60.9 / 57.7 | 113 / 122 |
# | bf16, the same rows | its table's | 128–138 | 7.8–11.7 | 0.08–0.10 | 89–90 | 269–636 |
#
# - **Neither issue nor occupancy is the bound.** The schedulers issue on 40–51 % of their cycles, and on the tuned
#   tiles more warps did not help: the register cap that gives 5 programs an SM instead of 4 (`maxnreg=96`) was
#   slower in the H100 sweep (DeepSeek-V3 383 µs against 323, Mixtral 303 against 282;
#   `tune_quant_w4a16_h100_1fe07b0.json`).
# - **Warps wait on each other.** DeepSeek-V3 MXFP4, 7.41 cycles between a warp's issues: 2.35 at a CTA barrier
#   (32 %: the `cp.async` pipeline's and the scale tile's `BAR`s), 1.06 on fixed-latency dependencies (the decode's
#   chains), 0.94 on shared-memory results, 0.54 on global loads, 0.30 on the MMAs.
# - **The scale bytes are loaded uncoalesced.** ncu counts 31 % of the L1 sector requests as excess: each thread's
#   four `LDG.E.U8` a loop touch one 32-byte sector per row for 4 useful bytes. Two fixes were compiled for sm_90
#   (`sass_fp4.py`) and not kept:
#   - a scale load shaped like the code words (each thread loads its own words' bytes): 518 instructions a loop
#     instead of 437, 5 barriers instead of 3, 57 KB of shared memory instead of 41;
#   - the scales stored group-major (row stride 1), so a warp's bytes are contiguous: two `LDG.E.U16`, but 5
#     barriers, 23 shared-memory loads instead of 11, and 136 registers instead of 112.
#
#   Both add barriers, the largest stall. What the profile points to instead is a K step with fewer CTA-wide barriers
#   (a producer warp that loads the tiles, the consumers waiting on its arrival alone), which this kernel does not have.
# - **Triton's own warp specialization does not give it.** `nbs/bench/ws_toy_sm90.py` compiles a toy of this loop for
#   sm_90: code words and activations through tensor descriptors (TMA), an inline-PTX decode, the decoded tile as the
#   MMA's left operand. `tl.range(..., warp_specialize=True)` compiles, but its loops hold 30–43 `BAR`s and 41–44
#   mbarrier operations, against 10–15 `BAR`s without it (`ws_toy_sm90.log`); with plain pointer loads it does not
#   compile (the `NVGPUWarpSpecialization` pass fails). A producer/consumer K loop would have to be written below
#   Triton's `tl` level, e.g. in Gluon, with its barriers explicit.
#
# **NVFP4** folds too, for every scale: an e4m3 scale is at most 448 < 2^9, so times 2^118 it is still a bf16, and
# `_E2M1_WORD_NV_FOLDED` multiplies the two decoded scales by 2^118 once a word (two `fma`s) and then does one `fma` a
# pair: the decoded weights are `e2m1 · scale · 2^-8`, exact (the smallest, 0.5 · 2^-9 · 2^-8, is a normal bf16), and
# the epilogue multiplies the NVFP4 global scale by 2^8 — exact, a power of two. The portable word decode (the
# interpreter's, fp16's) carries the same 2^-8, so the CPU tests check the epilogue's factor too. Every mma128 NVFP4
# weight takes it (`SCALE_FOLD`); the sm_90 count goes from 617 to 585 instructions (77.1 → 73.1 cycles per KB).

# %%
#| export
FP4_DECODE = env_choice("MOE_LIT_FP4_DECODE", "ptx", ("ptx", "portable"))   # "ptx": the packed decode below (GPU only)
PACKED_DECODE = tl.constexpr(FP4_DECODE == "ptx" and not INTERPRET)   # the interpreter runs the portable one

def _e2m1_pair_ptx(src: str, high: bool, scale: str, dst: str,
                   folded: bool = False) -> str:   # `scale` already holds the 2^126: one fma, not two
    "PTX of one pair (the table above): the low (or high) nibbles of `src`'s two halves as bf16x2 times `scale`, into `dst`."
    mask, mul = ("0x00F000F0", "0x0104") if high else ("0x000F000F", "0x1040")
    return (f"and.b32 x, {src}, {mask};\nmul.lo.u32 x, x, {mul};\nand.b32 x, x, 0x81C081C0;\n"
            + ("" if folded else "fma.rn.bf16x2 x, x, c126, nz;\n") + f"fma.rn.bf16x2 {dst}, x, {scale}, nz;\n")

_E2M1X8_PTX = tl.constexpr("""
{
.reg .b32 t0, t1, x, z, c126, nz;
mov.b32 z, 0;
mov.b32 c126, 0x7E807E80;
mov.b32 nz, 0x80008000;
prmt.b32 t0, $4, z, 0x4140;
prmt.b32 t1, $4, z, 0x4342;
""" + _e2m1_pair_ptx("t0", False, "$5", "$0") + _e2m1_pair_ptx("t1", False, "$6", "$1")
    + _e2m1_pair_ptx("t0", True, "$7", "$2") + _e2m1_pair_ptx("t1", True, "$8", "$3") + "}\n")

@triton.jit
def _e2m1_bf16_pairs(b,      # uint8 codes, two a byte
                     s_lo,   # bf16 scale of each byte's low-nibble code
                     s_hi):  # bf16 scale of each byte's high-nibble code (the same tensor in the plain layout)
    """`(e2m1(b & 0xF) · s_lo, e2m1(b >> 4) · s_hi)` in bf16, eight codes per PTX block (exact: see the table above).

    Elementwise: `b` uint8 and `s_lo`, `s_hi` bf16 of one shape; returns two bf16 tensors of that shape (the low and
    the high nibbles' values). Inline PTX (`_E2M1X8_PTX`, four bytes a call): GPU only, called under `PACKED_DECODE`
    (the interpreter takes the portable decode). No constexprs."""
    return tl.inline_asm_elementwise(_E2M1X8_PTX, "=r,=r,=r,=r,r,r,r,r,r", [b, s_lo, s_hi],
                                     dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)

# %% [markdown]
# The PTX blocks run only on a GPU — the interpreter takes the portable branch — so the test below executes them on
# the CPU with `00_testing.emulate_ptx` and checks every output bit against the definition: the byte block
# `_E2M1X8_PTX` and both word blocks, on words whose nibbles take all sixteen codes at every position, with every
# e8m0 scale byte (0, whose 2^-127 is a bf16 subnormal, to 254) and every finite e4m3 scale byte.

# %%
#| test fp4_ptx_decode_blocks_bit_exact
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
e4m3 = lambda byte: float(torch.tensor([byte], dtype=torch.uint8).view(torch.float8_e4m3fn).float())
bits = lambda v: _bf16_bits(v)
g = torch.Generator().manual_seed(4)
cs = [[(v + 3 * j) % 16 for j in range(8)] for v in range(16)] + torch.randint(0, 16, (3, 8), generator=g).tolist()
words = fp4_codes_to_words(torch.tensor(cs, dtype=torch.uint8)).view(torch.int32).tolist()   # codes j of mma128 words:
words = [w & 0xFFFFFFFF for w in words]                # every code at every position, and random ones
for s_byte in range(255):                              # MXFP4: one e8m0 byte for the word's eight codes
    scale = 2.0 ** (s_byte - 127)
    for w, c in zip(words, cs):
        got = emulate_ptx(_E2M1_WORD_MX.value, [0] * 8 + [w, s_byte])[:8]
        want = [bits(E2M1[c[j]] * scale) for j in range(8)]
        assert got == want, (hex(w), s_byte, [hex(x) for x in got], [hex(x) for x in want])
        if s_byte <= 128:                              # the folded block: the 2^126 in the scale, one fma a pair
            got = emulate_ptx(_E2M1_WORD_MX_FOLDED.value, [0] * 8 + [w, s_byte])[:8]
            assert got == want, ("folded", hex(w), s_byte)
finite = [b for b in range(256) if b not in (0x7F, 0xFF)]
for k, lo in enumerate(finite):                        # NVFP4: codes 0-3 by the low e4m3 byte, 4-7 by the high one
    hi = finite[(k * 37 + 11) % len(finite)]
    for w, c in zip(words[k % 16::16], cs[k % 16::16]):
        got = emulate_ptx(_E2M1_WORD_NV.value, [0] * 8 + [w, lo | (hi << 8)])[:8]
        want = [bits(E2M1[c[j]] * e4m3(lo if j < 4 else hi)) for j in range(8)]
        assert got == want, (hex(w), lo, hi)
        got = emulate_ptx(_E2M1_WORD_NV_FOLDED.value, [0] * 8 + [w, lo | (hi << 8)])[:8]   # folded: times 2^-8, exact
        assert got == [bits(E2M1[c[j]] * e4m3(lo if j < 4 else hi) / 256) for j in range(8)], ("folded", hex(w), lo, hi)
for w in words[:6]:                                        # the byte block: four bytes, a scale per byte and nibble
    sl = [bits(2.0 ** e) for e in (-127, -3, 0, 5)]; sh = [bits(e4m3(b) * 2.0 ** -120) for b in (0x01, 0x38, 0x7E, 0xC3)]
    out = emulate_ptx(_E2M1X8_PTX.value, [0] * 4 + [w, sl[0] | sl[1] << 16, sl[2] | sl[3] << 16,
                                                        sh[0] | sh[1] << 16, sh[2] | sh[3] << 16])[:4]
    got = [(out[i // 2] >> (16 * (i % 2))) & 0xFFFF for i in range(4)] + [(out[2 + i // 2] >> (16 * (i % 2))) & 0xFFFF for i in range(4)]
    byte = [(w >> (8 * i)) & 0xFF for i in range(4)]
    want = [bits(E2M1[byte[i] & 0xF] * _bf16_value(sl[i])) for i in range(4)] + \
           [bits(E2M1[byte[i] >> 4] * _bf16_value(sh[i])) for i in range(4)]
    assert got == want, (hex(w), got, want)
qw = quantize_expert_weights(*random_expert_weights(2, 128, 64, seed=5), "mxfp4_w4a16")
test_eq(_weight_kernel_args(qw, "w13")["SCALE_FOLD"], True)               # random weights: scales far below 2
codes = qw.w13; E_, N_, K_ = codes.shape                                 # kept per layout: a tensor re-laid in place
codes.data = codes.transpose(1, 2).contiguous().transpose(1, 2)            # (same values, new strides) is seen
test_eq(_weight_kernel_args(qw, "w13")["w_strides"]["stride_wk"], N_)
big = dataclasses.replace(qw, w2_scale=qw.w2_scale.clone().index_fill_(0, torch.tensor([1], device=qw.w2_scale.device), 129))
test_eq((_weight_kernel_args(big, "w13")["SCALE_FOLD"], _weight_kernel_args(big, "w2")["SCALE_FOLD"]), (True, False))
big.w13_scale.fill_(200)                                                  # edited after its arguments were kept: the
check_quant_weights(big); test_eq(_weight_kernel_args(big, "w13")["SCALE_FOLD"], False)   # public entries check again
nv = quantize_expert_weights(*random_expert_weights(2, 128, 64), "nvfp4_w4a16")
test_eq((_weight_kernel_args(nv, "w13")["SCALE_FOLD"], _weight_kernel_args(nv.relayout("mma128"), "w13")["SCALE_FOLD"]),
        (False, True))                                                  # NVFP4: the word decode (mma128) always folds

# %%
#| export
@triton.jit
def _fp4_weight_tile(w_ptr,      # this expert's codes [N_w, K_pad/2] uint8, two e2m1 codes a byte (low nibble first)
                     s,          # [BLOCK_N, BLOCK_K/GROUP_K] uint8 scale bytes of this K tile (`_fp4_scales`, loaded ahead)
                     rows,       # [BLOCK_N] int, weight rows of the tile (gate rows, or up rows = gate + N_OUT)
                     row_ok,     # [BLOCK_N] bool
                     k0, K_W,    # first K index of the tile; stored bytes per row (K_pad/2)
                     stride_wn, stride_wk,
                     FMT: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DTYPE: tl.constexpr):
    "`[BLOCK_N, BLOCK_K]` weights of one K tile as stored (rows × K), decoded in registers: `e2m1(code) · scale` (NVFP4: without the global scale)."
    b = _fp4_codes(w_ptr, rows, row_ok, k0, K_W, stride_wn, stride_wk, BLOCK_K)
    if PACKED_DECODE and DTYPE == tl.bfloat16 and BLOCK_N * BLOCK_K >= 4096:               # GPU, bf16, >= 4 bytes a thread
        sb = tl.reshape(tl.broadcast_to(_scale_bf16(s, FMT)[:, :, None], (BLOCK_N, BLOCK_K // GROUP_K, GROUP_K // 2)),
                        (BLOCK_N, BLOCK_K // 2))                                             # a byte's group scale
        lo, hi = _e2m1_bf16_pairs(b, sb, sb)                                                # a byte: one group
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))                                 # k = 2·byte + nibble
    else:
        w = tl.join(_e2m1_fp16(b & 0xF), _e2m1_fp16(b >> 4))                                # [BLOCK_N, BLOCK_K/2, 2]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K // GROUP_K, GROUP_K)).to(tl.float32) * (_scale_f32(s, FMT) * 16384.0)[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K)).to(DTYPE)                                      # k = 2·byte + nibble

@triton.jit
def _fp4_codes(w_ptr, rows, row_ok, k0, K_W, stride_wn, stride_wk, BLOCK_K: tl.constexpr):
    "`[BLOCK_N, BLOCK_K/2]` uint8 code bytes of one K tile, as stored (either layout); 0 past the row or past K."
    offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    return tl.load(w_ptr + rows[:, None] * stride_wn + offs_b[None, :] * stride_wk,
                   mask=row_ok[:, None] & (offs_b < K_W)[None, :], other=0)

@triton.jit
def _fp4_scales(ws_ptr, rows, row_ok, k0, K_W, stride_wsn, stride_wsk, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                LAYOUT: tl.constexpr):
    """Scale bytes of the K tile at `k0`; 0 past the row or past K (a prefetch past the end reads nothing).

    `[BLOCK_N, BLOCK_K/GROUP_K]` uint8, one per group; with mma128 and 16-code groups (NVFP4) a 32-code chunk's two
    groups come as one uint16 (`[BLOCK_N, BLOCK_K/32]`, the first group in the low byte), as `_fp4_mma_tile` takes them."""
    if LAYOUT == 2 and GROUP_K == 16:
        offs_c = k0 // 32 + tl.arange(0, BLOCK_K // 32)
        s = tl.load(ws_ptr.to(tl.pointer_type(tl.uint16)) + rows[:, None] * (stride_wsn // 2) + offs_c[None, :],
                    mask=row_ok[:, None] & (offs_c < K_W // 16)[None, :], other=0)
    else:
        offs_g = k0 // GROUP_K + tl.arange(0, BLOCK_K // GROUP_K)
        s = tl.load(ws_ptr + rows[:, None] * stride_wsn + offs_g[None, :] * stride_wsk,
                    mask=row_ok[:, None] & (offs_g < 2 * K_W // GROUP_K)[None, :], other=0)
    return s

@triton.jit
def _scale_bf16(s, FMT: tl.constexpr):
    "Scale bytes -> bf16: e8m0 (FMT 2) is 2^(s − 127), the byte shifted into bf16's exponent; e4m3 placed in bf16 times 2^120."
    if FMT == 2: r = tl.maximum(s.to(tl.int32) << 7, 0x40).to(tl.int16).to(tl.bfloat16, bitcast=True)   # byte 0: 2^-127
    else:         # e4m3's sign, exponent and mantissa in bf16's fields: the value times 2^-120 (subnormals too), exact
        i = s.to(tl.int16)
        r = (((i & 0x80) << 8) | ((i & 0x7F) << 4)).to(tl.bfloat16, bitcast=True) * 1.329227995784916e36   # 2^120
    return r

@triton.jit
def _scale_f32(s, FMT: tl.constexpr):
    "Scale bytes -> fp32: e8m0 (FMT 2) is 2^(s − 127), the byte shifted into fp32's exponent; else e4m3 bits."
    if FMT == 2: r = tl.maximum(s.to(tl.int32) << 23, 0x400000).to(tl.float32, bitcast=True)   # byte 0: 2^-127
    else: r = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return r

@triton.jit
def _per_byte(s, BLOCK_N: tl.constexpr, C: tl.constexpr, GH: tl.constexpr, GROUP_K: tl.constexpr):
    "`[BLOCK_N, C, GH]` group scales of half chunks -> `[BLOCK_N, C·32]`, one per byte (byte j of a half: group j // GROUP_K)."
    return tl.reshape(tl.broadcast_to(s[:, :, :, None], (BLOCK_N, C, GH, GROUP_K)), (BLOCK_N, C * GH * GROUP_K))

@triton.jit
def _fp4_split_tile(w_ptr, s, rows, row_ok, k0, K_W,    # as `_fp4_weight_tile`, the codes in the split64 layout
                    stride_wn, stride_wk,
                    FMT: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DTYPE: tl.constexpr):
    "`(lo, hi)`, each `[BLOCK_N, BLOCK_K/2]`: the decoded K tile of split64 codes, lo at K = k0 + 64c + j, hi at K + 32."
    C: tl.constexpr = BLOCK_K // 64                                                         # chunks in the tile
    GH: tl.constexpr = 32 // GROUP_K                                                        # groups in half a chunk
    b = _fp4_codes(w_ptr, rows, row_ok, k0, K_W, stride_wn, stride_wk, BLOCK_K)
    s_lo, s_hi = tl.split(tl.permute(tl.reshape(s, (BLOCK_N, C, 2, GH)), (0, 1, 3, 2)))    # [BLOCK_N, C, GH] each
    if PACKED_DECODE and DTYPE == tl.bfloat16 and BLOCK_N * BLOCK_K >= 4096:
        lo, hi = _e2m1_bf16_pairs(b, _per_byte(_scale_bf16(s_lo, FMT), BLOCK_N, C, GH, GROUP_K),
                                  _per_byte(_scale_bf16(s_hi, FMT), BLOCK_N, C, GH, GROUP_K))
    else:
        lo = _e2m1_fp16(b & 0xF).to(tl.float32) * _per_byte(_scale_f32(s_lo, FMT) * 16384.0, BLOCK_N, C, GH, GROUP_K)
        hi = _e2m1_fp16(b >> 4).to(tl.float32) * _per_byte(_scale_f32(s_hi, FMT) * 16384.0, BLOCK_N, C, GH, GROUP_K)
    return lo.to(DTYPE), hi.to(DTYPE)

# %%
#| export
def _word_pair_ptx(recipe: tuple) -> str:
    "PTX: one pair of the word `$8` moved to `E2M1_BF16_MASK`'s bits into `x`, as `recipe` (`09a`'s `FP4_WORD_PAIRS`) says."
    if recipe[0] == "rot":
        return (f"shf.l.wrap.b32 x, $8, $8, {recipe[1]};\nand.b32 x, x, {E2M1_BF16_MASK:#x};\n" if recipe[1] else
                f"and.b32 x, $8, {E2M1_BF16_MASK:#x};\n")
    return f"and.b32 x, $8, {recipe[1]:#x};\nmul.lo.u32 x, x, {recipe[2]:#x};\nand.b32 x, x, {E2M1_BF16_MASK:#x};\n"

def _e2m1_word_body(folded: bool = False) -> str:
    "PTX: a word's eight codes times `slo` (codes 0-3) and `shi` (4-7) into $0..$7 (`folded`: the scales hold the 2^126)."
    return "".join(_word_pair_ptx(recipe) + ("" if folded else "fma.rn.bf16x2 x, x, c126, nz;\n")
                   + f"fma.rn.bf16x2 x, x, {'slo' if p < 2 else 'shi'}, nz;\nmov.b32 {{${2 * p}, ${2 * p + 1}}}, x;\n"
                   for p, recipe in enumerate(FP4_WORD_PAIRS)) + "}\n"

_E2M1_WORD_BODY = _e2m1_word_body()

_E2M1_WORD_MX = tl.constexpr("""
{
.reg .b32 x, slo, shi, c126, nz;
mov.b32 c126, 0x7E807E80;
mov.b32 nz, 0x80008000;
and.b32 x, $9, 0xFF;
mul.lo.u32 slo, x, 0x00800080;
max.u32 slo, slo, 0x00400040;
mov.b32 shi, slo;
""" + _E2M1_WORD_BODY)   # e8m0: the byte in both halves' exponent fields

_E2M1_WORD_MX_FOLDED = tl.constexpr("""
{
.reg .b32 x, slo, shi, nz;
mov.b32 nz, 0x80008000;
and.b32 x, $9, 0xFF;
mul.lo.u32 slo, x, 0x00800080;
add.u32 slo, slo, 0x3F003F00;
mov.b32 shi, slo;
""" + _e2m1_word_body(folded=True))   # exponent field s + 126: 2^(s-127) · 2^126 (a bf16 for s <= 128), no max: s = 0 is 2^-1

_NV_SCALES_PTX = """cvt.u16.u32 p, $9;
cvt.rn.f16x2.e4m3x2 x, p;
mov.b32 {fl, fh}, x;
cvt.rn.bf16.f16 bl, fl;
cvt.rn.bf16.f16 bh, fh;
mov.b32 slo, {bl, bl};
mov.b32 shi, {bh, bh};
"""   # a word's two e4m3 scale bytes (codes 0-3, 4-7): f16x2, then bf16, each in both halves of slo / shi (exact)

_E2M1_WORD_NV = tl.constexpr("""
{
.reg .b32 x, slo, shi, c126, nz;
.reg .b16 p, fl, fh, bl, bh;
mov.b32 c126, 0x7E807E80;
mov.b32 nz, 0x80008000;
""" + _NV_SCALES_PTX + _E2M1_WORD_BODY)

_E2M1_WORD_NV_FOLDED = tl.constexpr("""
{
.reg .b32 x, slo, shi, c118, nz;
.reg .b16 p, fl, fh, bl, bh;
mov.b32 c118, 0x7A807A80;
mov.b32 nz, 0x80008000;
""" + _NV_SCALES_PTX + """fma.rn.bf16x2 slo, slo, c118, nz;
fma.rn.bf16x2 shi, shi, c118, nz;
""" + _e2m1_word_body(folded=True))   # both scales times 2^118 (<= 448 · 2^118 < 2^127): the decode's values carry 2^-8

@triton.jit
def _e2m1_word(x,       # int32 words of the mma128 layout: eight codes j = 4·j2 + 2·j1 + j0, bits where `09a` places them
               s,       # int32: each word's scale byte(s) as loaded (`_fp4_scales`): e8m0, or NVFP4's e4m3 pair (low byte first)
               FMT: tl.constexpr, DTYPE: tl.constexpr,
               SCALE_FOLD: tl.constexpr = False):   # the 2^126 rides in the scale: MXFP4 (every e8m0 byte <= 128) as
                                                    # it is; NVFP4 times 2^-8 (the kernel's epilogue gives it back)
    "Codes 0..7 of each word, decoded and scaled (codes 4-7 by the high byte's group with NVFP4), as eight `DTYPE` tensors."
    if PACKED_DECODE and DTYPE == tl.bfloat16:   # the scale bytes decode inside the block: one operand beside the codes
        if FMT == 2 and SCALE_FOLD: o = tl.inline_asm_elementwise(_E2M1_WORD_MX_FOLDED, "=h,=h,=h,=h,=h,=h,=h,=h,r,r",
                                                                  [x, s], dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        elif FMT == 2: o = tl.inline_asm_elementwise(_E2M1_WORD_MX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [x, s],
                                                     dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        elif SCALE_FOLD: o = tl.inline_asm_elementwise(_E2M1_WORD_NV_FOLDED, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [x, s],
                                                       dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else: o = tl.inline_asm_elementwise(_E2M1_WORD_NV, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [x, s],
                                            dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        r = (o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7])
    else:                                                         # the PTX block's pairs, then each half's code
        c: tl.constexpr = 64.0 if FMT == 3 and SCALE_FOLD else 16384.0       # the 2^14 of `_e2m1_fp16` (NVFP4 folded: 2^-8 too)
        s_lo = _scale_f32((s & 0xFF).to(tl.uint8), FMT) * c
        s_hi = s_lo
        if FMT == 3: s_hi = _scale_f32((s >> 8).to(tl.uint8), FMT) * c
        p0 = _word_pair(x, _ROT0, 0, 0)
        p1 = _word_pair(x, _ROT1, 0, 0)
        p2 = _word_pair(x, _ROT2, 0, 0)
        p3 = _word_pair(x, 0, _MUL3_M, _MUL3_K)
        r = (_pair_code(p0, 0, s_lo, DTYPE), _pair_code(p0, 16, s_lo, DTYPE), _pair_code(p1, 0, s_lo, DTYPE),
             _pair_code(p1, 16, s_lo, DTYPE), _pair_code(p2, 0, s_hi, DTYPE), _pair_code(p2, 16, s_hi, DTYPE),
             _pair_code(p3, 0, s_hi, DTYPE), _pair_code(p3, 16, s_hi, DTYPE))
    return r

assert [r[0] for r in FP4_WORD_PAIRS] == ["rot", "rot", "rot", "mul"], FP4_WORD_PAIRS   # the decodes' shape
_ROT0, _ROT1, _ROT2 = (tl.constexpr(r[1]) for r in FP4_WORD_PAIRS[:3])
_MUL3_M, _MUL3_K = (tl.constexpr(v) for v in FP4_WORD_PAIRS[3][1:])
_BF16_MASK_I32 = tl.constexpr(E2M1_BF16_MASK - (1 << 32))               # the same bits as an int32

@triton.jit
def _word_pair(x, ROT: tl.constexpr, M: tl.constexpr, K: tl.constexpr):
    "int32 words with one pair's bits where `E2M1_BF16_MASK` keeps them: the word rotated left by `ROT`, or its bits `M` times `K`."
    if M == 0:
        if ROT != 0: x = (x << ROT) | (x.to(tl.uint32, bitcast=True) >> (32 - ROT)).to(tl.int32, bitcast=True)
    else: x = ((x & M).to(tl.int64) * K).to(tl.int32)      # mod 2^32 (a 32-bit product would trip overflow checks)
    return x & _BF16_MASK_I32

@triton.jit
def _pair_code(p, HALF: tl.constexpr, s, DTYPE: tl.constexpr):
    "The portable decode of the code in one half (`HALF` 0 or 16) of placed pairs `p`, times its fp32 scale `s` (with the 2^14), as `DTYPE`."
    code = ((p >> (HALF + 12)) & 8) | ((p >> (HALF + 6)) & 7)              # sign from bit 15, e e m from 8-6
    return (_e2m1_fp16(code).to(tl.float32) * s).to(DTYPE)

FP4_PREFETCH = int(env_choice("MOE_LIT_FP4_PREFETCH", "0", ("0", "1", "2", "4", "8")))
FP4_PREFETCH = tl.constexpr(0 if INTERPRET else FP4_PREFETCH)
# mma128 K tiles ahead whose code words the FP4 K loop asks L2 for (`_prefetch_words`; 0: none, the default until
# the GPU has timed it: an experiment for one-stage tiles, whose loop pipelines no load; read at import)

@triton.jit
def _prefetch_words(w_ptr, rows, row_ok, k0, K_W, stride_wn):
    "Ask L2 for each row's mma128 words of the K tile at `k0` (`prefetch.global.L2`: a hint, nothing read or waited for)."
    ok = row_ok & (k0 // 2 < K_W)
    p = w_ptr + tl.where(ok, rows * stride_wn + k0 // 2, 0)                 # a row's first byte of the tile, or the base
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.u32 $0, 0;", "=r,l", [p], dtype=tl.int32, is_pure=False,
                              pack=1)

@triton.jit
def _fp4_mma_tile(w_ptr, s, rows, row_ok, k0, K_W, stride_wn,   # as `_fp4_weight_tile`, the codes in the mma128 layout
                  FMT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DTYPE: tl.constexpr,
                  SCALE_FOLD: tl.constexpr = False):
    "`[BLOCK_N, BLOCK_K]` decoded weights in K order from mma128 words (BLOCK_K a multiple of 128): no shuffle reaches the MMA."
    T: tl.constexpr = BLOCK_K // 128                                                        # 128-code chunks in the tile
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    x = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + rows[:, None] * (stride_wn // 4) + offs_w[None, :],
                mask=row_ok[:, None] & (offs_w < K_W // 4)[None, :], other=0)                 # [BLOCK_N, BLOCK_K/8] words
    # word 4t + c of a chunk holds codes of the chunk's 32-code piece c: its scale byte(s), repeated over t
    sw = tl.reshape(tl.broadcast_to(tl.reshape(s.to(tl.int32), (BLOCK_N, T, 1, 4)), (BLOCK_N, T, 4, 4)), (BLOCK_N, BLOCK_K // 8))
    o = _e2m1_word(x, sw, FMT, DTYPE, SCALE_FOLD)
    # joins stack on a new last axis: [..., j2, j1, j0] holds code 4·j2 + 2·j1 + j0; the words' (t, c) order then
    # goes back to K = 128·chunk + 32c + 16·j2 + 8·j1 + 2t + j0 with a reshape and a permute (registers only)
    w = tl.join(tl.join(tl.join(o[0], o[4]), tl.join(o[2], o[6])), tl.join(tl.join(o[1], o[5]), tl.join(o[3], o[7])))
    w = tl.permute(tl.reshape(w, (BLOCK_N, T, 4, 4, 2, 2, 2)), (0, 1, 3, 4, 5, 2, 6))       # (n, chunk, c, j2, j1, t, j0)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))

# %%
#| export
@triton.jit
def _fp4_k_order_tile(w_ptr, s, rows, row_ok, k0, K_W, stride_wn, stride_wk,   # the decoded tile in K order, either
                      FMT: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DTYPE: tl.constexpr, LAYOUT: tl.constexpr,               # way the bytes come: mma128 or plain
                      SCALE_FOLD: tl.constexpr = False):
    "`[BLOCK_N, BLOCK_K]` weights of one K tile in K order: `_fp4_mma_tile` (LAYOUT 2) or `_fp4_weight_tile` (plain)."
    if LAYOUT == 2: w = _fp4_mma_tile(w_ptr, s, rows, row_ok, k0, K_W, stride_wn, FMT, BLOCK_N, BLOCK_K, DTYPE, SCALE_FOLD)
    else: w = _fp4_weight_tile(w_ptr, s, rows, row_ok, k0, K_W, stride_wn, stride_wk, FMT, GROUP_K, BLOCK_N, BLOCK_K, DTYPE)
    return w

# %%
#| export
@triton.jit
def _quant_output_scales(acc,        # [BLOCK_M, BLOCK_N] fp32
                         a_s_row,    # [BLOCK_M] fp32 activation scale per row (FMT 0; per-tensor: all equal)
                         ws_ptr,     # this expert's weight scales
                         gs,         # fp32 NVFP4 global scale of this expert (FMT 3)
                         rows, row_ok, stride_wsn, FMT: tl.constexpr):
    "The scales that are constant along K, applied once after the loop."
    if FMT == 0:                                                  # per-tensor (stride 0) or per-channel weight scale
        w_s = tl.load(ws_ptr + rows * stride_wsn, mask=row_ok, other=0.0)
        acc = acc * a_s_row[:, None] * w_s[None, :]
    if FMT == 3:
        acc = acc * gs
    return acc

# %%
#| export
@triton.jit
def _quant_tile_product(a_rows,     # [BLOCK_M] pointers to the tile's activation rows at K = 0
                        as_ptrs,    # [BLOCK_M] pointers to the rows' activation scales (w8a8)
                        row_ok,     # [BLOCK_M] bool: rows that exist (valid rows / non-sentinel pairs)
                        w_e, ws_e, gs_ptr, e,   # this expert's codes and scales, the global scales, the expert
                        offs_n, mask_n, K, K_W, N_OUT,
                        kt_lo, kt_hi,   # the K tiles this program sums: [kt_lo, kt_hi) (all of K without split-K)
                        stride_ak, stride_asg, stride_wn, stride_wk, stride_wsn, stride_wsk,
                        FMT: tl.constexpr, GATED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                        GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr,
                        LAYOUT: tl.constexpr,   # FP4 byte order (`09a`): 0 plain, 1 split64 (two MMAs a K tile), 2 mma128
                        QUANT_A: tl.constexpr,  # 16-bit a quantized here: 1 each K tile a 1×GROUP_K group (FMT 1),
                                                # 2 per token (FMT 0: the row's |max| over K first); 0 a as
                                                # given: e4m3 for FP8 (FMT 0, 1), 16-bit for FP4 (FMT >= 2)
                        SCALE_FOLD: tl.constexpr = False):   # the word decode's one-fma form (MXFP4 with e8m0
                                                                     # bytes <= 128, NVFP4 in mma128)
    """Both formats' main loop: `(acc, acc_up)` of one output tile over K tiles `[kt_lo, kt_hi)`, every scale applied
    (real-valued fp32).

    Inputs as commented; returns two `[BLOCK_M, BLOCK_N]` fp32 tiles (acc_up zeros unless GATED), rows not `row_ok`
    read as 0. FP8 takes a K step per tile (`_quant_k_step`); FP4 decodes the weight tile and computes outᵀ = W · aᵀ.
    Constexprs: `FMT` 0 FP8 tensor/channel, 1 FP8 block, 2 MXFP4, 3 NVFP4; `GATED` also the up half (weight rows +
    N_OUT); `UPCAST` 16-bit activations to fp32 (the interpreter); `PRECISION` `tl.dot` input precision ("ieee" with
    UPCAST, else "tf32"); `GROUP_N`, `GROUP_K` the weight scale group (block FP8's block_shape, FP4's 1 × 32 or 1 × 16,
    else 1 × 1); `BLOCK_M`, `BLOCK_N`, `BLOCK_K` tile sizes; `LAYOUT` FP4 byte order (0 plain, 1 split64, 2 mma128);
    `QUANT_A` 16-bit a quantized here (1 per K tile, FMT 1; 2 per token, FMT 0; 0 none); `SCALE_FOLD` the word decode's
    folded form (set for MXFP4 with e8m0 bytes <= 128 and for NVFP4 in mma128)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_rows[:, None] + (kt_lo * BLOCK_K + offs_k)[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_s = tl.full((BLOCK_M,), 1.0, tl.float32)
    if FMT >= 2:                                                  # FP4: swap the operands, out^T = W · a^T
        accT = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        accT_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        offs_j = tl.arange(0, BLOCK_K // 2)
        offs_lo = (offs_j // 32) * 64 + offs_j % 32                                          # K of the low nibbles (split64)
        # The scale bytes are loaded one K tile ahead: a plain load whose value the decode needs at once would stall
        # every iteration for a DRAM round trip (the codes and activations are pipelined by the compiler, the scales,
        # which reach the MMA only through the decode, are not).
        s_g = _fp4_scales(ws_e, offs_n, mask_n, kt_lo * BLOCK_K, K_W, stride_wsn, stride_wsk, GROUP_K, BLOCK_K, LAYOUT)
        s_u = s_g
        if GATED: s_u = _fp4_scales(ws_e, offs_n + N_OUT, mask_n, kt_lo * BLOCK_K, K_W, stride_wsn, stride_wsk, GROUP_K,
                                    BLOCK_K, LAYOUT)
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            s_g_next = _fp4_scales(ws_e, offs_n, mask_n, k0 + BLOCK_K, K_W, stride_wsn, stride_wsk, GROUP_K, BLOCK_K, LAYOUT)
            s_u_next = s_g_next
            if GATED:
                s_u_next = _fp4_scales(ws_e, offs_n + N_OUT, mask_n, k0 + BLOCK_K, K_W, stride_wsn, stride_wsk,
                                       GROUP_K, BLOCK_K, LAYOUT)
            if LAYOUT == 2 and FP4_PREFETCH > 0:                   # (off by default: MOE_LIT_FP4_PREFETCH)
                _prefetch_words(w_e, offs_n, mask_n, k0 + FP4_PREFETCH * BLOCK_K, K_W, stride_wn)
                if GATED: _prefetch_words(w_e, offs_n + N_OUT, mask_n, k0 + FP4_PREFETCH * BLOCK_K, K_W, stride_wn)
            if LAYOUT == 1:                                       # split64: lo nibbles · a[64c + j], hi · a[64c + 32 + j]
                aT_lo = tl.load(a_rows[None, :] + (k0 + offs_lo)[:, None] * stride_ak,
                                mask=row_ok[None, :] & (k0 + offs_lo < K)[:, None], other=0.0)   # [BLOCK_K/2, BLOCK_M]
                aT_hi = tl.load(a_rows[None, :] + (k0 + 32 + offs_lo)[:, None] * stride_ak,
                                mask=row_ok[None, :] & (k0 + 32 + offs_lo < K)[:, None], other=0.0)
                if UPCAST: aT_lo, aT_hi = aT_lo.to(tl.float32), aT_hi.to(tl.float32)
                elif FMT == 2: aT_lo, aT_hi = aT_lo.to(tl.bfloat16), aT_hi.to(tl.bfloat16)
                w_lo, w_hi = _fp4_split_tile(w_e, s_g, offs_n, mask_n, k0, K_W, stride_wn, stride_wk,
                                             FMT, GROUP_K, BLOCK_N, BLOCK_K, aT_lo.dtype)
                accT = tl.dot(w_lo, aT_lo, accT, input_precision=PRECISION)
                accT = tl.dot(w_hi, aT_hi, accT, input_precision=PRECISION)
                if GATED:
                    w_lo, w_hi = _fp4_split_tile(w_e, s_u, offs_n + N_OUT, mask_n, k0, K_W, stride_wn, stride_wk,
                                                 FMT, GROUP_K, BLOCK_N, BLOCK_K, aT_lo.dtype)
                    accT_up = tl.dot(w_lo, aT_lo, accT_up, input_precision=PRECISION)
                    accT_up = tl.dot(w_hi, aT_hi, accT_up, input_precision=PRECISION)
            else:                                                 # K order: plain bytes, or mma128 words
                aT = tl.trans(tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0))   # [BK, BM]
                if UPCAST: aT = aT.to(tl.float32)
                elif FMT == 2: aT = aT.to(tl.bfloat16)          # e8m0 scales reach 2^±127: fp16 weights would not hold them
                w = _fp4_k_order_tile(w_e, s_g, offs_n, mask_n, k0, K_W, stride_wn, stride_wk, FMT, GROUP_K, BLOCK_N,
                                      BLOCK_K, aT.dtype, LAYOUT, SCALE_FOLD)
                accT = tl.dot(w, aT, accT, input_precision=PRECISION)
                if GATED:
                    w = _fp4_k_order_tile(w_e, s_u, offs_n + N_OUT, mask_n, k0, K_W, stride_wn, stride_wk, FMT, GROUP_K,
                                          BLOCK_N, BLOCK_K, aT.dtype, LAYOUT, SCALE_FOLD)
                    accT_up = tl.dot(w, aT, accT_up, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_ak
            s_g, s_u = s_g_next, s_u_next
        acc, acc_up = tl.trans(accT), tl.trans(accT_up)
    else:                                                         # FP8: e4m3 operands, scales per K tile
        # FMT 1: the K tile's activation and weight scales are loaded one tile ahead (see the FP4 branch)
        w_s = tl.zeros((BLOCK_N,), tl.float32)
        w_s_up = w_s
        if FMT == 1:
            k_lo = kt_lo * BLOCK_K
            if QUANT_A != 1: a_s = tl.load(as_ptrs + (k_lo // GROUP_K) * stride_asg, mask=tl.where(k_lo < K, row_ok, False), other=0.0)
            w_s = _fp8_tile_scales(ws_e, offs_n, mask_n, k_lo, K, stride_wsn, stride_wsk, GROUP_N, GROUP_K)
            if GATED: w_s_up = _fp8_tile_scales(ws_e, offs_n + N_OUT, mask_n, k_lo, K, stride_wsn, stride_wsk, GROUP_N,
                                                GROUP_K)
        if QUANT_A == 2:                                          # per token: each row's |max| over all of K first
            amax = tl.zeros((BLOCK_M,), tl.float32)               # (every split reads the whole row: one scale)
            bad = tl.zeros((BLOCK_M,), tl.int32)
            p = a_rows[:, None] + offs_k[None, :] * stride_ak
            for kt0 in range(0, tl.cdiv(K, BLOCK_K)):
                x = tl.load(p, mask=row_ok[:, None] & (offs_k < K - kt0 * BLOCK_K)[None, :], other=0.0).to(tl.float32)
                m, nan_row = _fp8_row_amax(x)
                amax, bad = tl.maximum(amax, m), bad | nan_row.to(tl.int32)
                p += BLOCK_K * stride_ak
            a_s = _fp8_row_scales(amax, bad > 0, BLOCK_M)         # `09b`'s: the same scale as its token mode
        for kt in range(kt_lo, kt_hi):
            k0 = kt * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & (offs_k < K - k0)[None, :], other=0.0)
            if UPCAST: a = a.to(tl.float32)
            if QUANT_A == 1:                                      # the tile is the rows' scale group: `09b`'s bits
                a, a_s = _fp8_quantize_group(a.to(tl.float32), BLOCK_M, BLOCK_K, EMULATE_E4M3)
            if QUANT_A == 2:                                      # the row's scale, from the pass above
                a = _fp8_scaled(a.to(tl.float32), a_s, BLOCK_M, BLOCK_K, EMULATE_E4M3).to(tl.float8e4nv)
            a_s_next, w_s_next, w_s_up_next = a_s, w_s, w_s_up
            if FMT == 1:
                kn = k0 + BLOCK_K
                if QUANT_A != 1:
                    a_s_next = tl.load(as_ptrs + (kn // GROUP_K) * stride_asg, mask=tl.where(kn < K, row_ok, False), other=0.0)
                w_s_next = _fp8_tile_scales(ws_e, offs_n, mask_n, kn, K, stride_wsn, stride_wsk, GROUP_N, GROUP_K)
                if GATED:
                    w_s_up_next = _fp8_tile_scales(ws_e, offs_n + N_OUT, mask_n, kn, K, stride_wsn, stride_wsk,
                                                   GROUP_N, GROUP_K)
            acc = _quant_k_step(acc, a, a_s, w_s, w_e, offs_n, mask_n, k0, K_W, stride_wn, stride_wk, FMT, BLOCK_K,
                                PRECISION)
            if GATED:
                acc_up = _quant_k_step(acc_up, a, a_s, w_s_up, w_e, offs_n + N_OUT, mask_n, k0, K_W, stride_wn,
                                       stride_wk, FMT, BLOCK_K, PRECISION)
            a_s, w_s, w_s_up = a_s_next, w_s_next, w_s_up_next
            a_ptrs += BLOCK_K * stride_ak
    a_s_row = a_s
    if FMT == 0 and QUANT_A != 2: a_s_row = tl.load(as_ptrs, mask=row_ok, other=0.0)
    gs = 1.0
    if FMT == 3: gs = tl.load(gs_ptr + e)
    if FMT == 3 and LAYOUT == 2 and SCALE_FOLD: gs = gs * 256.0   # the folded word decode's 2^-8, given back exactly
    acc = _quant_output_scales(acc, a_s_row, ws_e, gs, offs_n, mask_n, stride_wsn, FMT)
    if GATED: acc_up = _quant_output_scales(acc_up, a_s_row, ws_e, gs, offs_n + N_OUT, mask_n, stride_wsn, FMT)
    return acc, acc_up

# %% [markdown]
# ## The batched format
#
# ### Spec
#
# The reference computes in float64 from the dequantized weights; for w8a8 it quantizes each expert's valid rows with
# `09_quant`'s `quantize_fp8` first (the same values the kernel's quantizer produces), so kernel and spec see the same
# fp8 activations and differ only by accumulation order and the output's rounding. `weight` picks `w13` or `w2`; left
# out, it is `w13` with a gated activation and `w2` without (the MoE's GEMM1 and GEMM2).
#
# `activation` is named as in `06`'s launchers: `None` for a plain GEMM, an `Activation` (`SILU`, or gpt-oss's
# `Activation("swigluoai", alpha, limit)`), or `"silu_and_mul"`, the older spelling of `SILU`. `bias` is the
# expert's bias row `[E, N]` (N = rows of the weight: `2·I` for `w13`, `H` for `w2`), added to the real-valued
# product — after every quantization scale — and before the activation. The activation is
# `moe_lit.formats.Activation` itself, the one definition the kernels are checked against.

# %%
#| export
def _which(weight, act: Activation | None) -> str:
    "The weight a GEMM reads: `weight` if given, else `w13` for a gated GEMM and `w2` for a plain one."
    return check_choice("weight", weight, ("w13", "w2")) if weight is not None else ("w13" if act else "w2")

def _dequantized_rows(x, qw, expert_num_tokens, a_scale, K, used=None) -> torch.Tensor:
    "float64 activations as the GEMM sees them: fp8 quantize-dequantize for w8a8 (emulated in torch), as is for w4a16."
    if not QUANT_SCHEME_TABLE[qw.scheme].is_fp8: return x.double()
    gran = ACTIVATION_GRANULARITY[qw.scheme]
    gk = qw.block_shape[1] if qw.block_shape else 128
    if used is not None and gran != "tensor" and x.dtype != torch.float8_e4m3fn:   # per-row scales: used rows only
        out = torch.full(x.shape, float("nan"), dtype=torch.float64, device=x.device)
        if used.any(): out[used] = _dequantized_rows(x[used], qw, None, None, K)
        return out
    q, s = (x, a_scale) if x.dtype == torch.float8_e4m3fn else fp8_quantize_activations_reference(x, gran, expert_num_tokens, gk)
    s = s.double()
    if gran == "group": s = s.repeat_interleave(gk, -1)[..., :K]
    return q.double() * s                                         # [.., rows, K]; tensor/token scales broadcast

def batched_gemm_quant_reference(a: torch.Tensor,                  # [E, max_tokens, K] bf16/fp16 (or fp8 with a_scale)
                                 qw: QuantizedExpertWeights,
                                 expert_num_tokens: torch.Tensor,  # [E] int32
                                 activation: Activation | str | None = None,  # None, an Activation or "silu_and_mul"
                                 weight: str | None = None,        # "w13" / "w2"; default by activation
                                 a_scale: torch.Tensor | None = None,  # pre-quantized a's scales (w8a8)
                                 bias: torch.Tensor | None = None, # [E, N] expert bias, added before the activation
                                ) -> torch.Tensor:                 # [E, max_tokens, N or N/2] float64, NaN past counts
    """Spec: `out[e, :n_e] = act(deq(quant(a[e, :n_e])) @ deq(W[e])ᵀ + bias[e])` in float64. ValueError naming
    `activation`, `weight`, `a` (not 3-D), `qw` (not a QuantizedExpertWeights) or `expert_num_tokens` (a count outside
    `[0, max_tokens]`, `slab_counts`), and (w8a8) `fp8_quantize_activations_reference`'s on `a`; `bias` is unchecked.
    Source: vLLM's
    `NaiveBatchedExperts` (dequantize, then a per-expert GEMM)."""
    act = check_activation(activation)
    which = _which(weight, act)
    if not isinstance(qw, QuantizedExpertWeights):
        raise ValueError(f"qw: expected a QuantizedExpertWeights, got {type(qw).__name__}")
    _, _, _, N, K = qw.weight_parts(which)
    check_tensor("a", a, ndim=3)
    E, M, _ = a.shape
    counts = slab_counts(expert_num_tokens, E, M)
    out = torch.full((E, M, N // 2 if act else N), float("nan"), dtype=torch.float64, device=a.device)
    ad = _dequantized_rows(a, qw, expert_num_tokens, a_scale, K)
    for e, n in enumerate(counts):
        if n == 0: continue
        y = ad[e, :n] @ qw.dequantize_weight(which, e, torch.float64).to(a.device).T
        if bias is not None: y = y + bias[e].double().to(a.device)
        out[e, :n] = act(y) if act else y
    return out

# %% [markdown]
# ### Kernel
#
# ```
# count = expert_num_tokens[e]; if m·BLOCK_M >= count: return          # before any weight or scale load
# for k0 in 0 .. K step BLOCK_K:
#     a   = A[e, m-tile, k-tile]              (float8 for w8a8, bf16/fp16 for w4a16; rows >= count read as 0)
#     a_s = a_scale[e, m-tile, k0/128]        (block scheme only)
#     acc    = _quant_k_step(acc,    a, a_s, gate rows n)
#     acc_up = _quant_k_step(acc_up, a, a_s, up rows n + N_OUT)        (GATED only; separate accumulators, triton#10821)
# acc (and acc_up) = _quant_output_scales(...)                           (tensor/channel scales; NVFP4 global scale)
# acc (and acc_up) += bias[e, n-tile] (and bias[e, N_OUT + n-tile])     (HAS_BIAS only; real-valued fp32 by now)
# out[e, valid rows, n-tile] = act(acc, acc_up)  or  acc                (act: SiLU-and-mul or clamped SwiGLU)
# ```
#
# **Grid** `(cdiv(max_tokens, BLOCK_M) · cdiv(N_out, BLOCK_N), E, SPLIT_K)`, N-tile major as in `06`; with
# `SPLIT_K > 1` (a decode batch that reaches few experts) each program sums its share of the K tiles and `06`'s
# `_split_k_sum` hands the whole sum to the last one, which runs the epilogue. Bytes per active expert:
# the weight codes `N·K` (fp8) or `N·K/2` (FP4) plus scales, the activations `c·K` (fp8) or `2·c·K` (16-bit) per
# N-tile, the output `c·N_out` — at decode the codes dominate (a bias adds `N` values per active expert). **Constexprs**:
# `FMT` (the table above), `GATED` (a gated activation: the weight holds gate rows then up rows), `ACTIVATION`
# (`Activation.code`: 0 SiLU-and-mul, 1 gpt-oss's clamped SwiGLU with the runtime `alpha` and `limit`), `HAS_BIAS`,
# `UPCAST` (bf16 → fp32 after load in the interpreter; w4a16 only), `PRECISION`, `GROUP_N`/`GROUP_K` (the weight's
# scale group), `BLOCK_M/N/K`. Offsets inside an expert are int32 (checked by the launcher); the expert's base offset
# is int64.
#
# > **The epilogue is `06`'s.** After the K loop the accumulators hold the real-valued product — every weight and
# > activation scale and the NVFP4 global scale already applied — and the kernel calls the unquantized kernels'
# > helpers on them: `add_expert_bias`, then `gated_activation`. So the bias is never multiplied by a quantization
# > scale: for FP8 tensor/channel scales, which are applied after the loop, adding it to the raw fp8 products would
# > scale it by `a_scale · w_scale`. With `SILU` and no bias the constexprs drop the bias and clamp branches and the
# > bias pointer is `None`, so the default kernel is the plain SiLU-and-mul kernel — same instructions, same tiles,
# > same tuned tables (the keys do not include the activation or the bias).

# %%
#| export
@triton.jit
def _batched_moe_gemm_quant_kernel(
    a_ptr,          # [E, max_tokens, K] float8 (w8a8) or bf16/fp16 (w4a16); rows >= count never read
    as_ptr,         # activation scales: e·stride_ase + m·stride_asm + (k // GROUP_K)·stride_asg (w8a8)
    w_ptr,          # [E, N_w, K] float8 or [E, N_w, K_pad/2] uint8; N_w = N_OUT, or 2·N_OUT with GATED
    ws_ptr,         # weight scales: e·stride_wse + (n // GROUP_N)·stride_wsn + (k // GROUP_K)·stride_wsk
    gs_ptr,         # [E] fp32 NVFP4 global scales (FMT 3)
    c_ptr,          # [E, max_tokens, N_OUT]
    expert_num_tokens_ptr,   # [E] int32
    bias_ptr,       # [E, N_w] bf16/fp16/fp32, read as fp32 (None unless HAS_BIAS)
    part_ptr, lock_ptr,   # split-K workspace and counters (`_split_k_sum`; unused with SPLIT_K = 1)
    N_OUT, K, K_W, MAX_TOKENS, num_m_tiles, num_experts,
    alpha, limit,   # fp32, read only when ACTIVATION == 1
    stride_ae, stride_am, stride_ak, stride_ase, stride_asm, stride_asg, stride_we, stride_wn, stride_wk,
    stride_wse, stride_wsn, stride_wsk, stride_ce, stride_cm, stride_cn, stride_be, stride_bn,
    FMT: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr, SPLIT_K: tl.constexpr, COMPACT: tl.constexpr, BLOCK_E: tl.constexpr,
    QUANT_A: tl.constexpr, SCALE_FOLD: tl.constexpr = False,
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    "grid = (_cdiv(max_tokens, BLOCK_M)·_cdiv(N_OUT, BLOCK_N), E or the slots of `06`'s COMPACT, SPLIT_K); empty tiles exit."
    _await_producers(PDL)                                    # before any load or store
    pid, split = tl.program_id(0), tl.program_id(2)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    e, count = _slot_expert(expert_num_tokens_ptr, tl.program_id(1), num_experts, MAX_TOKENS, COMPACT, BLOCK_E)
    if pid_m * BLOCK_M >= count: return                           # empty tile: no weight is read
    e64 = e.to(tl.int64)                                          # E·N·K can pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < count, offs_n < N_OUT
    a_rows = a_ptr + e64 * stride_ae + offs_m * stride_am
    as_ptrs = as_ptr + e64 * stride_ase + offs_m * stride_asm
    w_e, ws_e = w_ptr + e64 * stride_we, ws_ptr + e64 * stride_wse
    n_kt = tl.cdiv(K, BLOCK_K)
    acc, acc_up = _quant_tile_product(a_rows, as_ptrs, mask_m, w_e, ws_e, gs_ptr, e, offs_n, mask_n, K, K_W, N_OUT,
                                      split * n_kt // SPLIT_K, (split + 1) * n_kt // SPLIT_K,
                                      stride_ak, stride_asg, stride_wn, stride_wk, stride_wsn, stride_wsk, FMT, GATED,
                                      UPCAST, PRECISION, GROUP_N, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, LAYOUT, QUANT_A,
                                      SCALE_FOLD)
    if SPLIT_K > 1:                                               # only the last split to arrive goes on
        tiles = tl.num_programs(0)
        acc, acc_up, last = _split_k_sum(acc, acc_up, part_ptr, lock_ptr, e * tiles + pid, tiles * num_experts,
                                         split, GATED, SPLIT_K, BLOCK_M, BLOCK_N)
        if not last: return
    if HAS_BIAS:                                                  # on the scaled (real-valued) fp32 product
        acc, acc_up = add_expert_bias(acc, acc_up, bias_ptr + e64 * stride_be, offs_n, mask_n, N_OUT, stride_bn, GATED)
    if GATED: acc = gated_activation(acc, acc_up, alpha, limit, ACTIVATION)   # fp32, cast once below
    c_ptrs = c_ptr + e64 * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

# %% [markdown]
# ### Launcher
#
# Shared plumbing for both formats: the weight's kernel arguments (scale strides with 0 for broadcast dimensions, so
# one address formula serves tensor, channel, block and FP4 scales), the activations (quantized here for w8a8 unless
# the caller hands in fp8 codes with their scales, as a quantize-before-dispatch all2all does), and the tile.
#
# Tiles come from `lookup_tile_config` under this chapter's kernel names — `batched_moe_gemm_fp8`,
# `batched_moe_gemm_w4a16`, `fused_moe_gemm_fp8`, `fused_moe_gemm_w4a16` — with `06`'s heuristic as the fallback.
# Three adjustments follow the formats: `BLOCK_K ≥ 32` (the fp8 MMA's K and the MXFP4 group), `BLOCK_K ≥ 64` for
# split64 FP4 codes (whole chunks) and, for the block scheme,
# `BLOCK_K ≤ 128` so a K tile never straddles two scale blocks (vLLM clamps the same way); FP4 caps `BLOCK_K` at 128
# to bound the registers of the dequantized tile.
#
# As `08`'s `_fused_plan` does for the 16-bit GEMMs, each launcher keeps a *launch plan* per shape
# (`_batched_quant_plan`, `_fused_quant_plan`: the tile, the split, every keyword argument that is not a tensor or
# the activations' strides), keyed by everything that work reads — the weight's facts (`_weight_kernel_args`'
# `static`), the sizes, the tile tables' folder and the split-K knobs — so a call after the first builds two dicts'
# worth of arguments instead of forty. On the CPU proxy of the host's work (`nbs/bench/host_overhead_cpu.py`, T = 1,
# launches stubbed) a quantized forward went from 89.5 to 75.4 µs (MXFP4, Qwen3-30B-A3B) and from 110–116 to 96 µs
# (FP8 block), 12–24 µs less on every deployment.

# %%
#| export
def _weight_kernel_args(qw: QuantizedExpertWeights, which: str) -> dict:
    """The weight's tensors, scale strides (0 where a scale broadcasts), their stride keywords and constexprs, as the
    kernels take them; worked out once per container, weight and layout of its tensors and kept on it (a forward asks
    three times). Shared: callers read it and never change it."""
    kept = qw.__dict__.setdefault("_kernel_args", {})
    codes, scale = getattr(qw, which), getattr(qw, which + "_scale")   # (a tensor's .data reassigned in place: new key)
    key = (which, codes.data_ptr(), codes.stride(), scale.data_ptr(), scale.stride())
    if key not in kept: kept[key] = _weight_kernel_args_of(qw, which)
    return kept[key]

def _weight_kernel_args_of(qw: QuantizedExpertWeights, which: str) -> dict:
    "`_weight_kernel_args`, worked out."
    codes, scale, gs, N, K = qw.weight_parts(which)
    if qw.scheme == "fp8_w8a8_tensor": strides = (scale.stride(0), 0, 0)
    elif qw.scheme == "fp8_w8a8_channel": strides = (scale.stride(0), scale.stride(1), 0)
    else: strides = scale.stride()
    gn, gk = qw.block_shape or (1, 1)
    if qw.scheme == "nvfp4_w4a16": scale = scale.view(torch.uint8)   # loaded as bytes, bit-cast to e4m3 in the kernel
    fold = (qw.e8m0_max is not None and qw.e8m0_max[which] <= 128 or    # read once, at the container's construction
            qw.scheme == "nvfp4_w4a16" and qw.fp4_layout == "mma128")    # any e4m3 scale: times 2^118 fits bf16
    args = dict(codes=codes, scale=scale, gs=gs if gs is not None else scale, scale_strides=strides,
                w_strides={**_named_strides("w", "enk", codes.stride()), **_named_strides("ws", "enk", strides)},
                GROUP_N=gn, GROUP_K=gk, N=N, K=K, K_W=codes.shape[2], FMT=_FMT[qw.scheme],
                LAYOUT=FP4_LAYOUTS.index(qw.fp4_layout),   # mma128's 4-byte alignment: checked by the container
                SCALE_FOLD=fold, ACT_GRAN=ACTIVATION_GRANULARITY.get(qw.scheme))   # FP8: the activations' scales
    args["static"] = tuple((k, tuple(v.items()) if isinstance(v, dict) else v) for k, v in args.items()   # its facts
                           if not isinstance(v, torch.Tensor))   # other than tensors: what a launch plan is keyed by
    return args

def check_quant_tile_config(config, need_block_m: bool = False) -> dict | None:
    """A quantized GEMM's tile override: `06`'s checks, and no switch these kernels do not have (TMA, WARP_SPECIALIZE,
    GROUP_M: ValueError). Source: moe-lit's own (vLLM's counterpart is `override_config`)."""
    if isinstance(config, dict):
        for key in ("TMA", "WARP_SPECIALIZE", "GROUP_M"):
            if config.get(key):
                raise ValueError(f"config[{key!r}]: expected it absent or off (the quantized GEMMs have no such variant), "
                                 f"got {config[key]!r}")
    return check_tile_config(config, need_block_m=need_block_m)

def _split_target(fmt: int) -> float:
    "The split-K target of a quantized kernel (`FMT`): `06`'s table, FP4's or FP8's entry."
    return SPLIT_K_PROGRAMS_PER_SM["fp4" if fmt >= 2 else "fp8"]

def _named_strides(tensor: str, dims: str, strides) -> dict:
    "Strides as the kernels' keywords: `_named_strides('a', 'emk', (s0, s1, s2))` -> `stride_ae`, `stride_am`, `stride_ak`."
    return {f"stride_{tensor}{d}": int(st) for d, st in zip(dims, strides, strict=True)}

def fp4_default_tile(E: int, N: int, K: int, M: int, dtype) -> dict:
    """Heuristic tile of the FP4 GEMMs (operands swapped): one M tile per expert, 64 weight rows, 128-wide K steps at
    decode. ValueError from `default_tile_config` naming `E`, `N`, `K` (< 1) or `M` (< 0); `dtype` is not checked.
    Source: moe-lit's own heuristic (one Hopper warp group per 64 weight rows)."""
    cfg = default_tile_config(E, N, K, M, dtype)
    if INTERPRET or M > 64: return cfg
    return dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)   # one warp group: 64 rows

def _quant_tile(kernel: str, E: int, N: int, K: int, M: int, dtype, fmt: int, group_k: int, silu: bool,
                config: dict | None,
                block_m: int | None = None,     # the contiguous GEMMs: the alignment's block is the tile's BLOCK_M
                layout: int = 0) -> dict:       # FP4 byte order: 1 split64 (BLOCK_K whole 64-code chunks), 2 mma128 (128)
    "The tile for a quantized GEMM: table or heuristic, then the format's BLOCK_K limits and the shared-memory fit."
    check_quant_tile_config(config, need_block_m=kernel.startswith("batched"))
    return dict(_quant_tile_resolved(kernel, E, N, K, M, dtype, fmt, group_k, silu,
                                     None if config is None else tuple(sorted(config.items())), block_m, layout,
                                     _tile_config_root()))

@functools.lru_cache(maxsize=1024)
def _quant_tile_resolved(kernel, E, N, K, M, dtype, fmt, group_k, silu, config_items, block_m, layout, config_dir) -> dict:
    "`_quant_tile`'s answer, resolved once per argument tuple (the launchers ask on every call)."
    name = f"{kernel}_{'fp8' if fmt < 2 else 'w4a16'}"
    cfg = dict(config_items) if config_items is not None else \
        lookup_tile_config(name, E, N, K, M, dtype if dtype in ACTIVATION_DTYPES else torch.bfloat16,
                           config_dir=config_dir, heuristic=fp4_default_tile if fmt >= 2 else None)
    cfg = dict(cfg)
    if block_m is not None: cfg["BLOCK_M"] = block_m                        # before the fit, which sizes by it
    if layout == 2: cfg["BLOCK_K"] = 128                                    # mma128: the layout's chunk is the K tile
    for key in ("TMA", "WARP_SPECIALIZE", "GROUP_M"): cfg.pop(key, None)     # the quantized kernels use none of them
    if not INTERPRET: cfg = fit_shared_memory(cfg, silu, 1 if fmt < 2 else 2)
    bk = max(32, cfg["BLOCK_K"])
    if fmt == 1: bk = min(bk, group_k)
    if fmt >= 2: bk = min(bk, 128)
    if layout == 1: bk = max(bk, 64)
    if layout == 2: bk = 128          # (the fit sizes FP4 codes as 2 bytes: 128 fits wherever its estimate gave less)
    cfg["BLOCK_K"] = bk
    return cfg

def quant_block_m(qw: QuantizedExpertWeights,   # the local experts' quantized weights
                  expected_m: int,              # expected rows per local expert (>= 1)
                  dtype: torch.dtype = torch.bfloat16,   # the activations' (and output's) dtype
                 ) -> int:                      # a power of two >= 16
    """The alignment block for the contiguous quantized GEMMs: BLOCK_M of GEMM1's tile (the scheme's tuned table, else
    the heuristic). ValueError naming `qw` (not a container), `dtype`, `expected_m` (< 1), or `quant_block_m` when a
    tile table's BLOCK_M is not a power of two in [16, 256]. Source: vLLM's `moe_align_block_size` takes its block
    from the tuned config's BLOCK_SIZE_M the same way (fused_moe.py)."""
    if not isinstance(qw, QuantizedExpertWeights):
        raise ValueError(f"qw: expected a QuantizedExpertWeights, got {type(qw).__name__}")
    check_choice("dtype", dtype, ACTIVATION_DTYPES)
    return _quant_block_m(_weight_kernel_args(qw, "w13")["static"], qw.num_experts,
                          check_int("expected_m", expected_m, lo=1), dtype, _tile_config_root())

@functools.lru_cache(maxsize=1024)
def _quant_block_m(static, E, expected_m, dtype, config_dir) -> int:
    "`quant_block_m` after its checks, resolved once per shape (the experts ask on every call)."
    wa = dict(static)
    bm = _quant_tile_resolved("fused_moe_gemm", E, wa["N"], wa["K"], expected_m, dtype, wa["FMT"], wa["GROUP_K"], True,
                              None, None, 0, config_dir)["BLOCK_M"]
    if not (16 <= bm <= 256 and bm & (bm - 1) == 0):                # a tile table's value: name where it came from
        kind = "fp8" if wa["FMT"] < 2 else "w4a16"
        raise ValueError(f"quant_block_m: expected GEMM1's BLOCK_M to be a power of two in [16, 256], got {bm} "
                         f"(from the fused_moe_gemm_{kind} tile table for E={E}, N={wa['N']} in "
                         f"{config_dir or 'the package configs'})")
    return bm

# %%
#| export
def _prepare_activations(a, qw, expert_num_tokens, a_scale, out_dtype, K, batched: bool):
    "`(a for the kernel, scale tensor, its (e, m, group) strides, output dtype)`; quantizes a for per-tensor w8a8 (one scale over all rows: its own pass)."
    scheme, rows = qw.scheme, a.shape[-2]
    if not QUANT_SCHEME_TABLE[scheme].is_fp8:
        check_tensor("a", a, dtype=ACTIVATION_DTYPES)
        if a_scale is not None: raise ValueError(f"a_scale: expected None for the weight-only scheme {scheme}, got a tensor")
        if out_dtype is not None and out_dtype != a.dtype:
            raise ValueError(f"out_dtype: expected {a.dtype} (a's dtype) for {scheme}, got {out_dtype}")
        return a, qw.w13_scale, (0, 0, 0), a.dtype
    gran, gk = ACTIVATION_GRANULARITY[scheme], (qw.block_shape or (1, 128))[1]
    check_tensor("a", a, dtype=(*ACTIVATION_DTYPES, torch.float8_e4m3fn))
    if a.dtype == torch.float8_e4m3fn:
        G = {"tensor": 1, "token": 1, "group": -(-K // gk)}[gran]
        lead = (a.shape[0],) if batched else ()
        want = (*lead, 1 if gran == "tensor" else rows, G)
        if a_scale is None: raise ValueError(f"a_scale: expected float32 scales of shape {list(want)} for fp8 a, got None")
        check_tensor("a_scale", a_scale, shape=want, dtype=torch.float32)
        out_dtype = torch.bfloat16 if out_dtype is None else check_choice("out_dtype", out_dtype, (*ACTIVATION_DTYPES, torch.float32))
    else:
        if a_scale is not None: raise ValueError(f"a_scale: expected None for {a.dtype} a (it is quantized here), got a tensor")
        if out_dtype is not None and out_dtype != a.dtype: raise ValueError(f"out_dtype: expected {a.dtype} (a's dtype), got {out_dtype}")
        out_dtype = a.dtype
        if gran in ("group", "token"): return a, a, (0, 0, 0), out_dtype   # a launch or the K loop (`_fp8_input`)
        a, a_scale = _fp8_quantize_activations(a, gran, expert_num_tokens if batched else None, gk)   # (checked: ours)
    st = a_scale.stride() if batched else (0, *a_scale.stride())
    st = (st[0] if batched else 0, 0 if gran == "tensor" else st[1], st[2] if gran == "group" else 0)
    return a, a_scale, st, out_dtype

FP8_ACT_QUANT = env_choice("MOE_LIT_FP8_ACT_QUANT", "launch", ("loop", "launch"))   # "launch": a quantizer first (faster
                                 # on every row measured, below); "loop": 1×128 groups quantized in the GEMMs' K loop

def fp8_activation_path(mode: str):      # "launch" or "loop": as MOE_LIT_FP8_ACT_QUANT would set it at import
    """Within the block, 16-bit input of the FP8 w8a8 GEMMs (`batched_moe_gemm_quant`, `fused_moe_gemm_quant` and the
    layer's experts) takes `mode`'s path: "launch", a quantizer launch first, or "loop", each 1×128 group quantized in
    the K loop (`FP8_ACT_QUANT`); the setting before is restored on exit. For comparing the two in one process. Not
    thread-safe (a module switch). ValueError naming `mode` for another value, when called. Source: moe-lit's own
    (vLLM quantizes in a separate launch, the "launch" path)."""
    return _fp8_activation_path(check_choice("mode", mode, ("launch", "loop")))

@contextlib.contextmanager
def _fp8_activation_path(mode: str):
    global FP8_ACT_QUANT
    before, FP8_ACT_QUANT = FP8_ACT_QUANT, mode
    try: yield
    finally: FP8_ACT_QUANT = before

def _fp8_input(a_k, a_s, as_st, wa, bk, expert_num_tokens=None):
    "`(a, scales, strides, QUANT_A)`: 16-bit a of w8a8 quantized by one launch first (`FP8_ACT_QUANT` 'launch', the default), or left 16-bit for the K loop ('loop'; block: when the K tile is its group; per token)."
    gran = wa["ACT_GRAN"]
    if wa["FMT"] > 1 or a_k.dtype not in ACTIVATION_DTYPES or gran == "tensor": return a_k, a_s, as_st, 0
    if FP8_ACT_QUANT == "loop" and gran == "token": return a_k, a_s, as_st, 2
    if FP8_ACT_QUANT == "loop" and bk == wa["GROUP_K"]: return a_k, a_s, as_st, 1
    q, s = _fp8_quantize_activations(a_k, gran, expert_num_tokens, wa["GROUP_K"])
    st = s.stride() if expert_num_tokens is not None else (0, *s.stride())
    return q, s, st, 0

# %%
#| export
def _check_quant_gemm_common(a, qw, activation, weight, ndim, bias):
    "`(which weight, its kernel arguments, output columns, Activation or None)`; checks qw, a's K and the bias `[E, N]`."
    check_quant_weights(qw)                                       # (checked again after an in-place edit)
    act = check_activation(activation)
    which = _which(weight, act)
    wa = _weight_kernel_args(qw, which)
    check_tensor("a", a, ndim=ndim)
    if a.shape[-1] != wa["K"]:
        raise ValueError(f"a: expected K = {wa['K']} ({'hidden_size' if which == 'w13' else 'intermediate_size'} of "
                         f"{which}) in the last dim, got shape {list(a.shape)}")
    if act and wa["N"] % 2: raise ValueError(f"{which}: expected an even N for a gated activation ({act.name}), got {wa['N']}")
    check_kernel_device("a", a)                                   # a meta `a` is named as such, not as qw's device
    if a.device != qw.device: raise ValueError(f"qw: expected device {a.device}, got {qw.device}")
    check_expert_bias("bias", bias, qw.num_experts, wa["N"], a.device)
    return which, wa, (wa["N"] // 2 if act else wa["N"]), act

# %%
#| export
def _check_act_scale_values(a_scale: torch.Tensor,                  # [E, M or 1, G] batched, [rows or 1, G] contiguous
                            expert_num_tokens: torch.Tensor | None = None,   # [E] int32: the batched rows read
                           ) -> None:
    """A caller's pre-quantized activation scales, where the kernels read them: in [0, FP32 max / 448] (one host
    sync). NaN passes: `fp8_quantize_activations` gives a row-group with a NaN (or inf) input a NaN scale, so the
    output row is NaN as the 16-bit path's would be; a negative scale (signs flipped) or a larger one (448 × scale
    past fp32) is no quantizer's."""
    s = a_scale
    if expert_num_tokens is not None:                 # an expert's valid rows only: the quantizer leaves the rest unset
        s = s[torch.arange(s.shape[1], device=s.device)[None, :] < expert_num_tokens[:, None]]
    top = torch.finfo(torch.float32).max / FP8_MAX
    bad = (s < 0) | (s > top)                         # (NaN is neither)
    if bad.any():
        raise ValueError(f"a_scale: expected scales in [0, {top:.4g}] on the rows the kernels read (NaN marks a NaN "
                         f"input), got {s[bad][0].item()} ({int(bad.sum())} such values)")

def batched_moe_gemm_quant(a: torch.Tensor,                   # [E, max_tokens, K] bf16/fp16, or float8 with a_scale (w8a8)
                           qw: QuantizedExpertWeights,        # the experts' quantized weights
                           expert_num_tokens: torch.Tensor,   # [E] int32, valid leading rows, <= max_tokens
                           activation: Activation | str | None = None,  # None, an Activation or "silu_and_mul" -> N/2 outputs
                           out: torch.Tensor | None = None,   # [E, max_tokens, N or N/2]; rows >= count never written
                           weight: str | None = None,         # "w13" or "w2"; default w13 when gated, w2 without
                           a_scale: torch.Tensor | None = None,   # fp8 a's scales: [E, 1, 1] / [E, M, 1] / [E, M, ⌈K/128⌉]
                           out_dtype: torch.dtype | None = None,  # output dtype for fp8 a (default bf16)
                           config: dict | None = None,        # tile override: BLOCK_M/N/K, num_warps, num_stages
                           expected_m: int | None = None,     # expected valid rows per expert (tile lookup only)
                           validate: bool = True,             # check counts <= max_tokens and a_scale's values (one sync)
                           bias: torch.Tensor | None = None,  # [E, N] bf16/fp16/fp32, added in fp32 after the scales, before act
                           active_experts: int | None = None, # expected experts with rows (split-K choice; default E)
                           max_active_experts: int | None = None,  # a bound on the experts with rows (`06`'s COMPACT)
                          ) -> torch.Tensor:                  # `out`
    """Quantized masked grouped GEMM `out[e, :n_e] = act(a[e, :n_e] @ W[e]ᵀ + bias[e])` (FP8 w8a8 or FP4 w4a16), fp32
    accumulation. ValueError naming the argument at fault: `qw`, `activation`, `weight`, `a` (shape, K, E, dtype,
    device), `expert_num_tokens` (shape, dtype; with `validate` values outside [0, max_tokens]), `a_scale`, `out_dtype`,
    `out`, `bias`, `expected_m`, `active_experts`, `max_active_experts`, `validate` or `config`. Source: vLLM's
    `invoke_moe_batched_triton_kernel` (fused_batched_moe.py) for FP8; the in-register FP4 decode is moe-lit's own."""
    which, wa, n_out, act = _check_quant_gemm_common(a, qw, activation, weight, 3, bias)
    E, M, K = a.shape
    if E != qw.num_experts: raise ValueError(f"a: expected {qw.num_experts} experts in dim 0, got shape {list(a.shape)}")
    check_tensor("expert_num_tokens", expert_num_tokens, shape=(E,), dtype=torch.int32, contiguous=True)
    check_kernel_device("a", a, expert_num_tokens=expert_num_tokens, out=out, a_scale=a_scale)
    check_bool("validate", validate)
    if validate and E and ((expert_num_tokens < 0) | (expert_num_tokens > M)).any():
        raise ValueError(f"expert_num_tokens: expected values in [0, {M}], got {expert_num_tokens.tolist()}")
    a_k, a_s, as_strides, odt = _prepare_activations(a, qw, expert_num_tokens, a_scale, out_dtype, K, batched=True)
    if validate and a_scale is not None and E: _check_act_scale_values(a_scale, expert_num_tokens)
    out = torch.empty(E, M, n_out, dtype=odt, device=a.device) if out is None else \
        check_disjoint("out", check_tensor("out", out, shape=(E, M, n_out), dtype=odt, writable=True), a=a, a_k=a_k,
                      a_s=a_s, expert_num_tokens=expert_num_tokens, bias=bias,
                      w_codes=wa["codes"], w_scale=wa["scale"], w_global_scale=wa["gs"])
    for name, t in (("a", a_k), ("w", wa["codes"]), ("out", out)): check_extent(name, t)
    if expected_m is not None: check_int("expected_m", expected_m, lo=1)
    if active_experts is not None: check_int("active_experts", active_experts, lo=0)
    check_max_active(max_active_experts, expert_num_tokens, validate)
    check_quant_tile_config(config, need_block_m=True)
    return _batched_moe_gemm_quant(a_k, a_s, as_strides, wa, expert_num_tokens, act, out, config, expected_m, bias,
                                   active_experts, max_active_experts)

def _batched_moe_gemm_quant(a_k, a_s, as_strides, wa, expert_num_tokens, act, out, config, expected_m, bias,
                            active_experts=None, max_active=None):
    "`batched_moe_gemm_quant` after its checks, the activations prepared and `out` allocated (`BatchedTritonQuantExperts`)."
    (E, M, K), n_out = a_k.shape, out.shape[2]
    if E == 0 or M == 0 or n_out == 0: return out
    grid, bk, tiles, split, bm, bn, kw = _batched_quant_plan(
        wa["static"], E, M, K, n_out, out.stride(), out.dtype, act, expected_m,
        None if config is None else tuple(sorted(config.items())), None if bias is None else bias.stride(),
        active_experts, max_active, out.device, _tile_config_root(), _split_target(wa["FMT"]),
        _batched.SPLIT_K_WORKSPACE_BYTES)
    a_k, a_s, as_strides, quant_a = _fp8_input(a_k, a_s, as_strides, wa, bk, expert_num_tokens)
    part, locks = _split_k_buffers(split, tiles, bm, bn, out.device)
    sa = a_k.stride()
    launch_kernel(_batched_moe_gemm_quant_kernel, grid)(
        a_k, a_s, wa["codes"], wa["scale"], wa["gs"], out, expert_num_tokens, part_ptr=part, lock_ptr=locks,
        bias_ptr=bias, stride_ae=sa[0], stride_am=sa[1], stride_ak=sa[2], stride_ase=as_strides[0],
        stride_asm=as_strides[1], stride_asg=as_strides[2], QUANT_A=quant_a, **_upcast(a_k), **kw)
    return out

def _upcast(a_k) -> dict:
    "`UPCAST` and `PRECISION` for 16-bit activations in the interpreter, whose bf16 arithmetic is wrong: fp32 and ieee."
    up = INTERPRET and a_k.dtype in ACTIVATION_DTYPES
    return _UPCAST_ON if up else _UPCAST_OFF

_UPCAST_ON, _UPCAST_OFF = dict(UPCAST=True, PRECISION="ieee"), dict(UPCAST=False, PRECISION="tf32")

@functools.lru_cache(maxsize=4096)
def _batched_quant_plan(static, E, M, K, n_out, out_strides, out_dtype, act, expected_m, config_items, bias_strides,
                        active_experts, max_active, device, config_dir, programs_per_sm, workspace_bytes) -> tuple:
    """What `_batched_moe_gemm_quant` launches with besides its tensors and the activations' strides, worked out once
    per shape and kept: `(grid, BLOCK_K, tiles, SPLIT_K, BLOCK_M, BLOCK_N, keyword arguments)`. Its arguments are
    everything that work reads (the weight's facts, the split-K knobs, the tile tables' folder), so a changed one is
    a new entry, never a stale plan."""
    wa = {k: dict(v) if k == "w_strides" else v for k, v in static}
    cfg = dict(_quant_tile_resolved("batched_moe_gemm", E, wa["N"], K, expected_m or M, out_dtype, wa["FMT"],
                                    wa["GROUP_K"], act is not None, config_items, None, wa["LAYOUT"], config_dir))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    num_m_tiles = _cdiv(M, bm)
    tiles = num_m_tiles * _cdiv(n_out, bn)                      # per expert
    split = _split_k_choice(cfg, _cdiv(min(M, expected_m or M), bm) * _cdiv(n_out, bn),
                            E if active_experts is None else min(E, active_experts), _cdiv(K, bk), tiles * E, bm, bn,
                            programs_per_sm)
    slots, compact, block_e = expert_slots(E, max_active)
    kw = dict(num_experts=E, COMPACT=compact, BLOCK_E=block_e, N_OUT=n_out, K=K, K_W=wa["K_W"], MAX_TOKENS=M,
              num_m_tiles=num_m_tiles, **wa["w_strides"], **_named_strides("c", "emn", out_strides),
              **epilogue_constants(act, bias_strides), FMT=wa["FMT"], GROUP_N=wa["GROUP_N"], GROUP_K=wa["GROUP_K"],
              BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LAYOUT=wa["LAYOUT"], SPLIT_K=split, SCALE_FOLD=wa["SCALE_FOLD"], **cfg)
    return (tiles, slots, split), bk, tiles * E, split, bm, bn, kw

# %% [markdown]
# ### Tests
#
# Accuracy is judged by two numbers against the float64 spec on the valid rows, never by a loose atol alone: the
# **relative error** `‖got − want‖ / ‖want‖` and the **cosine similarity**. Since kernel and spec see the same fp8
# activations and the same dequantized weights, the error left is the output's rounding (bf16: ~2^-9 relative) and
# the order of fp32 sums — so the bounds are tight: relative error < 1e-2 and cosine > 0.9999 for one GEMM. Before
# the call, padding rows of the input and **every** row of the output buffer past the counts are poisoned with NaN;
# afterwards the padding rows must still be NaN (never written) and the valid rows finite (nothing leaked).

# %%
#| helper
def check_batched_gemm_quant(scheme: str, E: int, M: int, H: int, I: int, counts: list, activation=None,
                             dtype=torch.bfloat16, seed: int = 0, device=None, config=None, rel_tol=1e-2, cos_min=0.9999,
                             qw: QuantizedExpertWeights | None = None,    # reuse these weights (else random ones)
                             bias: torch.Tensor | None = None,            # [E, N] expert bias of the GEMM's weight
                             max_active: int | None = None):              # the grid's expert slots (`06`'s COMPACT)
    "Run `batched_moe_gemm_quant` on a poisoned random problem and compare with the float64 spec (the test body)."
    device = device or DEVICE
    qw = qw or quantize_expert_weights(*random_expert_weights(E, H, I, seed, device), scheme)
    which = "w13" if activation else "w2"
    K, N = (H, 2 * I) if which == "w13" else (I, H)
    n_out = N // 2 if activation else N
    cnt = torch.tensor(counts, dtype=torch.int32, device=device)
    a = poison_rows(random_activations((E, M, K), dtype, seed + 1, device), cnt)
    out = poison_rows(torch.zeros(E, M, n_out, dtype=dtype, device=device), cnt)
    got = batched_moe_gemm_quant(a, qw, cnt, activation, out=out, config=config, bias=bias, max_active_experts=max_active)
    want = batched_gemm_quant_reference(a, qw, cnt, activation, bias=bias)
    valid = (torch.arange(M, device=device)[None, :] < cnt[:, None]).cpu()
    assert_quant_close(got.cpu()[valid], want.cpu()[valid], rel_tol, cos_min, name=f"{scheme} {which} {activation} {dtype}")
    assert got.cpu()[~valid].isnan().all(), f"{scheme}: a padding row was written"
    return got

# %% [markdown]
# The catalog: every scheme, GEMM1 with SiLU and GEMM2, counts `0 / 1 / odd / max`, `H = 152` and `I = 72` (partial
# 128-blocks along both N and K; K padded to 160 / 96 for MXFP4 and 160 / 80 for NVFP4), and, for FP8 blocks,
# `I = 192` with `H = 256`, the per-rank intermediate size whose 128-blocks do not divide it (vLLM #48173) — there the block
# scales of `w13`'s rows 128–255 cover gate rows *and* up rows, and `w2`'s K ends in a half block.

# %%
#| helper
# (E, max_tokens, H, I, counts, what it covers)
QUANT_GEMM_CASES = [
    (4, 24, 152, 72, [0, 1, 7, 24], "counts 0/1/odd/max; partial 128-blocks on N and K; both FP4 formats pad K"),
    (2, 8, 256, 192, [3, 8], "I = 192 per rank: a block straddles gate/up rows; w2's K ends in a half block"),
]

# %%
#| test batched_gemm_quant_fp8
for scheme in ("fp8_w8a8_tensor", "fp8_w8a8_channel", "fp8_w8a8_block"):
    for E, M, H, I, counts, what in QUANT_GEMM_CASES[: 2 if scheme == "fp8_w8a8_block" else 1]:
        qw = quantize_expert_weights(*random_expert_weights(E, H, I), scheme)
        for act in ("silu_and_mul", None):
            check_batched_gemm_quant(scheme, E, M, H, I, counts, act, qw=qw)

# %%
#| test batched_gemm_quant_fp4
for scheme in ("mxfp4_w4a16", "nvfp4_w4a16"):
    for E, M, H, I, counts, what in QUANT_GEMM_CASES[:1]:
        qw = quantize_expert_weights(*random_expert_weights(E, H, I), scheme)
        for layout in FP4_LAYOUTS:                 # split64: K = 152 and 72 end inside a 64-code chunk
            for act in ("silu_and_mul", None):
                check_batched_gemm_quant(scheme, E, M, H, I, counts, act, qw=qw.relayout(layout))

# %% [markdown]
# fp16 activations, and all experts empty (the kernel must not write anything and the quantizer must not run on
# padding). MXFP4 with fp16 activations decodes its weights in bf16 — and rounds the activations to bf16 for the
# MMA — because an e8m0 scale can put a weight far outside fp16's range; weights scaled by 1e5 and 1e-6 check it:

# %%
#| test batched_gemm_quant_fp16_and_empty
for scheme in QUANT_SCHEMES:
    if scheme in ("fp8_w8a8_block", "nvfp4_w4a16", "mxfp4_w4a16"):
        check_batched_gemm_quant(scheme, 3, 16, 96, 64, [5, 0, 16], "silu_and_mul", dtype=torch.float16, seed=7)
    check_batched_gemm_quant(scheme, 2, 16, 96, 64, [0, 0], None, seed=8)
# MXFP4 weights past fp16's range (e8m0 scales span 2^±127): with fp16 activations the weight tile is decoded in bf16
cnt = torch.tensor([3, 16], dtype=torch.int32, device=DEVICE)
for w_max, a_scale in ((1e5, 1e-5), (1e-6, 1e3)):          # fp16 weights would overflow / flush to zero
    w13, w2 = random_expert_weights(2, 64, 32, seed=9)
    qw = quantize_expert_weights(w13 / w13.abs().max() * w_max, w2, "mxfp4_w4a16")
    a = (random_activations((2, 16, 64), torch.float32, 10) * a_scale).half()
    got, want = batched_moe_gemm_quant(a, qw, cnt, None, weight="w13"), batched_gemm_quant_reference(a, qw, cnt, weight="w13")
    valid = (torch.arange(16, device=DEVICE)[None, :] < cnt[:, None])
    assert_quant_close(got[valid].cpu(), want[valid].cpu(), 1e-2, 0.9999, name=f"mxfp4 fp16, |w| <= {w_max:g}")

# %% [markdown]
# **The decode is exact.** With one-hot activation rows the GEMM returns the decoded weights themselves (one nonzero
# term per output, accumulated in fp32), so the kernel's weight tile can be compared bit for bit with the dequantized
# weights: every byte value (both nibbles, all sixteen codes) under scales from 2^-15 to 2^9 (MXFP4) and random e4m3
# scales with a global scale (NVFP4), in bf16 and fp16. On the GPU this is the packed PTX decode; in the interpreter
# the portable one.

# %%
#| test fp4_decode_is_exact
H, I = 64, 32
codes = (torch.arange(2 * I * H // 2) % 256).to(torch.uint8).reshape(1, 2 * I, H // 2)
g = torch.Generator().manual_seed(11)
for scheme, G in (("mxfp4_w4a16", 32), ("nvfp4_w4a16", 16)):
    if scheme == "mxfp4_w4a16": scale = torch.randint(112, 137, (1, 2 * I, H // G), generator=g, dtype=torch.uint8)
    else: scale = (torch.rand(1, 2 * I, H // G, generator=g) * 400 + 0.01).to(torch.float8_e4m3fn)
    w2c, w2s = codes[:, :H, :I // 2].contiguous(), scale[:, :H, :I // G].contiguous()
    gs = dict(w13_global_scale=torch.tensor([0.125]).to(DEVICE), w2_global_scale=torch.tensor([1.0]).to(DEVICE)) \
        if scheme == "nvfp4_w4a16" else {}
    qw0 = QuantizedExpertWeights(scheme, codes.to(DEVICE), scale.to(DEVICE), w2c.to(DEVICE), w2s.to(DEVICE), H, I, **gs)
    want = qw0.dequantize_weight("w13", 0, torch.float64).T           # [H, 2I]: row k = the weights at K = k
    for dtype, qw in itertools.product(ACTIVATION_DTYPES, [qw0.relayout(layout) for layout in FP4_LAYOUTS]):
        a = torch.eye(H, dtype=dtype, device=DEVICE)[None]               # one-hot rows: out[0, k] = W[:, k]
        got = batched_moe_gemm_quant(a, qw, torch.tensor([H], dtype=torch.int32, device=DEVICE), None, weight="w13")
        test_eq(torch.equal(got[0].cpu().double(), want.to(dtype).double().cpu()), True)
        bad = dataclasses.replace(qw0, w13=qw0.w13 ^ 0x80).relayout(qw.fp4_layout)   # a sign flipped a byte
        test_eq(torch.equal(batched_moe_gemm_quant(a, bad, torch.tensor([H], dtype=torch.int32, device=DEVICE), None,
                                                   weight="w13")[0].cpu().double(), want.to(dtype).double().cpu()), False)

# %% [markdown]
# The word decode's point is a layout property, so it has a test of its own: `nbs/bench/sass_fp4.py --check` compiles
# the contiguous GEMM1 for sm_90 (MXFP4 and NVFP4, mma128, the tuned decode tile) with Triton's bundled ptxas, on any
# machine, and fails if the K loop moves the decoded tile through shared memory (any `ldmatrix`, or more than the
# loop's two small stores). The NVFP4 variant with its two scales as separate operands failed it (16 stores, 16
# `ldmatrix`, 33 barriers a K step). It runs in a process of its own, without the interpreter switch.

# %%
#| test mma128_keeps_the_tile_in_registers
script = Path(moe_lit.__file__).resolve().parents[1] / "nbs" / "bench" / "sass_fp4.py"
env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
r = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, env=env, timeout=900)
assert r.returncode == 0, r.stdout + r.stderr[-2000:]

# %% [markdown]
# An e8m0 byte 0 is the scale 2^-127, a subnormal in fp32 and bf16: every decode places the byte with a floor at that
# subnormal's bits (a plain shift would give 0). `quantize_mxfp4` writes byte 0 for groups whose values are all below
# about 2^-125, so the kernels must read it as the reference does.

# %%
#| test fp4_e8m0_byte_zero
H = I = 128
for layout in FP4_LAYOUTS:
    w13c, w2c = torch.full((1, 2 * I, H // 2), 0x77, dtype=torch.uint8), torch.full((1, H, I // 2), 0x77, dtype=torch.uint8)
    qw = QuantizedExpertWeights("mxfp4_w4a16", w13c, torch.zeros(1, 2 * I, H // 32, dtype=torch.uint8), w2c,
                                torch.zeros(1, H, I // 32, dtype=torch.uint8), H, I).relayout(layout).to(DEVICE)
    a, n = torch.full((1, 1, I), 2.0 ** 126, dtype=torch.bfloat16, device=DEVICE), torch.ones(1, dtype=torch.int32, device=DEVICE)
    test_eq(batched_moe_gemm_quant(a, qw, n)[0, 0, :4].float().cpu(), torch.full((4,), 384.0))    # I · 6 · 2^126 · 2^-127
    test_close(batched_gemm_quant_reference(a, qw, n)[0, 0, :4].float().cpu(), torch.full((4,), 384.0), eps=1e-3)   # the
    # spec's own fp32 exp2 of -127 on a GPU is a hair off the exact subnormal (383.9999 there), the kernel is exact

# %% [markdown]
# **The tests can fail.** The same check on weights whose scales were permuted — the two K blocks of the FP8 block
# scales swapped, the MXFP4 group scales rolled by one group along K — must miss by far: the block-wise exponents of
# the test weights make every block's scale different. (The correct weights pass the same check in the catalog.)

# %%
#| test permuted_scales_are_caught
E, M, H, I = 2, 16, 256, 64
w13, w2 = random_expert_weights(E, H, I, seed=5)
cnt = torch.tensor([16, 9], dtype=torch.int32, device=DEVICE)
a = random_activations((E, M, H), torch.bfloat16, seed=6)
valid = (torch.arange(M)[None, :] < cnt.cpu()[:, None])
for scheme, perm, layout in (("fp8_w8a8_block", lambda s: s.flip(-1), "plain"),
                             ("mxfp4_w4a16", lambda s: s.roll(1, -1), "plain"),
                             ("nvfp4_w4a16", lambda s: s.view(torch.uint8).roll(1, -1).view(s.dtype), "split64")):
    qw = quantize_expert_weights(w13, w2, scheme).relayout(layout)
    bad = dataclasses.replace(qw, w13_scale=perm(qw.w13_scale))
    want = batched_gemm_quant_reference(a, qw, cnt, "silu_and_mul").cpu()[valid]
    rel, cos = quant_error(batched_moe_gemm_quant(a, bad, cnt, "silu_and_mul").cpu()[valid], want)
    assert rel > 0.2 and cos < 0.99, (scheme, rel, cos)

# %% [markdown]
# Pre-quantized activations: a quantize-before-dispatch all2all (DeepEP low-latency sends fp8 with 1×128 scales)
# hands the GEMM fp8 codes and their scales; the output dtype is then chosen by the caller.

# %%
#| test batched_gemm_quant_prequantized
E, M, H, I = 3, 16, 192, 64
cnt = torch.tensor([16, 0, 5], dtype=torch.int32, device=DEVICE)
for scheme in ("fp8_w8a8_block", "fp8_w8a8_tensor"):
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=9), scheme)
    a = poison_rows(random_activations((E, M, H), torch.bfloat16, seed=10), cnt)
    q, s = fp8_quantize_activations(a, ACTIVATION_GRANULARITY[scheme], cnt)
    got = batched_moe_gemm_quant(q, qw, cnt, "silu_and_mul", a_scale=s, out_dtype=torch.float16)
    test_eq(got.dtype, torch.float16)
    valid = (torch.arange(M)[None, :] < cnt.cpu()[:, None])
    assert_quant_close(got.cpu()[valid], batched_gemm_quant_reference(a, qw, cnt, "silu_and_mul").cpu()[valid])
    assert_quant_close(got.cpu()[valid], batched_gemm_quant_reference(q, qw, cnt, "silu_and_mul", a_scale=s).cpu()[valid])

# %% [markdown]
# ## The contiguous format
#
# ### Spec
#
# Over the flat (token, slot) pairs of the Standard format: pair `p = t·top_k + k` with a local expert `e = local[p]`
# gets `act(rw · deq(quant(a[row(p)])) @ deq(W[e])ᵀ)`, with `row(p) = t` for GEMM1 (token rows) and `p` for GEMM2
# (pair rows), and the router weight `rw` applied to GEMM1's linear output ("input") or to GEMM2's ("output"), in fp32,
# as `08`'s `fused_moe_gemm` does. Pairs without a local expert are NaN in the spec (the kernel leaves them unwritten).
# For w8a8 the whole `a` is quantized (per-tensor: one scale over all its rows, so every row must be finite).
#
# The expert bias `bias [E, N]` sits where `08` puts it, from the expert contract
# `out[t] = Σ_k rw_tk · (W2·act(W13·x_t + b13) + b2)`: with the router weight on the input, GEMM1 computes
# `act(rw·(x·W13ᵀ) + b13)` — the weight scaled `x`, not the bias; with it on the output, GEMM2 computes
# `rw·(h·W2ᵀ + b2)` — the bias is weighted like the rest of the expert's output.
#
# > **Router weight on the input, quantized.** Scaling GEMM1's fp32 output by `rw` equals quantizing `rw·x` for
# > per-token and 1×128 scales (the scale absorbs the factor; only the bf16 rounding of `rw·x` differs) and is close to
# > it for a per-tensor scale, where `rw·x` would use a smaller share of the fp8 range. vLLM multiplies the input
# > before quantizing; moe-lit keeps `08`'s order, and the spec follows the kernel.

# %%
#| export
def fused_moe_gemm_quant_reference(a: torch.Tensor,                 # [T, K] (token rows) or [T·top_k, K] (pair rows)
                                   qw: QuantizedExpertWeights,
                                   local_ids: torch.Tensor,         # [T, top_k] int, local expert per slot or -1
                                   activation: Activation | str | None = None,  # None, an Activation or "silu_and_mul"
                                   topk_weights: torch.Tensor | None = None,  # [T, top_k] fp32
                                   weight_stage: str | None = None, # None, "input" (before the bias) or "output" (after it)
                                   weight: str | None = None,       # "w13" / "w2"; default by activation
                                   rows: str = "token",             # "token" or "pair"
                                   a_scale: torch.Tensor | None = None,  # pre-quantized a's scales (w8a8)
                                   bias: torch.Tensor | None = None,     # [E, N] expert bias
                                  ) -> torch.Tensor:                # [T·top_k, N or N/2] float64, NaN for non-local pairs
    """Spec: `out[p] = act(rw·deq(quant(a[row(p)])) @ deq(W[e])ᵀ + bias[e])`, e = local(p), in float64 (rw on the
    output: `rw·(… + bias[e])`). ValueError naming `activation`, `weight`, or `weight_stage` ('output' with a gated
    activation), `rows` (not 'token' or 'pair') or `local_ids` (a value outside `[-1, E)`); the rest is unchecked.
    Source: moe-lit's own float64 spec (vLLM's tests compare with `torch_moe` the same way)."""
    act = check_activation(activation)
    if act and weight_stage == "output":       # the launcher's rule (`check_aligned_args`)
        raise ValueError("weight_stage: expected None or 'input' with a gated activation, got 'output'")
    which = _which(weight, act)
    check_choice("rows", rows, ("token", "pair"))
    _, _, _, N, K = qw.weight_parts(which)
    T, top_k = local_ids.shape
    flat = local_ids.reshape(-1).to(a.device)
    if flat.numel() and not (-1 <= int(flat.min()) and int(flat.max()) < qw.num_experts):   # a spec: syncs are fine
        raise ValueError(f"local_ids: expected values in [-1, {qw.num_experts}), got [{int(flat.min())}, {int(flat.max())}]")
    used = flat >= 0 if rows == "pair" else (local_ids.to(a.device) >= 0).any(1)   # rows some local pair reads
    ad = _dequantized_rows(a, qw, None, a_scale, K, used)
    out = torch.full((T * top_k, N // 2 if act else N), float("nan"), dtype=torch.float64, device=a.device)
    for e in range(qw.num_experts):
        pairs = (flat == e).nonzero()[:, 0]
        if pairs.numel() == 0: continue
        y = ad[pairs if rows == "pair" else pairs // top_k] @ qw.dequantize_weight(which, e, torch.float64).to(a.device).T
        rw = topk_weights.reshape(-1)[pairs].double().to(a.device)[:, None] if weight_stage is not None else None
        if weight_stage == "input": y = y * rw
        if bias is not None: y = y + bias[e].double().to(a.device)
        if weight_stage == "output": y = y * rw
        out[pairs] = act(y) if act else y
    return out

# %% [markdown]
# ### Kernel
#
# `08`'s grouped GEMM over `moe_align_block_size`'s blocks, with the same K loop as the batched kernel above:
# a program reads its block's expert (`-1`: return without a load or a store), gathers the rows of its pairs
# (sentinel positions are masked: their rows are read as 0 and never stored), and runs `_quant_k_step` and
# `_quant_output_scales`. Activation scales are indexed by the row (token or pair), weight scales by the expert.
# Router weights multiply in fp32 after the scales — before the activation when applied on the input (the GEMM is
# linear in its input), after GEMM2 otherwise. The epilogue is `08`'s: with the router weight on the input the
# accumulators are scaled first and the expert bias added after; on the output the bias is added first and then
# weighted; the gated activation comes last. Token and pair indices are int64 (`T·top_k·N` passes 2^31 at long prefills,
# sglang#4727). **Grid** `(num_m_blocks · cdiv(N_out, BLOCK_N), SPLIT_K)`, `num_m_blocks = expert_ids.numel()` (as in
# `08`: aligned blocks or `T·top_k` pair blocks), N-tile major; split-K as in
# the batched kernel.

# %%
#| export
@triton.jit
def _fused_moe_quant_kernel(
    a_ptr,          # [T, K] (token rows) or [T·top_k, K] (pair rows): float8 (w8a8) or bf16/fp16 (w4a16)
    as_ptr,         # activation scales: row·stride_asm + (k // GROUP_K)·stride_asg (w8a8)
    w_ptr, ws_ptr, gs_ptr,    # as in the batched kernel: codes, scales, NVFP4 global scales
    c_ptr,          # [T·top_k, N_OUT]
    sorted_ptr, expert_ids_ptr, ntpp_ptr,   # from moe_align_block_size
    weights_ptr,    # [T·top_k] fp32 router weights (WEIGHT != 0)
    bias_ptr,       # [E_local, N_w] bf16/fp16/fp32, read as fp32 (None unless HAS_BIAS)
    part_ptr, lock_ptr,   # split-K workspace and counters (`_split_k_sum`; unused with SPLIT_K = 1)
    N_OUT, K, K_W, num_pairs, num_m_blocks, num_sorted, num_local,
    alpha, limit,   # fp32, read only when ACTIVATION == 1
    stride_am, stride_ak, stride_asm, stride_asg, stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
    stride_cm, stride_cn, stride_be, stride_bn,
    TOP_K: tl.constexpr, A_PER_PAIR: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT: tl.constexpr, FMT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LAYOUT: tl.constexpr, SPLIT_K: tl.constexpr, QUANT_A: tl.constexpr, SCALE_FOLD: tl.constexpr = False,
    PAIR_IDS: tl.constexpr = False,   # expert_ids_ptr holds the [T·top_k] local ids: block p is pair p alone (`08`)
    PDL: tl.constexpr = False,   # programmatic dependent launch (`06`'s `_await_producers`)
):
    """grid = (num_m_blocks·_cdiv(N_OUT, BLOCK_N), SPLIT_K), num_m_blocks = expert_ids.numel() (_cdiv(max_padded,
    BLOCK_M) aligned, T·top_k pair blocks); blocks past num_tokens_post_padded or of expert -1 exit."""
    _await_producers(PDL)                                    # before any load or store
    pid, split = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_blocks, pid % num_m_blocks
    live, e, pairs = _block_pairs(pid_m, expert_ids_ptr, sorted_ptr, ntpp_ptr, num_pairs, num_sorted, num_local,
                                  BLOCK_M, PAIR_IDS)                # `08`'s: the aligned or the pair-id layout
    if not live: return                                           # past the padded end, or another rank's expert
    valid = (pairs >= 0) & (pairs < num_pairs)                    # sentinel (and out-of-range) rows are masked everywhere
    rows = pairs if A_PER_PAIR else pairs // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N_OUT
    a_rows = a_ptr + rows * stride_am
    as_ptrs = as_ptr + rows * stride_asm
    w_e, ws_e = w_ptr + e * stride_we, ws_ptr + e * stride_wse
    n_kt = tl.cdiv(K, BLOCK_K)
    acc, acc_up = _quant_tile_product(a_rows, as_ptrs, valid, w_e, ws_e, gs_ptr, e, offs_n, mask_n, K, K_W, N_OUT,
                                      split * n_kt // SPLIT_K, (split + 1) * n_kt // SPLIT_K,
                                      stride_ak, stride_asg, stride_wn, stride_wk, stride_wsn, stride_wsk, FMT, GATED,
                                      UPCAST, PRECISION, GROUP_N, GROUP_K, BLOCK_M, BLOCK_N, BLOCK_K, LAYOUT, QUANT_A,
                                      SCALE_FOLD)
    if SPLIT_K > 1:                                               # only the last split to arrive goes on
        acc, acc_up, last = _split_k_sum(acc, acc_up, part_ptr, lock_ptr, pid, tl.num_programs(0), split, GATED,
                                         SPLIT_K, BLOCK_M, BLOCK_N)
        if not last: return
    if WEIGHT != 0: rw = tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    if WEIGHT == 1: acc, acc_up = acc * rw, acc_up * rw         # on the input: scales the linear GEMM1, not its bias
    if HAS_BIAS:                                                # the block's expert's row, on the scaled fp32 product
        acc, acc_up = add_expert_bias(acc, acc_up, bias_ptr + e * stride_be, offs_n, mask_n, N_OUT, stride_bn, GATED)
    if WEIGHT == 2: acc = acc * rw                              # on the output (GEMM2), bias included, in fp32
    if GATED: acc = gated_activation(acc, acc_up, alpha, limit, ACTIVATION)
    c_ptrs = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & mask_n[None, :])

# %% [markdown]
# ### Launcher

# %%
#| export
def fused_moe_gemm_quant(a: torch.Tensor,                  # [T, K] token rows (GEMM1) or [T·top_k, K] pair rows (GEMM2)
                         qw: QuantizedExpertWeights,       # the local experts' quantized weights
                         sorted_token_ids: torch.Tensor,   # [max_padded] int32 from moe_align_block_size
                         expert_ids: torch.Tensor,         # [max_padded / block_m] int32, local expert or -1
                         num_tokens_post_padded: torch.Tensor,  # [1] int32
                         top_k: int,                       # slots per token
                         block_m: int,                     # the block size the alignment used
                         activation: Activation | str | None = None,  # None, an Activation or "silu_and_mul"
                         topk_weights: torch.Tensor | None = None,  # [T, top_k] fp32, applied per `weight_stage`
                         weight_stage: str | None = None,  # None, "input" (GEMM1) or "output" (GEMM2)
                         out: torch.Tensor | None = None,  # [T·top_k, N or N/2]; rows of uncomputed pairs untouched
                         weight: str | None = None,        # "w13" or "w2"; default w13 when gated, w2 without
                         rows: str = "token",              # "token": a row per token (GEMM1); "pair": per pair (GEMM2)
                         a_scale: torch.Tensor | None = None,   # fp8 a's scales: [1, 1] / [rows, 1] / [rows, ⌈K/128⌉]
                         out_dtype: torch.dtype | None = None,  # output dtype for fp8 a (default bf16)
                         config: dict | None = None,       # tile override (BLOCK_M is fixed by the alignment)
                         bias: torch.Tensor | None = None, # [E_local, N] bf16/fp16/fp32: fp32 add after the scales (see the spec)
                         active_experts: int | None = None,  # expected local experts with pairs (split-K; default min(E, pairs))
                         validate: bool = True,            # with a_scale: check its values on the host (one sync)
                        ) -> torch.Tensor:                 # `out`
    """Quantized grouped GEMM over aligned blocks: `out[pair] = act(a[row(pair)] @ W[e]ᵀ + bias[e])`, e = expert(block),
    fp32 accumulation. ValueError naming the argument at fault: `qw`, `activation`, `weight`, `rows`, `top_k`, `a`
    (shape, K, dtype, device), the aligned arguments (`sorted_token_ids`, `expert_ids`, `num_tokens_post_padded`,
    `block_m`, `weight_stage`, `topk_weights`), `a_scale`, `out_dtype`, `out`, `bias`, `validate`, `config` or
    `active_experts`. Source: vLLM's `fused_moe_kernel` (fused_moe.py) FP8 branches; the FP4 decode is moe-lit's own."""
    which, wa, n_out, act = _check_quant_gemm_common(a, qw, activation, weight, 2, bias)
    per_pair = check_choice("rows", rows, ("token", "pair")) == "pair"
    num_pairs = a.shape[0] if per_pair else a.shape[0] * top_k
    if per_pair and check_int("top_k", top_k, lo=1) and a.shape[0] % top_k:
        raise ValueError(f"a: expected a multiple of top_k={top_k} pair rows, got {a.shape[0]}")
    check_aligned_args(sorted_token_ids, expert_ids, num_tokens_post_padded, top_k, block_m, weight_stage,
                        topk_weights, num_pairs, gated=act is not None)
    check_kernel_device("a", a, out=out, a_scale=a_scale, sorted_token_ids=sorted_token_ids, expert_ids=expert_ids,
                        num_tokens_post_padded=num_tokens_post_padded, topk_weights=topk_weights)
    K = a.shape[1]
    a_k, a_s, as_st, odt = _prepare_activations(a, qw, None, a_scale, out_dtype, K, batched=False)
    if check_bool("validate", validate) and a_scale is not None: _check_act_scale_values(a_scale)
    out = torch.empty(num_pairs, n_out, dtype=odt, device=a.device) if out is None else \
        check_disjoint("out", check_tensor("out", out, shape=(num_pairs, n_out), dtype=odt, writable=True), a=a, a_k=a_k,
                      a_s=a_s, sorted_token_ids=sorted_token_ids, expert_ids=expert_ids, topk_weights=topk_weights, bias=bias,
                      w_codes=wa["codes"], w_scale=wa["scale"], w_global_scale=wa["gs"])
    check_extent("w", wa["codes"])
    check_quant_tile_config(config)
    if active_experts is not None: check_int("active_experts", active_experts, lo=0)
    return _fused_moe_gemm_quant(a_k, a_s, as_st, wa, qw.num_experts, sorted_token_ids, expert_ids,
                                 num_tokens_post_padded, top_k, block_m, act, topk_weights, weight_stage, out,
                                 per_pair, config, bias, active_experts)

def _fused_moe_gemm_quant(a_k, a_s, as_st, wa, E, sorted_token_ids, expert_ids, num_tokens_post_padded, top_k,
                          block_m, act, topk_weights, weight_stage, out, per_pair, config, bias,
                          active_experts=None) -> torch.Tensor:
    "`fused_moe_gemm_quant` after its checks, the activations prepared and `out` allocated (`TritonQuantExperts`)."
    num_pairs, n_out = out.shape
    if num_pairs == 0 or n_out == 0: return out
    pair_ids = sorted_token_ids is None                            # `08`'s `_align_pairs` pair blocks: the ids alone
    if pair_ids: sorted_token_ids = num_tokens_post_padded = expert_ids
    tiles, split, bm, bn, bk, kw = _fused_quant_plan(
        wa["static"], E, a_k.shape[1], n_out, num_pairs, expert_ids.numel(), sorted_token_ids.numel(), out.stride(),
        out.dtype, top_k, block_m, act, weight_stage, per_pair, pair_ids,
        None if config is None else tuple(sorted(config.items())), None if bias is None else bias.stride(),
        active_experts, out.device, _tile_config_root(), _split_target(wa["FMT"]), _batched.SPLIT_K_WORKSPACE_BYTES)
    a_k, a_s, as_st, quant_a = _fp8_input(a_k, a_s, as_st, wa, bk)
    part, locks = _split_k_buffers(split, tiles, bm, bn, out.device)
    sa = a_k.stride()
    launch_kernel(_fused_moe_quant_kernel, (tiles, split))(
        a_k, a_s, wa["codes"], wa["scale"], wa["gs"], out, sorted_token_ids, expert_ids, num_tokens_post_padded,
        topk_weights.contiguous() if topk_weights is not None else out, part_ptr=part, lock_ptr=locks, bias_ptr=bias,
        stride_am=sa[0], stride_ak=sa[1], stride_asm=as_st[1], stride_asg=as_st[2], QUANT_A=quant_a, **_upcast(a_k),
        **kw)
    return out

@functools.lru_cache(maxsize=4096)
def _fused_quant_plan(static, E, K, n_out, num_pairs, num_m_blocks, num_sorted, out_strides, out_dtype, top_k,
                      block_m, act, weight_stage, per_pair, pair_ids, config_items, bias_strides, active_experts, device,
                      config_dir, programs_per_sm, workspace_bytes) -> tuple:
    """What `_fused_moe_gemm_quant` launches with besides its tensors and the activations' strides, worked out once
    per shape and kept (as `_batched_quant_plan`): `(tiles, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K, keyword arguments)`."""
    wa = {k: dict(v) if k == "w_strides" else v for k, v in static}
    cfg = dict(_quant_tile_resolved("fused_moe_gemm", E, wa["N"], K, block_m, out_dtype, wa["FMT"], wa["GROUP_K"],
                                    act is not None, config_items, block_m, wa["LAYOUT"], config_dir))
    bm, bn, bk = cfg.pop("BLOCK_M"), cfg.pop("BLOCK_N"), cfg.pop("BLOCK_K")
    tiles = num_m_blocks * _cdiv(n_out, bn)
    active = min(E, num_pairs if active_experts is None else active_experts)   # an expert's pairs fit one block at decode
    split = _split_k_choice(cfg, _cdiv(n_out, bn), active, _cdiv(K, bk), tiles, bm, bn, programs_per_sm)
    kw = dict(N_OUT=n_out, K=K, K_W=wa["K_W"], num_pairs=num_pairs, num_m_blocks=num_m_blocks, num_sorted=num_sorted,
              num_local=E, **wa["w_strides"], **_named_strides("c", "mn", out_strides),
              **epilogue_constants(act, bias_strides), TOP_K=top_k, A_PER_PAIR=per_pair,
              WEIGHT={None: 0, "input": 1, "output": 2}[weight_stage], FMT=wa["FMT"], GROUP_N=wa["GROUP_N"],
              GROUP_K=wa["GROUP_K"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, LAYOUT=wa["LAYOUT"], SPLIT_K=split,
              SCALE_FOLD=wa["SCALE_FOLD"], PAIR_IDS=pair_ids, **cfg)
    return tiles, split, bm, bn, bk, kw

# %% [markdown]
# ### Tests
#
# A routing with `-1` slots (pairs on other ranks), duplicated experts across tokens, an expert nobody routes to, and
# fewer pairs than a block. The output buffer is poisoned with NaN: rows of non-local pairs must stay NaN, the others
# must match the spec. GEMM1 runs with the router weight on the input, GEMM2 with it on the output, and GEMM2's input
# has NaN in the rows of non-local pairs (zeros for the per-tensor scheme, whose single scale spans every row).

# %%
#| helper
def check_fused_gemm_quant(scheme: str, T: int, top_k: int, E: int, H: int, I: int, activation=None,
                           dtype=torch.bfloat16, block_m: int = 16, seed: int = 0, device=None, config=None,
                           rel_tol=1e-2, cos_min=0.9999, qw: QuantizedExpertWeights | None = None,
                           bias: torch.Tensor | None = None):           # [E, N] expert bias of the GEMM's weight
    "Run `fused_moe_gemm_quant` on a random routing (with -1 slots) and compare with the float64 spec (the test body)."
    device = device or DEVICE
    g = torch.Generator().manual_seed(seed)
    qw = qw or quantize_expert_weights(*random_expert_weights(E, H, I, seed, device), scheme)
    ids = torch.stack([torch.randperm(E + 1, generator=g)[:top_k] for _ in range(T)]).int()
    local = torch.where(ids < E, ids, -1).to(device)             # id E stands for "another rank": -1
    wts = torch.rand(T, top_k, generator=g).to(device)
    s, e, n = moe_align_block_size(local, block_m, E)
    pair_ok = (local.reshape(-1) >= 0).cpu()
    if activation:
        a, kw = random_activations((T, H), dtype, seed + 1, device), dict(weight_stage="input", rows="token")
    else:
        a = random_activations((T * top_k, I), dtype, seed + 1, device)
        a[~pair_ok.to(device)] = 0.0 if scheme == "fp8_w8a8_tensor" else float("nan")   # rows never computed
        kw = dict(weight_stage="output", rows="pair")
    out = torch.full((T * top_k, I if activation else H), float("nan"), dtype=dtype, device=device)
    got = fused_moe_gemm_quant(a, qw, s, e, n, top_k, block_m, activation, wts, out=out, config=config, bias=bias, **kw)
    want = fused_moe_gemm_quant_reference(a, qw, local, activation, wts, bias=bias, **kw)
    assert_quant_close(got.cpu()[pair_ok], want.cpu()[pair_ok], rel_tol, cos_min, name=f"{scheme} {activation} {dtype}")
    assert got.cpu()[~pair_ok].isnan().all(), f"{scheme}: a row of a non-local pair was written"
    return got

# %%
#| test fused_gemm_quant_catalog
for scheme in QUANT_SCHEMES:
    qw = quantize_expert_weights(*random_expert_weights(4, 152, 72), scheme)
    for qw in [qw] if QUANT_SCHEME_TABLE[scheme].is_fp8 else [qw, qw.relayout("split64")]:
        for act in ("silu_and_mul", None):
            check_fused_gemm_quant(scheme, 9, 2, 4, 152, 72, act, qw=qw)

# %% [markdown]
# The per-rank intermediate of 192 with 128×128 blocks, `top_k = 1`, and a single token (fewer pairs than a block):

# %%
#| test fused_gemm_quant_partial_blocks_and_small
qw = quantize_expert_weights(*random_expert_weights(3, 256, 192, seed=1), "fp8_w8a8_block")
for act in ("silu_and_mul", None):
    check_fused_gemm_quant("fp8_w8a8_block", 5, 3, 3, 256, 192, act, seed=1, qw=qw)
check_fused_gemm_quant("nvfp4_w4a16", 1, 1, 2, 96, 48, "silu_and_mul", dtype=torch.float16, seed=2)
qw = quantize_expert_weights(*random_expert_weights(2, 96, 48, seed=2), "nvfp4_w4a16").relayout("split64")
check_fused_gemm_quant("nvfp4_w4a16", 3, 2, 2, 96, 48, "silu_and_mul", dtype=torch.float16, seed=2, qw=qw)   # portable split
check_fused_gemm_quant("fp8_w8a8_channel", 6, 1, 3, 96, 64, None, seed=3)

# %% [markdown]
# ### Split-K
#
# Every scheme in both formats with `SPLIT_K` 2 or 3 (and, for the batched GEMM2, `06`'s compact expert slots) against the same spec: uneven splits, and splits with no K
# tile at all (FP4's `H = 152` is two 128-wide K tiles and GEMM2's `I = 72` one, so three splits leave one or two
# programs summing nothing — they still count in, and the tile still comes out whole). The FP4 weights are in the
# kernel layout (mma128). GEMM1 carries a bf16 bias and gpt-oss's clamped SwiGLU on one scheme in two — the
# non-linear epilogue runs once, in the last split, on the whole sum — and the contiguous GEMM2 applies the router
# weight on the output. Poisoned rows stay NaN. A kernel whose last program kept only its own partial, or summed a
# split twice, misses the spec by the share of the K tiles involved (checked by dropping the loop's first term).

# %%
#| test split_k_catalog
swiglu = Activation("swigluoai", alpha=1.702, limit=0.5)
for i, scheme in enumerate(QUANT_SCHEMES):
    qw = quantize_expert_weights(*random_expert_weights(3, 152, 72, seed=40 + i), scheme).for_kernels()
    act = (SILU, swiglu)[i % 2]
    b13 = torch.randn(3, 144, generator=torch.Generator().manual_seed(i)).to(DEVICE, torch.bfloat16)
    bk = 64 if QUANT_SCHEME_TABLE[scheme].is_fp8 else 128
    cfg = dict(BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=2, SPLIT_K=2 + i % 2)   # 2 and 3 by turns
    check_batched_gemm_quant(scheme, 3, 16, 152, 72, [16, 0, 5], act, seed=i, qw=qw, bias=b13, config=dict(cfg, BLOCK_M=16))
    check_batched_gemm_quant(scheme, 3, 16, 152, 72, [3, 9, 0], None, seed=i, qw=qw, config=dict(cfg, BLOCK_M=16),
                             max_active=2 + i % 2)                # compact expert slots (`06`): exact, then one spare
    check_fused_gemm_quant(scheme, 7, 2, 3, 152, 72, act, seed=i, qw=qw, bias=b13, config=cfg)
    check_fused_gemm_quant(scheme, 7, 2, 3, 152, 72, None, seed=i, qw=qw, config=cfg)
test_fail(lambda: check_batched_gemm_quant("mxfp4_w4a16", 1, 4, 64, 32, [4], None,
                                           config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=0)),
          contains="config['SPLIT_K']: expected >= 1, got 0")
test_fail(lambda: check_batched_gemm_quant("mxfp4_w4a16", 1, 4, 64, 32, [4], None,
                                           config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, TMA=True)),
          contains="config['TMA']: expected it absent or off (the quantized GEMMs have no such variant), got True")

# %% [markdown]
# On the GPU the split comes from `06`'s `split_k_factor`, not a test's override: one DeepSeek-V3-sized expert reached
# by one token (GEMM1's 32 programs become 256, GEMM2's 112 become 448), in both formats and both FP4 schemes.

# %%
#| test split_k_heuristic_gpu
#| gpu
assert split_k_factor(32, 1, 56, _num_sms(), 4) >= 2, "this GPU fills with one expert's GEMM1: the test would not split"
for scheme in ("mxfp4_w4a16", "nvfp4_w4a16"):
    qw = quantize_expert_weights(*random_expert_weights(2, 7168, 2048, seed=3), scheme).for_kernels()
    check_batched_gemm_quant(scheme, 2, 16, 7168, 2048, [1, 0], SILU, qw=qw)      # heuristic: active = E (2) here
    for act in (SILU, None):                                  # seed 1: the one token's slot is local (expert 1)
        check_fused_gemm_quant(scheme, 1, 1, 2, 7168, 2048, act, seed=1, qw=qw)

# %% [markdown]
# ### FP8: the activations quantized in the K loop (1×128 groups and per token)
#
# With 1×128 activation groups (`fp8_w8a8_block`, DeepSeek-V3's scheme) and a 128-wide K tile, the tile of `a` a
# program loads in each K step *is* one scale group of each of its rows. So when the GEMM is handed 16-bit
# activations it does not quantize them in a launch of its own: `_quant_tile_product` loads the bf16/fp16 tile and
# calls `09b`'s `_fp8_quantize_group` on it — the row's |max| / 448 as the scale, the values divided, clamped and
# converted to e4m3 — then runs the same fp8 `dot` with that scale. That saves a launch per GEMM (two per layer) and
# the fp8 copy of the activations and its scale tensor in memory; it costs a re-quantization of the tile in every N
# tile's program (`BLOCK_M × 128` divisions per K step beside a `128 × BLOCK_N` weight tile) and reads the
# activations at 2 bytes an element instead of 1 — at decode they are a few rows against whole experts of weights.
# The helper is the stand-alone quantizer's own code, so **the bits are the same**: the GEMM on bf16 input equals, value
# for value, the GEMM on `fp8_quantize_activations`' output (below, with split-K, a partial last group, an empty
# expert and a NaN). Where the tile's `BLOCK_K` is narrower than the group (a tuned table may say 64), a group spans two
# K steps and the launcher quantizes first (`_fp8_input`; so does every GEMM whose K is below 128: its K tile is narrower
# than a group). **The loop is not the default: measured, it is slower on
# every row** (below), so the launchers quantize in a launch of their own unless `MOE_LIT_FP8_ACT_QUANT=loop` is set
# before import (in one process, `with fp8_activation_path("loop"):`). Per-token scales (`fp8_w8a8_channel`) need the
# whole row first: the program makes one pass over the row's K tiles for its |max| (every split-K program reads the
# whole row, so all of them hold the same scale), then quantizes each tile with it in the loop — `09b`'s token mode,
# bit for bit, at the price of reading a few activation rows twice at decode. A per-tensor scale needs every row of
# the batch before any program starts: it keeps its launch. vLLM's Triton path quantizes in a separate launch
# (`per_token_group_quant_fp8`) before each GEMM.
#
# > **What it costs in instructions (compiled for sm_90 here, no GPU needed).** `nbs/bench/sass_fp4.py` compiles
# > the contiguous GEMM1 (16 × 64 × 128 tile, 4 warps) both ways: the K loop on e4m3 input is 315 instructions a warp
# > (19.7 issue cycles per KB of weights), on bf16 input 853 (53.3). The difference is the quantization: 16 IEEE
# > divisions a thread (`MUFU.RCP`, `FFMA` refinement, `FCHK` and its slow-path call), the |max| reductions, the
# > conversions. (On sm_90 the e4m3 `dot` at `BLOCK_M` = 16 runs as fp16 `HMMA` after a conversion: `F2FP` in both.)
# > 53 cycles a KB is about the rate at which an H200's SM receives weight bytes at the copy bandwidth (≈ 18 B a
# > cycle), so the loop is near the point where issue, not memory, bounds it: whether one launch less beats that is a
# > GPU measurement — `14_bench`'s `bench_quant` times both paths, eager and replayed, on the same rows.
#
# **Measured (H100, 1fe07b0, `bench_quant` after `quant_gpu.sh tune fp8` tuned the tiles for the loop,
# `nbs/bench/quant_bench_fp8tuned_h100_1fe07b0.json`): one launch less does not pay.** GEMM1 + SiLU at decode, eager,
# batched / contiguous, µs:
#
# | scenario | floor | K loop quantizes | quantizer launch, then the GEMM |
# |---|---|---|---|
# | DeepSeek-V3 EP8 | 318 | 1155 / 1280 | 456 / 414 |
# | Qwen3-30B-A3B | 134 | 234 / 299 | 213 / 161 |
# | Mixtral-8x7B | 313 | 674 / 584 | 381 / 361 |
# | gpt-oss-120b | 706 | 1243 / 1519 | 881 / 809 |
#
# The loop's quantization is paid once for each N tile a program covers (32 programs re-quantize the same rows on
# DeepSeek-V3's GEMM1), and its divisions make the K loop issue-bound, as the count above said. The quantizer's launch
# does it once a row. So `FP8_ACT_QUANT` defaults to `"launch"`; the loop stays, bit-identical and tested, for a
# GPU where the balance differs.
#
# With the default path, its tiles re-tuned for it on the same H100 (`quant_gpu.sh`'s `tune_quant.py fp8` at 630ba9b,
# `nbs/bench/quant_bench_h100_630ba9b.json`), GEMM1 + SiLU at decode, µs (% of the floor), eager and replayed:
#
# | scenario | floor | batched eager | batched replayed | contiguous eager | contiguous replayed |
# |---|---|---|---|---|---|
# | DeepSeek-V3 EP8 | 316 | 379 (83 %) | 370 (85 %) | 349 (90 %) | 337 (94 %) |
# | Qwen3-30B-A3B | 134 | 206 (65 %) | 194 (69 %) | 153 (87 %) | 140 (95 %) |
# | Mixtral-8x7B | 311 | 342 (91 %) | 330 (94 %) | 340 (92 %) | 328 (95 %) |
# | gpt-oss-120b | 701 | 832 (84 %) | 821 (85 %) | 799 (88 %) | 786 (89 %) |
#
# Eager is within 1.10× of replayed on every row. The batched Qwen3 row (128 experts, about 4 rows each) stays far
# from its floor, where the contiguous format of the same rows reaches 95 % replayed.
#
# **Why, by Nsight Compute (H100, `nbs/bench/ncu_fp8.sh` at 2345c90, `ncu_fp8_h100_2345c90.txt`): not the GEMM but
# its quantizer.** Qwen3's batched GEMM1 took 138.6 µs and the contiguous one 139.2 µs (88 and 86 % of DRAM peak); the
# batched quantizer before it took 57.7 µs, the contiguous one 5.7 µs. The batched quantizer's grid is (row blocks,
# 16 groups, 128 experts) with 64 rows a program: each expert's single live program loads a 64 × 128 tile under a
# 4-row mask and waits on it, 2048 such programs at 23 % occupancy. Rows a program in the batched layout
# (`nbs/bench/act_quant_sweep.py`, `act_quant_rows_h100_fd9e6e2.json`: the quantizer
# alone on GEMM1's / GEMM2's input, replayed, µs):
#
# | scenario (expected / max rows an expert) | 4 | 8 | 16 | 32 | 64 |
# |---|---|---|---|---|---|
# | DeepSeek-V3 EP8 (32 / 51) | 35.6 / 10.9 | 19.4 / 7.1 | 16.3 / 7.8 | 19.6 / 10.3 | 41.4 / 13.6 |
# | Qwen3-30B-A3B (4 / 9) | 20.8 / 8.4 | 12.0 / 6.5 | 13.2 / 9.4 | 22.3 / 12.2 | 55.1 / 25.6 |
# | Mixtral-8x7B (16 / 21) | 3.7 / 10.0 | 3.8 / 7.2 | 5.6 / 9.2 | 7.7 / 10.5 | 12.5 / 25.0 |
# | gpt-oss-120b (4 / 9) | 29.5 | 16.3 | 17.3 | 30.6 | 80.5 |
#
# 8 rows is the fastest in sum on every row but DeepSeek-V3 (16 there, by 2 µs), so the batched layout takes
# `ACT_QUANT_BATCHED_ROWS` = 8 (`09b`); the contiguous layout keeps 64 (one program a group of 64 tokens, the case its
# 5.7 µs came from). Batched prefill-sized slabs (hundreds of rows an expert) were not timed with it. Fewer programs,
# each taking several groups in turn (a kernel variant tried at ecf327d), did not pay: 8 rows × 2 groups was 4 %
# faster than 8 × 1 in the quantizer-alone sum, GEMM1 + SiLU within 1 % either way, and 4 groups and more were slower
# on every row (`act_quant_sweep_h100_ecf327d.json`) — a program's time is its own chain of load, reduction and
# store, not the grid's size — so the kernel keeps one group a program.
# After (H100, b7a0fbc, `nbs/bench/quant_bench_fp8_h100_b7a0fbc.json`), µs (% of the floor):
#
# | scenario | floor | batched eager | batched replayed | contiguous eager | contiguous replayed |
# |---|---|---|---|---|---|
# | DeepSeek-V3 EP8 | 315 | 353 (89 %) | 346 (91 %) | 348 (91 %) | 336 (94 %) |
# | Qwen3-30B-A3B | 133 | 161 (83 %) | 150 (89 %) | 175 (76 %) | 140 (95 %) |
# | Mixtral-8x7B | 311 | 334 (93 %) | 322 (96 %) | 341 (91 %) | 328 (95 %) |
# | gpt-oss-120b | 701 | 767 (91 %) | 756 (93 %) | 798 (88 %) | 785 (89 %) |
#
# Batched Qwen3 went from 194 to 150 µs replayed, gpt-oss from 821 to 756, and both quantized experts of the batched
# Qwen3 row (GEMM1, GEMM2 and both quantizers, `BatchedTritonQuantExperts`) from 292 to 232 µs. Two rows stay just
# under 90 % replayed: batched Qwen3 (89 %) and contiguous gpt-oss (89 %). The contiguous Qwen3 row's eager time (175
# against 153 µs in the run before, its replay unchanged) is the host's: the benchmark calls the public, checked
# `fused_moe_gemm_quant`, and that run's machine was noisy on the host side (the layer benchmark of the same session
# measured host overheads 2–5× its earlier ones).

# %%
#| test fp8_block_quantized_in_the_k_loop
qw = quantize_expert_weights(*random_expert_weights(3, 320, 96, seed=50), "fp8_w8a8_block")   # K: 128, 128, 64 and 96
wa13 = _weight_kernel_args(qw, "w13")
bf = torch.bfloat16
a16 = torch.zeros(2, 320, dtype=bf, device=DEVICE)
test_eq(_fp8_input(a16, a16, (0, 0, 0), wa13, 128)[3], 1 if FP8_ACT_QUANT == "loop" else 0)   # the default: a launch
test_fail(lambda: fp8_activation_path("sometimes"), contains="mode: expected one of")
with fp8_activation_path("loop"):                              # as MOE_LIT_FP8_ACT_QUANT=loop at import
    assert _fp8_input(a16, a16, (0, 0, 0), wa13, 128)[3] and not _fp8_input(a16, a16, (0, 0, 0), wa13, 64)[3]
    def same(x, y, name):                                          # equal bits, NaN where the other has NaN
        assert torch.equal(x.float().nan_to_num(7.0).cpu(), y.float().nan_to_num(7.0).cpu()), f"{name}: {cfg}"
        assert torch.equal(x.isnan().cpu(), y.isnan().cpu()) and x.isfinite().any(), name
    cnt = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    a = poison_rows(random_activations((3, 8, 320), bf, seed=51), cnt)
    a[2, 5, 7] = float("nan")                                     # its row's group scale is NaN in both paths
    valid = (torch.arange(8, device=DEVICE)[None, :] < cnt[:, None])
    g = torch.Generator().manual_seed(52)
    ids = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(5)]).int()
    local = torch.where(ids < 3, ids, -1).to(DEVICE)               # id 3: another rank's expert
    wts = torch.rand(5, 2, generator=g).to(DEVICE)
    sid, eid, ntp = moe_align_block_size(local, 16, 3)
    hid = random_activations((5, 320), bf, seed=53)
    pair_ok = local.reshape(-1) >= 0
    for cfg in (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),       # the group is the K tile
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=2, SPLIT_K=2),
                dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)):       # two K steps a group: one launch first
        h = batched_moe_gemm_quant(a, qw, cnt, SILU, config=cfg)                            # batched GEMM1, bf16 in
        q, sc = fp8_quantize_activations(a, "group", cnt)
        same(h[valid], batched_moe_gemm_quant(q, qw, cnt, SILU, a_scale=sc, out_dtype=bf, config=cfg)[valid], "GEMM1")
        y = batched_moe_gemm_quant(h, qw, cnt, config=cfg)                                   # batched GEMM2 (K = 192)
        q, sc = fp8_quantize_activations(h, "group", cnt)
        same(y[valid], batched_moe_gemm_quant(q, qw, cnt, a_scale=sc, out_dtype=bf, config=cfg)[valid], "GEMM2")
        c = {k: v for k, v in cfg.items() if k != "BLOCK_M"}
        h = fused_moe_gemm_quant(hid, qw, sid, eid, ntp, 2, 16, SILU, wts, "input", config=c)   # contiguous, token rows
        q, sc = fp8_quantize_activations(hid, "group")
        same(h[pair_ok], fused_moe_gemm_quant(q, qw, sid, eid, ntp, 2, 16, SILU, wts, "input", a_scale=sc, out_dtype=bf,
                                              config=c)[pair_ok], "contiguous GEMM1")
        h[~pair_ok] = float("nan")                                                            # rows GEMM2 never reads
        y = fused_moe_gemm_quant(h, qw, sid, eid, ntp, 2, 16, None, wts, "output", rows="pair", config=c)
        q, sc = fp8_quantize_activations(h, "group")
        same(y[pair_ok], fused_moe_gemm_quant(q, qw, sid, eid, ntp, 2, 16, None, wts, "output", rows="pair", a_scale=sc,
                                              out_dtype=bf, config=c)[pair_ok], "contiguous GEMM2")
    # per token (fp8_w8a8_channel): the row's |max| over K in a first pass, then each tile quantized with it - the same bits
    qc = quantize_expert_weights(*random_expert_weights(3, 320, 96, seed=54), "fp8_w8a8_channel")
    for cfg in (dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=2),
                dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2, SPLIT_K=2)):   # splits read whole rows
        h = batched_moe_gemm_quant(a, qc, cnt, SILU, config=cfg)
        q, sc = fp8_quantize_activations(a, "token", cnt)
        same(h[valid], batched_moe_gemm_quant(q, qc, cnt, SILU, a_scale=sc, out_dtype=bf, config=cfg)[valid], "token GEMM1")
        c = {k: v for k, v in cfg.items() if k != "BLOCK_M"}
        y = fused_moe_gemm_quant(hid, qc, sid, eid, ntp, 2, 16, SILU, wts, "input", config=c)
        q, sc = fp8_quantize_activations(hid, "token")
        same(y[pair_ok], fused_moe_gemm_quant(q, qc, sid, eid, ntp, 2, 16, SILU, wts, "input", a_scale=sc, out_dtype=bf,
                                              config=c)[pair_ok], "token contiguous GEMM1")
    test_eq(_fp8_input(a16, a16, (0, 0, 0), _weight_kernel_args(qc, "w13"), 64)[3], 2)
test_eq(_fp8_input(a16, a16, (0, 0, 0), wa13, 128)[3], 1 if FP8_ACT_QUANT == "loop" else 0)   # restored after the block
# MOE_LIT_FP8_ACT_QUANT=loop (read at import): no quantizer launch, the GEMM quantizes (QUANT_A 1); unset, the launch; a bad value raises
code = ("import torch; from moe_lit.testing import record_launches; from moe_lit.kernels.quant import batched_moe_gemm_quant; "
        "from moe_lit.quant_weights import quantize_expert_weights, random_expert_weights; "
        "qw = quantize_expert_weights(*random_expert_weights(2, 128, 64), 'fp8_w8a8_block'); "
        "dev = 'cuda' if torch.cuda.is_available() else 'cpu'; qw = qw.to(dev) if dev == 'cuda' else qw; "
        "a = torch.randn(2, 4, 128, device=dev).bfloat16(); cnt = torch.tensor([2, 4], dtype=torch.int32, device=dev)\n"
        "with record_launches() as seen: batched_moe_gemm_quant(a, qw, cnt, 'silu_and_mul')\n"
        "print(sorted({k.fn.__name__ for k, _, _ in seen}), [kw.get('QUANT_A') for k, _, kw in seen if 'QUANT_A' in kw])")
env = {**os.environ, **({} if torch.cuda.is_available() else {"TRITON_INTERPRET": "1"})}   # (natively on a GPU, else the interpreter)
for mode, want in (("loop", "['_batched_moe_gemm_quant_kernel'] [1]"), ("", "['_batched_moe_gemm_quant_kernel', '_quantize_fp8_rows_kernel'] [0]")):
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env={**env, "MOE_LIT_FP8_ACT_QUANT": mode})
    test_eq(r.stdout.strip(), want)
r = subprocess.run([sys.executable, "-c", "import moe_lit.kernels.quant"], capture_output=True, text=True,
                   env={**env, "MOE_LIT_FP8_ACT_QUANT": "sometimes"}, timeout=300)
assert r.returncode and "MOE_LIT_FP8_ACT_QUANT: expected 'loop' or 'launch', got 'sometimes'" in r.stderr, r.stderr[-500:]

# %% [markdown]
# The GEMM kernels as Hopper compiles them (`00_testing.assert_compiles_for_gpu`, no GPU needed), in the variants the
# layer's own launches do not reach on a CPU: split-K for every scheme, each FP4 byte order, FP8 block quantized in the
# K loop and, with a 64-wide K tile, pre-quantized.

# %%
#| test quant_gemm_kernels_compile_for_sm90
with fp8_activation_path("loop"):                    # FP8 block quantized in the K loop (MOE_LIT_FP8_ACT_QUANT=loop)
    with record_launches() as seen:
        for i, scheme in enumerate(QUANT_SCHEMES[1:]):
            qw = quantize_expert_weights(*random_expert_weights(2, 128, 64, seed=60 + i), scheme)
            for layout in (FP4_LAYOUTS if not QUANT_SCHEME_TABLE[scheme].is_fp8 else ("plain",)):
                q = qw.relayout(layout) if layout != "plain" else qw
                cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128 if layout != "split64" else 64, num_warps=4, num_stages=2,
                           SPLIT_K=2)
                a = random_activations((2, 16, 128), torch.bfloat16, seed=i)
                cnt = torch.tensor([3, 16], dtype=torch.int32, device=DEVICE)
                batched_moe_gemm_quant(a, q, cnt, SILU, config=cfg)
                ids = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32, device=DEVICE)
                s_, e_, n_ = moe_align_block_size(ids, 16, 2)
                fused_moe_gemm_quant(a[0, :2], q, s_, e_, n_, 2, 16, SILU, config={k: v for k, v in cfg.items() if k != "BLOCK_M"})
            if scheme == "fp8_w8a8_block":                                        # two K steps a group: quantized first
                batched_moe_gemm_quant(a, qw, cnt, SILU, config=dict(cfg, BLOCK_K=64, SPLIT_K=1))
            if scheme == "mxfp4_w4a16":                                           # a scale byte past 128: the two-fma decode
                big = dataclasses.replace(qw, w13_scale=qw.w13_scale.clone().fill_(129)).relayout("mma128")
                batched_moe_gemm_quant(a, big, cnt, SILU, config=dict(cfg, BLOCK_K=128))
                for cap in (None, 96):                        # the tuner's register cap (`14_bench`) reaches ptxas
                    batched_moe_gemm_quant(a, qw.relayout("mma128"), cnt, SILU, config=dict(
                        BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3, **({"maxnreg": cap} if cap else {})))
res = assert_compiles_for_gpu(seen)
tile32 = {r["spec"]["options"].get("maxnreg"): r for r in res if r["spec"]["constexprs"].get("BLOCK_M") == 32}
assert tile32[None]["registers"] > 96 and tile32[96]["registers"] <= 96 and tile32[96]["stack_bytes"] == 0, \
    {k: (r["registers"], r["stack_bytes"]) for k, r in tile32.items()}        # capped without a spill
variants = {(r["kernel"], r["spec"]["constexprs"].get("FMT"), r["spec"]["constexprs"].get("LAYOUT"),
             r["spec"]["constexprs"].get("QUANT_A")) for r in res}
assert ("_batched_moe_gemm_quant_kernel", 1, 0, True) in variants and ("_batched_moe_gemm_quant_kernel", 1, 0, False) in variants
assert {v[2] for v in variants if v[1] == 2} == {0, 1, 2}, variants          # MXFP4 in each byte order
folds = {r["spec"]["constexprs"].get("SCALE_FOLD") for r in res if r["spec"]["constexprs"].get("FMT") == 2
         and r["spec"]["constexprs"].get("LAYOUT") == 2}
test_eq(folds, {True, False})                                                # mma128: the folded and the plain decode
mma = [s for s in seen if s[2].get("LAYOUT") == 2]
test_eq({r["prefetches"] for r in res if r["spec"]["constexprs"].get("LAYOUT") == 2}, {0})   # none by default
os.environ["MOE_LIT_FP4_PREFETCH"] = "2"          # the compiling process imports with it: the K loop asks L2 ahead
try: pre = assert_compiles_for_gpu(mma)
finally: del os.environ["MOE_LIT_FP4_PREFETCH"]
assert pre and all(r["prefetches"] == 2 for r in pre), [(r["kernel"], r["prefetches"]) for r in pre]   # gate and up

# %% [markdown]
# ## gpt-oss's semantics: expert biases and the clamped SwiGLU
#
# gpt-oss ships its experts in MXFP4 with bf16 biases, and its gated activation is the clamped SwiGLU
# `Activation("swigluoai", alpha=1.702, limit=7)`: `gate ← min(gate, limit)`, `up ← clamp(up, −limit, limit)`,
# `out = (up + 1) · gate · σ(alpha · gate)`. The quantized GEMMs take the same arguments as the
# unquantized ones — `activation` (an `Activation`; the launchers also accept `None` and `"silu_and_mul"`) and
# `bias` (the experts of `09d_kernels.quant_experts` take `w13_bias`/`w2_bias`) — and compute, in fp32 on the real-valued product,
#
# - GEMM1: `h = act(x·W13ᵀ + b13)`, or `act(rw·(x·W13ᵀ) + b13)` with the router weight on the input;
# - GEMM2: `y = h·W2ᵀ + b2`, times `rw` when the router weight is applied on the output (Standard format).
#
# The test below holds every quantized GEMM to the float64 spec on the dequantized weights with the tolerance of
# the sections above: relative error < 1e-2 and cosine > 0.9999.
# `limit = 0.5` sits well inside the O(1) pre-activations of the test problems, so both clamps bite (checked). The
# biases come in bf16 for `w13` and fp32 for `w2`.
#
# > **Why FP8 channel is in the GEMM test.** For the FP8 tensor and channel schemes the scales are applied after the
# > K loop (`_quant_output_scales`), and so is NVFP4's global scale; a bias added to the accumulator before them
# > would be multiplied by `a_scale · w_scale` (about 1e-4 here) or by the global scale. FP8 blocks
# > and MXFP4 scale inside the loop, so only FP8 channel (or tensor) and NVFP4 tell the two orders apart — a kernel
# > that adds the bias before the scales fails this test at relative errors of 0.1–0.7 (checked by moving the add).

# %%
#| test quant_gemm_swigluoai_bias
act = Activation("swigluoai", limit=0.5)
E, M, H, I, counts = 3, 16, 152, 72, [16, 0, 5]            # an empty expert; partial N and K tiles; FP4 pads K
cnt = torch.tensor(counts, dtype=torch.int32, device=DEVICE)
valid = (torch.arange(M)[None, :] < cnt.cpu()[:, None])
for i, scheme in enumerate(("mxfp4_w4a16", "nvfp4_w4a16", "fp8_w8a8_block", "fp8_w8a8_channel")):
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=70 + i), scheme)
    g = torch.Generator().manual_seed(80 + i)
    b13 = torch.randn(E, 2 * I, generator=g).to(DEVICE, torch.bfloat16)
    b2 = torch.randn(E, H, generator=g).to(DEVICE)
    pre = batched_gemm_quant_reference(random_activations((E, M, H), torch.bfloat16, 1), qw, cnt, weight="w13", bias=b13)
    pre = pre.cpu()[valid]                                   # the helper's activations (seed + 1): the clamps bite
    assert (pre[:, :I] > 0.5).any() and (pre[:, :I] < 0.5).any() and (pre[:, I:].abs() > 0.5).any(), scheme
    check_batched_gemm_quant(scheme, E, M, H, I, counts, act, qw=qw, bias=b13)
    check_batched_gemm_quant(scheme, E, M, H, I, counts, None, qw=qw, bias=b2)
    check_fused_gemm_quant(scheme, 9, 2, E, H, I, act, qw=qw, bias=b13)   # rw on the input: scales the product, not b13
    check_fused_gemm_quant(scheme, 9, 2, E, H, I, None, qw=qw, bias=b2)   # rw on the output: weights b2 too

# %% [markdown]
# ## Bad input
#
# Every argument error names the argument, what was expected and what came.

# %%
#| test quant_block_m
qw = quantize_expert_weights(*random_expert_weights(2, 64, 32), "nvfp4_w4a16")
for m in (1, 7, 40, 1000):
    bm = quant_block_m(qw, m)
    assert bm >= 16 and bm & (bm - 1) == 0, (m, bm)
test_fail(lambda: quant_block_m(qw, 0), contains="expected_m: expected >= 1, got 0")
for m, bm in ((1, 16), (4, 16), (16, 32), (32, 64)):                       # one M tile per expert at decode
    t = fp4_default_tile(8, 4096, 7168, m, torch.bfloat16)
    test_eq(t["BLOCK_M"], bm if not INTERPRET else default_tile_config(8, 4096, 7168, m, torch.bfloat16)["BLOCK_M"])
test_fail(lambda: quant_block_m(qw.w13, 4), contains="qw: expected a QuantizedExpertWeights, got Tensor")
test_fail(lambda: fp4_default_tile(8, 4096, 7168, 2.5, torch.bfloat16), contains="M: expected an int")   # checked like
test_fail(lambda: fp4_default_tile(0, 4096, 7168, 2, torch.bfloat16), contains="E: expected >= 1")       # the heuristic
with tempfile.TemporaryDirectory() as d:                  # a tuned table's BLOCK_M is the alignment block: checked
    name = torch.cuda.get_device_name() if torch.cuda.is_available() and not INTERPRET else "cpu"   # the tables' key
    p = tile_config_path("fused_moe_gemm_w4a16", 2, 64, name, torch.bfloat16, d)
    p.parent.mkdir(parents=True); p.write_text(json.dumps({"2": dict(BLOCK_M=512, BLOCK_N=64, BLOCK_K=64)}))
    os.environ["MOE_LIT_TILE_CONFIG_DIR"] = d
    try: test_fail(lambda: quant_block_m(qw, 2), contains="expected GEMM1's BLOCK_M to be a power of two in [16, 256], got 512")
    finally: del os.environ["MOE_LIT_TILE_CONFIG_DIR"]

# %%
#| test quant_gemm_bad_input
E, M, H, I = 2, 8, 64, 32
qw8 = quantize_expert_weights(*random_expert_weights(E, H, I), "fp8_w8a8_block")
qw4 = quantize_expert_weights(*random_expert_weights(E, H, I), "mxfp4_w4a16")
a = random_activations((E, M, H), torch.bfloat16)
cnt = torch.tensor([3, 8], dtype=torch.int32, device=DEVICE)
test_fail(lambda: batched_moe_gemm_quant(a.float(), qw4, cnt, "silu_and_mul"), contains="a: expected dtype torch.bfloat16 or torch.float16")
test_fail(lambda: batched_moe_gemm_quant(a.to(torch.float8_e4m3fn), qw4, cnt, "silu_and_mul"), contains="a: expected dtype torch.bfloat16")
test_fail(lambda: batched_moe_gemm_quant(a.to(torch.float8_e4m3fn), qw8, cnt, "silu_and_mul"),
          contains="a_scale: expected float32 scales of shape [2, 8, 1]")
test_fail(lambda: batched_moe_gemm_quant(a.to(torch.float8_e4m3fn), qw8, cnt, "silu_and_mul", a_scale=torch.ones(2, 8, 2, device=DEVICE)),
          contains="a_scale: expected shape [2, 8, 1]")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt, "silu_and_mul", a_scale=torch.ones(2, 8, 1, device=DEVICE)),
          contains="a_scale: expected None")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt), contains="a: expected K = 32 (intermediate_size of w2)")
# the float64 specs refuse what would silently compute the wrong rows
for bad in ([-1, 8], [3, 9]):
    test_fail(lambda: batched_gemm_quant_reference(a, qw8, torch.tensor(bad, dtype=torch.int32), "silu_and_mul"),
              contains=f"expert_num_tokens: expected values in [0, 8] (max_tokens), got {bad}")
test_fail(lambda: batched_gemm_quant_reference(a, 5, cnt, "silu_and_mul"), contains="qw: expected a QuantizedExpertWeights, got int")
ids = torch.tensor([[0, 5], [1, -1]], dtype=torch.int32)
test_fail(lambda: fused_moe_gemm_quant_reference(a[0, :2], qw8, ids, "silu_and_mul"), contains="local_ids: expected values in [-1, 2), got [-1, 5]")
test_fail(lambda: fused_moe_gemm_quant_reference(a[0, :2], qw8, ids.clamp(max=1), "silu_and_mul", rows="foo"),
          contains="rows: expected one of ['token', 'pair'], got 'foo'")
q8, s_ok = a.to(torch.float8_e4m3fn), torch.ones(2, 8, 1, device=DEVICE)
s_ok[0, 3:] = float("nan")                           # past expert 0's 3 rows: never read, not checked
batched_moe_gemm_quant(q8, qw8, cnt, "silu_and_mul", a_scale=s_ok)
for bad in (-1.0, float("inf"), -float("inf"), 3e38):   # a caller's scale the kernels would read: refused, by value
    s_bad = s_ok.clone(); s_bad[1, 7] = bad
    test_fail(lambda: batched_moe_gemm_quant(q8, qw8, cnt, "silu_and_mul", a_scale=s_bad),
              contains=f"a_scale: expected scales in [0, 7.596e+35] on the rows the kernels read (NaN marks a NaN input), got {s_bad[1, 7, 0].item()}")
    batched_moe_gemm_quant(q8, qw8, cnt, "silu_and_mul", a_scale=s_bad, validate=False)    # unchecked: the caller's word
ids = torch.tensor([[0, 1], [1, 0], [0, 1]], dtype=torch.int32, device=DEVICE)
al, x8 = moe_align_block_size(ids, 16, E), random_activations((3, H), torch.bfloat16).to(torch.float8_e4m3fn)
sc = torch.ones(3, 1, device=DEVICE); sc[2, 0] = -2.0
test_fail(lambda: fused_moe_gemm_quant(x8, qw8, *al, 2, 16, "silu_and_mul", a_scale=sc), contains="a_scale: expected scales in [0, ")
fused_moe_gemm_quant(x8, qw8, *al, 2, 16, "silu_and_mul", a_scale=sc.abs())
test_fail(lambda: fused_moe_gemm_quant(x8, qw8, *al, 2, 16, "silu_and_mul", a_scale=sc, validate=1), contains="validate: expected a bool")
wide = random_activations((E, M, 2 * H), torch.bfloat16)                         # GEMM2 in place over its own input:
test_fail(lambda: batched_moe_gemm_quant(wide[..., :I], qw4, cnt, out=wide[..., :H]),   # later tiles would read
          contains="out: expected a buffer that does not overlap a")                      # overwritten activations
test_fail(lambda: batched_moe_gemm_quant(a[:, :, :48], qw8, cnt, "silu_and_mul"), contains="a: expected K = 64 (hidden_size of w13)")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt, weight="w3"), contains="weight: expected one of")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt, "gelu"), contains="activation: expected one of")
test_fail(lambda: batched_moe_gemm_quant(a[:1], qw8, cnt[:1], "silu_and_mul"), contains="a: expected 2 experts in dim 0")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt + 1, "silu_and_mul"), contains="expert_num_tokens: expected values in [0, 8]")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt, "silu_and_mul", out=torch.empty(E, M, I, device=DEVICE)),
          contains="out: expected dtype torch.bfloat16")
test_fail(lambda: batched_moe_gemm_quant(a, qw8, cnt, "silu_and_mul", out_dtype=torch.float16),
          contains="out_dtype: expected torch.bfloat16")
test_fail(lambda: batched_moe_gemm_quant(a, (qw8.w13, qw8.w2), cnt, "silu_and_mul"), contains="qw: expected a QuantizedExpertWeights")
ids = torch.tensor([[0, 1], [1, -1]], dtype=torch.int32, device=DEVICE)
s, e, n = moe_align_block_size(ids, 16, E)
test_fail(lambda: fused_moe_gemm_quant(a[0, :2], qw8, s, e, n, 2, 16, "silu_and_mul", weight_stage="input"),
          contains="topk_weights: expected a torch.Tensor")
tw = torch.rand(2, 2, device=DEVICE)
test_fail(lambda: fused_moe_gemm_quant(a[0, :2], qw4, s, e, n, 2, 16, "silu_and_mul", tw, "output"),
          contains="weight_stage: expected None or 'input' with a gated activation")
test_fail(lambda: fused_moe_gemm_quant_reference(a[0, :2], qw4, ids, "silu_and_mul", tw, "output"),
          contains="weight_stage: expected None or 'input' with a gated activation")
test_fail(lambda: batched_moe_gemm_quant(a, qw4, cnt, "silu_and_mul", config=dict(BLOCK_N=32, BLOCK_K=32)),
          contains="config: expected a BLOCK_M")
test_fail(lambda: batched_moe_gemm_quant(a, qw4, cnt.to("meta"), "silu_and_mul"),
          contains="expert_num_tokens: expected device")
test_fail(lambda: fused_moe_gemm_quant(a[0, :2], qw4, s.to("meta"), e, n, 2, 16, "silu_and_mul"),
          contains="sorted_token_ids: expected device")
test_fail(lambda: quant_block_m(qw4, 4, torch.float32), contains="dtype: expected one of")
for q in (qw4, qw8):                 # a contiguous override leaves BLOCK_M to the alignment (the GPU's fit sizes by it)
    got = fused_moe_gemm_quant(a[0, :2], q, s, e, n, 2, 16, "silu_and_mul", config=dict(BLOCK_N=32, BLOCK_K=32))
    want = fused_moe_gemm_quant_reference(a[0, :2], q, ids, "silu_and_mul")
    ok = ids.reshape(-1) >= 0
    assert_quant_close(got[ok].cpu(), want[ok].cpu(), 1e-2, 0.9999, name=f"{q.scheme} override without BLOCK_M")
test_fail(lambda: fused_moe_gemm_quant(a[0, :3, :32], qw8, s, e, n, 2, 16, rows="pair"), contains="a: expected a multiple of top_k=2")
test_fail(lambda: fused_moe_gemm_quant(a[0, :2], qw8, s, e[:1], n, 2, 16, "silu_and_mul"), contains="expert_ids: expected shape")

# %% [markdown]
# ## On the GPU
#
# These run with `pytest -m gpu tests/test_kernels_quant.py` (or `nbdev_test --flags gpu`) on an H200, at real
# shapes: DeepSeek-V3 at EP8 decode (32 local experts, H = 7168, I = 2048, FP8 with 128×128 blocks, max 128 rows per
# expert, 1024 rows; Standard format: 128 tokens, top-8) and gpt-oss-120b at decode (128 experts, H = I = 2880,
# MXFP4; max 64 rows, 512 rows; 64 tokens, top-4). Counts include 0, 1, 17 and the capacity every time.

# %%
#| test quant_gemm_real_shapes
#| gpu
for scheme, E, H, I, M, rows, T, k in (("fp8_w8a8_block", 32, 7168, 2048, 128, 1024, 128, 8),
                                       ("mxfp4_w4a16", 128, 2880, 2880, 64, 512, 64, 4)):
    g = torch.Generator().manual_seed(E)
    counts = torch.bincount(torch.randint(0, E, (rows,), generator=g), minlength=E).clamp(max=M)
    counts[:4] = torch.tensor([0, 1, 17, M])                                 # the edge counts, every time
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=E, device="cuda", dtype=torch.bfloat16), scheme)
    for act in ("silu_and_mul", None):
        check_batched_gemm_quant(scheme, E, M, H, I, counts.tolist(), act, device="cuda", seed=E, qw=qw)
        check_fused_gemm_quant(scheme, T, k, E, H, I, act, device="cuda", seed=E, qw=qw)

# %% [markdown]
# Every scheme at Qwen3-30B-A3B's decode shape (128 experts, H = 2048, I = 768), both formats, bf16 and fp16:

# %%
#| test quant_gemm_all_schemes_gpu
#| gpu
E, H, I, M = 128, 2048, 768, 64
g = torch.Generator().manual_seed(0)
counts = torch.bincount(torch.randint(0, E, (512,), generator=g), minlength=E).clamp(max=M)
counts[:4] = torch.tensor([0, 1, 17, M])
for scheme in QUANT_SCHEMES:
    qw = quantize_expert_weights(*random_expert_weights(E, H, I, seed=1, device="cuda"), scheme)
    for act in ("silu_and_mul", None):
        for dtype in (torch.bfloat16, torch.float16):
            check_batched_gemm_quant(scheme, E, M, H, I, counts.tolist(), act, dtype=dtype, device="cuda", seed=1, qw=qw)
            check_fused_gemm_quant(scheme, 64, 8, E, H, I, act, dtype=dtype, device="cuda", seed=2, qw=qw)

# %% [markdown]
# Offsets past 2^31: with `E·N·K > 2^31` fp8 codes the last expert's weights start beyond the int32 range; the
# kernels reach them through an int64 expert offset (batched) and int64 expert / token offsets (contiguous).

# %%
#| test quant_gemm_int64_offsets
#| gpu
E, H, I = 40, 7168, 4096                                   # w13: 40 · 8192 · 7168 = 2.35e9 fp8 bytes
w13 = torch.empty(E, 2 * I, H, dtype=torch.float8_e4m3fn, device="cuda")
w2 = torch.empty(E, H, I, dtype=torch.float8_e4m3fn, device="cuda")
for e in range(E):
    w13[e] = (torch.randn(2 * I, H, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    w2[e] = (torch.randn(H, I, device="cuda") * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
qw = QuantizedExpertWeights("fp8_w8a8_channel", w13, torch.rand(E, 2 * I, 1, device="cuda") / 64 / H**0.5, w2,
                            torch.rand(E, H, 1, device="cuda") / 64 / I**0.5, hidden_size=H, intermediate_size=I)
cnt = torch.zeros(E, dtype=torch.int32, device="cuda"); cnt[0], cnt[-1] = 3, 16
a = random_activations((E, 16, H), torch.bfloat16, seed=4, device="cuda")
got = batched_moe_gemm_quant(a, qw, cnt, "silu_and_mul")
want = batched_gemm_quant_reference(a, qw, cnt, "silu_and_mul")
for e in (0, E - 1):
    assert_quant_close(got[e, :int(cnt[e])], want[e, :int(cnt[e])], name=f"expert {e}")
local = torch.tensor([[0, E - 1], [E - 1, -1]], dtype=torch.int32, device="cuda")
s, eids, n = moe_align_block_size(local, 16, E)
got = fused_moe_gemm_quant(a[0, :2], qw, s, eids, n, 2, 16, "silu_and_mul")
want = fused_moe_gemm_quant_reference(a[0, :2], qw, local, "silu_and_mul")
assert_quant_close(got[:3], want[:3])


# %% [markdown]
# ## Interpretation
#
# **What is checked here (CPU, Triton interpreter).** Every scheme in both formats, GEMM1 with fused SiLU-and-mul and
# GEMM2, matches its float64 spec (relative error < 1e-2, cosine > 0.9999), padding rows and rows of non-local pairs are never written, the activation quantizer equals
# `quantize_fp8` value for value, and permuted scales fail the same checks by a wide margin. gpt-oss's semantics —
# expert biases and the clamped SwiGLU with clamps that bite — hold to the same bounds for MXFP4, NVFP4 and FP8
# (block and channel) in both formats, with the bias added after every quantization scale. What the interpreter
# cannot show: tensor-core numerics (the fp8 MMA's reduced-precision accumulation inside a K tile, which the
# per-tile `dot` bounds), whether the tiles compile within the register and shared-memory budget on sm_90, and speed.
#
# **Performance (measured).** `14_bench`'s `bench_quant` times GEMM1 with the fused SiLU-and-mul of both formats on
# one H200 against the weight-bytes floor (the checkpoint's codes and scales of GEMM1's weight `w13` for the experts the
# batch routes to, plus the activations in and out, at the measured copy bandwidth); the run is committed as `nbs/bench/quant_bench_h200_swapab.json`, with the FP4 tile tables it used
# (`moe-lit bench --tune w4a16`, sweep in `nbs/bench/tune_quant_h200_swapab.json`). FP8 with 128×128 blocks reaches
# 75–86 % of its floor at DeepSeek-V3's EP8 decode shape and 78–82 % on Mixtral and gpt-oss (batched / contiguous).
# FP4 reaches 19–27 % (DeepSeek-V3 615 µs, Mixtral 504 µs, Qwen3 203 µs, gpt-oss 993 µs, MXFP4 batched), up from
# 14–22 % before the operand swap and the tuned tables (`quant_bench_h200_498b446.json`: 887, 845, 239, 1222 µs), and
# still about as slow as bf16 in absolute time. The sweep shows where the time goes: a program's cost is the weights
# it decodes, so a second M tile per expert doubles it (DeepSeek-V3 at 32 rows per expert: 614 µs with
# `BLOCK_M` = 64, 1173 µs with 32), and in that sweep the fastest tiles were the narrowest K steps (`BLOCK_K` = 64) —
# the K loop is bound by the instructions per decoded element, not by memory. Two alternatives measured in the same run
# (`nbs/bench/fp4_variants.py`, `fp4_variants_h200_*.json`) are no faster: Triton's own `tl.dot_scaled` (MXFP4 only)
# 554 µs on Mixtral, and the scale multiply in bf16 instead of fp32 within ±10 %. Reaching the floor needs fewer
# instructions per code. The packed PTX decode above (eight codes from one 32-bit word, 22 instructions) is that
# step, and the default on the GPU: with the same tile tables (tuned for the portable decode) it takes Qwen3-30B-A3B
# from 203 to 152 µs (MXFP4) and 221 to 172 µs (NVFP4), Mixtral from 504 to 443 and 530 to 476 µs (batched; 26–33 %
# of the floor; `nbs/bench/quant_ptx_h200_99b06dc.log`). The stand-alone K-loop variants of the same run
# (`fp4_variants_h200_ptx.json`, no activation, best of two tiles) reach 382 µs on Mixtral MXFP4 with the plain
# layout and 344 µs (35 % of the floor) with the nibbles re-laid so that a byte holds codes j and j+32 of a 64-code
# chunk (no `tl.join`), Qwen3 145 → 120 µs (43 %) — but on DeepSeek-V3 MXFP4 the re-laid loop was slower there (478 →
# 531 µs). That re-layout became the layer's then (**split64**, `09a`; the kernels' `LAYOUT == 1` path above, since
# replaced by mma128, below), and the tiles were re-tuned for it (`nbs/bench/quant_gpu.sh tune`, sweep `tune_quant_h200_split_3a67d16.json`). Same run, same inputs,
# GEMM1 + SiLU batched, plain bytes → split64 (`quant_bench_h200_split_7a54c45.json`): DeepSeek-V3 EP8 MXFP4 542 →
# 425 µs, NVFP4 591 → 446; Qwen3-30B-A3B 152 → 146 and 172 → 156; Mixtral 436 → 348 and 471 → 368; gpt-oss 683 →
# 627 and 773 → 723 — faster on every row, both formats (DeepSeek-V3 included, unlike the stand-alone loop). With the
# re-tuned tiles (`quant_bench_h200_split_3a67d16.json`, both formats, both schemes) FP4 reaches 27.6–29.0 % of its
# floor on DeepSeek-V3 (MXFP4 batched 423 µs), 34.5–37.5 % on Qwen3 (135 µs), 33.6–34.0 % on Mixtral (350 µs) and
# 37.9–42.3 % on gpt-oss (627 µs): MXFP4 batched is 1.4–1.6× faster than the swapped-operand kernel's
# 615 / 203 / 504 / 993 µs, each FP4 row 1.02–1.55× faster than the bf16 batched GEMM of the same run, and 2.4–3.6× from
# the floor. Tuned tables go under the kernel names
# `batched_moe_gemm_fp8`, `batched_moe_gemm_w4a16`, `fused_moe_gemm_fp8` and `fused_moe_gemm_w4a16`; the contiguous
# GEMMs' alignment block is GEMM1's `BLOCK_M` (`quant_block_m`). Where no FP4 table entry is near, `fp4_default_tile`
# takes the sweep's rule: `BLOCK_M` covers an expert's rows in one tile, 64 weight rows, 64-wide K steps, 4 warps,
# 3 stages — the best tile or within 3 % of it on every decode row of the plain layout's sweep; with split64 the
# sweep picks `BLOCK_K` = 128 on Qwen3 (the heuristic is 7 % slower there) and `BLOCK_N` = 128 for the contiguous
# DeepSeek-V3 GEMM (4 %).
#
# **Scale prefetch and mma128 (measured).** Loading the scales a K tile ahead alone moved FP4 by 0–13 % (the
# split64 rows re-tuned: `quant_bench_h200_prefetch_21d206f.json`, MXFP4 batched DeepSeek-V3 425 → 398 µs, Qwen3
# 146 → 144, Mixtral 348 → 331, gpt-oss 627 → 601); the loop was bound by instructions, not by that latency.
# `nbs/bench/sass_fp4.py` counts them: compiled for sm_90 on any machine (Triton's bundled ptxas and nvdisasm), the
# K loop of GEMM1 + SiLU takes 86–123 instructions per KB of codes a warp with split64 or the plain bytes, a third of
# them moving the decoded tile (`ldmatrix` + stores + barriers for plain, single-byte shared loads + `prmt` for
# split64) — and 74–77 with mma128, where the loop has no shared-memory round trip left (`sass_fp4_sm90.log`, counted
# with the e8m0 byte-0 floor below, one `max` a word more than the code the H200 timed). On the
# H200 (`quant_bench_h200_mma128_8dcf083.json`, tiles re-tuned for it: `tune_quant_h200_mma128_8dcf083.json`,
# GEMM1 + SiLU, batched / contiguous): MXFP4 DeepSeek-V3 EP8 336 / 367 µs (36 / 33 % of the floor), Qwen3-30B-A3B
# 109 / 106 (47 / 48 %), Mixtral 260 / 264 (45 %), gpt-oss 483 / 517 (55 / 51 %); NVFP4 342 / 374, 110 / 112,
# 269 / 274, 513 / 560 (34–55 %). Against split64 with the prefetch, same tables' sweep: 1.19–1.59× faster on every
# row (NVFP4 most: its scales decode inside the PTX block now). Each batched FP4 row is 1.38–2.0× faster than the bf16
# batched GEMM of the same run (472 / 196 / 458 / 967 µs), the DeepSeek-V3 contiguous rows 1.26–1.29×. The tuner
# picked 64 weight rows, 4 warps, 3 stages and one M tile per expert everywhere. The floor was still 1.8–3.0× away:
# half of that loop was the decode itself (per word, at that commit, 2 `prmt` + 4 × (`and`, `mul.lo`, `and`, 2 bf16x2
# `fma`)); the scale fold and the bits placed at load (above) have since cut it to eight integer operations and four
# `fma`s a word for MXFP4 (timed on an H100 above: 0–6 % faster).
#
# **The seed scenario's rank 0** (`nbs/bench/seed_scenario.py`, `seed_scenario_h200_2fa7b89.json`): DeepSeek-V3 EP8,
# NIXL EP (batched format), round-robin placement, the whole layer replayed as a CUDA graph — routing, dispatch,
# both GEMMs, combine and the shared expert. bf16 takes 75 / 667 / 823 µs at T = 1 / 64 / 256, NVFP4 209 / 749 /
# 950 µs and MXFP4 266 / 772 / 868 µs; every run matches its float64 reference (max relative error ≤ 5.6e-3,
# cosine ≥ 0.999995). That run predates the PTX decode and split64; then FP4 read 0.53–0.56 bytes a weight instead
# of 2 and was still slower than bf16 at every T. Re-measured with mma128 and the prefetch
# (`seed_scenario_h200_b33af56.json`, same script): bf16 75 / 639 / 835 µs, NVFP4 143 / 427 / 542 µs, MXFP4 124 /
# 397 / 556 µs, every run within its reference bounds (max relative error ≤ 6.1e-3, cosine ≥ 0.999995): **FP4 is now
# the faster layer at T = 64 and 256 (1.5–1.6×)**, and still slower at T = 1. The profile of that case
# (`nbs/bench/profile_seed_t1.py`, `profile_seed_t1_h200_b33af56.log`) shows why: with one token the rank's FP4 GEMMs
# run one expert, 64 programs of 64 weight rows for GEMM1, one 4-warp program an SM, so nothing hides the decode's
# dependent-instruction latency: 93 µs of quant GEMM in a 165 µs replay (where that run's bf16 token reached no local
# expert). **Split-K** (`06`, a third grid axis whose last program sums the partials and runs the epilogue) now
# divides those programs' K loops: with the same one-expert token the FP4 GEMMs take 41–43 µs
# (`profile_seed_t1_h200_0c2b3a1.log`), against 56 µs for bf16's; one expert's FP4 GEMM1 alone drops from 54–58 to
# 23–25 µs (`14_bench`'s split sweep). That is still 6× its floor: a few programs an SM do not hide the decode chain,
# only fewer instructions would. (The layer also keeps the dequantized weights beside the codes, for its references:
# a quantized layer does not save memory yet.)

# %% [markdown]
# Inputs the host does not check on the hot path are still safe: a negative or huge pair index and an expert id past
# the local experts are masked in the kernel, and a NaN (or inf) activation makes its own row NaN under token and
# group scales — it never turns into a finite number. Ids, block sizes and tiles the host can check raise.

# %%
#| test quant_unchecked_inputs_are_safe
w13, w2 = random_expert_weights(2, 64, 64, seed=7)
ids = torch.tensor([[0, 1], [1, 0], [0, -1]], dtype=torch.int32, device=DEVICE)
hid = random_activations((3, 64), torch.bfloat16, seed=8)
for scheme in ("fp8_w8a8_block", "mxfp4_w4a16"):
    qw = quantize_expert_weights(w13, w2, scheme)
    s, e, n = moe_align_block_size(ids, 16, 2)
    big = torch.full((20, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    s_bad = s.clone(); s_bad[0] = -1
    fused_moe_gemm_quant(hid, qw, s_bad, e, n, 2, 16, "silu_and_mul", out=big[10:16])
    assert big[:10].isnan().all() and big[16:].isnan().all(), scheme            # nothing written outside `out`
    e_bad = e.clone(); e_bad[0] = 7
    out = fused_moe_gemm_quant(hid, qw, s, e_bad, n, 2, 16, "silu_and_mul",
                               out=torch.full((6, 64), float("nan"), dtype=torch.bfloat16, device=DEVICE))
    assert out[s[:16][s[:16] < 6].long()].isnan().all(), scheme                 # the unknown expert's block is skipped
    test_fail(lambda: fused_moe_gemm_quant(hid, qw, s, e, n, 2, 16, "silu_and_mul", config=dict(BLOCK_K=32)),
              contains="config: expected a BLOCK_N")
x = random_activations((4, 64), torch.bfloat16, seed=9); x[1, 3] = float("nan")
for gran in ("token", "group"):                     # the NaN's scale is NaN (the codes of a NaN are not portable:
    q, sc = fp8_quantize_activations(x, gran)        # the interpreter's e4m3 cast has no NaN), the other rows' finite
    assert sc[1, 0].isnan() and sc[[0, 2, 3]].isfinite().all(), gran
    xi = x.clone(); xi[1, 3] = float("inf")           # an inf too: NaN, as per tensor (not an inf scale, whose row would
    assert fp8_quantize_activations(xi, gran)[1][1, 0].isnan(), gran   # come out NaN or ±inf by the tiling)
qw = quantize_expert_weights(w13, w2, "fp8_w8a8_block")
cnt = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
y = batched_moe_gemm_quant(torch.stack([x, x]).to(DEVICE), qw, cnt, "silu_and_mul").float().cpu()
assert y[0, 1].isnan().all() and y[0, [0, 2, 3]].isfinite().all()             # the NaN token's row only
xi = x.clone(); xi[1, 3] = float("inf")
for bk in (32, 64, 128):                                                       # inf: the row NaN in every tiling
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=bk, num_warps=4, num_stages=1)
    y = batched_moe_gemm_quant(torch.stack([xi, xi]).to(DEVICE), qw, cnt, "silu_and_mul", config=cfg).float().cpu()
    assert y[0, 1].isnan().all() and y[0, [0, 2, 3]].isfinite().all(), bk
for bad in (float("inf"), float("nan")):
    x[1, 3] = bad
    q, sc = fp8_quantize_activations(x, "tensor")
    assert sc.isnan().all(), bad                                                # inf or NaN in a per-tensor scale: NaN, loudly
test_fail(lambda: fp8_quantize_activations(x, "group", group_k=24), contains="group_k: expected a power of two")
