"""lowbit.formats.int4: quantize/dequantize bounds, nibble packing, GPTQ and AWQ layouts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import int4
from lowbit.formats.int4 import Int4Weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _signed32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 a checkpoint holds."""
    return word - (1 << 32) if word >= (1 << 31) else word


def _same(a: Int4Weight, b: Int4Weight) -> None:
    assert a.group_size == b.group_size
    for name, t in a.tensors().items():
        u = b.tensors()[name]
        if t is None or u is None:
            assert t is None and u is None, name
        else:
            assert t.dtype == u.dtype and torch.equal(t, u), name


def _check_bound(w: torch.Tensor, p: Int4Weight) -> None:
    """|w - deq| <= scale/2 per element, plus what rounding the stored scale can add."""
    deq = int4.dequantize(p)
    s = p.scales.float().repeat_interleave(p.group_size, dim=1)
    eps = torch.finfo(p.scales.dtype).eps
    bound = s * (0.5 + 16 * eps) + 1e-6 * w.float().abs().max()
    err = (w.float() - deq).abs()
    assert bool((err <= bound).all()), float((err - bound).max())


# ---- quantize / dequantize ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_round_trip_bound(dtype, group_size, symmetric):
    torch.manual_seed(0)
    w = (torch.randn(24, 256) * 0.05).to(dtype)
    p = int4.quantize(w, group_size=group_size, symmetric=symmetric)
    assert (p.out_features, p.in_features, p.group_size) == (24, 256, group_size)
    assert p.qweight.dtype == torch.uint8 and p.qweight.shape == (24, 128)
    want = dtype if dtype != torch.float32 else torch.float32
    assert p.scales.dtype == want and p.scales.shape == (24, 256 // group_size)
    assert p.symmetric == symmetric
    if not symmetric:
        z = p.zeros.float()
        assert p.zeros.dtype == want and bool((z == z.round()).all()) and 0 <= z.min() and z.max() <= 15
    _check_bound(w, p)
    assert int4.dequantize(p, torch.bfloat16).dtype == torch.bfloat16


def test_group_size_minus_one_and_scale_dtype():
    w = torch.randn(8, 96)
    p = int4.quantize(w, group_size=-1, scale_dtype=torch.float16)
    assert p.group_size == 96 and p.scales.shape == (8, 1) and p.scales.dtype == torch.float16
    _check_bound(w, p)


def test_clamp_cases():
    # one-sided groups: the range is widened to hold 0, so nothing clamps badly
    w = torch.cat([10 + torch.rand(4, 32), -5 - torch.rand(4, 32)], dim=1)
    p = int4.quantize(w, group_size=32)
    _check_bound(w, p)
    assert p.zeros[:, 0].eq(0).all() and p.zeros[:, 1].eq(15).all()
    # symmetric: w / scale reaches +-7.5, so +absmax may round to 16 and clamp to 15 (error
    # scale/2); a bfloat16 scale rounded down pushes w / scale past 7.5 and clamps too
    for dt in DTYPES:
        w = torch.tensor([[1.0, -1.0] + [0.0] * 30, [0.3, -0.3] + [0.1] * 30]).to(dt)
        p = int4.quantize(w, group_size=32, symmetric=True)
        q = int4.unpack_int4(p.qweight)
        assert q[:, 0].eq(15).all() and q[:, 1].le(1).all()
        _check_bound(w, p)


def test_zero_groups_and_symmetric_zero():
    p = int4.quantize(torch.zeros(2, 64), group_size=32)
    assert torch.equal(p.scales, torch.ones(2, 2)) and torch.equal(p.zeros, torch.zeros(2, 2))
    assert torch.equal(int4.dequantize(p), torch.zeros(2, 64))
    ps = int4.quantize(torch.zeros(2, 64), group_size=32, symmetric=True)
    assert ps.zeros is None and bool((int4.unpack_int4(ps.qweight) == 8).all())
    # zeros=None means zero = 8: q = 8 -> 0, q = 0 -> -8 * scale, q = 15 -> 7 * scale
    q = torch.tensor([[8, 0, 15, 9] * 8], dtype=torch.uint8)
    p = Int4Weight(int4.pack_int4(q), torch.tensor([[0.5]]), None, 32)
    assert torch.equal(int4.dequantize(p)[0, :4], torch.tensor([0.0, -4.0, 3.5, 0.5]))


def test_tensors_attributes_from_tensors():
    p = int4.quantize(torch.randn(16, 64), group_size=32)
    assert list(p.tensors()) == ["qweight", "scales", "zeros"] and p.attributes() == {"group_size": 32}
    _same(p, Int4Weight.from_tensors(p.tensors(), **p.attributes()))
    assert torch.equal(int4.dequantize_tensors(*p.tensors().values(), 32), int4.dequantize(p))


# ---- nibble packing -------------------------------------------------------------------------

def test_pack_unpack_exact():
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 0, 15]], dtype=torch.uint8)
    packed = int4.pack_int4(q)
    assert packed.tolist() == [[0x21, 0x43], [0x0F, 0xF0]]
    assert torch.equal(int4.unpack_int4(packed), q)
    q = torch.randint(0, 16, (7, 40), dtype=torch.uint8)
    assert torch.equal(int4.unpack_int4(int4.pack_int4(q)), q)
    r = torch.randint(0, 256, (5, 9), dtype=torch.uint8)
    assert torch.equal(int4.pack_int4(int4.unpack_int4(r)), r)


# ---- GPTQ -----------------------------------------------------------------------------------

def _random_weight(n, k, g, zlo=0, zhi=15, symmetric=False, dtype=torch.float16):
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    scales = (torch.rand(n, k // g) + 0.1).to(dtype)
    zeros = None if symmetric else torch.randint(zlo, zhi + 1, (n, k // g)).to(dtype)
    return Int4Weight(int4.pack_int4(q), scales, zeros, g)


@pytest.mark.parametrize("fmt,zlo,zhi", [("gptq", 1, 15), ("gptq_v2", 0, 15)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_round_trip(fmt, zlo, zhi, symmetric):
    p = _random_weight(16, 256, 64, zlo, zhi, symmetric)
    d = int4.to_gptq(p, checkpoint_format=fmt)
    assert d["qweight"].dtype == torch.int32 and d["qweight"].shape == (32, 16)
    assert d["qzeros"].dtype == torch.int32 and d["qzeros"].shape == (4, 2)
    assert d["scales"].shape == (4, 16) and d["g_idx"].tolist() == [k // 64 for k in range(256)]
    _same(p, int4.from_gptq(**d, checkpoint_format=fmt))
    assert int4.from_gptq(**d, checkpoint_format=fmt, symmetric=False).zeros is not None


def test_gptq_known_example():
    n, k = 8, 16  # one group: G = K = 16
    q = [[(3 * r + c) % 16 for c in range(k)] for r in range(n)]
    zero = [r + 1 for r in range(n)]  # real zeros 1..8; v1 stores zero - 1
    qweight = [[_signed32(sum(q[c][8 * r + i] << (4 * i) for i in range(8))) for c in range(n)]
               for r in range(k // 8)]
    qzeros = [[_signed32(sum((zero[i] - 1) << (4 * i) for i in range(8)))]]
    scales = torch.linspace(0.5, 1.2, n).reshape(1, n)
    p = int4.from_gptq(torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32),
                       scales, torch.zeros(k, dtype=torch.int32))
    assert p.group_size == 16 and p.out_features == 8 and p.in_features == 16
    assert int4.unpack_int4(p.qweight).tolist() == q
    assert p.zeros[:, 0].tolist() == zero
    want = (torch.tensor(q, dtype=torch.float32) - torch.tensor(zero).reshape(n, 1)) * scales.reshape(n, 1)
    assert torch.equal(int4.dequantize(p), want)
    assert int4.to_gptq(p)["qzeros"].tolist() == qzeros
    # the classic symmetric GPTQ v1 qzeros word 0x77777777 means zero = 8 everywhere
    sym = int4.from_gptq(torch.tensor(qweight, dtype=torch.int32),
                         torch.full((1, 1), 0x77777777, dtype=torch.int32), scales)
    assert sym.zeros is None and int4.to_gptq(sym)["qzeros"].item() == 0x77777777
    # v1 nibble 15 reads as zero 16 (what GPTQ kernels compute); v2 cannot write it back
    odd = int4.from_gptq(torch.tensor(qweight, dtype=torch.int32), torch.full((1, 1), -1, dtype=torch.int32),
                         scales)
    assert odd.zeros.eq(16).all()
    with pytest.raises(ValueError, match="zeros must be integers in 0..15"):
        int4.to_gptq(odd, checkpoint_format="gptq_v2")


def test_gptq_v1_cannot_hold_zero_0():
    p = _random_weight(8, 64, 32)
    p.zeros[0, 0] = 0
    with pytest.raises(ValueError, match="gptq_v2"):
        int4.to_gptq(p)
    _same(p, int4.from_gptq(**int4.to_gptq(p, checkpoint_format="gptq_v2"), checkpoint_format="gptq_v2"))


def test_gptq_act_order_rejected():
    d = int4.to_gptq(_random_weight(8, 64, 32, 1))
    perm = d["g_idx"][torch.randperm(64)]
    with pytest.raises(ValueError, match="act-order"):
        int4.from_gptq(d["qweight"], d["qzeros"], d["scales"], perm)
    with pytest.raises(ValueError, match="g_idx must have shape"):
        int4.from_gptq(d["qweight"], d["qzeros"], d["scales"], d["g_idx"][:32])


# ---- AWQ ------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True])
def test_awq_round_trip(symmetric):
    p = _random_weight(24, 128, 32, symmetric=symmetric, dtype=torch.bfloat16)
    d = int4.to_awq(p)
    assert d["qweight"].shape == (128, 3) and d["qzeros"].shape == (4, 3) and d["scales"].shape == (4, 24)
    _same(p, int4.from_awq(**d))


def test_awq_known_example():
    n, k = 16, 16
    order = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ WQLinear_GEMM order_map
    q = [[(5 * r + 3 * c + r * c) % 16 for c in range(k)] for r in range(n)]
    zero = [(7 * r) % 16 for r in range(n)]
    qweight = [[_signed32(sum(q[8 * col + order[i]][kk] << (4 * i) for i in range(8))) for col in range(n // 8)]
               for kk in range(k)]
    qzeros = [[_signed32(sum(zero[8 * col + order[i]] << (4 * i) for i in range(8))) for col in range(n // 8)]]
    scales = torch.rand(1, n, dtype=torch.float16) + 0.5
    p = int4.from_awq(torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32), scales)
    assert int4.unpack_int4(p.qweight).tolist() == q and p.zeros[:, 0].tolist() == zero
    d = int4.to_awq(p)
    assert d["qweight"].tolist() == qweight and d["qzeros"].tolist() == qzeros
    # columns 0..7 in one word read as nibbles 0,2,4,6,1,3,5,7 -> 0x75316420
    ramp = (torch.arange(16) % 8).to(torch.uint8).reshape(16, 1).expand(16, 32).contiguous()
    ramp_p = Int4Weight(int4.pack_int4(ramp), torch.ones(16, 1), torch.zeros(16, 1), 32)
    assert int4.to_awq(ramp_p)["qweight"].unique().tolist() == [0x75316420]


# ---- hypothesis -----------------------------------------------------------------------------

@st.composite
def _shapes(draw):
    n = 8 * draw(st.integers(1, 4))
    g = draw(st.sampled_from([32, 64, 128, 0]))
    if g == 0:
        k = g = 8 * draw(st.integers(1, 12))
    else:
        k = g * draw(st.integers(1, 3))
    return n, k, g


@settings(max_examples=60, deadline=None)
@given(_shapes(), st.booleans(), st.sampled_from(DTYPES), st.integers(0, 2**16))
def test_hypothesis_quantize_and_layouts(shape, symmetric, dtype, seed):
    n, k, g = shape
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 10 ** torch.empty(1).uniform_(-3, 2, generator=gen)).to(dtype)
    p = int4.quantize(w, group_size=g, symmetric=symmetric)
    _check_bound(w, p)
    _same(p, int4.from_awq(**int4.to_awq(p)))
    _same(p, int4.from_gptq(**int4.to_gptq(p, checkpoint_format="gptq_v2"), checkpoint_format="gptq_v2"))


# ---- bad inputs -----------------------------------------------------------------------------

@pytest.mark.parametrize("weight,kwargs,exc,match", [
    (torch.ones(4, 64, dtype=torch.int32), {}, TypeError, "weight must have dtype"),
    ([[1.0] * 64], {}, TypeError, "weight must be a torch.Tensor"),
    (torch.ones(64), {}, ValueError, "weight must have 2 dimensions"),
    (torch.ones(2, 4, 64), {}, ValueError, "weight must have 2 dimensions"),
    (torch.ones(0, 64), {"group_size": 32}, ValueError, "weight is empty"),
    (torch.full((2, 64), math.nan), {"group_size": 32}, ValueError, "NaN or Inf"),
    (torch.full((2, 64), math.inf), {"group_size": 32}, ValueError, "NaN or Inf"),
    (torch.ones(2, 33), {"group_size": 33}, ValueError, "in_features=33 must be even"),
    (torch.ones(2, 100), {"group_size": 64}, ValueError, "group_size=64 does not divide in_features=100"),
    (torch.ones(2, 64), {}, ValueError, "group_size=128 does not divide in_features=64"),
    (torch.ones(2, 96), {"group_size": 48}, ValueError, "group_size=48 must be 32, 64, 128"),
    (torch.ones(2, 96), {"group_size": 0}, ValueError, "group_size=0"),
    (torch.ones(2, 96), {"group_size": 32.0}, TypeError, "group_size must be an int"),
    (torch.ones(2, 96), {"group_size": 32, "symmetric": 1}, TypeError, "symmetric must be a bool"),
    (torch.ones(2, 96), {"group_size": 32, "scale_dtype": torch.int8}, TypeError, "scale_dtype"),
    (torch.tensor([[1e6, -1e6] * 32]), {"group_size": 32, "scale_dtype": torch.float16}, ValueError, "overflows"),
])
def test_quantize_bad_inputs(weight, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        int4.quantize(weight, **kwargs)


def test_dataclass_and_dequantize_bad_inputs():
    p = int4.quantize(torch.randn(8, 64), group_size=32)
    t = p.tensors()
    with pytest.raises(ValueError, match=r"scales must have shape \(8, 2\)"):
        Int4Weight.from_tensors({**t, "scales": torch.ones(8, 3)}, group_size=32)
    with pytest.raises(ValueError, match=r"zeros must have shape \(8, 2\)"):
        Int4Weight.from_tensors({**t, "zeros": torch.ones(2, 8)}, group_size=32)
    with pytest.raises(TypeError, match="qweight must have dtype uint8"):
        Int4Weight.from_tensors({**t, "qweight": t["qweight"].to(torch.int32)}, group_size=32)
    with pytest.raises(ValueError, match="unknown tensors"):
        Int4Weight.from_tensors({**t, "g_idx": torch.zeros(64)}, group_size=32)
    with pytest.raises(ValueError, match="missing tensors"):
        Int4Weight.from_tensors({"qweight": t["qweight"]}, group_size=32)
    with pytest.raises(ValueError, match="missing attribute group_size"):
        Int4Weight.from_tensors(t)
    with pytest.raises(ValueError, match="group_size=16 must be 32, 64, 128"):
        Int4Weight.from_tensors(t, group_size=16)
    with pytest.raises(TypeError, match="p must be an Int4Weight"):
        int4.dequantize(t)
    with pytest.raises(TypeError, match="dtype must be"):
        int4.dequantize(p, torch.int32)
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        int4.dequantize_tensors(t["qweight"], t["scales"], t["zeros"], 48)
    with pytest.raises(ValueError, match="q holds values up to 16"):
        int4.pack_int4(torch.full((2, 2), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K=3"):
        int4.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="zeros must be integers"):
        int4.to_awq(Int4Weight(t["qweight"], t["scales"], t["zeros"] + 0.5, 32))


def test_checkpoint_bad_inputs():
    d = int4.to_gptq(_random_weight(16, 64, 32, 1))
    qw, qz, sc = d["qweight"], d["qzeros"], d["scales"]
    with pytest.raises(ValueError, match="checkpoint_format='exl2'"):
        int4.from_gptq(qw, qz, sc, checkpoint_format="exl2")
    with pytest.raises(TypeError, match="qweight must have dtype int32"):
        int4.from_gptq(qw.to(torch.int64), qz, sc)
    with pytest.raises(ValueError, match=r"qzeros must have shape \(2, 2\)"):
        int4.from_gptq(qw, qz[:, :1], sc)
    with pytest.raises(ValueError, match=r"scales must have shape \(K/G, N=16\)"):
        int4.from_gptq(qw, qz, sc[:, :8])
    with pytest.raises(ValueError, match="scales has 3 group rows"):
        int4.from_gptq(qw, qz, torch.ones(3, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="group_size=16 must be 32, 64, 128"):
        int4.from_gptq(qw, torch.zeros(4, 2, dtype=torch.int32), torch.ones(4, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="N=12"):
        int4.from_gptq(torch.zeros(8, 12, dtype=torch.int32), qz, sc)
    with pytest.raises(ValueError, match="symmetric=True"):
        int4.from_gptq(qw, qz, sc, symmetric=True)
    a = int4.to_awq(_random_weight(16, 64, 32))
    with pytest.raises(ValueError, match=r"qzeros must have shape \(2, 2\)"):
        int4.from_awq(a["qweight"], a["qzeros"][:1], a["scales"])
    with pytest.raises(ValueError, match=r"scales must have shape \(K/G, N=16\)"):
        int4.from_awq(a["qweight"], a["qzeros"], a["scales"].t())
    with pytest.raises(ValueError, match="qweight is empty"):
        int4.from_awq(torch.zeros(0, 2, dtype=torch.int32), a["qzeros"], a["scales"])
    with pytest.raises(ValueError, match="out_features=12 must be a multiple of 8"):
        int4.to_awq(_random_weight(12, 64, 32))
    with pytest.raises(ValueError, match="multiples of 8 for GPTQ"):
        int4.to_gptq(_random_weight(12, 64, 32))
    with pytest.raises(TypeError, match="p must be an Int4Weight"):
        int4.to_gptq(d)
