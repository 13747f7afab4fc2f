"""Native CPU backend: runs ops with the C++ kernels of ``lowbit._C``.

Importing this module raises ImportError when the native module did not load, so the
dispatcher (``lowbit.backends``) sees no native CPU backend and falls back.
"""

from __future__ import annotations

import torch

from .. import _native
from .native_args import int4_supported, nf4_supported, prepare_int4, prepare_nf4

if not _native.has("int4_matmul_cpu"):
    raise ImportError(f"lowbit.backends.cpu: the native module is not available ({_native.load_error()})")


def supports_int4_matmul(x, qweight, scales, zeros, group_size, bias=None) -> bool:
    """True if the native CPU kernel takes this call (CPU tensors, float16/bfloat16/float32)."""
    return int4_supported("cpu", x, qweight, scales, zeros, bias)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T (+ bias)`` with the C++ kernel, on torch's intra-op thread count."""
    call = prepare_int4(x, qweight, scales, zeros, group_size, bias, fn="lowbit.backends.cpu.int4_matmul")
    if not call.empty:
        _native.C.int4_matmul_cpu(**call.kwargs(), num_threads=max(1, torch.get_num_threads()))
    return call.result()


def supports_nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features,
                        bias=None) -> bool:
    """True if the native CPU kernel takes this call (CPU tensors, float16/bfloat16/float32 x; every
    layout the nf4 format allows: any blocksize, double-quantized absmax, blocks across rows, odd K)."""
    return _native.has("nf4_matmul_cpu") and nf4_supported("cpu", x, qweight, absmax, absmax_scale, absmax_code, bias)


def nf4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    absmax_offset: float,
    blocksize: int,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T (+ bias)`` for a bitsandbytes-layout NF4 weight, with the C++ kernel."""
    call = prepare_nf4(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features, bias,
                       fn="lowbit.backends.cpu.nf4_matmul")
    if not call.empty:
        _native.C.nf4_matmul_cpu(**call.kwargs(), num_threads=max(1, torch.get_num_threads()))
    return call.result()
