"""Argument checks of every op, shared by the real kernels and the fake (meta) kernels.

They look only at dtypes, ranks, shapes and devices (never at data), so they run on fake
tensors under ``torch.compile`` too, and they return the output shape.
"""

from __future__ import annotations

import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor

INT4_GROUP_SIZES = (32, 64, 128)
_FLOAT_SET = frozenset(FLOAT_DTYPES)


def _activation(x: torch.Tensor, fn: str) -> int:
    check_tensor(x, "x", dtype=FLOAT_DTYPES, fn=fn)
    if x.dim() < 1:
        raise ValueError(f"{fn}: x must have at least 1 dimension [..., in_features], got a scalar")
    if x.shape[-1] == 0:
        raise ValueError(f"{fn}: x has in_features=0; a layer needs at least one input feature")
    return x.shape[-1]


def _bias(bias: torch.Tensor | None, n: int, fn: str) -> None:
    if bias is not None:
        check_tensor(bias, "bias", dtype=FLOAT_DTYPES, shape=(n,), fn=fn)


def int4_fast_ok(x, qweight, scales, zeros, group_size, bias) -> bool:
    """True for the common valid call, checked with plain attribute tests (no message built);
    False means: run the full checks, which name what is wrong."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and isinstance(qweight, torch.Tensor)
            and isinstance(scales, torch.Tensor) and type(group_size) is int and group_size > 0):
        return False
    k = x.shape[-1]
    if k <= 0 or k % 2 or group_size % 2 or k % group_size or qweight.dim() != 2:
        return False
    n = qweight.shape[0]
    dev = x.device
    shape = (n, k // group_size)
    return (
        x.dtype in _FLOAT_SET
        and qweight.dtype == torch.uint8 and qweight.shape[1] * 2 == k and qweight.device == dev
        and scales.dtype in _FLOAT_SET and scales.shape == shape and scales.device == dev
        and (zeros is None or (isinstance(zeros, torch.Tensor) and zeros.dtype in _FLOAT_SET
                               and zeros.shape == shape and zeros.device == dev))
        and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype in _FLOAT_SET
                              and bias.shape == (n,) and bias.device == dev))
    )


def int4_matmul(x, qweight, scales, zeros, group_size, bias) -> list[int]:
    if int4_fast_ok(x, qweight, scales, zeros, group_size, bias):
        return [*x.shape[:-1], qweight.shape[0]]
    fn = "lowbit.int4_matmul"
    k = _activation(x, fn)
    check_tensor(qweight, "qweight", dtype=torch.uint8, ndim=2, fn=fn)
    n = qweight.shape[0]
    if qweight.shape[1] * 2 != k:
        raise ValueError(
            f"{fn}: x has in_features={k} but qweight {tuple(qweight.shape)} packs {qweight.shape[1] * 2}"
        )
    if group_size <= 0 or k % group_size or group_size % 2:
        raise ValueError(f"{fn}: group_size={group_size} must be even and divide in_features={k}")
    groups = k // group_size
    check_tensor(scales, "scales", dtype=FLOAT_DTYPES, shape=(n, groups), fn=fn)
    if zeros is not None:
        check_tensor(zeros, "zeros", dtype=FLOAT_DTYPES, shape=(n, groups), fn=fn)
    _bias(bias, n, fn)
    check_same_device(fn, x=x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    return [*x.shape[:-1], n]


def nf4_fast_ok(x, qweight, absmax, absmax_scale, absmax_code, blocksize, out_features, bias) -> bool:
    """True for the common valid nf4 call, checked with plain attribute tests (no message built);
    False means: run the full checks, which name what is wrong."""
    if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and isinstance(qweight, torch.Tensor)
            and isinstance(absmax, torch.Tensor) and type(out_features) is int and out_features > 0
            and type(blocksize) is int and 32 <= blocksize <= 4096 and not blocksize & (blocksize - 1)):
        return False
    k = x.shape[-1]
    numel = out_features * k
    nblocks = -(-numel // blocksize)
    dev = x.device
    if not (k > 0 and x.dtype in _FLOAT_SET and qweight.dtype == torch.uint8 and qweight.device == dev
            and qweight.numel() == (numel + 1) // 2 and absmax.shape == (nblocks,) and absmax.device == dev):
        return False
    if absmax_scale is None:
        ok = absmax.dtype == torch.float32 and absmax_code is None
    else:
        ok = (absmax.dtype == torch.uint8
              and isinstance(absmax_scale, torch.Tensor) and absmax_scale.dtype == torch.float32
              and absmax_scale.shape == (-(-nblocks // 256),) and absmax_scale.device == dev
              and isinstance(absmax_code, torch.Tensor) and absmax_code.dtype == torch.float32
              and absmax_code.shape == (256,) and absmax_code.device == dev)
    return ok and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype in _FLOAT_SET
                                    and bias.shape == (out_features,) and bias.device == dev))


def nf4_matmul(
    x, qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, out_features, bias
) -> list[int]:
    if nf4_fast_ok(x, qweight, absmax, absmax_scale, absmax_code, blocksize, out_features, bias):
        return [*x.shape[:-1], out_features]
    fn = "lowbit.nf4_matmul"
    k = _activation(x, fn)
    check_tensor(qweight, "qweight", dtype=torch.uint8, fn=fn)
    if out_features <= 0:
        raise ValueError(f"{fn}: out_features must be positive, got {out_features}")
    numel = out_features * k
    if qweight.numel() != (numel + 1) // 2:
        raise ValueError(
            f"{fn}: qweight has {qweight.numel()} bytes, a [{out_features}, {k}] weight needs {(numel + 1) // 2}"
        )
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"{fn}: blocksize={blocksize} must be a power of two in 32..4096")
    nblocks = -(-numel // blocksize)
    if absmax_scale is None:
        check_tensor(absmax, "absmax", dtype=torch.float32, shape=(nblocks,), fn=fn)
        if absmax_code is not None:
            raise ValueError(f"{fn}: absmax_code is given without absmax_scale (double quantization needs both)")
    else:
        check_tensor(absmax, "absmax", dtype=torch.uint8, shape=(nblocks,), fn=fn)
        check_tensor(absmax_scale, "absmax_scale", dtype=torch.float32, shape=(-(-nblocks // 256),), fn=fn)
        check_tensor(absmax_code, "absmax_code", dtype=torch.float32, shape=(256,), fn=fn)
    _bias(bias, out_features, fn)
    check_same_device(
        fn, x=x, qweight=qweight, absmax=absmax, absmax_scale=absmax_scale, absmax_code=absmax_code, bias=bias
    )
    return [*x.shape[:-1], out_features]


def ternary_fast_ok(x, qweight, weight_scale, out_features, bias) -> bool:
    """True for the common valid call, checked with plain attribute tests (no message built);
    False means: run the full checks, which name what is wrong."""
    if not (type(out_features) is int and out_features > 0 and isinstance(x, torch.Tensor) and x.dim() >= 1):
        return False
    k = x.shape[-1]
    n = out_features
    dev = x.device
    return (
        k > 0
        and x.dtype in _FLOAT_SET
        and isinstance(qweight, torch.Tensor)
        and qweight.dtype == torch.uint8
        and qweight.shape == ((n + 3) // 4, k)
        and isinstance(weight_scale, torch.Tensor)
        and weight_scale.dtype == torch.float32
        and weight_scale.dim() == 1
        and weight_scale.shape[0] in (1, n)
        and qweight.device == dev
        and weight_scale.device == dev
        and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype in _FLOAT_SET
                              and bias.shape == (n,) and bias.device == dev))
    )


def ternary_matmul(x, qweight, weight_scale, out_features, bias) -> list[int]:
    if ternary_fast_ok(x, qweight, weight_scale, out_features, bias):
        return [*x.shape[:-1], out_features]
    fn = "lowbit.ternary_matmul"
    k = _activation(x, fn)
    check_tensor(qweight, "qweight", dtype=torch.uint8, ndim=2, fn=fn)
    if out_features <= 0:
        raise ValueError(f"{fn}: out_features must be positive, got {out_features}")
    rows = -(-out_features // 4)
    if tuple(qweight.shape) != (rows, k):
        raise ValueError(
            f"{fn}: qweight must have shape ({rows}, {k}) for out_features={out_features} and "
            f"in_features={k}, got {tuple(qweight.shape)}"
        )
    check_tensor(weight_scale, "weight_scale", dtype=torch.float32, ndim=1, fn=fn)
    if weight_scale.shape[0] not in (1, out_features):
        raise ValueError(
            f"{fn}: weight_scale must have 1 or out_features={out_features} entries, got {weight_scale.shape[0]}"
        )
    _bias(bias, out_features, fn)
    check_same_device(fn, x=x, qweight=qweight, weight_scale=weight_scale, bias=bias)
    return [*x.shape[:-1], out_features]


def sparse24_matmul(x, values, meta, bias) -> list[int]:
    fn = "lowbit.sparse24_matmul"
    k = _activation(x, fn)
    check_tensor(values, "values", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    n = values.shape[0]
    if k % 8 or values.shape[1] * 2 != k:
        raise ValueError(
            f"{fn}: x has in_features={k} but values {tuple(values.shape)} hold {values.shape[1] * 2} "
            "(in_features must be a multiple of 8)"
        )
    check_tensor(meta, "meta", dtype=torch.uint8, shape=(n, k // 8), fn=fn)
    _bias(bias, n, fn)
    check_same_device(fn, x=x, values=values, meta=meta, bias=bias)
    return [*x.shape[:-1], n]


def kv_attention(q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale) -> list[int]:
    fn = "lowbit.kv_attention"
    check_tensor(q, "q", dtype=FLOAT_DTYPES, ndim=4, fn=fn)
    b, h_q, s_q, d = q.shape
    if d == 0:
        raise ValueError(f"{fn}: q has head_dim=0")
    check_tensor(k, "k", dtype=(torch.int8, torch.uint8), ndim=4, fn=fn)
    if v.dtype != k.dtype:
        raise TypeError(f"{fn}: k and v must both be int8 (8-bit) or uint8 (4-bit), got {k.dtype} and {v.dtype}")
    h_kv, s_kv = k.shape[1], k.shape[2]
    bits = 8 if k.dtype == torch.int8 else 4
    packed_d = d if bits == 8 else d // 2
    if bits == 4 and d % 32:
        raise ValueError(f"{fn}: a 4-bit cache needs head_dim divisible by 32, got {d}")
    for name, t in (("k", k), ("v", v)):
        check_tensor(t, name, ndim=4, shape=(b, h_kv, s_kv, packed_d), fn=fn)
    if h_kv == 0 or h_q % h_kv:
        raise ValueError(f"{fn}: query heads ({h_q}) must be a multiple of kv heads ({h_kv})")
    if s_kv == 0:
        raise ValueError(f"{fn}: the KV cache is empty (0 tokens)")
    if causal and s_q > s_kv:
        raise ValueError(f"{fn}: causal attention needs S_q <= S_kv, got S_q={s_q}, S_kv={s_kv}")
    scale_shape = (b, h_kv, s_kv) if bits == 8 else (b, h_kv, s_kv, d // 32)
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        check_tensor(t, name, dtype=FLOAT_DTYPES, shape=scale_shape, fn=fn)
    for name, t in (("k_zero", k_zero), ("v_zero", v_zero)):
        if bits == 8 and t is not None:
            raise ValueError(f"{fn}: {name} must be None for an int8 cache (symmetric)")
        if bits == 4:
            if t is None:
                raise ValueError(f"{fn}: {name} is required for a 4-bit cache")
            check_tensor(t, name, dtype=FLOAT_DTYPES, shape=scale_shape, fn=fn)
    check_same_device(fn, q=q, k=k, v=v, k_scale=k_scale, v_scale=v_scale, k_zero=k_zero, v_zero=v_zero)
    return [b, h_q, s_q, d]
