"""``kv_attention``: tensors -> the native kernel's arguments."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..._checks import check_tensor
from ._common import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    NativeCall,
    dtype_code,
    float_dtypes,
    on_device,
    unit_inner,
)

_KV_NAMES = ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero")


def kv_attention_supported(device_type: str, q, k, k_scale, k_zero, v, v_scale, v_zero, scale) -> bool:
    """True if the tensors have the device and dtypes that a native kv_attention kernel takes
    (and ``scale`` is None or finite)."""
    if not on_device(device_type, q, k, k_scale, k_zero, v, v_scale, v_zero):
        return False
    if k.dtype not in (torch.int8, torch.uint8) or v.dtype != k.dtype:
        return False
    if scale is not None and not math.isfinite(scale):
        return False
    return float_dtypes(q, k_scale, k_zero, v_scale, v_zero)


def _strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if t is None else tuple(t.stride()[:3])


@dataclass
class KvAttentionCall(NativeCall):
    """The tensors of one native kv_attention call, kept alive until the kernel has run."""

    q: torch.Tensor  # [B, H_q, S_q, D], unit inner stride
    cache: dict[str, torch.Tensor | None]  # k, k_scale, k_zero, v, v_scale, v_zero; unit inner stride
    out: torch.Tensor  # [B, H_q, S_q, D], contiguous, q.dtype
    h_kv: int
    s_kv: int
    bits: int
    causal: bool
    scale: float

    def kwargs(self) -> dict:
        """Keyword arguments of ``lowbit._C.kv_attention_<device>`` (all but num_threads/stream)."""
        b, h_q, s_q, d = self.q.shape
        kw: dict = dict(q_ptr=self.q.data_ptr(), q_dtype=dtype_code(self.q.dtype), q_strides=_strides3(self.q))
        for name, t in self.cache.items():
            kw[f"{name}_ptr"] = 0 if t is None else t.data_ptr()
            kw[f"{name}_strides"] = _strides3(t)
            if name not in ("k", "v"):
                kw[f"{name}_dtype"] = DTYPE_CODES[self.q.dtype] if t is None else dtype_code(t.dtype)
        kw.update(
            out_ptr=self.out.data_ptr(),
            out_dtype=dtype_code(self.out.dtype),
            B=b,
            H_q=h_q,
            H_kv=self.h_kv,
            S_q=s_q,
            S_kv=self.s_kv,
            D=d,
            bits=self.bits,
            causal=self.causal,
            scale=self.scale,
        )
        return kw

    def result(self) -> torch.Tensor:
        return self.out


def prepare_kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale, fn: str) -> KvAttentionCall:
    """Check every shape against ``q`` and the cache (the op's own checks), that the dtypes are
    native ones, give each tensor a unit inner stride (views of ``lowbit.QuantizedKVCache``
    storage keep their outer strides: nothing is copied), and allocate the output."""
    from ... import (
        _validate,  # the op's argument checks: one source of truth for the shapes
    )

    check_tensor(q, "q", dtype=NATIVE_DTYPES, ndim=4, fn=fn)
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        if t is not None:
            check_tensor(t, name, dtype=NATIVE_DTYPES, fn=fn)
    shape = _validate.kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    cache = {name: unit_inner(t) for name, t in zip(_KV_NAMES, (k, k_scale, k_zero, v, v_scale, v_zero))}
    return KvAttentionCall(
        q=unit_inner(q),
        cache=cache,
        out=torch.empty(shape, dtype=q.dtype, device=q.device),
        h_kv=k.shape[1],
        s_kv=k.shape[2],
        bits=8 if k.dtype == torch.int8 else 4,
        causal=bool(causal),
        scale=float(scale),
    )
