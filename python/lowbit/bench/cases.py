"""What each benchmark times: lowbit's op and its natural baselines, on the same data.

A case builder returns a :class:`Case`: for each contender a list of zero-argument calls,
one per rotated copy of the weights, plus the bytes the lowbit op must read (the floor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import backends
from ..formats import int4, kv, nf4, sparse24, ternary
from .timing import copies_for_rotation


@dataclass
class Case:
    op: str
    shape: str
    m: int
    weight_bytes: int  # bytes lowbit's op reads for its weight (or cache)
    backend: str = ""  # which lowbit backend runs the op here
    contenders: dict[str, list[Callable[[], object]]] = field(default_factory=dict)


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _dense_baselines(case: Case, w: torch.Tensor, x: torch.Tensor, device: str, dtypes) -> None:
    """``F.linear`` on the dense weight in each baseline dtype, rotated like the op's weights."""
    for dt in dtypes:
        wd = w.to(device=device, dtype=dt)
        reps = copies_for_rotation(_nbytes(wd), device)
        ws = [wd] + [wd.clone() for _ in range(reps - 1)]
        xd = x.to(dt)
        case.contenders[f"F.linear {str(dt).replace('torch.', '')}"] = [lambda w_=w_, x_=xd: F.linear(x_, w_) for w_ in ws]


def _rotated(make: Callable[[], tuple], nbytes: int, device: str) -> list[tuple]:
    return [make() for _ in range(copies_for_rotation(nbytes, device))]


def _baseline_dtypes(device: str) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16) if device == "cpu" else (torch.float16,)


_weights: dict[tuple, tuple] = {}


def _generator(device: str) -> torch.Generator:
    """Random data is made where it is used: a GPU makes (and quantizes) GPU-sized weights fast."""
    return torch.Generator(device=device if device != "cpu" else "cpu").manual_seed(0)


def _weight(fmt: str, n: int, k: int, device: str, act_dtype: torch.dtype, **opts):
    """The random weight and its packed form, kept for the next case of the same weight (the CLI
    varies M innermost), so that large weights are made and quantized once."""
    key = (fmt, n, k, device, act_dtype, tuple(sorted(opts.items())))
    if key not in _weights:
        _weights.clear()
        w = torch.randn(n, k, generator=_generator(device), device=device) * 0.02
        if fmt == "sparse24":
            w = sparse24.prune(w)  # the baselines multiply by the same pruned weight
        _weights[key] = (w, _quantize(fmt, w, act_dtype, **opts))
    return _weights[key]


def matmul_case(fmt: str, n: int, k: int, m: int, device: str, act_dtype: torch.dtype, **opts) -> Case:
    """lowbit's ``<fmt>_matmul`` on a random ``[n, k]`` weight against dense ``F.linear``."""
    w, packed = _weight(fmt, n, k, device, act_dtype, **opts)
    x = torch.randn(m, k, generator=_generator(device).manual_seed(1), device=device).to(act_dtype)
    tensors = [t.to(device) if t is not None else None for t in packed.tensors().values()]
    nbytes = _nbytes(*tensors)
    copies = [tensors] + [[t.clone() if t is not None else None for t in tensors]
                          for _ in range(copies_for_rotation(nbytes, device) - 1)]
    case = Case(f"{fmt}_matmul", f"{n}x{k}", m, nbytes)
    _set_lowbit(case, case.op, [_ARGS[fmt](x, packed, t) for t in copies], device)
    _dense_baselines(case, w, x, device, _baseline_dtypes(device))
    if fmt == "int4":
        _int4pack_peer(case, w, x, device, opts.get("group_size", 128))
    if fmt == "nf4":
        _bnb_peer(case, w, x, device, opts.get("blocksize", 64))
    return case


def _quantize(fmt: str, w: torch.Tensor, act_dtype: torch.dtype, **opts):
    if fmt == "int4":
        return int4.quantize(w, scale_dtype=act_dtype, **opts)
    if fmt == "sparse24":
        return sparse24.quantize(w.to(act_dtype))
    return {"nf4": nf4, "ternary": ternary}[fmt].quantize(w, **opts)


# The op's arguments from the activations, the packed weight and its (moved) tensors.
_ARGS = {
    "int4": lambda x, p, t: (x, t[0], t[1], t[2], p.group_size, None),
    "nf4": lambda x, p, t: (x, t[0], t[1], t[2], t[3], p.absmax_offset, p.blocksize, p.out_features, None),
    "ternary": lambda x, p, t: (x, t[0], t[1], p.out_features, None),
    "sparse24": lambda x, p, t: (x, t[0], t[1], None),
}


def _set_lowbit(case: Case, op: str, arg_sets: list[tuple], device: str) -> None:
    """Time ``torch.ops.lowbit.<op>`` over the rotated argument sets; record its backend."""
    fn = getattr(torch.ops.lowbit, op).default
    case.contenders["lowbit"] = [lambda a=a: fn(*a) for a in arg_sets]
    case.backend = backends.select(op, device, arg_sets[0])[0]


def _int4pack_peer(case: Case, w: torch.Tensor, x: torch.Tensor, device: str, group_size: int) -> None:
    """torch's own int4 kernel (tinygemm on CUDA, ``_for_cpu`` on the CPU), where it exists."""
    n, k = w.shape
    try:
        q = int4.quantize(w, group_size=group_size, scale_dtype=torch.bfloat16)
        qi = int4.unpack_int4(q.qweight).to(torch.int32).to(device)
        sz = torch.stack([q.scales.t(), (8 - q.zeros.float().t()) * q.scales.float().t()], dim=-1)
        sz = sz.to(torch.bfloat16).contiguous().to(device)
        xb = x.to(torch.bfloat16)
        if device == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 1)
            fn = torch.ops.aten._weight_int4pack_mm_for_cpu
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack((qi[:, ::2] << 4 | qi[:, 1::2]).to(torch.uint8), 8)
            fn = torch.ops.aten._weight_int4pack_mm
        reps = copies_for_rotation(_nbytes(packed), device)
        ps = [packed] + [packed.clone() for _ in range(reps - 1)]
        fn(xb, packed, group_size, sz)
        case.contenders["torch int4pack bf16"] = [lambda p=p: fn(xb, p, group_size, sz) for p in ps]
    except (RuntimeError, AttributeError, ImportError, NotImplementedError):
        pass  # this torch build has no int4pack kernel for the device: nothing to compare


def _bnb_peer(case: Case, w: torch.Tensor, x: torch.Tensor, device: str, blocksize: int) -> None:
    """bitsandbytes' NF4 ``matmul_4bit`` (its GEMV kernel at M=1), where it is installed."""
    if device != "cuda":
        return
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        wq, state = bnbf.quantize_4bit(w.to(x.dtype), blocksize=blocksize, quant_type="nf4")
        fn = bnb.matmul_4bit
        fn(x, wq.t(), quant_state=state)
    except Exception:  # noqa: BLE001 - not installed, or no kernel for this GPU: nothing to compare
        return
    case.contenders["bnb matmul_4bit"] = [lambda: fn(x, wq.t(), quant_state=state)]


def kv_case(bits: int, b: int, h_q: int, h_kv: int, ctx: int, d: int, device: str, dtype: torch.dtype) -> Case:
    """Decode attention over a quantized cache against SDPA over the float cache; both caches
    rotated through copies like the matmul weights, so that each step reads from memory."""
    g = _generator(device)
    k = torch.randn(b, h_kv, ctx, d, generator=g, device=device)
    v = torch.randn(b, h_kv, ctx, d, generator=g, device=device)
    q = torch.randn(b, h_q, 1, d, generator=g.manual_seed(1), device=device).to(dtype)
    kq = [t.to(device) if t is not None else None for t in kv.quantize_kv(k, bits)]
    vq = [t.to(device) if t is not None else None for t in kv.quantize_kv(v, bits)]
    nbytes = _nbytes(*kq, *vq)
    case = Case(f"kv_attention int{bits}", f"B{b} Hq{h_q} Hkv{h_kv} ctx{ctx} D{d}", 1, nbytes)
    caches = [kq + vq] + [[t.clone() if t is not None else None for t in kq + vq]
                          for _ in range(copies_for_rotation(nbytes, device) - 1)]
    _set_lowbit(case, "kv_attention", [(q, c[0], c[1], c[2], c[3], c[4], c[5], False, None) for c in caches], device)
    base_dtype = torch.float32 if device == "cpu" else torch.float16
    kf, vf, qf = k.to(base_dtype).to(device), v.to(base_dtype).to(device), q.to(base_dtype)
    floats = [(kf, vf)] + [(kf.clone(), vf.clone()) for _ in range(copies_for_rotation(_nbytes(kf, vf), device) - 1)]
    case.contenders[f"SDPA {str(base_dtype).replace('torch.', '')}"] = [
        lambda k_=k_, v_=v_: F.scaled_dot_product_attention(qf, k_, v_, enable_gqa=True) for k_, v_ in floats
    ]
    return case
