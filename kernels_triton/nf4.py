"""NF4 matmul ``y = x @ W.T (+ bias)`` on bitsandbytes' layout, read directly.

``qweight`` uint8 ``[ceil(N*K/2)]``: the row-major flattened weight, element ``2i`` in the HIGH
nibble of byte ``i``; one absmax per ``blocksize`` elements of the flattened weight (float32,
or uint8 with double quantization: ``absmax_code[a] * absmax_scale[blk // 256] + offset``).
``w = NF4_CODE[q] * absmax``. No repacking; the only derived data is the 16-entry code table
in the activation dtype, cached per device (64 bytes: one cache line, so the per-nibble
lookups of a warp hit one L1 line).

Paths (as for int4): ``gemv`` (few rows; NG runs of at most 128 elements a step, each within
one absmax block, block sums scaled once), ``mm`` (tensor cores, the absmax applied to the fp32
tile per K step) when ``K % blocksize == 0``, and ``dense`` (dequantize, then cuBLAS) for large M or
layouts whose blocks straddle rows.
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
    finish,
    finish_split,
    inline_ptx_ok,
    load_xt_pairs,
    m_bucket,
    mma_in,
    pick,
    rows_2d,
    runs_per_step,
    scale_rows,
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

_CACHE = cache_for("nf4_matmul")
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)
_tables: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def code_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 16 NF4 values in ``dtype`` on ``device`` (cached)."""
    key = (str(device), dtype)
    t = _tables.get(key)
    if t is None:
        t = _tables[key] = torch.tensor(_NF4, dtype=torch.float32).to(dtype).to(device)
    return t


def _register_lut_asm(dtype: torch.dtype, pairs: bool = False) -> str:
    """Inline PTX: the 8 nibbles of an int32 word -> their NF4 values rounded to ``dtype``
    (float16/bfloat16). Default: 8 float32 outputs in nibble order (bits 0-3 first), for the
    GEMV's float32 math. ``pairs``: the word is 4 packed bytes (``pack=4``) and the outputs are
    the 4 high-nibble values (elements 2j) then the 4 low-nibble values (2j + 1), 16-bit, two
    to a register (tensor-core operands).

    The 16 table entries come in 8 registers, a low-byte and a high-byte plane (for the GEMV the
    operands after the word, made per lane by ``_lut_planes``; for ``pairs`` immediates); per 4
    nibbles ``prmt`` looks up entries 0-7 and 8-15 of each plane (4 ``prmt``), a fifth ``prmt``
    with its sign-replicate mode turns each nibble's top bit into a byte mask, two ``lop3``
    select, and two ``prmt`` interleave the planes into half2 words: ~3 instructions a weight and
    no memory access, where the table in L1 costs one load per weight (the L1 pipe bound the GEMV).
    """
    if pairs:  # (pack=4 would pass each 32-bit operand 4 times: the planes as immediates here)
        bits = [b & 0xFFFF for b in torch.tensor(_NF4, dtype=torch.float32).to(dtype).view(torch.int16).tolist()]
        lo = [sum((bits[4 * r + j] & 0xFF) << (8 * j) for j in range(4)) for r in range(4)]
        hi = [sum((bits[4 * r + j] >> 8) << (8 * j) for j in range(4)) for r in range(4)]
        consts = "".join(f"mov.b32 L{r}, {lo[r]:#010x};\nmov.b32 H{r}, {hi[r]:#010x};\n" for r in range(4))
    else:  # the planes are the operands after the word ($8)
        consts = "".join(f"mov.b32 L{r}, ${9 + r};\nmov.b32 H{r}, ${13 + r};\n" for r in range(4))

    def four(src: str, out: int) -> str:
        if pairs:  # p0 = (lo, hi) of byte 2*out, p1 = of the next byte: regroup by nibble
            cvt = f"prmt.b32 ${out}, p0, p1, 0x7632;\nprmt.b32 ${out + 2}, p0, p1, 0x5410;\n"
        elif dtype == torch.float16:
            cvt = (f"mov.b32 {{h0, h1}}, p0;\ncvt.f32.f16 ${out}, h0;\ncvt.f32.f16 ${out + 1}, h1;\n"
                   f"mov.b32 {{h0, h1}}, p1;\ncvt.f32.f16 ${out + 2}, h0;\ncvt.f32.f16 ${out + 3}, h1;\n")
        else:  # bfloat16 -> float32: the 16 bits on top
            cvt = (f"shl.b32 ${out}, p0, 16;\nand.b32 ${out + 1}, p0, 0xFFFF0000;\n"
                   f"shl.b32 ${out + 2}, p1, 16;\nand.b32 ${out + 3}, p1, 0xFFFF0000;\n")
        return (f"and.b32 i, {src}, 0x7777;\nshl.b32 t, {src}, 4;\nprmt.b32 m, t, {src}, 0xD9C8;\n"
                "prmt.b32 a, L0, L1, i;\nprmt.b32 b, L2, L3, i;\nprmt.b32 c, H0, H1, i;\nprmt.b32 d, H2, H3, i;\n"
                "lop3.b32 a, a, b, m, 0xD8;\nlop3.b32 c, c, d, m, 0xD8;\n"
                "prmt.b32 p0, a, c, 0x5140;\nprmt.b32 p1, a, c, 0x7362;\n" + cvt)

    if pairs:  # outputs $0 $1: high nibbles of bytes (0,1), (2,3); $2 $3: low nibbles; input $4
        return ("{\n.reg .b32 L0, L1, L2, L3, H0, H1, H2, H3, s, i, t, m, a, b, c, d, p0, p1;\n"
                + consts + four("$4", 0) + "shr.u32 s, $4, 16;\n" + four("s", 1) + "}")
    return ("{\n.reg .b32 L0, L1, L2, L3, H0, H1, H2, H3, s, i, t, m, a, b, c, d, p0, p1;\n.reg .b16 h0, h1;\n"
            + consts + four("$8", 0) + "shr.u32 s, $8, 16;\n" + four("s", 4) + "}")


_LUT_F16 = tl.constexpr(_register_lut_asm(torch.float16))
_LUT_BF16 = tl.constexpr(_register_lut_asm(torch.bfloat16))
_LUT_F16_PAIRS = tl.constexpr(_register_lut_asm(torch.float16, pairs=True))
_LUT_BF16_PAIRS = tl.constexpr(_register_lut_asm(torch.bfloat16, pairs=True))
_C_SPREAD = tl.constexpr("=f,=f,=f,=f,=f,=f,=f,=f,r" + ",r" * 8)  # outputs, the word, the 8 planes


# The planes from the table's 8 words: lane l loads word l & 7 and every lane gathers all 8 by
# shuffles; then L_r = bytes 0, 2 of words 2r, 2r + 1 (the entries' low bytes), H_r = bytes 1, 3.
# The shuffles' source lanes are j + z, z = bit 14 of the lane's word, which is 0 (bit 14 of a
# float16/bfloat16 of magnitude <= 1): ptxas cannot prove the planes warp-uniform, so they stay
# in vector registers. (Uniform, as immediates or from constant lanes, they went to uniform
# registers and were copied into a vector register before most lookups: ~0.75 moves a weight.)
_ASM_PLANES = tl.constexpr(
    "{\n.reg .b32 l, v, z, w0, w1, w2, w3, w4, w5, w6, w7;\n.reg .b64 a;\n"
    "mov.u32 l, %laneid;\nand.b32 l, l, 7;\nmul.wide.u32 a, l, 4;\nadd.s64 a, a, $8;\nld.global.nc.b32 v, [a];\n"
    "bfe.u32 z, v, 14, 1;\n"
    + "add.u32 z, z, 1;\n".join(f"shfl.sync.idx.b32 w{j}, v, z, 0x1f, 0xffffffff;\n" for j in range(8))
    + "".join(f"prmt.b32 ${r}, w{2 * r}, w{2 * r + 1}, 0x6420;\n" for r in range(4))
    + "".join(f"prmt.b32 ${4 + r}, w{2 * r}, w{2 * r + 1}, 0x7531;\n" for r in range(4))
    + "}")


if not INTERPRET:

    @triton.jit
    def _lut_planes(lut_ptr):
        """The 16-entry table in a 16-bit dtype (``lut_ptr``) as 8 registers: its low-byte plane
        (byte j of word r = low byte of entry 4r + j) and its high-byte plane, made once a program."""
        return tl.inline_asm_elementwise(_ASM_PLANES, "=r,=r,=r,=r,=r,=r,=r,=r,l",
                                         [lut_ptr.to(tl.int64, bitcast=True)], dtype=(tl.int32,) * 8, is_pure=True,
                                         pack=1)

else:  # the interpreter's stand-ins read the table from memory

    @triton.jit
    def _lut_planes(lut_ptr):
        return 0, 0, 0, 0, 0, 0, 0, 0


@triton.jit
def _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, idx, mask, DQ: tl.constexpr):
    """Block absmax (float32) at flat block indices ``idx``, decoding double quantization."""
    if DQ:
        a = tl.load(am_ptr + idx, mask=mask, other=0, eviction_policy=STREAM).to(tl.int32)
        c = tl.load(am_code_ptr + a, mask=mask, other=0.0)
        sc = tl.load(am_scale_ptr + idx // 256, mask=mask, other=0.0, eviction_policy=STREAM)
        return c * sc + am_offset
    else:
        return tl.load(am_ptr + idx, mask=mask, other=0.0, eviction_policy=STREAM)


@triton.jit
def _nf4_gemv_kernel(
    x_ptr, qw_ptr, am_ptr, am_scale_ptr, am_code_ptr, am_offset, lut_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, BS, k_per_split,
    stride_xm, stride_xk, stride_ym,
    DQ: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_N: tl.constexpr, GS: tl.constexpr, NG: tl.constexpr, REG_LUT: tl.constexpr, IS_BF16: tl.constexpr,
    STAGES: tl.constexpr,
):
    """One row of x against BLOCK_N rows of W; each step NG runs of GS elements, each run within
    one absmax block; the loads of STAGES - 1 steps in flight through shared memory (``STAGES`` > 1:
    Triton's pipeliner), else every load of a step issued one step ahead in registers. ``REG_LUT``: codes from the
    register table (NVIDIA, float16/bfloat16 x; values rounded to x's dtype as in the ``mm``
    path), else from the float32 table in memory.

    The weight is read as int32 words (bytes 4j..4j+3 = elements 8j..8j+7; element 8j+i in
    bits 8*(i//2) + 4*(1 - i%2)); each nibble indexes the 16-entry float32 table.
    """
    BK: tl.constexpr = GS * NG
    pid_n = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows64 = offs_n.to(tl.int64)
    qw_ptr = qw_ptr.to(tl.pointer_type(tl.int32))  # uint8 bytes read as int32 words
    # rows of K / 8 words, a multiple of 4 (K is a multiple of GS >= 32): 16-byte loads
    q_ptrs = qw_ptr + rows64[:, None] * tl.multiple_of(K // 8, 4) + tl.arange(0, BK // 8)[None, :]
    x_ptrs = x_ptr + m * stride_xm + tl.arange(0, BK) * stride_xk
    blk0 = rows64[:, None] * (K // BS)
    runs = GS * tl.arange(0, NG)[None, :]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    tab = _lut_planes(lut_ptr) if REG_LUT else 0
    if STAGES > 1:  # Triton's pipeliner stages the loads through shared memory (cp.async)
        for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
            wd = tl.load(q_ptrs + word_offset(k0, BK), mask=n_mask[:, None], other=0, eviction_policy=STREAM)
            am = _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, blk0 + (k0 + runs) // BS, n_mask[:, None], DQ)
            xv = tl.load(x_ptrs + k0 * stride_xk)
            acc += _nf4_gemv_step(wd, am, xv, lut_ptr, tab, REG_LUT, IS_BF16, BLOCK_N, GS, NG)
    else:
        wd_n = tl.load(q_ptrs + word_offset(k_lo, BK), mask=n_mask[:, None], other=0, eviction_policy=STREAM)
        am_n = _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, blk0 + (k_lo + runs) // BS, n_mask[:, None], DQ)
        xv_n = tl.load(x_ptrs + k_lo * stride_xk)
        for k0 in range(k_lo, k_hi, BK):
            wd, am, xv = wd_n, am_n, xv_n
            k_next = tl.minimum(k0 + BK, k_hi - BK)  # (the last step re-reads itself: no mask needed)
            wd_n = tl.load(q_ptrs + word_offset(k_next, BK), mask=n_mask[:, None], other=0, eviction_policy=STREAM)
            am_n = _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, blk0 + (k_next + runs) // BS,
                           n_mask[:, None], DQ)
            xv_n = tl.load(x_ptrs + k_next * stride_xk)
            acc += _nf4_gemv_step(wd, am, xv, lut_ptr, tab, REG_LUT, IS_BF16, BLOCK_N, GS, NG)
    store_row(acc, m, offs_n, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS, PARTIAL)


@triton.jit
def _nf4_gemv_step(wd, am, xv, lut_ptr, tab, REG_LUT: tl.constexpr, IS_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
                   GS: tl.constexpr, NG: tl.constexpr):
    """One GEMV step's contribution [BLOCK_N]: per run and row ``absmax * sum_k code_k x_k``."""
    if REG_LUT:
        w = _nf4_spread_reg(wd, lut_ptr, tab, IS_BF16)
    else:
        w = _nf4_spread(wd, lut_ptr)
    qx = tl.sum(tl.reshape(w * xv.to(tl.float32)[None, :], [BLOCK_N, NG, GS]), axis=2)
    return tl.sum(am * qx, axis=1)


if not INTERPRET:

    @triton.jit
    def _nf4_spread_reg(w, lut_ptr, tab, IS_BF16: tl.constexpr):
        """``_nf4_spread`` from the register table ``tab`` (``_lut_planes``; values rounded to x's
        dtype), no loads."""
        args = [w, tab[0], tab[1], tab[2], tab[3], tab[4], tab[5], tab[6], tab[7]]
        if IS_BF16:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _LUT_BF16, _C_SPREAD, args, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        else:
            o0, o1, o2, o3, o4, o5, o6, o7 = tl.inline_asm_elementwise(
                _LUT_F16, _C_SPREAD, args, dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        # element 8j+i is nibble (8*(i//2) + 4*(1-i%2)) / 4: elements 0..7 = nibbles 1,0,3,2,5,4,7,6
        t = tl.join(tl.join(tl.join(o1, o5), tl.join(o3, o7)), tl.join(tl.join(o0, o4), tl.join(o2, o6)))
        return tl.reshape(t, [w.shape[0], w.shape[1] * 8])

    @triton.jit
    def _nf4_byte_codes(qb, lut_ptr, IS_BF16: tl.constexpr, REG_LUT: tl.constexpr):
        """uint8 [R, C] -> (high-nibble values, low-nibble values) [R, C] in ``lut_ptr``'s dtype
        (float16/bfloat16): from the register table (``REG_LUT``), else the table in memory."""
        if REG_LUT:
            if IS_BF16:
                hi, lo = tl.inline_asm_elementwise(_LUT_BF16_PAIRS, "=r,=r,=r,=r,r", [qb],
                                                   dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
            else:
                hi, lo = tl.inline_asm_elementwise(_LUT_F16_PAIRS, "=r,=r,=r,=r,r", [qb],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            return hi, lo
        else:
            b = qb.to(tl.int32)
            return tl.load(lut_ptr + (b >> 4)), tl.load(lut_ptr + (b & 15))

else:  # the interpreter runs no PTX: the same values from a table in x's dtype

    @triton.jit
    def _nf4_spread_reg(w, lut_ptr, tab, IS_BF16: tl.constexpr):
        return _nf4_spread(w, lut_ptr).to(tl.float32)

    @triton.jit
    def _nf4_byte_codes(qb, lut_ptr, IS_BF16: tl.constexpr, REG_LUT: tl.constexpr):
        b = qb.to(tl.int32)
        return tl.load(lut_ptr + (b >> 4)), tl.load(lut_ptr + (b & 15))


@triton.jit
def _nf4_spread(w, lut_ptr):
    """int32 words [R, C] -> [R, 8C] table values, element 8j+i from nibble (8*(i//2) + 4*(1-i%2))."""
    n0 = tl.load(lut_ptr + ((w >> 4) & 15))
    n1 = tl.load(lut_ptr + (w & 15))
    n2 = tl.load(lut_ptr + ((w >> 12) & 15))
    n3 = tl.load(lut_ptr + ((w >> 8) & 15))
    n4 = tl.load(lut_ptr + ((w >> 20) & 15))
    n5 = tl.load(lut_ptr + ((w >> 16) & 15))
    n6 = tl.load(lut_ptr + ((w >> 28) & 15))
    n7 = tl.load(lut_ptr + ((w >> 24) & 15))
    t = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    return tl.reshape(t, [w.shape[0], w.shape[1] * 8])


@triton.jit
def _nf4_mm_kernel(
    x_ptr, qw_ptr, am_ptr, am_scale_ptr, am_code_ptr, am_offset, lut_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, BS, k_per_split,
    stride_xm, stride_xk, stride_ym,
    DQ: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tensor-core tiles; B = table[nibble] in x's dtype, absmax applied per K step (BLOCK_K <= BS)."""
    pid_k, offs_m, offs_n, m_mask, n_mask, rows64 = tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :] * stride_xk
    q_ptrs = qw_ptr + rows64[:, None] * (K // 2) + tl.arange(0, BLOCK_K // 2)[None, :]
    blocks_per_row = K // BS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        xt = tl.load(x_ptrs + k0 * stride_xk, mask=m_mask[:, None], other=0.0)
        qb = tl.load(q_ptrs + k0 // 2, mask=n_mask[:, None], other=0, eviction_policy=STREAM).to(tl.int32)
        w = tl.load(lut_ptr + tl.interleave(qb >> 4, qb & 15))  # element 2i: high nibble
        part = tl.dot(mma_in(xt), mma_in(tl.trans(w)))
        am = _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, rows64 * blocks_per_row + k0 // BS, n_mask, DQ)
        acc += part * am[None, :]
    store_out(acc, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym, HAS_BIAS,
              PARTIAL)


@triton.jit
def _nf4_mmt_kernel(
    x_ptr, qw_ptr, am_ptr, am_scale_ptr, am_code_ptr, am_offset, lut_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, BS, k_per_split,
    stride_xm, stride_xk, stride_ym,
    DQ: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, IS_BF16: tl.constexpr,
    REG_LUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SCALE_B: tl.constexpr, X_PAIRS: tl.constexpr,
):
    """Swap-AB tensor-core tiles, ``acc[BLOCK_N, BLOCK_M] = W_tile @ x_tile^T``, as int4's
    ``_int4_mmt_kernel``: packed bytes staged by the pipeliner and read straight into the MMA's
    register layout, the high nibbles (elements 2j) meeting the even rows of x^T and the low ones
    the odd rows; codes from the register table (``REG_LUT``, 4 bytes a PTX call; else the table
    in memory, in x's dtype), absmax per K step (BLOCK_K <= BS): folded into the tile
    (``SCALE_B``) or applied to each step's float32 product."""
    pid_k, offs_m, offs_n, m_mask, n_mask, rows64 = tile_of_program(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    HB: tl.constexpr = BLOCK_K // 2
    q_ptrs = qw_ptr + rows64[:, None] * (K // 2) + tl.arange(0, HB)[None, :]
    xt_ptrs = xt_pair_ptrs(x_ptr, offs_m, stride_xm, stride_xk, HB, X_PAIRS)
    blocks_per_row = K // BS
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        qb = tl.load(q_ptrs + k0 // 2, mask=n_mask[:, None], other=0, eviction_policy=STREAM)
        xe, xo = load_xt_pairs(x_ptr, xt_ptrs, k0, m_mask, stride_xk, X_PAIRS)
        am = _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, rows64 * blocks_per_row + k0 // BS, n_mask, DQ)
        hi, lo = _nf4_byte_codes(qb, lut_ptr, IS_BF16, REG_LUT)
        if SCALE_B:
            acc = tl.dot(mma_in(scale_rows(hi, am)), mma_in(xe), acc)
            acc = tl.dot(mma_in(scale_rows(lo, am)), mma_in(xo), acc)
        else:
            acc += tl.dot(mma_in(lo), mma_in(xo), tl.dot(mma_in(hi), mma_in(xe))) * am[:, None]
    store_out(tl.trans(acc), offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
              HAS_BIAS, PARTIAL)


@triton.jit
def _nf4_dequant_kernel(
    qw_ptr, am_ptr, am_scale_ptr, am_code_ptr, am_offset, lut_ptr, w_ptr, NUMEL, BS,
    DQ: tl.constexpr, BLOCK: tl.constexpr, GL: tl.constexpr,
):
    """Flat decode of ``BLOCK`` bytes (2*BLOCK elements) per program, any shape: runs of ``GL``
    bytes that each lie in one absmax block, so the absmax (and its double-quant decode) is
    loaded once per run and broadcast instead of once per element."""
    R: tl.constexpr = BLOCK // GL
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs_b = start + tl.arange(0, R)[:, None] * GL + tl.arange(0, GL)[None, :]
    b = tl.load(qw_ptr + offs_b, mask=2 * offs_b < NUMEL, other=0, eviction_policy=STREAM).to(tl.int32)
    e_run = 2 * (start + tl.arange(0, R) * GL)
    am = _absmax(am_ptr, am_scale_ptr, am_code_ptr, am_offset, e_run // BS, e_run < NUMEL, DQ)
    w = tl.interleave(tl.load(lut_ptr + (b >> 4)), tl.load(lut_ptr + (b & 15))) * am[:, None]  # [R, 2GL]
    offs = 2 * start + tl.arange(0, R)[:, None] * (2 * GL) + tl.arange(0, 2 * GL)[None, :]
    tl.store(w_ptr + offs, w.to(w_ptr.dtype.element_ty), mask=offs < NUMEL)


def _dq_args(absmax, absmax_scale, absmax_code):
    dq = absmax_scale is not None
    return (absmax, absmax_scale if dq else absmax, absmax_code if dq else absmax), dq


def dequantize(qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, shape, dtype) -> torch.Tensor:
    """Dense ``shape`` weight in ``dtype`` (float32 math, then one rounding)."""
    n, k = shape
    w = torch.empty((n, k), dtype=dtype, device=qweight.device)
    (am, am_s, am_c), dq = _dq_args(absmax, absmax_scale, absmax_code)
    block = 512
    _nf4_dequant_kernel[(triton.cdiv(qweight.numel(), block),)](
        qweight, am, am_s, am_c, float(absmax_offset), code_table(qweight.device, torch.float32), w, n * k, blocksize,
        DQ=dq, BLOCK=block, GL=min(blocksize // 2, block), num_warps=4,
    )
    return w


def candidates(m: int, n: int, k: int, bs: int, dtype: torch.dtype, device: torch.device) -> list[Config]:
    dense = [cfg("dense")]
    if k % bs:  # absmax blocks straddle rows: only the flat decode handles that
        return dense
    gs = min(bs, 128)
    gemv = []
    reg_luts = (1, 0) if dtype in (torch.float16, torch.bfloat16) and inline_ptx_ok(device) else (0,)
    for reg_lut in reg_luts if gs >= 32 else ():  # (the GEMV's rows are read as 16-byte vectors)
        for bn, ng, w, st in ((16, 8, 4, 3), (32, 4, 4, 3), (16, 8, 2, 4), (16, 8, 2, 0), (16, 8, 4, 0), (16, 4, 2, 0),
                              (32, 4, 4, 0), (64, 1, 8, 0)):
            ng = runs_per_step(k // gs, ng)
            split = split_k_for(triton.cdiv(n, bn) * m, k // (gs * ng), device, max_split=32, per_sm=4)
            gemv.append(cfg("gemv", BLOCK_N=bn, num_warps=w, num_stages=3,
                            extra={"SPLIT_K": split, "NG": ng, "REG_LUT": reg_lut, **({"STAGES": st} if st else {})}))
    gemv = with_unsplit(gemv)
    mm = []
    if dtype in (torch.float16, torch.bfloat16):
        if m <= 16:
            shapes = ((16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 64, 4, 4), (16, 128, 64, 4, 3))
        elif m <= 64:
            shapes = ((32, 64, 128, 4, 3), (64, 64, 64, 4, 4), (64, 128, 64, 4, 3))
        else:
            shapes = ((128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3))
        mm = tile_configs("mm", shapes, m, n, k, bs, device)
        if m <= 256:  # swap-AB tiles
            mm += tile_configs("mmt", swap_ab_shapes(m, 64), m, n, k, bs, device,
                               extra={"REG_LUT": int(inline_ptx_ok(device))}, swap_ab=True)
    if m > (16 if dtype == torch.float32 else 8):
        gemv = []
    if m <= 4 or not mm:
        return gemv + mm + (dense if m > 1 else [])
    if m <= 256:
        return mm + gemv + dense
    return dense + mm


def _split(split: int, steps: int) -> int:
    per = triton.cdiv(steps, split)
    return triton.cdiv(steps, per)


def _launch(c: Config, x2, qweight, absmax, absmax_scale, absmax_code, offset, bs, n, bias, y):
    m, k = x2.shape
    (am, am_s, am_c), dq = _dq_args(absmax, absmax_scale, absmax_code)
    if c.path == "dense":
        w = dequantize(qweight, absmax, absmax_scale, absmax_code, offset, bs, (n, k), x2.dtype)
        return F.linear(x2, w, bias)
    bvec = bias if bias is not None else am
    if c.path == "gemv":
        gs = min(bs, 128)
        ng = runs_per_step(k // gs, c.get("NG", 1))
        bn, bk = c["BLOCK_N"], gs * ng
        split = _split(c.get("SPLIT_K", 1), k // bk)
        per = triton.cdiv(k // bk, split) * bk
        partial, cnt, mode = split_k_buffers(split, triton.cdiv(n, bn) * m, y)
        reg_lut = bool(c.get("REG_LUT", 0))
        _nf4_gemv_kernel[(triton.cdiv(n, bn), m, split)](
            x2, qweight, am, am_s, am_c, float(offset), code_table(x2.device, x2.dtype if reg_lut else torch.float32),
            bvec, y, partial, cnt, m, n, k, bs, per, x2.stride(0), x2.stride(1), y.stride(0),
            DQ=dq, HAS_BIAS=bias is not None, PARTIAL=mode, BLOCK_N=bn, GS=gs, NG=ng,
            REG_LUT=reg_lut, IS_BF16=x2.dtype == torch.bfloat16, STAGES=c.get("STAGES", 0), **c.launch_opts(),
        )
    else:
        bm, bn, bk = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]
        split = _split(c.get("SPLIT_K", 1), k // bk)
        per = triton.cdiv(k // bk, split) * bk
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        partial, cnt, mode = split_k_buffers(split, grid[0], y)
        common = (x2, qweight, am, am_s, am_c, float(offset), code_table(x2.device, x2.dtype),
                  bvec, y, partial, cnt, m, n, k, bs, per, x2.stride(0), x2.stride(1), y.stride(0))
        if c.path == "mm":
            _nf4_mm_kernel[grid](*common, DQ=dq, HAS_BIAS=bias is not None, PARTIAL=mode,
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, **c.launch_opts())
        else:
            _nf4_mmt_kernel[grid](*common, DQ=dq, HAS_BIAS=bias is not None, PARTIAL=mode,
                                  IS_BF16=x2.dtype == torch.bfloat16, REG_LUT=bool(c.get("REG_LUT", 0)),
                                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SCALE_B=bm >= 64,
                                  X_PAIRS=x_pairs_ok(x2), **c.launch_opts())
    return finish_split(mode, partial, bias, y)


def nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize: int, out_features: int,
               bias=None, *, config: Config | str | None = None):
    """``x @ dequant(W).T (+ bias)`` for CUDA tensors (or CPU ones under ``TRITON_INTERPRET=1``)."""
    x2 = rows_2d(x)
    m, k = x2.shape
    n = out_features
    qweight = qweight.reshape(-1)
    if qweight.stride(0) != 1:
        qweight = qweight.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    aligned = qweight.data_ptr() % 4 == 0  # int32 word loads (gemv)

    def cands():
        cs = candidates(m, n, k, blocksize, x.dtype, x.device)
        return cs if aligned else [c for c in cs if c.path != "gemv"] or [cfg("dense")]

    key = (m_bucket(m), n, k, blocksize, x.dtype, absmax_scale is not None, bias is not None, aligned, x.device)
    run = lambda c: _launch(c, x2, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, n, bias, y)
    c = pick(_CACHE, key, cands, run, x.device, config)
    return finish(run(c), x)


__all__ = ["candidates", "code_table", "dequantize", "nf4_matmul"]
