"""One call of the 4-bit op per (shape, M), for Nsight Compute to profile the CUDA kernels.

    ncu --clock-control none -k regex:w4_mma_kernel --section SpeedOfLight --section WarpStateStats \\
        python bench/ncu_w4.py --cases 28672x8192:1 28672x8192:64

Each case is warmed up once (outside the profiled range when ncu is given ``--profile-from-start
off``: the profiled calls are inside cudaProfilerStart/Stop).
"""

from __future__ import annotations

import argparse

import torch

import lowbit
from lowbit.formats import int4, nf4


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=["28672x8192:1", "28672x8192:16", "28672x8192:64", "8192x28672:64"])
    p.add_argument("--format", choices=["int4", "nf4"], default="int4")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size / nf4 blocksize")
    a = p.parse_args(argv)
    runs = []
    for case in a.cases:
        shape, m = case.split(":")
        n, k = (int(v) for v in shape.split("x"))
        w = torch.randn(n, k, device="cuda") * 0.02
        x = torch.randn(int(m), k, device="cuda", dtype=torch.float16)
        if a.format == "int4":
            q = int4.quantize(w, group_size=a.group_size, scale_dtype=torch.float16)

            def op(x=x, q=q):
                return lowbit.ops.int4_matmul(x, q.qweight, q.scales, q.zeros, a.group_size)
        else:
            q = nf4.quantize(w, blocksize=a.group_size)

            def op(x=x, q=q, n=n):
                return lowbit.ops.nf4_matmul(x, q.qweight, q.absmax, None, None, 0.0, a.group_size, n)
        op()  # repack + warm-up
        runs.append(op)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for op in runs:
        op()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
