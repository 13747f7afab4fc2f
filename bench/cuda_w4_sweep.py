"""Tuning sweep of the CUDA 4-bit kernels (not the acceptance bench: that is ``python -m lowbit.bench``).

For each shape and batch size, times the op with the fused tensor-core kernel forced
(``LOWBIT_CUDA_W4_DENSE_M=0``), with the dense path forced (dequantize + cuBLAS,
``LOWBIT_CUDA_W4_DENSE_M=1``) and cuBLAS fp16 ``F.linear``; at M=1 each forced K split
(``LOWBIT_CUDA_W4_SPLIT``); each tile candidate (``LOWBIT_CUDA_W4_TILE``, in a build
with ``CUDAFLAGS=-DLOWBIT_W4_TUNING``). Medians with L2 flushed (lowbit.bench.timing). Prints
one table.

    python bench/cuda_w4_sweep.py --shapes 4096x4096 28672x8192 --m 1 16 64 256 1024
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

import lowbit
from lowbit.bench.timing import median_time
from lowbit.formats import int4, nf4


def _env(name: str, value: str | None):
    class _Ctx:
        def __enter__(self):
            self.old = os.environ.get(name)
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

        def __exit__(self, *exc):
            if self.old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = self.old

    return _Ctx()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x4096", "14336x4096", "4096x14336", "28672x8192", "8192x28672"])
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 512, 1024])
    p.add_argument("--formats", nargs="+", default=["int4", "nf4"])
    p.add_argument("--splits", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--tiles", type=int, nargs="*", default=[], help="tile candidates timed (0 = the default)")
    p.add_argument("--tile-splits", action="store_true", help="at M=1, every tile candidate at every forced split")
    p.add_argument("--splits-every-m", action="store_true", help="forced splits (and --tile-splits) at every M, not only 1")
    p.add_argument("--budget", type=float, default=0.15)
    a = p.parse_args(argv)
    dt = torch.float16
    t = lambda fn: median_time([fn], "cuda", budget_s=a.budget) * 1e6  # noqa: E731
    print(f"{'fmt':<5} {'shape':<11} {'M':>5} {'fp16 us':>9} {'fused us':>9} {'dense us':>9} {'x fused':>8} "
          f"{'x dense':>8}  splits(M=1) / tiles us")
    for shape in a.shapes:
        n, k = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, generator=g, device="cuda") * 0.02
        wh = w.to(dt)
        for fmt in a.formats:
            if fmt == "int4":
                q = int4.quantize(w, group_size=128, scale_dtype=dt)
                op = lambda x, q=q: lowbit.ops.int4_matmul(x, q.qweight, q.scales, q.zeros, 128)  # noqa: E731
            else:
                q = nf4.quantize(w, blocksize=64)
                op = lambda x, q=q: lowbit.ops.nf4_matmul(x, q.qweight, q.absmax, None, None, 0.0, 64, n)  # noqa: E731
            for m in a.m:
                x = torch.randn(m, k, device="cuda", dtype=dt)
                base = t(lambda: F.linear(x, wh))
                with _env("LOWBIT_CUDA_W4_DENSE_M", "0"):
                    fused = t(lambda: op(x))
                with _env("LOWBIT_CUDA_W4_DENSE_M", "1"):
                    dense = t(lambda: op(x))
                splits = ""
                if m == 1 or a.splits_every_m:
                    for s in a.splits:
                        with _env("LOWBIT_CUDA_W4_SPLIT", str(s)):
                            splits += f" S{s}={t(lambda: op(x)):.1f}"
                for tile in a.tiles:
                    with _env("LOWBIT_CUDA_W4_DENSE_M", "0"), _env("LOWBIT_CUDA_W4_TILE", str(tile)):
                        splits += f" T{tile}={t(lambda: op(x)):.1f}"
                        for s in a.splits if (m == 1 or a.splits_every_m) and a.tile_splits else ():
                            with _env("LOWBIT_CUDA_W4_SPLIT", str(s)):
                                splits += f" T{tile}S{s}={t(lambda: op(x)):.1f}"
                print(f"{fmt:<5} {shape:<11} {m:>5} {base:9.1f} {fused:9.1f} {dense:9.1f} {base / fused:8.2f} "
                      f"{base / dense:8.2f} {splits}", flush=True)
            del q
        del w, wh
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
