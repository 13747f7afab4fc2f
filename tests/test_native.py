"""The native module lowbit._C and its wrappers (lowbit._native, lowbit.backends.cpu/cuda).

The kernels are compared with a small pure-torch dequantize + float32 matmul written here,
so that this file tests the native layer alone. Bad arguments to the raw functions must
raise ValueError (never crash); CUDA tests run with `pytest -m cuda` on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

import lowbit

from lowbit import _native
from lowbit.backends import native_args

C = _native.C
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# Max |out - ref| allowed, relative to max |ref|, per output dtype (accumulation order and
# one rounding of the output are the only differences).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def test_native_module_loaded():
    assert _native.available(), _native.load_error()
    assert _native.load_error() is None
    assert _native.has("int4_matmul_cpu")


def test_missing_stand_in_names_the_import_error():
    stand_in = _native._Missing("ImportError: libfoo.so: cannot open shared object file")
    with pytest.raises(RuntimeError, match="libfoo.so"):
        stand_in.int4_matmul_cpu
    with pytest.raises(RuntimeError, match="build_info"):
        stand_in.build_info()


def test_build_info_keys():
    info = C.build_info()
    for key, kind in [
        ("version", str), ("compiler", str), ("cxx_flags", str), ("build_type", str), ("cuda", bool),
        ("cuda_archs", list), ("metal", bool), ("sanitizers", list), ("dtype_codes", dict),
    ]:
        assert isinstance(info[key], kind), (key, info[key])
    assert info["metal"] is False
    assert info["dtype_codes"] == {str(d).replace("torch.", ""): c for d, c in native_args.DTYPE_CODES.items()}
    if info["cuda"]:
        assert info["cuda_archs"] and isinstance(info["cuda_version"], str)
        assert _native.has("int4_matmul_cuda")
    else:
        assert info["cuda_archs"] == [] and info["cuda_version"] is None
        assert not _native.has("int4_matmul_cuda")


def test_cpu_features_keys():
    feats = C.cpu_features()
    expected = {"avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512vnni", "avx512bf16",
                "avx_vnni", "neon", "dotprod", "i8mm"}
    assert set(feats) == expected
    assert all(isinstance(v, bool) for v in feats.values())
    if feats["avx2"] or feats["fma"]:
        assert feats["avx"]
    if feats["avx512bw"] or feats["avx512vnni"] or feats["avx512bf16"]:
        assert feats["avx512f"]


# ---------------------------------------------------------------------------------------------
# helpers


def make_weight(n, k, g, scale_dtype=torch.float32, asym=True, seed=0):
    """Random int4 weight in the checkpoint layout: (qweight [N, K/2], q [N, K], scales, zeros)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    qweight = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scales = (torch.rand(n, k // g, generator=gen) * 0.1 + 0.01).to(scale_dtype)
    zeros = torch.randint(0, 16, (n, k // g), generator=gen).to(scale_dtype) if asym else None
    return qweight, q, scales, zeros


def reference(x, q, scales, zeros, g, bias):
    """float32 dequantize + matmul: w = scale * (q - zero)."""
    s = scales.float().repeat_interleave(g, dim=1)
    z = zeros.float().repeat_interleave(g, dim=1) if zeros is not None else torch.full_like(s, 8.0)
    w = s * (q.float() - z)
    y = x.reshape(-1, x.shape[-1]).float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y


def raw_call(x2, qweight, scales, zeros, bias, out, g, threads, row_stride=None):
    code = native_args.DTYPE_CODES
    C.int4_matmul_cpu(
        x_ptr=x2.data_ptr(), x_dtype=code[x2.dtype], x_row_stride=row_stride or x2.stride(0),
        qweight_ptr=qweight.data_ptr(), scales_ptr=scales.data_ptr(), scales_dtype=code[scales.dtype],
        zeros_ptr=0 if zeros is None else zeros.data_ptr(),
        zeros_dtype=0 if zeros is None else code[zeros.dtype],
        bias_ptr=0 if bias is None else bias.data_ptr(), bias_dtype=0 if bias is None else code[bias.dtype],
        out_ptr=out.data_ptr(), out_dtype=code[out.dtype],
        M=x2.shape[0], N=qweight.shape[0], K=x2.shape[1], group_size=g, num_threads=threads,
    )


def assert_matches(out, ref):
    scale = ref.abs().max().clamp_min(1e-6)
    err = (out.float() - ref.to(out.dtype).float()).abs().max() / scale
    assert err <= TOL[out.dtype], f"max error {err:.3g} relative to max |ref|, dtype {out.dtype}"


# ---------------------------------------------------------------------------------------------
# CPU kernel against the reference

SHAPES = [  # (M, N, K, G)
    (1, 1, 2, 2), (1, 8, 32, 32), (3, 7, 64, 32), (4, 16, 128, 128), (5, 33, 96, 96), (17, 100, 256, 64),
    (2, 9, 6, 2), (70, 12, 128, 32), (1, 300, 512, 128), (9, 257, 384, 128),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_cpu_kernel_matches_reference_all_float32(m, n, k, g, threads):
    qweight, q, scales, zeros = make_weight(n, k, g, seed=m * 1000 + n)
    x = torch.randn(m, k)
    bias = torch.randn(n)
    out = torch.empty(m, n)
    raw_call(x, qweight, scales, zeros, bias, out, g, threads)
    assert_matches(out, reference(x, q, scales, zeros, g, bias))


@pytest.mark.parametrize("x_dtype", FLOATS)
@pytest.mark.parametrize("out_dtype", FLOATS)
@pytest.mark.parametrize("scale_dtype", FLOATS)
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("bias_dtype", [None, torch.float16, torch.bfloat16, torch.float32])
def test_cpu_kernel_dtype_combinations(x_dtype, out_dtype, scale_dtype, asym, bias_dtype):
    m, n, k, g = 5, 19, 128, 32
    qweight, q, scales, zeros = make_weight(n, k, g, scale_dtype, asym)
    x = torch.randn(m, k).to(x_dtype)
    bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
    out = torch.empty(m, n, dtype=out_dtype)
    raw_call(x, qweight, scales, zeros, bias, out, g, 2)
    assert_matches(out, reference(x, q, scales, zeros, g, bias))


def test_cpu_kernel_row_stride_and_threads_are_bitwise_stable():
    m, n, k, g = 13, 260, 512, 128
    qweight, q, scales, zeros = make_weight(n, k, g, torch.bfloat16)
    base = torch.randn(m, k + 40, dtype=torch.bfloat16)
    x = base[:, 16 : 16 + k]  # row stride k + 40, unit inner stride
    outs = []
    for threads in (1, 2, 3):
        out = torch.empty(m, n, dtype=torch.bfloat16)
        raw_call(x, qweight, scales, zeros, None, out, g, threads, row_stride=base.stride(0))
        outs.append(out)
    assert_matches(outs[0], reference(x, q, scales, zeros, g, None))
    # Each output is summed in the same order whatever the thread count.
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_cpu_kernel_large_problem_uses_threads_correctly():
    m, n, k, g = 33, 1000, 1024, 128
    qweight, q, scales, zeros = make_weight(n, k, g)
    x = torch.randn(m, k, dtype=torch.float16)
    out1 = torch.empty(m, n, dtype=torch.float16)
    out2 = torch.empty_like(out1)
    raw_call(x, qweight, scales, zeros, None, out1, g, 1)
    raw_call(x, qweight, scales, zeros, None, out2, g, 2)
    assert torch.equal(out1, out2)
    assert_matches(out1, reference(x, q, scales, zeros, g, None))


# ---------------------------------------------------------------------------------------------
# exact dtype conversions (dtype.h), through the kernel: K = 2, w = [1, 0], so y = x[:, 0]


def identity_call(x0: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    x = torch.stack([x0, torch.zeros_like(x0)], dim=1).contiguous()
    qweight = torch.tensor([[9 | (8 << 4)]], dtype=torch.uint8)  # q = [9, 8], zero 8 -> w = [1, 0]
    scales = torch.ones(1, 1)
    out = torch.empty(x.shape[0], 1, dtype=out_dtype)
    raw_call(x, qweight, scales, None, None, out, 2, 1)
    return out[:, 0]


@pytest.mark.parametrize("src", [torch.float16, torch.bfloat16])
def test_widening_is_exact_for_every_bit_pattern(src):
    x0 = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(src)
    y = identity_call(x0, torch.float32)
    torch.testing.assert_close(y, x0.float(), rtol=0, atol=0, equal_nan=True)


def _adjacent_midpoints(dtype: torch.dtype, last_finite: int) -> torch.Tensor:
    """Exact midpoints between consecutive non-negative finite values of a 16-bit float dtype."""
    v = torch.arange(0, last_finite + 1, dtype=torch.int32).to(torch.int16).view(dtype).double()
    return ((v[:-1] + v[1:]) / 2).float()  # 12 (fp16) or 9 (bf16) significant bits: exact in fp32


def narrowing_inputs() -> torch.Tensor:
    """fp32 values that exercise every rounding case: random bit patterns (NaN payloads, fp32
    subnormals, huge values), every fp16 value, midpoints between neighbours (ties) and the
    floats just around them, the overflow and underflow thresholds."""
    gen = torch.Generator().manual_seed(1)
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    halves = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    ties = torch.cat([_adjacent_midpoints(torch.float16, 0x7BFF), _adjacent_midpoints(torch.bfloat16, 0x7F7F)])
    up, down = torch.tensor(float("inf")), torch.tensor(0.0)
    specials = torch.tensor([
        65504.0, 65519.0, 65519.996, 65520.0, 65536.0, 3.0e38, 3.4028235e38, 2.0**-24, 2.0**-25,
        2.0**-25 * 1.0000001, 2.0**-26, 1e-45, 2.0**-14, 2.0**-14 * (1 - 2.0**-11), float("inf"),
        float("nan"), 0.0,
    ])
    pos = torch.cat([
        random_bits.to(torch.int32).view(torch.float32).abs(), halves, torch.nextafter(halves, up),
        torch.nextafter(halves, down), ties, torch.nextafter(ties, up), torch.nextafter(ties, down), specials,
    ])
    return torch.cat([pos, -pos])


@pytest.mark.parametrize("dst", [torch.float16, torch.bfloat16])
def test_narrowing_rounds_to_nearest_even(dst):
    x0 = narrowing_inputs()
    y = identity_call(x0, dst)
    want = x0.to(dst)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(y), nan)
    # Bitwise equal, except that a -0.0 input comes out +0.0 (0 + -0 = +0 in the accumulator).
    same = y.view(torch.int16) == want.view(torch.int16)
    assert bool((same | nan | (want == 0)).all()), x0[~(same | nan | (want == 0))][:10]
    assert bool((y[want == 0] == 0).all())


# ---------------------------------------------------------------------------------------------
# bad arguments to the raw function: ValueError naming the argument, never a crash


@pytest.fixture
def valid_kwargs():
    m, n, k, g = 2, 3, 8, 4
    qweight, _, scales, zeros = make_weight(n, k, g)
    x = torch.randn(m, k)
    out = torch.empty(m, n)
    keep = (x, qweight, scales, zeros, out)  # keep the buffers alive for the test's duration
    kwargs = dict(
        x_ptr=x.data_ptr(), x_dtype=0, x_row_stride=k, qweight_ptr=qweight.data_ptr(),
        scales_ptr=scales.data_ptr(), scales_dtype=0, zeros_ptr=zeros.data_ptr(), zeros_dtype=0,
        bias_ptr=0, bias_dtype=0, out_ptr=out.data_ptr(), out_dtype=0, M=m, N=n, K=k, group_size=g,
        num_threads=1,
    )
    C.int4_matmul_cpu(**kwargs)  # the unmodified call works
    return kwargs, keep


BAD = [
    ("x_ptr", 0, "x_ptr is a null pointer"),
    ("qweight_ptr", 0, "qweight_ptr is a null pointer"),
    ("scales_ptr", 0, "scales_ptr is a null pointer"),
    ("out_ptr", 0, "out_ptr is a null pointer"),
    ("M", 0, "M=0 must be positive"),
    ("M", -1, "M=-1 must be positive"),
    ("N", -3, "N=-3 must be positive"),
    ("K", -8, "K=-8 must be positive"),
    ("K", 6, "does not divide K=6"),
    ("group_size", 3, "group_size=3 must be even"),
    ("group_size", 0, "group_size=0 must be positive"),
    ("group_size", 16, "does not divide K=8"),
    ("x_row_stride", 7, "x_row_stride=7 must be >= K=8"),
    ("x_row_stride", -1, "x_row_stride=-1"),
    ("x_dtype", 3, "x_dtype=3 is not a dtype code"),
    ("scales_dtype", -1, "scales_dtype=-1 is not a dtype code"),
    ("zeros_dtype", 7, "zeros_dtype=7"),
    ("bias_dtype", 3, "bias_dtype=3"),
    ("out_dtype", 99, "out_dtype=99"),
    ("num_threads", 0, "num_threads=0"),
    ("num_threads", -2, "num_threads=-2"),
    ("M", 2**62, "overflow"),
]


@pytest.mark.parametrize("name,value,message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_argument_raises_value_error(valid_kwargs, name, value, message):
    kwargs, _keep = valid_kwargs
    kwargs[name] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        C.int4_matmul_cpu(**kwargs)


@pytest.mark.parametrize("name", ["x_ptr", "scales_ptr", "out_ptr"])
def test_misaligned_pointer_raises_value_error(valid_kwargs, name):
    kwargs, _keep = valid_kwargs
    kwargs[name] += 1  # float32 buffers need 4-byte alignment
    with pytest.raises(ValueError, match=f"{name}=0x[0-9a-f]+ is not aligned"):
        C.int4_matmul_cpu(**kwargs)


def test_negative_pointer_is_rejected(valid_kwargs):
    kwargs, _keep = valid_kwargs
    kwargs["x_ptr"] = -16  # not an address at all: pybind11 refuses the conversion
    with pytest.raises(TypeError):
        C.int4_matmul_cpu(**kwargs)


# ---------------------------------------------------------------------------------------------
# the Python wrappers (lowbit.backends.cpu / cuda)


def layouts(m: int, k: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The same kind of activations in different memory layouts."""
    return {
        "contiguous": torch.randn(m, k, dtype=dtype, device=device),
        "batched_3d": torch.randn(2, m, k, dtype=dtype, device=device),
        "row_slice": torch.randn(m, k + 24, dtype=dtype, device=device)[:, 8 : 8 + k],
        "inner_stride_2": torch.randn(m, 2 * k, dtype=dtype, device=device)[:, ::2],
        "transposed": torch.randn(k, m, dtype=dtype, device=device).t(),
        "expanded": torch.randn(1, k, dtype=dtype, device=device).expand(m, k),
        "batch_transposed": torch.randn(m, 3, k, dtype=dtype, device=device).transpose(0, 1),
    }


def backend(device: str):
    if device == "cpu":
        from lowbit.backends import cpu as mod
    else:
        from lowbit.backends import cuda as mod
    return mod


def check_wrapper(device: str, dtype: torch.dtype, asym: bool, with_bias: bool):
    mod = backend(device)
    m, n, k, g = 5, 24, 128, 32
    qweight, q, scales, zeros = make_weight(n, k, g, dtype, asym)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    for name, x in layouts(m, k, dtype, device).items():
        args = (x, to(qweight), to(scales), to(zeros), g, to(bias))
        assert mod.supports_int4_matmul(*args)
        y = mod.int4_matmul(*args)
        assert y.shape == (*x.shape[:-1], n) and y.dtype == dtype and y.device == x.device, name
        ref = reference(x.cpu(), q, scales, zeros, g, bias).reshape(*x.shape[:-1], n)
        assert_matches(y.cpu(), ref)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cpu_wrapper_layouts(dtype, asym, with_bias):
    check_wrapper("cpu", dtype, asym, with_bias)


def test_cpu_wrapper_uses_torch_threads_and_empty_inputs():
    from lowbit.backends import cpu

    n, k, g = 300, 256, 64
    qweight, _, scales, zeros = make_weight(n, k, g, torch.bfloat16)
    x = torch.randn(7, k, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(cpu.int4_matmul(x, qweight, scales, zeros, g, None))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])
    for shape in [(0, k), (3, 0, k)]:
        y = cpu.int4_matmul(torch.randn(shape, dtype=torch.bfloat16), qweight, scales, zeros, g, None)
        assert y.shape == (*shape[:-1], n)


def test_cpu_wrapper_supports_and_rejects():
    from lowbit.backends import cpu

    n, k, g = 4, 64, 32
    qweight, _, scales, zeros = make_weight(n, k, g)
    x = torch.randn(2, k)
    assert cpu.supports_int4_matmul(x, qweight, scales, zeros, g, None)
    assert not cpu.supports_int4_matmul(x.double(), qweight, scales, zeros, g, None)
    assert not cpu.supports_int4_matmul(x, qweight.to(torch.int32), scales, zeros, g, None)
    assert not cpu.supports_int4_matmul(x.to("meta"), qweight, scales, zeros, g, None)
    # The wrapper never hands the C++ side a buffer of the wrong size.
    with pytest.raises(ValueError, match="scales"):
        cpu.int4_matmul(x, qweight, scales[:, :1], zeros, g, None)
    with pytest.raises(ValueError, match="zeros"):
        cpu.int4_matmul(x, qweight, scales, zeros[:2], g, None)
    with pytest.raises(ValueError, match="bias"):
        cpu.int4_matmul(x, qweight, scales, zeros, g, torch.randn(n + 1))
    with pytest.raises(ValueError, match="in_features=62"):
        cpu.int4_matmul(x[:, :62], qweight, scales, zeros, g, None)
    with pytest.raises(ValueError, match="group_size=24"):
        cpu.int4_matmul(x, qweight, scales, zeros, 24, None)
    with pytest.raises(TypeError, match="float64"):
        cpu.int4_matmul(x.double(), qweight, scales, zeros, g, None)
    with pytest.raises(ValueError, match="meta"):
        cpu.int4_matmul(x, qweight, scales.to("meta"), zeros, g, None)


# ---------------------------------------------------------------------------------------------
# CUDA (pytest -m cuda on a GPU machine)


def test_cuda_kernel_is_built_where_the_build_says():
    info = C.build_info()
    assert info["cuda"] == _native.has("int4_matmul_cuda")
    if info["cuda"]:
        from lowbit.backends import cuda  # noqa: F401  (imports where the kernels were built)
    else:
        with pytest.raises(ImportError, match="no CUDA kernels"):
            from lowbit.backends import cuda  # noqa: F401


def cuda_raw_kwargs(x, qweight, scales, zeros, out, g, stream=0):
    return dict(
        x_ptr=x.data_ptr(), x_dtype=native_args.DTYPE_CODES[x.dtype], x_row_stride=x.shape[1],
        qweight_ptr=qweight.data_ptr(), scales_ptr=scales.data_ptr(), scales_dtype=0,
        zeros_ptr=0 if zeros is None else zeros.data_ptr(), zeros_dtype=0, bias_ptr=0, bias_dtype=0,
        out_ptr=out.data_ptr(), out_dtype=native_args.DTYPE_CODES[out.dtype], M=x.shape[0],
        N=qweight.shape[0], K=x.shape[1], group_size=g, stream=stream,
    )


def test_cuda_function_rejects_bad_arguments_before_touching_the_gpu():
    if not _native.has("int4_matmul_cuda"):
        assert not C.build_info()["cuda"]
        return
    qweight, _, scales, zeros = make_weight(3, 8, 4)
    x, out = torch.randn(2, 8), torch.empty(2, 3)
    kwargs = cuda_raw_kwargs(x, qweight, scales, zeros, out, 4)
    for name, value, message in [("group_size", 3, "group_size=3 must be even"), ("x_ptr", 0, "null"),
                                 ("out_dtype", 5, "out_dtype=5")]:
        with pytest.raises(ValueError, match=message):
            C.int4_matmul_cuda(**{**kwargs, name: value})


@pytest.mark.cuda
def test_cuda_raw_function_rejects_host_memory():
    qweight, _, scales, zeros = make_weight(3, 8, 4)
    x, out = torch.randn(2, 8), torch.empty(2, 3, device="cuda")
    args = [t.cuda() for t in (qweight, scales, zeros)]
    with pytest.raises(ValueError, match="x_ptr is not CUDA device memory"):
        C.int4_matmul_cuda(**cuda_raw_kwargs(x, *args, out, 4))
    with pytest.raises(ValueError, match="out_ptr is not CUDA device memory"):
        C.int4_matmul_cuda(**cuda_raw_kwargs(x.cuda(), *args, out.cpu(), 4))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_wrapper_layouts(dtype, asym, with_bias):
    check_wrapper("cuda", dtype, asym, with_bias)


@pytest.mark.cuda
@pytest.mark.parametrize("m,n,k,g", SHAPES)
def test_cuda_kernel_matches_cpu_kernel(m, n, k, g):
    from lowbit.backends import cpu, cuda

    qweight, q, scales, zeros = make_weight(n, k, g, torch.float16)
    x = torch.randn(m, k, dtype=torch.float16)
    bias = torch.randn(n, dtype=torch.float16)
    y = cuda.int4_matmul(x.cuda(), qweight.cuda(), scales.cuda(), zeros.cuda(), g, bias.cuda())
    assert_matches(y.cpu(), reference(x, q, scales, zeros, g, bias))
    assert_matches(cpu.int4_matmul(x, qweight, scales, zeros, g, bias), reference(x, q, scales, zeros, g, bias))


@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream_without_host_sync():
    from lowbit.backends import cuda

    n, k, g = 64, 256, 128
    qweight, q, scales, zeros = make_weight(n, k, g, torch.bfloat16)
    w = [t.cuda() for t in (qweight, scales, zeros)]
    x = torch.randn(4, k, dtype=torch.bfloat16, device="cuda")
    ref = reference(x.cpu(), q, scales, zeros, g, None)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = cuda.int4_matmul(x, *w, g, None)
    torch.cuda.current_stream().wait_stream(side)
    assert_matches(y.cpu(), ref)
    # A CUDA graph capture fails on any synchronizing call; replaying it recomputes y.
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = cuda.int4_matmul(x, *w, g, None)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches(y_graph.cpu(), reference(x.cpu(), q, scales, zeros, g, None))


# ---------------------------------------------------------------------------------------------
# instruction-set selection (LOWBIT_CPU_ISA)


def test_cpu_isa_lists():
    isa = C.cpu_isa()
    assert isa["compiled"][0] == "scalar" and "scalar" in isa["supported"]
    assert set(isa["supported"]) <= set(isa["compiled"])
    assert isa["best"] == isa["supported"][-1]
    assert "selected" in lowbit.info()["native"]["cpu_isa"]


def test_forcing_an_unknown_or_unsupported_isa_raises(monkeypatch):
    monkeypatch.setenv("LOWBIT_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="LOWBIT_CPU_ISA=sse9 is not an instruction set name"):
        C.selected_cpu_isa()
    assert "invalid" in lowbit.info()["native"]["cpu_isa"]["selected"]
    missing = [i for i in ("avx2", "avx512", "avx512bf16", "neon", "neon_dot") if i not in C.cpu_isa()["supported"]]
    for name in missing:
        monkeypatch.setenv("LOWBIT_CPU_ISA", name)
        with pytest.raises(ValueError, match=f"LOWBIT_CPU_ISA={name}"):
            C.selected_cpu_isa()


@pytest.mark.parametrize("isa", C.cpu_isa()["supported"] if _native.available() else [])
def test_forcing_each_supported_isa(monkeypatch, isa):
    monkeypatch.setenv("LOWBIT_CPU_ISA", isa)
    assert C.selected_cpu_isa() == isa
