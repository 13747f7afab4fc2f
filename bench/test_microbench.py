"""pytest-benchmark microbenchmarks of every lowbit op against its baselines.

Run: ``pytest bench/ --benchmark-only`` (add ``--benchmark-columns=median`` for a short
table; ``-k cuda`` on a GPU machine). The default ``pytest`` run (``testpaths = tests``)
does not collect these. For the full comparison table with ratios and bytes/s, use
``python -m lowbit.bench``; these share its case builders, so both time the same calls.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from lowbit.bench.cases import kv_case, matmul_case

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(4096, 4096), (4096, 14336)]
FORMATS = {"int4": {"group_size": 128}, "nf4": {"blocksize": 64}, "ternary": {}, "sparse24": {}}


def _act_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cpu" else torch.float16


def _bench(benchmark, calls, device: str) -> None:
    """Time the contender's calls round-robin (weights rotated out of cache), one call a round."""
    it = iter(range(1 << 62))

    def one():
        calls[next(it) % len(calls)]()
        if device == "cuda":
            torch.cuda.synchronize()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        one()  # warm-up (and the reference-fallback warning, if any)
        benchmark.pedantic(one, rounds=20, warmup_rounds=2)


def _matmul_params():
    for device in DEVICES:
        for fmt in FORMATS:
            for n, k in SHAPES:
                for m in (1, 16):
                    yield pytest.param(device, fmt, n, k, m, id=f"{device}-{fmt}-{n}x{k}-m{m}")


@pytest.mark.parametrize("contender", ["lowbit", "F.linear"])
@pytest.mark.parametrize("device,fmt,n,k,m", list(_matmul_params()))
def test_matmul(benchmark, device, fmt, n, k, m, contender):
    case = matmul_case(fmt, n, k, m, device, _act_dtype(device), **FORMATS[fmt])
    names = [name for name in case.contenders if name.startswith(contender)]
    benchmark.extra_info.update(backend=case.backend, weight_bytes=case.weight_bytes, contender=names[0])
    _bench(benchmark, case.contenders[names[0]], device)


@pytest.mark.parametrize("contender", ["lowbit", "SDPA"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("device", DEVICES)
def test_kv_decode(benchmark, device, bits, contender):
    case = kv_case(bits, 1, 32, 8, 4096, 128, device, _act_dtype(device))
    names = [name for name in case.contenders if name.startswith(contender)]
    benchmark.extra_info.update(backend=case.backend, cache_bytes=case.weight_bytes, contender=names[0])
    _bench(benchmark, case.contenders[names[0]], device)
