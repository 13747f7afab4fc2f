"""``torch.ops.lowbit.*``: the custom ops, their fake kernels, autograd and Python wrappers.

Each op is declared once with ``torch.library``: a schema, one implementation that asks
:mod:`lowbit.backends` which kernel runs the call (native, Triton or reference), a fake
kernel that only computes the output shape (so ``torch.compile`` traces through without
graph breaks), and autograd with respect to the activations (and bias) so that adapters
can be trained through a frozen quantized layer. The packed weights get no gradient.
"""

from __future__ import annotations

import torch

from . import _validate, backends
from .formats import int4 as _int4
from .formats import kv as _kv
from .formats import nf4 as _nf4
from .formats import sparse24 as _sparse24
from .formats import ternary as _ternary

_lib = torch.library.Library("lowbit", "DEF")  # noqa: TOR901 - kept alive for the process

SCHEMAS = {
    "int4_matmul": "int4_matmul(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int group_size, "
    "Tensor? bias=None) -> Tensor",
    "nf4_matmul": "nf4_matmul(Tensor x, Tensor qweight, Tensor absmax, Tensor? absmax_scale, "
    "Tensor? absmax_code, float absmax_offset, int blocksize, int out_features, Tensor? bias=None) -> Tensor",
    "ternary_matmul": "ternary_matmul(Tensor x, Tensor qweight, Tensor weight_scale, int out_features, "
    "Tensor? bias=None) -> Tensor",
    "sparse24_matmul": "sparse24_matmul(Tensor x, Tensor values, Tensor meta, Tensor? bias=None) -> Tensor",
    "kv_attention": "kv_attention(Tensor q, Tensor k, Tensor k_scale, Tensor? k_zero, Tensor v, "
    "Tensor v_scale, Tensor? v_zero, bool causal=False, float? scale=None) -> Tensor",
}

# How each op decodes its weight to a dense [N, K] matrix for the backward pass.
_DENSE_WEIGHT = {
    "int4_matmul": lambda a, k, dt: _int4.dequantize_tensors(a[1], a[2], a[3], a[4], dtype=dt),
    "nf4_matmul": lambda a, k, dt: _nf4.dequantize_tensors(a[1], a[2], a[3], a[4], a[5], a[6], (a[7], k), dtype=dt),
    # Straight-through: the activation quantization counts as identity in the backward pass.
    "ternary_matmul": lambda a, k, dt: (_ternary.unpack_ternary(a[1], a[3]).to(dt) / a[2].to(dt).unsqueeze(-1)),
    "sparse24_matmul": lambda a, k, dt: _sparse24.decompress_tensors(a[1], a[2], dtype=dt),
}


_DEFAULTS: dict[str, tuple] = {}


def _full(name: str, args: tuple) -> tuple:
    """The dispatcher drops trailing arguments left at their defaults: put them back."""
    return args + _DEFAULTS[name][len(args):]


def _run(name: str, args: tuple) -> torch.Tensor:
    """Validate a full argument tuple and run the selected backend's kernel."""
    shape = _VALIDATE[name](*args)
    if 0 in shape:
        return args[0].new_zeros(shape)
    return backends.run(name, args[0].device.type, *args)


_VALIDATE = {name: getattr(_validate, name) for name in SCHEMAS}


def _unwatched() -> bool:
    """True if nothing (torch.compile, a tracing or fake-tensor mode) watches calls: then a
    call of plain tensors may skip torch's dispatcher."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is None


def _eager_ok(args: tuple) -> bool:
    """True if a call may skip the torch dispatcher: plain tensors off the meta device, no
    gradient wanted, and nothing watching (:func:`_unwatched`). The dispatcher costs tens of
    microseconds a call, as much as a decode step's kernel."""
    if not _unwatched():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if a.__class__ is torch.Tensor:
            if (grad and a.requires_grad) or a.is_meta:
                return False
        elif isinstance(a, torch.Tensor):  # a subclass (FakeTensor, DTensor...): let torch decide
            return False
    return True


def _call(name: str, *args):
    """``torch.ops.lowbit.<name>`` with every argument given, or the same computation without
    the dispatcher when :func:`_eager_ok` says nothing would differ."""
    if _eager_ok(args):
        return _run(name, args)
    return getattr(torch.ops.lowbit, name).default(*args)


def _define(name: str) -> None:
    validate = getattr(_validate, name)
    _lib.define(SCHEMAS[name])
    schema = getattr(torch.ops.lowbit, name).default._schema
    _DEFAULTS[name] = tuple(a.default_value for a in schema.arguments)

    def impl(*args):
        return _run(name, _full(name, args))

    def fake(*args):
        args = _full(name, args)
        return args[0].new_empty(validate(*args))

    def setup_context(ctx, inputs, output) -> None:
        """Keep the inputs for the backward pass: tensors saved properly, the rest on ``ctx``."""
        inputs = _full(name, tuple(inputs))
        is_tensor = [isinstance(a, torch.Tensor) for a in inputs]
        ctx.is_tensor = is_tensor
        ctx.others = [None if t else a for a, t in zip(inputs, is_tensor)]
        ctx.save_for_backward(*[a if t else None for a, t in zip(inputs, is_tensor)], output)

    impl.__name__ = fake.__name__ = name
    _lib.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lowbit::{name}", fake, lib=_lib)
    backward = _attention_backward if name == "kv_attention" else _matmul_backward(name)
    torch.library.register_autograd(f"lowbit::{name}", backward, setup_context=setup_context, lib=_lib)


def _saved(ctx) -> tuple[list, torch.Tensor]:
    *tensors, output = ctx.saved_tensors
    return [s if t else o for s, o, t in zip(tensors, ctx.others, ctx.is_tensor)], output


def _matmul_backward(name: str):
    def backward(ctx, grad):
        args, _ = _saved(ctx)
        grads: list[torch.Tensor | None] = [None] * len(args)
        if ctx.needs_input_grad[0]:
            w = _DENSE_WEIGHT[name](args, args[0].shape[-1], grad.dtype)
            grads[0] = grad @ w
        if ctx.needs_input_grad[-1]:  # bias is the last argument of every matmul op
            grads[-1] = grad.reshape(-1, grad.shape[-1]).sum(0).to(args[-1].dtype)
        return tuple(grads)

    return backward


def _attention_backward(ctx, grad_out):
    """dq of softmax(q k^T s) v over the dequantized cache (the cache gets no gradient)."""
    (q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale), out = _saved(ctx)
    groups = q.shape[1] // k.shape[1]
    kf = _kv.dequantize_kv(k, k_scale, k_zero, dtype=torch.float32).repeat_interleave(groups, dim=1)
    vf = _kv.dequantize_kv(v, v_scale, v_zero, dtype=torch.float32).repeat_interleave(groups, dim=1)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    p = backends.reference.attention_probs(q, kf, causal, s)
    g = grad_out.float()
    dp = g @ vf.transpose(-1, -2)
    ds = p * (dp - (g * out.float()).sum(-1, keepdim=True))
    dq = (ds @ kf) * s
    return (dq.to(q.dtype),) + (None,) * 8


for _name in SCHEMAS:
    _define(_name)


# ---- Python wrappers: the documented entry points (thin: decode at M=1 is microseconds) ----


def int4_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None = None,
    group_size: int = 128,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a group-wise int4 weight ``W[N, K]`` (see ``lowbit.formats.int4``).

    ``x`` is ``[..., K]`` in float16/bfloat16/float32; the result is ``[..., N]`` in ``x.dtype``.
    ``zeros=None`` means symmetric quantization (zero point 8).
    """
    return _call("int4_matmul", x, qweight, scales, zeros, group_size, bias)


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
    """``x @ W.T (+ bias)`` for a bitsandbytes-layout NF4 weight (see ``lowbit.formats.nf4``).

    With double quantization ``absmax`` is uint8 and ``absmax_scale``/``absmax_code``/
    ``absmax_offset`` decode it; otherwise ``absmax`` is float32 and the others are None/0.
    """
    return _call(
        "nf4_matmul",
        x, qweight, absmax, absmax_scale, absmax_code, float(absmax_offset), blocksize, out_features, bias
    )


def ternary_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """BitNet b1.58 matmul: per-token int8 activations against {-1, 0, 1} weights, one rescale.

    ``y = (x_q @ w_t.T) / (x_scale * weight_scale)`` with ``x_q, x_scale`` from
    ``lowbit.formats.ternary.quantize_activations``.
    """
    return _call("ternary_matmul", x, qweight, weight_scale, out_features, bias)


def sparse24_matmul(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a 2:4 semi-structured sparse weight (see ``lowbit.formats.sparse24``)."""
    return _call("sparse24_matmul", x, values, meta, bias)


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
    """Attention of ``q [B, H_q, S_q, D]`` over a quantized cache ``[B, H_kv, S_kv, ...]``.

    int8 ``k``/``v`` are the 8-bit format, uint8 the 4-bit one (``lowbit.formats.kv``).
    ``H_q`` must be a multiple of ``H_kv`` (GQA). ``causal`` masks bottom-right aligned:
    query ``i`` sees keys ``j <= i + S_kv - S_q``. ``scale`` defaults to ``D ** -0.5``.
    """
    return _call("kv_attention", q, k, k_scale, k_zero, v, v_scale, v_zero, causal, scale)
