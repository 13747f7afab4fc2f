"""Short table of a GPU run of `python -m lowbit.bench --json ...` against the Triton targets (issue 4).

Usage: python bench/triton_summary.py matmul.json kv.json
Floor = bytes the lowbit op must read / the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import json
import sys

LARGE = {"14336x4096", "4096x14336", "28672x8192", "8192x28672"}


def target(op: str, shape: str, m: int) -> tuple[str, float] | None:
    """(baseline column, minimum ratio) of the issue's targets; None where it sets none."""
    if op == "int4_matmul":
        if m == 1:
            return "F.linear float16", 2.5 if shape in LARGE else 2.0
        return "F.linear float16", 1.5 if m <= 16 else 0.9
    if op == "nf4_matmul":
        return ("F.linear float16", 2.2) if m == 1 else None
    if op == "ternary_matmul":
        return ("F.linear float16", 3.5) if m == 1 else None
    if op == "sparse24_matmul":
        return "F.linear float16", 1.4 if m <= 16 else 0.85
    if op == "kv_attention int8":
        return "SDPA float16", 1.6
    if op == "kv_attention int4":
        return "SDPA float16", 2.5
    return None


def main(paths: list[str]) -> int:
    print(f"{'op':<18} {'shape':<27} {'M':>5} {'lowbit us':>10} {'base us':>9} {'x base':>7} {'target':>7} "
          f"{'ok':>3} {'x int4pk':>8} {'floor us':>9} {'%floor':>6}")
    misses = 0
    for path in paths:
        data = json.load(open(path))
        bw = data["copy_bandwidth"]
        for r in data["rows"]:
            t = target(r["op"], r["shape"], r["M"])
            base_col = t[0] if t else "F.linear float16"
            base = r.get(f"{base_col} µs", float("nan"))
            ratio = base / r["lowbit µs"]
            floor = r["GB/s"] * 1e9 * r["lowbit µs"] * 1e-6 / bw * 1e6  # bytes / copy bandwidth, in µs
            ok = "" if t is None else ("yes" if ratio >= t[1] else "NO")
            if ok == "NO":
                misses += 1
            pk = r.get("× torch int4pack bf16")
            print(f"{r['op']:<18} {r['shape']:<27} {r['M']:>5} {r['lowbit µs']:>10.1f} {base:>9.1f} {ratio:>7.2f} "
                  f"{(f'{t[1]:.2f}' if t else '-'):>7} {ok:>3} {(f'{pk:.2f}' if pk else '-'):>8} {floor:>9.1f} "
                  f"{100 * floor / r['lowbit µs']:>6.0f}")
        print(f"# {path}: copy bandwidth {bw / 1e12:.2f} TB/s, read bandwidth {data['read_bandwidth'] / 1e12:.2f} TB/s")
    print(f"# targets missed: {misses}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
