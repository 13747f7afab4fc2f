"""The native CPU kernels of int4_matmul and nf4_matmul (csrc/cpu/lut4_*), on every ISA path.

Each kernel is compared with the PyTorch reference (lowbit.backends.reference) on random
shapes that reach every branch of the shared core: the GEMV (M <= 8), the GEMM (32- and
16-row x tiles), the fast layouts (rows of whole 32-column chunks) and the element-by-element
decoder (int4 groups that are not multiples of 32, nf4 with odd K or blocks across rows),
float32 / float16 / bfloat16 activations and mixed scale and bias dtypes, double-quantized
nf4 absmax, thread counts 1 and 2. Bad arguments must raise, never crash.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lowbit import _native
from lowbit.backends import native_args, reference
from lowbit.formats import int4, nf4

from conftest import RTOL, rel_err

pytestmark = pytest.mark.skipif(not _native.has("nf4_matmul_cpu"), reason="native module without nf4_matmul_cpu")

C = _native.C
ISAS = C.cpu_isa()["supported"] if _native.available() else []
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
HYP = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_ISA", request.param)
    return request.param


def call_int4(x, qweight, scales, zeros, g, bias, threads):
    c = native_args.prepare_int4(x, qweight, scales, zeros, g, bias, fn="test")
    if not c.empty:
        C.int4_matmul_cpu(**c.kwargs(), num_threads=threads)
    return c.result()


def call_nf4(x, p, bias, threads):
    c = native_args.prepare_nf4(x, p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, p.blocksize,
                                p.out_features, bias, fn="test")
    if not c.empty:
        C.nf4_matmul_cpu(**c.kwargs(), num_threads=threads)
    return c.result()


def ref_nf4(x, p, bias):
    return reference.nf4_matmul(x, p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, p.blocksize,
                                p.out_features, bias)


def int4_weight(n, k, g, dtype, asym, seed):
    """Raw int4 tensors (any even group size, not only the ones quantize() makes)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(dtype)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen).to(dtype) if asym else None
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scales, zeros


def activations(m, k, dtype, layout, seed):
    gen = torch.Generator().manual_seed(seed)
    if layout == "row_slice":  # row stride > K
        return torch.randn(m, k + 24, generator=gen).to(dtype)[:, 8 : 8 + k]
    if layout == "transposed":  # inner stride != 1: the wrapper copies
        return torch.randn(k, m, generator=gen).to(dtype).t()
    return torch.randn(m, k, generator=gen).to(dtype)


#: Error allowed relative to ``‖|x| @ |W|^T‖`` when the products cancel (a few units in the
#: last place of the terms' magnitudes: the standard bound of a rounded dot product).
MAG_RTOL = {torch.float32: 2**-20, torch.float16: 2**-9, torch.bfloat16: 2**-6}


def check(out, ref, dtype, x=None, w=None):
    """``out`` within ``RTOL[dtype]`` of ``ref`` relative to ``‖ref‖``; when
    the products cancel (a tiny ``‖ref‖``), relative to the magnitude of the products instead."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = rel_err(out, ref)
    if err <= RTOL[dtype] or x is None or dtype not in MAG_RTOL:
        assert err <= RTOL[dtype], f"relative error {err:.3g} > {RTOL[dtype]} ({dtype})"
        return
    mag = (x.double().abs() @ w.double().abs().t()).norm()
    diff = (out.double() - ref.double()).norm()
    assert diff <= MAG_RTOL[dtype] * mag, f"error {diff:.3g} > {MAG_RTOL[dtype]} x magnitude {mag:.3g} ({dtype})"


# ---- against the reference, random shapes ------------------------------------------------------

M_VALUES = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 40]
INT4_KG = [(32, 32), (64, 32), (96, 32), (128, 64), (256, 128), (384, 128), (40, 40), (48, 16), (6, 2), (2048, 128),
           (192, 96), (256, 32)]


@HYP
@pytest.mark.parametrize("threads", [1, 2])
@given(
    m=st.sampled_from(M_VALUES), n=st.integers(1, 70), kg=st.sampled_from(INT4_KG),
    x_dtype=st.sampled_from(FLOATS), s_dtype=st.sampled_from(FLOATS), asym=st.booleans(),
    bias_dtype=st.sampled_from([None, *FLOATS]), layout=st.sampled_from(["contiguous", "row_slice", "transposed"]),
    seed=st.integers(0, 2**16),
)
def test_int4_matches_reference(isa, threads, m, n, kg, x_dtype, s_dtype, asym, bias_dtype, layout, seed):
    k, g = kg
    qweight, scales, zeros = int4_weight(n, k, g, s_dtype, asym, seed)
    x = activations(m, k, x_dtype, layout, seed)
    bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
    out = call_int4(x, qweight, scales, zeros, g, bias, threads)
    w = int4.dequantize_tensors(qweight, scales, zeros, g, dtype=torch.float32)
    check(out, reference.int4_matmul(x, qweight, scales, zeros, g, bias), x_dtype, x, w)


# (K, blocksize): whole 32-column rows with blocks inside rows, blocks across rows (K % B != 0),
# and the element-by-element layouts (K % 32 != 0, odd K).
NF4_KB = [(64, 64), (256, 64), (96, 64), (160, 128), (32, 4096), (512, 256), (130, 32), (33, 32), (7, 64), (1024, 64),
          (256, 32), (384, 128)]


@HYP
@pytest.mark.parametrize("threads", [1, 2])
@given(
    m=st.sampled_from(M_VALUES), n=st.integers(1, 70), kb=st.sampled_from(NF4_KB), dq=st.booleans(),
    x_dtype=st.sampled_from(FLOATS), bias_dtype=st.sampled_from([None, *FLOATS]),
    layout=st.sampled_from(["contiguous", "row_slice", "transposed"]), seed=st.integers(0, 2**16),
)
def test_nf4_matches_reference(isa, threads, m, n, kb, dq, x_dtype, bias_dtype, layout, seed):
    k, bs = kb
    gen = torch.Generator().manual_seed(seed)
    p = nf4.quantize(torch.randn(n, k, generator=gen), blocksize=bs, double_quant=dq)
    x = activations(m, k, x_dtype, layout, seed)
    bias = None if bias_dtype is None else torch.randn(n, generator=gen).to(bias_dtype)
    check(call_nf4(x, p, bias, threads), ref_nf4(x, p, bias), x_dtype, x, nf4.dequantize(p))


# ---- every dispatch branch, deterministically ---------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 48])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemv_and_gemm_branches(isa, m, dtype):
    n, k = 45, 320  # N not a multiple of any tile; 10 chunks of 32 columns
    qweight, scales, zeros = int4_weight(n, k, 64, dtype, True, m)
    x = torch.randn(m, k).to(dtype)
    check(call_int4(x, qweight, scales, zeros, 64, None, 2), reference.int4_matmul(x, qweight, scales, zeros, 64, None),
          dtype)
    p = nf4.quantize(torch.randn(n, k), blocksize=64, double_quant=True)
    check(call_nf4(x, p, None, 2), ref_nf4(x, p, None), dtype)


# Segment lengths of the bfloat16 GEMV: multiples of 128 (one 64-byte load, 4 nibble planes),
# 64 and 32 (4-chunk groups over several segments, then a tail), and others (96).
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("k, seg", [(640, 128), (768, 256), (448, 64), (416, 32), (288, 96)])
def test_bfloat16_gemv_segment_layouts(isa, m, k, seg):
    n = 37
    x = torch.randn(m, k).to(torch.bfloat16)
    if seg != 96:
        p = nf4.quantize(torch.randn(n, k), blocksize=seg, double_quant=True)
        check(call_nf4(x, p, None, 2), ref_nf4(x, p, None), torch.bfloat16)
    qweight, scales, zeros = int4_weight(n, k, seg, torch.bfloat16, True, m)
    check(call_int4(x, qweight, scales, zeros, seg, None, 2),
          reference.int4_matmul(x, qweight, scales, zeros, seg, None), torch.bfloat16)


# The outer-product GEMMs' switch points: x blocks of 16 (AVX2) / 32 (AVX-512) rows with a last
# block of <= 8 / <= 16 rows taking the narrow tile, more x rows than one task (kMC = 256), more
# weight rows than one task (96 / 64) and not a multiple of any tile or of the 8 x 8 / 16 x 16
# epilogue blocks, several K blocks (256 columns) with a partial last one, bias, every output
# dtype, 1 and 2 threads.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [3, 8, 9, 16, 24, 25, 41, 260])
@pytest.mark.parametrize("dtype", FLOATS)
def test_gemm_tiles_and_blocks(isa, threads, m, dtype):
    n, k = 203, 544
    qweight, scales, zeros = int4_weight(n, k, 32, dtype, True, m)
    x = activations(m, k, dtype, "row_slice", m)
    bias = torch.randn(n).to(dtype)
    w = int4.dequantize_tensors(qweight, scales, zeros, 32, dtype=torch.float32)
    check(call_int4(x, qweight, scales, zeros, 32, bias, threads),
          reference.int4_matmul(x, qweight, scales, zeros, 32, bias), dtype, x, w)
    p = nf4.quantize(torch.randn(n, k - 1), blocksize=64, double_quant=True)  # odd K: element decode
    x1 = x[:, : k - 1]
    check(call_nf4(x1, p, bias, threads), ref_nf4(x1, p, bias), dtype, x1, nf4.dequantize(p))


@pytest.mark.parametrize("m", [1, 64])
def test_float32_is_exact_at_large_k(isa, m):
    """float32 activations are computed in float32: 1e-5 against the reference at K = 4096."""
    n, k = 24, 4096
    qweight, scales, zeros = int4_weight(n, k, 128, torch.float32, True, 1)
    x = torch.randn(m, k)
    out = call_int4(x, qweight, scales, zeros, 128, None, 2)
    assert rel_err(out, reference.int4_matmul(x, qweight, scales, zeros, 128, None)) <= 1e-5
    p = nf4.quantize(torch.randn(n, k), blocksize=64, double_quant=True)
    assert rel_err(call_nf4(x, p, None, 2), ref_nf4(x, p, None)) <= 1e-5


def test_decoded_weights_match_the_reference_exactly(isa):
    """One-hot activations read single decoded weights: float32 results equal the reference's."""
    n, k = 7, 64
    qweight, scales, zeros = int4_weight(n, k, 32, torch.bfloat16, True, 3)
    p = nf4.quantize(torch.randn(n, k), blocksize=32, double_quant=True)
    x = torch.eye(k)[:9]  # M = 9: the GEMM; rows 0..8 of the identity
    w4 = int4.dequantize_tensors(qweight, scales, zeros, 32).t()[:9]
    assert torch.equal(call_int4(x, qweight, scales, zeros, 32, None, 1), w4)
    wn = nf4.dequantize(p).t()[:9]
    assert torch.equal(call_nf4(x, p, None, 1), wn)
    assert torch.equal(call_nf4(x[:1], p, None, 1), wn[:1])  # M = 1: the GEMV


@pytest.mark.parametrize("m", [1, 6, 40])
def test_results_do_not_depend_on_the_thread_count(isa, m):
    n, k = 300, 512
    qweight, scales, zeros = int4_weight(n, k, 128, torch.bfloat16, True, m)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    outs = [call_int4(x, qweight, scales, zeros, 128, None, t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    p = nf4.quantize(torch.randn(n, k), blocksize=64)
    outs = [call_nf4(x, p, None, t) for t in (1, 2, 3)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


# ---- the op layer and the dispatcher ------------------------------------------------------------


def test_ops_dispatch_to_native(monkeypatch):
    from lowbit import backends, ops

    p = nf4.quantize(torch.randn(16, 96), blocksize=64, double_quant=True)
    args = (torch.randn(3, 96, dtype=torch.bfloat16), p.qweight, p.absmax, p.absmax_scale, p.absmax_code,
            p.absmax_offset, 64, 16, None)
    assert backends.select("nf4_matmul", "cpu", args)[0] == "native"
    monkeypatch.setenv("LOWBIT_BACKEND", "native")
    check(ops.nf4_matmul(*args), ref_nf4(args[0], p, None), torch.bfloat16)
    q = int4.quantize(torch.randn(16, 96), group_size=32)
    x = torch.randn(2, 5, 96)
    check(ops.int4_matmul(x, q.qweight, q.scales, q.zeros, 32), reference.int4_matmul(x, q.qweight, q.scales, q.zeros, 32),
          torch.float32)


def test_wrapper_empty_and_batched_inputs():
    from lowbit.backends import cpu

    p = nf4.quantize(torch.randn(8, 64), blocksize=32)
    for shape in [(0, 64), (2, 0, 64)]:
        y = cpu.nf4_matmul(torch.randn(shape), p.qweight, p.absmax, None, None, 0.0, 32, 8)
        assert y.shape == (*shape[:-1], 8)
    x = torch.randn(2, 3, 64, dtype=torch.float16)
    y = cpu.nf4_matmul(x, p.qweight.view(-1, 1), p.absmax, None, None, 0.0, 32, 8)  # bnb's [n/2, 1] packing
    check(y, ref_nf4(x, p, None), torch.float16)


def test_supports_nf4_matmul():
    from lowbit.backends import cpu

    p = nf4.quantize(torch.randn(4, 64), blocksize=32, double_quant=True)
    args = [torch.randn(2, 64), p.qweight, p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, 32, 4, None]
    assert cpu.supports_nf4_matmul(*args)
    for i, bad in [(0, args[0].double()), (0, args[0].to("meta")), (1, p.qweight.to(torch.int32)),
                   (2, p.absmax.float()), (3, None), (8, torch.randn(4, dtype=torch.float64))]:
        changed = list(args)
        changed[i] = bad
        assert not cpu.supports_nf4_matmul(*changed), i


# ---- bad arguments -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(qweight=lambda p: p.qweight[:-1]), ValueError, "qweight has"),
        (dict(absmax=lambda p: p.absmax[:-1]), ValueError, "absmax"),
        (dict(absmax=lambda p: p.absmax.double()), TypeError, "absmax"),
        (dict(absmax_scale=lambda p: p.absmax_scale[:0]), ValueError, "absmax_scale"),
        (dict(absmax_code=lambda p: None), ValueError, "absmax_code"),
        (dict(bias=lambda p: torch.randn(5)), ValueError, "bias"),
        (dict(x=lambda p: torch.randn(2, 64, dtype=torch.float64)), TypeError, "float64"),
        (dict(x=lambda p: torch.randn(2, 63)), ValueError, "qweight has"),
        (dict(blocksize=lambda p: 48), ValueError, "blocksize=48"),
        (dict(absmax=lambda p: p.absmax.to("meta")), ValueError, "meta"),
    ],
)
def test_wrapper_rejects(change, exc, match):
    from lowbit.backends import cpu

    p = nf4.quantize(torch.randn(4, 64), blocksize=32, double_quant=True)
    kw = dict(x=torch.randn(2, 64), qweight=p.qweight, absmax=p.absmax, absmax_scale=p.absmax_scale,
              absmax_code=p.absmax_code, absmax_offset=p.absmax_offset, blocksize=32, out_features=4, bias=None)
    for key, fn in change.items():
        kw[key] = fn(p)
    with pytest.raises(exc, match=match):
        cpu.nf4_matmul(**kw)


@pytest.fixture
def raw_nf4():
    """Valid raw nf4_matmul_cpu arguments (double-quantized), and the buffers that keep them alive."""
    p = nf4.quantize(torch.randn(4, 64), blocksize=32, double_quant=True)
    x, out = torch.randn(3, 64), torch.empty(3, 4)
    kw = dict(x_ptr=x.data_ptr(), x_dtype=0, x_row_stride=64, qweight_ptr=p.qweight.data_ptr(),
              absmax_ptr=p.absmax.data_ptr(), absmax_scale_ptr=p.absmax_scale.data_ptr(),
              absmax_code_ptr=p.absmax_code.data_ptr(), absmax_offset=p.absmax_offset, bias_ptr=0, bias_dtype=0,
              out_ptr=out.data_ptr(), out_dtype=0, M=3, N=4, K=64, blocksize=32, num_threads=1)
    C.nf4_matmul_cpu(**kw)
    check(out, ref_nf4(x, p, None), torch.float32)
    return kw, (p, x, out)


RAW_BAD = [
    ("x_ptr", 0, "x_ptr is a null pointer"),
    ("qweight_ptr", 0, "qweight_ptr is a null pointer"),
    ("absmax_ptr", 0, "absmax_ptr is a null pointer"),
    ("out_ptr", 0, "out_ptr is a null pointer"),
    ("absmax_code_ptr", 0, "both be given"),
    ("M", 0, "M=0 must be positive"),
    ("N", -1, "N=-1 must be positive"),
    ("K", 0, "K=0 must be positive"),
    ("blocksize", 48, "blocksize=48"),
    ("blocksize", 8192, "blocksize=8192"),
    ("x_row_stride", 63, "x_row_stride=63"),
    ("x_dtype", 5, "x_dtype=5"),
    ("out_dtype", -1, "out_dtype=-1"),
    ("absmax_offset", math.inf, "absmax_offset=inf must be finite"),
    ("num_threads", 0, "num_threads=0"),
    ("M", 2**62, "overflow"),
]


@pytest.mark.parametrize("name,value,match", RAW_BAD, ids=[f"{b[0]}={b[1]}" for b in RAW_BAD])
def test_raw_nf4_rejects(raw_nf4, name, value, match):
    kw, _keep = raw_nf4
    kw[name] = value
    with pytest.raises(ValueError, match=match):
        C.nf4_matmul_cpu(**kw)


def test_raw_nf4_offset_needs_double_quant(raw_nf4):
    kw, (p, _, _) = raw_nf4
    plain = nf4.quantize(torch.randn(4, 64), blocksize=32)
    kw.update(absmax_ptr=plain.absmax.data_ptr(), absmax_scale_ptr=0, absmax_code_ptr=0, absmax_offset=0.5)
    with pytest.raises(ValueError, match="must be 0 without double quantization"):
        C.nf4_matmul_cpu(**kw)


@pytest.mark.parametrize("name", ["x_ptr", "out_ptr", "absmax_scale_ptr", "absmax_code_ptr"])
def test_raw_nf4_misaligned_pointer(raw_nf4, name):
    kw, _keep = raw_nf4
    kw[name] += 1
    with pytest.raises(ValueError, match=f"{name}=0x[0-9a-f]+ is not aligned"):
        C.nf4_matmul_cpu(**kw)


def test_raw_nf4_misaligned_float_absmax(raw_nf4):
    kw, _keep = raw_nf4
    plain = nf4.quantize(torch.randn(4, 64), blocksize=32)
    kw.update(absmax_ptr=plain.absmax.data_ptr() + 2, absmax_scale_ptr=0, absmax_code_ptr=0, absmax_offset=0.0)
    with pytest.raises(ValueError, match="absmax_ptr=0x[0-9a-f]+ is not aligned"):
        C.nf4_matmul_cpu(**kw)


def test_raw_int4_misaligned_pointer_on_the_fast_paths():
    qweight, scales, zeros = int4_weight(8, 64, 32, torch.bfloat16, True, 0)
    x, out = torch.randn(1, 64, dtype=torch.bfloat16), torch.empty(1, 8, dtype=torch.bfloat16)
    kw = dict(x_ptr=x.data_ptr() + 1, x_dtype=2, x_row_stride=64, qweight_ptr=qweight.data_ptr(),
              scales_ptr=scales.data_ptr(), scales_dtype=2, zeros_ptr=zeros.data_ptr(), zeros_dtype=2, bias_ptr=0,
              bias_dtype=2, out_ptr=out.data_ptr(), out_dtype=2, M=1, N=8, K=64, group_size=32, num_threads=1)
    with pytest.raises(ValueError, match="x_ptr=0x[0-9a-f]+ is not aligned"):
        C.int4_matmul_cpu(**kw)


# ---- Arm NEON, cross-compiled and run under qemu where this machine has the tools ---------------

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")),
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64")
def test_neon_kernels_under_qemu(tmp_path):
    """The NEON build of the kernels (and the portable one) against a float64 reference."""
    (tmp_path / "lowbit_build_config.h").write_text("#define LOWBIT_FOR_EACH_ISA(X, arg)\n")
    cxx = ["aarch64-linux-gnu-g++", "-O1", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
           f"-I{tmp_path}"]
    objs = []
    jobs = []
    for isa, level in (("scalar", 0), ("neon", 4)):
        for src in ("int4_matmul_kernels.cpp", "nf4_matmul_kernels.cpp"):
            obj = tmp_path / f"{isa}_{src}.o"
            objs.append(str(obj))
            jobs.append(cxx + [f"-DLOWBIT_ISA_SUFFIX={isa}", f"-DLOWBIT_ISA_LEVEL={level}", "-c",
                               str(ROOT / "csrc/cpu" / src), "-o", str(obj)])
    for src, obj in ((ROOT / "csrc/cpu/parallel.cpp", tmp_path / "parallel.o"),
                     (ROOT / "tests/cpp/lut4_cross_check.cpp", tmp_path / "main.o")):
        objs.append(str(obj))
        jobs.append(cxx + ["-c", str(src), "-o", str(obj)])
    procs = [subprocess.Popen(j, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for j in jobs]
    for p in procs:
        out, _ = p.communicate()
        assert p.returncode == 0, out
    exe = tmp_path / "check"
    subprocess.run(["aarch64-linux-gnu-g++", "-static", *objs, "-o", str(exe), "-lpthread"], check=True)
    run = subprocess.run(["qemu-aarch64", str(exe)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "QEMU_CPU": "max"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failures" in run.stdout
