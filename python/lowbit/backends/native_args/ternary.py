"""``ternary_matmul``: tensors -> the native kernel's arguments."""

from __future__ import annotations

import torch

from ..._checks import check_tensor
from ..._validate import ternary_fast_ok
from ._common import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    NativeCall,
    float_dtypes,
    on_device,
    rows_with_unit_stride,
)

#: Largest in_features of the native ternary kernels (kTernaryMaxK in csrc/common/ternary_matmul.h).
TERNARY_MAX_K = 1 << 22


def ternary_supported(device_type: str, x, qweight, weight_scale, bias) -> bool:
    """True if the tensors have the device, dtypes and sizes that a native ternary kernel takes."""
    return (
        on_device(device_type, x, qweight, weight_scale, bias)
        and qweight.dtype == torch.uint8
        and weight_scale.dtype == torch.float32
        and float_dtypes(x, bias)
        and x.dim() >= 1
        and x.shape[-1] <= TERNARY_MAX_K  # the int32 accumulator bound of csrc/common/ternary_matmul.h
    )


class TernaryCall(NativeCall):
    """The tensors of one native ternary_matmul call, kept alive until the kernel has run.

    This path stays thin (positional arguments, one pass of plain checks): see ``NativeCall``.
    """

    __slots__ = ("x", "x_row_stride", "qweight", "weight_scale", "bias", "out", "out_shape")
    ARG_NAMES = ("x_ptr", "x_dtype", "x_row_stride", "qweight_ptr", "weight_scale_ptr", "weight_scale_numel",
                 "bias_ptr", "bias_dtype", "out_ptr", "out_dtype", "M", "N", "K")

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



def _ternary_check(x, qweight, weight_scale, out_features, bias, fn: str) -> None:
    """Raise the TypeError/ValueError that names what is wrong with a call (the full checks,
    for the calls ``ternary_fast_ok`` does not pass)."""
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
    if not (ternary_fast_ok(x, qweight, weight_scale, out_features, bias) and x.shape[-1] <= TERNARY_MAX_K):
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
