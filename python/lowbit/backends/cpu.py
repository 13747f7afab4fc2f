"""Native CPU backend: runs ops with the C++ kernels of ``lowbit._C``.

Importing this module raises ImportError when the native module did not load, so the
dispatcher (``lowbit.backends``) sees no native CPU backend and falls back.
"""

from __future__ import annotations

import torch

from .. import _native
from .native_args import (
    int4_supported,
    kv_attention_supported,
    nf4_supported,
    prepare_int4,
    prepare_kv_attention,
    prepare_nf4,
    prepare_sparse24,
    prepare_ternary,
    sparse24_supported,
    ternary_supported,
)

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
        _native.C.int4_matmul_cpu(*call.args(), max(1, torch.get_num_threads()))
    return call.result()


def supports_kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal=False, scale=None) -> bool:
    """True if the native CPU kernel takes this call (CPU tensors, float16/bfloat16/float32, finite scale)."""
    return _native.has("kv_attention_cpu") and kv_attention_supported(
        "cpu", q, k, k_scale, k_zero, v, v_scale, v_zero, scale
    )


def kv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor,
    k_zero: torch.Tensor | None,
    v: torch.Tensor,
    v_scale: torch.Tensor,
    v_zero: torch.Tensor | None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention over an int8 / 4-bit KV cache with the C++ kernel, on torch's intra-op thread count."""
    call = prepare_kv_attention(
        q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale, fn="lowbit.backends.cpu.kv_attention"
    )
    if not call.empty:
        _native.C.kv_attention_cpu(**call.kwargs(), num_threads=max(1, torch.get_num_threads()))
    return call.result()


def supports_ternary_matmul(x, qweight, weight_scale, out_features, bias=None) -> bool:
    """True if the native CPU kernel takes this call (CPU tensors, float16/bfloat16/float32 x)."""
    return _native.has("ternary_matmul_cpu") and ternary_supported("cpu", x, qweight, weight_scale, bias)


def ternary_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """BitNet b1.58 ``x_q @ w_t^T / (x_scale * weight_scale) (+ bias)`` with the C++ kernel
    (activation quantization fused), on torch's intra-op thread count."""
    call = prepare_ternary(x, qweight, weight_scale, out_features, bias, fn="lowbit.backends.cpu.ternary_matmul")
    if not call.empty:
        _native.C.ternary_matmul_cpu(*call.args(), max(1, torch.get_num_threads()))
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
        _native.C.sparse24_matmul_cpu(*call.args(), max(1, torch.get_num_threads()))
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
        _native.C.nf4_matmul_cpu(*call.args(), max(1, torch.get_num_threads()))
    return call.result()
