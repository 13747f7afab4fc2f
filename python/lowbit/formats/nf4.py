"""NF4 (4-bit NormalFloat) weights, bit-identical to bitsandbytes ``quantize_4bit(quant_type="nf4")``.

Layout (bitsandbytes' own, so its checkpoints load unchanged): the weight ``[N, K]`` is
flattened row-major and cut into blocks of ``blocksize`` (a power of two, 32..4096; the last
block may be short). Per block ``absmax = max|w|`` (float32) and ``q`` in 0..15 indexes
:data:`NF4_CODE`; ``qweight`` uint8 ``[ceil(N*K/2)]`` holds element ``2i`` in the HIGH nibble
and ``2i+1`` in the low one (an odd count is padded with the code of 0.0). Decoding is
``NF4_CODE[q] * absmax`` in float32, then cast.

Codes follow bnb's CUDA kernel (``kQuantizeBlockwise`` + ``dQuantizeNF4``, built with
``--use_fast_math``): ``x = w * (1 / absmax)`` in float32 with subnormals flushed, then
``q = #{t in NF4_THRESHOLDS : x > t}`` (ties go to the lower code). The thresholds are the
kernel's decimal literals rounded to float32; four sit one ulp from the float32 midpoints that
bnb's pure-torch CPU path uses. An all-zero block gives ``0 * (1/0) = NaN`` there, coded 0
(-1.0; bnb's CPU path codes 7): it decodes to -0.0, but with double quantization to
``-dequantized_absmax``, a small non-zero value, exactly as bnb on CUDA does.

Double quantization (bnb ``compress_statistics=True``): ``offset = absmax.mean()`` and
``absmax - offset`` is quantized in blocks of 256 to uint8 with bnb's signed dynamic 8-bit
map (:func:`dynamic_code`) by the CUDA ``dQuantize<0>`` search, giving ``absmax`` uint8
``[nblocks]``, ``absmax_scale`` float32 ``[ceil(nblocks/256)]``, ``absmax_code`` float32
``[256]`` and ``absmax_offset``; decoding is ``absmax_code[q] * absmax_scale + offset``.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache

import torch

from .._checks import FLOAT_DTYPES, check_finite, check_not_empty, check_same_device, check_tensor

_NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
               -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
               0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
               0.7229568362236023, 1.0)
#: The 16 NormalFloat values (bitsandbytes' table, exact float32 values).
NF4_CODE = torch.tensor(_NF4_VALUES, dtype=torch.float32)
_THRESHOLD_BITS = (0xBF591CD9, 0xBF1C5270, 0xBEEB8480, 0xBEADEA76, 0xBE703CEC, 0xBE0D38BC, 0xBD3A7871,
                   0x3D22FAFF, 0x3DF64863, 0x3E5067E0, 0x3E9582D4, 0x3EC753F9, 0x3F006D03, 0x3F248DAF,
                   0x3F5C89D9)
#: ``dQuantizeNF4``'s literals (-0.8480964004993439f .. 0.8614784181118011f) as float32: x > [i] -> code > i.
NF4_THRESHOLDS = torch.tensor(struct.unpack("<15f", struct.pack("<15I", *_THRESHOLD_BITS)), dtype=torch.float32)
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_TENSOR_NAMES = ("qweight", "absmax", "absmax_scale", "absmax_code")
_ATTRIBUTE_NAMES = ("blocksize", "out_features", "in_features", "absmax_offset")


@cache
def _dynamic_code() -> torch.Tensor:
    data: list[float] = []
    for i in range(7):  # bnb create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    return torch.tensor(sorted(data + [0, 1.0]), dtype=torch.float32)


def dynamic_code() -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (``create_dynamic_map(signed=True)``), float32 [256]."""
    return _dynamic_code().clone()


def _check_int(v: object, name: str, fn: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):  # SymInt: traced (dynamic) shapes
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__} {v!r}")
    return v


def _check_blocksize(blocksize: object, fn: str) -> int:
    if _check_int(blocksize, "blocksize", fn) not in BLOCKSIZES:
        raise ValueError(f"{fn}: blocksize={blocksize} must be a power of two in 32..4096")
    return blocksize  # type: ignore[return-value]


def _check_absmax(absmax, absmax_scale, absmax_code, offset, nblocks: int, fn: str) -> float:
    """Checks of the (possibly double-quantized) absmax; returns the offset as a float32 value."""
    check_tensor(absmax, "absmax", dtype=(torch.float32, torch.uint8), shape=(nblocks,), fn=fn)
    nested = absmax.dtype == torch.uint8
    for name, t in (("absmax_scale", absmax_scale), ("absmax_code", absmax_code)):
        if (t is None) == nested:
            raise ValueError(f"{fn}: {str(absmax.dtype)[6:]} absmax {'needs' if nested else 'takes no'} {name}")
    if nested:
        n2 = -(-nblocks // NESTED_BLOCKSIZE)
        check_tensor(absmax_scale, "absmax_scale", dtype=torch.float32, shape=(n2,), fn=fn)
        check_tensor(absmax_code, "absmax_code", dtype=torch.float32, shape=(256,), fn=fn)
    if isinstance(offset, bool) or not isinstance(offset, (int, float)):
        raise TypeError(f"{fn}: absmax_offset must be a float, got {type(offset).__name__} {offset!r}")
    off = float(torch.tensor(float(offset), dtype=torch.float32))  # bnb keeps it in float32
    if not math.isfinite(off) or (off != 0.0 and not nested):
        raise ValueError(f"{fn}: absmax_offset={offset} must be finite, and 0.0 without double quantization")
    check_same_device(fn, absmax=absmax, absmax_scale=absmax_scale, absmax_code=absmax_code)
    return off


def _check_packed(qweight, absmax, absmax_scale, absmax_code, offset, blocksize, shape, fn: str):
    """Metadata checks of the NF4 tensors; returns ``((N, K), float32 offset)``."""
    if not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 2:
        raise ValueError(f"{fn}: shape must be (out_features, in_features), got {shape!r}")
    n, k = (_check_int(s, "shape entry", fn) for s in shape)
    if n <= 0 or k <= 0:
        raise ValueError(f"{fn}: shape entries must be positive, got {tuple(shape)}")
    nblocks = -(-n * k // _check_blocksize(blocksize, fn))
    check_tensor(qweight, "qweight", dtype=torch.uint8, shape=((n * k + 1) // 2,), fn=fn)
    off = _check_absmax(absmax, absmax_scale, absmax_code, offset, nblocks, fn)
    check_same_device(fn, qweight=qweight, absmax=absmax)
    return (n, k), off


def _ftz(t: torch.Tensor) -> torch.Tensor:
    """Flush float32 subnormals to zero, as bnb's fast-math (-ftz) kernels do."""
    return torch.where(t.abs() < torch.finfo(torch.float32).tiny, torch.zeros_like(t), t)


def _blocked(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """1-D -> ``[nblocks, blocksize]``, the tail block padded with zeros."""
    return torch.nn.functional.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)


def _dquantize8(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bnb CUDA ``dQuantize<0>``: 7-step binary search over ``code[256]``, then a midpoint test."""
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    lo_p, up_p = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lo_p, lower = torch.where(gt, pivot, lo_p), torch.where(gt, val, lower)
        up_p, upper = torch.where(gt, up_p, pivot), torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(up_p == 255, code[255], upper)
    lower = torch.where(lo_p == 0, code[0], lower)
    q = torch.where(x > val, torch.where(x > (upper + val) * 0.5, up_p, pivot),
                    torch.where(x < (lower + val) * 0.5, lo_p, pivot))
    return q.to(torch.uint8)


def dequantize_absmax(
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None = None,
    absmax_code: torch.Tensor | None = None,
    absmax_offset: float = 0.0,
) -> torch.Tensor:
    """Per-block absmax as float32 ``[nblocks]``: float32 as is, uint8 decoded (bnb's order of operations)."""
    fn = "nf4.dequantize_absmax"
    check_tensor(absmax, "absmax", ndim=1, fn=fn)
    nblocks = absmax.numel()
    off = _check_absmax(absmax, absmax_scale, absmax_code, absmax_offset, nblocks, fn)
    if absmax.dtype == torch.float32:
        return absmax
    vals = _blocked(absmax_code[absmax.long()], NESTED_BLOCKSIZE) * absmax_scale[:, None]
    return vals.reshape(-1)[:nblocks] + vals.new_tensor(off)  # a float32 add, as bnb's ``absmax += offset``


def dequantize_tensors(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    absmax_scale: torch.Tensor | None,
    absmax_code: torch.Tensor | None,
    absmax_offset: float,
    blocksize: int,
    shape: tuple[int, int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``NF4_CODE[q] * absmax`` as ``shape`` in ``dtype`` (computed in float32, as bnb does)."""
    fn = "nf4.dequantize_tensors"
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    (n, k), off = _check_packed(qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize, shape, fn)
    scale = dequantize_absmax(absmax, absmax_scale, absmax_code, off)
    q = torch.stack((qweight >> 4, qweight & 0xF), dim=-1).reshape(-1)[: n * k]
    vals = _blocked(qweight.new_tensor(_NF4_VALUES, dtype=torch.float32)[q.long()], blocksize) * scale[:, None]
    return vals.reshape(-1)[: n * k].view(n, k).to(dtype)


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """Packed NF4 weight ``[N, K]`` (see the module docstring for the layout)."""

    qweight: torch.Tensor
    absmax: torch.Tensor
    absmax_scale: torch.Tensor | None
    absmax_code: torch.Tensor | None
    absmax_offset: float
    blocksize: int
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        shape, off = _check_packed(self.qweight, self.absmax, self.absmax_scale, self.absmax_code,
                                   self.absmax_offset, self.blocksize, self.shape, "NF4Weight")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "absmax_offset", off)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """Checkpoint tensors, in a fixed order."""
        return {name: getattr(self, name) for name in _TENSOR_NAMES}

    def attributes(self) -> dict[str, int | float]:
        """Plain-python attributes needed besides the tensors."""
        return {"blocksize": self.blocksize, "out_features": self.shape[0], "in_features": self.shape[1],
                "absmax_offset": self.absmax_offset}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor | None], **attributes: object) -> NF4Weight:
        """Rebuild from ``tensors()`` and ``attributes()`` output, validating both."""
        fn = "NF4Weight.from_tensors"
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{fn}: tensors must be a dict, got {type(tensors).__name__}")
        unknown = sorted(set(tensors) - set(_TENSOR_NAMES))
        if unknown:
            raise ValueError(f"{fn}: unknown tensors {unknown}; expected {', '.join(_TENSOR_NAMES)}")
        missing = [key for key in ("qweight", "absmax") if tensors.get(key) is None]
        if missing:
            raise ValueError(f"{fn}: missing tensors {missing}")
        if set(attributes) != set(_ATTRIBUTE_NAMES):
            raise ValueError(f"{fn}: attributes must be {', '.join(_ATTRIBUTE_NAMES)}; got {sorted(attributes)}")
        shape = (attributes["out_features"], attributes["in_features"])
        return cls(tensors["qweight"], tensors["absmax"], tensors.get("absmax_scale"), tensors.get("absmax_code"),
                   attributes["absmax_offset"], attributes["blocksize"], shape)  # type: ignore[arg-type]


def quantize(
    weight: torch.Tensor,
    blocksize: int = 64,
    double_quant: bool = False,
    *,
    reciprocal: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> NF4Weight:
    """NF4-quantize ``weight[N, K]`` as bitsandbytes' CUDA ``quantize_4bit(quant_type="nf4")`` does.

    ``double_quant=True`` is bnb's ``compress_statistics=True``. Runs on ``weight``'s device.

    ``reciprocal`` maps the float32 block absmaxes to ``1 / absmax``; the default is the
    correctly rounded ``torch.reciprocal`` (subnormal results flushed). bnb's kernels use the
    fast-math ``rcp.approx.ftz.f32``, one ulp off for ~13% of mantissas, so with the default a
    code can differ from bnb's where ``w / absmax`` is within an ulp of a threshold (on an H100:
    6 codes in 268M random float32 weights, none in 203M mixed-dtype ones). A function that
    computes the same approximate reciprocal (e.g. a fast-math CUDA kernel) makes every code
    match. The double-quant offset is torch's ``absmax.mean()``, as in bnb, whose last bit can
    differ between CPU and CUDA: quantize on the device type bnb ran on to match it.
    """
    fn = "nf4.quantize"
    check_tensor(weight, "weight", dtype=FLOAT_DTYPES, ndim=2, fn=fn)
    check_not_empty(weight, "weight", fn)
    bs = _check_blocksize(blocksize, fn)
    if not isinstance(double_quant, bool):
        raise TypeError(f"{fn}: double_quant must be a bool, got {type(double_quant).__name__} {double_quant!r}")
    if reciprocal is not None and not callable(reciprocal):
        raise TypeError(f"{fn}: reciprocal must be callable, got {type(reciprocal).__name__}")
    check_finite(weight, "weight", fn)

    def rcp(t: torch.Tensor) -> torch.Tensor:
        r = _ftz(torch.reciprocal(t)) if reciprocal is None else reciprocal(t)
        if not isinstance(r, torch.Tensor) or r.dtype != torch.float32 or r.shape != t.shape:
            raise TypeError(f"{fn}: reciprocal must return a float32 tensor of shape {tuple(t.shape)}")
        return r

    numel = weight.numel()
    blocks = _blocked(_ftz(weight.detach().reshape(-1).to(torch.float32)), bs)
    absmax = blocks.abs().amax(dim=1)
    x = (blocks * rcp(absmax)[:, None]).reshape(-1)[: numel + (numel & 1)]
    q = torch.bucketize(x, x.new_tensor(NF4_THRESHOLDS.tolist())).to(torch.uint8)
    q = torch.where(torch.isnan(x), 0, q)  # all-zero block: 0 * (1/0); CUDA's tree codes NaN as 0
    qweight = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return NF4Weight(qweight, absmax, None, None, 0.0, bs, tuple(weight.shape))
    offset = absmax.mean()
    nested = _blocked(_ftz(absmax - offset), NESTED_BLOCKSIZE)
    scale = nested.abs().amax(dim=1)
    code = _dynamic_code().to(weight.device)
    qabs = _dquantize8((nested * rcp(scale)[:, None]).reshape(-1), code)[: absmax.numel()]
    return NF4Weight(qweight, qabs, scale, code.clone(), float(offset), bs, tuple(weight.shape))


def dequantize(p: NF4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``."""
    if not isinstance(p, NF4Weight):
        raise TypeError(f"nf4.dequantize: p must be an NF4Weight, got {type(p).__name__}")
    return dequantize_tensors(p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, p.blocksize,
                              p.shape, dtype)


def from_bnb(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, int],
    blocksize: int = 64,
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: float | torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    quant_map: torch.Tensor | None = None,
) -> NF4Weight:
    """:class:`NF4Weight` from the pieces of a bnb NF4 ``QuantState`` (no copy of the data).

    ``qweight``: bnb's packed weight (``[ceil(n/2), 1]``, any ``quant_storage`` dtype);
    ``absmax``: ``quant_state.absmax``; double-quantized states add ``nested_absmax``
    (``state2.absmax``), ``nested_code`` (``state2.code``) and ``offset``. ``quant_map``
    (``quant_state.code``), if given, must be the NF4 table.
    """
    fn = "nf4.from_bnb"
    check_tensor(qweight, "qweight", fn=fn)
    check_tensor(absmax, "absmax", dtype=(torch.uint8,) + FLOAT_DTYPES, fn=fn)
    if quant_map is not None:
        check_tensor(quant_map, "quant_map", dtype=FLOAT_DTYPES, shape=(16,), fn=fn)
        if not torch.equal(quant_map.detach().float().cpu(), NF4_CODE):
            raise ValueError(f"{fn}: quant_map is not the NF4 table (an fp4 checkpoint?)")
    given = [x is not None for x in (nested_absmax, nested_code, offset)]
    if any(given) and not all(given):
        raise ValueError(f"{fn}: nested_absmax, nested_code and offset go together, got {given}")
    if all(given) and nested_blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{fn}: nested_blocksize={nested_blocksize} is not supported (only 256)")
    qweight = qweight if qweight.dtype == torch.uint8 else qweight.contiguous().view(torch.uint8)
    absmax = absmax if absmax.dtype == torch.uint8 else absmax.float()
    return NF4Weight(qweight.reshape(-1), absmax.reshape(-1), nested_absmax, nested_code,
                     float(offset) if offset is not None else 0.0, blocksize, tuple(shape))


def to_bnb_state_dict(
    p: NF4Weight, prefix: str = "weight", dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The ``state_dict`` entries bnb's ``Linear4bit`` saves for ``p``; ``dtype`` is the recorded weight dtype."""
    fn = "nf4.to_bnb_state_dict"
    if not isinstance(p, NF4Weight):
        raise TypeError(f"{fn}: p must be an NF4Weight, got {type(p).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be float16, bfloat16 or float32, got {dtype!r}")
    meta: dict[str, object] = {"quant_type": "nf4", "blocksize": p.blocksize,
                               "dtype": str(dtype).replace("torch.", ""), "shape": list(p.shape)}
    sd = {prefix: p.qweight.view(-1, 1), f"{prefix}.absmax": p.absmax,
          f"{prefix}.quant_map": NF4_CODE.to(p.qweight.device)}
    if p.double_quant:
        sd.update({f"{prefix}.nested_absmax": p.absmax_scale, f"{prefix}.nested_quant_map": p.absmax_code})
        meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=p.absmax_offset)
    sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return sd


def from_bnb_state_dict(state_dict: Mapping[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
    """Read a bnb ``Linear4bit`` NF4 weight (keys ``prefix``, ``prefix.absmax``, ... as bnb saves them)."""
    fn = "nf4.from_bnb_state_dict"
    key = f"{prefix}.quant_state.bitsandbytes__nf4"
    if key not in state_dict:
        found = [k for k in state_dict if k.startswith(f"{prefix}.quant_state.")]
        raise ValueError(f"{fn}: no {key!r} in state_dict (found {found}); not a bnb NF4 weight")
    meta = json.loads(bytes(state_dict[key].cpu().tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4" or not isinstance(meta.get("shape"), list):
        raise ValueError(f"{fn}: quant state {meta} is not that of an NF4 weight with a shape")
    nested = f"{prefix}.nested_absmax" in state_dict
    return from_bnb(
        state_dict[prefix], state_dict[f"{prefix}.absmax"], tuple(meta["shape"]), meta["blocksize"],
        nested_absmax=state_dict.get(f"{prefix}.nested_absmax"),
        nested_code=state_dict.get(f"{prefix}.nested_quant_map"),
        offset=meta.get("nested_offset") if nested else None,
        nested_blocksize=meta.get("nested_blocksize", NESTED_BLOCKSIZE),
        quant_map=state_dict.get(f"{prefix}.quant_map"),
    )
