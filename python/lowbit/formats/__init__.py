"""The weight and cache formats: quantize, pack, unpack, dequantize; the checkpoint layouts.

One module per format. Each weight format has a frozen dataclass of its packed tensors,
``quantize(weight, **options)`` and ``dequantize(packed)``; see ``DESIGN.md``.
"""

from __future__ import annotations

from types import ModuleType

from . import int4, kv, nf4, sparse24, ternary

#: Weight formats by the name users pass to ``lowbit.Linear`` / ``quantize_model``.
WEIGHT_FORMATS: dict[str, ModuleType] = {
    "int4": int4,
    "nf4": nf4,
    "ternary": ternary,
    "sparse24": sparse24,
}


def get(fmt: str) -> ModuleType:
    """The format module for ``fmt`` (e.g. ``"int4"``); ``ValueError`` listing valid names."""
    try:
        return WEIGHT_FORMATS[fmt]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown weight format {fmt!r}; expected one of {', '.join(WEIGHT_FORMATS)}"
        ) from None


__all__ = ["WEIGHT_FORMATS", "get", "int4", "kv", "nf4", "sparse24", "ternary"]
