import cProfile, pstats, time, torch, torch.nn as nn, torch.nn.functional as F, lowbit
from lowbit.nn import linear as L
class MLP(nn.Module):
    def __init__(s, h, i):
        super().__init__(); s.gate = nn.Linear(h, i, bias=False); s.up = nn.Linear(h, i, bias=False); s.down = nn.Linear(i, h, bias=False)
    def forward(s, x): return x + s.down(F.silu(s.gate(x)) * s.up(x))
for shape in [(4096, 14336), (128, 64)]:
    dense = nn.Sequential(*[MLP(*shape) for _ in range(2)]).to("cuda", torch.float16)
    q = lowbit.quantize_model(dense, "int4", group_size=64 if shape[1] == 64 else 128)
    made = [0]; orig = L._Plan.__init__
    def counting(self, *a, **k):
        made[0] += 1; return orig(self, *a, **k)
    L._Plan.__init__ = counting
    x = torch.randn(1, shape[0], device="cuda", dtype=torch.float16)
    with torch.no_grad():
        for _ in range(5): q(x)
        torch.cuda.synchronize(); made[0] = 0
        t = time.perf_counter()
        for _ in range(200): q(x)
        cpu = (time.perf_counter() - t) / 200; torch.cuda.synchronize()
        print(shape, "plans made in 200 calls:", made[0], f"cpu/forward {cpu*1e6:.1f} us",
              [type(p.run).__name__ if p is not None else None for p in (L._PLANS.get(m) for m in q.modules() if isinstance(m, lowbit.Linear))])
        pr = cProfile.Profile(); pr.enable()
        for _ in range(200): q(x)
        pr.disable(); torch.cuda.synchronize()
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)
    L._Plan.__init__ = orig
