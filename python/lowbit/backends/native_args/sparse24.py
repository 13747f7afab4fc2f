"""``sparse24_matmul``: tensors -> the native kernel's arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._checks import check_tensor
from ._common import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    NativeCall,
    float_dtypes,
    on_device,
    opt_code,
    opt_ptr,
    rows_with_unit_stride,
)


def sparse24_supported(device_type: str, x, values, meta, bias) -> bool:
    """True if the tensors have the device and dtypes that a native sparse24 kernel takes."""
    return on_device(device_type, x, values, meta, bias) and meta.dtype == torch.uint8 and float_dtypes(x, values, bias)


@dataclass
class Sparse24Call(NativeCall):
    """The tensors of one native sparse24_matmul call, kept alive until the kernel has run."""

    x: torch.Tensor  # [M, K], unit inner stride
    x_row_stride: int
    values: torch.Tensor  # [N, K/2], contiguous
    meta: torch.Tensor  # [N, K/8] uint8, contiguous
    bias: torch.Tensor | None
    out: torch.Tensor  # [M, N], contiguous, x.dtype
    out_shape: tuple[int, ...]

    ARG_NAMES = ("x_ptr", "x_dtype", "x_row_stride", "values_ptr", "values_dtype", "meta_ptr", "bias_ptr",
                 "bias_dtype", "out_ptr", "out_dtype", "M", "N", "K")

    def args(self) -> tuple:
        m, k = self.x.shape
        code_x = DTYPE_CODES[self.x.dtype]
        return (
            self.x.data_ptr(), code_x, self.x_row_stride, self.values.data_ptr(), DTYPE_CODES[self.values.dtype],
            self.meta.data_ptr(), opt_ptr(self.bias), opt_code(self.bias, code_x), self.out.data_ptr(), code_x,
            m, self.out.shape[1], k,
        )

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
