"""Group-wise int4 weights: ``w = scale * (q - zero)``, ``q`` in 0..15, groups of G along K.

Layout (the lowbit checkpoint format): ``qweight`` uint8 ``[N, K/2]`` with element ``2j`` in
the low nibble and ``2j+1`` in the high nibble; ``scales`` and ``zeros`` ``[N, K/G]`` in a
float dtype (``zeros`` hold integers; ``None`` means symmetric, zero = 8).

Converters for the two common checkpoint layouts (both pack eight 4-bit values per int32,
value ``i`` of a word at bits ``4i..4i+3``):

* GPTQ (AutoGPTQ ``qlinear_cuda_old.QuantLinear.pack`` and its torch dequant path; vLLM
  ``gptq``): ``qweight`` int32 ``[K/8, N]`` packed along K (row r holds k = 8r..8r+7),
  ``qzeros`` int32 ``[K/G, N/8]`` packed along N, ``scales`` ``[K/G, N]``, ``g_idx`` ``[K]``.
  Format "gptq" (v1) stores ``zero - 1`` and readers add 1 back; "gptq_v2" (GPTQModel
  ``checkpoint_format="gptq_v2"``, see its ``convert_gptq_v1_to_v2_format_module``) stores
  ``zero`` itself.
* AWQ GEMM (AutoAWQ ``WQLinear_GEMM.from_linear``; vLLM ``awq_triton.py``
  ``AWQ_REVERSE_ORDER``): ``qweight`` int32 ``[K, N/8]`` and ``qzeros`` ``[K/G, N/8]`` packed
  along N in the interleaved order ``AWQ_ORDER`` (value i of word c is column
  ``8c + AWQ_ORDER[i]``), ``scales`` ``[K/G, N]``, zeros stored as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .._checks import FLOAT_DTYPES, check_finite, check_not_empty, check_same_device, check_tensor

GROUP_SIZES: tuple[int, ...] = (32, 64, 128)
SYMMETRIC_ZERO = 8
AWQ_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER: tuple[int, ...] = (0, 4, 1, 5, 2, 6, 3, 7)
GPTQ_FORMATS: tuple[str, ...] = ("gptq", "gptq_v2")


def _check_int(v: object, name: str, fn: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__} {v!r}")
    return v


def _check_group_size(group_size: object, k: int, fn: str, *, strict: bool = True) -> int:
    """Validate ``group_size`` against ``in_features=k`` (strict: only 32/64/128 or K)."""
    g = _check_int(group_size, "group_size", fn)
    if k % 2:
        raise ValueError(f"{fn}: in_features={k} must be even (two int4 values per byte)")
    if g <= 0 or k % g:
        raise ValueError(f"{fn}: group_size={g} does not divide in_features={k}")
    if g % 2:
        raise ValueError(f"{fn}: group_size={g} must be even")
    if strict and g not in GROUP_SIZES and g != k:
        raise ValueError(f"{fn}: group_size={g} must be 32, 64, 128 or in_features={k}")
    return g


def _check_packed(qweight, scales, zeros, group_size, fn: str, *, strict: bool) -> tuple[int, int]:
    """Metadata-only checks of the lowbit int4 tensors; returns (N, K)."""
    check_tensor(qweight, "qweight", dtype=torch.uint8, ndim=2, fn=fn)
    check_not_empty(qweight, "qweight", fn)
    n, k = qweight.shape[0], qweight.shape[1] * 2
    g = _check_group_size(group_size, k, fn, strict=strict)
    check_tensor(scales, "scales", dtype=FLOAT_DTYPES, shape=(n, k // g), fn=fn)
    if zeros is not None:
        check_tensor(zeros, "zeros", dtype=FLOAT_DTYPES, shape=(n, k // g), fn=fn)
    check_same_device(fn, qweight=qweight, scales=scales, zeros=zeros)
    return n, k


@dataclass(frozen=True, eq=False)
class Int4Weight:
    """Packed group-wise int4 weight ``[N, K]`` (see the module docstring for the layout)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int

    def __post_init__(self) -> None:
        _check_packed(self.qweight, self.scales, self.zeros, self.group_size, "Int4Weight", strict=True)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Checkpoint tensors, in a fixed order."""
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}

    def attributes(self) -> dict[str, int]:
        """Plain-python attributes needed besides the tensors."""
        return {"group_size": self.group_size}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor | None], **attributes: object) -> Int4Weight:
        """Rebuild from ``tensors()`` and ``attributes()`` output, validating both."""
        fn = "Int4Weight.from_tensors"
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{fn}: tensors must be a dict, got {type(tensors).__name__}")
        unknown = sorted(set(tensors) - {"qweight", "scales", "zeros"})
        if unknown:
            raise ValueError(f"{fn}: unknown tensors {unknown}; expected qweight, scales, zeros")
        missing = [key for key in ("qweight", "scales") if tensors.get(key) is None]
        if missing:
            raise ValueError(f"{fn}: missing tensors {missing}")
        extra = sorted(set(attributes) - {"group_size"})
        if extra:
            raise ValueError(f"{fn}: unknown attributes {extra}; expected group_size")
        if "group_size" not in attributes:
            raise ValueError(f"{fn}: missing attribute group_size")
        return cls(tensors["qweight"], tensors["scales"], tensors.get("zeros"), attributes["group_size"])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K]`` values 0..15 -> uint8 ``[N, K/2]`` (element 2j low nibble, 2j+1 high)."""
    fn = "int4.pack_int4"
    check_tensor(q, "q", dtype=torch.uint8, ndim=2, fn=fn)
    if q.shape[1] % 2:
        raise ValueError(f"{fn}: q has K={q.shape[1]} columns; K must be even")
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"{fn}: q holds values up to {int(q.max())}; int4 values must be 0..15")
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, K/2]`` -> uint8 ``[N, K]`` values 0..15 (inverse of :func:`pack_int4`)."""
    check_tensor(qweight, "qweight", dtype=torch.uint8, ndim=2, fn="int4.unpack_int4")
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


def quantize(
    weight: torch.Tensor,
    group_size: int = 128,
    symmetric: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> Int4Weight:
    """Round-to-nearest group-wise int4 quantization of ``weight[N, K]``.

    Asymmetric: per group ``mn = min(w, 0)``, ``mx = max(w, 0)`` (the range always holds 0,
    as GPTQ does, so that zero in 0..15 never clamps a one-sided group),
    ``scale = (mx - mn) / 15``, ``zero = clamp(round(-mn / scale), 0, 15)``.
    Symmetric: ``scale = absmax * 2 / 15``, zero = 8 (stored as ``zeros=None``).
    ``q = clamp(round(w / scale) + zero, 0, 15)``; a zero scale becomes 1. ``q`` is computed
    with the scale as stored in ``scale_dtype`` (default: ``weight.dtype`` if float16 or
    bfloat16, else float32). ``group_size=-1`` means one group per row (G = K).
    """
    fn = "int4.quantize"
    check_tensor(weight, "weight", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    check_not_empty(weight, "weight", fn)
    n, k = weight.shape
    if _check_int(group_size, "group_size", fn) == -1:
        group_size = k
    g = _check_group_size(group_size, k, fn)
    if not isinstance(symmetric, bool):
        raise TypeError(f"{fn}: symmetric must be a bool, got {type(symmetric).__name__} {symmetric!r}")
    if scale_dtype is None:
        scale_dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
    elif scale_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: scale_dtype must be float16, bfloat16 or float32, got {scale_dtype!r}")
    check_finite(weight, "weight", fn)

    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    if symmetric:
        scale = w.abs().amax(dim=-1) * 2 / 15
    else:
        mn = w.amin(dim=-1).clamp(max=0)
        scale = (w.amax(dim=-1).clamp(min=0) - mn) / 15
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if not bool(torch.isfinite(scale).all()):
        raise ValueError(f"{fn}: the range of weight overflows scale_dtype={scale_dtype} (use float32)")
    s = scale.to(torch.float32).unsqueeze(-1)
    if symmetric:
        zero = torch.full_like(s, float(SYMMETRIC_ZERO))
    else:
        zero = torch.clamp(torch.round(-mn.unsqueeze(-1) / s), 0, 15)
    q = torch.clamp(torch.round(w / s) + zero, 0, 15).to(torch.uint8).reshape(n, k)
    zeros = None if symmetric else zero.squeeze(-1).to(scale_dtype)
    return Int4Weight(pack_int4(q), scale, zeros, g)


def dequantize_tensors(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``scale * (q - zero)`` as ``[N, K]`` in ``dtype`` (computed in float32; zeros None -> 8)."""
    fn = "int4.dequantize_tensors"
    n, k = _check_packed(qweight, scales, zeros, group_size, fn, strict=False)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    ng = k // group_size
    q = unpack_int4(qweight).to(torch.float32).reshape(n, ng, group_size)
    z = SYMMETRIC_ZERO if zeros is None else zeros.to(torch.float32).unsqueeze(-1)
    w = (q - z) * scales.to(torch.float32).unsqueeze(-1)
    return w.reshape(n, k).to(dtype)


def dequantize(p: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight of ``p`` in ``dtype``."""
    if not isinstance(p, Int4Weight):
        raise TypeError(f"int4.dequantize: p must be an Int4Weight, got {type(p).__name__}")
    return dequantize_tensors(p.qweight, p.scales, p.zeros, p.group_size, dtype=dtype)


# ---- int32 words of eight nibbles (value i at bits 4i..4i+3) --------------------------------

def _unpack_words(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` -> uint8 ``[R, C, 8]`` nibbles (int64 math: no sign trouble)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=packed.device)
    return ((packed.to(torch.int64).unsqueeze(-1) >> shifts) & 0xF).to(torch.uint8)


def _pack_words(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8/int ``[R, C, 8]`` values 0..15 -> int32 ``[R, C]`` (bit pattern, wrapped to signed)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=nibbles.device)
    v = (nibbles.to(torch.int64) << shifts).sum(dim=-1)
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def _integer_zeros(p: Int4Weight, lo: int, hi: int, fn: str, hint: str) -> torch.Tensor:
    """``p``'s zeros as int64 ``[K/G, N]``, checked to be integers in lo..hi."""
    if p.zeros is None:
        return torch.full((p.scales.shape[1], p.out_features), SYMMETRIC_ZERO, dtype=torch.int64,
                          device=p.qweight.device)
    z = p.zeros.to(torch.float32)
    if not bool((z == torch.round(z)).all()) or float(z.min()) < lo or float(z.max()) > hi:
        raise ValueError(
            f"{fn}: zeros must be integers in {lo}..{hi}{hint}, got values in "
            f"[{float(z.min())}, {float(z.max())}]"
        )
    return z.to(torch.int64).t()


def _finish(fn: str, q_nk: torch.Tensor, scales_gn: torch.Tensor, zeros_gn: torch.Tensor, g: int,
            symmetric: bool | None) -> Int4Weight:
    """Build an Int4Weight from q ``[N, K]`` and checkpoint-oriented ``[K/G, N]`` scales/zeros."""
    if symmetric is not None and not isinstance(symmetric, bool):
        raise TypeError(f"{fn}: symmetric must be a bool or None, got {type(symmetric).__name__}")
    all_eight = bool((zeros_gn == SYMMETRIC_ZERO).all())
    if symmetric and not all_eight:
        raise ValueError(f"{fn}: symmetric=True but the checkpoint's zeros are not all {SYMMETRIC_ZERO}")
    keep = not all_eight if symmetric is None else not symmetric
    zeros = zeros_gn.t().to(scales_gn.dtype).contiguous() if keep else None
    q = q_nk.contiguous()
    return Int4Weight(q[:, 0::2] | (q[:, 1::2] << 4), scales_gn.t().contiguous(), zeros, g)


def _checkpoint_shapes(fn: str, qweight, qzeros, scales, k: int, n: int) -> int:
    """Shared GPTQ/AWQ checks of scales ``[K/G, N]`` and qzeros ``[K/G, N/8]``; returns G."""
    check_tensor(scales, "scales", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    if scales.shape[1] != n:
        raise ValueError(f"{fn}: scales must have shape (K/G, N={n}) for qweight {tuple(qweight.shape)}, "
                         f"got {tuple(scales.shape)}")
    ng = scales.shape[0]
    if ng == 0 or k % ng:
        raise ValueError(f"{fn}: scales has {ng} group rows, which does not divide in_features K={k}")
    g = _check_group_size(k // ng, k, fn)
    check_tensor(qzeros, "qzeros", dtype=torch.int32, shape=(ng, n // 8), fn=fn)
    return g


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    checkpoint_format: str = "gptq",
    symmetric: bool | None = None,
) -> Int4Weight:
    """Read a 4-bit GPTQ layer (``qweight [K/8, N]``, ``qzeros [K/G, N/8]``, ``scales [K/G, N]``).

    ``checkpoint_format="gptq"`` (v1): real zero = stored + 1 (a stored 15 reads as 16, as
    GPTQ kernels do); ``"gptq_v2"``: zero as stored. ``g_idx`` must be the trivial
    ``k // G`` (act-order / desc_act permutations are not supported). ``symmetric=None``
    returns ``zeros=None`` when every zero is 8; True requires that, False keeps the zeros.
    """
    fn = "int4.from_gptq"
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"{fn}: checkpoint_format={checkpoint_format!r} must be 'gptq' or 'gptq_v2'")
    check_tensor(qweight, "qweight", dtype=torch.int32, ndim=2, fn=fn)
    check_not_empty(qweight, "qweight", fn)
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if n % 8:
        raise ValueError(f"{fn}: out_features N={n} (qweight {tuple(qweight.shape)}) must be a multiple of 8")
    g = _checkpoint_shapes(fn, qweight, qzeros, scales, k, n)
    if g_idx is not None:
        check_tensor(g_idx, "g_idx", dtype=(torch.int32, torch.int64), shape=(k,), fn=fn)
        trivial = torch.arange(k, device=g_idx.device) // g
        if not torch.equal(g_idx.to(torch.int64), trivial):
            raise ValueError(
                f"{fn}: g_idx is not k // group_size (group_size={g}): act-order (desc_act=True) "
                "checkpoints with permuted groups are not supported"
            )
    check_same_device(fn, qweight=qweight, qzeros=qzeros, scales=scales, g_idx=g_idx)
    q = _unpack_words(qweight).permute(0, 2, 1).reshape(k, n).t()
    zeros = _unpack_words(qzeros).reshape(-1, n).to(torch.int64)
    if checkpoint_format == "gptq":
        zeros = zeros + 1
    return _finish(fn, q, scales, zeros, g, symmetric)


def to_gptq(p: Int4Weight, *, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """Write ``p`` as 4-bit GPTQ tensors ``{"qweight", "qzeros", "scales", "g_idx"}``.

    v1 ("gptq") stores zero - 1, so it cannot hold a zero of 0 (ValueError: use "gptq_v2").
    """
    fn = "int4.to_gptq"
    if not isinstance(p, Int4Weight):
        raise TypeError(f"{fn}: p must be an Int4Weight, got {type(p).__name__}")
    if checkpoint_format not in GPTQ_FORMATS:
        raise ValueError(f"{fn}: checkpoint_format={checkpoint_format!r} must be 'gptq' or 'gptq_v2'")
    n, k, g = p.out_features, p.in_features, p.group_size
    if n % 8 or k % 8:
        raise ValueError(f"{fn}: out_features={n} and in_features={k} must be multiples of 8 for GPTQ")
    v1 = checkpoint_format == "gptq"
    lo, hi = (1, 16) if v1 else (0, 15)
    hint = " (GPTQ v1 stores zero - 1; use checkpoint_format='gptq_v2')" if v1 else ""
    zeros = _integer_zeros(p, lo, hi, fn, hint) - (1 if v1 else 0)
    q = unpack_int4(p.qweight).t().reshape(k // 8, 8, n).permute(0, 2, 1)
    return {
        "qweight": _pack_words(q),
        "qzeros": _pack_words(zeros.reshape(-1, n // 8, 8)),
        "scales": p.scales.t().contiguous(),
        "g_idx": torch.arange(k, dtype=torch.int32, device=p.qweight.device) // g,
    }


def from_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    *,
    symmetric: bool | None = None,
) -> Int4Weight:
    """Read an AWQ GEMM layer (``qweight [K, N/8]``, ``qzeros [K/G, N/8]``, ``scales [K/G, N]``).

    ``symmetric`` as in :func:`from_gptq`.
    """
    fn = "int4.from_awq"
    check_tensor(qweight, "qweight", dtype=torch.int32, ndim=2, fn=fn)
    check_not_empty(qweight, "qweight", fn)
    k, n = qweight.shape[0], qweight.shape[1] * 8
    g = _checkpoint_shapes(fn, qweight, qzeros, scales, k, n)
    check_same_device(fn, qweight=qweight, qzeros=qzeros, scales=scales)
    rev = list(AWQ_REVERSE_ORDER)
    q = _unpack_words(qweight)[..., rev].reshape(k, n).t()
    zeros = _unpack_words(qzeros)[..., rev].reshape(-1, n).to(torch.int64)
    return _finish(fn, q, scales, zeros, g, symmetric)


def to_awq(p: Int4Weight) -> dict[str, torch.Tensor]:
    """Write ``p`` as AWQ GEMM tensors ``{"qweight", "qzeros", "scales"}``."""
    fn = "int4.to_awq"
    if not isinstance(p, Int4Weight):
        raise TypeError(f"{fn}: p must be an Int4Weight, got {type(p).__name__}")
    n, k = p.out_features, p.in_features
    if n % 8:
        raise ValueError(f"{fn}: out_features={n} must be a multiple of 8 for AWQ")
    order = list(AWQ_ORDER)
    zeros = _integer_zeros(p, 0, 15, fn, "")
    q = unpack_int4(p.qweight).t().reshape(k, n // 8, 8)
    return {
        "qweight": _pack_words(q[..., order]),
        "qzeros": _pack_words(zeros.reshape(-1, n // 8, 8)[..., order]),
        "scales": p.scales.t().contiguous(),
    }
