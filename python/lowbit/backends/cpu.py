"""Native CPU backend: runs ops with the C++ kernels of ``lowbit._C``.

Importing this module raises ImportError when the native module did not load, so the
dispatcher (``lowbit.backends``) sees no native CPU backend and falls back.
"""

from __future__ import annotations

import torch

from .. import _native
from .native_args import int4_supported, prepare_int4
from .native_args import prepare_sparse24, sparse24_supported

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


def supports_sparse24_matmul(x, values, meta, bias=None) -> bool:
    """True if the native CPU kernel takes this call (CPU tensors, float16/bfloat16/float32)."""
    return _native.has("sparse24_matmul_cpu") and sparse24_supported("cpu", x, values, meta, bias)


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W^T (+ bias)`` for a 2:4 sparse ``W`` with the C++ kernel, on torch's intra-op thread count."""
    call = prepare_sparse24(x, values, meta, bias, fn="lowbit.backends.cpu.sparse24_matmul")
    if not call.empty:
        _native.C.sparse24_matmul_cpu(**call.kwargs(), num_threads=max(1, torch.get_num_threads()))
    return call.result()
