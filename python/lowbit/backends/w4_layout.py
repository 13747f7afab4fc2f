"""The weight layout of lowbit's CUDA 4-bit kernels (csrc/cuda/w4_*.cu): repack, decode, cache.

The checkpoint layouts (``lowbit.formats.int4`` / ``nf4``) stay the op inputs; the CUDA
kernels read a repacked copy made once per weight by :func:`packed_int4` / :func:`packed_nf4`
(pure torch, on the weight's device, no host synchronization) and cached per ``qweight``
tensor (weakly: the copy lives as long as the checkpoint tensor; an in-place change of
``qweight``, ``scales``, ``zeros`` or ``absmax`` is seen through the tensors' version
counters and repacks). ``lowbit.Linear`` therefore keeps its repacked layout as long as the
module keeps its buffers, while its ``state_dict`` holds the checkpoint tensors only.

The layout (one for both formats; ``N_pad = ceil(N/16)*16``, ``K_pad = ceil(K/64)*64``):

``packed_w`` int32 ``[N_pad/16, K_pad/64, 32, 4]``
    Row tile ``rt`` (rows ``16rt..16rt+15``), k block ``kb`` (``64kb..64kb+63``), lane
    ``l = 4g + t`` (``g = l//4``, ``t = l%4``), word ``j``: the 8 codes that lane ``l``
    feeds to the tensor core as its ``mma.m16n8k16`` A fragment in k step ``j``. Register
    ``i = rh + 2h`` (``rh, h`` in {0, 1}) of that fragment holds the weights of row
    ``16rt + g + 8rh`` at ``k = 64kb + 16t + 4j + 2h + e`` for ``e`` = 0, 1. The k order
    inside a 64-block is permuted this way (the same permutation applies to the
    activations, so the dot product is unchanged) so that lane ``l`` reads its activations
    ``x[token, 64kb+16t : 64kb+16t+16]`` as two 16-byte loads. One warp-wide 16-byte load
    per lane reads one (row tile, k block): 512 contiguous bytes.
    int4: code ``(rh, h, e)`` at bits ``4(rh + 2h) + 16e`` of the word, so that
    ``(word >> 4i) & 0x000f000f`` holds register i's two codes as two 16-bit lanes.
    nf4: code ``(rh, h, e)`` at bits ``8(rh + 2h) + 4e``: byte ``i`` indexes a 256-entry
    table of code pairs.
    Padded rows/columns hold code 0.

``packed_s`` (activation dtype)
    int4 ``[N_pad/16, n_groups, 8, 2, 2]``: for row tile ``rt``, group ``q``, ``g``,
    ``rh``: ``(scale, -zero * scale)`` of row ``16rt + g + 8rh`` (``zero`` = 8 when
    symmetric), so that ``w = q * scale + (-zero * scale)`` is one fused multiply-add.
    nf4 ``[N_pad/16, n_groups, 8, 2]``: the block absmax (double quantization decoded) of
    row ``16rt + g + 8rh``.
    Groups are the format's groups along K (int4 ``group_size``, nf4 ``blocksize``, which
    must divide K); ``n_groups = K_pad / G`` (1 for a per-channel int4 weight whose K is no
    power of two). Padded groups and rows have scale 0.

:func:`decode` turns the packed layout back into the dense weight with the kernels' own
arithmetic; the tests check it against the formats' dequantizers on the CPU.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ..formats import nf4 as _nf4

INT4, NF4 = 0, 1
_FMT_NAMES = {INT4: "int4", NF4: "nf4"}


@dataclass(frozen=True, eq=False)
class PackedW4:
    """A weight in the CUDA kernels' layout (see the module docstring)."""

    fmt: int  # INT4 or NF4
    packed_w: torch.Tensor  # int32 [N_pad/16, K_pad/64, 32, 4]
    packed_s: torch.Tensor  # activation dtype
    n: int
    k: int
    group_size: int
    num_groups: int

    @property
    def n_pad(self) -> int:
        return self.packed_w.shape[0] * 16

    @property
    def k_pad(self) -> int:
        return self.packed_w.shape[1] * 64

    @property
    def dtype(self) -> torch.dtype:
        return self.packed_s.dtype

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed_w, self.packed_s))


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def layout_supports(k: int, group_size: int) -> bool:
    """True if a ``[N, K]`` weight with groups of ``group_size`` along K has this layout:
    K a multiple of 32, and groups of a power of two >= 32 or one group per row."""
    if k <= 0 or k % 32 or group_size <= 0 or k % group_size:
        return False
    return group_size == k or (group_size >= 32 and group_size & (group_size - 1) == 0)


def num_groups(k: int, group_size: int) -> int:
    k_pad = _round_up(k, 64)
    if group_size == k and (group_size & (group_size - 1)):
        return 1
    return k_pad // group_size


def _shift(fmt: int, rh: int, h: int, e: int) -> int:
    """Bit position of code (rh, h, e) in its word (see the module docstring)."""
    return 4 * (rh + 2 * h) + 16 * e if fmt == INT4 else 8 * (rh + 2 * h) + 4 * e


def _to_words(codes: torch.Tensor, fmt: int) -> torch.Tensor:
    """codes ``[N_pad, K_pad]`` (0..15) -> packed_w int32 ``[N_pad/16, K_pad/64, 32, 4]``."""
    n_pad, k_pad = codes.shape
    # n = 16rt + 8rh + g; k = 64kb + 16t + 4j + 2h + e
    c = codes.view(n_pad // 16, 2, 8, k_pad // 64, 4, 4, 2, 2)  # rt rh g kb t j h e
    words = torch.zeros((n_pad // 16, 8, k_pad // 64, 4, 4), dtype=torch.int64, device=codes.device)
    for rh in range(2):
        for h in range(2):
            for e in range(2):
                words |= c[:, rh, :, :, :, :, h, e].to(torch.int64) << _shift(fmt, rh, h, e)
    words = words.permute(0, 2, 1, 3, 4).reshape(n_pad // 16, k_pad // 64, 32, 4)  # rt kb (g t) j
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _from_words(packed_w: torch.Tensor, fmt: int) -> torch.Tensor:
    """Inverse of :func:`_to_words`: codes ``[N_pad, K_pad]`` as int64."""
    n_rt, n_kb = packed_w.shape[:2]
    w = (packed_w.to(torch.int64) & 0xFFFFFFFF).view(n_rt, n_kb, 8, 4, 4).permute(0, 2, 1, 3, 4)  # rt g kb t j
    codes = torch.empty((n_rt, 2, 8, n_kb, 4, 4, 2, 2), dtype=torch.int64, device=packed_w.device)
    for rh in range(2):
        for h in range(2):
            for e in range(2):
                codes[:, rh, :, :, :, :, h, e] = (w >> _shift(fmt, rh, h, e)) & 0xF
    return codes.reshape(n_rt * 16, n_kb * 64)


def _per_row_tile(s: torch.Tensor, n_pad: int, n_groups: int) -> torch.Tensor:
    """``[N, G#]`` (padded with zeros to ``[N_pad, n_groups]``) -> ``[N_pad/16, n_groups, 8, 2]``."""
    s = torch.nn.functional.pad(s, (0, n_groups - s.shape[1], 0, n_pad - s.shape[0]))
    return s.view(n_pad // 16, 2, 8, n_groups).permute(0, 3, 2, 1)  # rt q g rh


def repack_int4(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> PackedW4:
    """The int4 checkpoint tensors in the CUDA layout, scales in ``dtype`` (fp16/bf16)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    n_pad, k_pad, ng = _round_up(n, 16), _round_up(k, 64), num_groups(k, group_size)
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(n, k)
    codes = torch.nn.functional.pad(q, (0, k_pad - k, 0, n_pad - n))
    s32 = scales.float()
    z32 = zeros.float() if zeros is not None else torch.full_like(s32, 8.0)
    s = _per_row_tile(s32, n_pad, ng)
    zs = _per_row_tile(-z32 * s32, n_pad, ng)
    packed_s = torch.stack((s, zs), dim=-1).to(dtype).contiguous()
    return PackedW4(INT4, _to_words(codes, INT4).contiguous(), packed_s, n, k, group_size, ng)


def repack_nf4(qweight, absmax, absmax_scale, absmax_code, absmax_offset: float, blocksize: int,
               shape: tuple[int, int], dtype: torch.dtype) -> PackedW4:
    """The NF4 (bitsandbytes layout) tensors in the CUDA layout; needs ``blocksize | K``."""
    n, k = shape
    n_pad, k_pad, ng = _round_up(n, 16), _round_up(k, 64), num_groups(k, blocksize)
    q = torch.stack((qweight >> 4, qweight & 0xF), dim=-1).reshape(-1)[: n * k].view(n, k)
    codes = torch.nn.functional.pad(q, (0, k_pad - k, 0, n_pad - n))
    scale = _nf4.dequantize_absmax(absmax, absmax_scale, absmax_code, absmax_offset).view(n, k // blocksize)
    packed_s = _per_row_tile(scale.float(), n_pad, ng).to(dtype).contiguous()
    return PackedW4(NF4, _to_words(codes, NF4).contiguous(), packed_s, n, k, blocksize, ng)


def decode(p: PackedW4) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``p.dtype`` with the kernels' arithmetic: int4
    ``fma(q, scale, -zero*scale)`` rounded once; nf4 ``code * absmax`` rounded once, with the
    code value and the absmax each first rounded to the activation dtype."""
    codes = _from_words(p.packed_w, p.fmt)  # [N_pad, K_pad]
    n_pad, k_pad = codes.shape
    g = p.k_pad // p.num_groups  # the group length in the padded K (K_pad when n_groups == 1)
    if p.fmt == INT4:
        s = p.packed_s[..., 0].float()
        zs = p.packed_s[..., 1].float()
    else:
        s = p.packed_s.float()
    def dense(t):  # [rt, q, g, rh] -> [N_pad, K_pad]
        t = t.permute(0, 3, 2, 1).reshape(n_pad, p.num_groups)
        return t.repeat_interleave(g, dim=1)
    if p.fmt == INT4:
        w = codes.float() * dense(s) + dense(zs)  # exact in float32 for these operands
    else:
        table = _nf4.NF4_CODE.to(device=codes.device).to(p.dtype).float()
        w = table[codes] * dense(s)
    return w.to(p.dtype)[: p.n, : p.k]


# ---- the cache: one packed copy per (qweight tensor, activation dtype) -------------------------

_cache: "torch.utils.weak.WeakIdKeyDictionary"
try:
    from torch.utils.weak import WeakIdKeyDictionary

    _cache = WeakIdKeyDictionary()
except ImportError:  # pragma: no cover - torch < 2.0
    _cache = None  # type: ignore[assignment]


def _version(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot change)
        return None


def _ref(t: torch.Tensor | None):
    return None if t is None else weakref.ref(t)


def _lookup(qweight: torch.Tensor, key: tuple, others: tuple, make, check=None) -> PackedW4:
    """The cached packed copy for ``qweight`` and ``key`` if ``others`` (the other tensors
    it was made from) are the same objects at the same versions; else ``check()`` (if given)
    and a new one."""
    stamp = (_version(qweight),) + tuple(_version(t) for t in others)
    entries = _cache.get(qweight) if _cache is not None else None
    if entries is not None:
        hit = entries.get(key)
        if hit is not None:
            refs, old_stamp, packed = hit
            if old_stamp == stamp and all((r() if r is not None else None) is t for r, t in zip(refs, others)):
                return packed
    if check is not None:
        check()
    packed = make()
    if _cache is not None:
        if entries is None:
            entries = {}
            _cache[qweight] = entries
        entries[key] = (tuple(_ref(t) for t in others), stamp, packed)
    return packed


def packed_int4(qweight, scales, zeros, group_size: int, dtype: torch.dtype, check=None) -> PackedW4:
    """The cached CUDA-layout copy of an int4 weight for activations of ``dtype``
    (``check()`` runs before a copy is made)."""
    return _lookup(qweight, (INT4, dtype, group_size), (scales, zeros),
                   lambda: repack_int4(qweight, scales, zeros, group_size, dtype), check)


def packed_nf4(qweight, absmax, absmax_scale, absmax_code, absmax_offset: float, blocksize: int,
               shape: tuple[int, int], dtype: torch.dtype, check=None) -> PackedW4:
    """The cached CUDA-layout copy of an NF4 weight for activations of ``dtype``
    (``check()`` runs before a copy is made)."""
    key = (NF4, dtype, blocksize, tuple(shape), float(absmax_offset))
    return _lookup(qweight, key, (absmax, absmax_scale, absmax_code),
                   lambda: repack_nf4(qweight, absmax, absmax_scale, absmax_code, absmax_offset, blocksize,
                                      shape, dtype), check)


def cached(qweight: torch.Tensor) -> list[PackedW4]:
    """The packed copies cached for ``qweight`` (for tests and introspection)."""
    entries = _cache.get(qweight) if _cache is not None else None
    return [] if not entries else [v[2] for v in entries.values()]
