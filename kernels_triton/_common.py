"""Shared machinery of the Triton kernels: configurations, the per-shape choice cache, split-K.

Every op family offers a small, fixed list of candidate :class:`Config` s for a call (which
kernel "path" - e.g. a GEMV, a tensor-core tile kernel, or dequantize-then-cuBLAS - and its
block sizes). :class:`ConfigCache` times the candidates once per shape key on the GPU (each
run preceded by an L2 flush, CUDA events, the median of a few runs) and keeps the fastest;
later calls with the same key go straight to it.

Tuning is skipped - the first candidate, the heuristic default, runs - when:
* Triton runs in its interpreter (``TRITON_INTERPRET=1``, CPU tests);
* the current stream is being captured into a CUDA graph (nothing may synchronise then);
  the choice is not cached, so the first eager call still tunes;
* ``LOWBIT_TRITON_AUTOTUNE=0`` is set (deterministic runs).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

#: Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when these modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
AUTOTUNE_ENV = "LOWBIT_TRITON_AUTOTUNE"
_L2_FLUSH_BYTES = 128 << 20

#: L2 policy of the loads that stream a weight or a KV cache (read once a call). Off by default:
#: measured on an H100 (bench/NOTES.md, eighth session) evict-first made the tuned Triton
#: matmuls 1-28% slower at M=16 and mixed at M=1 (Triton 3.6 keeps the hint only on loads its
#: pipeliner leaves in registers), unlike the CUDA kernels' cp.async stream, which it speeds up
#: 10%. ``LOWBIT_TRITON_L2_HINT=1`` turns it on (A/B runs).
STREAM = tl.constexpr("evict_first" if os.environ.get("LOWBIT_TRITON_L2_HINT", "0") not in ("", "0") else "")


@dataclass(frozen=True)
class Config:
    """One way to run a call: a path name, its constexpr block sizes, warps and stages."""

    path: str
    params: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 3
    extra: tuple[tuple[str, int], ...] = field(default=())  # non-constexpr launch choices (split-K)

    def __getitem__(self, name: str) -> int:
        for k, v in self.params + self.extra:
            if k == name:
                return v
        raise KeyError(name)

    def get(self, name: str, default: int | None = None) -> int | None:
        try:
            return self[name]
        except KeyError:
            return default

    def constexprs(self) -> dict[str, int]:
        return dict(self.params)

    def launch_opts(self) -> dict[str, int]:
        """``num_warps``/``num_stages`` for a compiled launch (the interpreter takes them too)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def __str__(self) -> str:
        p = ",".join(f"{k}={v}" for k, v in self.params + self.extra)
        return f"{self.path}[{p}|w{self.num_warps}s{self.num_stages}]"


def cfg(path: str, num_warps: int = 4, num_stages: int = 3, extra: dict | None = None, **params: int) -> Config:
    return Config(path, tuple(params.items()), num_warps, num_stages, tuple((extra or {}).items()))


def tuning_enabled(device: torch.device) -> bool:
    if INTERPRET or device.type != "cuda":
        return False
    if os.environ.get(AUTOTUNE_ENV, "1").strip() in ("0", "false", "no", "off"):
        return False
    return not torch.cuda.is_current_stream_capturing()


_flush_buffers: dict[int, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    buf = _flush_buffers.get(idx)
    if buf is None:
        buf = _flush_buffers[idx] = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)
    buf.zero_()


def _host_time(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median host (CPU) seconds to enqueue ``fn``: what an eager caller waits before the next op."""
    import time

    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def _device_time(fn: Callable[[], object], device: torch.device) -> float:
    """Median device seconds of ``fn`` replayed from a CUDA graph (no host overhead), L2 flushed
    before each replay; falls back to events around eager calls if capture fails."""
    graph = None
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        global _counters_in_capture
        _counters_in_capture = True  # time the in-kernel split-K reduction eager calls use
        try:
            with torch.cuda.graph(graph, stream=stream):  # the stream whose counters the warm-up made
                fn()
        finally:
            _counters_in_capture = False
        run = graph.replay
    except Exception:  # noqa: BLE001 - capture unsupported for this call: time it eagerly
        graph = None
        torch.cuda.synchronize(device)
        run = fn
    times: list[float] = []
    n = 3
    while len(times) < n:
        _flush_l2(device)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        run()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e-3)
        if len(times) == 3:  # more runs for fast candidates (about 3 ms per candidate)
            n = max(3, min(15, int(3e-3 / max(statistics.median(times), 1e-7))))
    del graph
    return statistics.median(times)


def bench(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(device time, host enqueue time) of one candidate, seconds: the device time measured from
    a CUDA-graph replay (L2 flushed), the host time the Python + launch cost of an eager call."""
    fn()  # compile / warm up
    torch.cuda.synchronize(device)
    return _device_time(fn, device), _host_time(fn, device)


#: Candidates within this factor of the best device time are compared on host time.
_TIE = 1.02
#: Candidates within this factor of the best first measurement are timed again.
_CLOSE = 1.08


def _second_look(timed: list[tuple[Config, float, float]], run: Callable[[Config], object],
                 device: torch.device, most: int = 4) -> list[tuple[Config, float, float]]:
    """``timed`` with the device times of the (up to ``most``) candidates within 8% of the best
    replaced by the mean of two measurements: one pass's median moves by a few percent, enough to
    keep a kernel 5-9% slower (seen on an H100: the int4 GEMV of 28672x8192, 65.6 vs 71.8 us)."""
    if len(timed) < 2:
        return timed
    low = min(d for _, d, _ in timed)
    close = sorted((t for t in timed if t[1] <= low * _CLOSE), key=lambda t: t[1])[:most]
    if len(close) < 2:
        return timed
    again = {id(c): (d + _device_time(lambda c=c: run(c), device)) / 2 for c, d, _ in close}
    return [(c, again.get(id(c), d), h) for c, d, h in timed]


def best_of(timed: Sequence[tuple[Config, float, float]]) -> Config:
    """The candidate to keep from (config, device s, host s) triples: the lowest device time -
    what the GPU is busy for, all a CUDA graph replays, and what an eager caller pays once its
    host runs ahead of the GPU; among those within 2% of it, the lowest host time. (Scoring by
    ``max(device, host)`` let this VM's slow host time - 35-100 us a call - pick kernels 3x
    slower on the device; a 5% tie band kept GEMVs 5-9% slower once split-K needed no second
    launch.)"""
    low = min(d for _, d, _ in timed)
    return min((t for t in timed if t[1] <= low * _TIE), key=lambda t: t[2])[0]


class ConfigCache:
    """Chosen configuration per shape key, for one op family."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._chosen: dict[tuple, Config] = {}
        self.timings: dict[tuple, list[tuple[str, float]]] = {}

    def choose(
        self,
        key: tuple,
        candidates: Sequence[Config],
        run: Callable[[Config], object],
        device: torch.device,
    ) -> Config:
        """The cached choice for ``key``, else the fastest candidate (or the first, untuned)."""
        hit = self._chosen.get(key)
        if hit is not None:
            return hit
        if not candidates:
            raise RuntimeError(f"lowbit.kernels_triton.{self.name}: no candidate configuration for {key}")
        if len(candidates) == 1 or not tuning_enabled(device):
            if not _capturing(device):  # a choice made during capture is not kept: tune later
                self._chosen[key] = candidates[0]
            return candidates[0]
        results: list[tuple[str, float]] = []
        timed: list[tuple[Config, float, float]] = []
        for c in candidates:
            try:
                d, h = bench(lambda c=c: run(c), device)
            except (triton.runtime.errors.OutOfResources, RuntimeError) as e:  # too much smem, etc.
                results.append((f"{c} failed: {type(e).__name__}", float("inf")))
                continue
            results.append((str(c), max(d, h)))
            timed.append((c, d, h))
        timed = _second_look(timed, run, device)
        best = best_of(timed) if timed else candidates[0]
        self._chosen[key] = best
        self.timings[key] = results
        return best

    def chosen(self) -> dict[tuple, Config]:
        return dict(self._chosen)

    def clear(self) -> None:
        self._chosen.clear()
        self.timings.clear()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


CACHES: dict[str, ConfigCache] = {}


def cache_for(name: str) -> ConfigCache:
    if name not in CACHES:
        CACHES[name] = ConfigCache(name)
    return CACHES[name]


def pick(
    cache: ConfigCache,
    key: tuple,
    candidates: Callable[[], Sequence[Config]],
    run: Callable[[Config], object],
    device: torch.device,
    config: Config | str | None,
) -> Config:
    """The configuration for a call: ``config`` if given (a Config, or a path name: that
    path's first candidate), else the cached choice for ``key``, else tune ``candidates()``
    (built only on a cache miss: the hit path is a dict lookup)."""
    if isinstance(config, Config):
        return config
    if config is None:
        hit = cache._chosen.get(key)
        if hit is not None:
            return hit
    cands = candidates()
    if isinstance(config, str):
        for c in cands:
            if c.path == config:
                return c
        raise ValueError(f"lowbit.kernels_triton.{cache.name}: path {config!r} cannot run this call "
                         f"(paths: {sorted({c.path for c in cands})})")
    return cache.choose(key, cands, run, device)


def with_unsplit(configs: list[Config], count: int = 2) -> list[Config]:
    """``configs`` plus SPLIT_K=1 twins of the first ``count`` split ones: one launch fewer (no
    reduction kernel) can beat the better-filled GPU when the host's launch cost dominates."""
    twins = []
    for c in configs:
        if c.get("SPLIT_K", 1) > 1 and len(twins) < count:
            twins.append(Config(c.path, c.params, c.num_warps, c.num_stages,
                                tuple((k, 1 if k == "SPLIT_K" else v) for k, v in c.extra)))
    return configs + twins


def tile_configs(path: str, shapes, m: int, n: int, k: int, bk_max: int, device: torch.device,
                 extra: dict | None = None, swap_ab: bool = False) -> list[Config]:
    """Configs of a tensor-core tile path from ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)``
    shapes (``(BLOCK_N, BLOCK_M, ...)`` for ``swap_ab``), BLOCK_K capped at ``bk_max`` and the K
    loop split so the tiles fill the GPU."""
    out = []
    for a, b, bk, w, st in shapes:
        bm, bn = (b, a) if swap_ab else (a, b)
        bk = min(bk, bk_max)
        split = split_k_for(triton.cdiv(m, bm) * triton.cdiv(n, bn), k // bk, device)
        out.append(cfg(path, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st,
                       extra={"SPLIT_K": split, **(extra or {})}))
    return out


def swap_ab_shapes(m: int, bk: int) -> tuple[tuple[int, int, int, int, int], ...]:
    """Swap-AB tile shapes ``(BLOCK_N, BLOCK_M, BLOCK_K, warps, stages)`` for ``m`` rows: the batch
    on the MMA's narrow side, several pipeline stages of weight words in shared memory."""
    if m <= 16:
        return ((64, 16, bk, 4, 4), (128, 16, bk, 8, 4), (64, 16, bk, 4, 6), (128, 16, 64, 8, 6))
    if m <= 64:
        return ((128, 64, 64, 8, 4), (64, 64, 64, 4, 4), (128, 32, bk, 8, 4))
    return ((128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4))


def m_bucket(m: int) -> int:
    """Rows of the activation, rounded up to a power of two (the cache key's batch)."""
    return 1 if m <= 1 else triton.next_power_of_2(m)


_sm_counts: dict[tuple[str, int | None], int] = {}


def num_sms(device: torch.device) -> int:
    """Multiprocessors (CUDA), or a nominal 8 elsewhere (interpreter: fewer programs is faster)."""
    key = (device.type, device.index)
    if key not in _sm_counts:
        n = 8
        if device.type == "cuda" and not INTERPRET:
            n = torch.cuda.get_device_properties(device).multi_processor_count
        _sm_counts[key] = n
    return _sm_counts[key]


def split_k_for(programs: int, k_steps: int, device: torch.device, max_split: int = 16, per_sm: int = 2) -> int:
    """Split the K loop so that about ``per_sm`` programs per multiprocessor run; each split
    keeps at least 4 steps. (Decode-shaped calls stream the weight once: enough programs in
    flight is what keeps enough loads in flight.)"""
    want = max(1, (per_sm * num_sms(device) + programs - 1) // max(programs, 1))
    split = 1
    while split * 2 <= min(want, max_split) and k_steps // (split * 2) >= 4:
        split *= 2
    return split


def runs_per_step(runs: int, want: int) -> int:
    """GEMV steps: the largest power of two <= ``want`` dividing ``runs`` (the group- or
    block-long runs of a row). Reading several runs of a row per step matters on GPUs: the bytes
    each thread has in flight, not the instruction count, bound a decode GEMV's bandwidth."""
    ng = max(1, want)
    while runs % ng:
        ng //= 2
    return ng


@triton.jit
def tile_of_program(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of a split-K tile kernel (grid: tiles, K splits): ``(pid_k,
    offs_m, offs_n, m_mask, n_mask, rows64)``, tiles ordered in groups of GROUP_M row tiles (L2
    reuse of W); ``rows64`` = ``offs_n`` as int64 (weight-row offsets)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gm = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gm
    pid_n = (pid % width) // gm
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return tl.program_id(1), offs_m, offs_n, offs_m < M, offs_n < N, offs_n.to(tl.int64)


@triton.jit
def xt_pair_ptrs(x_ptr, offs_m, stride_xm, stride_xk, HB: tl.constexpr, PAIRS: tl.constexpr):
    """Pointers (at K column 0) for :func:`load_xt_pairs`' [HB, BLOCK_M] tiles of x^T."""
    if PAIRS:
        w_ptr = x_ptr.to(tl.pointer_type(tl.int32))
        return w_ptr + offs_m.to(tl.int64)[None, :] * (stride_xm // 2) + tl.arange(0, HB)[:, None]
    else:
        return x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (2 * tl.arange(0, HB))[:, None] * stride_xk


@triton.jit
def load_xt_pairs(x_ptr, ptrs, k0, m_mask, stride_xk, PAIRS: tl.constexpr):
    """The even and the odd rows of x^T (columns ``k0 + 2j`` and ``k0 + 2j + 1`` of x), [HB,
    BLOCK_M] each: the operands that meet a packed byte's two nibbles. ``PAIRS`` (unit stride
    along K, even row stride, 4-byte aligned): one int32 word a pair, split in registers (half
    the load instructions of two strided 2-byte loads, which made L1, not DRAM, the limit)."""
    if PAIRS:
        DT: tl.constexpr = x_ptr.dtype.element_ty
        w = tl.load(ptrs + k0 // 2, mask=m_mask[None, :], other=0)
        return (w & 0xFFFF).to(tl.int16).to(DT, bitcast=True), (w >> 16).to(tl.int16).to(DT, bitcast=True)
    else:
        xe = tl.load(ptrs + k0 * stride_xk, mask=m_mask[None, :], other=0.0)
        xo = tl.load(ptrs + (k0 + 1) * stride_xk, mask=m_mask[None, :], other=0.0)
        return xe, xo


def x_pairs_ok(x2: torch.Tensor) -> bool:
    """Whether :func:`load_xt_pairs` may read ``x2 [M, K]`` (16-bit) as int32 pairs. (The
    interpreter cannot bitcast to bfloat16.)"""
    return (x2.element_size() == 2 and x2.stride(1) == 1 and (x2.stride(0) % 2 == 0 or x2.shape[0] == 1)
            and x2.data_ptr() % 4 == 0 and not (INTERPRET and x2.dtype == torch.bfloat16))


@triton.jit
def store_out(acc, offs_m, offs_n, m_mask, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
              HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """Store a float32 [BLOCK_M, BLOCK_N] result: ``y`` in its dtype, bias added; or, for a
    K split (``PARTIAL``, see :func:`split_k_buffers`), the split's slice of the partial buffer
    ``[SPLIT, M, N]``, and (``PARTIAL == 2``) ``y`` too if this program is the tile's last split."""
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if PARTIAL:
        p_ptrs = p_ptr + rows * N + offs_n[None, :]
        tl.store(p_ptrs + pid_k.to(tl.int64) * M * N, acc, mask=mask)
        if PARTIAL == 2:
            acc, last = _sum_if_last_split(acc, p_ptrs, M * N, mask, c_ptr)
            if last:
                _store_y(acc, y_ptr + rows * stride_ym + offs_n[None, :], b_ptr + offs_n, mask, n_mask[None, :],
                         HAS_BIAS)
    else:
        _store_y(acc, y_ptr + rows * stride_ym + offs_n[None, :], b_ptr + offs_n, mask, n_mask[None, :], HAS_BIAS)


@triton.jit
def store_row(acc, m, offs_n, n_mask, pid_k, M, N, b_ptr, y_ptr, p_ptr, c_ptr, stride_ym,
              HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr):
    """:func:`store_out` for one row ``m`` of the output (GEMV programs)."""
    if PARTIAL:
        p_ptrs = p_ptr + m * N + offs_n
        tl.store(p_ptrs + pid_k.to(tl.int64) * M * N, acc, mask=n_mask)
        if PARTIAL == 2:
            acc, last = _sum_if_last_split(acc, p_ptrs, M * N, n_mask, c_ptr)
            if last:
                _store_y(acc, y_ptr + m * stride_ym + offs_n, b_ptr + offs_n, n_mask, n_mask, HAS_BIAS)
    else:
        _store_y(acc, y_ptr + m * stride_ym + offs_n, b_ptr + offs_n, n_mask, n_mask, HAS_BIAS)


@triton.jit
def _store_y(acc, y_ptrs, b_ptrs, mask, b_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def arrive(c_ptr):
    """Count this program's split in its tile's counter: ``(last, tile, splits)``, ``last`` true for the
    tile's last split to arrive, which then reads every split's stores and must reset the counter
    (:func:`depart`).

    The split is the grid's last axis (axis 2 of a 3-D grid, else axis 1); the tile is the
    program's index over the other axes. The barrier makes every thread's stores precede the
    release of the counter's increment (done by one thread); its acquire orders the last
    program's loads after every other split's release. Those loads must bypass L1 (``.cg``)."""
    np2 = tl.num_programs(2)
    tile = tl.where(np2 > 1, tl.program_id(0) + tl.num_programs(0) * tl.program_id(1), tl.program_id(0))
    nsplit = tl.where(np2 > 1, np2, tl.num_programs(1))
    tl.debug_barrier()
    done = tl.atomic_add(c_ptr + tile, 1, sem="acq_rel", scope="gpu")
    return done == nsplit - 1, tile, nsplit


@triton.jit
def depart(c_ptr, tile):
    """The last split leaves its tile's counter at zero for the next launch."""
    tl.atomic_xchg(c_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _sum_if_last_split(acc, p_ptrs, slice_elems, mask, c_ptr):
    """After this program stored its partial tile: if it was the tile's last K split
    (:func:`arrive`), return the sum of all splits' partials (in split order, as
    :func:`splitk_reduce` adds them: the same bits either way)."""
    last, tile, nsplit = arrive(c_ptr)
    if last:
        acc = tl.zeros_like(acc)
        for s in range(nsplit):
            acc += tl.load(p_ptrs + s * slice_elems, mask=mask, other=0.0, cache_modifier=".cg")
        depart(c_ptr, tile)
    return acc, last


@triton.jit
def _splitk_reduce_kernel(p_ptr, bias_ptr, y_ptr, MN, N, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[i] = sum_s p[s, i] (+ bias[i % N]), cast to y's dtype; y is contiguous [M, N]."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ptr + s * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def splitk_reduce(partial: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """Sum ``partial [S, M, N]`` (float32) over S into ``y [M, N]`` (+ bias)."""
    split, m, n = partial.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
        partial, bias if bias is not None else partial, y, m * n, n, split,
        HAS_BIAS=bias is not None, BLOCK=block, num_warps=4,
    )


#: Per (device, stream): int32 tile counters of the in-kernel split-K reduction, all zero
#: between launches (each tile's last split resets its counter).
_tile_counters: dict[tuple[str, int | None, int], torch.Tensor] = {}
#: Set while the tuner captures a candidate on a private stream (its counters made beforehand).
_counters_in_capture = False
#: ``LOWBIT_TRITON_SECOND_KERNELS=1``: every split launch finishes in a second kernel, as under
#: graph capture (the same bits; for A/B timing of the one-launch reductions).
_SECOND_KERNELS = os.environ.get("LOWBIT_TRITON_SECOND_KERNELS", "0") not in ("", "0")


def tile_counters(tiles: int, device: torch.device) -> torch.Tensor | None:
    """The current stream's int32 counters for a launch whose last split per tile finishes the
    tile (:func:`arrive`), at least ``tiles`` of them, all zero; ``None`` during CUDA-graph
    capture (a buffer shared with eager launches, or with other graphs replayed concurrently on
    other streams, could be raced, and none can be allocated there): use a second kernel."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if (capturing and not _counters_in_capture) or _SECOND_KERNELS:
        return None
    key = (device.type, device.index, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    cnt = _tile_counters.get(key)
    if cnt is None or cnt.numel() < tiles:
        if capturing:
            return None
        cnt = _tile_counters[key] = torch.zeros(max(4096, triton.next_power_of_2(tiles)), dtype=torch.int32,
                                                device=device)
    return cnt


def split_k_buffers(split: int, tiles: int, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(partial, counters, PARTIAL)`` for a launch whose K loop is cut into ``split`` ranges
    over ``tiles`` output tiles (the grid without its split axis), writing ``y [M, N]``.

    ``PARTIAL`` 0: no split (both buffers are ``y``, unused). 2: the tile's last split sums the
    float32 partials and writes ``y`` (one launch, :func:`tile_counters`). 1: the partials are
    summed by :func:`finish_split` 's second kernel (CUDA-graph capture)."""
    if split <= 1:
        return y, y, 0
    m, n = y.shape
    partial = torch.empty((split, m, n), dtype=torch.float32, device=y.device)
    cnt = tile_counters(tiles, y.device)
    return (partial, partial, 1) if cnt is None else (partial, cnt, 2)


def finish_split(mode: int, partial: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """Complete a launch made with :func:`split_k_buffers` ' buffers; returns ``y``."""
    if mode == 1:
        splitk_reduce(partial, bias, y)
    return y


def rows_2d(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` as ``[M, K]`` (a view where the strides allow it)."""
    return x.reshape(-1, x.shape[-1])


def contiguous_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit stride along its last dimension (the packed weights' loads need it)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def finish(y2d: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y2d.reshape(*x.shape[:-1], y2d.shape[-1])


if not INTERPRET:

    @triton.jit
    def small_int_to_float(v, OFFSET: tl.constexpr, IS_BF16: tl.constexpr):
        """``v - OFFSET`` as float16 (bfloat16) for int16 ``v`` in 0..127, by the exponent trick.

        ``v | 0x6400`` is the float16 ``1024 + v`` (``v | 0x4300`` the bfloat16 ``128 + v``), so
        one OR and one subtraction replace a slow int-to-float conversion.
        """
        if IS_BF16:
            return (v | 0x4300).to(tl.bfloat16, bitcast=True) - (128.0 + OFFSET)
        else:
            return (v | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)

    @triton.jit
    def mma_in(x):
        """A ``tl.dot`` operand as is (the interpreter's version widens bfloat16)."""
        return x

    @triton.jit
    def half_bits_to(v, DT: tl.constexpr):
        """int32 ``v`` holding 16 bits (0..65535) as the float16/bfloat16 ``DT`` with those bits."""
        return v.to(tl.int16).to(DT, bitcast=True)

    @triton.jit
    def affine_codes(q, z, s):
        """``(q - z) * s`` for [R, C] codes ``q`` and per-row ``z``, ``s`` [R], in ``q``'s dtype."""
        return (q - z.to(q.dtype)[:, None]) * s.to(q.dtype)[:, None]

    @triton.jit
    def scale_rows(w, s):
        """``w * s`` for [R, C] ``w`` and per-row ``s`` [R], in ``w``'s dtype."""
        return w * s.to(w.dtype)[:, None]

else:  # Triton's interpreter cannot bitcast to bfloat16; its bfloat16 tl.dot and arithmetic are wrong

    @triton.jit
    def small_int_to_float(v, OFFSET: tl.constexpr, IS_BF16: tl.constexpr):
        if IS_BF16:
            return (v.to(tl.float32) - OFFSET).to(tl.bfloat16)
        else:
            return (v | 0x6400).to(tl.float16, bitcast=True) - (1024.0 + OFFSET)

    @triton.jit
    def half_bits_to(v, DT: tl.constexpr):  # bfloat16 bits are a float32's top half
        if DT == tl.bfloat16:
            return (v << 16).to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            return v.to(tl.int16).to(DT, bitcast=True)

    @triton.jit
    def mma_in(x):
        if x.dtype == tl.bfloat16:
            return x.to(tl.float32)
        else:
            return x

    @triton.jit
    def affine_codes(q, z, s):  # bfloat16 arithmetic is wrong here: float32, rounded after each op
        d = (q.to(tl.float32) - z.to(q.dtype).to(tl.float32)[:, None]).to(q.dtype).to(tl.float32)
        return (d * s.to(q.dtype).to(tl.float32)[:, None]).to(q.dtype)

    @triton.jit
    def scale_rows(w, s):
        return (w.to(tl.float32) * s.to(w.dtype).to(tl.float32)[:, None]).to(w.dtype)


def inline_ptx_ok(device: torch.device) -> bool:
    """Whether kernels may use inline PTX (NVIDIA GPUs; not ROCm or XPU). The interpreter runs
    the plain-Triton emulation that stands in for each such instruction."""
    return INTERPRET or (device.type == "cuda" and torch.version.hip is None)


TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def word_offset(k0, BK: tl.constexpr):
    """``k0 // 8``: the int32 word of column ``k0`` (8 nibbles a word), ``k0`` a multiple of BK.
    Stated as a multiple of min(BK / 8, 4) words: Triton only knows a loop's ``k0`` as a multiple
    of 16 (its int arguments'), so ``k0 // 8`` read as 8-byte loads; 16-byte ones issue half as
    many load instructions for the same bytes."""
    VEC: tl.constexpr = 4 if BK >= 32 else BK // 8
    return tl.multiple_of(k0 // 8, VEC)
