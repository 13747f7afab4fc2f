"""``python -m lowbit.bench``: time lowbit's ops against their baselines in one process.

Prints, per case, each contender's median time, lowbit's speedup over each baseline, and
the bytes/s lowbit's op reads against the bandwidth measured in the same run; writes the
same table as Markdown (``--markdown``) and a speedup-vs-batch plot (``--plot``).

Examples::

    python -m lowbit.bench --op int4 --shapes 4096x14336 --m 1 8 64
    python -m lowbit.bench --op kv8 --ctx 4096 16384
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys

import torch

from .cases import Case, kv_case, matmul_case
from .timing import _flush_mode, copy_bandwidth, median_time, read_bandwidth

MATMUL_OPS = ("int4", "nf4", "ternary", "sparse24")
KV_OPS = ("kv8", "kv4")
DEFAULT_SHAPES = ("4096x14336", "14336x4096", "4096x4096")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lowbit.bench", description=__doc__.splitlines()[0])
    p.add_argument("--op", nargs="+", default=list(MATMUL_OPS + KV_OPS), choices=MATMUL_OPS + KV_OPS)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), help="NxK weight shapes")
    p.add_argument("--m", nargs="+", type=int, default=[1], help="batch sizes (rows of x)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="activation dtype (default bf16 CPU, fp16 GPU)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="KV attention batch sizes")
    p.add_argument("--ctx", nargs="+", type=int, default=[4096, 16384], help="KV context lengths")
    p.add_argument("--heads", default="32/8", help="H_q/H_kv for KV attention")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per contender")
    p.add_argument("--markdown", help="write the table to this Markdown file")
    p.add_argument("--plot", help="write a speedup-vs-batch PNG here (needs matplotlib)")
    p.add_argument("--json", help="write the rows (and the measured bandwidths) as JSON here")
    p.add_argument("--graph", action="store_true",
                   help="CUDA: time replays of CUDA graphs (device time only, no host launch overhead)")
    return p.parse_args(argv)


def _cases(a: argparse.Namespace, dtype: torch.dtype):
    for op in a.op:
        if op in MATMUL_OPS:
            opts = {"int4": {"group_size": a.group_size}, "nf4": {"blocksize": a.blocksize}}.get(op, {})
            for shape in a.shapes:
                n, k = (int(s) for s in shape.lower().split("x"))
                for m in a.m:
                    yield lambda op=op, n=n, k=k, m=m, opts=opts: matmul_case(op, n, k, m, a.device, dtype, **opts)
        else:
            h_q, h_kv = (int(s) for s in a.heads.split("/"))
            for b in a.batch:
                for ctx in a.ctx:
                    yield lambda op=op, b=b, ctx=ctx: kv_case(
                        int(op[2:]), b, h_q, h_kv, ctx, a.head_dim, a.device, dtype
                    )


def _row(case: Case, times: dict[str, float], bandwidth: float, backend: str) -> dict:
    lowbit_t = times["lowbit"]
    base = {k: v for k, v in times.items() if k != "lowbit"}
    best = min(base.values()) if base else float("nan")
    return {
        "op": case.op,
        "shape": case.shape,
        "M": case.m,
        "backend": backend,
        "lowbit µs": lowbit_t * 1e6,
        **{f"{k} µs": v * 1e6 for k, v in base.items()},
        **{f"× {k}": v / lowbit_t for k, v in base.items()},
        "× best": best / lowbit_t,
        "GB/s": case.weight_bytes / lowbit_t / 1e9,
        "% read BW": 100 * case.weight_bytes / lowbit_t / bandwidth,
    }


def _markdown(rows: list[dict]) -> str:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        series.setdefault(f"{r['op']} {r['shape']}", []).append((r["M"], r["× best"]))
    for name, pts in series.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("batch M")
    ax.set_ylabel("speedup over best baseline")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if a.device == "cpu" else torch.float16)
    bandwidth = read_bandwidth(a.device)
    copy_bw = copy_bandwidth(a.device)
    header = (
        f"lowbit bench {datetime.date.today()} on {a.device} "
        f"({torch.cuda.get_device_name() if a.device == 'cuda' else platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, activations {dtype}, "
        f"measured read bandwidth {bandwidth / 1e9:.1f} GB/s, copy bandwidth {copy_bw / 1e9:.1f} GB/s "
        f"(bytes read + written)"
        + (", device time of CUDA-graph replays" if a.graph else "")
        + (f"; L2 flush by {_flush_mode()}, GPU busy while each call is enqueued" if a.device == "cuda" else "")
    )
    print(header, flush=True)
    rows = []
    for make in _cases(a, dtype):
        case = make()
        times = {name: median_time(calls, a.device, budget_s=a.budget, graph=a.graph)
                 for name, calls in case.contenders.items()}
        row = _row(case, times, bandwidth, case.backend)
        rows.append(row)
        speed = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.startswith("×"))
        print(f"{case.op:<18} {case.shape:<28} M={case.m:<5} lowbit {row['lowbit µs']:9.1f} µs  "
              f"{speed}  {row['GB/s']:.1f} GB/s ({row['% read BW']:.0f}% of read BW)  [{case.backend}]", flush=True)
    table = _markdown(rows)
    print("\n" + table)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(f"{header}\n\n{table}\n")
    if a.plot:
        _plot(rows, a.plot)
    if a.json:
        import json

        kt = sys.modules.get("lowbit.kernels_triton")  # the Triton backend's per-shape choices, if it ran
        configs = {op: {str(k): v for k, v in c.items()} for op, c in kt.chosen_configs().items()} if kt else {}
        with open(a.json, "w") as f:
            json.dump({"header": header, "read_bandwidth": bandwidth, "copy_bandwidth": copy_bandwidth(a.device),
                       "rows": rows, "triton_configs": configs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
