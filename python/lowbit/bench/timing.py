"""Timing primitives for the benchmarks: medians, cold-cache rotation, copy bandwidth.

On a GPU, CUDA events around each call with the L2 cache flushed before it; on a CPU,
wall-clock medians over many calls, each call reading a different copy of the weights
(rotated through a working set several times the last-level cache) so that decode
reads from memory, as it does in a real model.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

#: Bytes of weights to rotate through on the CPU: well beyond any L3 we run on.
CPU_ROTATION_BYTES = 512 << 20
#: Bytes written to flush the GPU L2 between timed calls (H100: 50 MB L2).
GPU_FLUSH_BYTES = 256 << 20
#: GPU clock cycles the device spins after the flush, before the start event: the call is
#: enqueued while the GPU is still busy, so the events time the GPU work of the call, not
#: the Python/launch overhead of a call that takes longer to enqueue than the flush to run
#: (that overhead is real, but it is the CPU's: CUDA graphs remove it; it is not the kernel).
GPU_SPIN_CYCLES = 1_000_000


def copies_for_rotation(bytes_per_copy: int, device: str) -> int:
    """How many copies of a weight to rotate through so that none is cache-resident."""
    if device != "cpu":
        return 1  # the GPU path flushes L2 instead
    return max(1, min(64, -(-CPU_ROTATION_BYTES // max(bytes_per_copy, 1))))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(
    calls: Sequence[Callable[[], object]],
    device: str,
    *,
    min_runs: int = 10,
    max_runs: int = 200,
    budget_s: float = 2.0,
    graph: bool = False,
) -> float:
    """Median seconds of one call, cycling through ``calls`` (one per weight copy).

    ``graph=True`` (CUDA): each call is captured once into a CUDA graph and the replays are
    timed, so the number is the device time alone, without the host's launch overhead.
    """
    for c in calls[: min(len(calls), 3)]:  # warm-up: JIT, allocator, page faults
        c()
    _sync(device)
    if device == "cuda":
        if graph:
            calls = [_captured(c) for c in calls]
        return _median_cuda(calls, min_runs=min_runs, max_runs=max_runs, budget_s=budget_s)
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        _sync(device)
        times.append(time.perf_counter() - t0)
        i += 1
    return statistics.median(times)


def _captured(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` recorded into a CUDA graph (after a warm-up on a side stream); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def _flush_mode() -> str:
    """How the L2 is flushed: ``write`` (default; zero a 256 MB buffer, as triton's do_bench
    does: L2 is left holding dirty lines, written back while the timed call runs) or
    ``read`` (sum a 256 MB buffer: L2 is left holding clean lines). ``LOWBIT_BENCH_FLUSH``."""
    mode = os.environ.get("LOWBIT_BENCH_FLUSH", "write").strip().lower() or "write"
    if mode not in ("write", "read"):
        raise ValueError(f"LOWBIT_BENCH_FLUSH={mode!r}: expected 'write' or 'read'")
    return mode


def _median_cuda(calls, *, min_runs: int, max_runs: int, budget_s: float) -> float:
    flush = torch.ones(GPU_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    do_flush = flush.zero_ if _flush_mode() == "write" else flush.sum
    times: list[float] = []
    start = time.perf_counter()
    i = 0
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < budget_s):
        do_flush()
        torch.cuda._sleep(GPU_SPIN_CYCLES)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        calls[i % len(calls)]()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
        i += 1
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Measured bytes/s of a large device-to-device copy (read + write counted once each)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = median_time([lambda: dst.copy_(src)], device, min_runs=5, max_runs=30, budget_s=1.0)
    return 2 * nbytes / t


def read_bandwidth(device: str, nbytes: int = 256 << 20) -> float:
    """Measured bytes/s of reading a large buffer (a reduction), the bound for decode."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    t = median_time([lambda: src.sum()], device, min_runs=5, max_runs=30, budget_s=1.0)
    return nbytes / t
