"""The native CPU sparse24_matmul kernel (2:4 sparse weights), on every instruction-set path.

Each test runs once per ISA this CPU supports (``LOWBIT_CPU_ISA`` forces the path), against the
pure-PyTorch reference; M crosses the switches between the row kernels (bf16 x and values, M = 1,
or M <= 4 with x in 32 KiB), the gather kernels (small M) and the outer-product kernels (M >= 16
with fp32 math, M >= 32 with bf16 x and values; on AVX-512 the dense-panel path takes over at
M >= 256 with bf16 x and values and for 16 <= M < 512 with fp32 math), K covers the smallest
legal size, tails of every SIMD step and multi-block sizes, N covers partial tiles.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import _native
from lowbit.backends import cpu as cpu_backend
from lowbit.backends import native_args, reference
from lowbit.formats import sparse24

from conftest import RTOL, rel_err

C = _native.C
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ISAS = lowbit._C.cpu_isa()["supported"]
CODE = native_args.DTYPE_CODES


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_ISA", request.param)
    return request.param


def make(m, n, k, x_dtype, v_dtype, *, seed=0, bias_dtype=None):
    g = torch.Generator().manual_seed(seed)
    p = sparse24.quantize(torch.randn(n, k, generator=g), dtype=v_dtype)
    x = torch.randn(m, k, generator=g).to(x_dtype)
    b = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, p.values, p.meta, b


def run(x, values, meta, bias=None, threads=2):
    torch.set_num_threads(threads)
    try:
        return cpu_backend.sparse24_matmul(x, values, meta, bias)
    finally:
        torch.set_num_threads(2)


def check(out, x, values, meta, bias):
    ref = reference.sparse24_matmul(x, values, meta, bias)
    assert out.dtype == x.dtype and out.shape == ref.shape
    err = rel_err(out, ref)
    assert err <= RTOL[x.dtype], f"relative error {err:.3g} > {RTOL[x.dtype]} ({x.dtype} x, {values.dtype} values)"


def raw(x2, values, meta, bias, out, threads=1, row_stride=None, **override):
    kw = dict(
        x_ptr=x2.data_ptr(), x_dtype=CODE[x2.dtype], x_row_stride=row_stride or x2.shape[1],
        values_ptr=values.data_ptr(), values_dtype=CODE[values.dtype], meta_ptr=meta.data_ptr(),
        bias_ptr=0 if bias is None else bias.data_ptr(), bias_dtype=0 if bias is None else CODE[bias.dtype],
        out_ptr=out.data_ptr(), out_dtype=CODE[out.dtype], M=x2.shape[0], N=values.shape[0], K=x2.shape[1],
        num_threads=threads,
    )
    kw.update(override)
    C.sparse24_matmul_cpu(**kw)


# ---------------------------------------------------------------------------------------------
# against the reference


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 64, 70]),
    n=st.integers(1, 40),
    k8=st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 33, 64, 65]),
    x_dtype=st.sampled_from(FLOATS),
    v_dtype=st.sampled_from(FLOATS),
    bias=st.booleans(),
    threads=st.sampled_from([1, 2]),
    seed=st.integers(0, 2**16),
)
def test_matches_reference(isa, m, n, k8, x_dtype, v_dtype, bias, threads, seed):
    x, values, meta, b = make(m, n, 8 * k8, x_dtype, v_dtype, seed=seed, bias_dtype=x_dtype if bias else None)
    check(run(x, values, meta, b, threads), x, values, meta, b)


@pytest.mark.parametrize("x_dtype,v_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("m", [1, 6, 16, 31, 32, 130])
def test_larger_problem(isa, m, x_dtype, v_dtype):
    # K spans several blocks of every kernel plus a tail; N several tiles plus a partial one.
    x, values, meta, b = make(m, 67, 1096, x_dtype, v_dtype, seed=m, bias_dtype=torch.float32)
    check(run(x, values, meta, b), x, values, meta, b)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m,k", [(1, 8), (1, 64), (1, 264), (1, 4104), (2, 520), (3, 1096), (4, 4096), (4, 4104),
                                 (2, 8200), (5, 520)])
def test_small_m_row_kernel(isa, m, k, threads):
    # bf16 x and values, M <= 4 with M x rows of at most 32 KiB (M = 1 always): the row kernels
    # (runs of whole weight rows per thread, 4 accumulator chains at M = 1), else the gather
    # tiles; K covers the 64- and 256-column steps and their tails, N several runs per thread.
    x, values, meta, b = make(m, 37, k, torch.bfloat16, torch.bfloat16, seed=k + m, bias_dtype=torch.bfloat16)
    check(run(x, values, meta, b, threads), x, values, meta, b)


def test_fp32_activations_are_exact(isa):
    # Integer-valued operands: every product and partial sum is exact in fp32, so any order of
    # summation gives the exact answer; the fp32 path must not round through bf16.
    g = torch.Generator().manual_seed(1)
    w = sparse24.prune(torch.randint(-8, 9, (37, 512), generator=g).float())
    p = sparse24.compress(w)
    for m in (1, 5, 16, 40):
        x = torch.randint(-8, 9, (m, 512), generator=g).float() + 1 / 256
        torch.testing.assert_close(run(x, p.values, p.meta), x.double() @ w.double().t(), rtol=0, atol=0,
                                   check_dtype=False)


@pytest.mark.parametrize("m", [1, 5, 20])
def test_non_contiguous_and_batched_x(isa, m):
    x, values, meta, b = make(m, 19, 264, torch.bfloat16, torch.bfloat16, seed=3)
    wide = torch.randn(m, 264 + 24).to(torch.bfloat16)
    wide[:, 8 : 8 + 264] = x
    xs = wide[:, 8 : 8 + 264]  # row stride 288, unit inner stride
    assert m == 1 or not xs.is_contiguous()
    check(run(xs, values, meta, b), xs, values, meta, b)
    xt = torch.randn(264, m).t()  # inner stride != 1: copied by the wrapper
    check(run(xt, values, meta), xt, values, meta, None)
    x3 = x.reshape(1, m, 264).expand(2, m, 264)
    out = run(x3, values, meta, b)
    assert out.shape == (2, m, 19)
    check(out[1], x, values, meta, b)


@pytest.mark.parametrize("m", [1, 9, 40])
def test_bitwise_stable_across_threads_and_row_stride(isa, m):
    x, values, meta, _ = make(m, 150, 520, torch.bfloat16, torch.bfloat16, seed=5)
    base = torch.randn(m, 520 + 40).to(torch.bfloat16)
    base[:, 16 : 16 + 520] = x
    outs = []
    for threads in (1, 2, 3):
        out = torch.empty(m, 150, dtype=torch.float32)
        raw(base[:, 16:], values, meta, None, out, threads, row_stride=base.stride(0), K=520)
        outs.append(out)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    check(outs[0].to(torch.bfloat16), x, values, meta, None)


@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("bias_dtype", [None, *FLOATS])
def test_out_and_bias_dtypes(isa, out_dtype, bias_dtype):
    x, values, meta, b = make(17, 23, 128, torch.float32, torch.bfloat16, bias_dtype=bias_dtype)
    out = torch.empty(17, 23, dtype=out_dtype)
    raw(x, values, meta, b, out, 2)
    ref = reference.sparse24_matmul(x, values, meta, b)
    assert rel_err(out, ref) <= RTOL[out_dtype]


def test_every_isa_gives_the_scalar_answer_for_illegal_nibbles(monkeypatch):
    # Illegal nibbles (i0 >= i1) are not a valid checkpoint, but a kernel must still read only
    # inside the group: every path computes v0 * x[4g + (nib & 3)] + v1 * x[4g + (nib >> 2)].
    g = torch.Generator().manual_seed(7)
    n, k = 13, 136
    values = torch.randn(n, k // 2, generator=g).to(torch.bfloat16)
    meta = torch.randint(0, 256, (n, k // 8), generator=g, dtype=torch.uint8)
    nib = torch.stack([meta & 15, meta >> 4], -1).reshape(n, k // 4).long()
    cols = torch.arange(k // 4).mul(4)
    dense = torch.zeros(n, k)
    v = values.float().reshape(n, k // 4, 2)
    rows = torch.arange(n).unsqueeze(1)
    dense.index_put_((rows, cols + (nib & 3)), v[..., 0], accumulate=True)
    dense.index_put_((rows, cols + (nib >> 2)), v[..., 1], accumulate=True)
    for m in (1, 20, 40):
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        expect = x.float() @ dense.t()
        for isa_name in ISAS:
            monkeypatch.setenv("LOWBIT_CPU_ISA", isa_name)
            out = torch.empty(m, n)
            raw(x, values, meta, None, out, 2)
            assert rel_err(out, expect) < 1e-5, isa_name


def illegal_dense(values, meta):
    """The dense matrix of the defined result for any nibble: W[4g + i0] += v0, W[4g + i1] += v1."""
    n, k = meta.shape[0], meta.shape[1] * 8
    nib = torch.stack([meta & 15, meta >> 4], -1).reshape(n, k // 4).long()
    cols = torch.arange(k // 4).mul(4)
    dense = torch.zeros(n, k, dtype=torch.float64)
    v = values.double().reshape(n, k // 4, 2)
    rows = torch.arange(n).unsqueeze(1)
    dense.index_put_((rows, cols + (nib & 3)), v[..., 0], accumulate=True)
    dense.index_put_((rows, cols + (nib >> 2)), v[..., 1], accumulate=True)
    return dense


# The switch points of the dense-panel path (AVX-512): bf16 x and values from M = 256 (XP
# outer-product kernel below, gather below 32), fp32 math from M = 16 up to 511 (XT from 512). K = 1096 spans
# several K blocks (512 bf16 / 256 fp32 columns) and ends 8 columns past a 32-column step; K = 40
# is shorter than one 64-column decode step; N = 70 is one full 64-row tile plus a partial one.
@pytest.mark.parametrize("x_dtype,v_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.float32, torch.float16), (torch.bfloat16, torch.float16),
                                             (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("m", [15, 16, 31, 32, 255, 256, 257, 511, 512])
@pytest.mark.parametrize("k", [40, 1096])
def test_dense_path_switch_points(isa, m, k, x_dtype, v_dtype):
    n = 70 if m < 200 else 21
    x, values, meta, b = make(m, n, k, x_dtype, v_dtype, seed=m + k, bias_dtype=x_dtype)
    check(run(x, values, meta, b, threads=1 + m % 2), x, values, meta, b)


@pytest.mark.parametrize("x_dtype,v_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.float32, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("m", [17, 40, 257])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_path_illegal_nibbles(isa, m, threads, x_dtype, v_dtype):
    # Random meta bytes: illegal orders (i0 > i1) and repeated columns (i0 == i1) in every K
    # block, the K tail and both row tiles; dense panels must still give the defined result.
    g = torch.Generator().manual_seed(m)
    n, k = 70, 1096
    values = torch.randn(n, k // 2, generator=g).to(v_dtype)
    meta = torch.randint(0, 256, (n, k // 8), generator=g, dtype=torch.uint8)
    meta[:8] = 0x44  # some rows legal throughout (nibble 4: columns 0, 1)
    meta[3, -1] = 0x00  # an i0 == i1 nibble in the last meta byte only
    x = torch.randn(m, k, generator=g).to(x_dtype)
    expect = x.double() @ illegal_dense(values, meta).t()
    out = torch.empty(m, n)
    raw(x, values, meta, None, out, threads)
    assert rel_err(out, expect) < (1e-5 if x_dtype == torch.float32 else 1e-2)


def test_dense_path_fp32_is_exact(isa):
    # Integer-valued operands (see test_fp32_activations_are_exact) at the dense-path sizes.
    g = torch.Generator().manual_seed(2)
    w = sparse24.prune(torch.randint(-8, 9, (70, 1096), generator=g).float())
    p = sparse24.compress(w)
    for m in (16, 33, 300):
        x = torch.randint(-8, 9, (m, 1096), generator=g).float() + 1 / 256
        torch.testing.assert_close(run(x, p.values, p.meta), x.double() @ w.double().t(), rtol=0, atol=0,
                                   check_dtype=False)


def test_dispatch_uses_native_kernel():
    x, values, meta, b = make(3, 8, 64, torch.bfloat16, torch.bfloat16)
    assert cpu_backend.supports_sparse24_matmul(x, values, meta, b)
    assert lowbit.backends.select("sparse24_matmul", "cpu", (x, values, meta, b))[0] == "native"
    check(lowbit.ops.sparse24_matmul(x, values, meta, b), x, values, meta, b)
    assert not cpu_backend.supports_sparse24_matmul(x, values, meta.to(torch.int16), b)


# ---------------------------------------------------------------------------------------------
# bad input: clear exceptions, never a crash


def test_empty_inputs():
    x, values, meta, _ = make(0, 8, 64, torch.float32, torch.float32)
    assert run(x, values, meta).shape == (0, 8)
    assert lowbit.ops.sparse24_matmul(x, values, meta).shape == (0, 8)
    x, values, meta, _ = make(3, 8, 64, torch.float32, torch.float32)
    out = run(x, values[:0], meta[:0])
    assert out.shape == (3, 0)
    with pytest.raises(ValueError, match="in_features"):
        lowbit.ops.sparse24_matmul(torch.empty(3, 0), values, meta)


def test_wrapper_rejects_bad_shapes_and_dtypes():
    x, values, meta, b = make(3, 8, 64, torch.float32, torch.float32, bias_dtype=torch.float32)
    fn = cpu_backend.sparse24_matmul
    with pytest.raises(ValueError, match="values"):
        fn(torch.randn(3, 72), values, meta)
    with pytest.raises(ValueError, match="multiple of 8"):
        fn(torch.randn(3, 60), torch.randn(8, 30), torch.zeros(8, 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="meta"):
        fn(x, values, meta[:, :-1])
    with pytest.raises(TypeError, match="meta"):
        fn(x, values, meta.to(torch.int8))
    with pytest.raises(TypeError, match="x"):
        fn(x.to(torch.float64), values, meta)
    with pytest.raises(TypeError, match="values"):
        fn(x, values.to(torch.float64), meta)
    with pytest.raises(ValueError, match="bias"):
        fn(x, values, meta, b[:-1])


def test_raw_call_rejects_bad_arguments():
    x, values, meta, _ = make(2, 8, 64, torch.float32, torch.bfloat16)
    out = torch.empty(2, 8)
    cases = [
        (dict(K=60), "multiple of 8"),
        (dict(M=0), "M=0"),
        (dict(N=0), "N=0"),
        (dict(K=0), "K=0"),
        (dict(x_row_stride=32), "x_row_stride"),
        (dict(x_dtype=5), "x_dtype"),
        (dict(values_dtype=-1), "values_dtype"),
        (dict(out_dtype=3), "out_dtype"),
        (dict(meta_ptr=0), "meta_ptr"),
        (dict(values_ptr=0), "values_ptr"),
        (dict(x_ptr=x.data_ptr() + 2), "x_ptr"),  # fp32 x at a 2-byte offset: misaligned
        (dict(values_ptr=values.data_ptr() + 1), "values_ptr"),
        (dict(out_ptr=out.data_ptr() + 1), "out_ptr"),
        (dict(bias_ptr=out.data_ptr() + 2, bias_dtype=0), "bias_ptr"),
        (dict(num_threads=0), "num_threads"),
        (dict(M=2**40, N=2**40), "overflow"),
    ]
    for override, match in cases:
        with pytest.raises(ValueError, match=match):
            raw(x, values, meta, None, out, **override)


def test_forcing_an_unknown_isa_is_a_value_error(monkeypatch):
    x, values, meta, _ = make(2, 8, 64, torch.float32, torch.float32)
    monkeypatch.setenv("LOWBIT_CPU_ISA", "avx9000")
    with pytest.raises(ValueError, match="LOWBIT_CPU_ISA"):
        run(x, values, meta)


@pytest.mark.parametrize("threads", [1, 2])
def test_outer_kernel_several_chunks_and_late_illegal_nibble(isa, threads):
    # The outer-product kernels pack kChunkTiles tiles (480 rows) at a time and prefetch the next
    # chunk: N spans several chunks per thread. One illegal nibble in a late chunk must still get
    # its table slots built (they are built lazily, once per K block).
    g = torch.Generator().manual_seed(11)
    n, k, m = 1100, 264, 40
    p = sparse24.quantize(torch.randn(n, k, generator=g), dtype=torch.bfloat16)
    meta = p.meta.clone()
    meta[1050, 3] = (meta[1050, 3] & 0xF0) | 0x05  # nibble 5: columns (1, 1)
    nib = torch.stack([meta & 15, meta >> 4], -1).reshape(n, k // 4).long()
    cols = torch.arange(k // 4).mul(4)
    v = p.values.float().reshape(n, k // 4, 2)
    dense = torch.zeros(n, k)
    rows = torch.arange(n).unsqueeze(1)
    dense.index_put_((rows, cols + (nib & 3)), v[..., 0], accumulate=True)
    dense.index_put_((rows, cols + (nib >> 2)), v[..., 1], accumulate=True)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    out = torch.empty(m, n)
    raw(x, p.values, meta, None, out, threads)
    assert rel_err(out, x.float() @ dense.t()) < 1e-5
