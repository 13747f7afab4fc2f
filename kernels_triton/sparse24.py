"""2:4 sparse matmul on lowbit's layout, read directly.

``values [N, K/2]`` (two kept values per group of four columns, ascending index),
``meta`` uint8 ``[N, K/8]``: group ``2j`` in the low nibble of byte ``j``, group ``2j+1`` in
the high one, ``nibble = i0 | (i1 << 2)``. So value ``4t + s`` of a row (``s`` = 0..3) sits at
column ``4 * (2t + s // 2) + ((meta[t] >> 2s) & 3)``.

* ``gemv``: per value, its column index from the meta bits and one gathered x (x is tiny and
  cached): the weight stream is values + meta, 0.56 of the dense bytes for 16-bit values.
* ``gemv2`` (K % 32 == 0, meta rows 4-byte aligned): no gathers - x read densely and each
  value's x picked by its index bits with selects; meta as int32 words; every load a step
  ahead; small row blocks instead of split-K (one launch on the target shapes).
* ``mm2`` (M <= 32): swap-AB tensor-core tiles ``W_tile @ x.T`` (the weight rows fill the
  MMA's M side: wgmma with 64-row tiles), loads a step ahead, rows clamped instead of masked.
* ``mm``: the tile is expanded to dense in registers (two compares and selects per dense
  element) and multiplied on the tensor cores.
* ``dense``: decompress, then cuBLAS (large M, where the tensor-core work dominates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import (
    Config,
    cache_for,
    cfg,
    contiguous_rows,
    finish,
    finish_split,
    m_bucket,
    mma_in,
    pick,
    rows_2d,
    split_k_buffers,
    split_k_for,
    store_out,
    store_row,
    tile_of_program,
    with_unsplit,
)

_CACHE = cache_for("sparse24_matmul")


@triton.jit
def _value_columns(mb, K_BASE):
    """meta bytes [R, C] (int32) -> in-tile column of each of the 4C values [R, 4C]."""
    i0 = mb & 3
    i1 = (mb >> 2) & 3
    i2 = (mb >> 4) & 3
    i3 = (mb >> 6) & 3
    # value 4t + s: join order gives index 2 * (first join's pick) + second join's pick = s
    idx = tl.reshape(tl.join(tl.join(i0, i2), tl.join(i1, i3)), [mb.shape[0], mb.shape[1] * 4])
    j = tl.arange(0, mb.shape[1] * 4)
    return K_BASE + 4 * (j // 2)[None, :] + idx


@triton.jit
def _s24_gemv_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows64 = offs_n.to(tl.int64)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_t = tl.arange(0, BLOCK_K // 8)
    v_ptrs = v_ptr + rows64[:, None] * stride_vn + offs_v[None, :]
    m_ptrs = meta_ptr + rows64[:, None] * stride_mn + offs_t[None, :]
    x_row = x_ptr + m * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None], other=0.0)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None], other=0).to(tl.int32)
            cols = _value_columns(mb, k0)
            xg = tl.load(x_row + cols * stride_xk)
        else:
            vm = n_mask[:, None] & (k0 + 2 * offs_v < k_hi)[None, :]
            vals = tl.load(v_ptrs + k0 // 2, mask=vm, other=0.0)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None] & (k0 + 8 * offs_t < k_hi)[None, :], other=0)
            cols = _value_columns(mb.to(tl.int32), k0)
            xg = tl.load(x_row + cols * stride_xk, mask=vm, other=0.0)
        acc += vals.to(tl.float32) * xg.to(tl.float32)
    y = tl.sum(acc, axis=1)
    store_row(y, m, offs_n, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS, PARTIAL)


@triton.jit
def _s24_gemv2_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """GEMV without gathers: x is read densely (4 columns per group, shared by the tile's rows)
    and each stored value picks its x by its 2-bit index with selects; values, meta and x of
    the next step are requested before this step's math (long runs per row, loads in flight).
    Meta is read as int32 words (8 groups each)."""
    G: tl.constexpr = BLOCK_K // 4
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    # rows past N read row N - 1 (their results are not stored): no row mask on the loads
    rows64 = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_w = tl.arange(0, BLOCK_K // 32)
    offs_x = tl.arange(0, BLOCK_K)
    v_ptrs = v_ptr + rows64[:, None] * stride_vn + offs_v[None, :]
    meta_ptr = meta_ptr.to(tl.pointer_type(tl.int32))  # uint8 [N, K/8] read as int32 words
    m_ptrs = meta_ptr + rows64[:, None] * (stride_mn // 4) + offs_w[None, :]
    x_ptrs = x_ptr + m * stride_xm + offs_x * stride_xk
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    vals_n, mw_n, xv_n = _s24_step_loads(v_ptrs, m_ptrs, x_ptrs, n_mask, offs_v, offs_w, offs_x, k_lo, k_hi,
                                         stride_xk, EVEN_K)
    acc = tl.zeros([BLOCK_N, G], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        vals, mw, xv = vals_n, mw_n, xv_n
        if EVEN_K:  # the last step re-reads itself: no masks at all
            k_next = tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)
        else:
            k_next = k0 + BLOCK_K
        vals_n, mw_n, xv_n = _s24_step_loads(v_ptrs, m_ptrs, x_ptrs, n_mask, offs_v, offs_w, offs_x,
                                             k_next, k_hi, stride_xk, EVEN_K)
        v0, v1 = tl.split(tl.reshape(vals, [BLOCK_N, G, 2]))  # per group: value at i0, at i1
        # group 8j + t sits in bits 4t..4t+3 of word j: one shift per group, then bit tests
        nib = tl.reshape(mw[:, :, None] >> (4 * tl.arange(0, 8))[None, None, :], [BLOCK_N, G])
        xf = xv.to(tl.float32)  # converted once per column, shared by the tile's rows
        xe, xo = tl.split(tl.reshape(xf, [G, 2, 2]))  # xe: columns 4g, 4g+2; xo: 4g+1, 4g+3
        x0, x2 = tl.split(xe)
        x1, x3 = tl.split(xo)
        # i0 = b0 + 2 b1 (0..2) and i1 = b2 + 2 b3 (1..3), b the nibble's bits
        xa = tl.where((nib & 2) != 0, x2[None, :], tl.where((nib & 1) != 0, x1[None, :], x0[None, :]))
        xb = tl.where((nib & 8) != 0, tl.where((nib & 4) != 0, x3[None, :], x2[None, :]), x1[None, :])
        acc += v0.to(tl.float32) * xa
        acc += v1.to(tl.float32) * xb
    y = tl.sum(acc, axis=1)
    store_row(y, m, offs_n, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS, PARTIAL)


@triton.jit
def _s24_step_loads(v_ptrs, m_ptrs, x_ptrs, n_mask, offs_v, offs_w, offs_x, k0, k_hi, stride_xk,
                    EVEN_K: tl.constexpr):
    """Values [BLOCK_N, BLOCK_K/2], meta words [BLOCK_N, BLOCK_K/32] and x [BLOCK_K] at column
    k0; nothing at or past k_hi is read (masked values and x are 0)."""
    if EVEN_K:  # k0 is always a whole step inside the range and rows are clamped: no masks
        vals = tl.load(v_ptrs + k0 // 2)
        mw = tl.load(m_ptrs + k0 // 32)
        xv = tl.load(x_ptrs + k0 * stride_xk)
    else:
        vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None] & (k0 + 2 * offs_v < k_hi)[None, :], other=0.0)
        mw = tl.load(m_ptrs + k0 // 32, mask=n_mask[:, None] & (k0 + 32 * offs_w < k_hi)[None, :], other=0)
        xv = tl.load(x_ptrs + k0 * stride_xk, mask=k0 + offs_x < k_hi, other=0.0)
    return vals, mw, xv


@triton.jit
def _s24_mm_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_k, offs_m, offs_n, m_mask, n_mask, rows64 = tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_t = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr + rows64[:, None] * stride_vn + offs_v[None, :]
    m_ptrs = meta_ptr + rows64[:, None] * stride_mn + offs_t[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None], other=0.0)
            vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None], other=0.0)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None], other=0).to(tl.int32)
        else:
            xt = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None] & (k0 + offs_k < k_hi)[None, :], other=0.0)
            vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None] & (k0 + 2 * offs_v < k_hi)[None, :], other=0.0)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None] & (k0 + 8 * offs_t < k_hi)[None, :],
                         other=0).to(tl.int32)
        vals = vals.to(xt.dtype)
        v0, v1 = tl.split(tl.reshape(vals, [BLOCK_N, BLOCK_K // 4, 2]))  # per group: value at i0, at i1
        nib = tl.reshape(tl.join(mb & 15, mb >> 4), [BLOCK_N, BLOCK_K // 4])  # group 2t low, 2t+1 high
        i0 = nib & 3
        i1 = nib >> 2
        zero = tl.zeros_like(v0)
        w0 = tl.where(i0 == 0, v0, zero)
        w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
        w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
        w3 = tl.where(i1 == 3, v1, zero)
        # column 4g + p: join picks (a, b) give p = 2a + b
        dense = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N, BLOCK_K])
        acc = tl.dot(mma_in(xt), mma_in(tl.trans(dense)), acc)
    store_out(acc, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS,
              PARTIAL)


@triton.jit
def _s24_mm2_kernel(
    x_ptr, v_ptr, meta_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, k_per_split,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_ym,
    HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Small-M tensor-core tiles, swap-AB: ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T``, so the
    expanded weight fills the MMA's M side and a tiny M only pads the N side (16). Every
    step's loads (values, meta, x) are issued a step ahead; rows past N and M are clamped
    (read, never stored), so whole steps load without masks."""
    G: tl.constexpr = BLOCK_K // 4
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    rows64 = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_K // 2)
    offs_t = tl.arange(0, BLOCK_K // 8)
    x_ptrs = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr + rows64[:, None] * stride_vn + offs_v[None, :]
    m_ptrs = meta_ptr + rows64[:, None] * stride_mn + offs_t[None, :]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    xt_n, vals_n, mb_n = _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_v, offs_t, k_lo, k_hi, stride_xk,
                                        EVEN_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt, vals, mb = xt_n, vals_n, mb_n
        if EVEN_K:  # the last step re-reads itself
            k_next = tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)
        else:
            k_next = k0 + BLOCK_K
        xt_n, vals_n, mb_n = _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_v, offs_t, k_next, k_hi,
                                            stride_xk, EVEN_K)
        vals = vals.to(xt.dtype)
        v0, v1 = tl.split(tl.reshape(vals, [BLOCK_N, G, 2]))  # per group: value at i0, at i1
        nib = tl.reshape(tl.join(mb & 15, mb >> 4), [BLOCK_N, G])  # group 2t low nibble, 2t+1 high
        lo = nib & 3  # i0
        hi = nib & 12  # 4 * i1
        zero = tl.zeros_like(v0)
        w0 = tl.where(lo == 0, v0, zero)
        w1 = tl.where(lo == 1, v0, tl.where(hi == 4, v1, zero))
        w2 = tl.where(lo == 2, v0, tl.where(hi == 8, v1, zero))
        w3 = tl.where(hi == 12, v1, zero)
        dense = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N, BLOCK_K])
        acc = tl.dot(mma_in(dense), mma_in(tl.trans(xt)), acc)
    store_out(tl.trans(acc), offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
              HAS_BIAS, PARTIAL)


@triton.jit
def _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_v, offs_t, k0, k_hi, stride_xk, EVEN_K: tl.constexpr):
    """x [BLOCK_M, BLOCK_K], values [BLOCK_N, BLOCK_K/2], meta bytes (int32) at column k0."""
    if EVEN_K:
        xt = tl.load(x_ptrs + k0 * stride_xk)
        vals = tl.load(v_ptrs + k0 // 2)
        mb = tl.load(m_ptrs + k0 // 8).to(tl.int32)
    else:
        xt = tl.load(x_ptrs + k0 * stride_xk, mask=(k0 + offs_k < k_hi)[None, :], other=0.0)
        vals = tl.load(v_ptrs + k0 // 2, mask=(k0 + 2 * offs_v < k_hi)[None, :], other=0.0)
        mb = tl.load(m_ptrs + k0 // 8, mask=(k0 + 8 * offs_t < k_hi)[None, :], other=0).to(tl.int32)
    return xt, vals, mb


@triton.jit
def _s24_dense_kernel(v_ptr, meta_ptr, w_ptr, N, K, stride_vn, stride_mn, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    """Dense ``[N, K]`` from values/meta: BLOCK_G groups of four columns per program and row block."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rows64 = offs_n.to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_g < K // 4)[None, :]
    v0 = tl.load(v_ptr + rows64[:, None] * stride_vn + 2 * offs_g[None, :], mask=mask, other=0.0)
    v1 = tl.load(v_ptr + rows64[:, None] * stride_vn + 2 * offs_g[None, :] + 1, mask=mask, other=0.0)
    mb = tl.load(meta_ptr + rows64[:, None] * stride_mn + offs_g[None, :] // 2, mask=mask, other=0).to(tl.int32)
    nib = (mb >> (4 * (offs_g % 2))[None, :]) & 15
    i0 = nib & 3
    i1 = nib >> 2
    zero = tl.zeros_like(v0)
    w0 = tl.where(i0 == 0, v0, zero)
    w1 = tl.where(i0 == 1, v0, tl.where(i1 == 1, v1, zero))
    w2 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, zero))
    w3 = tl.where(i1 == 3, v1, zero)
    dense = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N, 4 * BLOCK_G])
    offs_k = tl.program_id(1) * (4 * BLOCK_G) + tl.arange(0, 4 * BLOCK_G)
    wmask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    tl.store(w_ptr + rows64[:, None] * K + offs_k[None, :], dense.to(w_ptr.dtype.element_ty), mask=wmask)


def decompress(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    values, meta = contiguous_rows(values), contiguous_rows(meta)
    n, k = values.shape[0], values.shape[1] * 2
    w = torch.empty((n, k), dtype=dtype, device=values.device)
    bn, bg = 16, 64
    _s24_dense_kernel[(triton.cdiv(n, bn), triton.cdiv(k // 4, bg))](
        values, meta, w, n, k, values.stride(0), meta.stride(0), BLOCK_N=bn, BLOCK_G=bg, num_warps=4,
    )
    return w


def candidates(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
               meta_words: bool = True) -> list[Config]:
    """``meta_words``: meta may be read as int32 words (K % 32 == 0, 4-byte aligned rows)."""
    gemv = []
    if meta_words and k % 32 == 0:  # gemv2 first: enough row blocks on the target shapes, no split-K
        for bn, bk, w in ((8, 1024, 4), (32, 512, 8), (16, 512, 4), (16, 1024, 4)):
            split = split_k_for(triton.cdiv(n, bn) * m, triton.cdiv(k, bk), device, max_split=8, per_sm=1)
            gemv.append(cfg("gemv2", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1, extra={"SPLIT_K": split}))
        gemv = with_unsplit(gemv, count=1)
    for bn, bk, w in ((16, 256, 4), (32, 256, 4), (8, 512, 4), (32, 512, 8), (64, 128, 4)):
        split = split_k_for(triton.cdiv(n, bn) * m, triton.cdiv(k, bk), device, max_split=32, per_sm=4)
        gemv.append(cfg("gemv", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=3, extra={"SPLIT_K": split}))
    gemv = with_unsplit(gemv)
    mm = []
    if dtype in (torch.float16, torch.bfloat16):
        if m <= 32:  # mm2 (swap-AB, loads a step ahead): weight rows on the MMA's M side
            for bm, bn, bk, w in ((16, 64, 128, 4), (16, 32, 256, 4), (16, 128, 128, 8), (32, 64, 128, 4)):
                if bm >= m or bm == 16:
                    split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), device,
                                        max_split=8, per_sm=2)
                    mm.append(cfg("mm2", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1,
                                  extra={"SPLIT_K": split}))
        if m <= 16:
            shapes = ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 4), (16, 128, 64, 4, 3))
        elif m <= 64:
            shapes = ((32, 64, 128, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3))
        else:
            shapes = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3))
        for bm, bn, bk, w, st in shapes:
            split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), device)
            mm.append(cfg("mm", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st,
                          extra={"SPLIT_K": split}))
    dense = [cfg("dense")]
    if m > (16 if dtype == torch.float32 else 8):
        gemv = []
    if m <= 4 or not mm:
        return gemv + mm + (dense if m > 1 or not gemv else [])
    if m <= 256:
        return mm + gemv + dense
    return dense + mm


def _split_range(split: int, k: int, bk: int) -> tuple[int, int]:
    steps = triton.cdiv(k, bk)
    per = triton.cdiv(steps, split)
    return triton.cdiv(steps, per), per * bk


def _launch(c: Config, x2, values, meta, bias, y):
    m, k = x2.shape
    n = values.shape[0]
    if c.path == "dense":
        w = decompress(values, meta, x2.dtype)
        return F.linear(x2, w, bias)
    bvec = bias if bias is not None else values
    if c.path in ("gemv", "gemv2"):
        bn, bk = c["BLOCK_N"], c["BLOCK_K"]
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(n, bn) * m, y)
        kernel = _s24_gemv2_kernel if c.path == "gemv2" else _s24_gemv_kernel
        kernel[(triton.cdiv(n, bn), m, split)](
            x2, values, meta, bvec, y, partial, cnt, m, n, k, per,
            x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, PARTIAL=mode, EVEN_K=k % bk == 0, BLOCK_N=bn, BLOCK_K=bk,
            **c.launch_opts(),
        )
    elif c.path == "mm2":
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(n, bn) * triton.cdiv(m, bm), y)
        _s24_mm2_kernel[(triton.cdiv(n, bn), triton.cdiv(m, bm), split)](
            x2, values, meta, bvec, y, partial, cnt, m, n, k, per,
            x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, PARTIAL=mode, EVEN_K=k % bk == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **c.launch_opts(),
        )
    else:
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(m, bm) * triton.cdiv(n, bn), y)
        _s24_mm_kernel[(triton.cdiv(m, bm) * triton.cdiv(n, bn), split)](
            x2, values, meta, bvec, y, partial, cnt, m, n, k, per,
            x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, PARTIAL=mode, EVEN_K=k % bk == 0,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, **c.launch_opts(),
        )
    return finish_split(mode, partial, bias, y)


def sparse24_matmul(x, values, meta, bias=None, *, config: Config | str | None = None):
    """``x @ W.T (+ bias)`` for a 2:4 weight, CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``)."""
    x2 = rows_2d(x)
    m, k = x2.shape
    values, meta = contiguous_rows(values), contiguous_rows(meta)
    n = values.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    words = meta.data_ptr() % 4 == 0 and meta.stride(0) % 4 == 0  # gemv2 reads meta as int32 words
    cands = lambda: candidates(m, n, k, x.dtype, x.device, meta_words=words)
    key = (m_bucket(m), n, k, x.dtype, values.dtype, bias is not None, words, x.device)
    run = lambda c: _launch(c, x2, values, meta, bias, y)
    c = pick(_CACHE, key, cands, run, x.device, config)
    return finish(run(c), x)


__all__ = ["candidates", "decompress", "sparse24_matmul"]
