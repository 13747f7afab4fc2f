"""Host (CPU) cost of enqueueing one call, per layer, on a GPU: where eager launch overhead goes.

python bench/triton_host_profile.py   (LOWBIT_BACKEND=triton is set here)
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

os.environ["LOWBIT_BACKEND"] = "triton"
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _cases import int4_args, kv_args, to_device  # noqa: E402

import lowbit  # noqa: E402
from lowbit.backends import triton as tb  # noqa: E402
from lowbit.kernels_triton import int4 as k4  # noqa: E402


def per_call(fn, n=300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6


def main() -> None:
    args = to_device(int4_args(1, 4096, 4096, torch.float16, group_size=128, bias=False), "cuda")
    x, qw, s, z, g, b = args
    w16 = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    op = torch.ops.lowbit.int4_matmul.default
    lowbit.ops.int4_matmul(*args[:5])
    (key, cfg), = [(k, v) for k, v in k4._CACHE.chosen().items() if k[0] == 1 and k[1] == 4096 and k[2] == 4096]
    gemv = next(c for c in k4.candidates(1, 4096, 4096, 128, torch.float16, x.device) if c.path == "gemv")
    y = torch.empty(1, 4096, dtype=torch.float16, device="cuda")
    rows = {
        "torch.empty(1x4096)": lambda: torch.empty(1, 4096, dtype=torch.float16, device="cuda"),
        "F.linear fp16": lambda: F.linear(x, w16),
        "torch.ops.lowbit.int4_matmul": lambda: op(*args),
        "lowbit.ops.int4_matmul": lambda: lowbit.ops.int4_matmul(*args[:5]),
        "backends.triton.int4_matmul": lambda: tb.int4_matmul(*args),
        "kernels_triton.int4 (cached)": lambda: k4.int4_matmul(*args),
        f"_launch {cfg}": lambda: k4._launch(cfg, x, qw, s, z, g, None, y),
        f"_launch {gemv}": lambda: k4._launch(gemv, x, qw, s, z, g, None, y),
    }
    rows["raw gemv kernel[grid](...)"] = lambda: k4._int4_gemv_kernel[(32, 1, 1)](
        x, qw, s, z, s, y, y, y, 1, 4096, 4096, 128, 4096, 0x3F800000, x.stride(0), x.stride(1),
        qw.stride(0) // 4, s.stride(0), z.stride(0), y.stride(0), HAS_ZERO=True, HAS_BIAS=False, EXACT=False,
        PARTIAL=0, BLOCK_N=128, GS=128, NG=1, STAGES=0, num_warps=8, num_stages=3)
    kargs = to_device(kv_args(1, 32, 8, 1, 4096, 128, torch.float16, bits=8), "cuda")
    rows["torch.ops.lowbit.kv_attention int8"] = lambda: torch.ops.lowbit.kv_attention.default(*kargs)
    qf = kargs[0]
    kf = torch.randn(1, 8, 4096, 128, device="cuda", dtype=torch.float16)
    rows["SDPA enable_gqa"] = lambda: F.scaled_dot_product_attention(qf, kf, kf, enable_gqa=True)
    print(f"host enqueue time per call (median of the loop), {torch.cuda.get_device_name()}")
    for name, fn in rows.items():
        print(f"  {name:<60} {per_call(fn):8.1f} us")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        op(*args)
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(22)
    print(out.getvalue()[-6000:])


if __name__ == "__main__":
    main()
