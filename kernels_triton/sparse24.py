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
* ``mm2`` (values in x's dtype): swap-AB tensor-core tiles ``W_tile @ x.T`` (the weight rows
  fill the MMA's M side: wgmma with 64-row tiles), rows clamped instead of masked; values read
  as int64 words and expanded by byte permutes. Narrow tiles for M <= 32 (loads a step ahead
  in registers, or staged by Triton's pipeliner), wide ones in grouped tile order above.
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
    INTERPRET,
    STREAM,
    Config,
    cache_for,
    cfg,
    contiguous_rows,
    finish,
    finish_split,
    half_bits_to,
    inline_ptx_ok,
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
            vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None], other=0.0, eviction_policy=STREAM)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None], other=0, eviction_policy=STREAM).to(tl.int32)
            cols = _value_columns(mb, k0)
            xg = tl.load(x_row + cols * stride_xk)
        else:
            vm = n_mask[:, None] & (k0 + 2 * offs_v < k_hi)[None, :]
            vals = tl.load(v_ptrs + k0 // 2, mask=vm, other=0.0, eviction_policy=STREAM)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None] & (k0 + 8 * offs_t < k_hi)[None, :], other=0,
                         eviction_policy=STREAM)
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
        vals = tl.load(v_ptrs + k0 // 2, eviction_policy=STREAM)
        mw = tl.load(m_ptrs + k0 // 32, eviction_policy=STREAM)
        xv = tl.load(x_ptrs + k0 * stride_xk)
    else:
        vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None] & (k0 + 2 * offs_v < k_hi)[None, :], other=0.0,
                       eviction_policy=STREAM)
        mw = tl.load(m_ptrs + k0 // 32, mask=n_mask[:, None] & (k0 + 32 * offs_w < k_hi)[None, :], other=0,
                     eviction_policy=STREAM)
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
            vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None], other=0.0, eviction_policy=STREAM)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None], other=0, eviction_policy=STREAM).to(tl.int32)
        else:
            xt = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None] & (k0 + offs_k < k_hi)[None, :], other=0.0)
            vals = tl.load(v_ptrs + k0 // 2, mask=n_mask[:, None] & (k0 + 2 * offs_v < k_hi)[None, :], other=0.0,
                           eviction_policy=STREAM)
            mb = tl.load(m_ptrs + k0 // 8, mask=n_mask[:, None] & (k0 + 8 * offs_t < k_hi)[None, :],
                         other=0, eviction_policy=STREAM).to(tl.int32)
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
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRMT: tl.constexpr, STAGES: tl.constexpr,
):
    """Small-M tensor-core tiles, swap-AB: ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile.T``, so the
    expanded weight fills the MMA's M side and a tiny M only pads the N side (16). Values are
    read as int64 words (two groups, x's dtype) and expanded by :func:`_dense_tile`. Rows past
    N and M are clamped (read, never stored), so whole steps load without masks. ``STAGES`` 1:
    every step's loads (values, meta, x) are issued a step ahead into registers; more: Triton's
    pipeliner stages them through shared memory (cp.async), STAGES deep."""
    pid_k, offs_m, offs_n, m_mask, n_mask, _ = tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows64 = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, BLOCK_K // 8)  # 8-column blocks: one int64 value word and one meta byte each
    x_ptrs = x_ptr + tl.minimum(offs_m, M - 1).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    v_ptrs = v_ptr.to(tl.pointer_type(tl.int64)) + rows64[:, None] * (stride_vn // 4) + offs_w[None, :]
    m_ptrs = meta_ptr + rows64[:, None] * stride_mn + offs_w[None, :]
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if STAGES > 1:
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            xt, vw, mb = _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_w, k0, k_hi, stride_xk, EVEN_K)
            acc = tl.dot(mma_in(_dense_tile(vw, mb, xt.dtype, PRMT)), mma_in(tl.trans(xt)), acc)
    else:
        xt_n, vw_n, mb_n = _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_w, k_lo, k_hi, stride_xk, EVEN_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            xt, vw, mb = xt_n, vw_n, mb_n
            if EVEN_K:  # the last step re-reads itself
                k_next = tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)
            else:
                k_next = k0 + BLOCK_K
            xt_n, vw_n, mb_n = _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_w, k_next, k_hi, stride_xk,
                                              EVEN_K)
            acc = tl.dot(mma_in(_dense_tile(vw, mb, xt.dtype, PRMT)), mma_in(tl.trans(xt)), acc)
    store_out(tl.trans(acc), offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
              HAS_BIAS, PARTIAL)


@triton.jit
def _s24_mm2_loads(x_ptrs, v_ptrs, m_ptrs, offs_k, offs_w, k0, k_hi, stride_xk, EVEN_K: tl.constexpr):
    """x [BLOCK_M, BLOCK_K], value words (int64) and meta bytes (int32) [BLOCK_N, BLOCK_K/8] at
    column k0 (K is a multiple of 8, so a K tail masks whole 8-column blocks)."""
    if EVEN_K:
        xt = tl.load(x_ptrs + k0 * stride_xk)
        vw = tl.load(v_ptrs + k0 // 8, eviction_policy=STREAM)
        mb = tl.load(m_ptrs + k0 // 8, eviction_policy=STREAM).to(tl.int32)
    else:
        wm = (k0 + 8 * offs_w < k_hi)[None, :]
        xt = tl.load(x_ptrs + k0 * stride_xk, mask=(k0 + offs_k < k_hi)[None, :], other=0.0)
        vw = tl.load(v_ptrs + k0 // 8, mask=wm, other=0, eviction_policy=STREAM)
        mb = tl.load(m_ptrs + k0 // 8, mask=wm, other=0, eviction_policy=STREAM).to(tl.int32)
    return xt, vw, mb


@triton.jit
def _dense_tile(vw, mb, DT: tl.constexpr, PRMT: tl.constexpr):
    """int64 value words and meta bytes [R, C] (8 columns each: groups 2j, 2j+1) -> the dense
    tile [R, 8C] in ``DT``. Per group the two 16-bit values (one int32 word ``p``) become the
    dense column pairs (0, 1) and (2, 3) as two int32 words (:func:`_spread_group`), which are
    already the MMA operand's packed halves."""
    pe = vw.to(tl.int32)  # group 2j (low word)
    po = (vw >> 32).to(tl.int32)  # group 2j + 1
    ce = (mb << 1) & 0x1E  # 2 * nibble
    co = (mb >> 3) & 0x1E
    if PRMT:
        e01, e23 = _spread_group_prmt(pe, ce)
        o01, o23 = _spread_group_prmt(po, co)
    else:
        e01, e23 = _spread_group(pe, ce)
        o01, o23 = _spread_group(po, co)
    # column pairs in k order: e01, e23, o01, o23 (join picks (a, b) give position 2a + b)
    w = tl.reshape(tl.join(tl.join(e01, o01), tl.join(e23, o23)), [vw.shape[0], vw.shape[1] * 4])
    lo = half_bits_to(w & 0xFFFF, DT)
    hi = half_bits_to((w >> 16) & 0xFFFF, DT)
    return tl.reshape(tl.join(lo, hi), [vw.shape[0], vw.shape[1] * 8])


@triton.jit
def _spread_group(p, c):
    """One group's values ``p`` (value at i0 in the low half, at i1 in the high half) and
    ``c = 2 * nibble`` -> int32 words of dense columns (0, 1) and (2, 3), by selects."""
    i0 = (c >> 1) & 3
    i1 = (c >> 3) & 3
    v0 = p & 0xFFFF
    v1 = (p >> 16) & 0xFFFF
    d01 = tl.where(i0 == 0, v0, 0) | tl.where(i0 == 1, v0 << 16, tl.where(i1 == 1, v1 << 16, 0))
    d23 = tl.where(i0 == 2, v0, tl.where(i1 == 2, v1, 0)) | tl.where(i1 == 3, v1 << 16, 0)
    return d01, d23


# _spread_group by byte permutes: per output word, a 2-bit code from a 32-bit constant indexed by
# 2 * nibble picks one of four prmt selectors (themselves looked up by a prmt from a table of
# two words), which places v0 / v1 / zero in each half: 5 instructions a word, no compares.
# Selector halves: v0 = 0x10, v1 = 0x32, zero = 0x54 (bytes of the zero second operand).
# Words (0, 1): nibble 4 -> (v0, v1), 8 and 12 -> (v0, 0), 9 and 13 -> (0, v0), 14 -> (0, 0).
# Words (2, 3): nibble 4 -> (0, 0), 8 and 9 -> (v1, 0), 12 and 13 -> (0, v1), 14 -> (v0, v1).
# (Only the six legal nibbles i0 < i1 are defined; the format rejects the others.)


def _prmt_word(out: int, codes: int, table_lo: int, table_hi: int) -> str:
    """PTX for output word ``$out``: its selector's 2-bit code (``codes`` >> 2 * nibble), that
    code as the byte selector of table entry ``2e | (2e + 1) << 4``, the entry, the permute."""
    return (f"mov.b32 t, {codes:#010x};\nshr.b32 s, t, $3;\nand.b32 s, s, 3;\nmad.lo.u32 s, s, 34, 16;\n"
            f"mov.b32 t, {table_lo:#010x};\nmov.b32 u, {table_hi:#010x};\nprmt.b32 s, t, u, s;\n"
            f"prmt.b32 ${out}, $2, 0, s;\n")


#: (codes, table_lo, table_hi) of the two output words (tests emulate prmt on them)
SPREAD_TABLES = ((0xF9F9FCFF, 0x54103210, 0x54541054), (0x3A050000, 0x54325454, 0x32103254))
_ASM_SPREAD = tl.constexpr("{\n.reg .b32 t, u, s;\n" + "".join(_prmt_word(i, *t) for i, t in enumerate(SPREAD_TABLES))
                           + "}")

if not INTERPRET:

    @triton.jit
    def _spread_group_prmt(p, c):
        return tl.inline_asm_elementwise(_ASM_SPREAD, "=r,=r,r,r", [p, c], dtype=(tl.int32, tl.int32),
                                         is_pure=True, pack=1)

else:
    _spread_group_prmt = _spread_group


@triton.jit
def _s24_dense_kernel(v_ptr, meta_ptr, w_ptr, N, K, stride_vn, stride_mn, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr):
    """Dense ``[N, K]`` from values/meta: BLOCK_G groups of four columns per program and row block."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    rows64 = offs_n.to(tl.int64)
    mask = (offs_n < N)[:, None] & (offs_g < K // 4)[None, :]
    v0 = tl.load(v_ptr + rows64[:, None] * stride_vn + 2 * offs_g[None, :], mask=mask, other=0.0,
                 eviction_policy=STREAM)
    v1 = tl.load(v_ptr + rows64[:, None] * stride_vn + 2 * offs_g[None, :] + 1, mask=mask, other=0.0,
                 eviction_policy=STREAM)
    mb = tl.load(meta_ptr + rows64[:, None] * stride_mn + offs_g[None, :] // 2, mask=mask, other=0,
                 eviction_policy=STREAM).to(tl.int32)
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
               meta_words: bool = True, value_words: bool = True) -> list[Config]:
    """``meta_words``: meta may be read as int32 words (K % 32 == 0, 4-byte aligned rows);
    ``value_words``: values may be read as int64 words (x's dtype, 8-byte aligned rows: mm2)."""
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
        if m <= 32 and value_words:  # mm2 (swap-AB): weight rows on the MMA's M side
            for bm, bn, bk, w, st in ((16, 64, 128, 4, 1), (16, 32, 256, 4, 1), (16, 128, 128, 8, 1),
                                      (32, 64, 128, 4, 1), (16, 64, 128, 4, 3), (16, 128, 128, 8, 3),
                                      (16, 32, 128, 4, 1)):
                if bm >= m or bm == 16:
                    split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), device,
                                        max_split=8, per_sm=2)
                    mm.append(cfg("mm2", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st,
                                  extra={"SPLIT_K": split}))
        elif value_words:  # larger M: wide swap-AB tiles (the expansion amortized over BLOCK_M columns)
            for bm, bn, bk, w, st in ((64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)):
                if bm <= triton.next_power_of_2(m):
                    split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), triton.cdiv(k, bk), device)
                    mm.append(cfg("mm2", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st,
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


def value_words_ok(x2: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether mm2 may read ``values`` as int64 words: 16-bit values in x's dtype, 8-byte aligned
    rows (K is a multiple of 8, so a row of K/2 values is whole words)."""
    return (values.dtype == x2.dtype and values.element_size() == 2 and values.data_ptr() % 8 == 0
            and values.stride(0) % 4 == 0)


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
        if not value_words_ok(x2, values):
            raise ValueError("lowbit.kernels_triton.sparse24_matmul: the mm2 path reads values as 8-byte words in "
                             f"x's dtype; got values {values.dtype} (stride {values.stride(0)}) for x {x2.dtype}")
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        split, per = _split_range(c.get("SPLIT_K", 1), k, bk)
        tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
        partial, cnt, mode = split_k_buffers(split, tiles, y)
        _s24_mm2_kernel[(tiles, split)](
            x2, values, meta, bvec, y, partial, cnt, m, n, k, per,
            x2.stride(0), x2.stride(1), values.stride(0), meta.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, PARTIAL=mode, EVEN_K=k % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            GROUP_M=8, PRMT=inline_ptx_ok(x2.device), STAGES=c.num_stages,
            **c.launch_opts(),
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
    vwords = value_words_ok(x2, values)
    cands = lambda: candidates(m, n, k, x.dtype, x.device, meta_words=words, value_words=vwords)
    key = (m_bucket(m), n, k, x.dtype, values.dtype, bias is not None, words, vwords, x.device)
    run = lambda c: _launch(c, x2, values, meta, bias, y)
    c = pick(_CACHE, key, cands, run, x.device, config)
    return finish(run(c), x)


__all__ = ["candidates", "decompress", "sparse24_matmul"]
