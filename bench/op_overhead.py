"""Host time of one lowbit op call on tiny shapes, where the kernel is a few µs: the Python
layers (validation, backend selection, argument preparation) against torch's ``F.linear``.

    python bench/op_overhead.py [--device cpu] [--reps 20000]

Prints medians over 7 rounds of µs per call: the validation alone, the whole ``lowbit.ops``
call, ``lowbit.Linear`` (on CUDA its plain eager calls reuse a prepared call: no checks, no
backend selection; under inference mode and under no_grad) and ``F.linear`` on the dense
weight of the same shape (inference mode).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit import _validate
from lowbit.formats import int4, nf4, ternary


def _median_us(fn, reps: int) -> float:
    for _ in range(reps // 10):
        fn()
    rounds = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        rounds.append((time.perf_counter() - t) / reps)
    return statistics.median(rounds) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=20000)
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    n, k = 64, 128
    dt = torch.bfloat16 if dev.type == "cpu" else torch.float16
    w = torch.randn(n, k)
    x = torch.randn(1, k, dtype=dt, device=dev)
    wd = w.to(dt).to(dev)
    p4 = int4.quantize(w, group_size=64)
    pn = nf4.quantize(w, blocksize=64)
    pt = ternary.quantize(w)
    p4 = [t.to(dev) if isinstance(t, torch.Tensor) else t for t in (p4.qweight, p4.scales, p4.zeros)]
    pn = [t.to(dev) if isinstance(t, torch.Tensor) else t
          for t in (pn.qweight, pn.absmax, pn.absmax_scale, pn.absmax_code, pn.absmax_offset)]
    pt = [pt.qweight.to(dev), pt.weight_scale.to(dev)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    cases = {
        "int4": (lambda: _validate.int4_matmul(x, *p4, 64, None), lambda: lowbit.ops.int4_matmul(x, *p4, 64)),
        "nf4": (lambda: _validate.nf4_matmul(x, *pn, 64, n, None), lambda: lowbit.ops.nf4_matmul(x, *pn, 64, n)),
        "ternary": (lambda: _validate.ternary_matmul(x, *pt, n, None), lambda: lowbit.ops.ternary_matmul(x, *pt, n)),
    }
    dense = torch.nn.Linear(k, n, bias=False)
    with torch.no_grad():
        dense.weight.copy_(w)
    layers = {
        fmt: lowbit.Linear.from_linear(dense, fmt, **opts).to(device=dev, dtype=dt)
        for fmt, opts in (("int4", {"group_size": 64}), ("nf4", {"blocksize": 64}), ("ternary", {}))
    }
    with torch.inference_mode():
        base = _median_us(lambda: F.linear(x, wd), a.reps)
        sync()
        print(f"{n}x{k}, M=1, {dt} on {dev}: F.linear {base:.1f} µs a call")
        for name, (val, call) in cases.items():
            v = _median_us(val, a.reps)
            c = _median_us(call, a.reps)
            layer = layers[name]
            li = _median_us(lambda: layer(x), a.reps)
            with torch.inference_mode(False), torch.no_grad():  # as decode loops often run (version counters kept)
                ln = _median_us(lambda: layer(x), a.reps)
            sync()
            print(f"  {name:8s} validation {v:5.1f} µs   lowbit.ops call {c:6.1f} µs ({c / base:.2f}x F.linear)   "
                  f"lowbit.Linear {li:6.1f} µs ({li / base:.2f}x), under no_grad {ln:6.1f} µs")


if __name__ == "__main__":
    main()
