"""Tests for lowbit.formats.sparse24 (2:4 semi-structured sparsity).

torch's to_sparse_semi_structured is CUDA-only, so only the CPU guard of the torch
converters is tested here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import sparse24

SETTINGS = settings(deadline=None, max_examples=40)
FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def loop_prune(w: torch.Tensor) -> torch.Tensor:
    """Obvious reference: in each group keep the 2 first entries of the order (-|w|, index)."""
    out = torch.zeros_like(w)
    n, k = w.shape
    for r in range(n):
        for g in range(0, k, 4):
            grp = w[r, g : g + 4].tolist()
            keep = sorted(range(4), key=lambda i: (-abs(grp[i]), i))[:2]
            for i in keep:
                out[r, g + i] = w[r, g + i]
    return out


def loop_compress(w: torch.Tensor) -> tuple[list[list[float]], list[list[int]]]:
    """Obvious reference for values and meta bytes of a 2:4 matrix."""
    values, meta = [], []
    for row in w.tolist():
        vrow, nibbles = [], []
        for g in range(0, len(row), 4):
            grp = row[g : g + 4]
            idx = [i for i in range(4) if grp[i] != 0]
            idx += [i for i in range(4) if i not in idx][: 2 - len(idx)]
            i0, i1 = sorted(idx)
            vrow += [grp[i0], grp[i1]]
            nibbles.append(i0 | (i1 << 2))
        values.append(vrow)
        meta.append([nibbles[j] | (nibbles[j + 1] << 4) for j in range(0, len(nibbles), 2)])
    return values, meta


def random_24(n: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """A random 2:4 matrix with 0, 1 or 2 non-zeros per group (exact zeros included)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w = w * (torch.rand(n, k, generator=g) > 0.3)
    return sparse24.prune(w).to(dtype)


# ---------------------------------------------------------------------------------------
# prune
# ---------------------------------------------------------------------------------------


def test_prune_known_groups_and_ties():
    w = torch.tensor(
        [
            [1.0, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0],
            [0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 1.0, 1.0],
            [1.0, 2.0, -2.0, 3.0, 0.0, 0.0, 0.0, -7.0],
        ]
    )
    expected = torch.tensor(
        [
            [0.0, -3.0, 2.0, 0.0, 1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, -2.0, 2.0, 0.0, 0.0],
            [0.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0, -7.0],
        ]
    )
    assert torch.equal(sparse24.prune(w), expected)


@SETTINGS
@given(
    n=st.integers(1, 9),
    groups=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(FLOATS),
    levels=st.integers(2, 5),
)
def test_prune_matches_loop_reference(n, groups, seed, dtype, levels):
    # few distinct magnitudes -> many ties
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(-levels, levels + 1, (n, 4 * groups), generator=g).float() / 2).to(dtype)
    p = sparse24.prune(w)
    assert p.dtype == dtype and p.shape == w.shape
    assert torch.equal(p, loop_prune(w))
    assert int((p.reshape(n, groups, 4) != 0).sum(-1).max()) <= 2


# ---------------------------------------------------------------------------------------
# compress / decompress
# ---------------------------------------------------------------------------------------


def test_compress_known_example_byte_by_byte():
    w = torch.tensor(
        [
            [0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0, 3.0],
        ]
    )
    p = sparse24.compress(w)
    # row 0: group0 (1,3) -> 1|3<<2=13, group1 (0 + free 1) -> 0|1<<2=4; byte = 13 | 4<<4 = 77
    # row 1: group0 none -> (0,1) -> 4, group1 (2,3) -> 2|3<<2=14; byte = 4 | 14<<4 = 228
    assert p.meta.tolist() == [[77], [228]]
    assert p.values.tolist() == [[5.0, 7.0, 1.0, 0.0], [0.0, 0.0, -2.0, 3.0]]
    assert p.values.dtype == torch.float32 and p.meta.dtype == torch.uint8
    assert p.out_features == 2 and p.in_features == 8
    assert torch.equal(sparse24.decompress(p), w)


@SETTINGS
@given(
    n=st.integers(1, 9),
    k8=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(FLOATS),
)
def test_compress_decompress_round_trip_is_exact(n, k8, seed, dtype):
    w = random_24(n, 8 * k8, seed, dtype)
    p = sparse24.compress(w)
    assert p.values.shape == (n, 4 * k8) and p.meta.shape == (n, k8) and p.values.dtype == dtype
    values, meta = loop_compress(w.float())
    assert p.values.float().tolist() == values and p.meta.tolist() == meta
    assert torch.equal(sparse24.decompress(p, dtype), w)
    assert torch.equal(sparse24.dequantize(p), w.float())
    assert torch.equal(sparse24.decompress_tensors(p.values, p.meta, dtype), w)
    # and back again: a unique encoding
    again = sparse24.compress(sparse24.dequantize(p, dtype))
    assert torch.equal(again.values, p.values) and torch.equal(again.meta, p.meta)


@SETTINGS
@given(n=st.integers(1, 7), k8=st.integers(1, 5), seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(FLOATS))
def test_quantize_is_compress_of_prune(n, k8, seed, dtype):
    w = torch.randn(n, 8 * k8, generator=torch.Generator().manual_seed(seed)).to(dtype)
    p = sparse24.quantize(w)
    q = sparse24.compress(sparse24.prune(w))
    assert torch.equal(p.values, q.values) and torch.equal(p.meta, q.meta)
    assert torch.equal(sparse24.dequantize(p, dtype), sparse24.prune(w))


def test_values_dtype_option():
    w = sparse24.prune(torch.randn(4, 16))
    p = sparse24.quantize(w, dtype=torch.float16)
    assert p.values.dtype == torch.float16
    assert torch.equal(sparse24.dequantize(p), w.half().float())


def test_tensors_attributes_from_tensors_round_trip():
    p = sparse24.quantize(torch.randn(3, 24, dtype=torch.bfloat16))
    assert list(p.tensors()) == ["values", "meta"] and p.attributes() == {}
    q = sparse24.Sparse24Weight.from_tensors(p.tensors(), **p.attributes())
    assert torch.equal(q.values, p.values) and torch.equal(q.meta, p.meta)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["prune", "compress", "quantize"])
@pytest.mark.parametrize(
    "weight, exc, match",
    [
        (torch.ones(4, 8, dtype=torch.int8), TypeError, r"weight must have dtype .* got int8"),
        (torch.ones(8), ValueError, r"weight must have 2 dimensions, got shape \(8,\)"),
        (torch.ones(0, 8), ValueError, r"weight is empty \(shape \(0, 8\)\)"),
        (torch.tensor([[float("nan")] + [0.0] * 7]), ValueError, r"weight contains NaN or Inf"),
        (torch.tensor([[float("inf")] + [0.0] * 7]), ValueError, r"weight contains NaN or Inf"),
        (torch.zeros(2, 6), ValueError, r"in_features K=6 of weight \(2, 6\) must be a multiple of"),
    ],
)
def test_bad_weight(fn, weight, exc, match):
    with pytest.raises(exc, match=rf"sparse24.{fn}: {match}"):
        getattr(sparse24, fn)(weight)


@pytest.mark.parametrize("fn", ["compress", "quantize"])
def test_k_must_be_multiple_of_8(fn):
    with pytest.raises(ValueError, match=rf"sparse24.{fn}: in_features K=12 .* must be a multiple of 8"):
        getattr(sparse24, fn)(torch.zeros(2, 12))
    sparse24.prune(torch.zeros(2, 12))  # prune itself only needs groups of 4


def test_compress_rejects_dense_group():
    w = torch.zeros(3, 16)
    w[2, 4:7] = torch.tensor([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 2, columns 4..7 hold 3 non-zeros"):
        sparse24.compress(w)


def test_bad_dtype_and_overflow():
    with pytest.raises(TypeError, match=r"compress: dtype must be one of .* got torch.int8"):
        sparse24.compress(torch.zeros(1, 8), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"overflow dtype=torch.float16"):
        sparse24.quantize(torch.full((1, 8), 1e6), dtype=torch.float16)
    p = sparse24.quantize(torch.randn(2, 8))
    with pytest.raises(TypeError, match=r"decompress_tensors: dtype must be one of .* got torch.int32"):
        sparse24.dequantize(p, torch.int32)
    with pytest.raises(TypeError, match=r"dequantize: p must be a Sparse24Weight, got Tensor"):
        sparse24.dequantize(torch.zeros(2, 8))


def test_weight_constructor_and_decompress_bad_shapes():
    v, m = torch.zeros(2, 4), torch.zeros(2, 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"Sparse24Weight: meta must have shape \(2, 1\), got \(2, 2\)"):
        sparse24.Sparse24Weight(v, torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"K a positive multiple of 8, got \(2, 6\)"):
        sparse24.Sparse24Weight(torch.zeros(2, 6), m)
    with pytest.raises(TypeError, match=r"meta must have dtype uint8, got int8"):
        sparse24.decompress_tensors(v, m.to(torch.int8))
    with pytest.raises(TypeError, match=r"values must have dtype .* got int8"):
        sparse24.decompress_tensors(v.to(torch.int8), m)


def test_from_tensors_bad_inputs():
    v = torch.ones(1, 4)
    with pytest.raises(ValueError, match=r"meta row 0, group 1 has nibble 0, not a pair"):
        sparse24.Sparse24Weight.from_tensors({"values": v, "meta": torch.tensor([[0x04]], dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"meta row 0, group 0 has nibble 6"):
        sparse24.Sparse24Weight.from_tensors({"values": v, "meta": torch.tensor([[0x46]], dtype=torch.uint8)})
    with pytest.raises(ValueError, match=r"tensors must have keys \['meta', 'values'\], got \['values'\]"):
        sparse24.Sparse24Weight.from_tensors({"values": v})
    with pytest.raises(ValueError, match=r"takes no attributes, got \['group_size'\]"):
        sparse24.Sparse24Weight.from_tensors(
            {"values": v, "meta": torch.tensor([[0x44]], dtype=torch.uint8)}, group_size=4
        )
    with pytest.raises(ValueError, match=r"values contains NaN or Inf"):
        sparse24.Sparse24Weight.from_tensors(
            {"values": torch.tensor([[float("nan"), 0, 0, 0]]), "meta": torch.tensor([[0x44]], dtype=torch.uint8)}
        )


def test_torch_semi_structured_converters_guard_off_cuda():
    p = sparse24.quantize(torch.randn(32, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"to_torch_semi_structured: .*CUDA tensors only, got values on device cpu"):
        sparse24.to_torch_semi_structured(p)
    with pytest.raises(TypeError, match=r"from_torch_semi_structured: t must be a torch.sparse.SparseSemiStructured"):
        sparse24.from_torch_semi_structured(sparse24.dequantize(p))
    with pytest.raises(TypeError, match=r"to_torch_semi_structured: p must be a Sparse24Weight, got Tensor"):
        sparse24.to_torch_semi_structured(torch.zeros(32, 64))
