"""Pure-PyTorch reference implementation of every op: the test oracle.

Simple and obviously right: decode the packed format with the format module's own
decoder, compute in float32, cast the result to the activation dtype. No shortcuts, no
fusion; every other backend is tested against these functions.
"""

from __future__ import annotations

import torch

from ..formats import int4 as _int4
from ..formats import kv as _kv
from ..formats import nf4 as _nf4
from ..formats import sparse24 as _sparse24
from ..formats import ternary as _ternary


def _linear_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w.T + bias`` in float32, returned in ``x.dtype``."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = _int4.dequantize_tensors(qweight, scales, zeros, group_size, dtype=torch.float32)
    return _linear_f32(x, w, bias)


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
    shape = (out_features, x.shape[-1])
    w = _nf4.dequantize_tensors(
        qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, shape, dtype=torch.float32
    )
    return _linear_f32(x, w, bias)


def ternary_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer math as the kernels do it: int8 activations times {-1, 0, 1}, then one rescale.

    float32 holds every integer accumulator exactly while ``K * 128 < 2**24``; for larger
    K the sum is done in float64 so that the oracle stays exact.
    """
    x_q, x_scale = _ternary.quantize_activations(x)
    w_t = _ternary.unpack_ternary(qweight, out_features)
    acc_dtype = torch.float32 if x.shape[-1] * 128 < 2**24 else torch.float64
    acc = x_q.to(acc_dtype) @ w_t.to(acc_dtype).t()
    y = acc.float() / (x_scale * weight_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    w = _sparse24.decompress_tensors(values, meta, dtype=torch.float32)
    return _linear_f32(x, w, bias)


def _expand_kv(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * groups, S, D]: query head h reads kv head h // groups."""
    return t.repeat_interleave(groups, dim=1) if groups > 1 else t


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float
) -> torch.Tensor:
    """softmax(q k^T * scale) in float32, bottom-right causal mask; q, k already head-matched."""
    s_q, s_kv = q.shape[-2], k.shape[-2]
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(s_q, device=q.device).unsqueeze(1)
        j = torch.arange(s_kv, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > i + (s_kv - s_q), float("-inf"))
    return torch.softmax(scores, dim=-1)


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
    groups = q.shape[1] // k.shape[1]
    kf = _expand_kv(_kv.dequantize_kv(k, k_scale, k_zero, dtype=torch.float32), groups)
    vf = _expand_kv(_kv.dequantize_kv(v, v_scale, v_zero, dtype=torch.float32), groups)
    sm_scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = attention_probs(q, kf, causal, sm_scale)
    return (p @ vf).to(q.dtype)


# Every op has a reference; `supports_*` is absent because the reference takes everything.
KERNELS = {
    "int4_matmul": int4_matmul,
    "nf4_matmul": nf4_matmul,
    "ternary_matmul": ternary_matmul,
    "sparse24_matmul": sparse24_matmul,
    "kv_attention": kv_attention,
}
