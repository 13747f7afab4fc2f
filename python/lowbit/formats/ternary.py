"""Ternary (BitNet b1.58) weights in the Hugging Face transformers checkpoint layout.

Source followed, line for line: huggingface/transformers,
``src/transformers/integrations/bitnet.py`` (``pack_weights``, ``unpack_weights``,
``BitLinear.activation_quant``, ``BitLinear.post_quant_process``, ``WeightQuant.forward``):

* weights: ``s = 1.0 / mean(|W|).clamp(min=1e-5)`` in float32 and
  ``w_t = (W * s).round().clamp(-1, 1)`` (``WeightQuant``); that ``s`` is the checkpoint's
  ``weight_scale`` (the inverse of ``mean(|W|)``), and ``W ~= w_t / weight_scale``.
  ``per_row=True`` (our extension) takes one mean per output row: ``weight_scale [N]``.
* packing: ``w_t + 1`` in {0, 1, 2}, 2 bits each, four per byte along the OUTPUT dim:
  ``qweight [ceil(N/4), K]`` uint8, byte row ``r`` holds row ``r + i*ceil(N/4)`` at bits
  ``2i..2i+1``; slots past ``N`` are 0 (``pack_weights`` starts from ``torch.zeros``).
* activations: per token, ``x_scale = 127 / max|x|.clamp(min=1e-5)``,
  ``x_q = (x * x_scale).round().clamp(-128, 127)`` as int8 (``activation_quant`` with 8 bits;
  computed here in float32 like ``ActQuant``), and ``y = acc / (x_scale * weight_scale)``
  (``post_quant_process``), ``acc = x_q @ w_t.T`` in integers.

Bit-exact with transformers' eager arithmetic on the same device (checked against
transformers 5.17 on CUDA); its ``@torch.compile``d ``WeightQuant`` can differ by 1 ulp.
The tensor HF names ``weight`` is our ``qweight``; HF keeps ``weight_scale`` in the model
dtype with shape ``[1]``, which :meth:`TernaryWeight.from_tensors` accepts and stores as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._checks import (
    FLOAT_DTYPES,
    check_finite,
    check_not_empty,
    check_positive_int,
    check_same_device,
    check_tensor,
)

VALUES_PER_BYTE = 4
_EPS = 1e-5  # transformers' clamp(min=1e-5) for both the weight mean and the activation absmax


def _packed_rows(out_features: int) -> int:
    return (out_features + VALUES_PER_BYTE - 1) // VALUES_PER_BYTE


def _codes(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [R, K] -> the four 2-bit fields as uint8 [4, R, K] (field i = bits 2i..2i+1)."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qweight.device).view(4, 1, 1)
    return (qweight.unsqueeze(0) >> shifts) & 3


@dataclass(frozen=True, eq=False)
class TernaryWeight:
    """Packed ternary weight: ``qweight`` uint8 [ceil(N/4), K], ``weight_scale`` float32 [1] or [N]."""

    qweight: torch.Tensor
    weight_scale: torch.Tensor
    out_features: int

    def __post_init__(self) -> None:
        fn = "TernaryWeight"
        n = check_positive_int(self.out_features, "out_features", fn)
        check_tensor(self.qweight, "qweight", dtype=torch.uint8, ndim=2, fn=fn)
        rows, k = self.qweight.shape
        if rows != _packed_rows(n) or k == 0:
            raise ValueError(
                f"{fn}: qweight must have shape ({_packed_rows(n)}, K>0) for out_features={n}, "
                f"got {tuple(self.qweight.shape)}"
            )
        check_tensor(self.weight_scale, "weight_scale", dtype=torch.float32, ndim=1, fn=fn)
        if self.weight_scale.shape[0] not in (1, n):
            raise ValueError(
                f"{fn}: weight_scale must have 1 or out_features={n} entries, got {self.weight_scale.shape[0]}"
            )
        check_same_device(fn, qweight=self.qweight, weight_scale=self.weight_scale)

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1])

    @property
    def per_row(self) -> bool:
        return self.weight_scale.shape[0] == self.out_features and self.out_features > 1

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Checkpoint tensors, in a fixed order (HF calls ``qweight`` ``weight``)."""
        return {"qweight": self.qweight, "weight_scale": self.weight_scale}

    def attributes(self) -> dict[str, int | float | bool | str]:
        return {"out_features": int(self.out_features)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Any], **attributes: Any) -> TernaryWeight:
        """Validate checkpoint tensors (codes, padding, scales) and rebuild the weight."""
        fn = "TernaryWeight.from_tensors"
        _check_keys(fn, "tensors", tensors, {"qweight", "weight_scale"})
        _check_keys(fn, "attributes", attributes, {"out_features"})
        qweight, scale = tensors["qweight"], tensors["weight_scale"]
        check_tensor(scale, "weight_scale", dtype=FLOAT_DTYPES, ndim=1, fn=fn)
        p = cls(qweight, scale.to(torch.float32), attributes["out_features"])
        check_finite(p.weight_scale, "weight_scale", fn)
        if not bool((p.weight_scale > 0).all()):
            raise ValueError(f"{fn}: weight_scale must be positive, got min {p.weight_scale.min().item()}")
        codes = _codes(p.qweight).reshape(-1, p.in_features)
        if bool((codes == 3).any()):
            raise ValueError(f"{fn}: qweight holds the 2-bit code 3, which is not a ternary value (codes are 0, 1, 2)")
        if bool((codes[p.out_features :] != 0).any()):
            raise ValueError(
                f"{fn}: qweight has non-zero padding slots past out_features={p.out_features} (they must be 0)"
            )
        return p


def _check_keys(fn: str, what: str, given: dict[str, Any], want: set[str]) -> None:
    if not isinstance(given, dict):
        raise TypeError(f"{fn}: {what} must be a dict, got {type(given).__name__}")
    if set(given) != want:
        raise ValueError(f"{fn}: {what} must have keys {sorted(want)}, got {sorted(given)}")


def pack_ternary(w_t: torch.Tensor) -> torch.Tensor:
    """Pack int8 [N, K] in {-1, 0, 1} into uint8 [ceil(N/4), K] (transformers' ``pack_weights``)."""
    fn = "ternary.pack_ternary"
    check_tensor(w_t, "w_t", dtype=torch.int8, ndim=2, fn=fn)
    check_not_empty(w_t, "w_t", fn)
    if bool(((w_t < -1) | (w_t > 1)).any()):
        raise ValueError(f"{fn}: w_t must hold only -1, 0, 1, got values in [{w_t.min().item()}, {w_t.max().item()}]")
    n, k = w_t.shape
    rows = _packed_rows(n)
    codes = torch.zeros(VALUES_PER_BYTE * rows, k, dtype=torch.uint8, device=w_t.device)
    codes[:n] = (w_t + 1).to(torch.uint8)  # padding rows stay 0, as in pack_weights
    codes = codes.view(VALUES_PER_BYTE, rows, k)
    return codes[0] | (codes[1] << 2) | (codes[2] << 4) | (codes[3] << 6)


def unpack_ternary(qweight: torch.Tensor, out_features: int) -> torch.Tensor:
    """Unpack uint8 [ceil(N/4), K] into int8 [N, K] in {-1, 0, 1} (transformers' ``unpack_weights``)."""
    fn = "ternary.unpack_ternary"
    check_tensor(qweight, "qweight", dtype=torch.uint8, ndim=2, fn=fn)
    n = check_positive_int(out_features, "out_features", fn)
    if qweight.shape[0] != _packed_rows(n):
        raise ValueError(
            f"{fn}: qweight has {qweight.shape[0]} rows, out_features={n} needs {_packed_rows(n)} (= ceil(N/4))"
        )
    codes = _codes(qweight).reshape(-1, qweight.shape[1])[:n]
    return codes.to(torch.int8) - 1


def quantize(weight: torch.Tensor, per_row: bool = False) -> TernaryWeight:
    """Quantize W [N, K] to ternary with ``weight_scale = 1 / mean|W|`` (per tensor, or per row)."""
    fn = "ternary.quantize"
    check_tensor(weight, "weight", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    check_not_empty(weight, "weight", fn)
    check_finite(weight, "weight", fn)
    if not isinstance(per_row, bool):
        raise TypeError(f"{fn}: per_row must be a bool, got {type(per_row).__name__} {per_row!r}")
    w = weight.float()
    mean = w.abs().mean(dim=1) if per_row else w.abs().mean().reshape(1)
    weight_scale = 1.0 / mean.clamp(min=_EPS)
    w_t = (w * weight_scale.unsqueeze(1)).round().clamp(-1, 1).to(torch.int8)
    return TernaryWeight(pack_ternary(w_t), weight_scale, int(weight.shape[0]))


def dequantize_tensors(
    qweight: torch.Tensor, weight_scale: torch.Tensor, out_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Tensor-level decode: ``unpack_ternary(qweight) / weight_scale`` -> [N, K] in ``dtype``."""
    fn = "ternary.dequantize_tensors"
    check_tensor(weight_scale, "weight_scale", dtype=FLOAT_DTYPES, ndim=1, fn=fn)
    _check_dtype(fn, dtype)
    w_t = unpack_ternary(qweight, out_features)
    if weight_scale.shape[0] not in (1, out_features):
        raise ValueError(
            f"{fn}: weight_scale must have 1 or out_features={out_features} entries, got {weight_scale.shape[0]}"
        )
    check_same_device(fn, qweight=qweight, weight_scale=weight_scale)
    return (w_t.float() / weight_scale.float().reshape(-1, 1)).to(dtype)


def dequantize(p: TernaryWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [N, K] weight ``w_t / weight_scale`` in ``dtype``."""
    if not isinstance(p, TernaryWeight):
        raise TypeError(f"ternary.dequantize: p must be a TernaryWeight, got {type(p).__name__}")
    return dequantize_tensors(p.qweight, p.weight_scale, p.out_features, dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 absmax quantization (transformers' ``activation_quant``, in float32).

    Returns ``x_q`` int8 [..., K] and ``x_scale`` float32 [..., 1] with ``x ~= x_q / x_scale``.
    No host sync: a NaN/Inf token gets a NaN or 0 ``x_scale`` and codes 0, so its output
    ``acc / (x_scale * weight_scale)`` is NaN, never a finite wrong number.
    """
    fn = "ternary.quantize_activations"
    check_tensor(x, "x", dtype=FLOAT_DTYPES, fn=fn)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{fn}: x must have shape [..., K] with K > 0, got {tuple(x.shape)}")
    xf = x.float()
    x_scale = 127.0 / xf.abs().amax(dim=-1, keepdim=True).clamp(min=_EPS)
    x_q = (xf * x_scale).round().clamp(-128, 127)
    # Casting NaN to int8 is undefined; finite inputs are unaffected by this.
    x_q = torch.nan_to_num(x_q, nan=0.0)
    return x_q.to(torch.int8), x_scale


def _check_dtype(fn: str, dtype: object) -> None:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be one of float16, bfloat16, float32, got {dtype}")
