"""Tests for lowbit.formats.ternary (BitNet b1.58, Hugging Face transformers layout)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import ternary

# ---------------------------------------------------------------------------------------
# transformers' algorithms, written out from huggingface/transformers
# src/transformers/integrations/bitnet.py (pack_weights, unpack_weights, WeightQuant,
# ActQuant / BitLinear.activation_quant). They are the oracle for layout and arithmetic.
# ---------------------------------------------------------------------------------------
VALUES_PER_ITEM = 4


def hf_pack_weights(quantized_weights: torch.Tensor) -> torch.Tensor:
    quantized_weights = quantized_weights.clone()  # HF adds 1 in place
    original_shape = quantized_weights.shape
    row_dim = (original_shape[0] + VALUES_PER_ITEM - 1) // VALUES_PER_ITEM
    packed_tensor_shape = (row_dim, *original_shape[1:])
    quantized_weights += 1
    packed = torch.zeros(packed_tensor_shape, device=quantized_weights.device, dtype=torch.uint8)
    unpacked = quantized_weights.to(torch.uint8)
    it = min(VALUES_PER_ITEM, (original_shape[0] // row_dim) + 1)
    for i in range(it):
        start = i * row_dim
        end = min(start + row_dim, original_shape[0])
        packed[: (end - start)] |= unpacked[start:end] << 2 * i
    return packed


def hf_unpack_weights(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    packed_shape = packed.shape
    unpacked_shape = (packed_shape[0] * VALUES_PER_ITEM, *packed_shape[1:])
    unpacked = torch.zeros(unpacked_shape, device=packed.device, dtype=torch.uint8)
    for i in range(VALUES_PER_ITEM):
        start = i * packed_shape[0]
        end = start + packed_shape[0]
        mask = 3 << (2 * i)
        unpacked[start:end] = (packed & mask) >> (2 * i)
    return unpacked.to(dtype) - 1


def hf_weight_quant(x: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    s = 1.0 / x.abs().mean().clamp_(min=1e-5)
    x = (x * s).round().clamp(-1, 1) / s
    return x.to(dtype)


def hf_activation_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float()
    scale = 127 / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    result = (x * scale).round().clamp(-128, 127)
    return result.to(torch.int8), scale


def random_ternary(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)


SETTINGS = settings(deadline=None, max_examples=40)

# ---------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------


def test_pack_5x3_byte_by_byte():
    w_t = torch.tensor(
        [[-1, 0, 1], [1, 1, -1], [0, -1, 1], [1, 0, 0], [-1, 1, 0]], dtype=torch.int8
    )
    # N=5 -> ceil(5/4)=2 byte rows; byte row r holds rows r, r+2, r+4 (r+6 is padding, 0).
    # codes (w+1): row0 [0,1,2] row1 [2,2,0] row2 [1,0,2] row3 [2,1,1] row4 [0,2,1]
    # byte[0][c] = row0 | row2<<2 | row4<<4 ; byte[1][c] = row1 | row3<<2
    expected = torch.tensor(
        [
            [0 | 1 << 2 | 0 << 4, 1 | 0 << 2 | 2 << 4, 2 | 2 << 2 | 1 << 4],
            [2 | 2 << 2, 2 | 1 << 2, 0 | 1 << 2],
        ],
        dtype=torch.uint8,
    )
    assert expected.tolist() == [[4, 33, 26], [10, 6, 4]]
    packed = ternary.pack_ternary(w_t)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3)
    assert torch.equal(packed, expected)
    assert torch.equal(packed, hf_pack_weights(w_t))
    assert torch.equal(ternary.unpack_ternary(packed, 5), w_t)


def test_unpack_matches_transformers_docstring_example():
    # The worked example in transformers' unpack_weights docstring.
    packed = torch.tensor([[0b10100001, 0b00011000], [0b10010000, 0b00001010]], dtype=torch.uint8)
    expected = torch.tensor(
        [[0, -1], [-1, 1], [-1, 1], [-1, 1], [1, 0], [0, -1], [1, -1], [1, -1]], dtype=torch.int8
    )
    assert torch.equal(ternary.unpack_ternary(packed, 8), expected)
    assert torch.equal(ternary.pack_ternary(expected), packed)


@SETTINGS
@given(n=st.integers(1, 41), k=st.integers(1, 19), seed=st.integers(0, 2**31 - 1))
def test_pack_matches_transformers(n, k, seed):
    w_t = random_ternary(n, k, seed)
    packed = ternary.pack_ternary(w_t)
    assert packed.shape == ((n + 3) // 4, k)
    assert torch.equal(packed, hf_pack_weights(w_t))
    assert torch.equal(ternary.unpack_ternary(packed, n), w_t)
    hf = hf_unpack_weights(packed, torch.int8)
    assert torch.equal(hf[:n], w_t)
    assert bool((hf[n:] == -1).all())  # padding slots hold code 0


# ---------------------------------------------------------------------------------------
# quantize / dequantize
# ---------------------------------------------------------------------------------------


@SETTINGS
@given(
    n=st.integers(1, 33),
    k=st.integers(1, 33),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_quantize_matches_transformers_weight_quant(n, k, seed, dtype):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    p = ternary.quantize(w)
    assert p.out_features == n and p.in_features == k
    assert p.qweight.shape == ((n + 3) // 4, k) and p.weight_scale.shape == (1,)
    assert p.weight_scale.dtype == torch.float32
    expected_scale = 1.0 / w.float().abs().mean().clamp(min=1e-5)
    assert torch.equal(p.weight_scale, expected_scale.reshape(1))
    assert torch.equal(ternary.dequantize(p), hf_weight_quant(w.float()))
    assert torch.equal(ternary.dequantize(p, dtype), hf_weight_quant(w))


@SETTINGS
@given(n=st.integers(1, 17), k=st.integers(1, 17), seed=st.integers(0, 2**31 - 1))
def test_quantize_per_row_is_weight_quant_of_each_row(n, k, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * torch.rand(n, 1) * 4
    p = ternary.quantize(w, per_row=True)
    assert p.weight_scale.shape == (n,)
    expected = torch.stack([hf_weight_quant(row) for row in w])
    assert torch.equal(ternary.dequantize(p), expected)


@SETTINGS
@given(
    n=st.integers(1, 23),
    k=st.integers(1, 23),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    per_row=st.booleans(),
)
def test_already_ternary_matrix_round_trips_exactly(n, k, seed, scale, per_row):
    w_t = random_ternary(n, k, seed)
    w_t[:, 0] = 1  # at least one non-zero per row
    p = ternary.quantize(w_t.float() * scale, per_row=per_row)
    assert torch.equal(ternary.unpack_ternary(p.qweight, n), w_t)
    # dequantized value of a non-zero is mean|W| = scale * (fraction of non-zeros)
    mean = (w_t.float() * scale).abs().mean(dim=1 if per_row else None)
    expected = w_t.float() * mean.reshape(-1, 1)
    torch.testing.assert_close(ternary.dequantize(p), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("exp", [-16, -3, 0, 5, 30])  # 2**-16 > eps=1e-5
@pytest.mark.parametrize("per_row", [False, True])
def test_dense_ternary_times_power_of_two_is_exact(exp, per_row):
    w_t = torch.tensor([[1, -1, 1, 1], [-1, -1, 1, -1], [1, 1, -1, 1]], dtype=torch.int8)
    w = w_t.float() * 2.0**exp
    p = ternary.quantize(w, per_row=per_row)
    assert torch.equal(ternary.dequantize(p), w)
    p2 = ternary.quantize(ternary.dequantize(p), per_row=per_row)
    assert torch.equal(p2.qweight, p.qweight) and torch.equal(p2.weight_scale, p.weight_scale)


def test_zero_weight_uses_eps_and_decodes_to_zero():
    p = ternary.quantize(torch.zeros(6, 5))
    assert torch.equal(p.weight_scale, torch.tensor([1e5], dtype=torch.float32))
    assert torch.equal(ternary.dequantize(p), torch.zeros(6, 5))


def test_tensors_attributes_from_tensors_round_trip():
    p = ternary.quantize(torch.randn(7, 9), per_row=True)
    assert list(p.tensors()) == ["qweight", "weight_scale"]
    assert p.attributes() == {"out_features": 7}
    q = ternary.TernaryWeight.from_tensors(p.tensors(), **p.attributes())
    assert torch.equal(q.qweight, p.qweight) and torch.equal(q.weight_scale, p.weight_scale)
    assert q.out_features == 7 and q.in_features == 9 and q.per_row


def test_from_tensors_accepts_hf_bf16_weight_scale():
    p = ternary.quantize(torch.randn(8, 4))
    q = ternary.TernaryWeight.from_tensors(
        {"qweight": p.qweight, "weight_scale": p.weight_scale.to(torch.bfloat16)}, out_features=8
    )
    assert q.weight_scale.dtype == torch.float32
    assert torch.equal(q.weight_scale, p.weight_scale.to(torch.bfloat16).float())


# ---------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------


def test_quantize_activations_known_values_round_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -3.5, -127.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    x_q, x_scale = ternary.quantize_activations(x)
    assert x_q.dtype == torch.int8 and x_scale.dtype == torch.float32
    assert x_scale.shape == (2, 1)
    assert x_q.tolist() == [[0, 2, 2, -4, -127], [0, 0, 0, 0, 0]]
    assert torch.equal(x_scale, 127 / torch.tensor([[127.0], [1e-5]]))  # float32 math


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_quantize_activations_matches_transformers(shape, seed, dtype):
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 10).to(dtype)
    x_q, x_scale = ternary.quantize_activations(x)
    hq, hs = hf_activation_quant(x)
    assert torch.equal(x_q, hq) and torch.equal(x_scale, hs)
    assert x_q.shape == x.shape and x_scale.shape == (*shape[:-1], 1)


def test_ternary_product_matches_dequantized_matmul():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(10, 32, generator=g), torch.randn(3, 32, generator=g)
    p = ternary.quantize(w, per_row=True)
    x_q, x_scale = ternary.quantize_activations(x)
    acc = x_q.float() @ ternary.unpack_ternary(p.qweight, 10).float().T  # integer-exact
    y = acc / (x_scale * p.weight_scale)
    ref = (x_q.float() / x_scale) @ ternary.dequantize(p).T
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_quantize_activations_non_finite_token_gives_nan_output():
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, float("inf"), 2.0], [1.0, -2.0, 4.0]])
    x_q, x_scale = ternary.quantize_activations(x)
    w_t = torch.ones(1, 3)
    y = (x_q.float() @ w_t.T) / x_scale
    assert bool(y[:2].isnan().all()) and bool(y[2].isfinite().all())


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight, exc, match",
    [
        (torch.ones(4, 4, dtype=torch.int32), TypeError, r"ternary.quantize: weight must have dtype .* got int32"),
        (torch.ones(4), ValueError, r"ternary.quantize: weight must have 2 dimensions, got shape \(4,\)"),
        (torch.ones(2, 3, 4), ValueError, r"weight must have 2 dimensions, got shape \(2, 3, 4\)"),
        (torch.ones(0, 4), ValueError, r"ternary.quantize: weight is empty \(shape \(0, 4\)\)"),
        (torch.tensor([[1.0, float("nan")]]), ValueError, r"ternary.quantize: weight contains NaN or Inf"),
        (torch.tensor([[1.0, float("-inf")]]), ValueError, r"ternary.quantize: weight contains NaN or Inf"),
        ([[1.0]], TypeError, r"weight must be a torch.Tensor, got list"),
    ],
)
def test_quantize_bad_weight(weight, exc, match):
    with pytest.raises(exc, match=match):
        ternary.quantize(weight)


def test_quantize_bad_per_row():
    with pytest.raises(TypeError, match=r"per_row must be a bool, got str 'yes'"):
        ternary.quantize(torch.ones(2, 2), per_row="yes")


def test_pack_bad_inputs():
    with pytest.raises(ValueError, match=r"pack_ternary: w_t must hold only -1, 0, 1, got values in \[-1, 2\]"):
        ternary.pack_ternary(torch.tensor([[2, -1]], dtype=torch.int8))
    with pytest.raises(TypeError, match=r"pack_ternary: w_t must have dtype int8, got float32"):
        ternary.pack_ternary(torch.zeros(2, 2))


def test_unpack_bad_inputs():
    q = torch.zeros(2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"qweight has 2 rows, out_features=9 needs 3"):
        ternary.unpack_ternary(q, 9)
    with pytest.raises(ValueError, match=r"out_features must be positive, got 0"):
        ternary.unpack_ternary(q, 0)
    with pytest.raises(TypeError, match=r"qweight must have dtype uint8, got int8"):
        ternary.unpack_ternary(q.to(torch.int8), 8)


def test_dequantize_bad_inputs():
    p = ternary.quantize(torch.randn(4, 4))
    with pytest.raises(TypeError, match=r"dtype must be one of .* got torch.int8"):
        ternary.dequantize(p, torch.int8)
    with pytest.raises(TypeError, match=r"p must be a TernaryWeight, got Tensor"):
        ternary.dequantize(torch.zeros(4, 4))
    with pytest.raises(ValueError, match=r"weight_scale must have 1 or out_features=4 entries, got 3"):
        ternary.dequantize_tensors(p.qweight, torch.ones(3), 4)


def test_weight_constructor_and_from_tensors_bad_inputs():
    q, s = torch.zeros(2, 3, dtype=torch.uint8), torch.ones(1)
    with pytest.raises(ValueError, match=r"qweight must have shape \(3, K>0\) for out_features=9, got \(2, 3\)"):
        ternary.TernaryWeight(q, s, 9)
    with pytest.raises(ValueError, match=r"weight_scale must have 1 or out_features=8 entries, got 2"):
        ternary.TernaryWeight(q, torch.ones(2), 8)
    with pytest.raises(TypeError, match=r"weight_scale must have dtype float32, got float16"):
        ternary.TernaryWeight(q, s.half(), 8)
    with pytest.raises(ValueError, match=r"tensors must have keys \['qweight', 'weight_scale'\], got \['weight'"):
        ternary.TernaryWeight.from_tensors({"weight": q, "weight_scale": s}, out_features=8)
    with pytest.raises(ValueError, match=r"attributes must have keys \['out_features'\], got \[\]"):
        ternary.TernaryWeight.from_tensors({"qweight": q, "weight_scale": s})
    with pytest.raises(ValueError, match=r"weight_scale must be positive"):
        ternary.TernaryWeight.from_tensors({"qweight": q, "weight_scale": torch.zeros(1)}, out_features=8)
    with pytest.raises(ValueError, match=r"weight_scale contains NaN or Inf"):
        ternary.TernaryWeight.from_tensors({"qweight": q, "weight_scale": torch.tensor([float("inf")])}, out_features=8)
    bad = q.clone()
    bad[0, 0] = 0b11 << 4
    with pytest.raises(ValueError, match=r"qweight holds the 2-bit code 3"):
        ternary.TernaryWeight.from_tensors({"qweight": bad, "weight_scale": s}, out_features=8)
    with pytest.raises(ValueError, match=r"non-zero padding slots past out_features=5"):
        ternary.TernaryWeight.from_tensors({"qweight": q | (1 << 6), "weight_scale": s}, out_features=5)


@pytest.mark.parametrize(
    "x, exc, match",
    [
        (torch.ones(2, 3, dtype=torch.int8), TypeError, r"quantize_activations: x must have dtype .* got int8"),
        (torch.tensor(1.0), ValueError, r"x must have shape \[..., K\] with K > 0, got \(\)"),
        (torch.ones(3, 0), ValueError, r"x must have shape \[..., K\] with K > 0, got \(3, 0\)"),
    ],
)
def test_quantize_activations_bad_input(x, exc, match):
    with pytest.raises(exc, match=match):
        ternary.quantize_activations(x)
