"""Does an L2 evict-first hint keep a streamed read from paying for dirty lines in L2?

A Triton kernel reads a buffer of the size of a 4-bit weight once (XOR-reduced, so nothing is
optimised away), with and without ``eviction_policy="evict_first"``, as plain loads and as
loads staged by the pipeliner (cp.async, where Triton 3.6 drops the hint). Each call follows
one of three L2 states: after a write flush (zeroing 256 MB, as ``lowbit.bench`` and triton's
``do_bench`` do: ~50 MB of dirty lines), after a read flush (clean lines) and with no flush.
cuBLAS fp16 ``F.linear`` at M=1 is timed the same way for scale. Prints µs medians and the
GB/s of the buffer's bytes after the write flush.

    python bench/l2_policy_probe.py [--sizes-mb 8.9 31.2 124.8] [--reps 25]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _stream(a_ptr, o_ptr, words_per_prog, EV: tl.constexpr, STAGES: tl.constexpr, BW: tl.constexpr):
    base = a_ptr + tl.program_id(0).to(tl.int64) * words_per_prog
    offs = tl.arange(0, BW)
    acc = tl.zeros([BW], tl.int32)
    for i in tl.range(0, words_per_prog, BW, num_stages=STAGES):
        acc ^= tl.load(base + i + offs, eviction_policy=EV)
    tl.store(o_ptr + tl.program_id(0) * BW + offs, acc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[8.9, 31.2, 124.8])
    ap.add_argument("--reps", type=int, default=25)
    a = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    flush_buf = torch.empty(256 << 20, dtype=torch.int8, device=dev)

    def flush(kind: str) -> None:
        if kind == "write":
            flush_buf.zero_()
        elif kind == "read":
            flush_buf.view(torch.int32).sum()

    def median_us(fn, kind: str) -> float:
        ts = []
        for _ in range(a.reps):
            flush(kind)
            torch.cuda._sleep(200_000)  # the call is enqueued while the GPU is busy
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e) * 1e3)
        return statistics.median(ts)

    w = torch.randn(4096, 4096, device=dev, dtype=torch.half)
    for _ in range(1500):  # clocks up
        w @ w
    torch.cuda.synchronize()
    kinds = ("write", "read", "none")
    print(f"{torch.cuda.get_device_name(dev)}; µs after a write / read / no flush; GB/s after the write flush")
    progs, bw = 4 * sms, 2048
    for mb in a.sizes_mb:
        unit = progs * bw * 4
        nbytes = max(1, int(mb * 1e6) // unit) * unit
        buf = torch.randint(-(2**31), 2**31 - 1, (nbytes // 4,), dtype=torch.int32, device=dev)
        out = torch.empty(progs * bw, dtype=torch.int32, device=dev)
        for ev in ("", "evict_first"):
            for st in (1, 3):
                def fn(ev=ev, st=st):
                    _stream[(progs,)](buf, out, buf.numel() // progs, EV=ev, STAGES=st, BW=bw, num_warps=8)
                fn()
                t = {k: median_us(fn, k) for k in kinds}
                print(f"{nbytes / 1e6:7.1f} MB  {ev or 'default':12s} {'cp.async' if st > 1 else 'ld':8s}"
                      + "".join(f" {t[k]:8.1f}" for k in kinds) + f"  {nbytes / t['write'] / 1e3:7.0f} GB/s", flush=True)
    for n, k in ((4096, 4096), (14336, 4096), (28672, 8192)):
        wt = torch.randn(n, k, device=dev, dtype=torch.half)
        x = torch.randn(1, k, device=dev, dtype=torch.half)
        t = {kd: median_us(lambda: F.linear(x, wt), kd) for kd in kinds}
        print(f"fp16 F.linear {n}x{k} M=1" + "".join(f" {t[kd]:8.1f}" for kd in kinds))


if __name__ == "__main__":
    main()
