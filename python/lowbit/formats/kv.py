"""Quantized KV cache: keys and values ``x [B, H, S, D]`` in 8 or 4 bits.

* ``bits=8``: symmetric, one scale per (batch, head, token): ``scale = absmax / 127``
  stored as float16 ``[B, H, S]``, ``data = clamp(round(x / scale), -127, 127)`` int8
  ``[B, H, S, D]``, ``zero`` None; ``x ~= data * scale``.
* ``bits=4``: asymmetric, groups of 32 along D (``D % 32 == 0``): ``mn = min(min(x), 0)``,
  ``mx = max(max(x), 0)``, ``scale = (mx - mn) / 15``, ``zero = clamp(round(-mn / scale), 0, 15)``,
  ``q = clamp(round(x / scale) + zero, 0, 15)``; ``data`` uint8 ``[B, H, S, D/2]`` (element 2j
  in the low nibble), ``scale`` and ``zero`` float16 ``[B, H, S, D/32]``; ``x ~= scale * (q - zero)``.
  The range is widened to include 0 so that the integer zero point in 0..15 is exact
  and every group (also one of all-positive values) is within ``scale / 2``.

The math is float32; ``q`` and ``zero`` are computed with the float16-rounded scale, so
``|x - dequantize| <= scale / 2`` up to the float16 rounding of the scale itself. A group
whose max is 0 gets scale 0 and codes 0 (decodes to exactly 0); a positive scale below
float16's range is stored as the smallest positive float16 (2^-24), not 0. Nothing here syncs with
the device: a NaN or Inf in ``x`` makes that group's scale NaN or Inf and its codes 0, so
the group dequantizes to NaN (``0 * NaN``, ``0 * Inf``), never to a finite wrong number.
"""

from __future__ import annotations

import torch

from .._checks import FLOAT_DTYPES, check_same_device, check_tensor

KV_BITS = (4, 8)
GROUP_SIZE_4BIT = 32


_HALF_TINY = 2.0**-24  # the smallest positive float16 (subnormal)


def _nonzero_half(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` as float16, where a positive scale that would round to 0 becomes the smallest
    positive float16 (its values still get codes instead of all decoding to 0)."""
    s16 = scale.to(torch.float16)
    return torch.where((s16 == 0) & (scale > 0), torch.tensor(_HALF_TINY, dtype=torch.float16, device=s16.device), s16)


def _check_bits(fn: str, bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{fn}: bits must be an int (4 or 8), got {type(bits).__name__} {bits!r}")
    if bits not in KV_BITS:
        raise ValueError(f"{fn}: bits must be 4 or 8, got {bits}")
    return bits


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize keys or values ``x [B, H, S, D]``; returns ``(data, scale, zero)`` (zero None for 8 bits)."""
    fn = "kv.quantize_kv"
    check_tensor(x, "x", dtype=FLOAT_DTYPES, ndim=4, fn=fn)
    bits = _check_bits(fn, bits)
    b, h, s, d = x.shape
    if d == 0:
        raise ValueError(f"{fn}: x must have head_dim D > 0, got shape {tuple(x.shape)}")
    xf = x.float()
    if bits == 8:
        absmax = xf.abs().amax(dim=-1)
        scale = _nonzero_half(absmax / 127)
        sf = scale.float().unsqueeze(-1)
        ok = torch.isfinite(sf) & (sf > 0)  # False for NaN, Inf and 0 scales
        q = torch.where(ok, (xf / sf).round().clamp(-127, 127), 0.0)
        return q.to(torch.int8), scale, None

    if d % GROUP_SIZE_4BIT:
        raise ValueError(f"{fn}: bits=4 needs head_dim D divisible by {GROUP_SIZE_4BIT}, got D={d}")
    g = xf.reshape(b, h, s, d // GROUP_SIZE_4BIT, GROUP_SIZE_4BIT)
    # amin/amax/clamp propagate NaN, so a NaN anywhere in a group reaches its scale.
    mn = g.amin(dim=-1).clamp(max=0.0)
    mx = g.amax(dim=-1).clamp(min=0.0)
    scale = _nonzero_half((mx - mn) / 15)
    sf = scale.float()
    ok = torch.isfinite(sf) & (sf > 0)
    zero = torch.where(ok, (-mn / sf).round().clamp(0, 15), 0.0)
    q = (g / sf.unsqueeze(-1)).round() + zero.unsqueeze(-1)
    q = torch.where(ok.unsqueeze(-1), q.clamp(0, 15), 0.0).to(torch.uint8)
    data = (q[..., 0::2] | (q[..., 1::2] << 4)).reshape(b, h, s, d // 2)
    return data, scale, zero.to(torch.float16)


def dequantize_kv(
    data: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode ``quantize_kv``'s output to ``[B, H, S, D]`` in ``dtype`` (int8 data: 8 bits, uint8: 4 bits)."""
    fn = "kv.dequantize_kv"
    check_tensor(data, "data", dtype=(torch.int8, torch.uint8), ndim=4, fn=fn)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be one of float16, bfloat16, float32, got {dtype}")
    b, h, s, w = data.shape
    if w == 0:
        raise ValueError(f"{fn}: data must have a last dimension > 0, got shape {tuple(data.shape)}")
    if data.dtype == torch.int8:
        if zero is not None:
            raise ValueError(
                f"{fn}: zero must be None for 8-bit (int8) data, got a tensor of shape {tuple(zero.shape)}"
            )
        check_tensor(scale, "scale", dtype=FLOAT_DTYPES, shape=(b, h, s), fn=fn)
        check_same_device(fn, data=data, scale=scale)
        return (data.float() * scale.float().unsqueeze(-1)).to(dtype)

    d = 2 * w
    if d % GROUP_SIZE_4BIT:
        raise ValueError(
            f"{fn}: 4-bit data {tuple(data.shape)} unpacks to D={d}, which is not divisible by {GROUP_SIZE_4BIT}"
        )
    groups = d // GROUP_SIZE_4BIT
    check_tensor(scale, "scale", dtype=FLOAT_DTYPES, shape=(b, h, s, groups), fn=fn)
    if zero is None:
        raise ValueError(f"{fn}: zero is required for 4-bit (uint8) data")
    check_tensor(zero, "zero", dtype=FLOAT_DTYPES, shape=(b, h, s, groups), fn=fn)
    check_same_device(fn, data=data, scale=scale, zero=zero)
    q = torch.stack([data & 0xF, data >> 4], dim=-1).reshape(b, h, s, groups, GROUP_SIZE_4BIT).float()
    out = (q - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)
    return out.reshape(b, h, s, d).to(dtype)
