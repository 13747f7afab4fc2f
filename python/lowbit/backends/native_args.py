"""Tensors -> the plain integers the native module takes (pointers, sizes, strides, dtype codes).

Shared by the native backends (cpu.py, cuda.py). The op layer has validated the call
already; these helpers still check every size that a pointer's buffer must have, because
the C++ side only sees addresses and cannot.
"""

from __future__ import annotations

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
