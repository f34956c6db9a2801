"""Exploration: FP4 (e2m1) weight-only GEMM1 K-loop designs at the decode scenarios, one GPU run.

Every variant computes out[e, :n_e] = a[e, :n_e] @ deq(W[e])^T (no activation) from the same codes and scales and is
checked against a float32 dequantize-then-matmul; times are CUDA-graph replays (median). Run on a CUDA machine:
    python nbs/bench/fp4_variants.py [out.json]
"""
import json, sys
import torch, triton, triton.language as tl
import triton.testing
from moe_lit.bench import SCENARIOS, routed_counts, measure_device


@triton.jit
def _e2m1_fp16(code):
    c = code.to(tl.uint16)
    return (((c & 7) << 9) | ((c & 8) << 12)).to(tl.float16, bitcast=True)


@triton.jit
def _scale_f32(s, NV: tl.constexpr):
    "Scale bytes -> fp32 times 2^14 (the fp16 trick's 2^-14 folded in)."
    if NV: f = s.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else: f = (s.to(tl.int32) << 23).to(tl.float32, bitcast=True)
    return f * 16384.0


@triton.jit
def _fp4_groupscale_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                           s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                           NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    "Variant B: even/odd activation columns loaded apart; one scale per (group, n) broadcast over the group."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // G)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[:, None] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[None, :] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[None, :] * s_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_lo = tl.load(a_base + (k0 + 2 * offs_j)[None, :], mask=mm[:, None], other=0.0)
        a_hi = tl.load(a_base + (k0 + 2 * offs_j + 1)[None, :], mask=mm[:, None], other=0.0)
        b = tl.load(w_base + (k0 // 2 + offs_j)[:, None], mask=mn[None, :], other=0)
        s = _scale_f32(tl.load(s_base + (k0 // G + offs_g)[:, None], mask=mn[None, :], other=0), NV)
        s = tl.reshape(tl.broadcast_to(s[:, None, :], (BLOCK_K // G, G // 2, BLOCK_N)), (BLOCK_K // 2, BLOCK_N))
        lo = (_e2m1_fp16(b & 0xF).to(tl.float32) * s).to(tl.bfloat16)
        hi = (_e2m1_fp16(b >> 4).to(tl.float32) * s).to(tl.bfloat16)
        acc = tl.dot(a_lo, lo, acc)
        acc = tl.dot(a_hi, hi, acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[:, None] * s_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _fp4_postscale_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                          s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                          NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr):
    "Variant C: unscaled codes decoded straight to bf16 (exact), one dot per scale group, the scale on the fp32 partial."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, G)                        # one group: G values, G/2 bytes, each byte read for two k
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[:, None] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[None, :] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n * s_sn
    shift = ((offs_k % 2) * 4).to(tl.uint8)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for gi in tl.static_range(BLOCK_K // G):
            kk = k0 + gi * G
            a = tl.load(a_base + (kk + offs_k)[None, :], mask=mm[:, None], other=0.0)
            b = tl.load(w_base + (kk // 2 + offs_k // 2)[:, None], mask=mn[None, :], other=0)
            w = _e2m1_fp16((b >> shift) & 0xF).to(tl.bfloat16)
            s = _scale_f32(tl.load(s_base + kk // G, mask=mn, other=0), NV)
            acc += tl.dot(a, w) * s[None, :]
    tl.store(c_ptr + e64 * s_ce + offs_m[:, None] * s_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _fp4_dupload_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                        s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                        NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    "Variant E: [BLOCK_K, BLOCK_N] natural-order weight tile (each byte read for both k), scale gathered per element."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[:, None] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[None, :] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[None, :] * s_sn
    shift = ((offs_k % 2) * 4).to(tl.uint8)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_base + (k0 + offs_k)[None, :], mask=mm[:, None], other=0.0)
        b = tl.load(w_base + (k0 // 2 + offs_k // 2)[:, None], mask=mn[None, :], other=0)
        s = _scale_f32(tl.load(s_base + ((k0 + offs_k) // G)[:, None], mask=mn[None, :], other=0), NV)
        w = (_e2m1_fp16((b >> shift) & 0xF).to(tl.float32) * s).to(tl.bfloat16)
        acc = tl.dot(a, w, acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[:, None] * s_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _fp4_dot_scaled_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                           s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                           NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    "Variant D (MXFP4 only): Triton's tl.dot_scaled with the e2m1 codes packed along K and e8m0 scales."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // 32)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[:, None] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[None, :] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[:, None] * s_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_base + (k0 + offs_k)[None, :], mask=mm[:, None], other=0.0)
        b = tl.load(w_base + (k0 // 2 + offs_j)[:, None], mask=mn[None, :], other=0)     # [BK/2, BN]
        s = tl.load(s_base + (k0 // 32 + offs_g)[None, :], mask=mn[:, None], other=0)    # [BN, BK/32]
        acc = tl.dot_scaled(a, None, "bf16", b, s, "e2m1", acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[:, None] * s_cm + offs_n[None, :], acc.to(tl.bfloat16),
             mask=mm[:, None] & mn[None, :])


@triton.jit
def _fp4_swapab_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                       s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                       NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    "Variant F: swap A and B. The weight tile [BLOCK_N, BLOCK_K] (rows as stored, bytes contiguous) is the dot's left\n    operand, decoded in registers; the few activation rows are the right one: out^T = W a^T."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // G)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[None, :] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[:, None] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[:, None] * s_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        aT = tl.load(a_base + (k0 + offs_k)[:, None], mask=mm[None, :], other=0.0)          # [BK, BM]
        b = tl.load(w_base + (k0 // 2 + offs_j)[None, :], mask=mn[:, None], other=0)        # [BN, BK/2]
        s = _scale_f32(tl.load(s_base + (k0 // G + offs_g)[None, :], mask=mn[:, None], other=0), NV)  # [BN, BK/G]
        w = tl.reshape(tl.join(_e2m1_fp16(b & 0xF), _e2m1_fp16(b >> 4)), (BLOCK_N, BLOCK_K // G, G))
        w = tl.reshape(w.to(tl.float32) * s[:, :, None], (BLOCK_N, BLOCK_K)).to(tl.bfloat16)
        acc = tl.dot(w, aT, acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[None, :] * s_cm + offs_n[:, None], acc.to(tl.bfloat16),
             mask=mm[None, :] & mn[:, None])


@triton.jit
def _fp4_swapab_bf16mul_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                       s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                       NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    "Variant H: as F, the scale multiply in bf16 (exact: 3-bit codes times <= 4-bit scales fit bf16's 8 bits)."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // G)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[None, :] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[:, None] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[:, None] * s_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        aT = tl.load(a_base + (k0 + offs_k)[:, None], mask=mm[None, :], other=0.0)          # [BK, BM]
        b = tl.load(w_base + (k0 // 2 + offs_j)[None, :], mask=mn[:, None], other=0)        # [BN, BK/2]
        s = _scale_f32(tl.load(s_base + (k0 // G + offs_g)[None, :], mask=mn[:, None], other=0), NV)  # [BN, BK/G]
        w = tl.reshape(tl.join(_e2m1_fp16(b & 0xF), _e2m1_fp16(b >> 4)), (BLOCK_N, BLOCK_K // G, G))
        w = tl.reshape(w.to(tl.bfloat16) * s.to(tl.bfloat16)[:, :, None], (BLOCK_N, BLOCK_K))
        acc = tl.dot(w, aT, acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[None, :] * s_cm + offs_n[:, None], acc.to(tl.bfloat16),
             mask=mm[None, :] & mn[:, None])


@triton.jit
def _fp4_swapab_post_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                            s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                            NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr):
    "Variant G: swap A and B, codes decoded unscaled (exact in bf16), one dot per group, scale on the fp32 partial."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, G)
    offs_j = tl.arange(0, G // 2)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[None, :] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[:, None] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n * s_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        for gi in tl.static_range(BLOCK_K // G):
            kk = k0 + gi * G
            aT = tl.load(a_base + (kk + offs_k)[:, None], mask=mm[None, :], other=0.0)       # [G, BM]
            b = tl.load(w_base + (kk // 2 + offs_j)[None, :], mask=mn[:, None], other=0)     # [BN, G/2]
            w = tl.reshape(tl.join(_e2m1_fp16(b & 0xF), _e2m1_fp16(b >> 4)), (BLOCK_N, G)).to(tl.bfloat16)
            s = _scale_f32(tl.load(s_base + kk // G, mask=mn, other=0), NV)
            acc += tl.dot(w, aT) * s[:, None]
    tl.store(c_ptr + e64 * s_ce + offs_m[None, :] * s_cm + offs_n[:, None], acc.to(tl.bfloat16),
             mask=mm[None, :] & mn[:, None])


# Variant I/J: the decode as packed integer work in inline PTX. Each asm instance takes four code bytes (8 codes) in
# one 32-bit register and returns them as four bf16x2 registers, already multiplied by their group scales:
#   prmt spreads bytes b0,b1 (b2,b3) into the two 16-bit halves of a register;
#   (nibble & 0xF) * 0x1040 places the nibble's bits 0-2 at bits 6-8 (bf16 exponent low bits + top mantissa bit) and
#   bit 3 at bit 15 (sign) in one integer multiply (the two shifted copies do not overlap, so no carries);
#   the result is the bf16 whose value is the e2m1 value times 2^-126 (0.5 is a bf16 subnormal), so one bf16x2 fma
#   by 2^126 makes it exact, a second by the group scale applies the scale (exact: <= 2 significant bits times <= 4).
# The block is the library's own since the split64 layout went in: `moe_lit.kernels.quant._e2m1_bf16_pairs` takes the
# low- and high-nibble scales separately, as this variant's copy did (09c_kernels.quant, "The FP4 decode").
from moe_lit.kernels.quant import _e2m1_bf16_pairs as _e2m1_pairs


@triton.jit
def _scale_bf16(s, NV: tl.constexpr):
    "Scale bytes -> bf16 (exact for e8m0 and e4m3)."
    if NV: f = s.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
    else: f = (s.to(tl.int16) << 7).to(tl.bfloat16, bitcast=True)
    return f


@triton.jit
def _fp4_swapab_asm_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                           s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                           NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    "Variant I: as F (swap AB, plain layout), the decode and scale in packed PTX (_e2m1_pairs), nibbles joined along K."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // G)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[None, :] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[:, None] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[:, None] * s_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        aT = tl.load(a_base + (k0 + offs_k)[:, None], mask=mm[None, :], other=0.0)          # [BK, BM]
        b = tl.load(w_base + (k0 // 2 + offs_j)[None, :], mask=mn[:, None], other=0)        # [BN, BK/2]
        s = _scale_bf16(tl.load(s_base + (k0 // G + offs_g)[None, :], mask=mn[:, None], other=0), NV)  # [BN, BK/G]
        s = tl.reshape(tl.broadcast_to(s[:, :, None], (BLOCK_N, BLOCK_K // G, G // 2)), (BLOCK_N, BLOCK_K // 2))
        lo, hi = _e2m1_pairs(b, s, s)
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
        acc = tl.dot(w, aT, acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[None, :] * s_cm + offs_n[:, None], acc.to(tl.bfloat16),
             mask=mm[None, :] & mn[:, None])


@triton.jit
def _fp4_swapab_asm_split_kernel(a_ptr, w_ptr, s_ptr, c_ptr, cnt_ptr, N, K, num_m_tiles,
                                 s_ae, s_am, s_we, s_wn, s_se, s_sn, s_ce, s_cm,
                                 NV: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_K: tl.constexpr):
    "Variant J: re-laid codes (split_layout: in each 64-code chunk, byte j = code j | code 32+j << 4), packed PTX\n    decode, no join: one dot for the low nibbles and one for the high, the activations loaded in the same order."
    pid, e = tl.program_id(0), tl.program_id(1)
    pid_n, pid_m = pid // num_m_tiles, pid % num_m_tiles
    count = tl.load(cnt_ptr + e)
    if pid_m * BLOCK_M >= count: return
    e64 = e.to(tl.int64)
    C: tl.constexpr = BLOCK_K // 64
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)
    offs_lo = (offs_j // 32) * 64 + offs_j % 32                                             # K of the low nibbles
    offs_g = tl.arange(0, BLOCK_K // G)
    mm, mn = offs_m < count, offs_n < N
    a_base = a_ptr + e64 * s_ae + offs_m[None, :] * s_am
    w_base = w_ptr + e64 * s_we + offs_n[:, None] * s_wn
    s_base = s_ptr + e64 * s_se + offs_n[:, None] * s_sn
    acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_lo = tl.load(a_base + (k0 + offs_lo)[:, None], mask=mm[None, :], other=0.0)       # [BK/2, BM]
        a_hi = tl.load(a_base + (k0 + offs_lo + 32)[:, None], mask=mm[None, :], other=0.0)
        b = tl.load(w_base + (k0 // 2 + offs_j)[None, :], mask=mn[:, None], other=0)        # [BN, BK/2]
        s = _scale_bf16(tl.load(s_base + (k0 // G + offs_g)[None, :], mask=mn[:, None], other=0), NV)  # [BN, BK/G]
        s = tl.permute(tl.reshape(s, (BLOCK_N, C, 2, 32 // G)), (0, 1, 3, 2))               # [BN, C, 32/G, half]
        s_lo, s_hi = tl.split(s)                                                             # [BN, C, 32/G]
        s_lo = tl.reshape(tl.broadcast_to(s_lo[:, :, :, None], (BLOCK_N, C, 32 // G, G)), (BLOCK_N, BLOCK_K // 2))
        s_hi = tl.reshape(tl.broadcast_to(s_hi[:, :, :, None], (BLOCK_N, C, 32 // G, G)), (BLOCK_N, BLOCK_K // 2))
        lo, hi = _e2m1_pairs(b, s_lo, s_hi)
        acc = tl.dot(lo, a_lo, acc)
        acc = tl.dot(hi, a_hi, acc)
    tl.store(c_ptr + e64 * s_ce + offs_m[None, :] * s_cm + offs_n[:, None], acc.to(tl.bfloat16),
             mask=mm[None, :] & mn[:, None])


def split_layout(codes):
    "Plain codes [.., K/2] (byte j = code 2j | code 2j+1 << 4) -> the split layout of variant J (64-code chunks)."
    lo, hi = codes & 0xF, codes >> 4
    k = torch.stack([lo, hi], -1).flatten(-2)                                                # [.., K] one code a byte
    k = k.unflatten(-1, (-1, 2, 32))                                                          # [.., K/64, half, 32]
    return (k[..., 0, :] | (k[..., 1, :] << 4)).flatten(-2).contiguous()


VARIANTS = {"groupscale": _fp4_groupscale_kernel, "postscale": _fp4_postscale_kernel,
            "dupload": _fp4_dupload_kernel, "dot_scaled": _fp4_dot_scaled_kernel,
            "swapab": _fp4_swapab_kernel, "swapab_bf16mul": _fp4_swapab_bf16mul_kernel, "swapab_post": _fp4_swapab_post_kernel,
            "swapab_asm": _fp4_swapab_asm_kernel, "swapab_asm_split": _fp4_swapab_asm_split_kernel}
RUN = sys.argv[2].split(",") if len(sys.argv) > 2 else list(VARIANTS)
E2M1 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])


def problem(sc, nv: bool, seed=0):
    E, K, N, M = sc["E"], sc["K"], sc["N"], sc["M"]
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(E, M, K, device="cuda", dtype=torch.bfloat16, generator=g)
    codes = torch.randint(0, 256, (E, N, K // 2), device="cuda", dtype=torch.uint8, generator=g)
    G = 16 if nv else 32
    if nv: s = (torch.rand(E, N, K // G, device="cuda", generator=g) * 0.02 + 0.001).to(torch.float8_e4m3fn).view(torch.uint8)
    else: s = torch.randint(118, 124, (E, N, K // G), device="cuda", dtype=torch.uint8, generator=g)
    counts = routed_counts(E, M, sc["rows"], seed).cuda()
    return a, codes, s, counts, G


def reference(a, codes, s, counts, G, nv):
    lut = E2M1.cuda()
    w = torch.stack([lut[(codes & 0xF).long()], lut[(codes >> 4).long()]], -1).flatten(-2)     # [E, N, K]
    sf = s.view(torch.float8_e4m3fn).float() if nv else torch.exp2(s.float() - 127)
    w = w * sf.repeat_interleave(G, -1)
    return torch.einsum("emk,enk->emn", a.float(), w)


def launch(kernel, a, codes, s, counts, G, nv, out, BM, BN, BK, warps, stages):
    E, M, K = a.shape
    N = codes.shape[1]
    mt = triton.cdiv(M, BM)
    kernel[(mt * triton.cdiv(N, BN), E)](a, codes, s, out, counts, N, K, mt, a.stride(0), a.stride(1),
                                         codes.stride(0), codes.stride(1), s.stride(0), s.stride(1),
                                         out.stride(0), out.stride(1), NV=nv, G=G, BLOCK_M=BM, BLOCK_N=BN,
                                         BLOCK_K=BK, num_warps=warps, num_stages=stages)


CONFIGS = {"dot_scaled": [(32, 128, 128, 4, 4), (64, 128, 128, 4, 4), (32, 128, 256, 4, 3), (32, 256, 128, 8, 3),
                          (16, 128, 256, 4, 4)],
           "swapab": [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 256, 8, 3),
                      (32, 128, 128, 4, 4), (16, 128, 64, 4, 6)],
           "swapab_bf16mul": [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 256, 8, 3)],
           "swapab_post": [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 128, 256, 8, 3), (32, 128, 128, 4, 4),
                           (16, 64, 256, 4, 4)],
           "swapab_asm": [(None, 64, 64, 4, 3), (None, 128, 128, 4, 4)],
           "swapab_asm_split": [(None, 64, 64, 4, 3), (None, 128, 128, 4, 4)]}
CONFIGS["swapab"] = CONFIGS["swapab"] + [(None, 64, 64, 4, 3), (None, 64, 128, 4, 3), (None, 128, 64, 4, 3)]
DEFAULT_CONFIGS = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 256, 128, 8, 3), (32, 128, 128, 4, 4)]
NAMES = ("Mixtral-8x7B decode", "DeepSeek-V3 EP8 decode", "Qwen3-30B-A3B decode")   # K a multiple of every BLOCK_K (no K mask here)


def main(path=None):
    dev = measure_device()
    rows = []
    for sc in [s for s in SCENARIOS if s["name"] in NAMES]:
        for nv in (False, True):
            a, codes, s, counts, G = problem(sc, nv)
            E, M, K = a.shape
            N = codes.shape[1]
            active = int((counts > 0).sum())
            nbytes = active * N * (K // 2 + K // G) + sc["rows"] * (K + N) * 2
            floor = nbytes / dev["copy_Bps"] * 1e6
            ref = reference(a, codes, s, counts, G, nv)
            valid = torch.arange(M, device="cuda")[None, :] < counts[:, None]
            bm_auto = max(16, triton.next_power_of_2(int(counts.max())))   # one M tile per expert
            for name, kern in [(n, VARIANTS[n]) for n in RUN]:
                if name == "dot_scaled" and nv: continue
                best = None
                w = split_layout(codes) if name.endswith("_split") else codes
                for (BM, BN, BK, warps, stages) in CONFIGS.get(name, DEFAULT_CONFIGS):
                    if BK < G: continue
                    BM = BM or bm_auto
                    out = torch.full((E, M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
                    try:
                        launch(kern, a, w, s, counts, G, nv, out, BM, BN, BK, warps, stages)
                        torch.cuda.synchronize()
                        err = ((out.float() - ref).abs()[valid].max() / ref.abs()[valid].max()).item()
                        t = triton.testing.do_bench_cudagraph(
                            lambda: launch(kern, a, w, s, counts, G, nv, out, BM, BN, BK, warps, stages),
                            return_mode="median") * 1e3
                    except Exception as ex:  # noqa: BLE001  (a config that does not compile or fit)
                        print(sc["name"], nv, name, (BM, BN, BK, warps, stages), "failed:", str(ex)[:160], flush=True)
                        continue
                    r = dict(scenario=sc["name"], scheme="nvfp4" if nv else "mxfp4", variant=name,
                             config=[BM, BN, BK, warps, stages], us=t, floor_us=floor, pct_floor=100 * floor / t,
                             rel_err=err)
                    rows.append(r)
                    if best is None or t < best["us"]: best = r
                if best: print(f"{sc['name']:<24} {best['scheme']:<6} {name:<11} {best['us']:8.1f} us "
                               f"({best['pct_floor']:5.1f}% of {floor:.1f}) cfg {best['config']} err {best['rel_err']:.1e}",
                               flush=True)
            a = codes = s = ref = None
    if path: json.dump(dict(device=dev, rows=rows), open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
