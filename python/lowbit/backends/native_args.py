"""Tensors -> the plain integers the native module takes (pointers, sizes, strides, dtype codes).

Shared by the native backends (cpu.py, cuda.py). The op layer has validated the call
already; these helpers still check every size that a pointer's buffer must have, because
the C++ side only sees addresses and cannot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_tensor

# The dtype codes of csrc/common/dtype.h (lowbit._C.build_info()["dtype_codes"] says the same).
DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NATIVE_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPE_CODES)


def dtype_code(dtype: torch.dtype) -> int:
    """The native dtype code of a float dtype (TypeError for any other dtype)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"lowbit native kernels take float32, float16 or bfloat16, got {dtype}") from None


def rows_with_unit_stride(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` viewed as ``[M, K]`` with unit inner stride and its row stride in elements
    (copies only if no such view exists)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x2.stride(1) != 1 or (m > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    return x2, (x2.stride(0) if m > 1 else k)


def int4_supported(device_type: str, x, qweight, scales, zeros, bias) -> bool:
    """True if the tensors have the device and dtypes that a native int4 kernel takes."""
    tensors = [t for t in (x, qweight, scales, zeros, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.device.type == device_type for t in tensors):
        return False
    if qweight.dtype != torch.uint8:
        return False
    return all(t.dtype in DTYPE_CODES for t in (x, scales, zeros, bias) if t is not None)


@dataclass
class Int4Call:
    """The tensors of one native int4_matmul call, kept alive until the kernel has run."""

    x: torch.Tensor  # [M, K], unit inner stride
    x_row_stride: int
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bias: torch.Tensor | None
    out: torch.Tensor  # [M, N], contiguous, x.dtype
    out_shape: tuple[int, ...]
    group_size: int

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments of ``lowbit._C.int4_matmul_<device>`` (all but num_threads/stream)."""
        m, k = self.x.shape
        code_x = dtype_code(self.x.dtype)
        return dict(
            x_ptr=self.x.data_ptr(),
            x_dtype=code_x,
            x_row_stride=self.x_row_stride,
            qweight_ptr=self.qweight.data_ptr(),
            scales_ptr=self.scales.data_ptr(),
            scales_dtype=dtype_code(self.scales.dtype),
            zeros_ptr=0 if self.zeros is None else self.zeros.data_ptr(),
            zeros_dtype=code_x if self.zeros is None else dtype_code(self.zeros.dtype),
            bias_ptr=0 if self.bias is None else self.bias.data_ptr(),
            bias_dtype=code_x if self.bias is None else dtype_code(self.bias.dtype),
            out_ptr=self.out.data_ptr(),
            out_dtype=dtype_code(self.out.dtype),
            M=m,
            N=self.out.shape[1],
            K=k,
            group_size=self.group_size,
        )

    @property
    def empty(self) -> bool:
        """True if there is nothing to compute (M or N is 0): skip the native call."""
        return self.out.numel() == 0

    def result(self) -> torch.Tensor:
        """The output, shaped ``[..., N]`` like ``x``."""
        return self.out.view(self.out_shape)


def prepare_int4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
    fn: str,
) -> Int4Call:
    """Check every buffer size against ``x``'s K and ``qweight``'s N, make the weight tensors
    contiguous and ``x``'s rows unit-stride, and allocate the output."""
    check_tensor(x, "x", dtype=NATIVE_DTYPES, fn=fn)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    check_tensor(qweight, "qweight", dtype=torch.uint8, ndim=2, fn=fn)
    n = qweight.shape[0]
    if k <= 0 or k % 2 or qweight.shape[1] * 2 != k:
        raise ValueError(f"{fn}: qweight {tuple(qweight.shape)} does not pack in_features={k}")
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{fn}: group_size must be an int, got {type(group_size).__name__}")
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"{fn}: group_size={group_size} must be even and divide in_features={k}")
    groups = k // group_size
    check_tensor(scales, "scales", dtype=NATIVE_DTYPES, shape=(n, groups), fn=fn)
    if zeros is not None:
        check_tensor(zeros, "zeros", dtype=NATIVE_DTYPES, shape=(n, groups), fn=fn)
    if bias is not None:
        check_tensor(bias, "bias", dtype=NATIVE_DTYPES, shape=(n,), fn=fn)
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    x2, row_stride = rows_with_unit_stride(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    return Int4Call(
        x=x2,
        x_row_stride=row_stride,
        qweight=qweight.contiguous(),
        scales=scales.contiguous(),
        zeros=None if zeros is None else zeros.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        out=out,
        out_shape=(*x.shape[:-1], n),
        group_size=group_size,
    )


# ---- kv_attention ---------------------------------------------------------------------------

_KV_NAMES = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


def kv_attention_supported(device_type: str, q, k, k_scale, k_zero, v, v_scale, v_zero, scale) -> bool:
    """True if the tensors have the device and dtypes that a native kv_attention kernel takes
    (and ``scale`` is None or finite)."""
    tensors = [t for t in (q, k, k_scale, k_zero, v, v_scale, v_zero) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.device.type == device_type for t in tensors):
        return False
    if k.dtype not in (torch.int8, torch.uint8) or v.dtype != k.dtype:
        return False
    if scale is not None and not math.isfinite(scale):
        return False
    return all(t.dtype in DTYPE_CODES for t in (q, k_scale, k_zero, v_scale, v_zero) if t is not None)


def _unit_inner(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself if its last dimension has unit stride (any outer strides), else a contiguous copy."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride()[:3])


@dataclass
class KvAttentionCall:
    """The tensors of one native kv_attention call, kept alive until the kernel has run."""

    q: torch.Tensor  # [B, H_q, S_q, D], unit inner stride
    cache: dict[str, torch.Tensor | None]  # k, k_scale, k_zero, v, v_scale, v_zero; unit inner stride
    out: torch.Tensor  # [B, H_q, S_q, D], contiguous, q.dtype
    h_kv: int
    s_kv: int
    bits: int
    causal: bool
    scale: float

    def kwargs(self) -> dict:
        """Keyword arguments of ``lowbit._C.kv_attention_<device>`` (all but num_threads/stream)."""
        b, h_q, s_q, d = self.q.shape
        kw: dict = dict(q_ptr=self.q.data_ptr(), q_dtype=dtype_code(self.q.dtype), q_strides=_strides3(self.q))
        for name, t in self.cache.items():
            kw[f"{name}_ptr"] = 0 if t is None else t.data_ptr()
            kw[f"{name}_strides"] = _strides3(t)
            if name not in ("k", "v"):
                kw[f"{name}_dtype"] = DTYPE_CODES[self.q.dtype] if t is None else dtype_code(t.dtype)
        kw.update(
            out_ptr=self.out.data_ptr(),
            out_dtype=dtype_code(self.out.dtype),
            B=b,
            H_q=h_q,
            H_kv=self.h_kv,
            S_q=s_q,
            S_kv=self.s_kv,
            D=d,
            bits=self.bits,
            causal=self.causal,
            scale=self.scale,
        )
        return kw

    @property
    def empty(self) -> bool:
        """True if there is nothing to compute (B, H_q or S_q is 0): skip the native call."""
        return self.out.numel() == 0

    def result(self) -> torch.Tensor:
        return self.out


def prepare_kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale, fn: str) -> KvAttentionCall:
    """Check every shape against ``q`` and the cache (the op's own checks), that the dtypes are
    native ones, give each tensor a unit inner stride (views of ``lowbit.QuantizedKVCache``
    storage keep their outer strides: nothing is copied), and allocate the output."""
    from .. import _validate  # the op's argument checks: one source of truth for the shapes

    check_tensor(q, "q", dtype=NATIVE_DTYPES, ndim=4, fn=fn)
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        if t is not None:
            check_tensor(t, name, dtype=NATIVE_DTYPES, fn=fn)
    shape = _validate.kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    cache = {name: _unit_inner(t) for name, t in zip(_KV_NAMES, (k, k_scale, k_zero, v, v_scale, v_zero))}
    return KvAttentionCall(
        q=_unit_inner(q),
        cache=cache,
        out=torch.empty(shape, dtype=q.dtype, device=q.device),
        h_kv=k.shape[1],
        s_kv=k.shape[2],
        bits=8 if k.dtype == torch.int8 else 4,
        causal=bool(causal),
        scale=float(scale),
    )



#: Largest in_features of the native ternary kernels (kTernaryMaxK in csrc/common/ternary_matmul.h).
TERNARY_MAX_K = 1 << 22


def ternary_supported(device_type: str, x, qweight, weight_scale, bias) -> bool:
    """True if the tensors have the device, dtypes and sizes that a native ternary kernel takes."""
    for t in (x, qweight, weight_scale, bias):
        if t is not None and (not isinstance(t, torch.Tensor) or t.device.type != device_type):
            return False
    return (
        qweight.dtype == torch.uint8
        and weight_scale.dtype == torch.float32
        and x.dtype in DTYPE_CODES
        and (bias is None or bias.dtype in DTYPE_CODES)
        and x.dim() >= 1
        and x.shape[-1] <= TERNARY_MAX_K  # the int32 accumulator bound of csrc/common/ternary_matmul.h
    )


class TernaryCall:
    """The tensors of one native ternary_matmul call, kept alive until the kernel has run.

    ``args()`` are the positional arguments of ``lowbit._C.ternary_matmul_<device>`` but the
    last (num_threads / stream): a decode step is a few hundred microseconds of kernel, so
    this path stays thin (no dict, one pass of checks).
    """

    __slots__ = ("x", "x_row_stride", "qweight", "weight_scale", "bias", "out", "out_shape")

    def __init__(self, x, x_row_stride, qweight, weight_scale, bias, out, out_shape) -> None:
        self.x = x  # [M, K], unit inner stride
        self.x_row_stride = x_row_stride
        self.qweight = qweight  # [ceil(N/4), K] uint8, contiguous
        self.weight_scale = weight_scale  # [1] or [N] float32, contiguous
        self.bias = bias  # [N] or None, contiguous
        self.out = out  # [M, N], contiguous, x.dtype
        self.out_shape = out_shape

    def args(self) -> tuple[int, ...]:
        m, k = self.x.shape
        code_x = DTYPE_CODES[self.x.dtype]
        bias = self.bias
        return (
            self.x.data_ptr(),
            code_x,
            self.x_row_stride,
            self.qweight.data_ptr(),
            self.weight_scale.data_ptr(),
            self.weight_scale.shape[0],
            0 if bias is None else bias.data_ptr(),
            code_x if bias is None else DTYPE_CODES[bias.dtype],
            self.out.data_ptr(),
            code_x,
            m,
            self.out.shape[1],
            k,
        )

    def kwargs(self) -> dict[str, int]:
        """``args()`` by name (for tests and readers)."""
        names = ("x_ptr", "x_dtype", "x_row_stride", "qweight_ptr", "weight_scale_ptr", "weight_scale_numel",
                 "bias_ptr", "bias_dtype", "out_ptr", "out_dtype", "M", "N", "K")
        return dict(zip(names, self.args()))

    @property
    def empty(self) -> bool:
        """True if there is nothing to compute (M is 0): skip the native call."""
        return self.out.numel() == 0

    def result(self) -> torch.Tensor:
        """The output, shaped ``[..., N]`` like ``x``."""
        return self.out.view(self.out_shape)


def _ternary_fast_ok(x, qweight, weight_scale, out_features, bias) -> bool:
    """The common valid call, checked with plain attribute tests (no message building)."""
    if not (type(out_features) is int and out_features > 0 and isinstance(x, torch.Tensor) and x.dim() >= 1):
        return False
    k = x.shape[-1]
    n = out_features
    dev = x.device
    return (
        0 < k <= TERNARY_MAX_K
        and x.dtype in DTYPE_CODES
        and isinstance(qweight, torch.Tensor)
        and qweight.dtype == torch.uint8
        and qweight.shape == ((n + 3) // 4, k)
        and isinstance(weight_scale, torch.Tensor)
        and weight_scale.dtype == torch.float32
        and weight_scale.dim() == 1
        and weight_scale.shape[0] in (1, n)
        and qweight.device == dev
        and weight_scale.device == dev
        and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype in DTYPE_CODES
                              and bias.shape == (n,) and bias.device == dev))
    )


def _ternary_check(x, qweight, weight_scale, out_features, bias, fn: str) -> None:
    """Raise the TypeError/ValueError that names what is wrong with a call (the full checks,
    for the calls ``_ternary_fast_ok`` does not pass)."""
    check_tensor(x, "x", dtype=NATIVE_DTYPES, fn=fn)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    if isinstance(out_features, bool) or not isinstance(out_features, int):
        raise TypeError(f"{fn}: out_features must be an int, got {type(out_features).__name__}")
    n = out_features
    if n <= 0 or k <= 0:
        raise ValueError(f"{fn}: out_features={n} and in_features={k} must be positive")
    if k > TERNARY_MAX_K:
        raise ValueError(f"{fn}: in_features={k} exceeds the native kernel's limit {TERNARY_MAX_K}")
    check_tensor(qweight, "qweight", dtype=torch.uint8, shape=(-(-n // 4), k), fn=fn)
    check_tensor(weight_scale, "weight_scale", dtype=torch.float32, ndim=1, fn=fn)
    if weight_scale.shape[0] not in (1, n):
        raise ValueError(f"{fn}: weight_scale must have 1 or out_features={n} entries, got {weight_scale.shape[0]}")
    if bias is not None:
        check_tensor(bias, "bias", dtype=NATIVE_DTYPES, shape=(n,), fn=fn)
    for name, t in (("qweight", qweight), ("weight_scale", weight_scale), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")


def prepare_ternary(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    fn: str,
) -> TernaryCall:
    """Check every buffer size against ``x``'s K and ``out_features``, make the weight tensors
    contiguous and ``x``'s rows unit-stride, and allocate the output."""
    if not _ternary_fast_ok(x, qweight, weight_scale, out_features, bias):
        _ternary_check(x, qweight, weight_scale, out_features, bias, fn)
    k = x.shape[-1]
    if x.dim() == 2 and x.stride(1) == 1 and (x.shape[0] <= 1 or x.stride(0) >= k):
        x2, row_stride = x, (x.stride(0) if x.shape[0] > 1 else k)
    else:
        x2, row_stride = rows_with_unit_stride(x)
    out = torch.empty((x2.shape[0], int(out_features)), dtype=x.dtype, device=x.device)
    return TernaryCall(
        x2,
        row_stride,
        qweight if qweight.is_contiguous() else qweight.contiguous(),
        weight_scale if weight_scale.is_contiguous() else weight_scale.contiguous(),
        bias if bias is None or bias.is_contiguous() else bias.contiguous(),
        out,
        (*x.shape[:-1], int(out_features)),
    )


def sparse24_supported(device_type: str, x, values, meta, bias) -> bool:
    """True if the tensors have the device and dtypes that a native sparse24 kernel takes."""
    tensors = [t for t in (x, values, meta, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.device.type == device_type for t in tensors):
        return False
    if meta.dtype != torch.uint8:
        return False
    return all(t.dtype in DTYPE_CODES for t in (x, values, bias) if t is not None)


@dataclass
class Sparse24Call:
    """The tensors of one native sparse24_matmul call, kept alive until the kernel has run."""

    x: torch.Tensor  # [M, K], unit inner stride
    x_row_stride: int
    values: torch.Tensor  # [N, K/2], contiguous
    meta: torch.Tensor  # [N, K/8] uint8, contiguous
    bias: torch.Tensor | None
    out: torch.Tensor  # [M, N], contiguous, x.dtype
    out_shape: tuple[int, ...]

    def kwargs(self) -> dict[str, int]:
        """Keyword arguments of ``lowbit._C.sparse24_matmul_<device>`` (all but num_threads/stream)."""
        m, k = self.x.shape
        code_x = dtype_code(self.x.dtype)
        return dict(
            x_ptr=self.x.data_ptr(),
            x_dtype=code_x,
            x_row_stride=self.x_row_stride,
            values_ptr=self.values.data_ptr(),
            values_dtype=dtype_code(self.values.dtype),
            meta_ptr=self.meta.data_ptr(),
            bias_ptr=0 if self.bias is None else self.bias.data_ptr(),
            bias_dtype=code_x if self.bias is None else dtype_code(self.bias.dtype),
            out_ptr=self.out.data_ptr(),
            out_dtype=dtype_code(self.out.dtype),
            M=m,
            N=self.out.shape[1],
            K=k,
        )

    @property
    def empty(self) -> bool:
        """True if there is nothing to compute (M or N is 0): skip the native call."""
        return self.out.numel() == 0

    def result(self) -> torch.Tensor:
        """The output, shaped ``[..., N]`` like ``x``."""
        return self.out.view(self.out_shape)


def prepare_sparse24(
    x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: torch.Tensor | None, fn: str
) -> Sparse24Call:
    """Check every buffer size against ``x``'s K and ``values``' N, make the weight tensors
    contiguous and ``x``'s rows unit-stride, and allocate the output."""
    check_tensor(x, "x", dtype=NATIVE_DTYPES, fn=fn)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    check_tensor(values, "values", dtype=NATIVE_DTYPES, ndim=2, fn=fn)
    n = values.shape[0]
    if k <= 0 or k % 8 or values.shape[1] * 2 != k:
        raise ValueError(
            f"{fn}: values {tuple(values.shape)} do not hold in_features={k} (K must be a positive multiple of 8)"
        )
    check_tensor(meta, "meta", dtype=torch.uint8, shape=(n, k // 8), fn=fn)
    if bias is not None:
        check_tensor(bias, "bias", dtype=NATIVE_DTYPES, shape=(n,), fn=fn)
    for name, t in (("values", values), ("meta", meta), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    x2, row_stride = rows_with_unit_stride(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    return Sparse24Call(
        x=x2,
        x_row_stride=row_stride,
        values=values.contiguous(),
        meta=meta.contiguous(),
        bias=None if bias is None else bias.contiguous(),
        out=out,
        out_shape=(*x.shape[:-1], n),
    )


# ---- nf4_matmul ------------------------------------------------------------------------------


def nf4_supported(device_type: str, x, qweight, absmax, absmax_scale, absmax_code, bias) -> bool:
    """True if the tensors have the device and dtypes that a native nf4 kernel takes."""
    tensors = [t for t in (x, qweight, absmax, absmax_scale, absmax_code, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.device.type == device_type for t in tensors):
        return False
    if qweight.dtype != torch.uint8 or x.dtype not in DTYPE_CODES:
        return False
    if bias is not None and bias.dtype not in DTYPE_CODES:
        return False
    if absmax_scale is None:
        return absmax.dtype == torch.float32 and absmax_code is None
    return (absmax.dtype == torch.uint8 and absmax_code is not None
            and absmax_scale.dtype == torch.float32 and absmax_code.dtype == torch.float32)


@dataclass
class Nf4Call:
    """The tensors of one native nf4_matmul call, kept alive until the kernel has run."""

    x: torch.Tensor  # [M, K], unit inner stride
    x_row_stride: int
    qweight: torch.Tensor  # [ceil(N*K/2)] uint8, contiguous
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_code: torch.Tensor | None
    absmax_offset: float
    blocksize: int
    bias: torch.Tensor | None
    out: torch.Tensor  # [M, N], contiguous, x.dtype
    out_shape: tuple[int, ...]

    def kwargs(self) -> dict:
        """Keyword arguments of ``lowbit._C.nf4_matmul_<device>`` (all but num_threads/stream)."""
        m, k = self.x.shape
        code_x = dtype_code(self.x.dtype)
        return dict(
            x_ptr=self.x.data_ptr(),
            x_dtype=code_x,
            x_row_stride=self.x_row_stride,
            qweight_ptr=self.qweight.data_ptr(),
            absmax_ptr=self.absmax.data_ptr(),
            absmax_scale_ptr=0 if self.absmax_scale is None else self.absmax_scale.data_ptr(),
            absmax_code_ptr=0 if self.absmax_code is None else self.absmax_code.data_ptr(),
            absmax_offset=self.absmax_offset,
            bias_ptr=0 if self.bias is None else self.bias.data_ptr(),
            bias_dtype=code_x if self.bias is None else dtype_code(self.bias.dtype),
            out_ptr=self.out.data_ptr(),
            out_dtype=dtype_code(self.out.dtype),
            M=m,
            N=self.out.shape[1],
            K=k,
            blocksize=self.blocksize,
        )

    @property
    def empty(self) -> bool:
        """True if there is nothing to compute (M is 0): skip the native call."""
        return self.out.numel() == 0

    def result(self) -> torch.Tensor:
        """The output, shaped ``[..., N]`` like ``x``."""
        return self.out.view(self.out_shape)


def prepare_nf4(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    absmax_offset: float,
    blocksize: int,
    out_features: int,
    bias: torch.Tensor | None,
    fn: str,
) -> Nf4Call:
    """Check every buffer size against ``x``'s K and ``out_features``, make the weight tensors
    contiguous and ``x``'s rows unit-stride, and allocate the output."""
    check_tensor(x, "x", dtype=NATIVE_DTYPES, fn=fn)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension, got shape {tuple(x.shape)}")
    k = x.shape[-1]
    for name, v in (("blocksize", blocksize), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{fn}: blocksize={blocksize} must be a power of two in 32..4096")
    if out_features <= 0 or k <= 0:
        raise ValueError(f"{fn}: out_features={out_features} and in_features={k} must be positive")
    n = out_features
    numel = n * k
    check_tensor(qweight, "qweight", dtype=torch.uint8, fn=fn)
    if qweight.numel() != (numel + 1) // 2:
        raise ValueError(f"{fn}: qweight has {qweight.numel()} bytes, a [{n}, {k}] weight needs {(numel + 1) // 2}")
    nblocks = -(-numel // blocksize)
    if (absmax_scale is None) != (absmax_code is None):
        raise ValueError(f"{fn}: absmax_scale and absmax_code go together (double quantization), "
                         f"got absmax_scale={absmax_scale is not None}, absmax_code={absmax_code is not None}")
    if absmax_scale is None:
        check_tensor(absmax, "absmax", dtype=torch.float32, shape=(nblocks,), fn=fn)
        if float(absmax_offset) != 0.0:
            raise ValueError(f"{fn}: absmax_offset={absmax_offset} must be 0.0 without double quantization")
    else:
        check_tensor(absmax, "absmax", dtype=torch.uint8, shape=(nblocks,), fn=fn)
        check_tensor(absmax_scale, "absmax_scale", dtype=torch.float32, shape=(-(-nblocks // 256),), fn=fn)
        check_tensor(absmax_code, "absmax_code", dtype=torch.float32, shape=(256,), fn=fn)
    if bias is not None:
        check_tensor(bias, "bias", dtype=NATIVE_DTYPES, shape=(n,), fn=fn)
    for name, t in (("qweight", qweight), ("absmax", absmax), ("absmax_scale", absmax_scale),
                    ("absmax_code", absmax_code), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but x is on {x.device}")
    x2, row_stride = rows_with_unit_stride(x)
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    return Nf4Call(
        x=x2,
        x_row_stride=row_stride,
        qweight=qweight.contiguous().reshape(-1),
        absmax=absmax.contiguous(),
        absmax_scale=None if absmax_scale is None else absmax_scale.contiguous(),
        absmax_code=None if absmax_code is None else absmax_code.contiguous(),
        absmax_offset=float(absmax_offset),
        blocksize=blocksize,
        bias=None if bias is None else bias.contiguous(),
        out=out,
        out_shape=(*x.shape[:-1], n),
    )
