"""The native CPU ternary_matmul (csrc/cpu/ternary_matmul*.cpp) against the reference.

Every instruction-set path this machine runs (LOWBIT_CPU_ISA), with 1 and 2 threads. The
activation quantization is the reference's, step for step, the products are exact integers
and the rescale is the same float32 operations, so outputs are compared bit for bit (NaN
where the reference has NaN), which is stricter than the per-dtype RTOL of conftest.
Both kernel paths are covered: "dot" (what small M takes; the only path of the scalar build)
and, on x86, "gemm" (taken once x_q, M * round_up(K, 64) bytes, exceeds 1 MiB).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import _native, backends
from lowbit.backends import reference
from lowbit.formats import ternary

if not _native.has("ternary_matmul_cpu"):
    pytest.skip("the native module has no ternary_matmul_cpu", allow_module_level=True)

from lowbit.backends import cpu as native_cpu  # noqa: E402  (needs the native module)
from lowbit.backends.native_args import TERNARY_MAX_K, prepare_ternary  # noqa: E402

from conftest import RTOL, rel_err  # noqa: E402

C = _native.C
ISAS = C.cpu_isa()["supported"]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
HYPO = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=[(isa, t) for isa in ISAS for t in (1, 2)], ids=lambda p: f"{p[0]}-t{p[1]}")
def isa_threads(request, monkeypatch):
    """Force one instruction set and torch's thread count (what the backend passes down)."""
    isa, threads = request.param
    monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    yield isa, threads
    torch.set_num_threads(old)


def make(m, k, n, dtype=torch.float32, *, per_row=False, bias_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = ternary.quantize(torch.randn(n, k, generator=g), per_row=per_row)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = None if bias_dtype is None else torch.randn(n, generator=g).to(bias_dtype)
    return x, p.qweight, p.weight_scale, n, b


def check(x, qweight, weight_scale, n, bias=None):
    """The native kernel's output equals the reference's, bit for bit."""
    out = native_cpu.ternary_matmul(x, qweight, weight_scale, n, bias)
    ref = reference.ternary_matmul(x, qweight, weight_scale, n, bias)
    assert out.dtype == ref.dtype == x.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)
    if ref.numel() and torch.isfinite(ref).all():
        assert rel_err(out, ref) <= RTOL[x.dtype]
    return out


# ---------------------------------------------------------------------------------------
# every ISA path, 1 and 2 threads


@HYPO
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    n=st.integers(1, 70),
    dtype=st.sampled_from(FLOATS),
    per_row=st.booleans(),
    bias_dtype=st.sampled_from((None, *FLOATS)),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(isa_threads, m, k, n, dtype, per_row, bias_dtype, seed):
    check(*make(m, k, n, dtype, per_row=per_row, bias_dtype=bias_dtype, seed=seed))


@pytest.mark.parametrize(
    "m,k,n",
    [
        (1, 1, 1),  # smallest legal everything
        (1, 64, 4),  # one whole vector of K
        (1, 65, 5),  # one byte past it; N one past a packed row
        (3, 127, 7),
        (4, 4097, 130),  # K past a multiple of 64, N not a multiple of 64 (tiles)
        (1, 14336, 9),  # large K (the Llama MLP down projection)
        (5, 2048, 263),  # several tasks of 16 byte rows, a partial last one
    ],
)
def test_edge_shapes(isa_threads, m, k, n):
    for dtype in FLOATS:
        check(*make(m, k, n, dtype, bias_dtype=dtype, seed=m + k + n))
        check(*make(m, k, n, dtype, per_row=True, seed=m + k + n + 1))


@pytest.mark.parametrize("m,k,n", [(16385, 64, 9), (1000, 1100, 37), (700, 1500, 70)])
def test_gemm_path_shapes(isa_threads, m, k, n):
    """M * round_up(K, 64) > 1 MiB: the blocked path on x86 (K a multiple of 64 or not, M not
    a multiple of its 6-row tile, N not a multiple of its 64-output tile)."""
    dtype = torch.bfloat16 if m > 10000 else torch.float32
    check(*make(m, k, n, dtype, per_row=k % 2 == 0, bias_dtype=torch.float16, seed=k))


def test_non_contiguous_and_batched_x(isa_threads):
    x, qw, ws, n, b = make(6, 200, 21, torch.float32, bias_dtype=torch.float32, seed=3)
    wide = torch.randn(6, 300)
    wide[:, 50:250] = x
    check(wide[:, 50:250], qw, ws, n, b)  # row stride 300
    check(x.t().contiguous().t(), qw, ws, n, b)  # column-major: copied to unit inner stride
    out = check(x.view(2, 3, 200), qw, ws, n, b)
    assert out.shape == (2, 3, n)
    check(x[::2], qw, ws, n, b)  # every other row
    check(x[0], qw, ws, n, b)  # 1-d x


def test_rounding_ties_and_special_rows(isa_threads):
    """Half-way products round to even (as torch.round), zero rows, tiny rows, non-finite rows."""
    k, n = 70, 10
    _, qw, ws, _, b = make(1, k, n, bias_dtype=torch.float32, seed=5)
    ties = torch.zeros(k)
    ties[:8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5])  # scale 1 exactly
    rows = torch.stack([
        ties,
        torch.zeros(k),  # amax 0 -> clamped to 1e-5
        torch.full((k,), 3e-7),  # below the clamp
        torch.linspace(-1, 1, k),
        torch.full((k,), float("inf")),  # x_scale 0 -> 0 / 0 = NaN
        torch.full((k,), float("nan")),
        torch.cat([torch.tensor([float("-inf")]), torch.ones(k - 1)]),
        torch.cat([torch.ones(k - 1), torch.tensor([float("nan")])]),
        torch.full((k,), 3.0e38),  # huge but finite
    ])
    for dtype in FLOATS:
        out = check(rows.to(dtype), qw, ws, n, b)
        assert torch.isnan(out[4:8]).all() and torch.isfinite(out[:4]).all()


def test_results_do_not_depend_on_isa_or_threads(monkeypatch):
    args = make(37, 333, 101, torch.bfloat16, per_row=True, bias_dtype=torch.bfloat16, seed=9)
    outs = []
    old = torch.get_num_threads()
    try:
        for isa in ISAS:
            monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs.append(native_cpu.ternary_matmul(*args))
    finally:
        torch.set_num_threads(old)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


# ---------------------------------------------------------------------------------------
# dispatch and the op layer


def test_dispatcher_picks_native():
    args = make(2, 64, 8, torch.bfloat16)
    assert backends.select("ternary_matmul", "cpu", args)[0] == "native"
    assert native_cpu.supports_ternary_matmul(*args)
    x, qw, ws, n, _ = args
    assert not native_cpu.supports_ternary_matmul(x.to(torch.float64), qw, ws, n)
    assert not native_cpu.supports_ternary_matmul(x, qw, ws.double(), n)
    big = torch.zeros(1, TERNARY_MAX_K + 1)
    assert not native_cpu.supports_ternary_matmul(big, torch.zeros(1, TERNARY_MAX_K + 1, dtype=torch.uint8), ws, 1)


def test_op_runs_native_and_matches_reference(monkeypatch):
    args = make(3, 96, 18, torch.float16, bias_dtype=torch.float16)
    monkeypatch.setenv("LOWBIT_BACKEND", "native")
    out = lowbit.ops.ternary_matmul(*args)
    torch.testing.assert_close(out, reference.ternary_matmul(*args), rtol=0, atol=0)


def test_empty_batch():
    x, qw, ws, n, b = make(1, 32, 6)
    out = native_cpu.ternary_matmul(x[:0], qw, ws, n, b)
    assert out.shape == (0, n)
    assert lowbit.ops.ternary_matmul(torch.zeros(2, 0, 32), qw, ws, n).shape == (2, 0, n)


# ---------------------------------------------------------------------------------------
# bad input: clear exceptions, never a crash


def test_backend_rejects_bad_tensors():
    x, qw, ws, n, b = make(2, 32, 6)
    fn = native_cpu.ternary_matmul
    with pytest.raises(ValueError, match="qweight"):
        fn(x, qw[:1], ws, n)
    with pytest.raises(ValueError, match="qweight"):
        fn(x[:, :16], qw, ws, n)
    with pytest.raises(TypeError, match="qweight"):
        fn(x, qw.to(torch.int8), ws, n)
    with pytest.raises(TypeError, match="x"):
        fn(x.double(), qw, ws, n)
    with pytest.raises(TypeError, match="weight_scale"):
        fn(x, qw, ws.half(), n)
    with pytest.raises(ValueError, match="weight_scale"):
        fn(x, qw, torch.ones(n + 1), n)
    with pytest.raises(ValueError, match="bias"):
        fn(x, qw, ws, n, torch.zeros(n + 1))
    with pytest.raises(ValueError, match="out_features"):
        fn(x, qw, ws, 0)
    with pytest.raises(TypeError, match="out_features"):
        fn(x, qw, ws, 6.0)
    with pytest.raises(ValueError, match="in_features"):
        fn(torch.zeros(1, 0), torch.zeros(2, 0, dtype=torch.uint8), ws, n)


def test_op_rejects_bad_sizes():
    x, qw, ws, n, b = make(2, 32, 6)
    with pytest.raises(ValueError, match="out_features"):
        lowbit.ops.ternary_matmul(x, qw, ws, 0)
    with pytest.raises(ValueError, match="in_features=0"):
        lowbit.ops.ternary_matmul(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.uint8), ws, n)


@pytest.fixture
def raw_kwargs():
    x, qw, ws, n, b = make(3, 40, 10, torch.float32, bias_dtype=torch.float32)
    call = prepare_ternary(x, qw, ws, n, b, "test")
    yield call, dict(call.kwargs(), num_threads=2)


def test_raw_call_works(raw_kwargs):
    call, kw = raw_kwargs
    C.ternary_matmul_cpu(**kw)
    x, b = call.x, call.bias
    ref = reference.ternary_matmul(x, call.qweight, call.weight_scale, 10, b)
    torch.testing.assert_close(call.out, ref, rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x_ptr=0), "x_ptr is a null pointer"),
        (dict(qweight_ptr=0), "qweight_ptr is a null pointer"),
        (dict(weight_scale_ptr=0), "weight_scale_ptr is a null pointer"),
        (dict(out_ptr=0), "out_ptr is a null pointer"),
        (dict(M=0), "M=0 must be positive"),
        (dict(N=-1), "N=-1 must be positive"),
        (dict(K=0), "K=0 must be positive"),
        (dict(K=TERNARY_MAX_K + 1, x_row_stride=TERNARY_MAX_K + 1), "K=.* exceeds"),
        (dict(x_row_stride=39), "x_row_stride=39 must be >= K=40"),
        (dict(weight_scale_numel=3), "weight_scale_numel=3 must be 1 or N=10"),
        (dict(x_dtype=3), "x_dtype=3 is not a dtype code"),
        (dict(bias_dtype=-1), "bias_dtype=-1 is not a dtype code"),
        (dict(out_dtype=7), "out_dtype=7 is not a dtype code"),
        (dict(num_threads=0), "num_threads=0"),
        (dict(M=2**62, N=2**62), "overflow"),
    ],
)
def test_raw_call_rejects_bad_arguments(raw_kwargs, change, match):
    _, kw = raw_kwargs
    with pytest.raises(ValueError, match=match):
        C.ternary_matmul_cpu(**dict(kw, **change))


@pytest.mark.parametrize("name", ["x_ptr", "weight_scale_ptr", "bias_ptr", "out_ptr"])
def test_raw_call_rejects_misaligned_pointers(raw_kwargs, name):
    _, kw = raw_kwargs
    with pytest.raises(ValueError, match=f"{name}=0x[0-9a-f]+ is not aligned"):
        C.ternary_matmul_cpu(**dict(kw, **{name: kw[name] + 1}))
    C.ternary_matmul_cpu(**dict(kw, qweight_ptr=kw["qweight_ptr"]))  # bytes: any address is aligned
