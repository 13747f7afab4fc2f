"""``lowbit.BitLinear``: the BitNet b1.58 training layer (quantization-aware, straight-through).

The forward pass computes exactly what the ternary kernel computes from the same weight,
in float: weights ternarized by their absolute mean (``lowbit.formats.ternary``'s rule,
``weight_scale = 1 / mean|W|``, ``w_t = clamp(round(W * weight_scale), -1, 1)``), activations
quantized per token to int8 by absmax (``formats.ternary.quantize_activations``), and

    y = (x_q / x_scale) @ (w_t / weight_scale).T (+ bias)

The backward pass is the straight-through estimator: both quantizers count as the
identity (``x + (q(x) - x).detach()``), so the float weight ``W`` learns. After training,
:meth:`BitLinear.to_lowbit` packs the weight into a ternary :class:`lowbit.Linear` whose
output equals this layer's output up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import FLOAT_DTYPES, check_linear_input, check_positive_int
from ..formats import ternary as _ternary
from .linear import Linear

_FN = "lowbit.BitLinear"
# The clamp of the weight mean, shared with formats.ternary.quantize (transformers' 1e-5).
_EPS = _ternary._EPS


def ternarize(weight: torch.Tensor, per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(w_t, weight_scale)``: float32 ``w_t`` in {-1, 0, 1} ``[N, K]`` and float32
    ``weight_scale`` ``[N, 1]`` (per row) or ``[1, 1]``, as ``formats.ternary.quantize`` computes
    them (the same operations in the same order, so the codes are identical), without
    packing and without a host sync, for use in every training step."""
    w = weight.float()
    mean = w.abs().mean(dim=1) if per_row else w.abs().mean().reshape(1)
    weight_scale = (1.0 / mean.clamp(min=_EPS)).unsqueeze(1)
    return (w * weight_scale).round().clamp(-1, 1), weight_scale


class BitLinear(nn.Module):
    """BitNet b1.58 linear layer for training: float weight, ternary forward, STE backward.

    ``per_row=True`` takes one weight scale per output row instead of one per tensor. The
    output has the dtype of the input; the arithmetic is float32.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        per_row: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features", _FN)
        check_positive_int(out_features, "out_features", _FN)
        if not isinstance(per_row, bool):
            raise TypeError(f"{_FN}: per_row must be a bool, got {type(per_row).__name__} {per_row!r}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_FN}: dtype must be float16, bfloat16 or float32, got {dtype}")
        self.in_features = in_features
        self.out_features = out_features
        self.per_row = per_row
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialization."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` -> ``[..., out_features]`` in ``x.dtype``."""
        check_linear_input(x, self.in_features, _FN)
        x32 = x.float()
        x_q, x_scale = _ternary.quantize_activations(x)
        x_ste = x32 + (x_q.float() / x_scale - x32).detach()
        w32 = self.weight.float()
        w_t, weight_scale = ternarize(w32.detach(), self.per_row)
        w_ste = w32 + (w_t / weight_scale - w32).detach()
        y = F.linear(x_ste, w_ste, None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    @torch.no_grad()
    def to_lowbit(self) -> Linear:
        """A ternary :class:`lowbit.Linear` (inference kernel) with this layer's weight and bias."""
        packed = _ternary.quantize(self.weight.detach(), per_row=self.per_row)
        return Linear.from_quantized(packed, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, per_row={self.per_row}"
        )
