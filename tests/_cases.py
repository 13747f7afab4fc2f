"""Random, valid arguments for every op: one builder per op, shared by all op tests."""

from __future__ import annotations

import torch

from lowbit.formats import int4, kv, nf4, sparse24, ternary


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def int4_args(m, k, n, dtype=torch.float32, *, group_size=32, symmetric=False, bias=True, seed=0):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    p = int4.quantize(w, group_size=group_size, symmetric=symmetric, scale_dtype=dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return (x, p.qweight, p.scales, p.zeros, p.group_size, b)


def nf4_args(m, k, n, dtype=torch.float32, *, blocksize=64, double_quant=False, bias=True, seed=0):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    p = nf4.quantize(w, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return (x, p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, p.blocksize, n, b)


def ternary_args(m, k, n, dtype=torch.float32, *, per_row=False, bias=True, seed=0):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g)
    p = ternary.quantize(w, per_row=per_row)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return (x, p.qweight, p.weight_scale, n, b)


def sparse24_args(m, k, n, dtype=torch.float32, *, bias=True, seed=0):
    g = _gen(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    p = sparse24.quantize(w)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return (x, p.values, p.meta, b)


def kv_args(b, h_q, h_kv, s_q, s_kv, d, dtype=torch.float32, *, bits=8, causal=False, scale=None, seed=0):
    g = _gen(seed)
    q = torch.randn(b, h_q, s_q, d, generator=g).to(dtype)
    k = torch.randn(b, h_kv, s_kv, d, generator=g)
    v = torch.randn(b, h_kv, s_kv, d, generator=g)
    kq, ks, kz = kv.quantize_kv(k, bits)
    vq, vs, vz = kv.quantize_kv(v, bits)
    return (q, kq, ks, kz, vq, vs, vz, causal, scale)


def to_device(args: tuple, device: str) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


#: A small valid call of each op, for opcheck and dispatch tests.
SMALL = {
    "int4_matmul": lambda dtype=torch.float32: int4_args(3, 64, 16, dtype),
    "nf4_matmul": lambda dtype=torch.float32: nf4_args(3, 64, 16, dtype),
    "ternary_matmul": lambda dtype=torch.float32: ternary_args(3, 64, 18, dtype),
    "sparse24_matmul": lambda dtype=torch.float32: sparse24_args(3, 64, 16, dtype),
    "kv_attention": lambda dtype=torch.float32: kv_args(2, 4, 2, 3, 7, 32, dtype, causal=True),
}
