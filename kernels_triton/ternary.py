"""Ternary (BitNet b1.58) matmul on the Hugging Face layout, read directly.

``qweight`` uint8 ``[R = ceil(N/4), K]``: byte ``[r, k]`` holds output rows ``r + i*R`` at bits
``2i..2i+1`` as ``w + 1``. Activations are quantized per token to int8 exactly as the format
(and the reference) does; ``y = acc / (x_scale * weight_scale) (+ bias)``, ``acc`` the integer
sum ``x_q @ w.T``. So one program reading byte rows ``[r0, r0 + BLOCK_R)`` produces the four
output row ranges ``r0 + i*R`` at once, reading every byte once.

* ``gemv`` (few rows): the row's absmax is computed in the kernel (a first pass over x), then
  per K step ``x_q`` is formed in registers; each 2-bit field becomes the float ``1 + c/4``
  with two integer operations (field OR-ed into the mantissa of 1.0), so one FMA per weight
  accumulates ``sum (1 + c/4) x_q``; ``sum (c - 1) x_q = 4 F - 5 X`` with ``X = sum x_q``,
  exact in float32 (multiples of 1/4 below 2^22 for any realistic K).
* ``gemv2`` (NVIDIA, dp4a): one launch - absmax pass fused (the first weight step requested
  before it), loads a step ahead, x read contiguously and packed in registers, dp4a chains
  per 16-byte load; small row blocks (BLOCK_R = 4) fill the GPU without split-K.
* ``mm``: ``x_q`` (int8) and ``x_scale`` from a small row-quantization kernel, then int8
  tensor-core tiles (``tl.dot`` int8 x int8 -> int32, exact), four accumulators per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    STREAM,
    Config,
    cache_for,
    cfg,
    contiguous_rows,
    finish,
    finish_split,
    inline_ptx_ok,
    m_bucket,
    pick,
    rows_2d,
    split_k_buffers,
    split_k_for,
    store_out,
    store_row,
    with_unsplit,
)

_CACHE = cache_for("ternary_matmul")
_EPS = 1e-5


@triton.jit
def _quant(x, xs, zero):
    """``clamp(round(x * x_scale), -128, 127)`` exactly as torch does it in float32.

    The product must be rounded to float32 before the rounding add: OR-ing its bits with
    ``zero`` (a run-time 0 the compiler cannot see through) stops LLVM and ptxas from fusing
    the two into an FMA, which would round the exact product instead. NaN maps to 0 as in
    the format. Then round half to even by the 1.5 * 2^23 trick.
    """
    p = ((x * xs).to(tl.int32, bitcast=True) | zero).to(tl.float32, bitcast=True)
    p = tl.where(p == p, p, 0.0)
    r = (p + 12582912.0) - 12582912.0
    return tl.minimum(tl.maximum(r, -128.0), 127.0)


@triton.jit
def _row_scale(x_row, stride_xk, K, BLOCK: tl.constexpr):
    """``127 / max(max|x|, 1e-5)`` of one row (float32)."""
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    # IEEE division (a plain "/" is the approximate div.full.f32): x_scale as torch computes it
    d = tl.maximum(tl.max(amax, axis=0), 1e-5)
    return tl.math.div_rn(d * 0.0 + 127.0, d)


@triton.jit
def _field(w, SHIFT: tl.constexpr, one_bits):
    """Bits SHIFT..SHIFT+1 of w as the float ``1 + c/4`` (mantissa bits 21..22 of 1.0f)."""
    if SHIFT <= 21:
        v = (w << (21 - SHIFT)) & 0x600000
    else:
        v = (w >> (SHIFT - 21)) & 0x600000
    return (v | one_bits).to(tl.float32, bitcast=True)


@triton.jit
def _spread4(w, I: tl.constexpr, one_bits):
    """int32 words [R, C] (bytes k = 4j..4j+3) -> [R, 4C]: field I of each byte, in k order."""
    v0 = _field(w, 2 * I, one_bits)
    v1 = _field(w, 8 + 2 * I, one_bits)
    v2 = _field(w, 16 + 2 * I, one_bits)
    v3 = _field(w, 24 + 2 * I, one_bits)
    t = tl.join(tl.join(v0, v2), tl.join(v1, v3))
    return tl.reshape(t, [w.shape[0], w.shape[1] * 4])


@triton.jit
def _ternary_gemv_kernel(
    x_ptr, qw_ptr, ws_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, R, K, k_per_split, one_bits, zero,
    stride_xm, stride_xk, stride_qr, stride_ym,
    PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DP4A: tl.constexpr,
):
    """BLOCK_R byte rows (4 * BLOCK_R output rows) of one row of x; each step BLOCK_K columns.

    ``DP4A`` (NVIDIA): x_q packed as int8x4 words; per int32 word of weights (4 columns x 4
    output rows) one shift + AND picks a row's 4 codes and one ``dp4a`` adds their products to
    an int32 accumulator: 3 instructions per 4 weights, exact. Otherwise one float FMA per
    weight on ``1 + c/4`` (module docstring).
    """
    pid_r = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    x_row = x_ptr + m * stride_xm
    xs = _row_scale(x_row, stride_xk, K, BLOCK_K)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_kw = tl.arange(0, BLOCK_K // 4)
    offs_k = tl.arange(0, BLOCK_K)
    qw_ptr = qw_ptr.to(tl.pointer_type(tl.int32))  # uint8 bytes read as int32 words
    q_ptrs = qw_ptr + offs_r.to(tl.int64)[:, None] * stride_qr + offs_kw[None, :]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if DP4A:
        xq_sum = tl.zeros([1], dtype=tl.float32)
        a0 = tl.zeros([BLOCK_R, BLOCK_K // 4], dtype=tl.int32)
        a1 = tl.zeros([BLOCK_R, BLOCK_K // 4], dtype=tl.int32)
        a2 = tl.zeros([BLOCK_R, BLOCK_K // 4], dtype=tl.int32)
        a3 = tl.zeros([BLOCK_R, BLOCK_K // 4], dtype=tl.int32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            if EVEN_K:
                wd = tl.load(q_ptrs + k0 // 4, mask=r_mask[:, None], other=0, eviction_policy=STREAM)
            else:
                wd = tl.load(q_ptrs + k0 // 4, mask=r_mask[:, None] & (k0 + 4 * offs_kw < k_hi)[None, :], other=0,
                             eviction_policy=STREAM)
            q0 = _quant_at(x_row, k0 + 4 * offs_kw, stride_xk, k_hi, xs, zero, EVEN_K)
            q1 = _quant_at(x_row, k0 + 4 * offs_kw + 1, stride_xk, k_hi, xs, zero, EVEN_K)
            q2 = _quant_at(x_row, k0 + 4 * offs_kw + 2, stride_xk, k_hi, xs, zero, EVEN_K)
            q3 = _quant_at(x_row, k0 + 4 * offs_kw + 3, stride_xk, k_hi, xs, zero, EVEN_K)
            xq_sum += tl.sum(((q0 + q1) + (q2 + q3))[None, :], axis=1)
            xw = ((q0.to(tl.int32) & 0xFF) | ((q1.to(tl.int32) & 0xFF) << 8) | ((q2.to(tl.int32) & 0xFF) << 16)
                  | (q3.to(tl.int32) << 24))
            xw = tl.broadcast_to(xw[None, :], [BLOCK_R, BLOCK_K // 4])
            a0 = _dp4a(wd & 0x03030303, xw, a0)
            a1 = _dp4a((wd >> 2) & 0x03030303, xw, a1)
            a2 = _dp4a((wd >> 4) & 0x03030303, xw, a2)
            a3 = _dp4a((wd >> 6) & 0x03030303, xw, a3)
        # sum (c - 1) x_q = sum c x_q - X (exact), then / (x_scale * weight_scale)
        f0 = tl.sum(a0, axis=1).to(tl.float32) - xq_sum
        f1 = tl.sum(a1, axis=1).to(tl.float32) - xq_sum
        f2 = tl.sum(a2, axis=1).to(tl.float32) - xq_sum
        f3 = tl.sum(a3, axis=1).to(tl.float32) - xq_sum
    else:
        f0, f1, f2, f3 = _ternary_gemv_float(x_row, q_ptrs, r_mask, offs_kw, offs_k, xs, zero, k_lo, k_hi,
                                             stride_xk, one_bits, EVEN_K, BLOCK_R, BLOCK_K)
    _ternary_store4(f0, f1, f2, f3, offs_r, R, N, m, pid_k, M, xs, ws_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
                    stride_ym, PER_ROW, HAS_BIAS, PARTIAL)


@triton.jit
def _ternary_gemv2_kernel(
    x_ptr, xs_ptr, qw_ptr, ws_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, R, K, k_per_split, zero,
    stride_xm, stride_xk, stride_qr, stride_ym,
    PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, XBLOCK: tl.constexpr, XQ: tl.constexpr,
):
    """The ``dp4a`` GEMV, latency-lean (one launch, no split-K at M=1 on the target shapes).

    * The first step's weight words are requested before the row's absmax pass, so the DRAM
      latency of the weight stream and the x pass (``XBLOCK`` elements a load, all of a
      chunk's loads in flight at once) overlap.
    * Every step's loads (weight words and x) are issued one step ahead.
    * x is read contiguously ([BLOCK_K/4, 4] per step, one vector load per thread) and packed
      into int8x4 words in registers (the first version gathered 4 strided columns).
    * ``XQ`` (path "gemvq"): x already quantized by ``quantize_activations`` (``x_ptr`` int8
      rows of K, ``xs_ptr`` their scales), read as int8x4 words: no absmax pass and no
      quantization in the loop (offline sm_90: ~40% of the loop's instructions quantize x, once
      per program), for the price of a second, one-program-a-row launch before it.
    """
    pid_r = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    x_row = x_ptr + m * stride_xm
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    offs_kw = tl.arange(0, BLOCK_K // 4)
    offs_x = tl.arange(0, BLOCK_K)
    qw_ptr = qw_ptr.to(tl.pointer_type(tl.int32))  # uint8 bytes read as int32 words
    # rows past R read row R - 1 (their results are not stored): no row mask on the loads
    q_ptrs = qw_ptr + tl.minimum(offs_r, R - 1).to(tl.int64)[:, None] * stride_qr + offs_kw[None, :]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    if XQ:  # int8x4 words of the quantized row (K % 4 == 0)
        x_ptrs = x_ptr.to(tl.pointer_type(tl.int32)) + m * (K // 4) + offs_kw
        wd_n, xv_n = _gemv2_loads_q(q_ptrs, x_ptrs, r_mask, offs_kw, k_lo, k_hi, EVEN_K)
        xs = tl.load(xs_ptr + m)
        xq_words = tl.zeros([BLOCK_K // 4], dtype=tl.int32)  # per word: sum of its 4 x_q
    else:
        x_ptrs = x_row + offs_x * stride_xk
        wd_n, xv_n = _gemv2_loads(q_ptrs, x_ptrs, r_mask, offs_kw, offs_x, k_lo, k_hi, stride_xk, EVEN_K)
        # the row's absmax (every program reads the whole row: x is small and L2-resident)
        xs = _row_scale(x_row, stride_xk, K, XBLOCK)
        xq_sum = tl.zeros([1], dtype=tl.int32)
    # one accumulator per 4 consecutive words (a thread's 16-byte load): dp4a chains, 4x fewer
    # accumulator registers than one per word
    a0_ = tl.zeros([BLOCK_R, BLOCK_K // 16], dtype=tl.int32)
    a1_ = tl.zeros([BLOCK_R, BLOCK_K // 16], dtype=tl.int32)
    a2_ = tl.zeros([BLOCK_R, BLOCK_K // 16], dtype=tl.int32)
    a3_ = tl.zeros([BLOCK_R, BLOCK_K // 16], dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        wd, xv = wd_n, xv_n
        if EVEN_K:  # the last step re-reads itself: no masks at all
            k_next = tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)
        else:
            k_next = k0 + BLOCK_K
        if XQ:
            wd_n, xv_n = _gemv2_loads_q(q_ptrs, x_ptrs, r_mask, offs_kw, k_next, k_hi, EVEN_K)
            xw = xv
            xq_words = _dp4a(xw * 0 + 0x01010101, xw, xq_words)
        else:
            wd_n, xv_n = _gemv2_loads(q_ptrs, x_ptrs, r_mask, offs_kw, offs_x, k_next, k_hi, stride_xk, EVEN_K)
            q = _quant(xv.to(tl.float32), xs, zero).to(tl.int32)  # [BLOCK_K], 0 past k_hi
            xq_sum += tl.sum(q[None, :], axis=1)
            sh = 8 * (tl.arange(0, 4))
            xw = tl.sum((q & 0xFF).reshape([BLOCK_K // 4, 4]) << sh[None, :], axis=1)  # 4 bytes, no carries
        xa, xb = tl.split(tl.reshape(xw, [BLOCK_K // 16, 2, 2]))
        x0, x1 = tl.split(xa)
        x2, x3 = tl.split(xb)
        wa, wb = tl.split(tl.reshape(wd, [BLOCK_R, BLOCK_K // 16, 2, 2]))
        w0, w1 = tl.split(wa)
        w2, w3 = tl.split(wb)
        a0_ = _dp4a4(w0, w1, w2, w3, x0[None, :], x1[None, :], x2[None, :], x3[None, :], 0, a0_)
        a1_ = _dp4a4(w0, w1, w2, w3, x0[None, :], x1[None, :], x2[None, :], x3[None, :], 2, a1_)
        a2_ = _dp4a4(w0, w1, w2, w3, x0[None, :], x1[None, :], x2[None, :], x3[None, :], 4, a2_)
        a3_ = _dp4a4(w0, w1, w2, w3, x0[None, :], x1[None, :], x2[None, :], x3[None, :], 6, a3_)
    if XQ:
        xsum = tl.sum(xq_words, axis=0).to(tl.float32)
    else:
        xsum = xq_sum.to(tl.float32)
    f0 = tl.sum(a0_, axis=1).to(tl.float32) - xsum
    f1 = tl.sum(a1_, axis=1).to(tl.float32) - xsum
    f2 = tl.sum(a2_, axis=1).to(tl.float32) - xsum
    f3 = tl.sum(a3_, axis=1).to(tl.float32) - xsum
    _ternary_store4(f0, f1, f2, f3, offs_r, R, N, m, pid_k, M, xs, ws_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
                    stride_ym, PER_ROW, HAS_BIAS, PARTIAL)


@triton.jit
def _dp4a4(w0, w1, w2, w3, x0, x1, x2, x3, SHIFT: tl.constexpr, acc):
    """``acc`` plus the dp4a of sub-row SHIFT/2's codes of four weight words with four x words."""
    acc = _dp4a((w0 >> SHIFT) & 0x03030303, x0, acc)
    acc = _dp4a((w1 >> SHIFT) & 0x03030303, x1, acc)
    acc = _dp4a((w2 >> SHIFT) & 0x03030303, x2, acc)
    return _dp4a((w3 >> SHIFT) & 0x03030303, x3, acc)


@triton.jit
def _gemv2_loads(q_ptrs, x_ptrs, r_mask, offs_kw, offs_x, k0, k_hi, stride_xk, EVEN_K: tl.constexpr):
    """One step's weight words [BLOCK_R, BLOCK_K/4] and x [BLOCK_K] at column k0 (with a K tail,
    nothing at or past k_hi is read: masked words are 0 and masked x is 0, adding nothing)."""
    if EVEN_K:  # k0 is always a whole step inside the range and rows are clamped: no masks
        wd = tl.load(q_ptrs + k0 // 4, eviction_policy=STREAM)
        xv = tl.load(x_ptrs + k0 * stride_xk)
    else:
        wd = tl.load(q_ptrs + k0 // 4, mask=r_mask[:, None] & (k0 + 4 * offs_kw < k_hi)[None, :], other=0,
                     eviction_policy=STREAM)
        xv = tl.load(x_ptrs + k0 * stride_xk, mask=k0 + offs_x < k_hi, other=0.0)
    return wd, xv


@triton.jit
def _gemv2_loads_q(q_ptrs, x_ptrs, r_mask, offs_kw, k0, k_hi, EVEN_K: tl.constexpr):
    """``_gemv2_loads`` for quantized x: weight words and x_q words [BLOCK_K/4] at column k0."""
    if EVEN_K:
        wd = tl.load(q_ptrs + k0 // 4, eviction_policy=STREAM)
        xw = tl.load(x_ptrs + k0 // 4)
    else:
        km = (k0 + 4 * offs_kw < k_hi)
        wd = tl.load(q_ptrs + k0 // 4, mask=r_mask[:, None] & km[None, :], other=0, eviction_policy=STREAM)
        xw = tl.load(x_ptrs + k0 // 4, mask=km, other=0)
    return wd, xw


@triton.jit
def _ternary_gemv_float(x_row, q_ptrs, r_mask, offs_kw, offs_k, xs, zero, k_lo, k_hi, stride_xk, one_bits,
                        EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float GEMV loop: the four row ranges' ``sum (c - 1) x_q``."""
    f0 = tl.zeros([BLOCK_R], dtype=tl.float32)
    f1 = tl.zeros([BLOCK_R], dtype=tl.float32)
    f2 = tl.zeros([BLOCK_R], dtype=tl.float32)
    f3 = tl.zeros([BLOCK_R], dtype=tl.float32)
    xq_sum = tl.zeros([1], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:  # no K tail: unmasked (vectorized) loads
            wd = tl.load(q_ptrs + k0 // 4, mask=r_mask[:, None], other=0, eviction_policy=STREAM)
            xv = tl.load(x_row + (k0 + offs_k) * stride_xk).to(tl.float32)
        else:
            wd = tl.load(q_ptrs + k0 // 4, mask=r_mask[:, None] & (k0 + 4 * offs_kw < k_hi)[None, :], other=0,
                         eviction_policy=STREAM)
            xv = tl.load(x_row + (k0 + offs_k) * stride_xk, mask=k0 + offs_k < k_hi, other=0.0).to(tl.float32)
        xq = _quant(xv, xs, zero)
        xq_sum += tl.sum(xq[None, :], axis=1)
        f0 += tl.sum(_spread4(wd, 0, one_bits) * xq[None, :], axis=1)
        f1 += tl.sum(_spread4(wd, 1, one_bits) * xq[None, :], axis=1)
        f2 += tl.sum(_spread4(wd, 2, one_bits) * xq[None, :], axis=1)
        f3 += tl.sum(_spread4(wd, 3, one_bits) * xq[None, :], axis=1)
    # sum (c - 1) x_q = 4 F - 5 X (exact)
    return 4.0 * f0 - 5.0 * xq_sum, 4.0 * f1 - 5.0 * xq_sum, 4.0 * f2 - 5.0 * xq_sum, 4.0 * f3 - 5.0 * xq_sum


@triton.jit
def _quant_at(x_row, k, stride_xk, k_hi, xs, zero, EVEN_K: tl.constexpr):
    """x_q at columns ``k`` (0 past ``k_hi``)."""
    if EVEN_K:
        v = tl.load(x_row + k * stride_xk)
    else:
        v = tl.load(x_row + k * stride_xk, mask=k < k_hi, other=0.0)
    return _quant(v.to(tl.float32), xs, zero)


if not INTERPRET:

    @triton.jit
    def _dp4a(a, b, c):
        """``c + sum_t a.byte[t] * b.byte[t]`` (a unsigned, b signed bytes), int32."""
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)

else:

    @triton.jit
    def _dp4a(a, b, c):
        s = c
        s += (a & 0xFF) * ((b << 24) >> 24)
        s += ((a >> 8) & 0xFF) * ((b << 16) >> 24)
        s += ((a >> 16) & 0xFF) * ((b << 8) >> 24)
        s += ((a >> 24) & 0xFF) * (b >> 24)
        return s


@triton.jit
def _ternary_store4(f0, f1, f2, f3, offs_r, R, N, m, pid_k, M, xs, ws_ptr, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
                    PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """Output rows ``offs_r + I*R`` (I = 0..3, sums ``fI``) of row ``m``: scaled (and bias, or
    the split-K partial) in one :func:`store_row` over a [BLOCK_R, 2, 2] tile, so an in-kernel
    split reduction counts each program once."""
    # element [r, a, b] of join(join(f0, f1), join(f2, f3)) is f_(2b + a)
    f = tl.join(tl.join(f0, f1), tl.join(f2, f3))
    i = tl.arange(0, 2)
    n = offs_r[:, None, None] + R * (i[None, :, None] + 2 * i[None, None, :])
    mask = (offs_r < R)[:, None, None] & (n < N)
    if PER_ROW:
        ws = tl.load(ws_ptr + n, mask=mask, other=1.0)
    else:
        ws = tl.load(ws_ptr + n * 0, mask=mask, other=1.0)
    store_row(f / (xs * ws), m, n, mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS, PARTIAL)


@triton.jit
def _quant_rows_kernel(x_ptr, xq_ptr, xs_ptr, K, zero, stride_xm, stride_xk, BLOCK: tl.constexpr):
    """Per-token int8 quantization (the format's ``quantize_activations``) of one row."""
    m = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + m * stride_xm
    xs = _row_scale(x_row, stride_xk, K, BLOCK)
    offs = tl.arange(0, BLOCK)
    for k0 in range(0, K, BLOCK):
        v = tl.load(x_row + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0).to(tl.float32)
        q = _quant(v, xs, zero)
        tl.store(xq_ptr + m * K + k0 + offs, q.to(tl.int8), mask=k0 + offs < K)
    tl.store(xs_ptr + m, xs)


@triton.jit
def _ternary_mm_kernel(
    xq_ptr, xs_ptr, qw_ptr, ws_ptr, b_ptr, y_ptr, p_ptr,
    M, N, R, K, k_per_split, stride_qr, stride_ym,
    PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    r_mask = offs_r < R
    a_ptrs = xq_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    q_ptrs = qw_ptr + offs_r.to(tl.int64)[:, None] * stride_qr + offs_k[None, :]
    a0 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    a1 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    a2 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    a3 = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.int32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = k0 + offs_k < k_hi
        a = tl.load(a_ptrs + k0, mask=m_mask[:, None] & kmask[None, :], other=0)
        b = tl.load(q_ptrs + k0, mask=r_mask[:, None] & kmask[None, :], other=0x55,
                    eviction_policy=STREAM).to(tl.int32)  # 0x55: all w=0
        a0 = tl.dot(a, tl.trans(((b & 3) - 1).to(tl.int8)), a0, out_dtype=tl.int32)
        a1 = tl.dot(a, tl.trans((((b >> 2) & 3) - 1).to(tl.int8)), a1, out_dtype=tl.int32)
        a2 = tl.dot(a, tl.trans((((b >> 4) & 3) - 1).to(tl.int8)), a2, out_dtype=tl.int32)
        a3 = tl.dot(a, tl.trans(((b >> 6) - 1).to(tl.int8)), a3, out_dtype=tl.int32)
    xs = tl.load(xs_ptr + offs_m, mask=m_mask, other=1.0)
    _ternary_store_tile(a0, offs_m, offs_r, 0, R, N, M, pid_k, xs, ws_ptr, b_ptr, y_ptr, p_ptr, stride_ym,
                        PER_ROW, HAS_BIAS, PARTIAL)
    _ternary_store_tile(a1, offs_m, offs_r, 1, R, N, M, pid_k, xs, ws_ptr, b_ptr, y_ptr, p_ptr, stride_ym,
                        PER_ROW, HAS_BIAS, PARTIAL)
    _ternary_store_tile(a2, offs_m, offs_r, 2, R, N, M, pid_k, xs, ws_ptr, b_ptr, y_ptr, p_ptr, stride_ym,
                        PER_ROW, HAS_BIAS, PARTIAL)
    _ternary_store_tile(a3, offs_m, offs_r, 3, R, N, M, pid_k, xs, ws_ptr, b_ptr, y_ptr, p_ptr, stride_ym,
                        PER_ROW, HAS_BIAS, PARTIAL)


@triton.jit
def _ternary_store_tile(acc, offs_m, offs_r, I: tl.constexpr, R, N, M, pid_k, xs, ws_ptr, b_ptr, y_ptr, p_ptr,
                        stride_ym, PER_ROW: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    n = offs_r + I * R
    n_mask = (offs_r < R) & (n < N)
    if PER_ROW:
        ws = tl.load(ws_ptr + n, mask=n_mask, other=1.0)
    else:
        ws = tl.load(ws_ptr + n * 0, mask=n_mask, other=1.0)
    y = acc.to(tl.float32) / (xs[:, None] * ws[None, :])
    store_out(y, offs_m, n, offs_m < M, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, p_ptr, stride_ym, HAS_BIAS, PARTIAL)


def quantize_activations(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x_q`` int8 ``[M, K]`` and ``x_scale`` float32 ``[M]`` (the format's rule, on the GPU)."""
    m, k = x2.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x2.device)
    xs = torch.empty((m,), dtype=torch.float32, device=x2.device)
    # A whole row (up to 8192 columns) a load: each pass's loads all in flight at once (1024-column
    # chunks made K / 1024 dependent round trips a pass: the first launch of gemvq waits on them).
    block = max(16, min(triton.next_power_of_2(k), 8192))
    _quant_rows_kernel[(m,)](x2, xq, xs, k, 0, x2.stride(0), x2.stride(1), BLOCK=block,
                             num_warps=8 if block >= 4096 else 4)
    return xq, xs


def candidates(m: int, n: int, k: int, device: torch.device) -> list[Config]:
    r = triton.cdiv(n, 4)
    gemv = []
    if k % 4 == 0 and inline_ptx_ok(device):
        # gemv2: small row blocks so that the target shapes fill the GPU without split-K; K splits
        # (reduced in the kernel: still one launch) where the row blocks alone leave SMs idle,
        # and twice that where a long K leaves each program a long serial chain
        for br, bk, w in ((4, 2048, 4), (8, 1024, 4), (4, 1024, 2), (16, 512, 4)):
            splits = {split_k_for(triton.cdiv(r, br) * m, triton.cdiv(k, bk), device, max_split=8, per_sm=p)
                      for p in (1, 2)}
            for split in sorted(splits):
                gemv.append(cfg("gemv2", BLOCK_R=br, BLOCK_K=bk, num_warps=w, num_stages=1,
                                extra={"SPLIT_K": split}))
        gemv = with_unsplit(gemv, count=1)
        # gemvq: x quantized by a first launch, the GEMV's loop only streams weights (two sizes)
        for br, bk, w in ((4, 2048, 4), (8, 1024, 4)):
            split = split_k_for(triton.cdiv(r, br) * m, triton.cdiv(k, bk), device, max_split=8, per_sm=2)
            gemv.append(cfg("gemvq", BLOCK_R=br, BLOCK_K=bk, num_warps=w, num_stages=1, extra={"SPLIT_K": split}))
    if k % 4 == 0:
        for dp4a in ((1, 0) if inline_ptx_ok(device) else (0,)):
            for br, bk, w in ((16, 512, 4), (8, 1024, 4), (32, 512, 8), (16, 1024, 8), (4, 1024, 2)):
                split = split_k_for(triton.cdiv(r, br) * m, triton.cdiv(k, bk), device, max_split=32, per_sm=4)
                gemv.append(cfg("gemv", BLOCK_R=br, BLOCK_K=bk, num_warps=w, num_stages=2,
                                extra={"SPLIT_K": split, "DP4A": dp4a}))
        gemv = with_unsplit(gemv)
    mm = []
    if m > 1 or not gemv:
        if m <= 16:
            shapes = ((16, 32, 128, 4, 3), (16, 64, 64, 4, 3), (16, 16, 128, 4, 4))
        elif m <= 64:
            shapes = ((32, 32, 128, 4, 3), (64, 32, 64, 4, 3), (64, 64, 64, 4, 3))
        else:
            shapes = ((128, 32, 64, 8, 3), (64, 64, 64, 4, 3), (128, 64, 64, 8, 3))
        for bm, br, bk, w, st in shapes:
            split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(r, br), triton.cdiv(k, bk), device)
            mm.append(cfg("mm", BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk, num_warps=w, num_stages=st,
                          extra={"SPLIT_K": split}))
    if m > 8:
        gemv = []
    return gemv + mm if m <= 4 else mm + gemv


def _split_range(split: int, k: int, bk: int) -> tuple[int, int]:
    steps = triton.cdiv(k, bk)
    per = triton.cdiv(steps, split)
    return triton.cdiv(steps, per), per * bk


def _launch(c: Config, x2, qweight, weight_scale, n, bias, y):
    m, k = x2.shape
    r = qweight.shape[0]
    per_row = weight_scale.shape[0] == n and n > 1
    bvec = bias if bias is not None else weight_scale
    if c.path in ("gemv2", "gemvq"):
        br, bk, w = c["BLOCK_R"], c["BLOCK_K"], c.num_warps
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(r, br) * m, y)
        xblock = min(2048 * w, triton.next_power_of_2(k))
        xq = c.path == "gemvq"
        xa, xs = quantize_activations(x2) if xq else (x2, weight_scale)
        _ternary_gemv2_kernel[(triton.cdiv(r, br), m, split)](
            xa, xs, qweight, weight_scale, bvec, y, partial, cnt,
            m, n, r, k, per, 0, x2.stride(0), x2.stride(1), qweight.stride(0) // 4, y.stride(0),
            PER_ROW=per_row, HAS_BIAS=bias is not None, PARTIAL=mode, EVEN_K=k % bk == 0,
            BLOCK_R=br, BLOCK_K=bk, XBLOCK=xblock, XQ=xq, **c.launch_opts(),
        )
    elif c.path == "gemv":
        br, bk = c["BLOCK_R"], c["BLOCK_K"]
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(r, br) * m, y)
        _ternary_gemv_kernel[(triton.cdiv(r, br), m, split)](
            x2, qweight, weight_scale, bvec, y, partial, cnt,
            m, n, r, k, per, 0x3F800000, 0, x2.stride(0), x2.stride(1), qweight.stride(0) // 4, y.stride(0),
            PER_ROW=per_row, HAS_BIAS=bias is not None, PARTIAL=mode, EVEN_K=k % bk == 0,
            BLOCK_R=br, BLOCK_K=bk, DP4A=bool(c.get("DP4A", 0)), **c.launch_opts(),
        )
    else:
        bm, br, bk = c["BLOCK_M"], c["BLOCK_R"], c["BLOCK_K"]
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        partial = torch.empty((split, m, n), dtype=torch.float32, device=x2.device) if split > 1 else y
        mode = int(split > 1)  # the tile kernel's four stores per program: two-kernel reduction
        xq, xs = quantize_activations(x2)
        _ternary_mm_kernel[(triton.cdiv(m, bm), triton.cdiv(r, br), split)](
            xq, xs, qweight, weight_scale, bvec, y, partial, m, n, r, k, per, qweight.stride(0), y.stride(0),
            PER_ROW=per_row, HAS_BIAS=bias is not None, PARTIAL=mode, BLOCK_M=bm, BLOCK_R=br, BLOCK_K=bk,
            **c.launch_opts(),
        )
    return finish_split(mode, partial, bias, y)


def ternary_matmul(x, qweight, weight_scale, out_features: int, bias=None, *, config: Config | str | None = None):
    """BitNet b1.58 matmul for CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``)."""
    x2 = rows_2d(x)
    m, k = x2.shape
    n = out_features
    qweight = contiguous_rows(qweight)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    aligned = qweight.data_ptr() % 4 == 0 and qweight.stride(0) % 4 == 0  # int32 word loads (gemv)

    def cands():
        cs = candidates(m, n, k, x.device)
        return cs if aligned else [c for c in cs if c.path not in ("gemv", "gemv2")] or candidates(2, n, k, x.device)

    key = (m_bucket(m), n, k, x.dtype, weight_scale.shape[0] > 1, bias is not None, aligned, x.device)
    run = lambda c: _launch(c, x2, qweight, weight_scale, n, bias, y)
    c = pick(_CACHE, key, cands, run, x.device, config)
    return finish(run(c), x)


__all__ = ["candidates", "quantize_activations", "ternary_matmul"]
