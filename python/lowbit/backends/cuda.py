"""Native CUDA backend: runs ops with the CUDA kernels of ``lowbit._C``.

Importing this module raises ImportError when the native module did not load or was built
without CUDA, so the dispatcher (``lowbit.backends``) sees no native CUDA backend.
Kernels are enqueued on torch's current stream of the tensors' device; nothing syncs.
"""

from __future__ import annotations

import torch

from .. import _native
from .native_args import int4_supported, prepare_int4

if not _native.has("int4_matmul_cuda"):
    reason = _native.load_error() or "this build of lowbit._C has no CUDA kernels (built without nvcc?)"
    raise ImportError(f"lowbit.backends.cuda: {reason}")


def supports_int4_matmul(x, qweight, scales, zeros, group_size, bias=None) -> bool:
    """True if the native CUDA kernel takes this call (CUDA tensors, float16/bfloat16/float32)."""
    return int4_supported("cuda", x, qweight, scales, zeros, bias)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T (+ bias)`` with the CUDA kernel, on the current stream."""
    call = prepare_int4(x, qweight, scales, zeros, group_size, bias, fn="lowbit.backends.cuda.int4_matmul")
    if not call.empty:
        stream = torch.cuda.current_stream(x.device).cuda_stream
        _native.C.int4_matmul_cuda(**call.kwargs(), stream=stream)
    return call.result()
