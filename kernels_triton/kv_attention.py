"""Attention over an int8 / int4 KV cache (lowbit.formats.kv), decode and prefill, GQA, causal.

One kernel for both: a program takes ``BLOCK_M`` rows of the flattened ``(query head within the
GQA group, query position)`` space of one ``(batch, kv head)``, so in decode (``S_q = 1``) the
``H_q / H_kv`` heads that share a kv head are one tile and the cache is read once for all of
them. Keys/values are dequantized in registers (int8: the integer itself, exact in
float16/bfloat16, with the per-token scale applied to the score column / folded into ``p``;
(``p @ V`` runs in float16 for 16-bit queries: p is in [0, 1] and the cache's scales are
float16, so nothing overflows and bfloat16 queries keep float16's precision there)
int4: ``(q - zero) * scale`` per group of 32), then ``tl.dot`` on the tensor cores with an
online (flash) softmax in base 2.

Split-K ("flash-decoding"): when ``batch * kv_heads * row_blocks`` programs would not fill the
GPU, the context is cut into splits; each writes its unnormalised output, running max and sum
to a float32 workspace, and the last split of a row tile to finish merges them (a second
kernel does under CUDA-graph capture, with the same bits). Causal masking is bottom-right
aligned (query ``i`` sees keys ``j <= i + S_kv - S_q``), as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    STREAM,
    Config,
    arrive,
    cache_for,
    cfg,
    depart,
    inline_ptx_ok,
    mma_in,
    num_sms,
    pick,
    tile_counters,
)

_CACHE = cache_for("kv_attention")
_LOG2E = 1.4426950408889634


# PTX (sm_80+), 4 elements per call. int8 -> float16 exactly: x ^ 0x80 is the unsigned x + 128;
# prmt puts each byte under a 0x64 high byte (the float16 1024 + x + 128), one sub.f16x2 per pair.
# Inputs are read first (outputs may share their registers).
_ASM_I8 = tl.constexpr("""
{
.reg .b32 u, k, m;
xor.b32 u, $2, 0x80808080;
mov.b32 k, 0x64646464;
mov.b32 m, 0x64806480;
prmt.b32 $0, u, k, 0x5140;
prmt.b32 $1, u, k, 0x7372;
sub.f16x2 $0, $0, m;
sub.f16x2 $1, $1, m;
}
""")

# 4 packed int4 bytes -> 4 low-nibble and 4 high-nibble float16 values (code - zero) * scale.
# prmt spreads bytes 0,1 (2,3) into the two halves of a word; lop3 (a & mask) | 0x6400 makes the
# float16 1024 + c (low nibble) or 1024 + 16c (high); adding -(1024 + z), or fma by 1/16 with
# -(64 + z), is exact (c - z), and one mul.f16x2 rounds the product once (as float32 then a cast
# would). $5,$6 = -(1024 + z), $7,$8 = -(64 + z), $9,$10 = scale (pairs of float16).
_ASM_U4 = tl.constexpr("""
{
.reg .b32 w, nl0, nl1, nh0, nh1, s0, s1, z, ml, mh, mg, c16, t0, t1, a0, a1, a2, a3;
mov.b32 w, $4;
mov.b32 nl0, $5;
mov.b32 nl1, $6;
mov.b32 nh0, $7;
mov.b32 nh1, $8;
mov.b32 s0, $9;
mov.b32 s1, $10;
mov.b32 z, 0;
mov.b32 ml, 0x000F000F;
mov.b32 mh, 0x00F000F0;
mov.b32 mg, 0x64006400;
mov.b32 c16, 0x2C002C00;
prmt.b32 t0, w, z, 0x4140;
prmt.b32 t1, w, z, 0x4342;
lop3.b32 a0, t0, ml, mg, 0xea;
lop3.b32 a1, t1, ml, mg, 0xea;
lop3.b32 a2, t0, mh, mg, 0xea;
lop3.b32 a3, t1, mh, mg, 0xea;
add.f16x2 a0, a0, nl0;
add.f16x2 a1, a1, nl1;
fma.rn.f16x2 a2, a2, c16, nh0;
fma.rn.f16x2 a3, a3, c16, nh1;
mul.f16x2 $0, a0, s0;
mul.f16x2 $1, a1, s1;
mul.f16x2 $2, a2, s0;
mul.f16x2 $3, a3, s1;
}
""")



if not INTERPRET:

    @triton.jit
    def _int8_to(k, DT: tl.constexpr):
        """int8 -> DT exactly; float16 by the exponent trick (1152 + k has the bits 0x6480 + k)."""
        if DT == tl.float16:
            return (k.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
        else:
            return k.to(DT)

else:  # the interpreter converts ints to bfloat16 wrongly; go through float32

    @triton.jit
    def _int8_to(k, DT: tl.constexpr):
        return k.to(tl.float32).to(DT)


@triton.jit
def _i8_tile(raw, DT: tl.constexpr, ASM: tl.constexpr):
    """int8 codes -> DT, exactly (4 per PTX call: 1.25 instructions a code)."""
    if ASM and DT == tl.float16:
        return tl.inline_asm_elementwise(_ASM_I8, "=r,=r,r", [raw], dtype=tl.float16, is_pure=True, pack=4)
    else:
        return _int8_to(raw, DT)


@triton.jit
def _u4_tile(raw, sc, z, DT: tl.constexpr, ASM: tl.constexpr):
    """Packed bytes ``[BS, GP, 16]`` and their group's scale/zero ``[BS, GP]`` -> ``(lo, hi)``
    ``[BS, GP*16]`` in DT: ``(code - zero) * scale`` of the low nibbles (elements ``2j``) and of
    the high ones (``2j + 1``). No interleave: the caller splits q and the output the same way."""
    BS: tl.constexpr = raw.shape[0]
    W: tl.constexpr = raw.shape[1] * raw.shape[2]
    zf = z.to(tl.float32)
    if ASM and DT == tl.float16 and sc.dtype == tl.float16:
        nzlo = (-1024.0 - zf).to(tl.float16)[:, :, None]
        nzhi = (-64.0 - zf).to(tl.float16)[:, :, None]
        lo, hi = tl.inline_asm_elementwise(
            _ASM_U4, "=r,=r,=r,=r,r,r,r,r,r,r,r", [raw, nzlo, nzhi, sc[:, :, None]],
            dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        sf = sc.to(tl.float32)[:, :, None]
        lo = (((raw & 15).to(tl.float32) - zf[:, :, None]) * sf).to(DT)
        hi = (((raw >> 4).to(tl.float32) - zf[:, :, None]) * sf).to(DT)
    return tl.reshape(lo, [BS, W]), tl.reshape(hi, [BS, W])


@triton.jit
def _ld8(base, sbase, offs_s, s_mask, st_s, ss_s, offs_d, d_mask, EVEN_D: tl.constexpr):
    """Raw int8 rows [BS, BLOCK_D] and their per-token scales [BS]."""
    ptrs = base + offs_s[:, None] * st_s + offs_d[None, :]
    if EVEN_D:
        t = tl.load(ptrs, mask=s_mask[:, None], other=0, eviction_policy=STREAM)
    else:
        t = tl.load(ptrs, mask=s_mask[:, None] & d_mask[None, :], other=0, eviction_policy=STREAM)
    return t, tl.load(sbase + offs_s * ss_s, mask=s_mask, other=0.0, eviction_policy=STREAM)


@triton.jit
def _ld4_pair(k_base, ks_base, kz_base, v_base, vs_base, vz_base, offs_s, kv_hi, sk_s, sks_s, skz_s, sv_s, svs_s,
              svz_s, NG, GP: tl.constexpr, DT: tl.constexpr, PV_DT: tl.constexpr, ASM: tl.constexpr,
              EVEN_D: tl.constexpr, SZ_CONTIG: tl.constexpr):
    """One key/value tile of the int4 cache, dequantized: k_lo, k_hi, v_lo, v_hi [BS, D/2]."""
    s_mask = offs_s < kv_hi
    ks, kz = _ld4s(ks_base, kz_base, offs_s, s_mask, sks_s, skz_s, NG, GP, EVEN_D, SZ_CONTIG)
    vs, vz = _ld4s(vs_base, vz_base, offs_s, s_mask, svs_s, svz_s, NG, GP, EVEN_D, SZ_CONTIG)
    k_lo, k_hi = _u4_tile(_ld4b(k_base, offs_s, s_mask, sk_s, NG, GP, EVEN_D), ks, kz, DT, ASM)
    v_lo, v_hi = _u4_tile(_ld4b(v_base, offs_s, s_mask, sv_s, NG, GP, EVEN_D), vs, vz, PV_DT, ASM)
    return k_lo, k_hi, v_lo, v_hi


@triton.jit
def _ld8_pair(k_base, ks_base, v_base, vs_base, offs_s, kv_hi, sk_s, sks_s, sv_s, svs_s, offs_d, d_mask,
              DT: tl.constexpr, PV_DT: tl.constexpr, ASM: tl.constexpr, EVEN_D: tl.constexpr):
    """One key/value tile of the int8 cache, dequantized: kf [BS, BLOCK_D], ks [BS], vf, vs."""
    s_mask = offs_s < kv_hi
    kr, ks = _ld8(k_base, ks_base, offs_s, s_mask, sk_s, sks_s, offs_d, d_mask, EVEN_D)
    vr, vs = _ld8(v_base, vs_base, offs_s, s_mask, sv_s, svs_s, offs_d, d_mask, EVEN_D)
    return _i8_tile(kr, DT, ASM), ks, _i8_tile(vr, PV_DT, ASM), vs


@triton.jit
def _ld4b(base, offs_s, s_mask, st_s, NG, GP: tl.constexpr, EVEN_D: tl.constexpr):
    """Raw int4 rows as [BS, GP, 16] bytes (groups >= NG are 0)."""
    offs_g = tl.arange(0, GP)
    offs_b = tl.arange(0, 16)
    ptrs = base + offs_s[:, None, None] * st_s + (offs_g * 16)[None, :, None] + offs_b[None, None, :]
    if EVEN_D:
        return tl.load(ptrs, mask=s_mask[:, None, None], other=0, eviction_policy=STREAM)
    else:
        return tl.load(ptrs, mask=s_mask[:, None, None] & (offs_g < NG)[None, :, None], other=0, eviction_policy=STREAM)


@triton.jit
def _ld4s(sbase, zbase, offs_s, s_mask, ss_s, sz_s, NG, GP: tl.constexpr, EVEN_D: tl.constexpr,
          CONTIG: tl.constexpr):
    """Scale and zero [BS, GP] of int4 rows. CONTIG: both have rows of GP contiguous values (a
    known stride gives vector loads, which Triton then pipelines through shared memory)."""
    offs_g = tl.arange(0, GP)
    if CONTIG:
        return (tl.load(sbase + offs_s[:, None] * GP + offs_g[None, :], mask=s_mask[:, None], other=0.0,
                        eviction_policy=STREAM),
                tl.load(zbase + offs_s[:, None] * GP + offs_g[None, :], mask=s_mask[:, None], other=0.0,
                        eviction_policy=STREAM))
    if EVEN_D:
        m2 = s_mask[:, None]
    else:
        m2 = s_mask[:, None] & (offs_g < NG)[None, :]
    return (tl.load(sbase + offs_s[:, None] * ss_s + offs_g[None, :], mask=m2, other=0.0, eviction_policy=STREAM),
            tl.load(zbase + offs_s[:, None] * sz_s + offs_g[None, :], mask=m2, other=0.0, eviction_policy=STREAM))


@triton.jit
def _softmax_step(sc, valid, m_i, l_i):
    """Online softmax (base 2) of one score tile: (p, alpha, new max, new sum)."""
    sc = tl.where(valid, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(sc - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        return tl.dot(mma_in(a), mma_in(b), acc)


@triton.jit
def _kv_program(H_KV, GROUPS, S_Q, S_KV, ROWS, kv_per_split, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's (batch * kv head, split, batch, kv head, rows of the flattened (head in the
    GQA group, query position) space, their mask, query positions, query heads, key range)."""
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < ROWS
    qi = rows % S_Q
    h = hkv * GROUPS + rows // S_Q
    kv_lo = pid_s * kv_per_split
    kv_hi = tl.minimum(kv_lo + kv_per_split, S_KV)
    if CAUSAL:
        last = tl.max(tl.where(row_mask, qi, 0), axis=0) + 1 + S_KV - S_Q
        kv_hi = tl.minimum(kv_hi, last)
    return pid_bh, pid_s, b, hkv, rows, row_mask, qi, h, kv_lo, kv_hi


@triton.jit
def _kv_bases(c_ptr, s_ptr, z_ptr, b, hkv, sc_b, sc_h, ss_b, ss_h, sz_b, sz_h):
    """The (batch, kv head) bases of a cache's codes, scales and zeros."""
    b64, h64 = b.to(tl.int64), hkv.to(tl.int64)
    return c_ptr + b64 * sc_b + h64 * sc_h, s_ptr + b64 * ss_b + h64 * ss_h, z_ptr + b64 * sz_b + h64 * sz_h


@triton.jit
def _kv_attn_kernel(
    q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, o_ptr, po_ptr, pml_ptr, c_ptr,
    H_KV, GROUPS, S_Q, S_KV, ROWS, ROWS_PAD, kv_per_split, NSPLIT, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sks_b, sks_h, sks_s, skz_b, skz_h, skz_s,
    sv_b, sv_h, sv_s, svs_b, svs_h, svs_s, svz_b, svz_h, svz_s,
    so_b, so_h, so_s, so_d,
    D,
    BITS: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr, PV_DT: tl.constexpr,
    IEEE: tl.constexpr, ASM: tl.constexpr, EVEN_D: tl.constexpr,
    SZ_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
):
    """Triton pipelines the raw loads of a tile (bytes, scales, zeros: cp.async into shared
    memory, ``num_stages``); the codes become float16 in the dot's operand layout (PTX, ASM)."""
    pid_bh, pid_s, b, hkv, rows, row_mask, qi, h, kv_lo, kv_hi = _kv_program(
        H_KV, GROUPS, S_Q, S_KV, ROWS, kv_per_split, CAUSAL, BLOCK_M)
    q_row = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64)[:, None] * sq_h + qi[:, None] * sq_s
    k_base, ks_base, kz_base = _kv_bases(k_ptr, ks_ptr, kz_ptr, b, hkv, sk_b, sk_h, sks_b, sks_h, skz_b, skz_h)
    v_base, vs_base, vz_base = _kv_bases(v_ptr, vs_ptr, vz_ptr, b, hkv, sv_b, sv_h, svs_b, svs_h, svz_b, svz_h)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    ar_s = tl.arange(0, BLOCK_S)
    if BITS == 8:
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        q = tl.load(q_row + offs_d[None, :] * sq_d, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(DT)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s0 in range(kv_lo, kv_hi, BLOCK_S):
            offs_s = s0 + ar_s
            s_mask = offs_s < kv_hi
            kr, ks = _ld8(k_base, ks_base, offs_s, s_mask, sk_s, sks_s, offs_d, d_mask, EVEN_D)
            vr, vs = _ld8(v_base, vs_base, offs_s, s_mask, sv_s, svs_s, offs_d, d_mask, EVEN_D)
            sc = _dot(q, tl.trans(_i8_tile(kr, DT, ASM)), None, IEEE)
            sc = sc * (ks.to(tl.float32) * qk_scale)[None, :]
            valid = s_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_s[None, :] <= (qi + S_KV - S_Q)[:, None])
            p, alpha, m_i, l_i = _softmax_step(sc, valid, m_i, l_i)
            p = p * vs.to(tl.float32)[None, :]
            acc = _dot(p.to(PV_DT), _i8_tile(vr, PV_DT, ASM), acc * alpha[:, None], IEEE)
    else:
        HD: tl.constexpr = BLOCK_D // 2
        GP: tl.constexpr = BLOCK_D // 32
        NG = D // 32
        offs_h = tl.arange(0, HD)
        h_mask = 2 * offs_h < D
        qm = row_mask[:, None] & h_mask[None, :]
        q_lo = tl.load(q_row + (2 * offs_h)[None, :] * sq_d, mask=qm, other=0.0).to(DT)
        q_hi = tl.load(q_row + (2 * offs_h + 1)[None, :] * sq_d, mask=qm, other=0.0).to(DT)
        acc_lo = tl.zeros([BLOCK_M, HD], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, HD], dtype=tl.float32)
        for s0 in range(kv_lo, kv_hi, BLOCK_S):
            offs_s = s0 + ar_s
            s_mask = offs_s < kv_hi
            ks, kz = _ld4s(ks_base, kz_base, offs_s, s_mask, sks_s, skz_s, NG, GP, EVEN_D, SZ_CONTIG)
            vs, vz = _ld4s(vs_base, vz_base, offs_s, s_mask, svs_s, svz_s, NG, GP, EVEN_D, SZ_CONTIG)
            kr = _ld4b(k_base, offs_s, s_mask, sk_s, NG, GP, EVEN_D)
            vr = _ld4b(v_base, offs_s, s_mask, sv_s, NG, GP, EVEN_D)
            k_lo, k_hi = _u4_tile(kr, ks, kz, DT, ASM)
            sc = _dot(q_lo, tl.trans(k_lo), None, IEEE)
            sc = _dot(q_hi, tl.trans(k_hi), sc, IEEE) * qk_scale
            valid = s_mask[None, :]
            if CAUSAL:
                valid = valid & (offs_s[None, :] <= (qi + S_KV - S_Q)[:, None])
            p, alpha, m_i, l_i = _softmax_step(sc, valid, m_i, l_i)
            v_lo, v_hi = _u4_tile(vr, vs, vz, PV_DT, ASM)
            p = p.to(PV_DT)
            acc_lo = _dot(p, v_lo, acc_lo * alpha[:, None], IEEE)
            acc_hi = _dot(p, v_hi, acc_hi * alpha[:, None], IEEE)
        acc = tl.reshape(tl.join(acc_lo, acc_hi), [BLOCK_M, BLOCK_D])  # element 2j + e from acc_{lo,hi}[:, j]
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D

    if SPLIT:
        base = (pid_bh.to(tl.int64) * NSPLIT + pid_s) * ROWS_PAD
        tl.store(po_ptr + (base + rows)[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_mask[:, None])
        tl.store(pml_ptr + 2 * base + rows, m_i, mask=row_mask)
        tl.store(pml_ptr + 2 * base + ROWS_PAD + rows, l_i, mask=row_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (l = 0 only on padding rows)
        o_ptrs = o_ptr + b.to(tl.int64) * so_b + h.to(tl.int64)[:, None] * so_h + qi[:, None] * so_s \
            + offs_d[None, :] * so_d
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    if SPLIT == 2:
        _combine_if_last(c_ptr, po_ptr, pml_ptr, o_ptr, H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT, D,
                         so_b, so_h, so_s, so_d, BLOCK_M, RB, CH, BLOCK_D)


@triton.jit
def _softmax_step_t(sc, valid, m_i, l_i):
    """``_softmax_step`` of a transposed score tile ``[BS, BM]`` (keys along axis 0)."""
    sc = tl.where(valid, sc, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(sc, axis=0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(sc - m_use[None, :])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=0)


@triton.jit
def _store_t(acc, offs_d, d_mask, m_i, l_i, rows, row_mask, qi, h, b, pid_bh, pid_s, o_ptr, po_ptr, pml_ptr,
             ROWS_PAD, NSPLIT, so_b, so_h, so_s, so_d, SPLIT: tl.constexpr, BLOCK_D: tl.constexpr,
             ML: tl.constexpr):
    """Store a transposed output tile ``acc [len(offs_d), BM]`` (columns ``offs_d`` of the rows);
    ML: also the running max and sum (split)."""
    if SPLIT:
        base = (pid_bh.to(tl.int64) * NSPLIT + pid_s) * ROWS_PAD
        tl.store(po_ptr + (base + rows)[None, :] * BLOCK_D + offs_d[:, None], acc, mask=row_mask[None, :])
        if ML:
            tl.store(pml_ptr + 2 * base + rows, m_i, mask=row_mask)
            tl.store(pml_ptr + 2 * base + ROWS_PAD + rows, l_i, mask=row_mask)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[None, :]
        o_ptrs = o_ptr + b.to(tl.int64) * so_b + h.to(tl.int64)[None, :] * so_h + qi[None, :] * so_s \
            + offs_d[:, None] * so_d
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_mask[None, :] & d_mask[:, None])


@triton.jit
def _kv_swap_kernel(
    q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, o_ptr, po_ptr, pml_ptr, c_ptr,
    H_KV, GROUPS, S_Q, S_KV, ROWS, ROWS_PAD, kv_per_split, NSPLIT, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sks_b, sks_h, sks_s, skz_b, skz_h, skz_s,
    sv_b, sv_h, sv_s, svs_b, svs_h, svs_s, svz_b, svz_h, svz_s,
    so_b, so_h, so_s, so_d,
    D,
    BITS: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr, PV_DT: tl.constexpr,
    IEEE: tl.constexpr, ASM: tl.constexpr, EVEN_D: tl.constexpr,
    SZ_CONTIG: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
):
    """Swapped orientation of ``_kv_attn_kernel`` for few query rows (decode): the key tile is
    the MMA's wide side, ``scores^T [BS, BM] = K [BS, D] @ q^T [D, BM]`` (K dequantized in its
    natural layout: each thread's pairs along D are one token's bytes), softmax along axis 0, and
    ``out^T [D, BM] += V^T [D, BS] @ p^T [BS, BM]`` (V dequantized in its natural, coalesced
    layout; the transposed operand is read from shared memory as 16-bit values)."""
    pid_bh, pid_s, b, hkv, rows, row_mask, qi, h, kv_lo, kv_hi = _kv_program(
        H_KV, GROUPS, S_Q, S_KV, ROWS, kv_per_split, CAUSAL, BLOCK_M)
    q_col = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64)[None, :] * sq_h + qi[None, :] * sq_s
    k_base, ks_base, kz_base = _kv_bases(k_ptr, ks_ptr, kz_ptr, b, hkv, sk_b, sk_h, sks_b, sks_h, skz_b, skz_h)
    v_base, vs_base, vz_base = _kv_bases(v_ptr, vs_ptr, vz_ptr, b, hkv, sv_b, sv_h, svs_b, svs_h, svz_b, svz_h)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    ar_s = tl.arange(0, BLOCK_S)
    if BITS == 8:
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        qt = tl.load(q_col + offs_d[:, None] * sq_d, mask=row_mask[None, :] & d_mask[:, None], other=0.0).to(DT)
        acc = tl.zeros([BLOCK_D, BLOCK_M], dtype=tl.float32)
        # The dequantized tiles are loop-carried (tile i + 1 is converted at the end of step i): a
        # dot operand that is a loop-carried value is read from shared memory, so Triton stores the
        # float16 tiles as converted (16 codes a thread) instead of moving the operand's register
        # layout above the conversion (bytes gathered two at a time, then repacked).
        kf, ks, vf, vs = _ld8_pair(k_base, ks_base, v_base, vs_base, kv_lo + ar_s, kv_hi, sk_s, sks_s, sv_s, svs_s,
                                   offs_d, d_mask, DT, PV_DT, ASM, EVEN_D)
        for s0 in range(kv_lo, kv_hi, BLOCK_S):
            offs_s = s0 + ar_s
            s_mask = offs_s < kv_hi
            sc = _dot(kf, qt, None, IEEE)
            sc = sc * (ks.to(tl.float32) * qk_scale)[:, None]
            valid = s_mask[:, None]
            if CAUSAL:
                valid = valid & (offs_s[:, None] <= (qi + S_KV - S_Q)[None, :])
            p, alpha, m_i, l_i = _softmax_step_t(sc, valid, m_i, l_i)
            p = (p * vs.to(tl.float32)[:, None]).to(PV_DT)
            acc = _dot(tl.trans(vf), p, acc * alpha[None, :], IEEE)
            kf, ks, vf, vs = _ld8_pair(k_base, ks_base, v_base, vs_base, offs_s + BLOCK_S, kv_hi, sk_s, sks_s, sv_s,
                                       svs_s, offs_d, d_mask, DT, PV_DT, ASM, EVEN_D)
        _store_t(acc, offs_d, d_mask, m_i, l_i, rows, row_mask, qi, h, b, pid_bh, pid_s, o_ptr, po_ptr, pml_ptr,
                 ROWS_PAD, NSPLIT, so_b, so_h, so_s, so_d, SPLIT, BLOCK_D, 1)
    else:
        HD: tl.constexpr = BLOCK_D // 2
        GP: tl.constexpr = BLOCK_D // 32
        NG = D // 32
        offs_h = tl.arange(0, HD)
        h_mask = 2 * offs_h < D
        qm = row_mask[None, :] & h_mask[:, None]
        q_lo = tl.load(q_col + (2 * offs_h)[:, None] * sq_d, mask=qm, other=0.0).to(DT)
        q_hi = tl.load(q_col + (2 * offs_h + 1)[:, None] * sq_d, mask=qm, other=0.0).to(DT)
        acc_lo = tl.zeros([HD, BLOCK_M], dtype=tl.float32)
        acc_hi = tl.zeros([HD, BLOCK_M], dtype=tl.float32)
        # dequantized tiles loop-carried, as in the int8 branch
        k_lo, k_hi, v_lo, v_hi = _ld4_pair(k_base, ks_base, kz_base, v_base, vs_base, vz_base, kv_lo + ar_s, kv_hi,
                                           sk_s, sks_s, skz_s, sv_s, svs_s, svz_s, NG, GP, DT, PV_DT, ASM, EVEN_D,
                                           SZ_CONTIG)
        for s0 in range(kv_lo, kv_hi, BLOCK_S):
            offs_s = s0 + ar_s
            s_mask = offs_s < kv_hi
            sc = _dot(k_lo, q_lo, None, IEEE)
            sc = _dot(k_hi, q_hi, sc, IEEE) * qk_scale
            valid = s_mask[:, None]
            if CAUSAL:
                valid = valid & (offs_s[:, None] <= (qi + S_KV - S_Q)[None, :])
            p, alpha, m_i, l_i = _softmax_step_t(sc, valid, m_i, l_i)
            p = p.to(PV_DT)
            acc_lo = _dot(tl.trans(v_lo), p, acc_lo * alpha[None, :], IEEE)
            acc_hi = _dot(tl.trans(v_hi), p, acc_hi * alpha[None, :], IEEE)
            k_lo, k_hi, v_lo, v_hi = _ld4_pair(k_base, ks_base, kz_base, v_base, vs_base, vz_base, offs_s + BLOCK_S,
                                               kv_hi, sk_s, sks_s, skz_s, sv_s, svs_s, svz_s, NG, GP, DT, PV_DT, ASM,
                                               EVEN_D, SZ_CONTIG)
        _store_t(acc_lo, 2 * offs_h, h_mask, m_i, l_i, rows, row_mask, qi, h, b, pid_bh, pid_s, o_ptr, po_ptr,
                 pml_ptr, ROWS_PAD, NSPLIT, so_b, so_h, so_s, so_d, SPLIT, BLOCK_D, 1)
        _store_t(acc_hi, 2 * offs_h + 1, h_mask, m_i, l_i, rows, row_mask, qi, h, b, pid_bh, pid_s, o_ptr, po_ptr,
                 pml_ptr, ROWS_PAD, NSPLIT, so_b, so_h, so_s, so_d, SPLIT, BLOCK_D, 0)
    if SPLIT == 2:
        _combine_if_last(c_ptr, po_ptr, pml_ptr, o_ptr, H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT, D,
                         so_b, so_h, so_s, so_d, BLOCK_M, RB, CH, BLOCK_D)


# Not inlined: ptxas then sizes the merge's registers apart from the attention loop's (inlined, it
# raised the int4 kernel's from 150 to 189 a thread, one block an SM fewer, Triton 3.6 sm_90).
@triton.jit(noinline=True)
def _combine_rows(po_ptr, pml_ptr, o_ptr, r0, pid_bh, H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT, D,
                  so_b, so_h, so_s, so_d, RB: tl.constexpr, CH: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits' partial outputs of rows ``r0 .. r0 + RB - 1`` (their running max and sum
    rescale each) and store the normalised rows; CH splits per load. Used by a split launch's last
    program and by the combine kernel alike (the same bits either way); the loads bypass L1."""
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    rows = r0 + tl.arange(0, RB)
    r_mask = rows < ROWS
    offs_j = tl.arange(0, CH)
    offs_d = tl.arange(0, BLOCK_D)
    m_run = tl.full([RB], float("-inf"), tl.float32)
    l_run = tl.zeros([RB], tl.float32)
    acc = tl.zeros([RB, BLOCK_D], dtype=tl.float32)
    for j0 in range(0, NSPLIT, CH):
        j = j0 + offs_j
        base = (pid_bh.to(tl.int64) * NSPLIT + j) * ROWS_PAD
        at = base[:, None] + rows[None, :]  # [CH, RB]
        mask = (j < NSPLIT)[:, None] & r_mask[None, :]
        m = tl.load(pml_ptr + 2 * base[:, None] + rows[None, :], mask=mask, other=float("-inf"),
                    cache_modifier=".cg")
        lj = tl.load(pml_ptr + 2 * base[:, None] + ROWS_PAD + rows[None, :], mask=mask, other=0.0,
                     cache_modifier=".cg")
        o = tl.load(po_ptr + at[:, :, None] * BLOCK_D + offs_d[None, None, :], mask=mask[:, :, None], other=0.0,
                    cache_modifier=".cg")
        m_new = tl.maximum(m_run, tl.max(m, axis=0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp2(m_run - m_use)
        w = tl.exp2(m - m_use[None, :])
        l_run = l_run * a + tl.sum(w * lj, axis=0)
        acc = acc * a[:, None] + tl.sum(w[:, :, None] * o, axis=0)
        m_run = m_new
    out = acc / tl.where(l_run == 0.0, 1.0, l_run)[:, None]
    qi = rows % S_Q
    h = hkv * GROUPS + rows // S_Q
    o_ptrs = o_ptr + b.to(tl.int64) * so_b + h.to(tl.int64)[:, None] * so_h + qi[:, None] * so_s \
        + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=r_mask[:, None] & (offs_d < D)[None, :])


@triton.jit
def _combine_if_last(c_ptr, po_ptr, pml_ptr, o_ptr, H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT, D,
                     so_b, so_h, so_s, so_d, BLOCK_M: tl.constexpr, RB: tl.constexpr, CH: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """After a split program stored its partials: the last split of its (row tile, batch * kv
    head) to arrive merges them (one launch instead of a combine kernel)."""
    last, tile, _ = arrive(c_ptr)
    if last:
        lo = tl.program_id(0) * BLOCK_M
        for r0 in range(lo, tl.minimum(lo + BLOCK_M, ROWS), RB):
            _combine_rows(po_ptr, pml_ptr, o_ptr, r0, tl.program_id(1), H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT,
                          D, so_b, so_h, so_s, so_d, RB, CH, BLOCK_D)
        depart(c_ptr, tile)


@triton.jit
def _kv_combine_kernel(
    po_ptr, pml_ptr, o_ptr, H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT, D,
    so_b, so_h, so_s, so_d,
    RB: tl.constexpr, CH: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The second kernel of a split launch made during CUDA-graph capture: RB rows a program."""
    _combine_rows(po_ptr, pml_ptr, o_ptr, tl.program_id(0) * RB, tl.program_id(1), H_KV, GROUPS, S_Q, ROWS,
                  ROWS_PAD, NSPLIT, D, so_b, so_h, so_s, so_d, RB, CH, BLOCK_D)


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def candidates(b: int, h_kv: int, rows: int, s_kv: int, d: int, device: torch.device,
               dtype: torch.dtype = torch.float16, bits: int = 8) -> list[Config]:
    """Row tile, key tile and split count (path "swap": the swapped-orientation kernel, for at
    most 16 rows, 16-bit queries and int8 caches; its tiles are 64 or 128 keys). Decode-sized calls (few
    ``batch * kv_heads`` programs) cut the context so that about 2, 4 (or, for decode rows, 8)
    programs per multiprocessor run; calls with enough programs also get one unsplit launch."""
    out = []
    bm_list = (16,) if rows <= 16 else ((32, 64) if rows <= 64 else (64, 128))
    bs_list = (64, 128) if d <= 128 else (32, 64)
    if dtype == torch.float32:  # 3-pass tf32 dots: smaller tiles keep registers and shared memory in check
        bm_list = tuple(min(bm, 32) for bm in bm_list[:1])
        bs_list = (32, 64)
    sms = num_sms(device)
    # splits of >= 2 key tiles keep a tile's loads in flight while one is computed; with 8
    # programs an SM (decode rows), the other programs do, and one-tile splits are allowed
    min_blocks = lambda per_sm: 1 if per_sm >= 8 else 2  # noqa: E731
    if rows <= 16 and dtype != torch.float32 and d <= 128 and bits == 8:
        # swapped orientation (_kv_swap_kernel): key tile on the wgmma's 64-wide side
        programs = b * h_kv
        for bs, warps, per_sms in ((64, 4, (2, 4, 8)), (128, 8, (2,))):
            blocks = triton.cdiv(s_kv, bs)
            seen = set()
            for per_sm in per_sms:
                split_blocks = max(min_blocks(per_sm), triton.cdiv(blocks, triton.cdiv(per_sm * sms, programs)))
                if triton.cdiv(blocks, split_blocks) <= 1 or split_blocks in seen:
                    continue
                seen.add(split_blocks)
                out.append(cfg("swap", BLOCK_M=16, BLOCK_S=bs, num_warps=warps, num_stages=2,
                               extra={"BLOCKS_PER_SPLIT": split_blocks}))
            if programs >= sms or not seen:
                out.append(cfg("swap", BLOCK_M=16, BLOCK_S=bs, num_warps=warps, num_stages=2))
    for bm in bm_list:
        warps = 4 if bm <= 64 else 8
        for bs in bs_list:
            programs = b * h_kv * triton.cdiv(rows, bm)
            blocks = triton.cdiv(s_kv, bs)
            seen = set()
            for per_sm in (2, 4, 8) if rows <= 16 else (2, 4):
                want = triton.cdiv(per_sm * sms, programs)
                split_blocks = max(min_blocks(per_sm), triton.cdiv(blocks, want))
                if triton.cdiv(blocks, split_blocks) <= 1 or split_blocks in seen:
                    continue
                seen.add(split_blocks)
                out.append(cfg("split", BLOCK_M=bm, BLOCK_S=bs, num_warps=warps, num_stages=2,
                               extra={"BLOCKS_PER_SPLIT": split_blocks}))
            if programs >= sms or not seen:
                out.append(cfg("flash", BLOCK_M=bm, BLOCK_S=bs, num_warps=warps, num_stages=2))
    return out


def _launch(c: Config, q, k, k_scale, k_zero, v, v_scale, v_zero, causal: bool, scale: float, out):
    b, h_q, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    bits = 8 if k.dtype == torch.int8 else 4
    groups = h_q // h_kv
    rows = groups * s_q
    bm, bs = c["BLOCK_M"], c["BLOCK_S"]
    if bits == 4:  # 16-token int4 tiles miscompile with Triton 3.6 on sm_90 (wrong results): use >= 32
        bs = max(bs, 32)
    block_d = max(16, triton.next_power_of_2(d))
    per_split = c.get("BLOCKS_PER_SPLIT", triton.cdiv(s_kv, bs)) * bs
    nsplit = triton.cdiv(s_kv, per_split)
    rows_pad = triton.cdiv(rows, bm) * bm
    split, cnt = 0, out
    if nsplit > 1:  # the last split of a row tile merges (2), or a combine kernel does (1, graph capture)
        po = torch.empty((b * h_kv * nsplit * rows_pad, block_d), dtype=torch.float32, device=q.device)
        pml = torch.empty((b * h_kv * nsplit * 2 * rows_pad,), dtype=torch.float32, device=q.device)
        cnt = tile_counters(triton.cdiv(rows, bm) * b * h_kv, q.device)
        split, cnt = (1, po) if cnt is None else (2, cnt)
    else:
        po = pml = out
    rb, ch = _combine_tile(bm, rows, nsplit, block_d)
    kz = k_zero if k_zero is not None else k_scale
    vz = v_zero if v_zero is not None else v_scale
    # 4-bit scale/zero: the group dimension has unit stride (see _unit_last)
    dt = _DT[q.dtype]
    even_d = block_d == d
    ng = d // 32
    sz_contig = bits == 4 and even_d and all(t.stride(2) == ng for t in (k_scale, kz, v_scale, vz))
    if c.path == "swap" and bits == 4:  # (its int4 build faulted on an H100 with Triton 3.6)
        raise ValueError("lowbit.kernels_triton.kv_attention: the 'swap' path takes int8 caches only")
    kernel = _kv_swap_kernel if c.path == "swap" else _kv_attn_kernel
    kernel[(triton.cdiv(rows, bm), b * h_kv, nsplit)](
        q, k, k_scale, kz, v, v_scale, vz, out, po, pml, cnt,
        h_kv, groups, s_q, s_kv, rows, rows_pad, per_split, nsplit, scale * _LOG2E,
        *q.stride(),
        k.stride(0), k.stride(1), k.stride(2), *k_scale.stride()[:3], *kz.stride()[:3],
        v.stride(0), v.stride(1), v.stride(2), *v_scale.stride()[:3], *vz.stride()[:3],
        *out.stride(), d,
        BITS=bits, CAUSAL=bool(causal) and s_q > 1,  # with S_q = 1 every key is visible
        SPLIT=split, DT=dt, PV_DT=tl.float32 if q.dtype == torch.float32 else tl.float16,
        IEEE=q.dtype == torch.float32, ASM=not INTERPRET and inline_ptx_ok(q.device), EVEN_D=even_d,
        SZ_CONTIG=sz_contig,
        BLOCK_M=bm, BLOCK_S=bs, BLOCK_D=block_d, RB=rb, CH=ch, **c.launch_opts(),
    )
    if split == 1:  # the same merge as the last split's, in as many warps (the same bits)
        _kv_combine_kernel[(triton.cdiv(rows, rb), b * h_kv)](
            po, pml, out, h_kv, groups, s_q, rows, rows_pad, nsplit, d, *out.stride(),
            RB=rb, CH=ch, BLOCK_D=block_d, num_warps=c.launch_opts()["num_warps"],
        )
    return out


def _combine_tile(bm: int, rows: int, nsplit: int, block_d: int) -> tuple[int, int]:
    """Rows and splits a merge step of a split launch loads at once: all of a decode row tile's
    rows (a GQA group) where they fit, as many splits as keep the tile within 64 float32 values a
    thread of 4 warps (one or two load round trips for the usual 16-64 splits)."""
    rb = min(bm, 16, max(2, triton.next_power_of_2(rows)))
    ch = max(1, min(64, triton.next_power_of_2(nsplit), 8192 // (rb * block_d)))
    return rb, ch


def _unit_last(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal: bool = False, scale: float | None = None,
                 *, config: Config | str | None = None):
    """Attention of ``q [B, H_q, S_q, D]`` over a quantized cache; CUDA (or interpreted CPU) tensors."""
    b, h_q, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    k, v = _unit_last(k), _unit_last(v)
    bits = 8 if k.dtype == torch.int8 else 4
    if bits == 4:
        k_scale, k_zero, v_scale, v_zero = (_unit_last(t) for t in (k_scale, k_zero, v_scale, v_zero))
    sm_scale = d ** -0.5 if scale is None else float(scale)
    out = torch.empty((b, h_q, s_q, d), dtype=q.dtype, device=q.device)
    rows = (h_q // h_kv) * s_q
    cands = lambda: candidates(b, h_kv, rows, s_kv, d, q.device, q.dtype, bits)
    key = (b, h_kv, rows, s_q, s_kv, d, bits, bool(causal), q.dtype, q.device)
    run = lambda c: _launch(c, q, k, k_scale, k_zero, v, v_scale, v_zero, causal, sm_scale, out)
    c = pick(_CACHE, key, cands, run, q.device, config)
    return run(c)


__all__ = ["candidates", "kv_attention"]
