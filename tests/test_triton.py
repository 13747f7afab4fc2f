"""Triton kernels (lowbit.kernels_triton, lowbit.backends.triton) against the reference.

Every kernel path of every op, over dtypes and shapes, is compared with the pure-PyTorch
reference (relative Frobenius error, ``RTOL`` per dtype).

* CPU: Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when kernels are defined, so
  :func:`test_kernels_interpreted_on_cpu` re-runs this file in a subprocess with
  ``TRITON_INTERPRET=1``; there the ``cpu`` cases below run (small sizes, < 1 min on 2 cores).
* GPU: the same cases run compiled, on ``cuda`` (``pytest -m cuda tests/test_triton.py``),
  at larger sizes, plus ``torch.compile(fullgraph=True)``, CUDA-graph capture and the
  per-shape configuration cache.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _cases import int4_args, kv_args, nf4_args, sparse24_args, ternary_args, to_device
from conftest import RTOL, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st
from lowbit.backends import reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Where the parametrized cases run in this process: the interpreter's CPU, or a real GPU.
if INTERPRETED:
    DEVICES = ["cpu"]
else:
    DEVICES = [pytest.param("cuda", marks=pytest.mark.cuda)]


def _kernels(name: str):
    import importlib

    return importlib.import_module(f"lowbit.kernels_triton.{name}")


def _check(out, ref, dtype, what=""):
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    assert torch.isfinite(out).all(), what
    err = rel_err(out, ref)
    assert err < RTOL[dtype], f"{what}: rel err {err:.3g} >= {RTOL[dtype]}"


def _paths(cands) -> list[str]:
    return sorted({c.path for c in cands})


def _scale(device: str, small: tuple, large: tuple) -> tuple:
    return small if device == "cpu" else large


# ---- the interpreter run (a subprocess of the default CPU test run) ------------------------


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter run itself")
def test_kernels_interpreted_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", LOWBIT_TRITON_AUTOTUNE="0")
    env.pop("LOWBIT_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not cuda",
           "--rootdir", str(Path(__file__).parent.parent), str(Path(__file__))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, f"interpreted Triton tests failed:\n{tail}"
    assert " passed" in proc.stdout, tail


# ---- matmul ops: every path, dtypes, shapes --------------------------------------------------

INT4_SHAPES = [  # (M, K, N, group_size, symmetric)
    (1, 256, 40, 32, False), (3, 384, 24, 128, True), (5, 128, 33, 64, False), (2, 96, 16, 96, False),
    (17, 256, 20, 128, False),
]
INT4_SHAPES_GPU = [(1, 4096, 1000, 128, False), (3, 2048, 520, 64, True), (16, 1024, 777, 128, False),
                   (65, 512, 256, 32, False), (300, 1024, 384, 128, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_paths(device, dtype):
    kern = _kernels("int4")
    for m, k, n, g, sym in _scale(device, INT4_SHAPES, INT4_SHAPES_GPU):
        args = to_device(int4_args(m, k, n, dtype, group_size=g, symmetric=sym), device)
        ref = reference.int4_matmul(*args)
        for path in _paths(kern.candidates(m, n, k, g, dtype, torch.device(device))):
            _check(kern.int4_matmul(*args, config=path), ref, dtype, f"int4 {path} {(m, k, n, g, sym)}")


NF4_SHAPES = [  # (M, K, N, blocksize, double_quant)
    (1, 256, 40, 64, False), (3, 384, 24, 128, True), (5, 128, 33, 32, False), (2, 100, 7, 64, True),
    (17, 256, 20, 256, True),
]
NF4_SHAPES_GPU = [(1, 4096, 1000, 64, False), (3, 2048, 520, 64, True), (16, 1024, 777, 128, False),
                  (2, 1000, 70, 64, True), (300, 1024, 384, 64, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_paths(device, dtype):
    kern = _kernels("nf4")
    for m, k, n, bs, dq in _scale(device, NF4_SHAPES, NF4_SHAPES_GPU):
        args = to_device(nf4_args(m, k, n, dtype, blocksize=bs, double_quant=dq), device)
        ref = reference.nf4_matmul(*args)
        for path in _paths(kern.candidates(m, n, k, bs, dtype, torch.device(device))):
            _check(kern.nf4_matmul(*args, config=path), ref, dtype, f"nf4 {path} {(m, k, n, bs, dq)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", ["int4", "nf4"])
def test_swap_ab_tiles_every_candidate(device, dtype, op):
    """Every swap-AB (``mmt``) candidate the tuner may pick, split-K or not (the interpreter runs
    one of each tile family: the small-M exact-product tiles and the folded-scale tiles)."""
    kern = _kernels(op)
    for m, k, n, g in _scale(device, ((3, 256, 40, 64), (70, 256, 72, 64)),
                             ((1, 2048, 1000, 128), (16, 1024, 777, 64), (37, 2048, 520, 128), (200, 1024, 384, 64))):
        flag = m % 2 == 0
        if op == "int4":
            args = to_device(int4_args(m, k, n, dtype, group_size=g, symmetric=flag), device)
            ref = reference.int4_matmul(*args)
            run = lambda c: kern.int4_matmul(*args, config=c)
        else:
            args = to_device(nf4_args(m, k, n, dtype, blocksize=g, double_quant=flag), device)
            ref = reference.nf4_matmul(*args)
            run = lambda c: kern.nf4_matmul(*args, config=c)
        cands = [c for c in kern.candidates(m, n, k, g, dtype, torch.device(device)) if c.path == "mmt"]
        assert cands, (op, m, k, n, g)
        for c in cands[:1] if device == "cpu" else cands:
            _check(run(c), ref, dtype, f"{op} {c} {(m, k, n, g)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["int4", "nf4"])
def test_gemv_runs_per_step(device, dtype, op):
    """The int4/nf4 GEMVs with 1, 2 and 4 group/block runs a step (NG), split-K or not, loads in
    registers a step ahead or staged by the pipeliner (STAGES)."""
    from lowbit.kernels_triton._common import cfg

    kern = _kernels(op)
    for m, k, n, g, flag, split, ng, st in ((1, 256, 40, 32, False, 1, 4, 0), (3, 192, 17, 64, True, 2, 1, 0),
                                            (2, 512, 9, 64, False, 2, 2, 3), (1, 1024, 33, 64, True, 1, 4, 4)):
        c = cfg("gemv", BLOCK_N=16, num_warps=2, extra={"SPLIT_K": split, "NG": ng, "STAGES": st})
        if op == "int4":
            args = to_device(int4_args(m, k, n, dtype, group_size=g, symmetric=flag, bias=True), device)
            out, ref = kern.int4_matmul(*args, config=c), reference.int4_matmul(*args)
            acc3 = cfg("gemv", BLOCK_N=16, num_warps=2, extra={"SPLIT_K": split, "NG": ng, "STAGES": st, "ACC3": 1})
            _check(kern.int4_matmul(*args, config=acc3), ref, dtype, f"int4 gemv per-word sums {(m, k, n, g, ng)}")
        else:
            args = to_device(nf4_args(m, k, n, dtype, blocksize=g, double_quant=flag), device)
            ref = reference.nf4_matmul(*args)
            out = kern.nf4_matmul(*args, config=c)
            if dtype != torch.float32:  # the register code table (values rounded to x's dtype)
                reg = cfg("gemv", BLOCK_N=16, num_warps=2,
                          extra={"SPLIT_K": split, "NG": ng, "REG_LUT": 1, "STAGES": st})
                _check(kern.nf4_matmul(*args, config=reg), ref, dtype, f"nf4 gemv register table {(m, k, n, g)}")
        _check(out, ref, dtype, f"{op} gemv {(m, k, n, g, ng)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["int4", "nf4", "sparse24", "ternary"])
def test_split_k_reduced_by_the_last_split(device, op, monkeypatch):
    """A K-split launch whose last split per tile sums the partials (one launch) gives the same
    bits as the two-kernel reduction, and leaves every tile counter at zero for the next launch."""
    from lowbit.kernels_triton import _common
    from lowbit.kernels_triton._common import cfg

    kern = _kernels(op)
    dtype = torch.float16
    m, k, n = _scale(device, (3, 512, 40), (5, 4096, 1000))
    if op == "int4":
        args = to_device(int4_args(m, k, n, dtype, group_size=64, bias=True), device)
        ref, run = reference.int4_matmul(*args), lambda c: kern.int4_matmul(*args, config=c)
    elif op == "nf4":
        args = to_device(nf4_args(m, k, n, dtype, blocksize=64, double_quant=True), device)
        ref, run = reference.nf4_matmul(*args), lambda c: kern.nf4_matmul(*args, config=c)
    elif op == "ternary":
        args = to_device(ternary_args(m, k, n, dtype, per_row=True), device)
        ref, run = reference.ternary_matmul(*args), lambda c: kern.ternary_matmul(*args, config=c)
    else:
        args = to_device(sparse24_args(m, k, n, dtype, bias=True), device)
        ref, run = reference.sparse24_matmul(*args), lambda c: kern.sparse24_matmul(*args, config=c)
    split = {"SPLIT_K": 4}
    if op == "ternary":  # both GEMVs store four row ranges per program: one count per program
        configs = [cfg("gemv2", BLOCK_R=4, BLOCK_K=64, num_warps=2, num_stages=1, extra=split),
                   cfg("gemv", BLOCK_R=8, BLOCK_K=64, num_warps=2, num_stages=2, extra={**split, "DP4A": 1})]
    elif op == "sparse24":
        configs = [cfg("gemv2", BLOCK_N=16, BLOCK_K=64, num_warps=2, num_stages=1, extra=split),
                   cfg("mm2", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1, extra=split)]
    else:
        configs = [cfg("gemv", BLOCK_N=16, num_warps=2, extra={**split, "NG": 1}),
                   cfg("mmt", BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2, extra=split)]
    two_kernels = _common.split_k_buffers

    def unfused(split, tiles, y):
        partial, _, mode = two_kernels(split, tiles, y)
        return partial, partial, min(mode, 1)

    for c in configs:
        monkeypatch.setattr(kern, "split_k_buffers", two_kernels)
        fused = run(c)
        counters = [t for key, t in _common._tile_counters.items() if key[0] == fused.device.type]
        assert counters and all(int(t.abs().sum()) == 0 for t in counters), f"{op} {c}: counters not reset"
        monkeypatch.setattr(kern, "split_k_buffers", unfused)
        assert torch.equal(fused, run(c)), f"{op} {c}: in-kernel and two-kernel split-K sums differ"
        _check(fused, ref, dtype, f"{op} {c}")


TERNARY_SHAPES = [(1, 256, 40, False), (3, 384, 26, True), (5, 132, 33, False), (2, 100, 7, True),
                  (17, 256, 64, False)]
TERNARY_SHAPES_GPU = [(1, 4096, 1000, False), (3, 2048, 522, True), (16, 1024, 777, False), (2, 1000, 70, True),
                      (300, 1024, 384, False)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_paths(device, dtype):
    kern = _kernels("ternary")
    for m, k, n, per_row in _scale(device, TERNARY_SHAPES, TERNARY_SHAPES_GPU):
        args = to_device(ternary_args(m, k, n, dtype, per_row=per_row), device)
        ref = reference.ternary_matmul(*args)
        for path in _paths(kern.candidates(m, n, k, torch.device(device))):
            _check(kern.ternary_matmul(*args, config=path), ref, dtype, f"ternary {path} {(m, k, n, per_row)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dp4a", [0, 1])
def test_ternary_gemv_dp4a_and_float_loops(device, dp4a):
    """Both ternary GEMV loops (int8x4 ``dp4a`` and float), K tail or not, split-K or not."""
    from lowbit.kernels_triton._common import cfg

    kern = _kernels("ternary")
    for m, k, n, per_row, bk, split in ((1, 256, 40, False, 64, 1), (2, 100, 7, True, 64, 2),
                                        (3, 384, 26, False, 128, 2)):
        args = to_device(ternary_args(m, k, n, torch.float16, per_row=per_row), device)
        c = cfg("gemv", BLOCK_R=8, BLOCK_K=bk, num_warps=2, extra={"SPLIT_K": split, "DP4A": dp4a})
        _check(kern.ternary_matmul(*args, config=c), reference.ternary_matmul(*args), torch.float16,
               f"ternary gemv dp4a={dp4a} {(m, k, n)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_gemv2_configs(device, dtype):
    """Every gemv2 candidate configuration (explicitly), plus K tails, split-K and row tails, for
    x quantized in the loop (gemv2) and by a first launch (gemvq)."""
    from lowbit.kernels_triton._common import cfg

    kern = _kernels("ternary")
    dev = torch.device(device)
    big = (1, 4096, 1000, False) if device != "cpu" else (1, 2048, 40, False)
    for m, k, n, per_row in (big, (2, 1028, 70, True)):
        args = to_device(ternary_args(m, k, n, dtype, per_row=per_row), device)
        ref = reference.ternary_matmul(*args)
        cands = [c for c in kern.candidates(m, n, k, dev) if c.path in ("gemv2", "gemvq")]
        assert {c.path for c in cands} == {"gemv2", "gemvq"}
        if device == "cpu" and k > 1100:
            cands = cands[:1]  # the interpreter is slow: the others run at the small K
        for c in cands:
            _check(kern.ternary_matmul(*args, config=c), ref, dtype, f"ternary {c} {(m, k, n)}")
    for m, k, n, br, bk, w, split in ((1, 256, 40, 4, 64, 2, 1), (3, 384, 26, 8, 128, 4, 2),
                                      (1, 1028, 50, 4, 512, 2, 3), (2, 100, 7, 4, 32, 2, 1)):
        args = to_device(ternary_args(m, k, n, dtype, per_row=True), device)
        for path in ("gemv2", "gemvq"):
            c = cfg(path, BLOCK_R=br, BLOCK_K=bk, num_warps=w, num_stages=1, extra={"SPLIT_K": split})
            _check(kern.ternary_matmul(*args, config=c), reference.ternary_matmul(*args), dtype,
                   f"ternary {c} {(m, k, n)}")


SPARSE_SHAPES = [(1, 256, 40), (3, 384, 26), (5, 136, 33), (17, 256, 64)]
SPARSE_SHAPES_GPU = [(1, 4096, 1000), (3, 2056, 522), (16, 1024, 777), (300, 1024, 384)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_paths(device, dtype):
    kern = _kernels("sparse24")
    for m, k, n in _scale(device, SPARSE_SHAPES, SPARSE_SHAPES_GPU):
        args = to_device(sparse24_args(m, k, n, dtype), device)
        ref = reference.sparse24_matmul(*args)
        for path in _paths(kern.candidates(m, n, k, dtype, torch.device(device))):
            _check(kern.sparse24_matmul(*args, config=path), ref, dtype, f"sparse24 {path} {(m, k, n)}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse24_gemv2_configs(device, dtype):
    """Every gemv2 candidate configuration (explicitly), plus K tails, split-K and row tails;
    meta that cannot be read as int32 words (K % 32 != 0) falls back to the gather GEMV."""
    from lowbit.kernels_triton._common import cfg

    kern = _kernels("sparse24")
    dev = torch.device(device)
    big = (1, 4096, 1000) if device != "cpu" else (1, 2048, 40)
    for m, k, n in (big, (2, 1056, 70)):
        args = to_device(sparse24_args(m, k, n, dtype), device)
        ref = reference.sparse24_matmul(*args)
        cands = [c for c in kern.candidates(m, n, k, dtype, dev) if c.path == "gemv2"]
        assert cands
        if device == "cpu" and k > 1100:
            cands = cands[:1]
        for c in cands:
            _check(kern.sparse24_matmul(*args, config=c), ref, dtype, f"sparse24 {c} {(m, k, n)}")
    for m, k, n, bn, bk, w, split in ((1, 256, 40, 16, 128, 2, 1), (3, 384, 26, 16, 128, 4, 2),
                                      (1, 1056, 50, 8, 512, 2, 3), (2, 96, 7, 8, 64, 2, 1)):
        args = to_device(sparse24_args(m, k, n, dtype), device)
        c = cfg("gemv2", BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=1, extra={"SPLIT_K": split})
        _check(kern.sparse24_matmul(*args, config=c), reference.sparse24_matmul(*args), dtype,
               f"sparse24 {c} {(m, k, n)}")
    assert all(c.path != "gemv2" for c in kern.candidates(1, 40, 136, dtype, dev))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sparse24_mm2_configs(device, dtype):
    """Every swap-AB tile (mm2) candidate explicitly, plus K tails, split-K, M and N tails."""
    from lowbit.kernels_triton._common import cfg

    kern = _kernels("sparse24")
    m, k, n = (16, 2048, 1000) if device != "cpu" else (16, 256, 70)
    args = to_device(sparse24_args(m, k, n, dtype), device)
    ref = reference.sparse24_matmul(*args)
    cands = [c for c in kern.candidates(m, n, k, dtype, torch.device(device)) if c.path == "mm2"]
    assert len(cands) == 7 and {c.num_stages for c in cands} == {1, 3}  # register prefetch, pipeliner
    for c in cands:
        _check(kern.sparse24_matmul(*args, config=c), ref, dtype, f"sparse24 {c} {(m, k, n)}")
    for m, k, n, bm, bn, bk, split, st in ((5, 136, 33, 16, 32, 64, 1, 1), (20, 1056, 50, 32, 64, 128, 3, 1),
                                           (1, 384, 70, 16, 64, 128, 2, 1), (7, 1064, 45, 16, 64, 128, 2, 3)):
        args = to_device(sparse24_args(m, k, n, dtype), device)
        c = cfg("mm2", BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st, extra={"SPLIT_K": split})
        _check(kern.sparse24_matmul(*args, config=c), reference.sparse24_matmul(*args), dtype,
               f"sparse24 {c} {(m, k, n)}")


def test_sparse24_prmt_tables_place_every_legal_pair():
    """The byte-permute tables of mm2's PTX expansion (GPU-only code), emulated: for each of
    the six legal nibbles both output words hold v0 / v1 / 0 in the dense column order."""
    from lowbit.kernels_triton import sparse24 as S

    from _ptx import prmt

    v0, v1 = 0x3C01, 0xC402
    for i0 in range(4):
        for i1 in range(i0 + 1, 4):
            nib = i0 | i1 << 2
            dense = [0] * 4
            dense[i0], dense[i1] = v0, v1
            words = []
            for codes, lo, hi in S.SPREAD_TABLES:
                e = (codes >> 2 * nib) & 3
                words.append(prmt(v0 | v1 << 16, 0, prmt(lo, hi, e * 34 + 16)))
            assert [w >> s & 0xFFFF for w in words for s in (0, 16)] == dense, f"nibble {nib}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nf4_register_table_ptx_emulated(dtype):
    """The NF4 register-table PTX (GPU-only code), emulated: the planes a warp builds from the
    16-entry table, then the GEMV's 8 float32 values of a word (nibble order) and the MMA
    path's 16-bit pairs (high nibbles of bytes 0-3, then the low ones) equal the table's."""
    import struct

    from _ptx import f16_to_f32, run_warp
    from lowbit.kernels_triton import nf4 as N

    bits = [b & 0xFFFF for b in torch.tensor(N._NF4).to(dtype).view(torch.int16).tolist()]
    f32_bits = lambda v: struct.unpack("<I", struct.pack("<f", v))[0] if isinstance(v, float) else v  # noqa: E731
    as_f32 = (lambda h: f32_bits(f16_to_f32(h))) if dtype == torch.float16 else (lambda h: h << 16)  # noqa: E731
    base = 1 << 20
    memory = {base + 4 * j: bits[2 * j] | bits[2 * j + 1] << 16 for j in range(8)}
    lanes = run_warp(N._ASM_PLANES.value, [0] * 8 + [base], lanes=32, memory=memory)
    planes = lanes[0][:8]
    assert all(lane[:8] == planes for lane in lanes), "every lane holds the same planes"
    gemv = (N._LUT_F16 if dtype == torch.float16 else N._LUT_BF16).value
    g = torch.Generator().manual_seed(0)
    for word in torch.randint(0, 2**32, (64,), generator=g, dtype=torch.int64).tolist() + [0, 0xFFFFFFFF, 0x76543210]:
        nib = [(word >> 4 * i) & 15 for i in range(8)]
        (out,) = run_warp(gemv, [0] * 8 + [word] + planes)
        assert [f32_bits(v) for v in out[:8]] == [as_f32(bits[c]) for c in nib], hex(word)
        pairs = (N._LUT_F16_PAIRS if dtype == torch.float16 else N._LUT_BF16_PAIRS).value
        (out,) = run_warp(pairs, [0] * 4 + [word])
        halves = [w >> s & 0xFFFF for w in out[:4] for s in (0, 16)]
        hi = [bits[(word >> 8 * b + 4) & 15] for b in range(4)]
        lo = [bits[(word >> 8 * b) & 15] for b in range(4)]
        assert halves == hi + lo, hex(word)


def test_kv_dequantize_ptx_emulated():
    """The KV kernels' int8 -> float16 and int4 -> (code - zero) * scale PTX (GPU-only code),
    emulated against the same arithmetic in float16."""
    import numpy as np
    from _ptx import run_warp
    from lowbit.kernels_triton import kv_attention as K

    def halves(*words):
        return np.array([w >> s & 0xFFFF for w in words for s in (0, 16)], dtype=np.uint16).view(np.float16)

    def pack(vals):  # float16 values -> 32-bit words of two
        b = np.asarray(vals, dtype=np.float16).view(np.uint16).astype(np.int64)
        return [int(b[i] | b[i + 1] << 16) for i in range(0, len(b), 2)]

    g = np.random.default_rng(0)
    for _ in range(64):
        codes = g.integers(-128, 128, 4)
        word = int(np.array(codes, dtype=np.int8).view(np.uint32)[0])
        (out,) = run_warp(K._ASM_I8.value, [0, 0, word])
        assert list(halves(*out[:2])) == [float(c) for c in codes]
        raw = g.integers(0, 256, 4)
        word = int(np.array(raw, dtype=np.uint8).view(np.uint32)[0])
        z = g.integers(0, 16, 4).astype(np.float16)
        sc = (g.random(4) * 0.1).astype(np.float16)
        args = [0, 0, 0, 0, word, *pack(-(1024.0 + z)), *pack(-(64.0 + z)), *pack(sc)]
        (out,) = run_warp(K._ASM_U4.value, args)
        lo, hi = (raw & 15).astype(np.float16), (raw >> 4).astype(np.float16)
        assert list(halves(*out[:2])) == list((lo - z) * sc), "low nibbles"
        assert list(halves(*out[2:4])) == list((hi - z) * sc), "high nibbles"


@pytest.mark.parametrize("device", DEVICES)
def test_sparse24_float32_values_with_16bit_activations(device):
    kern = _kernels("sparse24")
    x, values, meta, b = to_device(sparse24_args(4, 128, 24, torch.float32), device)
    x, b = x.half(), b.half()
    ref = reference.sparse24_matmul(x, values, meta, b)
    paths = _paths(kern.candidates(4, 24, 128, x.dtype, torch.device(device), value_words=False))
    assert "mm2" not in paths  # mm2 reads values as words in x's dtype
    for path in paths:
        _check(kern.sparse24_matmul(x, values, meta, b, config=path), ref, x.dtype, path)
    from lowbit.kernels_triton._common import cfg

    forced = cfg("mm2", BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=1)
    with pytest.raises(ValueError, match="mm2 path reads values"):
        kern.sparse24_matmul(x, values, meta, b, config=forced)


# ---- KV attention ------------------------------------------------------------------------------

KV_SHAPES = [  # (B, H_q, H_kv, S_q, S_kv, D, bits, causal)
    (2, 4, 2, 1, 100, 64, 8, False), (1, 8, 2, 1, 300, 128, 4, True), (1, 2, 1, 5, 70, 32, 8, True),
    (2, 3, 3, 7, 40, 64, 4, True), (1, 4, 1, 33, 33, 40, 8, True), (1, 2, 2, 3, 20, 96, 4, False),
    (1, 2, 1, 1, 1100, 32, 8, False),  # with 16-token splits: 69 > 64 splits, two combine chunks
]
KV_SHAPES_GPU = [(3, 32, 8, 1, 4100, 128, 8, False), (2, 32, 8, 1, 3000, 128, 4, True),
                 (1, 8, 2, 130, 700, 128, 8, True), (2, 4, 4, 64, 64, 64, 4, True), (1, 6, 2, 9, 333, 80, 8, False),
                 (1, 8, 2, 1, 1000, 96, 4, False)]  # int4 with D < BLOCK_D: masked groups, strided scale loads


def _kv_configs(kern, shape, device, dtype):
    b, h_q, h_kv, s_q, s_kv, d, bits, _causal = shape
    from lowbit.kernels_triton._common import cfg

    rows = (h_q // h_kv) * s_q
    bm = 16 if rows <= 16 else 32
    forced = [cfg("flash", BLOCK_M=bm, BLOCK_S=32), cfg("split", BLOCK_M=bm, BLOCK_S=16,
                                                        extra={"BLOCKS_PER_SPLIT": 2})]
    if s_kv > 1024:  # > 64 splits: the combine kernel's chunk loop
        forced[1] = cfg("split", BLOCK_M=bm, BLOCK_S=16 if device == "cpu" else 64, extra={"BLOCKS_PER_SPLIT": 1})
    # the swapped-orientation kernel (one row tile of 16, or several with causal prefill rows)
    sbs = 32 if device == "cpu" or dtype == torch.float32 else 64
    if bits == 8:
        forced += [cfg("swap", BLOCK_M=16, BLOCK_S=sbs),
                   cfg("swap", BLOCK_M=16, BLOCK_S=sbs, extra={"BLOCKS_PER_SPLIT": 2})]
        if dtype != torch.float32:  # (float32 tiles of 128 keys exceed shared memory)
            forced.append(cfg("swap", BLOCK_M=16, BLOCK_S=128, num_warps=8, extra={"BLOCKS_PER_SPLIT": 1}))
    if device == "cpu":
        return forced
    return forced + kern.candidates(b, h_kv, rows, s_kv, d, torch.device(device), dtype, bits)


@pytest.mark.parametrize("device", DEVICES)
def test_kv_swap_path_refuses_int4(device):
    from lowbit.kernels_triton._common import cfg

    args = to_device(kv_args(1, 8, 2, 1, 64, 64, torch.float16, bits=4, causal=False), device)
    with pytest.raises(ValueError, match="int8 caches only"):
        _kernels("kv_attention").kv_attention(*args, config=cfg("swap", BLOCK_M=16, BLOCK_S=32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_attention_configs(device, dtype):
    kern = _kernels("kv_attention")
    for shape in _scale(device, KV_SHAPES, KV_SHAPES_GPU):
        b, h_q, h_kv, s_q, s_kv, d, bits, causal = shape
        args = to_device(kv_args(b, h_q, h_kv, s_q, s_kv, d, dtype, bits=bits, causal=causal), device)
        ref = reference.kv_attention(*args)
        for c in _kv_configs(kern, shape, device, dtype):
            _check(kern.kv_attention(*args, config=c), ref, dtype, f"kv {c} {shape}")


@pytest.mark.parametrize("device", DEVICES)
def test_kv_split_merged_by_the_last_split(device, monkeypatch):
    """A split launch whose last split per row tile merges the partials (one launch) gives the
    same bits as the combine kernel (CUDA-graph capture's path), and leaves the counters at zero;
    int8 and int4, both kernels, a merge over two row blocks of a 32-row tile (causal prefill)."""
    from lowbit.kernels_triton import _common
    from lowbit.kernels_triton._common import cfg

    kern = _kernels("kv_attention")
    cases = [((2, 8, 2, 1, 300, 64, 8, False), cfg("split", BLOCK_M=16, BLOCK_S=32, extra={"BLOCKS_PER_SPLIT": 2})),
             ((1, 8, 1, 1, 200, 32, 4, False), cfg("split", BLOCK_M=16, BLOCK_S=32, extra={"BLOCKS_PER_SPLIT": 1})),
             ((1, 4, 2, 9, 130, 64, 4, True), cfg("split", BLOCK_M=32, BLOCK_S=32, extra={"BLOCKS_PER_SPLIT": 2})),
             ((2, 8, 2, 1, 300, 64, 8, False), cfg("swap", BLOCK_M=16, BLOCK_S=32, extra={"BLOCKS_PER_SPLIT": 2}))]
    fused_counters = _common.tile_counters
    for shape, c in cases:
        b, h_q, h_kv, s_q, s_kv, d, bits, causal = shape
        args = to_device(kv_args(b, h_q, h_kv, s_q, s_kv, d, torch.float16, bits=bits, causal=causal), device)
        monkeypatch.setattr(kern, "tile_counters", fused_counters)
        fused = kern.kv_attention(*args, config=c)
        counters = [t for key, t in _common._tile_counters.items() if key[0] == fused.device.type]
        assert counters and all(int(t.abs().sum()) == 0 for t in counters), f"{c} {shape}: counters not reset"
        monkeypatch.setattr(kern, "tile_counters", lambda tiles, dev: None)
        assert torch.equal(fused, kern.kv_attention(*args, config=c)), f"{c} {shape}: merges differ"
        _check(fused, reference.kv_attention(*args), torch.float16, f"kv {c} {shape}")


@pytest.mark.parametrize("device", DEVICES)
def test_kv_attention_explicit_scale_and_strided_query(device):
    kern = _kernels("kv_attention")
    q, kq, ks, kz, vq, vs, vz, _, _ = to_device(kv_args(1, 4, 2, 3, 50, 64, torch.float16, bits=4), device)
    q = torch.randn(1, 3, 4, 64, device=device).half().transpose(1, 2)  # [1, 4, 3, 64], not contiguous
    args = (q, kq, ks, kz, vq, vs, vz, True, 0.2)
    _check(kern.kv_attention(*args), reference.kv_attention(*args), torch.float16)


# ---- random shapes (hypothesis), through the op layer and the dispatcher -----------------------


def _through_ops(device, monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    import lowbit  # noqa: F401

    return torch.ops.lowbit


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 40), kb=st.integers(1, 6), g=st.sampled_from([32, 64, 128]),
       sym=st.booleans(), bias=st.booleans(), dtype=st.sampled_from(DTYPES), strided=st.booleans())
def test_int4_random_through_ops(device, m, n, kb, g, sym, bias, dtype, strided):
    k = g * kb
    x, qw, s, z, gs, b = to_device(int4_args(m, k, n, dtype, group_size=g, symmetric=sym, bias=bias), device)
    if strided:  # non-contiguous activations: every other column of a wider matrix
        x = torch.stack([x, torch.zeros_like(x)], dim=-1).reshape(m, 2 * k)[:, ::2]
    with pytest.MonkeyPatch.context() as mp:
        ops = _through_ops(device, mp)
        out = ops.int4_matmul.default(x, qw, s, z, gs, b)
    _check(out, reference.int4_matmul(x, qw, s, z, gs, b), dtype)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 40), k8=st.integers(1, 40), bs=st.sampled_from([32, 64, 128]),
       dq=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_nf4_random_through_ops(device, m, n, k8, bs, dq, dtype):
    args = to_device(nf4_args(m, 8 * k8, n, dtype, blocksize=bs, double_quant=dq), device)
    with pytest.MonkeyPatch.context() as mp:
        out = _through_ops(device, mp).nf4_matmul.default(*args)
    _check(out, reference.nf4_matmul(*args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 40), k=st.integers(1, 300), per_row=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_ternary_random_through_ops(device, m, n, k, per_row, dtype):
    args = to_device(ternary_args(m, k, n, dtype, per_row=per_row), device)
    with pytest.MonkeyPatch.context() as mp:
        out = _through_ops(device, mp).ternary_matmul.default(*args)
    _check(out, reference.ternary_matmul(*args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8, deadline=None)
@given(m=st.integers(1, 9), n=st.integers(1, 40), k8=st.integers(1, 40), bias=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_sparse24_random_through_ops(device, m, n, k8, bias, dtype):
    args = to_device(sparse24_args(m, 8 * k8, n, dtype, bias=bias), device)
    with pytest.MonkeyPatch.context() as mp:
        out = _through_ops(device, mp).sparse24_matmul.default(*args)
    _check(out, reference.sparse24_matmul(*args), dtype)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), h_kv=st.integers(1, 3), groups=st.integers(1, 4), s_q=st.integers(1, 9),
       extra=st.integers(0, 70), d32=st.integers(1, 4), bits=st.sampled_from([4, 8]), causal=st.booleans(),
       dtype=st.sampled_from(DTYPES))
def test_kv_attention_random_through_ops(device, b, h_kv, groups, s_q, extra, d32, bits, causal, dtype):
    args = to_device(kv_args(b, h_kv * groups, h_kv, s_q, s_q + extra, 32 * d32, dtype, bits=bits,
                             causal=causal), device)
    with pytest.MonkeyPatch.context() as mp:
        out = _through_ops(device, mp).kv_attention.default(*args)
    _check(out, reference.kv_attention(*args), dtype)


# ---- dispatch rules ----------------------------------------------------------------------------


def test_cpu_tensors_go_to_triton_only_when_interpreted_and_forced(monkeypatch):
    from lowbit.backends import triton as tb

    monkeypatch.delenv("LOWBIT_BACKEND", raising=False)
    assert not tb.available("cpu")
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    assert tb.available("cpu") == INTERPRETED
    assert tb.available("cuda") == (HAS_CUDA and not INTERPRETED)


# ---- GPU only: torch.compile, CUDA graphs, the configuration cache -----------------------------

_GPU_CALLS = {
    "int4_matmul": lambda: int4_args(4, 512, 96, torch.float16, group_size=128),
    "nf4_matmul": lambda: nf4_args(4, 512, 96, torch.float16, double_quant=True),
    "ternary_matmul": lambda: ternary_args(4, 512, 98, torch.float16),
    "sparse24_matmul": lambda: sparse24_args(4, 512, 96, torch.float16),
    "kv_attention": lambda: kv_args(2, 8, 2, 1, 700, 128, torch.float16, bits=4),
}


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", list(_GPU_CALLS))
def test_torch_compile_fullgraph(name, monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    args = to_device(_GPU_CALLS[name](), "cuda")
    op = getattr(torch.ops.lowbit, name).default

    def f(*a):
        return op(*a) * 2.0

    compiled = torch.compile(f, fullgraph=True)
    out = compiled(*args)
    _check(out, reference.KERNELS[name](*args) * 2.0, torch.float16, name)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("name", list(_GPU_CALLS))
@pytest.mark.parametrize("warm", [True, False])
def test_cuda_graph_capture(name, warm, monkeypatch):
    """Captured calls replay correctly on new inputs, whether or not the shape was tuned first."""
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    from lowbit.kernels_triton import CACHES

    for c in CACHES.values():
        c.clear()
    args = list(to_device(_GPU_CALLS[name](), "cuda"))
    op = getattr(torch.ops.lowbit, name).default
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if warm:  # the usual warm-up: tunes and compiles outside the capture
            op(*args)
        else:  # at least compile: a graph cannot capture a first-time module load everywhere
            import lowbit.kernels_triton._common as common

            monkeypatch.setenv(common.AUTOTUNE_ENV, "0")
            op(*args)
            for c in CACHES.values():
                c.clear()
            monkeypatch.delenv(common.AUTOTUNE_ENV)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(*args)
    args[0].copy_(torch.randn_like(args[0]))
    graph.replay()
    torch.cuda.synchronize()
    _check(out, reference.KERNELS[name](*args), torch.float16, name)


@pytest.mark.cuda
@pytest.mark.skipif(INTERPRETED or not HAS_CUDA, reason="needs a GPU")
def test_config_cache_tunes_once_per_shape(monkeypatch):
    monkeypatch.delenv("LOWBIT_TRITON_AUTOTUNE", raising=False)
    kern = _kernels("int4")
    from lowbit.kernels_triton import CACHES

    cache = CACHES["int4_matmul"]
    cache.clear()
    args = to_device(int4_args(1, 1024, 512, torch.float16, group_size=128), "cuda")
    out = kern.int4_matmul(*args)
    assert len(cache.chosen()) == 1
    (key, timings), = cache.timings.items()
    assert len(timings) >= 2 and all(t > 0 for _, t in timings)
    chosen = cache.chosen()[key]
    out2 = kern.int4_matmul(*args)  # a cache hit: no new timings
    assert cache.chosen()[key] is chosen and len(cache.timings) == 1
    torch.testing.assert_close(out, out2)
    _check(out, reference.int4_matmul(*args), torch.float16)


def test_tuner_picks_device_time_then_host_time():
    from lowbit.kernels_triton._common import best_of, cfg

    a, b, c = cfg("gemv", BLOCK_N=8), cfg("gemv", BLOCK_N=16), cfg("gemv", BLOCK_N=32)
    # the fastest kernel, however long its host path
    assert best_of([(a, 20e-6, 40e-6), (b, 12e-6, 81e-6), (c, 30e-6, 40.5e-6)]) is b
    assert best_of([(a, 90e-6, 30e-6), (b, 80e-6, 60e-6)]) is b
    # device times within 2%: the cheaper host path decides; 3% slower on the device: it does not
    assert best_of([(a, 20.2e-6, 80e-6), (b, 20e-6, 90e-6), (c, 20.35e-6, 30e-6)]) is c
    assert best_of([(a, 20.6e-6, 30e-6), (b, 20e-6, 90e-6)]) is b
