"""Native CUDA backend: runs ops with the CUDA kernels of ``lowbit._C``.

Importing this module raises ImportError when the native module did not load or was built
without CUDA, so the dispatcher (``lowbit.backends``) sees no native CUDA backend.
Kernels are enqueued on torch's current stream of the tensors' device; nothing syncs.

int4 and nf4 with float16/bfloat16 activations run the 4-bit tensor-core kernels
(csrc/cuda/w4_*.cu) on a repacked copy of the weight, made on first use and cached per
``qweight`` tensor (:mod:`lowbit.backends.w4_layout`). For ``M >= dense_min_m(device)`` rows
the weight is dequantized by a CUDA kernel into a dense temporary and multiplied by cuBLAS
(compute-bound sizes, where cuBLAS's tensor-core GEMM beats the mma.sync kernels); on Hopper
with an sm_90a build the fused warp-specialized wgmma kernel takes M up to 3071. float32 activations and int4
shapes outside the layout (K not a multiple of 32, odd group sizes) take the simple
warp-per-output int4 kernel; nf4 with K not a multiple of the block size is left to the
next backend.

Repacking runs torch ops on the current stream; under CUDA graph capture the first call of
a weight would be captured with it, so warm each weight up once before capturing (as CUDA
graphs need anyway).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .. import _native, _validate
from . import w4_layout
from .native_args import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    int4_supported,
    prepare_int4,
    rows_with_unit_stride,
)

if not _native.has("int4_matmul_cuda"):
    reason = _native.load_error() or "this build of lowbit._C has no CUDA kernels (built without nvcc?)"
    raise ImportError(f"lowbit.backends.cuda: {reason}")

_W4 = _native.has("w4_matmul_cuda")
_HALF = (torch.float16, torch.bfloat16)
#: Default number of rows from which the dense path (dequantize + cuBLAS) is used where the
#: fused large-M kernel cannot run (before Hopper, or a build without sm_90a): the mma.sync
#: kernel (64-token shared-memory tiles) wins at M=256 (H100, 28672x8192: 396 vs 500 us) and
#: loses at M=512 (~790 vs 628 us).
DENSE_MIN_M = 320
#: The same where the warp-specialized wgmma kernel runs (Hopper, sm_90a build): it beats
#: dequantize + cuBLAS up to M=2048 (H100, 28672x8192 int4: 1435 vs 1560 us) and loses from
#: M=4096 (3080 vs 2836 us).
DENSE_MIN_M_FUSED = 3072
_NEVER = 1 << 62
_fused_large_m: dict[int, bool] = {}


def dense_min_m(device: torch.device | int | None = None) -> int:
    """Rows of ``x`` from which int4/nf4 run dequantize + cuBLAS on ``device``:
    ``LOWBIT_CUDA_W4_DENSE_M`` if set (0 turns the dense path off), else where the
    fused kernels cover large M (Hopper, sm_90a build) :data:`DENSE_MIN_M_FUSED`, else
    :data:`DENSE_MIN_M`."""
    v = os.environ.get("LOWBIT_CUDA_W4_DENSE_M", "").strip()
    if v:
        m = int(v)
        return m if m > 0 else _NEVER
    if device is not None and _native.has("w4_fused_large_m_cuda"):
        idx = torch.device("cuda", device).index if isinstance(device, int) else device.index
        idx = torch.cuda.current_device() if idx is None else idx
        if idx not in _fused_large_m:
            _fused_large_m[idx] = bool(_native.C.w4_fused_large_m_cuda(device=idx))
        if _fused_large_m[idx]:
            return DENSE_MIN_M_FUSED
    return DENSE_MIN_M


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device: torch.device) -> int:
    """The cudaStream_t of torch's current stream on ``device`` (the private accessor skips
    building a Stream object: a few microseconds a call in eager decode)."""
    if _raw_stream is not None:
        return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
    return torch.cuda.current_stream(device).cuda_stream


def _w4_ready(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` as ``[M, K]`` rows with unit inner stride, 16-byte aligned rows (copies if not)."""
    x2, stride = rows_with_unit_stride(x)
    if x2.data_ptr() % 16 or (x2.shape[0] > 1 and stride % 8):
        x2 = x2.contiguous() if not x2.is_contiguous() else x2.clone()
        stride = x2.shape[1]
    return x2, stride


def _w4_matmul(x: torch.Tensor, packed: w4_layout.PackedW4, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T (+ bias)``; the caller has validated the shapes (x's K is the weight's)."""
    if x.shape[-1] != packed.k or (bias is not None and bias.shape != (packed.n,)):
        raise ValueError(f"lowbit.backends.cuda: x {tuple(x.shape)} / bias do not fit the weight [{packed.n}, {packed.k}]")
    out_shape = (*x.shape[:-1], packed.n)
    x2, stride = _w4_ready(x)
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(out_shape)
    stream = _stream(x.device)
    if m >= dense_min_m(x.device):
        w = torch.empty((packed.n, packed.k), dtype=x.dtype, device=x.device)
        _native.C.w4_dequant_cuda(
            fmt=packed.fmt, act_dtype=DTYPE_CODES[x.dtype], packed_w_ptr=packed.packed_w.data_ptr(),
            packed_s_ptr=packed.packed_s.data_ptr(), out_ptr=w.data_ptr(), N=packed.n, K=packed.k,
            n_pad=packed.n_pad, k_pad=packed.k_pad, group_size=packed.group_size, num_groups=packed.num_groups,
            stream=stream,
        )
        b = None if bias is None else bias.to(x.dtype)
        return torch.nn.functional.linear(x2, w, b).view(out_shape)
    out = torch.empty((m, packed.n), dtype=x.dtype, device=x.device)
    b = None if bias is None else bias.contiguous()
    # positional (the binding's order: fmt, x_ptr, x_dtype, x_row_stride, packed_w_ptr, packed_s_ptr,
    # bias_ptr, bias_dtype, out_ptr, M, N, K, n_pad, k_pad, group_size, num_groups, stream): pybind
    # matches 17 keywords by name at every call, which costs microseconds in eager decode
    _native.C.w4_matmul_cuda(
        packed.fmt, x2.data_ptr(), DTYPE_CODES[x.dtype], stride, packed.packed_w.data_ptr(),
        packed.packed_s.data_ptr(), 0 if b is None else b.data_ptr(),
        DTYPE_CODES[x.dtype] if b is None else DTYPE_CODES[b.dtype], out.data_ptr(), m, packed.n, packed.k,
        packed.n_pad, packed.k_pad, packed.group_size, packed.num_groups, stream,
    )
    return out.view(out_shape)


def _on_cuda(*tensors) -> bool:
    return all(t is None or (isinstance(t, torch.Tensor) and t.device.type == "cuda") for t in tensors)


# ---- int4 ---------------------------------------------------------------------------------


def supports_int4_matmul(x, qweight, scales, zeros, group_size, bias=None) -> bool:
    """True if a native CUDA kernel takes this call (CUDA tensors, float16/bfloat16/float32)."""
    return int4_supported("cuda", x, qweight, scales, zeros, bias)


def _w4_plan(x: torch.Tensor, packed: w4_layout.PackedW4, bias: torch.Tensor | None) -> Callable:
    """``x2 -> _w4_matmul(x2, packed, bias)`` for activations like ``x`` (device, dtype, K:
    :class:`lowbit.nn.Linear`'s plans check those): the weight side bound once in a native
    ``W4Plan``, so a call costs an output allocation and one positional native call. Rows the
    fused kernel does not take (the dense path; as ``dense_min_m`` says when the plan is made),
    empty inputs and unaligned views go through :func:`_w4_matmul`."""
    b = None if bias is None else bias.contiguous()
    kernel = _native.C.W4Plan(
        packed.fmt, DTYPE_CODES[x.dtype], packed.packed_w.data_ptr(), packed.packed_s.data_ptr(),
        0 if b is None else b.data_ptr(), DTYPE_CODES[x.dtype] if b is None else DTYPE_CODES[b.dtype],
        packed.n, packed.k, packed.n_pad, packed.k_pad, packed.group_size, packed.num_groups,
    )
    n, k, dtype, device = packed.n, packed.k, x.dtype, x.device
    dense_m = dense_min_m(device)
    index = device.index  # (a CUDA tensor's device always names its index)
    stream = _raw_stream if _raw_stream is not None else (lambda i: torch.cuda.current_stream(i).cuda_stream)
    empty = torch.empty

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        m, (rs, cs) = x2.shape[0], x2.stride()
        if not 0 < m < dense_m or cs != 1 or x2.data_ptr() % 16 or (m > 1 and (rs < k or rs % 8)):
            return _w4_matmul(x, packed, b)  # (keeps `packed` and `b`, whose pointers `kernel` holds, alive)
        out = empty((m, n), dtype=dtype, device=device)
        kernel(x2.data_ptr(), rs if m > 1 else k, m, out.data_ptr(), stream(index))
        return out if x2 is x else out.view(*x.shape[:-1], n)

    return run


def _int4_fast(x, qweight, group_size) -> bool:
    return _W4 and x.dtype in _HALF and w4_layout.layout_supports(qweight.shape[1] * 2, group_size)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T (+ bias)`` with the CUDA kernels, on the current stream."""
    fn = "lowbit.backends.cuda.int4_matmul"
    if _int4_fast(x, qweight, group_size):
        # The metadata checks run when the layout is (re)made; a cached copy was made from
        # these same tensors at their current versions, and x and bias are checked against it.
        validate = lambda: _validate.int4_matmul(x, qweight, scales, zeros, group_size, bias)  # noqa: E731
        packed = w4_layout.packed_int4(qweight, scales, zeros, group_size, x.dtype, check=validate)
        return _w4_matmul(x, packed, bias)
    call = prepare_int4(x, qweight, scales, zeros, group_size, bias, fn=fn)
    if not call.empty:
        stream = _stream(x.device)
        _native.C.int4_matmul_cuda(*call.args(), stream)
    return call.result()


def plan_int4_matmul(x, qweight, scales, zeros, group_size, bias=None):
    """``x -> int4_matmul(x, ...)`` straight to the 4-bit kernels on the cached layout (for
    lowbit.Linear's eager calls; the arguments have been validated by a full call), or None
    where another kernel would run."""
    if not _int4_fast(x, qweight, group_size):
        return None
    return _w4_plan(x, w4_layout.packed_int4(qweight, scales, zeros, group_size, x.dtype), bias)


# ---- nf4 ----------------------------------------------------------------------------------


def supports_nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features,
                        bias=None) -> bool:
    """True for CUDA tensors, float16/bfloat16 activations and ``blocksize`` dividing K
    (a multiple of 32): the layout of the 4-bit kernels."""
    if not (_W4 and isinstance(x, torch.Tensor) and x.dtype in _HALF):
        return False
    if not _on_cuda(x, qweight, absmax, absmax_scale, absmax_code, bias):
        return False
    if bias is not None and bias.dtype not in NATIVE_DTYPES:
        return False
    k = x.shape[-1]
    return k % blocksize == 0 and w4_layout.layout_supports(k, blocksize)


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
    """``x @ W^T (+ bias)`` for a bitsandbytes-layout NF4 weight, with the CUDA kernels."""
    def validate():
        _validate.nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features,
                             bias)

    shape = (out_features, x.shape[-1])
    packed = w4_layout.packed_nf4(qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, shape,
                                  x.dtype, check=validate)
    return _w4_matmul(x, packed, bias)


def plan_nf4_matmul(x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features,
                    bias=None):
    """As :func:`plan_int4_matmul`, for nf4 (the selection already checked the layout fits)."""
    packed = w4_layout.packed_nf4(qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize,
                                  (out_features, x.shape[-1]), x.dtype)
    return _w4_plan(x, packed, bias)
