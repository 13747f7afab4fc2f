"""Triton backend: runs ops with the kernels of ``lowbit.kernels_triton``.

Importing this module raises ImportError when Triton is missing (or fails to import), so the
dispatcher (``lowbit.backends``) sees no Triton backend and falls through to the reference.

Where it runs (:func:`available`): CUDA tensors (NVIDIA, and AMD GPUs under ROCm, which torch
also calls "cuda") and Intel ``xpu`` tensors, whenever Triton is importable; CPU tensors never
in normal use - only under Triton's interpreter (``TRITON_INTERPRET=1``) with
``LOWBIT_BACKEND=triton`` forcing it, which is how the CPU tests run the kernels.

Arguments arrive validated by :mod:`lowbit.ops` (dtypes, shapes, devices); each kernel module
chooses its path and block sizes per shape (timed once, then cached - see
``lowbit.kernels_triton._common``).
"""

from __future__ import annotations

import torch

try:
    from ..kernels_triton import INTERPRET
    from ..kernels_triton import int4 as _int4
    from ..kernels_triton import kv_attention as _kv
    from ..kernels_triton import nf4 as _nf4
    from ..kernels_triton import sparse24 as _sparse24
    from ..kernels_triton import ternary as _ternary
except ImportError as e:
    raise ImportError(f"lowbit.backends.triton: Triton is not available ({e})") from e
except Exception as e:  # a broken Triton install must not break `import lowbit`
    raise ImportError(f"lowbit.backends.triton: Triton failed to import ({type(e).__name__}: {e})") from e

from . import forced_backend

_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


_GPU_AVAILABLE: dict[str, bool] = {}


def available(device_type: str) -> bool:
    """Whether Triton kernels run on tensors of ``device_type`` here (see the module docstring)."""
    if device_type == "cpu":
        return INTERPRET and forced_backend() == "triton"
    if INTERPRET:  # the interpreter would run GPU tensors on the host: not a GPU backend then
        return False
    ok = _GPU_AVAILABLE.get(device_type)  # asked on every dispatch: answer once
    if ok is None:
        if device_type == "cuda":
            ok = torch.cuda.is_available()
        elif device_type == "xpu":
            xpu = getattr(torch, "xpu", None)
            ok = xpu is not None and xpu.is_available()
        else:
            ok = False
        _GPU_AVAILABLE[device_type] = ok
    return ok


def _float(*ts) -> bool:
    return all(t is None or t.dtype in _FLOAT for t in ts)


def supports_int4_matmul(x, qweight, scales, zeros, group_size, bias=None) -> bool:
    return _float(x, scales, zeros, bias)


def int4_matmul(x, qweight, scales, zeros, group_size, bias=None):
    return _int4.int4_matmul(x, qweight, scales, zeros, group_size, bias)


def supports_nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features,
                        bias=None) -> bool:
    return _float(x, bias)


def nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features, bias=None):
    return _nf4.nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features,
                           bias)


def supports_ternary_matmul(x, qweight, weight_scale, out_features, bias=None) -> bool:
    return _float(x, bias)


def ternary_matmul(x, qweight, weight_scale, out_features, bias=None):
    return _ternary.ternary_matmul(x, qweight, weight_scale, out_features, bias)


def supports_sparse24_matmul(x, values, meta, bias=None) -> bool:
    return _float(x, values, bias)


def sparse24_matmul(x, values, meta, bias=None):
    return _sparse24.sparse24_matmul(x, values, meta, bias)


def supports_kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal=False, scale=None) -> bool:
    return _float(q, k_scale, k_zero, v_scale, v_zero)


def kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal=False, scale=None):
    return _kv.kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale)
