"""What ``lowbit.Linear`` needs to know about each weight format, one class per format.

A layout answers, for a format and a layer shape: which options the format takes (with
their defaults and checks), whether the shape is legal, which buffers a module holds
(names, shapes, dtypes, so that an empty module can receive a ``state_dict``), which of
them follow the module dtype under ``.to(dtype)``, and how ``forward`` calls the op.
The packing itself lives in ``lowbit.formats``; nothing here quantizes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from types import ModuleType
from typing import Any

import torch

from .. import ops
from .._checks import FLOAT_DTYPES
from ..formats import int4 as _int4
from ..formats import nf4 as _nf4
from ..formats import sparse24 as _sparse24
from ..formats import ternary as _ternary

Device = "torch.device | str | None"


def _check_bool(value: object, name: str, fn: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def _check_int(value: object, name: str, fn: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}")
    return value


class Layout(ABC):
    """Base class: one subclass per weight format."""

    name: str = ""
    module: ModuleType
    #: name of the format's packed-weight dataclass in ``module``
    weight_class_name: str = ""
    defaults: dict[str, Any] = {}
    #: quantization results the module keeps as plain Python values, with their defaults
    attribute_defaults: dict[str, Any] = {}
    #: buffers whose dtype follows the module dtype (``.half()``, ``.to(dtype)``); every
    #: other format buffer keeps its dtype, which is part of the format.
    follow: frozenset[str] = frozenset()

    @property
    def weight_class(self) -> type:
        """The format's packed-weight dataclass, e.g. ``formats.int4.Int4Weight``."""
        return getattr(self.module, self.weight_class_name)

    def options(self, given: dict[str, Any], fn: str) -> dict[str, Any]:
        """Check option names, types and values; return them with defaults filled in."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            valid = ", ".join(self.defaults) or "none"
            raise TypeError(
                f"{fn}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"for fmt={self.name!r}; valid options: {valid}"
            )
        opts = {**self.defaults, **given}
        self._check_options(opts, fn)
        return opts

    def _check_options(self, opts: dict[str, Any], fn: str) -> None:
        """Type and value checks of the options (formats without options have none)."""

    def shape_error(self, in_features: int, out_features: int, opts: dict[str, Any]) -> str | None:
        """Why a [out_features, in_features] weight cannot take this format, or None."""
        return None

    def finalize(self, opts: dict[str, Any], in_features: int) -> dict[str, Any]:
        """Options with shape-dependent spellings resolved (int4 ``group_size=-1`` -> K)."""
        return opts

    @abstractmethod
    def empty(
        self, in_features: int, out_features: int, opts: dict[str, Any], dtype: torch.dtype, device: Device
    ) -> dict[str, torch.Tensor | None]:
        """The buffers of a module of this shape, in the format's checkpoint order, holding
        a legal encoding of the all-zero weight, ready for ``load_state_dict``."""

    def module_attributes(self, weight: Any) -> dict[str, Any]:
        """The values of ``attribute_defaults`` for packed weight ``weight``."""
        return {}

    def options_of(self, weight: Any) -> dict[str, Any]:
        """The options a packed weight was made with (for ``Linear.from_quantized``)."""
        return {}

    def format_attributes(self, m: Any) -> dict[str, Any]:
        """Keyword arguments of ``<Fmt>Weight.from_tensors`` for module ``m``."""
        return {}

    @abstractmethod
    def matmul(self, m: Any, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T (+ bias)`` through the format's op, reading the buffers of module ``m``."""

    def op_args(self, m: Any, x: torch.Tensor, bias: torch.Tensor | None) -> tuple[str, tuple] | None:
        """The op and its arguments for ``matmul`` where a backend may prepare repeated calls
        (:func:`lowbit.backends.plan`); None for formats without such kernels."""
        return None


class Int4Layout(Layout):
    name = "int4"
    module = _int4
    weight_class_name = "Int4Weight"
    defaults = {"group_size": 128, "symmetric": False, "scale_dtype": None}
    follow = frozenset({"scales", "zeros"})

    def _check_options(self, opts, fn):
        _check_int(opts["group_size"], "group_size", fn)
        _check_bool(opts["symmetric"], "symmetric", fn)
        sd = opts["scale_dtype"]
        if sd is not None and sd not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: scale_dtype must be None, float16, bfloat16 or float32, got {sd!r}")

    def finalize(self, opts, in_features):
        return {**opts, "group_size": in_features} if opts["group_size"] == -1 else opts

    def shape_error(self, in_features, out_features, opts):
        g = self.finalize(opts, in_features)["group_size"]
        if in_features % 2:
            return f"int4 needs an even in_features, got in_features={in_features}"
        if g not in (32, 64, 128) and g != in_features:
            return f"group_size={g} must be 32, 64, 128 or in_features={in_features}"
        if g <= 0 or in_features % g:
            return f"group_size={g} does not divide in_features={in_features}"
        return None

    def empty(self, in_features, out_features, opts, dtype, device):
        sd = opts["scale_dtype"] or (dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32)
        n, groups, sym = out_features, in_features // opts["group_size"], opts["symmetric"]
        # quantize(0): scale 1; asymmetric q = zero = 0, symmetric q = 8 (0x88: both nibbles).
        return {
            "qweight": torch.full((n, in_features // 2), 0x88 if sym else 0, dtype=torch.uint8, device=device),
            "scales": torch.ones((n, groups), dtype=sd, device=device),
            "zeros": None if sym else torch.zeros((n, groups), dtype=sd, device=device),
        }

    def options_of(self, weight):
        return {"group_size": weight.group_size, "symmetric": weight.zeros is None, "scale_dtype": weight.scales.dtype}

    def format_attributes(self, m):
        return {"group_size": m.group_size}

    def matmul(self, m, x, bias):
        return ops.int4_matmul(*self.op_args(m, x, bias)[1])

    def op_args(self, m, x, bias):
        return "int4_matmul", (x, m.qweight, m.scales, m.zeros, m.group_size, bias)


class NF4Layout(Layout):
    name = "nf4"
    module = _nf4
    weight_class_name = "NF4Weight"
    defaults = {"blocksize": 64, "double_quant": False}
    attribute_defaults = {"absmax_offset": 0.0}
    def _check_options(self, opts, fn):
        b = _check_int(opts["blocksize"], "blocksize", fn)
        _check_bool(opts["double_quant"], "double_quant", fn)
        if b < 32 or b > 4096 or b & (b - 1):
            raise ValueError(f"{fn}: blocksize={b} must be a power of two in 32..4096")

    def empty(self, in_features, out_features, opts, dtype, device):
        # Code 7 is 0.0 (0x77: both nibbles); with double quantization absmax is the index
        # of 0.0 in the dynamic code, decoding to 0 * 1.0 + offset 0.0.
        numel = in_features * out_features
        nblocks = -(-numel // opts["blocksize"])
        qweight = torch.full(((numel + 1) // 2,), 0x77, dtype=torch.uint8, device=device)
        if not opts["double_quant"]:
            return {
                "qweight": qweight,
                "absmax": torch.zeros(nblocks, dtype=torch.float32, device=device),
                "absmax_scale": None,
                "absmax_code": None,
            }
        code = _nf4.dynamic_code()
        zero_index = int((code == 0).nonzero()[0, 0])
        return {
            "qweight": qweight,
            "absmax": torch.full((nblocks,), zero_index, dtype=torch.uint8, device=device),
            "absmax_scale": torch.ones(-(-nblocks // _nf4.NESTED_BLOCKSIZE), dtype=torch.float32, device=device),
            "absmax_code": code.to(device),
        }

    def module_attributes(self, weight):
        return {"absmax_offset": float(weight.absmax_offset)}

    def options_of(self, weight):
        return {"blocksize": weight.blocksize, "double_quant": weight.absmax_scale is not None}

    def format_attributes(self, m):
        return {
            "blocksize": m.blocksize,
            "out_features": m.out_features,
            "in_features": m.in_features,
            "absmax_offset": m.absmax_offset,
        }

    def matmul(self, m, x, bias):
        return ops.nf4_matmul(*self.op_args(m, x, bias)[1])

    def op_args(self, m, x, bias):
        return "nf4_matmul", (x, m.qweight, m.absmax, m.absmax_scale, m.absmax_code, m.absmax_offset, m.blocksize,
                              m.out_features, bias)


class TernaryLayout(Layout):
    name = "ternary"
    module = _ternary
    weight_class_name = "TernaryWeight"
    defaults = {"per_row": False}

    def _check_options(self, opts, fn):
        _check_bool(opts["per_row"], "per_row", fn)

    def empty(self, in_features, out_features, opts, dtype, device):
        # Code 1 (w_t = 0) in every slot that holds a row, 0 in the padding slots past N.
        rows = -(-out_features // 4)
        r = torch.arange(rows, device=device).unsqueeze(1)
        used = (r + torch.arange(4, device=device) * rows) < out_features  # [rows, 4]
        byte = (used.to(torch.uint8) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=device)).sum(1)
        return {
            "qweight": byte.to(torch.uint8).unsqueeze(1).expand(rows, in_features).contiguous(),
            "weight_scale": torch.ones(out_features if opts["per_row"] else 1, dtype=torch.float32, device=device),
        }

    def options_of(self, weight):
        # A one-row weight has one scale either way; per-tensor is the same thing then.
        return {"per_row": weight.weight_scale.numel() > 1}

    def format_attributes(self, m):
        return {"out_features": m.out_features}

    def matmul(self, m, x, bias):
        return ops.ternary_matmul(x, m.qweight, m.weight_scale, m.out_features, bias)


class Sparse24Layout(Layout):
    name = "sparse24"
    module = _sparse24
    weight_class_name = "Sparse24Weight"
    follow = frozenset({"values"})

    def shape_error(self, in_features, out_features, opts):
        if in_features % 8:
            return f"sparse24 needs in_features divisible by 8, got in_features={in_features}"
        return None

    def empty(self, in_features, out_features, opts, dtype, device):
        # All-zero values at in-group indices (0, 1): nibble 0 | 1 << 2 = 4 in both halves.
        return {
            "values": torch.zeros((out_features, in_features // 2), dtype=dtype, device=device),
            "meta": torch.full((out_features, in_features // 8), 0x44, dtype=torch.uint8, device=device),
        }

    def matmul(self, m, x, bias):
        return ops.sparse24_matmul(x, m.values, m.meta, bias)


LAYOUTS: dict[str, Layout] = {lay.name: lay for lay in (Int4Layout(), NF4Layout(), TernaryLayout(), Sparse24Layout())}


def get_layout(fmt: object, fn: str) -> Layout:
    """The layout of format ``fmt``; ValueError listing the valid names otherwise."""
    if not isinstance(fmt, str):
        raise TypeError(f"{fn}: fmt must be a str, got {type(fmt).__name__} {fmt!r}")
    layout = LAYOUTS.get(fmt)
    if layout is None:
        raise ValueError(f"{fn}: unknown fmt={fmt!r}; valid formats: {', '.join(LAYOUTS)}")
    return layout


def layout_of_weight(weight: object, fn: str) -> Layout:
    """The layout whose format dataclass ``weight`` is."""
    for layout in LAYOUTS.values():
        if isinstance(weight, layout.weight_class):
            return layout
    names = ", ".join(f"formats.{lay.name}.{lay.weight_class_name}" for lay in LAYOUTS.values())
    raise TypeError(f"{fn}: weight must be one of {names}, got {type(weight).__name__}")
