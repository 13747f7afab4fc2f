"""Shared by every op's argument preparation: dtype codes and stride normalisation."""

from __future__ import annotations

import torch

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NATIVE_DTYPES: tuple[torch.dtype, ...] = tuple(DTYPE_CODES)


def dtype_code(dtype: torch.dtype) -> int:
    """The native dtype code of a float dtype (TypeError for any other dtype)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"lowbit native kernels take float32, float16 or bfloat16, got {dtype}") from None


def on_device(device_type: str, *tensors: object) -> bool:
    """True if every argument but the Nones is a tensor on ``device_type`` (a plain loop: this
    runs at every call, where a generator costs more than the test)."""
    for t in tensors:
        if t is not None and (not isinstance(t, torch.Tensor) or t.device.type != device_type):
            return False
    return True


def float_dtypes(*tensors: torch.Tensor | None) -> bool:
    """True if every argument but the Nones has a dtype the native kernels take."""
    for t in tensors:
        if t is not None and t.dtype not in DTYPE_CODES:
            return False
    return True


def rows_with_unit_stride(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x`` viewed as ``[M, K]`` with unit inner stride and its row stride in elements
    (copies only if no such view exists)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if x2.stride(1) != 1 or (m > 1 and x2.stride(0) < k):
        x2 = x2.contiguous()
    return x2, (x2.stride(0) if m > 1 else k)


def unit_inner(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself if its last dimension has unit stride (any outer strides), else a contiguous copy."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def opt_ptr(t: torch.Tensor | None) -> int:
    """The address of an optional tensor (0 for None)."""
    return 0 if t is None else t.data_ptr()


def opt_code(t: torch.Tensor | None, default: int) -> int:
    """The dtype code of an optional tensor (``default`` for None)."""
    return default if t is None else dtype_code(t.dtype)


class NativeCall:
    """Base of the per-op call records: their output, and whether there is anything to compute.

    A record's ``args()`` are the positional arguments of its ``lowbit._C`` function but the
    last (num_threads / stream): pybind11 parses positional arguments much faster than keywords,
    and a decode-step call is a few hundred microseconds; ``kwargs()`` names them (``ARG_NAMES``).
    """

    __slots__ = ()
    ARG_NAMES: tuple[str, ...] = ()
    out: torch.Tensor  # [M, N] (or the op's output), contiguous
    out_shape: tuple[int, ...]

    def kwargs(self) -> dict:
        """``args()`` (defined by each record) by name, for tests and readers."""
        return dict(zip(self.ARG_NAMES, self.args()))  # type: ignore[attr-defined]

    @property
    def empty(self) -> bool:
        """True if the output is empty (nothing to compute): skip the native call."""
        return self.out.numel() == 0

    def result(self) -> torch.Tensor:
        """The output, shaped ``[..., N]`` like ``x``."""
        return self.out.view(self.out_shape)
