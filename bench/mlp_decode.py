"""End-to-end decode through an 8-layer Llama-shaped MLP stack: fp16 nn.Linear vs lowbit.Linear.

Each layer is Llama's SwiGLU MLP with a residual: ``x + down(silu(gate(x)) * up(x))``,
hidden 4096, intermediate 14336 (Llama-3-8B), fp16 activations. The weights of the stack
(2.8 GB in fp16, 0.75 GB in 4 bits) are far larger than L2, so every step streams them from
memory as real decoding does. Times one forward of the stack (M tokens) eagerly (kernel
launches from Python) and as a CUDA graph replay, medians over many steps.

    python bench/mlp_decode.py [--layers 8] [--m 1 4 16] [--formats int4 nf4]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from torch import nn

import lowbit


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, inter, bias=False)
        self.up = nn.Linear(hidden, inter, bias=False)
        self.down = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.silu(self.gate(x)) * self.up(x))


def _time(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(times)


def _graphed(model: nn.Module, x: torch.Tensor):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(x)  # warm-up (lowbit repacks each weight once here)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--m", type=int, nargs="+", default=[1, 16])
    p.add_argument("--formats", nargs="+", default=["int4", "nf4"])
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args(argv)
    torch.manual_seed(0)
    dense = nn.Sequential(*[MLP(a.hidden, a.inter) for _ in range(a.layers)]).to("cuda", torch.float16)
    for mod in dense.modules():
        if isinstance(mod, nn.Linear):
            nn.init.normal_(mod.weight, std=0.02)
    models = {"fp16 nn.Linear": dense}
    opts = {"int4": {"group_size": 128}, "nf4": {"blocksize": 64}}
    for fmt in a.formats:
        models[f"lowbit {fmt}"] = lowbit.quantize_model(_copy(dense), fmt, **opts[fmt])
    print(f"{a.layers}-layer SwiGLU MLP stack, hidden {a.hidden}, intermediate {a.inter}, fp16, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"{'model':<16} {'M':>4} {'eager ms':>9} {'graph ms':>9} {'x eager':>8} {'x graph':>8}")
    with torch.no_grad():
        for m in a.m:
            x = torch.randn(m, a.hidden, device="cuda", dtype=torch.float16)
            base = None
            for name, model in models.items():
                eager = _time(lambda: model(x), a.steps)
                graph = _time(_graphed(model, x), a.steps)
                if base is None:
                    base = (eager, graph)
                print(f"{name:<16} {m:>4} {eager * 1e3:9.3f} {graph * 1e3:9.3f} {base[0] / eager:8.2f} "
                      f"{base[1] / graph:8.2f}", flush=True)
    return 0


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    raise SystemExit(main())
