"""Argument validation shared by every layer: one wording for every error.

Each check raises ``TypeError`` for a wrong type or dtype and ``ValueError`` for a wrong
value, shape or device, and the message names the function, the argument and the value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


def _prefix(fn: str) -> str:
    return f"{fn}: " if fn else ""


def check_tensor(
    t: object,
    name: str,
    *,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    ndim: int | Sequence[int] | None = None,
    shape: Sequence[int | None] | None = None,
    fn: str = "",
) -> None:
    """Check that ``t`` is a tensor of an allowed dtype, rank and shape.

    ``shape`` entries that are ``None`` match any size. (The passing path builds no message:
    a decode step validates several tensors per op call.)
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{_prefix(fn)}{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype is not dtype and (isinstance(dtype, torch.dtype) or t.dtype not in dtype):
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{_prefix(fn)}{name} must have dtype {names}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None:
        nd = t.dim()
        if nd != ndim and (isinstance(ndim, int) or nd not in ndim):
            allowed_nd = (ndim,) if isinstance(ndim, int) else tuple(ndim)
            raise ValueError(
                f"{_prefix(fn)}{name} must have {' or '.join(map(str, allowed_nd))} dimensions, "
                f"got shape {tuple(t.shape)}"
            )
    if shape is not None:
        ts = t.shape
        ok = len(ts) == len(shape)
        if ok:
            for s, d in zip(shape, ts):
                if s is not None and s != d:
                    ok = False
                    break
        if not ok:
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{_prefix(fn)}{name} must have shape {want}, got {tuple(ts)}")


def check_finite(t: torch.Tensor, name: str, fn: str = "") -> None:
    """Raise ``ValueError`` if ``t`` holds NaN or Inf (used on weights, once, at quantize time)."""
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{_prefix(fn)}{name} contains NaN or Inf values")


def check_positive_int(v: object, name: str, fn: str = "") -> int:
    """Return ``v`` as an int if it is a positive integer, else raise."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{_prefix(fn)}{name} must be an int, got {type(v).__name__} {v!r}")
    if v <= 0:
        raise ValueError(f"{_prefix(fn)}{name} must be positive, got {v}")
    return v


def check_same_device(fn: str = "", **tensors: torch.Tensor | None) -> None:
    """Raise ``ValueError`` if the given (non-None) tensors live on different devices."""
    first = None
    for t in tensors.values():
        if t is not None:
            if first is None:
                first = t.device
            elif t.device != first:
                listing = ", ".join(f"{k} on {u.device}" for k, u in tensors.items() if u is not None)
                raise ValueError(f"{_prefix(fn)}all tensors must be on one device, got {listing}")


def check_not_empty(t: torch.Tensor, name: str, fn: str = "") -> None:
    """Raise ``ValueError`` if ``t`` has no elements (a weight must have some)."""
    if t.numel() == 0:
        raise ValueError(f"{_prefix(fn)}{name} is empty (shape {tuple(t.shape)})")


def check_linear_input(x: object, in_features: int, fn: str) -> None:
    """``x`` is a tensor whose last dimension is ``in_features`` (the input of a linear layer)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        got = "a scalar" if x.dim() == 0 else f"x.shape[-1]={x.shape[-1]}"
        raise ValueError(f"{fn}: input has {got} but in_features={in_features}")
