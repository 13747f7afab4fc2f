"""``lowbit.Linear``: an ``nn.Linear`` whose weight is stored in a low-bit format.

The packed tensors of the format are buffers named as in the format's checkpoint layout
(``<Fmt>Weight.tensors()``), so a ``state_dict`` holds exactly the checkpoint tensors,
plus ``bias`` and an ``_extra_state`` entry with the format name and attributes
(``fmt``, ``group_size``, ``absmax_offset``...: plain Python values, loadable with
``torch.load(..., weights_only=True)``).

Decisions:

* ``bias`` is a regular ``nn.Parameter`` (trainable, like ``nn.Linear``'s): the ops have
  autograd for the activations and the bias, so adapters and bias tuning train through a
  frozen quantized layer. The packed weight is never trained (buffers).
* ``.to(dtype)`` / ``.half()`` / ``.bfloat16()`` change only the buffers whose dtype is a
  free choice of the format: the int4 ``scales``/``zeros`` and the sparse24 ``values``
  follow the module dtype like ``bias`` does. Every other buffer keeps its dtype because
  the dtype is part of the format (nf4 ``absmax``/``absmax_scale``/``absmax_code`` are
  float32 or uint8, ternary ``weight_scale`` is float32, packed codes are uint8).
  Device moves (``.to(device)``, ``.cuda()``, ``.to("meta")``, ``.to_empty()``) move all.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import backends, ops
from .._checks import FLOAT_DTYPES, check_linear_input, check_positive_int, check_same_device
from ._layouts import Layout, get_layout, layout_of_weight

_FN = "lowbit.Linear"


def _plain_eager(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True if a call needs nothing from torch's dispatcher: a plain tensor, no gradient
    wanted, nothing watching (:func:`lowbit.ops._unwatched`)."""
    if x.__class__ is not torch.Tensor or not ops._unwatched():
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))


class _Plan:
    """A backend's prepared call for one layer (:func:`lowbit.backends.plan`), valid while the
    layer's tensors are the same objects at the same versions, its format attributes and the
    backend choice are unchanged, and ``x`` has the device, dtype and width it was made for."""

    __slots__ = ("run", "device", "dtype", "k", "env", "attrs", "names", "refs", "versions", "bias_ref", "bias_version")

    def __init__(self, run: Callable | None, m: Linear, x: torch.Tensor) -> None:
        self.run = run
        self.device, self.dtype, self.k = x.device, x.dtype, x.shape[-1:]
        self.env = os.environ.get(backends.ENV_VAR)
        self.attrs = _attrs(m)
        self.names = m._tensor_names
        tensors = [m._buffers[n] for n in self.names]
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.versions = tuple(_version(t) for t in tensors)
        bias = m._parameters["bias"]
        self.bias_ref = None if bias is None else weakref.ref(bias)
        self.bias_version = _version(bias)

    def fits(self, m: Linear, x: torch.Tensor) -> bool:
        # (called on every plain eager forward: a few microseconds, so no helper calls or
        # temporaries where a direct comparison does)
        if x.device != self.device or x.dtype != self.dtype or x.shape[-1:] != self.k:
            return False
        if os.environ.get(backends.ENV_VAR) != self.env or (self.attrs and _attrs(m) != self.attrs):
            return False
        buffers = m._buffers
        for name, r, v in zip(self.names, self.refs, self.versions):
            t = buffers[name]
            if t is None:
                if r is not None:
                    return False
            elif r is None or r() is not t or _version(t) != v:
                return False
        bias = m._parameters["bias"]
        if bias is None:
            return self.bias_ref is None
        return self.bias_ref is not None and self.bias_ref() is bias and _version(bias) == self.bias_version


def _version(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter (and cannot change here)
        return None


def _attrs(m: Linear) -> tuple:
    return tuple(getattr(m, k) for k in m._layout.attribute_defaults)


# module -> its _Plan (weak keys: copies and pickles of a module carry no plan)
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# device types whose backends prepare calls (the 4-bit CUDA kernels); elsewhere forward pays
# nothing for the plans
_PLAN_DEVICES = frozenset({"cuda"})


class Linear(nn.Module):
    """``y = x @ W.T + bias`` with ``W[out_features, in_features]`` in a low-bit format.

    ``fmt`` is one of ``"int4"`` (options ``group_size=128``, ``symmetric=False``,
    ``scale_dtype=None``), ``"nf4"`` (``blocksize=64``, ``double_quant=False``),
    ``"ternary"`` (``per_row=False``) or ``"sparse24"`` (no options). The constructor makes
    a zero weight of the right layout, ready for ``load_state_dict``; use
    :meth:`from_linear` to quantize an ``nn.Linear`` and :meth:`from_quantized` to wrap a
    packed weight (e.g. one converted from a GPTQ, AWQ or bitsandbytes checkpoint).
    ``dtype`` (default: torch's default dtype) is the dtype of ``bias`` and of the
    format buffers that follow the module dtype (see the module docstring).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        fmt: str = "int4",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features", _FN)
        check_positive_int(out_features, "out_features", _FN)
        layout = get_layout(fmt, _FN)
        opts = layout.finalize(layout.options(options, _FN), in_features)
        reason = layout.shape_error(in_features, out_features, opts)
        if reason is not None:
            raise ValueError(f"{_FN}: {reason}")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"{_FN}: dtype must be float16, bfloat16 or float32, got {dtype}")

        self.in_features = in_features
        self.out_features = out_features
        self.fmt = layout.name
        self._layout: Layout = layout
        # Format options as plain attributes (scale_dtype is the dtype of the scales buffer).
        self._option_names = tuple(k for k in opts if k != "scale_dtype")
        for k in self._option_names:
            setattr(self, k, opts[k])
        # Quantization results kept as Python values (nf4: absmax_offset); set by
        # from_quantized and by load_state_dict.
        for k, v in layout.attribute_defaults.items():
            setattr(self, k, v)

        buffers = layout.empty(in_features, out_features, opts, dtype, device)
        for name, t in buffers.items():
            self.register_buffer(name, t)  # a None entry is registered as None (not saved)
        self._tensor_names = tuple(buffers)
        self._fixed_dtype = tuple(n for n in buffers if n not in layout.follow)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ---- construction from float or packed weights ----

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "int4", **options: Any) -> Linear:
        """Quantize ``linear.weight`` with ``lowbit.formats.<fmt>.quantize(weight, **options)``.

        The result lives on the device of ``linear``; its bias is a copy of ``linear.bias``
        (same dtype and ``requires_grad``).
        """
        fn = f"{_FN}.from_linear"
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{fn}: linear must be a torch.nn.Linear, got {type(linear).__name__}")
        layout = get_layout(fmt, fn)
        opts = layout.finalize(layout.options(options, fn), linear.in_features)
        reason = layout.shape_error(linear.in_features, linear.out_features, opts)
        if reason is not None:
            raise ValueError(f"{fn}: cannot store this layer as {layout.name}: {reason}")
        packed = layout.module.quantize(linear.weight.detach(), **opts)
        return cls.from_quantized(packed, linear.bias)

    @classmethod
    def from_quantized(cls, weight: Any, bias: torch.Tensor | None = None) -> Linear:
        """Wrap a packed weight (``Int4Weight``, ``NF4Weight``, ``TernaryWeight`` or
        ``Sparse24Weight`` from ``lowbit.formats``) and an optional float ``bias [N]``.

        The tensors are used as they are (no copy), on their device; ``bias`` is copied.
        """
        fn = f"{_FN}.from_quantized"
        layout = layout_of_weight(weight, fn)
        n, k = weight.out_features, weight.in_features
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{fn}: bias must be a float16/bfloat16/float32 tensor, got {bias!r:.80}")
            if tuple(bias.shape) != (n,):
                raise ValueError(f"{fn}: bias must have shape ({n},) for out_features={n}, got {tuple(bias.shape)}")
        tensors = weight.tensors()
        check_same_device(fn, bias=bias, **tensors)
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(k, n, bias is not None, layout.name, device="meta", dtype=dtype, **layout.options_of(weight))
        for name, t in tensors.items():
            have = m._buffers.get(name, "absent")
            if (t is None) != (have is None) or (t is not None and (
                t.shape != have.shape or (name in m._fixed_dtype and t.dtype != have.dtype)
            )):
                want = "None" if have is None else f"{tuple(have.shape)} {have.dtype}"
                got = "None" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise ValueError(f"{fn}: {layout.name} tensor {name!r} must be {want}, got {got}")
            m._buffers[name] = t
        for key, value in layout.module_attributes(weight).items():
            setattr(m, key, value)
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return m

    # ---- use ----

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., in_features]`` (float16/bfloat16/float32) -> ``[..., out_features]`` in ``x.dtype``.

        Plain eager calls (no autograd, torch.compile or tracing) reuse what the backend
        prepared at the first such call (the 4-bit CUDA kernels: the cached layout, straight to
        the kernel), skipping the op's checks and backend selection, which cost more than a
        decode step's kernel; anything else takes the op."""
        plain = fits = False
        if isinstance(x, torch.Tensor) and x.device.type in _PLAN_DEVICES:
            plain = _plain_eager(x, self.bias)
            plan = _PLANS.get(self) if plain else None
            fits = plan is not None and plan.fits(self, x)
            if fits and plan.run is not None:
                return plan.run(x)
        check_linear_input(x, self.in_features, _FN)
        y = self._layout.matmul(self, x, self.bias)
        if plain and not fits:
            op = self._layout.op_args(self, x, self.bias)
            if op is not None:  # (a None run is kept too: no new attempt until something changes)
                _PLANS[self] = _Plan(backends.plan(op[0], x.device.type, op[1]), self, x)
        return y

    def quantized_weight(self) -> Any:
        """The packed weight as the format's dataclass (``lowbit.formats.<fmt>.<Fmt>Weight``)."""
        tensors = {n: self._buffers[n] for n in self._tensor_names}
        return self._layout.weight_class.from_tensors(tensors, **self._layout.format_attributes(self))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` this layer multiplies by."""
        return self._layout.module.dequantize(self.quantized_weight(), dtype)

    def format_options(self) -> dict[str, Any]:
        """The format options of this layer (e.g. ``{"group_size": 128, "symmetric": False}``)."""
        return {k: getattr(self, k) for k in self._option_names}

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.format_options().items())
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, fmt={self.fmt!r}{opts}"
        )

    # ---- state_dict: the format attributes travel as plain Python values ----

    def _attributes(self) -> dict[str, Any]:
        state: dict[str, Any] = {"fmt": self.fmt, "in_features": self.in_features, "out_features": self.out_features}
        state.update(self.format_options())
        state.update({k: getattr(self, k) for k in self._layout.attribute_defaults})
        return state

    def get_extra_state(self) -> dict[str, Any]:
        return self._attributes()

    def set_extra_state(self, state: Any) -> None:
        mine = self._attributes()
        if not isinstance(state, dict):
            raise ValueError(f"{_FN}: the checkpoint's _extra_state must be a dict, got {type(state).__name__}")
        # The layout must match this module; quantization results (absmax_offset) are taken.
        results = self._layout.attribute_defaults
        differ = [k for k in mine if k not in results and state.get(k) != mine[k]]
        if differ:
            theirs = ", ".join(f"{k}={state.get(k)!r}" for k in differ)
            ours = ", ".join(f"{k}={mine[k]!r}" for k in differ)
            raise ValueError(f"{_FN}: the checkpoint has {theirs} but this module has {ours}")
        for k, default in results.items():
            setattr(self, k, type(default)(state.get(k, default)))

    # ---- .to() / .half(): format-defined dtypes never change ----

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Linear:
        held = {n: self._buffers[n] for n in self._fixed_dtype if self._buffers.get(n) is not None}
        for n in held:
            self._buffers[n] = None  # hidden from nn.Module._apply
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in held.items():
                self._buffers[n] = t
        for n, t in held.items():
            out = fn(t)
            # A dtype change is undone from the original (not from `out`: no precision lost).
            self._buffers[n] = out if out.dtype == t.dtype else t.to(device=out.device)
        return self
