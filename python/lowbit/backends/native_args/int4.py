"""``int4_matmul``: tensors -> the native kernel's arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._checks import check_tensor
from ..._validate import int4_fast_ok
from ._common import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    NativeCall,
    float_dtypes,
    on_device,
    opt_ptr,
    rows_with_unit_stride,
)


def int4_supported(device_type: str, x, qweight, scales, zeros, bias) -> bool:
    """True if the tensors have the device and dtypes that a native int4 kernel takes."""
    return (on_device(device_type, x, qweight, scales, zeros, bias) and qweight.dtype == torch.uint8
            and float_dtypes(x, scales, zeros, bias))


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

    ARG_NAMES = ("x_ptr", "x_dtype", "x_row_stride", "qweight_ptr", "scales_ptr", "scales_dtype", "zeros_ptr",
                 "zeros_dtype", "bias_ptr", "bias_dtype", "out_ptr", "out_dtype", "M", "N", "K", "group_size")

    def args(self) -> tuple:
        m, k = self.x.shape
        code_x = DTYPE_CODES[self.x.dtype]
        zeros, bias = self.zeros, self.bias
        return (
            self.x.data_ptr(), code_x, self.x_row_stride, self.qweight.data_ptr(),
            self.scales.data_ptr(), DTYPE_CODES[self.scales.dtype],
            opt_ptr(zeros), code_x if zeros is None else DTYPE_CODES[zeros.dtype],
            opt_ptr(bias), code_x if bias is None else DTYPE_CODES[bias.dtype],
            self.out.data_ptr(), code_x, m, self.out.shape[1], k, self.group_size,
        )


def _int4_check(x, qweight, scales, zeros, group_size, bias, fn: str) -> None:
    """Raise the TypeError/ValueError that names what is wrong with a call (the full checks,
    for the calls ``int4_fast_ok`` does not pass)."""
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
    if not int4_fast_ok(x, qweight, scales, zeros, group_size, bias):
        _int4_check(x, qweight, scales, zeros, group_size, bias, fn)
    n = qweight.shape[0]
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
