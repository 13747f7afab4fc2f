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
to a float32 workspace and a second kernel combines them. Causal masking is bottom-right
aligned (query ``i`` sees keys ``j <= i + S_kv - S_q``), as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, Config, cache_for, cfg, mma_in, num_sms, pick

_CACHE = cache_for("kv_attention")
_LOG2E = 1.4426950408889634


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
def _int4_tile(d_ptr, sc_ptr, z_ptr, offs_s, s_mask, sd_s, ssc_s, sz_s,
               GP: tl.constexpr, NG, DT: tl.constexpr):
    """[BS, GP*32] dequantized int4 rows (groups >= NG masked to 0): (q - zero) * scale."""
    offs_g = tl.arange(0, GP)
    offs_b = tl.arange(0, 16)
    g_mask = offs_g < NG
    m2 = s_mask[:, None] & g_mask[None, :]
    b = tl.load(d_ptr + offs_s[:, None, None] * sd_s + (offs_g * 16)[None, :, None] + offs_b[None, None, :],
                mask=m2[:, :, None], other=0).to(tl.int32)
    codes = tl.interleave(b & 15, b >> 4).to(tl.float32)  # [BS, GP, 32], element 2j low nibble
    sc = tl.load(sc_ptr + offs_s[:, None] * ssc_s + offs_g[None, :], mask=m2, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs_s[:, None] * sz_s + offs_g[None, :], mask=m2, other=0.0).to(tl.float32)
    t = (codes - z[:, :, None]) * sc[:, :, None]
    return tl.reshape(t, [offs_s.shape[0], GP * 32]).to(DT)


@triton.jit
def _kv_attn_kernel(
    q_ptr, k_ptr, ks_ptr, kz_ptr, v_ptr, vs_ptr, vz_ptr, o_ptr, po_ptr, pml_ptr,
    H_KV, GROUPS, S_Q, S_KV, ROWS, ROWS_PAD, kv_per_split, NSPLIT, qk_scale,
    sq_b, sq_h, sq_s, sq_d,
    sk_b, sk_h, sk_s, sks_b, sks_h, sks_s, skz_b, skz_h, skz_s,
    sv_b, sv_h, sv_s, svs_b, svs_h, svs_s, svz_b, svz_h, svz_s,
    so_b, so_h, so_s, so_d,
    D,
    BITS: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, DT: tl.constexpr, PV_DT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < ROWS
    qi = rows % S_Q
    h = hkv * GROUPS + rows // S_Q
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_ptrs = q_ptr + b.to(tl.int64) * sq_b + h.to(tl.int64)[:, None] * sq_h + qi[:, None] * sq_s \
        + offs_d[None, :] * sq_d
    q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(DT)

    kv_lo = pid_s * kv_per_split
    kv_hi = tl.minimum(kv_lo + kv_per_split, S_KV)
    if CAUSAL:
        last = tl.max(tl.where(row_mask, qi, 0), axis=0) + 1 + S_KV - S_Q
        kv_hi = tl.minimum(kv_hi, last)

    k_base = k_ptr + b.to(tl.int64) * sk_b + hkv.to(tl.int64) * sk_h
    v_base = v_ptr + b.to(tl.int64) * sv_b + hkv.to(tl.int64) * sv_h
    ks_base = ks_ptr + b.to(tl.int64) * sks_b + hkv.to(tl.int64) * sks_h
    vs_base = vs_ptr + b.to(tl.int64) * svs_b + hkv.to(tl.int64) * svs_h
    kz_base = kz_ptr + b.to(tl.int64) * skz_b + hkv.to(tl.int64) * skz_h
    vz_base = vz_ptr + b.to(tl.int64) * svz_b + hkv.to(tl.int64) * svz_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(kv_lo, kv_hi, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < kv_hi
        if BITS == 8:
            kt = tl.load(k_base + offs_s[:, None] * sk_s + offs_d[None, :],
                         mask=s_mask[:, None] & d_mask[None, :], other=0)
            kt = _int8_to(kt, DT)
        else:
            kt = _int4_tile(k_base, ks_base, kz_base, offs_s, s_mask, sk_s, sks_s, skz_s, BLOCK_D // 32,
                            D // 32, DT)
        if IEEE:
            sc = tl.dot(q, tl.trans(kt), input_precision="tf32x3")
        else:
            sc = tl.dot(mma_in(q), mma_in(tl.trans(kt)))
        if BITS == 8:
            sc = sc * (tl.load(ks_base + offs_s * sks_s, mask=s_mask, other=0.0).to(tl.float32) * qk_scale)[None, :]
        else:
            sc = sc * qk_scale
        valid = s_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_s[None, :] <= (qi + S_KV - S_Q)[:, None])
        sc = tl.where(valid, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(sc - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if BITS == 8:
            vt = tl.load(v_base + offs_s[:, None] * sv_s + offs_d[None, :],
                         mask=s_mask[:, None] & d_mask[None, :], other=0)
            vt = _int8_to(vt, PV_DT)
            p = p * tl.load(vs_base + offs_s * svs_s, mask=s_mask, other=0.0).to(tl.float32)[None, :]
        else:
            vt = _int4_tile(v_base, vs_base, vz_base, offs_s, s_mask, sv_s, svs_s, svz_s, BLOCK_D // 32,
                            D // 32, PV_DT)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(PV_DT), vt, input_precision="tf32x3")
        else:
            acc = acc * alpha[:, None] + tl.dot(mma_in(p.to(PV_DT)), mma_in(vt))
        m_i = m_new

    if SPLIT:
        base = (pid_bh.to(tl.int64) * NSPLIT + pid_s) * ROWS_PAD
        tl.store(po_ptr + (base + rows)[:, None] * BLOCK_D + offs_d[None, :], acc)
        tl.store(pml_ptr + 2 * base + rows, m_i)
        tl.store(pml_ptr + 2 * base + ROWS_PAD + rows, l_i)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # (l = 0 only on padding rows)
        o_ptrs = o_ptr + b.to(tl.int64) * so_b + h.to(tl.int64)[:, None] * so_h + qi[:, None] * so_s \
            + offs_d[None, :] * so_d
        tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit
def _kv_combine_kernel(
    po_ptr, pml_ptr, o_ptr, H_KV, GROUPS, S_Q, ROWS, ROWS_PAD, NSPLIT, D,
    so_b, so_h, so_s, so_d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hkv = pid_bh % H_KV
    rows = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < ROWS
    offs_d = tl.arange(0, BLOCK_D)
    m_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for j in range(0, NSPLIT):
        base = (pid_bh.to(tl.int64) * NSPLIT + j) * ROWS_PAD
        m_max = tl.maximum(m_max, tl.load(pml_ptr + 2 * base + rows, mask=row_mask, other=float("-inf")))
    m_use = tl.where(m_max == float("-inf"), 0.0, m_max)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j in range(0, NSPLIT):
        base = (pid_bh.to(tl.int64) * NSPLIT + j) * ROWS_PAD
        w = tl.exp2(tl.load(pml_ptr + 2 * base + rows, mask=row_mask, other=float("-inf")) - m_use)
        l += w * tl.load(pml_ptr + 2 * base + ROWS_PAD + rows, mask=row_mask, other=0.0)
        acc += w[:, None] * tl.load(po_ptr + (base + rows)[:, None] * BLOCK_D + offs_d[None, :],
                                    mask=row_mask[:, None], other=0.0)
    out = acc / tl.where(l == 0.0, 1.0, l)[:, None]
    qi = rows % S_Q
    h = hkv * GROUPS + rows // S_Q
    o_ptrs = o_ptr + b.to(tl.int64) * so_b + h.to(tl.int64)[:, None] * so_h + qi[:, None] * so_s \
        + offs_d[None, :] * so_d
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & (offs_d < D)[None, :])


_DT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def candidates(b: int, h_kv: int, rows: int, s_kv: int, d: int, device: torch.device,
               dtype: torch.dtype = torch.float16) -> list[Config]:
    """Row tile, key tile and split count; splits chosen to give ~4 or ~8 programs per multiprocessor."""
    out = []
    bm_list = (16,) if rows <= 16 else ((32, 64) if rows <= 64 else (64, 128))
    bs_list = (64, 32, 128) if d <= 128 else (32, 64)
    if dtype == torch.float32:  # 3-pass tf32 dots: smaller tiles keep registers and shared memory in check
        bm_list = tuple(min(bm, 32) for bm in bm_list[:1])
        bs_list = (32, 64)
    for bm in bm_list:
        for bs in bs_list:
            programs = b * h_kv * triton.cdiv(rows, bm)
            blocks = triton.cdiv(s_kv, bs)
            for per_sm in ((4, 8) if programs < 4 * num_sms(device) else (0,)):
                want = max(1, (per_sm * num_sms(device) + programs - 1) // programs) if per_sm else 1
                split_blocks = triton.cdiv(blocks, min(want, blocks))
                warps = 4 if bm <= 64 else 8
                out.append(cfg("split" if per_sm else "flash", BLOCK_M=bm, BLOCK_S=bs, num_warps=warps,
                               num_stages=2, extra={"BLOCKS_PER_SPLIT": split_blocks}))
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
    split = nsplit > 1
    if split:
        po = torch.empty((b * h_kv * nsplit * rows_pad, block_d), dtype=torch.float32, device=q.device)
        pml = torch.empty((b * h_kv * nsplit * 2 * rows_pad,), dtype=torch.float32, device=q.device)
    else:
        po = pml = out
    kz = k_zero if k_zero is not None else k_scale
    vz = v_zero if v_zero is not None else v_scale
    # 4-bit scale/zero: the group dimension has unit stride (see _unit_last)
    dt = _DT[q.dtype]
    _kv_attn_kernel[(triton.cdiv(rows, bm), b * h_kv, nsplit)](
        q, k, k_scale, kz, v, v_scale, vz, out, po, pml,
        h_kv, groups, s_q, s_kv, rows, rows_pad, per_split, nsplit, scale * _LOG2E,
        *q.stride(),
        k.stride(0), k.stride(1), k.stride(2), *k_scale.stride()[:3], *kz.stride()[:3],
        v.stride(0), v.stride(1), v.stride(2), *v_scale.stride()[:3], *vz.stride()[:3],
        *out.stride(), d,
        BITS=bits, CAUSAL=bool(causal) and s_q > 1,  # with S_q = 1 every key is visible
        SPLIT=split, DT=dt, PV_DT=tl.float32 if q.dtype == torch.float32 else tl.float16,
        IEEE=q.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_S=bs, BLOCK_D=block_d, **c.launch_opts(),
    )
    if split:
        _kv_combine_kernel[(triton.cdiv(rows, bm), b * h_kv)](
            po, pml, out, h_kv, groups, s_q, rows, rows_pad, nsplit, d, *out.stride(),
            BLOCK_M=bm, BLOCK_D=block_d, num_warps=4,
        )
    return out


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
    cands = lambda: candidates(b, h_kv, rows, s_kv, d, q.device, q.dtype)
    key = (b, h_kv, rows, s_q, s_kv, d, bits, bool(causal), q.dtype, q.device)
    run = lambda c: _launch(c, q, k, k_scale, k_zero, v, v_scale, v_zero, causal, sm_scale, out)
    c = pick(_CACHE, key, cands, run, q.device, config)
    return run(c)


__all__ = ["candidates", "kv_attention"]
