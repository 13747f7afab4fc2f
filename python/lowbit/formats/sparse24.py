"""2:4 semi-structured sparse weights: at most 2 non-zeros in every run of 4 along K.

Layout (``W [N, K]``, ``K % 8 == 0``): for each group of 4 columns ``4g..4g+3`` exactly two
values are stored, in ascending column order (either may be 0.0), with their in-group
indices ``i0 < i1``. ``values [N, K/2]`` holds them (float16/bfloat16/float32); the 4-bit
``nibble = i0 | (i1 << 2)`` of group ``2j`` is the LOW nibble of ``meta[:, j]`` (uint8
``[N, K/8]``) and that of group ``2j+1`` the HIGH nibble. A group with fewer than two
non-zeros stores its non-zeros plus the lowest free indices (value 0.0), so the encoding
of a given dense matrix is unique.

``prune`` keeps the two largest |w| of every group (ties to the lower index). Conversion
from/to ``torch.sparse.to_sparse_semi_structured`` goes through the dense matrix, since
torch's own packed layout is backend-specific (CUTLASS / cuSPARSELt) and CUDA-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import FLOAT_DTYPES, check_finite, check_not_empty, check_same_device, check_tensor

# nibble = i0 | (i1 << 2) for the six pairs i0 < i1
_VALID_NIBBLES = (4, 8, 12, 9, 13, 14)


@dataclass(frozen=True, eq=False)
class Sparse24Weight:
    """2:4 sparse weight: ``values`` [N, K/2] float, ``meta`` uint8 [N, K/8]."""

    values: torch.Tensor
    meta: torch.Tensor

    def __post_init__(self) -> None:
        fn = "Sparse24Weight"
        check_tensor(self.values, "values", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
        n, half = self.values.shape
        if half == 0 or half % 4:
            raise ValueError(
                f"{fn}: values must have shape (N, K/2) with K a positive multiple of 8, got {tuple(self.values.shape)}"
            )
        check_tensor(self.meta, "meta", dtype=torch.uint8, shape=(n, half // 4), fn=fn)
        check_same_device(fn, values=self.values, meta=self.meta)

    @property
    def out_features(self) -> int:
        return int(self.values.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.values.shape[1] * 2)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Checkpoint tensors, in a fixed order."""
        return {"values": self.values, "meta": self.meta}

    def attributes(self) -> dict[str, int | float | bool | str]:
        return {}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], **attributes: Any) -> Sparse24Weight:
        """Validate checkpoint tensors (every meta nibble a legal pair i0 < i1) and rebuild."""
        fn = "Sparse24Weight.from_tensors"
        if not isinstance(tensors, dict):
            raise TypeError(f"{fn}: tensors must be a dict, got {type(tensors).__name__}")
        if set(tensors) != {"values", "meta"}:
            raise ValueError(f"{fn}: tensors must have keys ['meta', 'values'], got {sorted(tensors)}")
        if attributes:
            raise ValueError(f"{fn}: sparse24 takes no attributes, got {sorted(attributes)}")
        p = cls(tensors["values"], tensors["meta"])
        nib = _nibbles(p.meta)
        legal = torch.tensor(_VALID_NIBBLES, dtype=torch.uint8, device=nib.device)
        bad = ~torch.isin(nib, legal)
        if bool(bad.any()):
            r, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{fn}: meta row {r}, group {g} has nibble {int(nib[r, g])}, not a pair of "
                f"in-group indices i0 < i1 (legal nibbles: {sorted(_VALID_NIBBLES)})"
            )
        check_finite(p.values, "values", fn)
        return p


def _nibbles(meta: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/8] -> uint8 [N, K/4], group order (low nibble first)."""
    return torch.stack([meta & 0xF, meta >> 4], dim=-1).reshape(meta.shape[0], -1)


def _check_weight(fn: str, weight: torch.Tensor, multiple: int) -> None:
    check_tensor(weight, "weight", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    check_not_empty(weight, "weight", fn)
    k = weight.shape[1]
    if k % multiple:
        raise ValueError(f"{fn}: in_features K={k} of weight {tuple(weight.shape)} must be a multiple of {multiple}")
    check_finite(weight, "weight", fn)


def prune(weight: torch.Tensor) -> torch.Tensor:
    """Zero all but the 2 largest-|w| entries of each group of 4 along K (ties -> lower index).

    Returns a dense tensor of the same shape and dtype. Needs ``K % 4 == 0``.
    """
    fn = "sparse24.prune"
    _check_weight(fn, weight, 4)
    n, k = weight.shape
    g = weight.reshape(n, k // 4, 4)
    a = g.abs()
    mine = a.unsqueeze(-1)  # [n, G, 4 (j), 1]
    other = a.unsqueeze(-2)  # [n, G, 1, 4 (k)]
    idx = torch.arange(4, device=weight.device)
    earlier = idx.view(1, 4) < idx.view(4, 1)  # [j, k]: k comes before j
    beaten_by = (other > mine) | ((other == mine) & earlier)
    keep = beaten_by.sum(dim=-1) < 2  # rank among the 4, ties broken by index
    return torch.where(keep, g, 0.0).reshape(n, k)


def compress(weight: torch.Tensor, dtype: torch.dtype | None = None) -> Sparse24Weight:
    """Pack a dense matrix that is already 2:4 sparse (ValueError for a group with > 2 non-zeros).

    ``dtype`` is the dtype of the stored values (default: ``weight.dtype``).
    """
    fn = "sparse24.compress"
    _check_weight(fn, weight, 8)
    dtype = weight.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be one of float16, bfloat16, float32, got {dtype}")
    n, k = weight.shape
    g = weight.reshape(n, k // 4, 4)
    nz = g != 0
    count = nz.sum(dim=-1)
    bad = count > 2
    if bool(bad.any()):
        r, grp = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{fn}: weight is not 2:4 sparse: row {r}, columns {4 * grp}..{4 * grp + 3} hold "
            f"{int(count[r, grp])} non-zeros (at most 2); use sparse24.prune or sparse24.quantize"
        )
    idx = torch.arange(4, device=weight.device)
    score = nz.to(torch.int64) * 4 + (3 - idx)  # distinct: non-zeros first, then lowest index
    sel = score.topk(2, dim=-1).indices.sort(dim=-1).values  # [n, G, 2], i0 < i1
    values = g.gather(-1, sel).reshape(n, k // 2).to(dtype)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{fn}: weight values overflow dtype={dtype} (max |w| = {weight.abs().max().item()})")
    nib = (sel[..., 0] | (sel[..., 1] << 2)).reshape(n, k // 8, 2)
    meta = (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)
    return Sparse24Weight(values, meta)


def quantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> Sparse24Weight:
    """``compress(prune(weight), dtype)``: magnitude-prune to 2:4 and pack (K % 8 == 0)."""
    _check_weight("sparse24.quantize", weight, 8)
    return compress(prune(weight), dtype=dtype)


def decompress_tensors(values: torch.Tensor, meta: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tensor-level decode to the dense [N, K] matrix in ``dtype``.

    ``meta`` must hold legal nibbles (``Sparse24Weight.from_tensors`` checks); this
    function looks only at shapes, so it never syncs with the device.
    """
    fn = "sparse24.decompress_tensors"
    check_tensor(values, "values", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    n, half = values.shape
    if half == 0 or half % 4:
        raise ValueError(
            f"{fn}: values must have shape (N, K/2) with K a positive multiple of 8, got {tuple(values.shape)}"
        )
    check_tensor(meta, "meta", dtype=torch.uint8, shape=(n, half // 4), fn=fn)
    check_same_device(fn, values=values, meta=meta)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be one of float16, bfloat16, float32, got {dtype}")
    nib = _nibbles(meta).to(torch.int64)  # [n, G]
    sel = torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)  # [n, G, 2]
    out = torch.zeros(n, half // 2, 4, dtype=dtype, device=values.device)
    out.scatter_(-1, sel, values.reshape(n, half // 2, 2).to(dtype))
    return out.reshape(n, half * 2)


def decompress(p: Sparse24Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] matrix of ``p`` in ``dtype`` (same as :func:`dequantize`)."""
    if not isinstance(p, Sparse24Weight):
        raise TypeError(f"sparse24.decompress: p must be a Sparse24Weight, got {type(p).__name__}")
    return decompress_tensors(p.values, p.meta, dtype)


def dequantize(p: Sparse24Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] matrix of ``p`` in ``dtype``."""
    if not isinstance(p, Sparse24Weight):
        raise TypeError(f"sparse24.dequantize: p must be a Sparse24Weight, got {type(p).__name__}")
    return decompress_tensors(p.values, p.meta, dtype)


def from_torch_semi_structured(t: torch.Tensor) -> Sparse24Weight:
    """Convert a ``torch.sparse.SparseSemiStructuredTensor`` (CUDA-only in torch) via its dense form."""
    fn = "sparse24.from_torch_semi_structured"
    from torch.sparse import SparseSemiStructuredTensor

    if not isinstance(t, SparseSemiStructuredTensor):
        raise TypeError(
            f"{fn}: t must be a torch.sparse.SparseSemiStructuredTensor (from to_sparse_semi_structured), "
            f"got {type(t).__name__}"
        )
    dense = t.to_dense()
    return compress(dense, dtype=dense.dtype)


def to_torch_semi_structured(p: Sparse24Weight) -> torch.Tensor:
    """Convert to a ``torch.sparse.SparseSemiStructuredTensor`` via the dense matrix.

    torch implements semi-structured sparsity on CUDA only, so ``p`` must live on a CUDA
    device; torch's own shape/dtype limits apply and raise from torch (checked on an H100
    with torch 2.11: the cuSPARSELt backend takes float16/bfloat16, not float32; the
    CUTLASS backend runs only on compute capability 8.x).
    """
    fn = "sparse24.to_torch_semi_structured"
    if not isinstance(p, Sparse24Weight):
        raise TypeError(f"{fn}: p must be a Sparse24Weight, got {type(p).__name__}")
    if p.values.device.type != "cuda":
        raise ValueError(
            f"{fn}: torch.sparse.to_sparse_semi_structured supports CUDA tensors only, "
            f"got values on device {p.values.device}; move the weight to CUDA first"
        )
    dense = decompress_tensors(p.values, p.meta, p.values.dtype)
    return torch.sparse.to_sparse_semi_structured(dense)
