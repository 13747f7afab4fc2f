"""Tests for lowbit.formats.kv (int8 / int4 KV-cache quantization)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lowbit.formats import kv

SETTINGS = settings(deadline=None, max_examples=40)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def _x(shape, seed, dtype, magnitude=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * magnitude + shift
    return x.clamp(-60000.0, 60000.0).to(dtype)  # finite in float16 too


def _bound(scale16: torch.Tensor, scale_true: torch.Tensor, levels: int) -> torch.Tensor:
    """|x - deq| <= scale/2, plus what float16 rounding of the scale can add at the range ends
    (``levels`` steps of the rounding error) and float32 rounding of x/scale."""
    s16 = scale16.float()
    return s16 / 2 * (1 + 1e-5) + levels * (scale_true - s16).abs() + 1e-30


# ---------------------------------------------------------------------------------------
# bits = 8
# ---------------------------------------------------------------------------------------


def test_int8_known_values():
    x = torch.tensor([127.0, -63.5, 0.5, 1.5, 2.5, -0.4]).reshape(1, 1, 1, 6)
    data, scale, zero = kv.quantize_kv(x, 8)
    assert zero is None
    assert data.dtype == torch.int8 and scale.dtype == torch.float16
    assert scale.tolist() == [[[1.0]]]
    assert data.flatten().tolist() == [127, -64, 0, 2, 2, 0]  # round half to even
    assert kv.dequantize_kv(data, scale, None).flatten().tolist() == [127.0, -64.0, 0.0, 2.0, 2.0, 0.0]


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(0, 5), st.integers(1, 70)),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(FLOATS),
    magnitude=st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e4]),
)
@example(shape=(2, 2, 3, 4), seed=3, dtype=torch.float32, magnitude=1e-6)  # scale below float16's range
def test_int8_error_bound(shape, seed, dtype, magnitude):
    x = _x(shape, seed, dtype, magnitude)
    data, scale, zero = kv.quantize_kv(x, 8)
    b, h, s, d = shape
    assert data.shape == (b, h, s, d) and scale.shape == (b, h, s) and zero is None
    xf = x.float()
    deq = kv.dequantize_kv(data, scale, None)
    assert deq.dtype == torch.float32 and deq.shape == x.shape
    scale_true = xf.abs().amax(-1) / 127 if d else torch.zeros(b, h, s)
    assert bool(((xf - deq).abs() <= _bound(scale, scale_true, 127).unsqueeze(-1)).all())
    assert kv.dequantize_kv(data, scale, None, dtype).dtype == dtype


# ---------------------------------------------------------------------------------------
# bits = 4
# ---------------------------------------------------------------------------------------


def test_int4_known_values():
    x = ((torch.arange(32) % 16) - 5).float().reshape(1, 1, 1, 32)  # min -5, max 10
    data, scale, zero = kv.quantize_kv(x, 4)
    assert data.dtype == torch.uint8 and data.shape == (1, 1, 1, 16)
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == zero.shape == (1, 1, 1, 1)
    assert scale.item() == 1.0 and zero.item() == 5.0
    # q = x + 5 = 0, 1, ..., 15, 0, ..., 15; element 2j in the low nibble
    q = list(range(16)) * 2
    assert data.flatten().tolist() == [q[2 * j] | (q[2 * j + 1] << 4) for j in range(16)]
    assert torch.equal(kv.dequantize_kv(data, scale, zero), x)


def test_int4_all_positive_and_constant_groups():
    x = torch.cat([torch.full((32,), 5.0), torch.linspace(10.0, 11.0, 32), torch.zeros(32)]).reshape(1, 1, 1, 96)
    data, scale, zero = kv.quantize_kv(x, 4)
    deq = kv.dequantize_kv(data, scale, zero)
    # the range always includes 0: [0, 5], [0, 11], [0, 0]
    assert zero.flatten().tolist() == [0.0, 0.0, 0.0]
    assert scale.flatten().tolist()[2] == 0.0
    assert bool(((x - deq).abs() <= scale.float().repeat_interleave(32, -1) / 2 + 1e-6).all())
    assert torch.equal(deq[..., 64:], torch.zeros(1, 1, 1, 32))


@SETTINGS
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(0, 5), st.sampled_from([32, 64, 96, 128])),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(FLOATS),
    magnitude=st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e4]),
    shift=st.sampled_from([0.0, 1.0, -3.0]),
)
def test_int4_error_bound(shape, seed, dtype, magnitude, shift):
    x = _x(shape, seed, dtype, magnitude, shift * magnitude)
    data, scale, zero = kv.quantize_kv(x, 4)
    b, h, s, d = shape
    assert data.shape == (b, h, s, d // 2)
    assert scale.shape == zero.shape == (b, h, s, d // 32)
    assert bool(((zero >= 0) & (zero <= 15) & (zero == zero.round())).all())
    xf = x.float()
    deq = kv.dequantize_kv(data, scale, zero)
    g = xf.reshape(b, h, s, d // 32, 32)
    scale_true = (g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)) / 15
    err = (g - deq.reshape(g.shape)).abs()
    assert bool((err <= _bound(scale, scale_true, 15).unsqueeze(-1)).all())
    assert kv.dequantize_kv(data, scale, zero, dtype).dtype == dtype


# ---------------------------------------------------------------------------------------
# zeros, NaN, Inf, overflow, no host sync
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 4])
def test_all_zero_gives_zero_scale_and_codes(bits):
    data, scale, zero = kv.quantize_kv(torch.zeros(1, 2, 3, 64), bits)
    assert bool((scale == 0).all()) and bool((kv.dequantize_kv(data, scale, zero) == 0).all())
    if bits == 8:
        assert bool((data == 0).all())
    else:
        assert bool((zero == 0).all()) and bool((data == 0).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", FLOATS)
def test_non_finite_input_dequantizes_to_nan_not_a_number(bits, bad, dtype):
    x = _x((2, 2, 3, 64), 0, dtype)
    x[1, 0, 2, 40] = bad
    data, scale, zero = kv.quantize_kv(x, bits)
    deq = kv.dequantize_kv(data, scale, zero)
    hit = deq[1, 0, 2, 32:] if bits == 4 else deq[1, 0, 2]  # the affected group / token
    assert bool(hit.isnan().all())
    mask = torch.ones_like(deq, dtype=torch.bool)
    if bits == 4:
        mask[1, 0, 2, 32:] = False
    else:
        mask[1, 0, 2] = False
    assert bool(deq[mask].isfinite().all())
    clean = kv.dequantize_kv(*kv.quantize_kv(torch.where(mask, x, 0), bits))
    assert torch.equal(deq[mask], clean[mask])  # the rest is unaffected


@pytest.mark.parametrize("bits", [8, 4])
def test_scale_overflowing_float16_is_not_a_silent_wrong_number(bits):
    x = torch.full((1, 1, 1, 32), 1e7)
    x[..., 0] = -1e7
    data, scale, zero = kv.quantize_kv(x, bits)
    assert not bool(kv.dequantize_kv(data, scale, zero).isfinite().any())


@pytest.mark.parametrize("bits", [8, 4])
def test_no_host_sync(bits):
    # fullgraph=True fails on any .item() / data-dependent Python branch (a host sync).
    f = torch.compile(kv.quantize_kv, fullgraph=True, backend="eager")
    x = _x((1, 2, 3, 64), 1, torch.float32)
    x[0, 1, 1, 3] = float("nan")
    got, want = f(x, bits), kv.quantize_kv(x, bits)
    for a, b in zip(got, want):
        assert (a is None and b is None) or torch.equal(a.nan_to_num(), b.nan_to_num())
    g = torch.compile(kv.dequantize_kv, fullgraph=True, backend="eager")
    torch.testing.assert_close(g(*want), kv.dequantize_kv(*want), equal_nan=True)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x, bits, exc, match",
    [
        (torch.zeros(2, 3, 32), 8, ValueError, r"x must have 4 dimensions, got shape \(2, 3, 32\)"),
        (torch.zeros(1, 2, 3, 4, 32), 4, ValueError, r"x must have 4 dimensions, got shape \(1, 2, 3, 4, 32\)"),
        (torch.zeros(1, 1, 1, 32, dtype=torch.int8), 8, TypeError, r"x must have dtype .* got int8"),
        (torch.zeros(1, 1, 1, 32, dtype=torch.float64), 8, TypeError, r"x must have dtype .* got float64"),
        (torch.zeros(1, 1, 1, 32), 2, ValueError, r"bits must be 4 or 8, got 2"),
        (torch.zeros(1, 1, 1, 32), 16, ValueError, r"bits must be 4 or 8, got 16"),
        (torch.zeros(1, 1, 1, 32), True, TypeError, r"bits must be an int \(4 or 8\), got bool True"),
        (torch.zeros(1, 1, 1, 32), "8", TypeError, r"bits must be an int \(4 or 8\), got str '8'"),
        (torch.zeros(1, 1, 1, 48), 4, ValueError, r"bits=4 needs head_dim D divisible by 32, got D=48"),
        (torch.zeros(1, 1, 1, 0), 8, ValueError, r"x must have head_dim D > 0, got shape \(1, 1, 1, 0\)"),
        ("x", 8, TypeError, r"x must be a torch.Tensor, got str"),
    ],
)
def test_quantize_kv_bad_input(x, bits, exc, match):
    with pytest.raises(exc, match=rf"kv.quantize_kv: {match}"):
        kv.quantize_kv(x, bits)


def test_dequantize_kv_bad_input():
    d8, s8, _ = kv.quantize_kv(torch.randn(1, 2, 3, 64), 8)
    d4, s4, z4 = kv.quantize_kv(torch.randn(1, 2, 3, 64), 4)
    cases = [
        ((d8, s8, s8), ValueError, r"zero must be None for 8-bit \(int8\) data"),
        ((d8, s8[..., :2], None), ValueError, r"scale must have shape \(1, 2, 3\), got \(1, 2, 2\)"),
        ((d4, s4, None), ValueError, r"zero is required for 4-bit \(uint8\) data"),
        ((d4, s4, z4[:, :1]), ValueError, r"zero must have shape \(1, 2, 3, 2\), got \(1, 1, 3, 2\)"),
        ((d4, s4.to(torch.int32), z4), TypeError, r"scale must have dtype .* got int32"),
        ((d4[..., :8], s4, z4), ValueError, r"4-bit data \(1, 2, 3, 8\) unpacks to D=16, which is not divisible by 32"),
        ((d8.float(), s8, None), TypeError, r"data must have dtype int8, uint8, got float32"),
        ((d8[0], s8, None), ValueError, r"data must have 4 dimensions, got shape \(2, 3, 64\)"),
    ]
    for args, exc, match in cases:
        with pytest.raises(exc, match=rf"kv.dequantize_kv: {match}"):
            kv.dequantize_kv(*args)
    with pytest.raises(TypeError, match=r"kv.dequantize_kv: dtype must be one of .* got torch.int8"):
        kv.dequantize_kv(d8, s8, None, torch.int8)
