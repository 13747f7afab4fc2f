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
