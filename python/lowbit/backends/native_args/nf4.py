"""``nf4_matmul``: tensors -> the native kernel's arguments."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._checks import check_tensor
from ..._validate import nf4_fast_ok
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


def nf4_supported(device_type: str, x, qweight, absmax, absmax_scale, absmax_code, bias) -> bool:
    """True if the tensors have the device and dtypes that a native nf4 kernel takes."""
    if not on_device(device_type, x, qweight, absmax, absmax_scale, absmax_code, bias):
        return False
    if qweight.dtype != torch.uint8 or not float_dtypes(x, bias):
        return False
    if absmax_scale is None:
        return absmax.dtype == torch.float32 and absmax_code is None
    return (absmax.dtype == torch.uint8 and absmax_code is not None
            and absmax_scale.dtype == torch.float32 and absmax_code.dtype == torch.float32)


@dataclass
class Nf4Call(NativeCall):
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

    ARG_NAMES = ("x_ptr", "x_dtype", "x_row_stride", "qweight_ptr", "absmax_ptr", "absmax_scale_ptr",
                 "absmax_code_ptr", "absmax_offset", "bias_ptr", "bias_dtype", "out_ptr", "out_dtype", "M", "N", "K",
                 "blocksize")

    def args(self) -> tuple:
        m, k = self.x.shape
        code_x = DTYPE_CODES[self.x.dtype]
        return (
            self.x.data_ptr(), code_x, self.x_row_stride, self.qweight.data_ptr(), self.absmax.data_ptr(),
            opt_ptr(self.absmax_scale), opt_ptr(self.absmax_code), self.absmax_offset,
            opt_ptr(self.bias), opt_code(self.bias, code_x), self.out.data_ptr(), code_x,
            m, self.out.shape[1], k, self.blocksize,
        )

def _nf4_check(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features, bias,
               fn: str) -> None:
    """Raise the TypeError/ValueError that names what is wrong with a call (the full checks,
    for the calls ``nf4_fast_ok`` does not pass)."""
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
    if not (nf4_fast_ok(x, qweight, absmax, absmax_scale, absmax_code, blocksize, out_features, bias)
            and (absmax_scale is not None or float(absmax_offset) == 0.0)):
        _nf4_check(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features, bias, fn)
    n = out_features
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
