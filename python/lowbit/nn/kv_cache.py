"""``lowbit.QuantizedKVCache``: a growing int8 / int4 key-value cache with attention over it.

Keys and values arrive as ``[B, H_kv, S_new, D]`` floats, are quantized once with
``lowbit.formats.kv.quantize_kv`` and written after the tokens already held; ``attend``
runs ``lowbit.ops.kv_attention`` over the filled prefix. Storage is allocated at the first
``append`` (shape, device taken from ``k``) and grows geometrically (doubling), so ``n``
appends cost O(n) copies in total; with ``max_seq_len`` it is allocated once at that size
and never moves (static shapes, e.g. for CUDA graphs).

Not an ``nn.Module``: a cache is per-request state, not model state (no ``state_dict``).
:meth:`to` moves it between devices.

The prefix views handed to the op are ``[B, H, S, ...]`` slices of ``[B, H, capacity, ...]``
storage: each token row is contiguous, the head and batch strides span the capacity.
"""

from __future__ import annotations

import torch

from .. import ops
from .._checks import FLOAT_DTYPES, check_positive_int, check_tensor
from ..formats import kv as _kv

_FN = "lowbit.QuantizedKVCache"
#: capacity of the first allocation when no max_seq_len is given (grows by doubling)
MIN_CAPACITY = 16


class QuantizedKVCache:
    """Quantized KV cache: ``bits=8`` (int8, one scale per token and head) or ``bits=4``
    (groups of 32 along ``head_dim`` with scale and zero point; ``head_dim % 32 == 0``).

    ``max_seq_len`` (optional) bounds the number of tokens; storage is then allocated once.
    """

    def __init__(self, bits: int = 8, *, max_seq_len: int | None = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int):
            raise TypeError(f"{_FN}: bits must be an int (4 or 8), got {type(bits).__name__} {bits!r}")
        if bits not in _kv.KV_BITS:
            raise ValueError(f"{_FN}: bits must be 4 or 8, got {bits}")
        if max_seq_len is not None:
            check_positive_int(max_seq_len, "max_seq_len", _FN)
        self.bits = bits
        self.max_seq_len = max_seq_len
        self._len = 0
        # name -> storage [B, H, capacity, ...]: k_data, k_scale, k_zero, v_data, v_scale, v_zero
        self._store: dict[str, torch.Tensor | None] = {}
        self._shape: tuple[int, int, int] | None = None  # (B, H_kv, D) of the stored tokens

    # ---- size ----

    @property
    def seq_len(self) -> int:
        """Number of tokens held."""
        return self._len

    def __len__(self) -> int:
        return self._len

    @property
    def capacity(self) -> int:
        """Tokens the current storage holds before it must grow (0 before the first append)."""
        return 0 if not self._store else self._store["k_data"].shape[2]

    @property
    def device(self) -> torch.device | None:
        return None if not self._store else self._store["k_data"].device

    def reset(self) -> None:
        """Forget every token. Storage is kept for the next sequence; the next ``append``
        may bring a different batch size, head count or head dim (then it is reallocated)."""
        self._len = 0

    def to(self, device: torch.device | str) -> QuantizedKVCache:
        """Move the storage to ``device`` (in place); returns ``self``."""
        self._store = {k: None if t is None else t.to(device) for k, t in self._store.items()}
        return self

    # ---- writing ----

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize ``k``, ``v`` ``[B, H_kv, S_new, D]`` (float16/bfloat16/float32) and store them
        after the tokens already held."""
        fn = f"{_FN}.append"
        check_tensor(k, "k", dtype=FLOAT_DTYPES, ndim=4, fn=fn)
        check_tensor(v, "v", dtype=FLOAT_DTYPES, ndim=4, fn=fn)
        if k.shape != v.shape:
            raise ValueError(f"{fn}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.device != v.device:
            raise ValueError(f"{fn}: k and v must be on one device, got {k.device} and {v.device}")
        b, h, s_new, d = k.shape
        if b == 0 or h == 0 or d == 0:
            raise ValueError(f"{fn}: k must have B, H_kv, D > 0, got shape {tuple(k.shape)}")
        if self.bits == 4 and d % _kv.GROUP_SIZE_4BIT:
            raise ValueError(f"{fn}: a 4-bit cache needs head_dim divisible by {_kv.GROUP_SIZE_4BIT}, got D={d}")
        if self._len and (b, h, d) != self._shape:
            raise ValueError(
                f"{fn}: the cache holds [B={self._shape[0]}, H_kv={self._shape[1]}, S, D={self._shape[2]}] "
                f"tokens, got k of shape {tuple(k.shape)}"
            )
        if self._len and k.device != self.device:
            raise ValueError(f"{fn}: the cache is on {self.device}, got k on {k.device}")
        if self.max_seq_len is not None and self._len + s_new > self.max_seq_len:
            raise ValueError(
                f"{fn}: appending {s_new} tokens to {self._len} exceeds max_seq_len={self.max_seq_len}"
            )
        if s_new == 0:
            return
        quantized = dict(zip(("k_data", "k_scale", "k_zero"), _kv.quantize_kv(k, self.bits)))
        quantized.update(zip(("v_data", "v_scale", "v_zero"), _kv.quantize_kv(v, self.bits)))
        self._reserve(quantized, (b, h, d), self._len + s_new)
        for name, t in quantized.items():
            if t is not None:
                self._store[name][:, :, self._len : self._len + s_new] = t
        self._len += s_new

    def _reserve(self, sample: dict[str, torch.Tensor | None], shape: tuple[int, int, int], needed: int) -> None:
        """Make the storage hold ``needed`` tokens of ``sample``'s layout, keeping the filled prefix."""
        fresh = self._len == 0 and (shape != self._shape or not self._store or self.device != sample["k_data"].device)
        if not fresh and needed <= self.capacity:
            return
        if self.max_seq_len is not None:
            cap = self.max_seq_len
        else:
            cap = max(needed, MIN_CAPACITY, 0 if fresh else 2 * self.capacity)
        store: dict[str, torch.Tensor | None] = {}
        for name, t in sample.items():
            if t is None:
                store[name] = None
                continue
            new = t.new_zeros((*t.shape[:2], cap, *t.shape[3:]))
            if not fresh and self._len:
                new[:, :, : self._len] = self._store[name][:, :, : self._len]
            store[name] = new
        self._store, self._shape = store, shape

    # ---- reading ----

    def _prefix(self, name: str) -> torch.Tensor | None:
        t = self._store.get(name)
        return None if t is None else t[:, :, : self._len]

    def quantized(self) -> dict[str, torch.Tensor | None]:
        """Views of the filled prefix: ``k_data, k_scale, k_zero, v_data, v_scale, v_zero``
        (the ``lowbit.formats.kv`` layout; zeros are None for 8 bits)."""
        return {name: self._prefix(name) for name in ("k_data", "k_scale", "k_zero", "v_data", "v_scale", "v_zero")}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """The held keys and values as floats ``[B, H_kv, S, D]`` (what attention sees)."""
        if not self._len:
            raise ValueError(f"{_FN}.dequantize: the cache is empty")
        q = self.quantized()
        return (
            _kv.dequantize_kv(q["k_data"], q["k_scale"], q["k_zero"], dtype),
            _kv.dequantize_kv(q["v_data"], q["v_scale"], q["v_zero"], dtype),
        )

    def attend(self, q: torch.Tensor, causal: bool = True, scale: float | None = None) -> torch.Tensor:
        """``softmax(q K^T * scale) V`` over the held tokens; ``q [B, H_q, S_q, D]`` with
        ``H_q`` a multiple of ``H_kv``. ``causal`` masks bottom-right aligned (the ``S_q``
        queries are the last ``S_q`` tokens). ``scale`` defaults to ``D ** -0.5``."""
        fn = f"{_FN}.attend"
        check_tensor(q, "q", dtype=FLOAT_DTYPES, ndim=4, fn=fn)
        if not self._len:
            raise ValueError(f"{fn}: the cache is empty; append keys and values first")
        b, h, d = self._shape
        if q.shape[0] != b or q.shape[3] != d:
            raise ValueError(
                f"{fn}: q must have shape [B={b}, H_q, S_q, D={d}] for this cache, got {tuple(q.shape)}"
            )
        if q.shape[1] % h:
            raise ValueError(f"{fn}: query heads ({q.shape[1]}) must be a multiple of the cache's kv heads ({h})")
        p = self.quantized()
        return ops.kv_attention(
            q, p["k_data"], p["k_scale"], p["k_zero"], p["v_data"], p["v_scale"], p["v_zero"], causal, scale
        )

    def __repr__(self) -> str:
        shape = "unallocated" if self._shape is None else "B={}, H_kv={}, D={}".format(*self._shape)
        return f"QuantizedKVCache(bits={self.bits}, seq_len={self._len}, capacity={self.capacity}, {shape})"
