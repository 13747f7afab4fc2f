"""The CUDA 4-bit kernels (int4, nf4; csrc/cuda/w4_*.cu) and their layout (backends/w4_layout.py).

On any machine: the repacked layout decodes back to the formats' weights, and a CPU emulation
of the kernel's tensor-core fragments (the PTX mma.m16n8k16 register layouts) computes
``x @ W^T`` from it, which checks the k permutation that the kernel relies on. On a GPU
(``pytest -m cuda``): every kernel against the reference over many shapes, group sizes,
both activation dtypes, split-K, the dense (dequantize + cuBLAS) path, streams, CUDA graphs,
and ``lowbit.Linear`` with its cached layout.
"""

from __future__ import annotations

import pytest
import torch
from conftest import RTOL, rel_err

import lowbit
from lowbit import _native
from lowbit.backends import reference, w4_layout
from lowbit.formats import int4, nf4

HALF = (torch.float16, torch.bfloat16)


def make_int4(n, k, g, asym=True, scale_dtype=torch.float16, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    qweight = int4.pack_int4(q)
    scales = (torch.rand(n, k // g, generator=gen) * 0.05 + 0.005).to(scale_dtype)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen).to(scale_dtype) if asym else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(qweight), to(scales), to(zeros)


def make_nf4(n, k, blocksize, double_quant=False, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    p = nf4.quantize(w.to(device), blocksize=blocksize, double_quant=double_quant)
    return p


# ---------------------------------------------------------------------------------------------
# the layout, on the CPU


@pytest.mark.parametrize("fmt", [w4_layout.INT4, w4_layout.NF4])
def test_words_round_trip(fmt):
    codes = torch.randint(0, 16, (48, 192), dtype=torch.uint8)
    words = w4_layout._to_words(codes, fmt)
    assert words.shape == (3, 3, 32, 4) and words.dtype == torch.int32
    assert torch.equal(w4_layout._from_words(words, fmt), codes.long())


def test_layout_supports():
    assert w4_layout.layout_supports(4096, 128) and w4_layout.layout_supports(96, 32)
    assert w4_layout.layout_supports(96, 96) and w4_layout.layout_supports(4096, 4096)
    assert not w4_layout.layout_supports(96, 48) and not w4_layout.layout_supports(80, 16)
    assert not w4_layout.layout_supports(100, 2) and not w4_layout.layout_supports(48, 48)
    assert w4_layout.num_groups(96, 32) == 4 and w4_layout.num_groups(96, 96) == 1
    assert w4_layout.num_groups(4096, 128) == 32 and w4_layout.num_groups(32, 32) == 2


def _close_to(decoded, ref, dtype, slack):
    """|decoded - ref| within a couple of roundings of the activation dtype."""
    eps = torch.finfo(dtype).eps
    err = (decoded.float() - ref.float()).abs()
    assert bool((err <= 2 * eps * (ref.float().abs() + slack) + 1e-30).all()), float(err.max())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,k,g,asym", [(16, 64, 32, True), (17, 96, 32, False), (40, 256, 128, True),
                                        (5, 192, 64, False), (33, 96, 96, True), (8, 64, 64, True)])
def test_int4_layout_decodes_to_the_weight(dtype, n, k, g, asym):
    qweight, scales, zeros = make_int4(n, k, g, asym, scale_dtype=torch.float32, seed=n + k)
    p = w4_layout.repack_int4(qweight, scales, zeros, g, dtype)
    assert p.n_pad == -(-n // 16) * 16 and p.k_pad == -(-k // 64) * 64
    ref = int4.dequantize_tensors(qweight, scales.to(dtype), None if zeros is None else zeros.to(dtype), g)
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(g, 1)
    _close_to(w4_layout.decode(p), ref, dtype, slack=(z * scales.float().repeat_interleave(g, 1)).abs())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("n,k,bs,dq", [(16, 64, 64, False), (20, 128, 32, True), (48, 512, 128, True),
                                       (7, 256, 256, False)])
def test_nf4_layout_decodes_to_the_weight(dtype, n, k, bs, dq):
    p = make_nf4(n, k, bs, dq, seed=n)
    packed = w4_layout.repack_nf4(*[p.qweight, p.absmax, p.absmax_scale, p.absmax_code], p.absmax_offset,
                                  bs, p.shape, dtype)
    ref = nf4.dequantize(p, torch.float32)
    _close_to(w4_layout.decode(packed), ref, dtype, slack=ref.abs() * 2)


def emulate_kernel(x: torch.Tensor, p: w4_layout.PackedW4) -> torch.Tensor:
    """``x @ W^T`` the way the kernel computes it, from the packed words and scales: for each
    (row tile, k block, k step j), each lane (g, t) extracts its A registers from word j as
    the kernel does (int4: codes at bits 4i and 16+4i; nf4: byte i, low nibble first), takes
    the scales of group ``(64kb + 16t) >> gshift`` and rows g, g+8, and loads its B registers
    from ``x[token, 64kb + 16t + 4j + 0..3]``; the 16x16 A and 16x8 B matrices are assembled
    by the PTX fragment layout of mma.m16n8k16 (A register i: row g + 8(i&1), cols
    2t + 8(i>>1) + {0,1}; B register 0: rows 2t + {0,1}, register 1: rows 2t + 8 + {0,1};
    B col g) and multiplied."""
    m, k = x.shape
    dt = p.dtype
    gshift = 31 if p.num_groups == 1 else p.group_size.bit_length() - 1
    table = nf4.NF4_CODE.to(dt).float()
    xp = torch.zeros(8 * -(-m // 8), p.k_pad)
    xp[:m, :k] = x.float()
    out = torch.zeros(xp.shape[0], p.n_pad)
    lane = torch.arange(32)
    g, t = lane // 4, lane % 4
    words_all = p.packed_w.to(torch.int64) & 0xFFFFFFFF
    for rt in range(p.n_pad // 16):
        for kb in range(p.k_pad // 64):
            gi = (64 * kb + 16 * t) >> gshift
            for j in range(4):
                words = words_all[rt, kb, :, j]
                a = torch.zeros(16, 16)
                for i in range(4):
                    rh = i & 1
                    if p.fmt == w4_layout.INT4:
                        codes = [(words >> (4 * i)) & 0xF, (words >> (16 + 4 * i)) & 0xF]
                        sc = p.packed_s[rt, gi, g, rh, 0].float()
                        zs = p.packed_s[rt, gi, g, rh, 1].float()
                        vals = [(c.float() * sc + zs).to(dt).float() for c in codes]
                    else:
                        byte = (words >> (8 * i)) & 0xFF
                        sc = p.packed_s[rt, gi, g, rh].float()
                        vals = [(table[c] * sc).to(dt).float() for c in (byte & 0xF, byte >> 4)]
                    for e in range(2):
                        a[g + 8 * rh, 2 * t + 8 * (i >> 1) + e] = vals[e]
                for n0 in range(0, xp.shape[0], 8):
                    b = torch.zeros(16, 8)
                    for e in range(2):
                        b[2 * t + e, g] = xp[n0 + g, 64 * kb + 16 * t + 4 * j + e]  # register 0
                        b[2 * t + 8 + e, g] = xp[n0 + g, 64 * kb + 16 * t + 4 * j + 2 + e]  # register 1
                    out[n0:n0 + 8, 16 * rt:16 * rt + 16] += (a @ b).t()
    return out[:m, : p.n]


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_fragment_emulation_matches_the_reference(fmt):
    torch.manual_seed(0)
    m = 3
    cases = [(20, 160, 32), (17, 128, 128), (16, 96, 96)] if fmt == "int4" else [(20, 128, 64), (9, 96, 32)]
    for n, k, g in cases:
        x = torch.randn(m, k).to(torch.float16)
        if fmt == "int4":
            qweight, scales, zeros = make_int4(n, k, g, True, seed=n)
            p = w4_layout.repack_int4(qweight, scales, zeros, g, torch.float16)
            ref = reference.int4_matmul(x.float(), qweight, scales, zeros, g)
        else:
            q = make_nf4(n, k, g, double_quant=True)
            p = w4_layout.repack_nf4(q.qweight, q.absmax, q.absmax_scale, q.absmax_code, q.absmax_offset, g,
                                     q.shape, torch.float16)
            ref = reference.nf4_matmul(x.float(), q.qweight, q.absmax, q.absmax_scale, q.absmax_code,
                                       q.absmax_offset, g, n)
        assert rel_err(emulate_kernel(x, p), ref) < 1e-3, (n, k, g)


def test_cache_is_per_tensor_and_sees_in_place_changes():
    qweight, scales, zeros = make_int4(16, 64, 32)
    a = w4_layout.packed_int4(qweight, scales, zeros, 32, torch.float16)
    assert w4_layout.packed_int4(qweight, scales, zeros, 32, torch.float16) is a
    assert w4_layout.cached(qweight) == [a]
    b = w4_layout.packed_int4(qweight, scales, zeros, 32, torch.bfloat16)
    assert b is not a and b.dtype == torch.bfloat16
    scales.mul_(2)  # in place: the version counter moves
    c = w4_layout.packed_int4(qweight, scales, zeros, 32, torch.float16)
    assert c is not a and torch.equal(c.packed_s[..., 0].float(), 2 * a.packed_s[..., 0].float())
    other = scales.clone()
    assert w4_layout.packed_int4(qweight, other, zeros, 32, torch.float16) is not c  # another tensor
    del qweight
    import gc

    gc.collect()
    assert len(w4_layout._cache) == 0 or all(True for _ in w4_layout._cache)


def test_w4_plan_passes_the_kernel_only_what_it_checked(monkeypatch):
    # lowbit.Linear's prepared call (backends.cuda._w4_plan): the rows and row stride it hands
    # the native W4Plan, and every input it leaves to _w4_matmul (which copies or takes the
    # dense path). The native plan is faked and the tensors live on the CPU: no GPU needed.
    be = pytest.importorskip("lowbit.backends.cuda")
    launches, fallbacks = [], []

    class FakePlan:
        def __init__(self, *args):
            self.args = args

        def __call__(self, x_ptr, row_stride, m, out_ptr, stream):
            launches.append((x_ptr, row_stride, m, stream))

    def fallback(x, packed, bias):
        fallbacks.append(x)
        return torch.zeros(*x.shape[:-1], packed.n, dtype=x.dtype)

    monkeypatch.setattr(be._native.C, "W4Plan", FakePlan, raising=False)
    monkeypatch.setattr(be, "_w4_matmul", fallback)
    monkeypatch.setattr(be, "dense_min_m", lambda device: 8)
    monkeypatch.setattr(be, "_raw_stream", lambda index: 1234)
    packed = w4_layout.PackedW4(fmt=0, packed_w=torch.zeros(2, 2, 32, 4, dtype=torch.int32),
                                packed_s=torch.zeros(2, 2, 8, 2, 2, dtype=torch.float16), n=20, k=128,
                                group_size=64, num_groups=2)
    x = torch.randn(7, 128, dtype=torch.float16)
    run = be._w4_plan(x, packed, None)
    wide = torch.randn(4, 136, dtype=torch.float16)
    odd = torch.randn(4, 132, dtype=torch.float16)
    x3 = torch.randn(2, 3, 128, dtype=torch.float16)
    # (input, (row stride, rows) the kernel gets, or None: _w4_matmul's)
    cases = [(x, (128, 7)), (x[:1], (128, 1)), (x[0], (128, 1)), (x3, (128, 6)), (x3.transpose(0, 1), (128, 6)),
             (wide[:, :128], (136, 4)), (odd[:, :128], None), (wide[:, 1:129], None), (x[:0], None),
             (torch.randn(8, 128, dtype=torch.float16), None), (torch.randn(128, 4, dtype=torch.float16).T, None)]
    for xi, expect in cases:
        launches.clear()
        fallbacks.clear()
        y = run(xi)
        assert y.shape == (*xi.shape[:-1], 20) and y.dtype == torch.float16
        if expect is None:
            assert not launches and len(fallbacks) == 1 and fallbacks[0] is xi, (xi.shape, xi.stride())
        else:
            assert not fallbacks and len(launches) == 1, (xi.shape, xi.stride())
            ptr, row_stride, m, stream = launches[0]
            assert (row_stride, m, stream) == (*expect, 1234)
            assert ptr % 16 == 0
            if xi.is_contiguous() or xi.dim() == 2:  # a view of x itself, not a copy
                assert ptr == xi.data_ptr()


def test_k_split_fits_its_clusters_in_the_fewest_waves():
    # Host-side, no GPU: a K split of c blocks is a cluster sharing one GPC, so fewer clusters may
    # run at once than blocks allow; the split keeps the fewest waves x k blocks a split.
    split = _native.C.w4_split_for_waves
    assert split(16, 32, [0, 0, 0, 0, 0]) == 16  # nothing known: as wanted
    assert split(16, 32, [0, 0, 0, 0, 32]) == 16  # all 32 clusters of 16 at once
    assert split(16, 32, [0, 0, 0, 60, 28]) == 8  # 2 waves of 16 = 1 wave of 8: the fewer waves
    assert split(16, 32, [0, 0, 130, 60, 16]) == 8  # 16 -> 2 waves, 8 -> 1 wave
    assert split(8, 64, [0, 120, 60, 16, 0]) == 2  # 4/8 = 2/4 = 1/2 waves per k-block share: the fewest waves
    assert split(8, 100, [0, 66, 33, 16, 0]) == 8  # 8: 7 waves (0.875), 4: 4 (1.0), 2: 2 (1.0)
    assert split(1, 500, [0, 1, 1, 1, 1]) == 1


def test_stream_k_partition_as_the_kernel_walks_it():
    # Host-side, no GPU: the large-M kernel's stream-K schedule (csrc/common/w4_sk_plan.h) covers
    # every (tile, k block) once, with one owner a tile adding exactly the partials parked for it,
    # waiting only on lower blocks; for all-split, whole-waves-then-split and exact-wave grids.
    check = _native.C.w4_sk_plan_check
    cases = [(1, 112, 128, 132), (4, 112, 64, 132), (1, 16, 64, 132), (4, 224, 128, 132), (4, 32, 448, 132),
             (1, 1, 1, 1), (3, 5, 17, 7), (2, 66, 4, 132), (1, 132, 9, 132), (5, 53, 3, 132), (1, 1, 500, 132)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        tb, nrb, nkb = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (9, 300, 200))
        g = min(int(torch.randint(1, 300, (1,), generator=gen)), tb * nrb * nkb)
        cases.append((tb, nrb, nkb, g))
    for tb, nrb, nkb, g in cases:
        assert check(tb, nrb, nkb, g) == "", (tb, nrb, nkb, g, check(tb, nrb, nkb, g))
    assert "above the iterations" in check(1, 1, 4, 5)
    assert "must be >= 1" in check(0, 1, 1, 1)


def test_raw_functions_reject_bad_arguments():
    if not _native.has("w4_matmul_cuda"):
        pytest.skip("built without CUDA")
    C = _native.C
    base = dict(fmt=0, x_ptr=1024, x_dtype=1, x_row_stride=64, packed_w_ptr=1024, packed_s_ptr=1024, bias_ptr=0,
                bias_dtype=1, out_ptr=1024, M=1, N=16, K=64, n_pad=16, k_pad=64, group_size=32, num_groups=2,
                stream=0)
    for change, message in [
        (dict(x_dtype=0), "act_dtype=0"), (dict(fmt=2), "fmt=2"), (dict(K=48, k_pad=64), "multiple of 32"),
        (dict(n_pad=32), "n_pad=32"), (dict(num_groups=3), "num_groups=3"), (dict(group_size=48), "group_size=48"),
        (dict(x_ptr=1026), "x_ptr"), (dict(packed_w_ptr=1028), "packed_w_ptr"), (dict(x_row_stride=68), "x_row_stride"),
        (dict(M=0), "M=0"), (dict(bias_dtype=7), "bias_dtype=7"),
    ]:
        with pytest.raises(ValueError, match=message):
            C.w4_matmul_cuda(**{**base, **change})
    if torch.cuda.is_available():  # the prepared call checks each call's pointers and sizes too
        buf = torch.zeros(4096, dtype=torch.uint8, device="cuda")
        p = buf.data_ptr()
        plan = C.W4Plan(0, 1, p, p, 0, 1, 16, 64, 16, 64, 32, 2)
        for args, message in [((p, 68, 1, p, 0), "x_row_stride"), ((p + 2, 64, 1, p, 0), "x_ptr"),
                              ((p, 64, 0, p, 0), "M=0"), ((1024, 64, 1, p, 0), "x_ptr is not CUDA device memory")]:
            with pytest.raises(ValueError, match=message):
                plan(*args)
        with pytest.raises(ValueError, match="packed_w_ptr is not CUDA device memory"):
            C.W4Plan(0, 1, 1024, p, 0, 1, 16, 64, 16, 64, 32, 2)
    with pytest.raises(ValueError, match="out_ptr"):
        C.w4_dequant_cuda(fmt=0, act_dtype=1, packed_w_ptr=1024, packed_s_ptr=1024, out_ptr=1026, N=16, K=64,
                          n_pad=16, k_pad=64, group_size=32, num_groups=2, stream=0)


# ---------------------------------------------------------------------------------------------
# the kernels on a GPU

cuda = pytest.mark.cuda


def _check(y, ref, dtype):
    assert y.dtype == dtype and y.shape == ref.shape
    assert bool(torch.isfinite(y).all())
    assert rel_err(y, ref) < RTOL[dtype], rel_err(y, ref)


def _int4_case(m, n, k, g, asym, dtype, bias=True, seed=0):
    from lowbit.backends import cuda as be

    qweight, scales, zeros = make_int4(n, k, g, asym, scale_dtype=dtype, seed=seed, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, dtype=dtype, device="cuda", generator=gen)
    b = torch.randn(n, dtype=dtype, device="cuda", generator=gen) if bias else None
    y = be.int4_matmul(x, qweight, scales, zeros, g, b)
    _check(y, reference.int4_matmul(x, qweight, scales, zeros, g, b), dtype)
    return y


INT4_SHAPES = [  # (M, N, K, G)
    (1, 16, 64, 32), (1, 4096, 4096, 128), (1, 1000, 4096, 64), (1, 7, 96, 32), (1, 300, 512, 512),
    (2, 257, 128, 128), (3, 100, 192, 64), (5, 33, 96, 96), (7, 64, 2048, 32), (8, 4096, 1024, 128),
    (9, 129, 256, 64), (13, 48, 4096, 128), (16, 1024, 1024, 32), (17, 500, 640, 128), (31, 96, 320, 64),
    (33, 2048, 1024, 128), (64, 777, 1024, 64), (65, 256, 96, 32), (100, 1536, 4096, 128),
    (255, 96, 512, 128), (256, 4096, 1024, 64), (511, 200, 256, 32), (512, 1024, 1024, 128),
    (1023, 300, 640, 64), (4096, 512, 1024, 128),
    (48, 16400, 256, 64), (64, 8192, 512, 128), (3000, 384, 512, 64),  # the wgmma kernels' 64-token and large-M tiles
    (130, 200, 512, 512), (300, 8200, 1024, 1024),  # one group a row on the wgmma kernels
    (100, 8200, 512, 32), (48, 12000, 512, 128), (90, 3000, 1024, 64),  # the register-A (RS) wgmma paths
    (40, 8192, 16384, 128), (300, 12800, 512, 64),  # stream-K: all split; whole tiles, then split (on 132 SMs)
]


@cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k,g", INT4_SHAPES)
def test_int4_kernel_matches_reference(m, n, k, g, dtype):
    _int4_case(m, n, k, g, asym=(m + n) % 2 == 0, dtype=dtype, bias=m % 3 != 0, seed=m * 7 + n)


@cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("g", [32, 64, 128, 256])
def test_int4_every_group_size(g, asym, dtype):
    for m in (1, 6, 16, 40, 130, 300):
        _int4_case(m, 300, 1024, g, asym, dtype, seed=g + m)


NF4_SHAPES = [  # (M, N, K, blocksize)
    (1, 16, 64, 64), (1, 4096, 4096, 64), (1, 1000, 2048, 128), (1, 9, 96, 32), (2, 257, 256, 256),
    (3, 100, 192, 64), (8, 2048, 1024, 64), (11, 300, 512, 128), (16, 1024, 1024, 64), (24, 77, 4096, 4096),
    (47, 512, 640, 128), (64, 1024, 1024, 64), (129, 256, 256, 64), (300, 1024, 512, 128),
    (1024, 512, 1024, 64), (4096, 256, 512, 64), (40, 9000, 256, 64), (2050, 256, 512, 64), (200, 128, 1024, 1024),
    (100, 8200, 512, 64), (48, 12000, 512, 128), (90, 3000, 1024, 64), (60, 17000, 256, 64),  # RS wgmma paths
    (40, 8192, 16384, 64), (300, 12800, 512, 64),  # stream-K
]


@cuda
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m,n,k,bs", NF4_SHAPES)
def test_nf4_kernel_matches_reference(m, n, k, bs, dtype):
    from lowbit.backends import cuda as be

    p = make_nf4(n, k, bs, double_quant=(m % 2 == 1), seed=m + n, device="cuda")
    x = torch.randn(m, k, dtype=dtype, device="cuda")
    b = torch.randn(n, dtype=torch.float32, device="cuda") if m % 3 else None
    args = (x, p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, bs, n, b)
    assert be.supports_nf4_matmul(*args)
    _check(be.nf4_matmul(*args), reference.nf4_matmul(*args), dtype)


@cuda
def test_nf4_unsupported_shapes_are_declined():
    from lowbit.backends import cuda as be

    p = make_nf4(3, 96, 64, device="cuda")  # 64 does not divide K=96: blocks straddle rows
    x = torch.randn(2, 96, dtype=torch.float16, device="cuda")
    assert not be.supports_nf4_matmul(x, p.qweight, p.absmax, None, None, 0.0, 64, 3, None)
    assert not be.supports_nf4_matmul(x.float(), p.qweight, p.absmax, None, None, 0.0, 64, 3, None)
    y = lowbit.ops.nf4_matmul(x, p.qweight, p.absmax, None, None, 0.0, 64, 3)  # another backend takes it
    _check(y, reference.nf4_matmul(x, p.qweight, p.absmax, None, None, 0.0, 64, 3), torch.float16)


@cuda
@pytest.mark.parametrize("split", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("m", [1, 12, 40])
def test_forced_split_k_is_exact_and_deterministic(monkeypatch, split, m):
    monkeypatch.setenv("LOWBIT_CUDA_W4_SPLIT", str(split))
    ys = [_int4_case(m, 640, 2048, 128, True, torch.bfloat16, seed=3) for _ in range(2)]
    assert torch.equal(ys[0], ys[1])


# The tile candidates of a -DLOWBIT_W4_TUNING build (csrc/cuda/w4_kernels.cuh, w4_launch's
# switches); 0 is the default dispatch.
TILE_CANDIDATES = (0, 1, 2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 19, 20, 21, 30, 31, 32, 33, 34, 35, 36, 37, 38, 41, 42,
                   43, 44, 45, 46, 47, 48, 49, 50, 51, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63)


@cuda
@pytest.mark.parametrize("tile", TILE_CANDIDATES)
@pytest.mark.parametrize("m", [5, 12, 17, 40, 64, 130, 300])
def test_tile_candidates_match_reference(monkeypatch, tile, m):
    # LOWBIT_CUDA_W4_TILE picks a tile candidate in builds with -DLOWBIT_W4_TUNING
    # (ignored otherwise): each must match the reference, with a K tail (K % 64 = 32) and a partial
    # row block; M=300 runs the kernel, not the dense path.
    monkeypatch.setenv("LOWBIT_CUDA_W4_DENSE_M", "0")
    monkeypatch.setenv("LOWBIT_CUDA_W4_TILE", str(tile))
    for k, g, dtype in ((1056, 32, torch.float16), (1024, 128, torch.bfloat16)):
        _int4_case(m, 600, k, g, asym=tile % 2 == 0, dtype=dtype, seed=tile + m)
    p = make_nf4(600, 1024, 64, double_quant=True, seed=m, device="cuda")
    x = torch.randn(m, 1024, dtype=torch.float16, device="cuda")
    args = (x, p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, 64, 600, None)
    from lowbit.backends import cuda as be

    _check(be.nf4_matmul(*args), reference.nf4_matmul(*args), torch.float16)


@cuda
@pytest.mark.parametrize("m", [1, 12, 40])
def test_l2_policy_changes_no_bit(monkeypatch, m):
    # The weight stream's evict-first policy is a cache hint only: results are bit-identical.
    ys = [_int4_case(m, 640, 2048, 128, True, torch.float16, seed=5)]
    monkeypatch.setenv("LOWBIT_CUDA_W4_NO_L2_HINT", "1")
    ys.append(_int4_case(m, 640, 2048, 128, True, torch.float16, seed=5))
    assert torch.equal(ys[0], ys[1])


@cuda
@pytest.mark.parametrize("dtype", HALF)
def test_dense_path_and_dequant_kernel(monkeypatch, dtype):
    from lowbit.backends import cuda as be

    qweight, scales, zeros = make_int4(80, 320, 64, True, scale_dtype=dtype, device="cuda")
    packed = w4_layout.packed_int4(qweight, scales, zeros, 64, dtype)
    w = torch.empty(80, 320, dtype=dtype, device="cuda")
    _native.C.w4_dequant_cuda(fmt=0, act_dtype=1 if dtype == torch.float16 else 2, packed_w_ptr=packed.packed_w.data_ptr(),
                              packed_s_ptr=packed.packed_s.data_ptr(), out_ptr=w.data_ptr(), N=80, K=320,
                              n_pad=packed.n_pad, k_pad=packed.k_pad, group_size=64, num_groups=packed.num_groups,
                              stream=torch.cuda.current_stream().cuda_stream)
    assert torch.equal(w, w4_layout.decode(packed))  # the kernel's arithmetic, bit for bit
    p = make_nf4(64, 256, 64, double_quant=True, device="cuda")
    pn = w4_layout.packed_nf4(p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, 64, p.shape, dtype)
    wn = torch.empty(64, 256, dtype=dtype, device="cuda")
    _native.C.w4_dequant_cuda(fmt=1, act_dtype=1 if dtype == torch.float16 else 2, packed_w_ptr=pn.packed_w.data_ptr(),
                              packed_s_ptr=pn.packed_s.data_ptr(), out_ptr=wn.data_ptr(), N=64, K=256,
                              n_pad=pn.n_pad, k_pad=pn.k_pad, group_size=64, num_groups=pn.num_groups,
                              stream=torch.cuda.current_stream().cuda_stream)
    assert torch.equal(wn, w4_layout.decode(pn))
    monkeypatch.setenv("LOWBIT_CUDA_W4_DENSE_M", "1")
    for m in (1, 5, 64):
        _int4_case(m, 96, 256, 32, True, dtype)
        x = torch.randn(m, 256, dtype=dtype, device="cuda")
        args = (x, p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, 64, 64, None)
        _check(be.nf4_matmul(*args), reference.nf4_matmul(*args), dtype)


@cuda
def test_activation_layouts_and_bias_dtypes():
    from lowbit.backends import cuda as be

    n, k, g = 72, 256, 64
    qweight, scales, zeros = make_int4(n, k, g, True, device="cuda")
    base = torch.randn(6, 2 * k + 2, dtype=torch.float16, device="cuda")
    for x in (base[:, 1:k + 1], base[:, : 2 * k : 2], base[:, :k].t().contiguous().t(),
              torch.randn(2, 3, k, dtype=torch.float16, device="cuda"), base[:1, 3:k + 3]):
        for bias in (None, torch.randn(n, device="cuda"), torch.randn(n, device="cuda").to(torch.bfloat16)):
            y = be.int4_matmul(x, qweight, scales, zeros, g, bias)
            _check(y, reference.int4_matmul(x, qweight, scales, zeros, g, bias), torch.float16)
    empty = be.int4_matmul(torch.randn(0, k, dtype=torch.float16, device="cuda"), qweight, scales, zeros, g)
    assert empty.shape == (0, n)
    with pytest.raises(ValueError):
        be.int4_matmul(torch.randn(2, k - 64, dtype=torch.float16, device="cuda"), qweight, scales, zeros, g)


@cuda
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("m,n,k", [(1, 1024, 2048), (16, 1024, 2048), (48, 1024, 2048), (300, 12800, 512)])
def test_streams_and_cuda_graphs(fmt, m, n, k):
    # (300 x 12800: the stream-K kernel on Hopper, whose workspace is made for the capture stream
    # inside the capture)
    if fmt == "int4":
        qweight, scales, zeros = make_int4(n, k, 128, True, scale_dtype=torch.bfloat16, device="cuda")
        run = lambda x: lowbit.ops.int4_matmul(x, qweight, scales, zeros, 128)  # noqa: E731
        ref = lambda x: reference.int4_matmul(x, qweight, scales, zeros, 128)  # noqa: E731
    else:
        p = make_nf4(n, k, 64, device="cuda")
        run = lambda x: lowbit.ops.nf4_matmul(x, p.qweight, p.absmax, None, None, 0.0, 64, n)  # noqa: E731
        ref = lambda x: reference.nf4_matmul(x, p.qweight, p.absmax, None, None, 0.0, 64, n)  # noqa: E731
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = run(x)  # also the warm-up (repack) before capture
    torch.cuda.current_stream().wait_stream(side)
    _check(y, ref(x), torch.bfloat16)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = run(x)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _check(y_graph, ref(x), torch.bfloat16)


@cuda
@pytest.mark.parametrize("fmt,opts", [("int4", {"group_size": 128}), ("int4", {"group_size": 32, "symmetric": True}),
                                      ("nf4", {"blocksize": 64}), ("nf4", {"blocksize": 128, "double_quant": True})])
def test_linear_uses_the_cached_layout_and_round_trips_state_dict(fmt, opts):
    torch.manual_seed(0)
    dense = torch.nn.Linear(512, 300).to(device="cuda", dtype=torch.float16)
    layer = lowbit.Linear.from_linear(dense, fmt, **opts)
    x = torch.randn(3, 512, dtype=torch.float16, device="cuda")
    y = layer(x)
    assert w4_layout.cached(layer.qweight), "the CUDA layout is cached for the module's weight"
    expected = torch.nn.functional.linear(x.float(), layer.dequantize(), layer.bias.float())
    _check(y, expected.to(torch.float16), torch.float16)
    state = layer.state_dict()
    assert not any("packed" in key for key in state)
    fresh = lowbit.Linear(512, 300, fmt=fmt, device="cuda", dtype=torch.float16, **opts)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), y)
    other = lowbit.Linear.from_linear(torch.nn.Linear(512, 300).to("cuda", torch.float16), fmt, **opts)
    fresh.load_state_dict(other.state_dict())  # in-place copies into the buffers: the cache must see them
    assert torch.equal(fresh(x), other(x))


@cuda
@pytest.mark.parametrize("fmt,opts", [("int4", {"group_size": 128}), ("nf4", {"blocksize": 64, "double_quant": True})])
def test_linear_eager_plan_follows_every_change(fmt, opts):
    # Plain eager calls of lowbit.Linear reuse a prepared call (lowbit.nn.linear._Plan): it must
    # give the op's result, bit for bit, and be remade whenever what it was made from changes.
    from lowbit.backends import cuda as cuda_backend
    from lowbit.nn import linear as lin

    torch.manual_seed(1)
    layer = lowbit.Linear.from_linear(torch.nn.Linear(512, 300).to("cuda", torch.float16), fmt, **opts)
    x = torch.randn(5, 512, dtype=torch.float16, device="cuda")

    def op(x):  # the op path (checks, backend selection)
        return layer._layout.matmul(layer, x, layer.bias)

    with torch.no_grad():
        y0 = layer(x)
        assert lin._PLANS[layer].run is not None
        assert torch.equal(layer(x), y0) and torch.equal(y0, op(x))
        assert torch.equal(layer(x[:1]), op(x[:1]))  # another M, same plan
        # the plan's own checks of x: leading dimensions, row strides, empty, dense-path rows
        x3 = torch.randn(2, 3, 512, dtype=torch.float16, device="cuda")
        wide = torch.randn(4, 520, dtype=torch.float16, device="cuda")
        for xi in (x3, x3.transpose(0, 1), wide[:, :512], wide[:, 1:513], x[:0], x.T.contiguous().T):
            assert torch.equal(layer(xi), op(xi)), (xi.shape, xi.stride())
        big = torch.randn(cuda_backend.dense_min_m(x.device), 512, dtype=torch.float16, device="cuda")
        assert torch.equal(layer(big), op(big))
        other = lowbit.Linear.from_linear(torch.nn.Linear(512, 300).to("cuda", torch.float16), fmt, **opts)
        layer.load_state_dict(other.state_dict())  # copies in place: new versions
        assert torch.equal(layer(x), other(x))
        layer.bias = torch.nn.Parameter(torch.randn(300, device="cuda", dtype=torch.float16))  # a new object
        assert torch.equal(layer(x), op(x))
        layer.bias = None
        assert torch.equal(layer(x), op(x))
        xb = x.to(torch.bfloat16)
        layer.bfloat16()
        assert torch.equal(layer(xb), op(xb))
        with pytest.raises(ValueError, match="in_features"):
            layer(torch.randn(2, 256, dtype=torch.bfloat16, device="cuda"))
    xg = xb.clone().requires_grad_()  # autograd: the op path
    layer(xg).float().sum().backward()
    assert xg.grad is not None and xg.grad.shape == xg.shape
