"""Group-wise int4 matmul ``y = x @ W.T (+ bias)``, reading lowbit's checkpoint layout directly.

``qweight`` uint8 ``[N, K/2]`` (element 2j in the low nibble), ``scales``/``zeros`` ``[N, K/G]``,
``w = scale * (q - zero)`` (``zeros=None``: zero 8). No repacking. Three paths:

* ``gemv`` (few rows, any activation dtype): one program per ``BLOCK_N`` output features and
  row of ``x``, streaming the weight once in long runs per row (``NG`` groups a step, every load
  issued a step ahead). Per group ``g`` it uses
  ``sum_k w_k x_k = s_g * (sum_k q_k x_k - z_g * sum_k x_k)``, and ``q`` is turned into a float
  by bit tricks instead of int-to-float conversions: the nibble is OR-ed into the mantissa of
  1.0 (``1 + q/16``), so that one FMA per weight does the work (float16/bfloat16 activations);
  float32 activations take the exact conversion.
* ``mm`` (float16/bfloat16, ``G % 16 == 0``): tensor-core tiles; the nibbles become
  float16/bfloat16 integers through the ``0x6400``/``0x4300`` exponent trick, the even and
  odd columns of ``x`` meet the low and high nibbles in two ``tl.dot`` s, and the group
  scale (one group per K step) and zero point are applied to the fp32 tile afterwards.
  Split-K over a float32 workspace when the tiles alone would not fill the GPU.
* ``dense``: dequantize to ``x.dtype`` with a Triton kernel, then cuBLAS (large M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    STREAM,
    Config,
    affine_codes,
    cache_for,
    cfg,
    contiguous_rows,
    finish,
    finish_split,
    load_xt_pairs,
    m_bucket,
    mma_in,
    pick,
    rows_2d,
    runs_per_step,
    small_int_to_float,
    split_k_buffers,
    split_k_for,
    store_out,
    store_row,
    swap_ab_shapes,
    tile_configs,
    tile_of_program,
    with_unsplit,
    word_offset,
    x_pairs_ok,
    xt_pair_ptrs,
)

_CACHE = cache_for("int4_matmul")


@triton.jit
def _int4_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, G, k_per_split, one_bits,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, EXACT: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, STAGES: tl.constexpr, ACC3: tl.constexpr,
):
    """One row of x against BLOCK_N rows of W; each step is NG runs of GS weights, each run
    within one group (NG > 1: longer contiguous reads per row, fewer steps).

    The weight is read as int32 words (8 nibbles, elements 8j..8j+7) into a [BLOCK_N, NG*GS/8]
    tile; the nibbles are spread in registers (join + reshape, no data movement) to
    [BLOCK_N, NG*GS], so each thread holds a run of consecutive weights of a few rows and the
    matching run of x once. Per run and row: ``s * (sum_k q_k x_k - z * sum_k x_k)``.
    Split-K (``PARTIAL``): program (n, m, split) covers ``k_per_split`` columns.
    ``one_bits`` is 0x3F800000 (0x4B000000 for EXACT), passed at run time so that it sits in a
    register and ``(v & MASK) | one_bits`` compiles to one LOP3 (two immediates do not fit one).
    ``STAGES`` > 1: the pipeliner keeps STAGES - 1 steps of loads in flight through shared memory
    (no registers held for them); else every load of a step is issued one step ahead in registers.
    """
    BK: tl.constexpr = GS * NG
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows64 = offs_n.to(tl.int64)
    qw_ptr = qw_ptr.to(tl.pointer_type(tl.int32))  # uint8 bytes read as int32 words
    q_ptrs = qw_ptr + rows64[:, None] * stride_qn + tl.arange(0, BK // 8)[None, :]
    x_ptrs = x_ptr + m * stride_xm + tl.arange(0, BK) * stride_xk
    if ACC3:  # per row, run and word, reduced after the loop (see _gemv_step)
        acc = tl.zeros([BLOCK_N, NG, GS // 8], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if STAGES > 1:  # Triton's pipeliner stages the loads through shared memory (cp.async)
        for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
            wd, s, z, xv = _gemv_step_loads(q_ptrs, x_ptrs, s_ptr, z_ptr, rows64, n_mask, k0, G, stride_xk,
                                            stride_sn, stride_zn, HAS_ZERO, GS, NG)
            acc += _gemv_step(wd, s, z, xv, one_bits, HAS_ZERO, EXACT, BLOCK_N, GS, NG, ACC3)
    else:
        wd_n, s_n, z_n, xv_n = _gemv_step_loads(q_ptrs, x_ptrs, s_ptr, z_ptr, rows64, n_mask, k_lo, G, stride_xk,
                                                stride_sn, stride_zn, HAS_ZERO, GS, NG)
        for k0 in range(k_lo, k_hi, BK):
            wd, s, z, xv = wd_n, s_n, z_n, xv_n
            k_next = tl.minimum(k0 + BK, k_hi - BK)  # (the last step re-reads itself: no mask needed)
            wd_n, s_n, z_n, xv_n = _gemv_step_loads(q_ptrs, x_ptrs, s_ptr, z_ptr, rows64, n_mask, k_next, G,
                                                    stride_xk, stride_sn, stride_zn, HAS_ZERO, GS, NG)
            acc += _gemv_step(wd, s, z, xv, one_bits, HAS_ZERO, EXACT, BLOCK_N, GS, NG, ACC3)
    if ACC3:
        acc = tl.sum(tl.sum(acc, axis=2), axis=1)
    store_row(acc, m, offs_n, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS, PARTIAL)


@triton.jit
def _gemv_step(wd, s, z, xv, one_bits, HAS_ZERO: tl.constexpr, EXACT: tl.constexpr, BLOCK_N: tl.constexpr,
               GS: tl.constexpr, NG: tl.constexpr, ACC3: tl.constexpr):
    """One GEMV step's contribution: per run and row ``s * (sum_k q_k x_k - z * sum_k x_k)``,
    summed to [BLOCK_N]; ``ACC3``: per row, run and word [BLOCK_N, NG, GS / 8], sums over a
    word's 8 weights only (within a thread: its nibbles are spread in registers), which the
    caller adds up elementwise and reduces across lanes once after the loop (a run's sum each
    step costs up to 4 shuffle levels per row and run: ~30% of the pipelined loop's
    instructions; offline sm_90 670 -> 602 a step, but 64 -> 96 registers)."""
    xv = xv.to(tl.float32)
    if ACC3:
        W: tl.constexpr = GS // 8
        xw = tl.sum(tl.reshape(xv, [1, NG, W, 8]), axis=3)  # [1, NG, W]
        s3 = s.to(tl.float32)[:, :, None]
        z3 = z.to(tl.float32)[:, :, None] if HAS_ZERO else 8.0
        if EXACT:
            q = _spread_nibbles(wd, one_bits, 0, 0xF)
            qx = tl.sum(tl.reshape((q - 8388608.0) * xv[None, :], [BLOCK_N, NG, W, 8]), axis=3)
        else:
            q = _spread_nibbles(wd, one_bits, 19, 0x780000)
            qx = 16.0 * (tl.sum(tl.reshape(q * xv[None, :], [BLOCK_N, NG, W, 8]), axis=3) - xw)
        return s3 * (qx - z3 * xw)
    else:
        xsum = tl.sum(tl.reshape(xv, [1, NG, GS]), axis=2)  # [1, NG]
        s = s.to(tl.float32)
        z = z.to(tl.float32) if HAS_ZERO else 8.0
        if EXACT:  # float32 activations: exact q (2^23 + q, minus 2^23)
            q = _spread_nibbles(wd, one_bits, 0, 0xF)
            qx = tl.sum(tl.reshape((q - 8388608.0) * xv[None, :], [BLOCK_N, NG, GS]), axis=2)
        else:  # 1 + q/16 exactly: the nibble lands in mantissa bits 19..22 of 1.0f
            q = _spread_nibbles(wd, one_bits, 19, 0x780000)
            qx = 16.0 * (tl.sum(tl.reshape(q * xv[None, :], [BLOCK_N, NG, GS]), axis=2) - xsum)
        return tl.sum(s * (qx - z * xsum), axis=1)


@triton.jit
def _gemv_step_loads(q_ptrs, x_ptrs, s_ptr, z_ptr, rows64, n_mask, k0, G, stride_xk, stride_sn, stride_zn,
                     HAS_ZERO: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr):
    """The loads of one GEMV step at column ``k0``: weight words, the NG runs' scales and zeros
    [BLOCK_N, NG], and x."""
    wd = tl.load(q_ptrs + word_offset(k0, GS * NG), mask=n_mask[:, None], other=0, eviction_policy=STREAM)
    g = (k0 + GS * tl.arange(0, NG)) // G
    s = tl.load(s_ptr + rows64[:, None] * stride_sn + g[None, :], mask=n_mask[:, None], other=0.0,
                eviction_policy=STREAM)
    if HAS_ZERO:
        z = tl.load(z_ptr + rows64[:, None] * stride_zn + g[None, :], mask=n_mask[:, None], other=0.0,
                    eviction_policy=STREAM)
    else:
        z = s
    xv = tl.load(x_ptrs + k0 * stride_xk)
    return wd, s, z, xv


@triton.jit
def _spread_nibbles(w, OR, POS: tl.constexpr, MASK: tl.constexpr):
    """int32 words [R, C] -> float32 [R, 8C]: nibble i of word j at column 8j+i, as the bits
    ``((nibble << POS) & MASK) | OR`` (two integer ops per weight, no int-to-float)."""
    n0 = _nib(w, 0, OR, POS, MASK)
    n1 = _nib(w, 1, OR, POS, MASK)
    n2 = _nib(w, 2, OR, POS, MASK)
    n3 = _nib(w, 3, OR, POS, MASK)
    n4 = _nib(w, 4, OR, POS, MASK)
    n5 = _nib(w, 5, OR, POS, MASK)
    n6 = _nib(w, 6, OR, POS, MASK)
    n7 = _nib(w, 7, OR, POS, MASK)
    # join order: index (a, b, c) of the three new dims = nibble 4a + 2b + c
    t = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(t, [w.shape[0], w.shape[1] * 8])


@triton.jit
def _nib(w, I: tl.constexpr, OR, POS: tl.constexpr, MASK: tl.constexpr):
    if 4 * I <= POS:
        v = (w << (POS - 4 * I)) & MASK
    else:
        v = (w >> (4 * I - POS)) & MASK
    return (v | OR).to(tl.float32, bitcast=True)


@triton.jit
def _int4_mm_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, G, k_per_split,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_B: tl.constexpr,
):
    pid_k, offs_m, offs_n, m_mask, n_mask, rows64 = tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :] * stride_xk
    q_ptrs = qw_ptr + rows64[:, None] * stride_qn + tl.arange(0, BLOCK_K // 2)[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None], other=0.0)
        qb = tl.load(q_ptrs + k0 // 2, mask=n_mask[:, None], other=0, eviction_policy=STREAM).to(tl.int16)
        g = k0 // G
        s = tl.load(s_ptr + rows64 * stride_sn + g, mask=n_mask, other=0.0, eviction_policy=STREAM).to(tl.float32)
        if SCALE_B:  # big tiles: dequantize B fully, accumulate in place (one fp32 tile)
            if HAS_ZERO:
                z = tl.load(z_ptr + rows64 * stride_zn + g, mask=n_mask, other=0.0,
                            eviction_policy=STREAM).to(tl.float32)
                lo = small_int_to_float(qb & 15, 0, IS_BF16) - z.to(xt.dtype)[:, None]
                hi = small_int_to_float(qb >> 4, 0, IS_BF16) - z.to(xt.dtype)[:, None]
            else:
                lo = small_int_to_float(qb & 15, 8, IS_BF16)
                hi = small_int_to_float(qb >> 4, 8, IS_BF16)
            sd = s.to(xt.dtype)[:, None]
            w = tl.interleave(lo * sd, hi * sd)
            acc = tl.dot(mma_in(xt), mma_in(tl.trans(w)), acc)
        elif HAS_ZERO:  # small tiles: exact integer B, scale and zero applied to the fp32 tile
            lo = small_int_to_float(qb & 15, 0, IS_BF16)
            hi = small_int_to_float(qb >> 4, 0, IS_BF16)
            part = tl.dot(mma_in(xt), mma_in(tl.trans(tl.interleave(lo, hi))))
            z = tl.load(z_ptr + rows64 * stride_zn + g, mask=n_mask, other=0.0, eviction_policy=STREAM).to(tl.float32)
            xs = tl.sum(xt.to(tl.float32), axis=1)
            acc += (part - xs[:, None] * z[None, :]) * s[None, :]
        else:
            lo = small_int_to_float(qb & 15, 8, IS_BF16)
            hi = small_int_to_float(qb >> 4, 8, IS_BF16)
            part = tl.dot(mma_in(xt), mma_in(tl.trans(tl.interleave(lo, hi))))
            acc += part * s[None, :]
    store_out(acc, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS,
              PARTIAL)


@triton.jit
def _int4_mmt_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, G, k_per_split,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_zn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_B: tl.constexpr, X_PAIRS: tl.constexpr,
):
    """Swap-AB tensor-core tiles: ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T``.

    The weight rows fill the MMA's wide side (64 rows a warpgroup) and the few rows of a decode
    batch its narrow side (8..256), so small ``M`` wastes no MMA rows. The packed bytes are
    staged through shared memory by Triton's pipeliner (``num_stages`` deep: bytes in flight
    without registers held for them) and read back straight into the MMA's register-operand
    layout: the low nibbles (columns 2j) and the high nibbles (2j + 1) are two elementwise
    tiles that meet the even and odd rows of x^T in two ``tl.dot`` s, so no shuffle or
    shared-memory round trip of the dequantized tile is needed (the nibble-spreading version
    did one: 5 bytes of shared-memory traffic per weight, Nsight's L1/shared 83% at DRAM 22%).
    Codes become float16/bfloat16 integers by the exponent trick.
    ``SCALE_B``: ``(q - z) * s`` rounded to x's dtype feeds one running accumulator; else the
    integer tile's product is scaled per K step in float32 (exact ``q``; BLOCK_K within a group).
    """
    pid_k, offs_m, offs_n, m_mask, n_mask, rows64 = tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    HB: tl.constexpr = BLOCK_K // 2
    q_ptrs = qw_ptr + rows64[:, None] * stride_qn + tl.arange(0, HB)[None, :]
    xt_ptrs = xt_pair_ptrs(x_ptr, offs_m, stride_xm, stride_xk, HB, X_PAIRS)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qb = tl.load(q_ptrs + k0 // 2, mask=n_mask[:, None], other=0, eviction_policy=STREAM)
        xe, xo = load_xt_pairs(x_ptr, xt_ptrs, k0, m_mask, stride_xk, X_PAIRS)
        g = k0 // G
        s = tl.load(s_ptr + rows64 * stride_sn + g, mask=n_mask, other=0.0, eviction_policy=STREAM)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows64 * stride_zn + g, mask=n_mask, other=0.0, eviction_policy=STREAM)
        else:
            z = tl.full([BLOCK_N], 8.0, dtype=s.dtype)
        lo = small_int_to_float((qb & 15).to(tl.int16), 0, IS_BF16)  # columns 2j
        hi = small_int_to_float((qb >> 4).to(tl.int16), 0, IS_BF16)  # columns 2j + 1
        if SCALE_B:
            acc = tl.dot(mma_in(affine_codes(lo, z, s)), mma_in(xe), acc)
            acc = tl.dot(mma_in(affine_codes(hi, z, s)), mma_in(xo), acc)
        else:
            part = tl.dot(mma_in(hi), mma_in(xo), tl.dot(mma_in(lo), mma_in(xe)))
            xs = tl.sum(xe.to(tl.float32), axis=0) + tl.sum(xo.to(tl.float32), axis=0)
            acc += (part - z.to(tl.float32)[:, None] * xs[None, :]) * s.to(tl.float32)[:, None]
    store_out(tl.trans(acc), offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
              HAS_BIAS, PARTIAL)


@triton.jit
def _int4_dequant_kernel(
    qw_ptr, s_ptr, z_ptr, w_ptr,
    N, K, G, stride_qn, stride_sn, stride_zn,
    HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, GL: tl.constexpr,
):
    """Dense ``w [N, K]`` from a [BLOCK_N, BLOCK_H]-byte tile. ``GL > 0`` (power-of-two groups):
    the tile's bytes are runs of GL bytes within one group each, so scales and zeros are loaded
    once per run and broadcast (a load per weight would make the LSU, not DRAM, the limit);
    ``GL == 0``: one scale/zero load per byte (any group size)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h0 = tl.program_id(1) * BLOCK_H
    offs_h = h0 + tl.arange(0, BLOCK_H)
    rows64 = offs_n.to(tl.int64)
    n_ok = offs_n < N
    mask = n_ok[:, None] & (offs_h < K // 2)[None, :]
    b = tl.load(qw_ptr + rows64[:, None] * stride_qn + offs_h[None, :], mask=mask, other=0,
                eviction_policy=STREAM).to(tl.int32)
    if GL > 0:
        R: tl.constexpr = BLOCK_H // GL
        g = (h0 + GL * tl.arange(0, R)) // (G // 2)
        rmask = n_ok[:, None] & (2 * GL * tl.arange(0, R) + 2 * h0 < K)[None, :]
        s = tl.load(s_ptr + rows64[:, None] * stride_sn + g[None, :], mask=rmask, other=0.0,
                    eviction_policy=STREAM).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + g[None, :], mask=rmask, other=0.0,
                        eviction_policy=STREAM).to(tl.float32)
        else:
            z = tl.full([BLOCK_N, R], 8.0, dtype=tl.float32)
        b3 = tl.reshape(b, [BLOCK_N, R, GL])
        lo = tl.reshape(((b3 & 15).to(tl.float32) - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_H])
        hi = tl.reshape(((b3 >> 4).to(tl.float32) - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_H])
    else:
        g = (2 * offs_h) // G
        s = tl.load(s_ptr + rows64[:, None] * stride_sn + g[None, :], mask=mask, other=0.0,
                    eviction_policy=STREAM).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows64[:, None] * stride_zn + g[None, :], mask=mask, other=0.0,
                        eviction_policy=STREAM).to(tl.float32)
        else:
            z = 8.0
        lo = ((b & 15).to(tl.float32) - z) * s
        hi = ((b >> 4).to(tl.float32) - z) * s
    w = tl.interleave(lo, hi)
    offs_k = 2 * h0 + tl.arange(0, 2 * BLOCK_H)
    wmask = n_ok[:, None] & (offs_k < K)[None, :]
    tl.store(w_ptr + rows64[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=wmask)


def dequantize(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype`` (computed in float32 like the reference)."""
    qweight, scales = contiguous_rows(qweight), contiguous_rows(scales)
    zeros = contiguous_rows(zeros) if zeros is not None else None
    n, k = qweight.shape[0], qweight.shape[1] * 2
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    bn, bh = 16, 256
    pow2 = group_size & (group_size - 1) == 0
    gl = min(group_size // 2, bh) if pow2 else 0
    _int4_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k // 2, bh))](
        qweight, scales, zeros if zeros is not None else scales, w,
        n, k, group_size, qweight.stride(0), scales.stride(0), zeros.stride(0) if zeros is not None else 0,
        HAS_ZERO=zeros is not None, BLOCK_N=bn, BLOCK_H=bh, GL=gl, num_warps=4,
    )
    return w


def _pow2_divisor(g: int, cap: int) -> int:
    return min(g & -g, cap)


def candidates(m: int, n: int, k: int, g: int, dtype: torch.dtype, device: torch.device) -> list[Config]:
    """The fixed candidate list for a call; the first one is the untuned default."""
    gemv: list[Config] = []
    gs = _pow2_divisor(g, 128)
    if k % 8 == 0 and gs >= 8:  # int32 words of 8 nibbles, steps of GS within one group
        # Per-thread bytes in flight decide the bandwidth reached: NG=8 runs of 128 weights (512 B a
        # row) per step on 16 rows and 2 warps reads ~1.8 TB/s on an H100 (1 run of 64 B: ~1.4 TB/s).
        # STAGES: the same steps staged through shared memory by the pipeliner (80 registers instead
        # of 127-168 on sm_90: more programs, more bytes in flight per SM).
        # ACC3 (last two): per-word accumulators, one cross-lane reduction after the loop (see _gemv_step)
        for bn, ng, w, st, a3 in ((16, 8, 4, 3, 0), (32, 4, 4, 3, 0), (16, 8, 2, 4, 0), (8, 8, 2, 4, 0), (16, 8, 2, 0, 0),
                                  (16, 8, 4, 0, 0), (16, 8, 1, 0, 0), (32, 4, 4, 0, 0), (64, 1, 8, 0, 0),
                                  (16, 8, 4, 3, 1), (8, 8, 2, 4, 1)):
            ng = runs_per_step(k // gs, ng)
            programs = triton.cdiv(n, bn) * m
            split = split_k_for(programs, k // (gs * ng), device, max_split=32, per_sm=4)
            extra = {"SPLIT_K": split, "NG": ng, **({"STAGES": st} if st else {}), **({"ACC3": 1} if a3 else {})}
            gemv.append(cfg("gemv", BLOCK_N=bn, num_warps=w, num_stages=3, extra=extra))
        gemv = with_unsplit(gemv)
    mm: list[Config] = []
    bk_max = _pow2_divisor(g, 128)
    if dtype in (torch.float16, torch.bfloat16) and bk_max >= 32:
        if m <= 16:
            shapes = ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 4), (16, 128, 64, 4, 3))
        elif m <= 64:
            shapes = ((32, 64, 128, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (32, 128, 64, 4, 4))
        else:
            shapes = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3),
                      (256, 128, 64, 8, 3))
        mm = tile_configs("mm", shapes, m, n, k, bk_max, device)
        if m <= 256:  # swap-AB tiles
            mm += tile_configs("mmt", swap_ab_shapes(m, 128), m, n, k, bk_max, device, swap_ab=True)
    dense = [cfg("dense")]
    if not (gemv or mm):
        return dense
    if m > (16 if dtype == torch.float32 else 8):
        gemv = []
    if m <= 4 or not mm:
        return gemv + mm + (dense if m > 1 or not gemv else [])
    if m <= 256:
        return mm + gemv + dense
    return dense + mm


def _split(split: int, steps: int, step: int) -> int:
    """The number of K ranges actually used when ``steps`` steps are cut into ``split``."""
    per = triton.cdiv(steps, split)
    return triton.cdiv(steps, per)


def _launch(c: Config, x2, qweight, scales, zeros, g: int, bias, y) -> torch.Tensor:
    m, k = x2.shape
    n = qweight.shape[0]
    has_zero = zeros is not None
    zt = zeros if has_zero else scales
    if c.path == "gemv":
        gs = _pow2_divisor(g, 128)
        ng = runs_per_step(k // gs, c.get("NG", 1))
        bn, bk = c["BLOCK_N"], gs * ng
        split = _split(c.get("SPLIT_K", 1), k // bk, bk)
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(n, bn) * m, y)
        per = triton.cdiv(k // bk, split) * bk
        _int4_gemv_kernel[(triton.cdiv(n, bn), m, split)](
            x2, qweight, scales, zt, bias if bias is not None else scales, y, partial, cnt,
            m, n, k, g, per, 0x4B000000 if x2.dtype == torch.float32 else 0x3F800000,
            x2.stride(0), x2.stride(1), qweight.stride(0) // 4, scales.stride(0), zt.stride(0), y.stride(0),
            HAS_ZERO=has_zero, HAS_BIAS=bias is not None, EXACT=x2.dtype == torch.float32, PARTIAL=mode,
            BLOCK_N=bn, GS=gs, NG=ng, STAGES=c.get("STAGES", 0), ACC3=bool(c.get("ACC3", 0)), **c.launch_opts(),
        )
        return finish_split(mode, partial, bias, y)
    if c.path in ("mm", "mmt"):
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        split = _split(c.get("SPLIT_K", 1), k // bk, bk)
        per = triton.cdiv(k // bk, split) * bk
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        partial, cnt, mode = split_k_buffers(split, grid[0], y)
        kernel, extra = (_int4_mm_kernel, {}) if c.path == "mm" else (_int4_mmt_kernel, {"X_PAIRS": x_pairs_ok(x2)})
        kernel[grid](
            x2, qweight, scales, zt, bias if bias is not None else scales, y, partial, cnt,
            m, n, k, g, per,
            x2.stride(0), x2.stride(1), qweight.stride(0), scales.stride(0), zt.stride(0), y.stride(0),
            HAS_ZERO=has_zero, HAS_BIAS=bias is not None, PARTIAL=mode, IS_BF16=x2.dtype == torch.bfloat16,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SCALE_B=bm >= 64, **extra, **c.launch_opts(),
        )
        return finish_split(mode, partial, bias, y)
    w = dequantize(qweight, scales, zeros, g, x2.dtype)
    return F.linear(x2, w, bias)


def int4_matmul(x, qweight, scales, zeros, group_size: int, bias=None, *, config: Config | str | None = None):
    """``x @ dequant(W).T (+ bias)`` for CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``)."""
    x2 = rows_2d(x)
    m, k = x2.shape
    qweight, scales = contiguous_rows(qweight), contiguous_rows(scales)
    zeros = contiguous_rows(zeros) if zeros is not None else None
    n = qweight.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    aligned = qweight.data_ptr() % 4 == 0 and qweight.stride(0) % 4 == 0  # int32 word loads (gemv)

    def cands():
        cs = candidates(m, n, k, group_size, x.dtype, x.device)
        return cs if aligned else [c for c in cs if c.path != "gemv"] or [cfg("dense")]

    key = (m_bucket(m), n, k, group_size, x.dtype, zeros is not None, bias is not None, aligned, x.device)
    c = pick(_CACHE, key, cands, lambda c: _launch(c, x2, qweight, scales, zeros, group_size, bias, y),
             x.device, config)
    return finish(_launch(c, x2, qweight, scales, zeros, group_size, bias, y), x)


__all__ = ["candidates", "dequantize", "int4_matmul"]
