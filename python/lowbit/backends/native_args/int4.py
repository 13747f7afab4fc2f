"""``int4_matmul``: tensors -> the native kernel's arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._checks import check_tensor
from ._common import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    NativeCall,
    dtype_code,
    opt_code,
    opt_ptr,
    rows_with_unit_stride,
)


def int4_supported(device_type: str, x, qweight, scales, zeros, bias) -> bool:
    """True if the tensors have the device and dtypes that a native int4 kernel takes."""
    tensors = [t for t in (x, qweight, scales, zeros, bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) and t.device.type == device_type for t in tensors):
        return False
    if qweight.dtype != torch.uint8:
        return False
    return all(t.dtype in DTYPE_CODES for t in (x, scales, zeros, bias) if t is not None)


@dataclass
class Int4Call(NativeCall):
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
            bias_ptr=opt_ptr(self.bias),
            bias_dtype=opt_code(self.bias, code_x),
            out_ptr=self.out.data_ptr(),
            out_dtype=dtype_code(self.out.dtype),
            M=m,
            N=self.out.shape[1],
            K=k,
            group_size=self.group_size,
        )


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
