"""The native CPU kv_attention kernel (int8 and 4-bit KV caches) against the reference.

Every instruction-set path this machine supports is run (LOWBIT_CPU_ISA), with 1 and 2
threads: decode and prefill, causal or not, GQA ratios 1/2/4, odd sizes, strided prefix views
of lowbit.QuantizedKVCache, fp32/fp16/bf16 queries and scales. Bad arguments to the raw
function raise ValueError, never crash.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from conftest import RTOL, rel_err
from lowbit import _native
from lowbit.backends import native_args, reference
from lowbit.formats import kv

pytestmark = pytest.mark.skipif(not _native.has("kv_attention_cpu"), reason="native module without kv_attention_cpu")
cpu_backend = pytest.importorskip("lowbit.backends.cpu")

C = _native.C
ISAS = C.cpu_isa()["supported"] if _native.available() else ["scalar"]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch) -> str:
    monkeypatch.setenv("LOWBIT_CPU_ISA", request.param)
    return request.param


@pytest.fixture(params=[1, 2])
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def make_args(b, h_q, h_kv, s_q, s_kv, d, dtype=torch.float32, *, bits=8, causal=False, scale=None, seed=0,
              scale_dtype=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, s_q, d, generator=g).to(dtype)
    k = torch.randn(b, h_kv, s_kv, d, generator=g)
    v = torch.randn(b, h_kv, s_kv, d, generator=g)
    kq, ks, kz = kv.quantize_kv(k, bits)
    vq, vs, vz = kv.quantize_kv(v, bits)
    if scale_dtype is not None:
        ks, vs = ks.to(scale_dtype), vs.to(scale_dtype)
        kz = None if kz is None else kz.to(scale_dtype)
        vz = None if vz is None else vz.to(scale_dtype)
    return (q, kq, ks, kz, vq, vs, vz, causal, scale)


def native(*args):
    return cpu_backend.kv_attention(*args)


def check(args, tol=None):
    out = native(*args)
    ref = reference.kv_attention(*args)
    q = args[0]
    assert out.shape == ref.shape and out.dtype == q.dtype
    err = rel_err(out, ref)
    assert err < (tol or RTOL[q.dtype]), err
    return out


# ---------------------------------------------------------------------------------------------
# shapes


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_decode(isa, threads, bits, d, ratio):
    check(make_args(1, 2 * ratio, 2, 1, 333, d, bits=bits))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_prefill(isa, threads, bits, causal, ratio):
    check(make_args(2, 2 * ratio, 2, 13, 77, 64, bits=bits, causal=causal))


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_many_row_tiles(isa, bits):
    """More query rows than one tile (32), S_q == S_kv (square causal), odd sizes."""
    check(make_args(1, 8, 2, 37, 37, 32, bits=bits, causal=True))
    check(make_args(1, 8, 2, 37, 90, 32, bits=bits, causal=True))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("h_kv", [1, 3])
def test_split_context(isa, bits, h_kv, monkeypatch):
    """B * H_kv smaller than (or not a multiple of) the threads: the context is split over
    tasks and merged; causal slices that see no token of a row included."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(make_args(1, 4 * h_kv, h_kv, 1, 1500, 64, bits=bits))
        check(make_args(1, 2 * h_kv, h_kv, 5, 1100, 32, bits=bits, causal=True))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("d", [1, 3, 8, 24, 40, 72, 200])
def test_int8_head_dims_not_a_multiple_of_the_vector(isa, d):
    check(make_args(2, 4, 2, 3, 45, d, causal=True))
    check(make_args(1, 2, 1, 1, 70, d))


@pytest.mark.parametrize("d", [256, 512])
def test_large_head_dims(isa, d):
    check(make_args(1, 4, 2, 2, 40, d, bits=4, causal=True))
    check(make_args(1, 4, 2, 2, 40, d + 8, bits=8, causal=True))


@pytest.mark.parametrize("bits", [8, 4])
def test_more_queries_than_keys_without_causal_mask(isa, bits):
    check(make_args(1, 4, 2, 9, 4, 32, bits=bits, causal=False))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale_dtype", FLOATS)
def test_query_and_scale_dtypes(isa, bits, dtype, scale_dtype):
    check(make_args(1, 4, 2, 2, 50, 64, dtype, bits=bits, causal=True, scale_dtype=scale_dtype))


@pytest.mark.parametrize("bits", [8, 4])
def test_explicit_softmax_scale(isa, bits):
    check(make_args(1, 4, 2, 3, 40, 32, bits=bits, causal=True, scale=0.3))
    check(make_args(1, 4, 2, 3, 40, 32, bits=bits, scale=-1.5))
    check(make_args(1, 4, 2, 3, 40, 32, bits=bits, scale=0.0))


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 2),
    h_kv=st.integers(1, 3),
    ratio=st.sampled_from([1, 2, 4]),
    s_q=st.integers(1, 9),
    s_kv=st.integers(1, 300),
    d=st.sampled_from([32, 64, 96, 128]),
    bits=st.sampled_from([8, 4]),
    causal=st.booleans(),
    dtype=st.sampled_from(FLOATS),
    isa_name=st.sampled_from(ISAS),
    nthreads=st.sampled_from([1, 2]),
)
def test_random_shapes(b, h_kv, ratio, s_q, s_kv, d, bits, causal, dtype, isa_name, nthreads):
    if causal and s_q > s_kv:
        s_q = s_kv
    args = make_args(b, h_kv * ratio, h_kv, s_q, s_kv, d, dtype, bits=bits, causal=causal, seed=s_kv)
    old = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CPU_ISA", isa_name)
        torch.set_num_threads(nthreads)
        try:
            check(args)
        finally:
            torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------
# layouts: strided views, non-contiguous queries


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_kv_cache_prefix_views_are_not_copied(isa, bits, monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "native")
    g = torch.Generator().manual_seed(3)
    cache = lowbit.QuantizedKVCache(bits=bits)
    for s_new in (5, 17, 1, 30):  # grows past the first capacity
        cache.append(torch.randn(2, 2, s_new, 64, generator=g), torch.randn(2, 2, s_new, 64, generator=g))
    assert cache.capacity > cache.seq_len
    p = cache.quantized()
    assert not p["k_data"].is_contiguous() and p["k_data"].stride(2) == p["k_data"].shape[-1]
    q = torch.randn(2, 8, 3, 64, generator=g)
    args = (q, p["k_data"], p["k_scale"], p["k_zero"], p["v_data"], p["v_scale"], p["v_zero"], True, None)
    call = native_args.prepare_kv_attention(*args, fn="test")
    for name in ("k", "k_scale", "k_zero", "v", "v_scale", "v_zero"):
        src = {"k": "k_data", "v": "v_data"}.get(name, name)
        if p[src] is not None:
            assert call.cache[name].data_ptr() == p[src].data_ptr()  # the view itself, no copy
    out = cache.attend(q)
    ref = reference.kv_attention(*args)
    assert rel_err(out, ref) < RTOL[torch.float32]
    decode = cache.attend(q[:, :, -1:])
    assert rel_err(decode, reference.kv_attention(q[:, :, -1:], *args[1:])) < RTOL[torch.float32]


def test_static_cache_with_max_seq_len(isa, monkeypatch):
    monkeypatch.setenv("LOWBIT_BACKEND", "native")
    g = torch.Generator().manual_seed(4)
    cache = lowbit.QuantizedKVCache(bits=4, max_seq_len=512)
    cache.append(torch.randn(1, 2, 100, 32, generator=g), torch.randn(1, 2, 100, 32, generator=g))
    q = torch.randn(1, 4, 1, 32, generator=g, dtype=torch.float32).to(torch.bfloat16)
    p = cache.quantized()
    ref = reference.kv_attention(q, p["k_data"], p["k_scale"], p["k_zero"], p["v_data"], p["v_scale"], p["v_zero"],
                                 True, None)
    assert rel_err(cache.attend(q), ref) < RTOL[torch.bfloat16]


@pytest.mark.parametrize("bits", [8, 4])
def test_noncontiguous_query_and_cache(isa, bits):
    q, kq, ks, kz, vq, vs, vz, causal, scale = make_args(2, 4, 2, 5, 60, 32, bits=bits, causal=True)
    q_bshd = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, S, D] view of a [B, S, H, D] tensor
    assert not q_bshd.is_contiguous()
    kq_t = kq.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride smaller than the head stride
    ks_t = ks.transpose(0, 1).contiguous().transpose(0, 1)
    check((q_bshd, kq_t, ks_t, kz, vq, vs, vz, causal, scale))
    # an inner stride that is not 1 (copied by the wrapper)
    q_odd = torch.randn(2, 4, 5, 64)[..., ::2]
    check((q_odd, kq, ks, kz, vq, vs, vz, causal, scale))


def test_broadcast_cache_batch_stride_zero(isa):
    q, kq, ks, kz, vq, vs, vz, causal, scale = make_args(1, 4, 2, 1, 50, 32)
    q3 = torch.randn(3, 4, 1, 32)
    expand = [t.expand(3, *t.shape[1:]) for t in (kq, ks, vq, vs)]
    assert expand[0].stride(0) == 0
    check((q3, expand[0], expand[1], None, expand[2], expand[3], None, False, None))


# ---------------------------------------------------------------------------------------------
# dispatch, special values, threads


def test_op_dispatches_to_native_on_cpu():
    args = make_args(1, 4, 2, 1, 20, 32)
    backend, fn = lowbit.backends.select("kv_attention", "cpu", args)
    assert backend == "native" and fn is cpu_backend.kv_attention
    assert not cpu_backend.supports_kv_attention(*args[:-1], float("inf"))
    assert not cpu_backend.supports_kv_attention(*args[:-1], float("nan"))
    assert not cpu_backend.supports_kv_attention(args[0].double(), *args[1:])


def test_empty_batch_returns_empty():
    q, *rest = make_args(1, 4, 2, 1, 20, 32)
    assert lowbit.ops.kv_attention(q[:0], *[t[:0] if isinstance(t, torch.Tensor) else t for t in rest]).shape == (
        0, 4, 1, 32)
    assert native(q[:, :, :0], *rest).shape == (1, 4, 0, 32)


@pytest.mark.parametrize("bits", [8, 4])
def test_nan_in_the_cache_gives_nan_not_a_wrong_number(isa, bits):
    q, kq, ks, kz, vq, vs, vz, causal, scale = make_args(1, 4, 2, 1, 64, 32, bits=bits)
    ks = ks.clone()
    ks[0, 1, 10] = float("nan")  # one token of kv head 1
    out = native(q, kq, ks, kz, vq, vs, vz, causal, scale)
    assert torch.isnan(out[0, 2:]).all()  # the query heads of kv head 1
    assert torch.isfinite(out[0, :2]).all()


def test_thread_counts_agree():
    args = make_args(2, 8, 2, 3, 700, 64, bits=4, causal=True)
    outs = []
    for n in (1, 2, 3):
        old = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            outs.append(native(*args))
        finally:
            torch.set_num_threads(old)
    ref = reference.kv_attention(*args)
    for o in outs:
        assert rel_err(o, ref) < RTOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# the raw function: bad arguments raise ValueError


def raw_kwargs(bits=8):
    args = make_args(1, 4, 2, 2, 10, 32, bits=bits, causal=True)
    call = native_args.prepare_kv_attention(*args, fn="test")
    return call, call.kwargs()


def test_raw_call_matches_wrapper():
    call, kw = raw_kwargs()
    C.kv_attention_cpu(**kw, num_threads=1)
    args = make_args(1, 4, 2, 2, 10, 32, causal=True)
    assert rel_err(call.out, reference.kv_attention(*args)) < RTOL[torch.float32]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(bits=5), "bits=5 must be 8 or 4"),
        (dict(H_q=3), "H_q=3 must be a multiple of H_kv=2"),
        (dict(S_q=0), "S_q=0 must be positive"),
        (dict(S_kv=0), "S_kv=0 must be positive"),
        (dict(D=0), "D=0 must be positive"),
        (dict(B=-1), "B=-1 must be positive"),
        (dict(S_q=11), "causal attention needs S_q <= S_kv"),
        (dict(scale=float("inf")), "must be finite"),
        (dict(scale=float("nan")), "must be finite"),
        (dict(q_dtype=7), "q_dtype=7 is not a dtype code"),
        (dict(out_dtype=-1), "out_dtype=-1 is not a dtype code"),
        (dict(k_scale_dtype=3), "k_scale_dtype=3 is not a dtype code"),
        (dict(q_ptr=0), "q_ptr is a null pointer"),
        (dict(k_ptr=0), "k_ptr is a null pointer"),
        (dict(v_scale_ptr=0), "v_scale_ptr is a null pointer"),
        (dict(out_ptr=0), "out_ptr is a null pointer"),
        (dict(k_zero_ptr=64), "k_zero_ptr must be 0 for an 8-bit cache"),
        (dict(k_strides=(-1, 0, 32)), r"k_strides=\(-1, 0, 32\) must be >= 0"),
        (dict(v_strides=(0, 2**62, 2**62)), "overflow 64-bit indexing"),
        (dict(num_threads=0), "num_threads=0 must be in"),
    ],
)
def test_raw_bad_arguments_raise_value_error(change, message):
    _, kw = raw_kwargs()
    kw.update(change)
    with pytest.raises(ValueError, match=message):
        C.kv_attention_cpu(**{"num_threads": 1, **kw})


def test_raw_4bit_needs_zeros_and_d_multiple_of_32():
    _, kw = raw_kwargs(bits=4)
    with pytest.raises(ValueError, match="k_zero_ptr is a null pointer"):
        C.kv_attention_cpu(**{**kw, "k_zero_ptr": 0}, num_threads=1)
    with pytest.raises(ValueError, match="D=48 must be divisible by 32"):
        C.kv_attention_cpu(**{**kw, "D": 48}, num_threads=1)


@pytest.mark.parametrize("name", ["q_ptr", "out_ptr", "k_scale_ptr", "v_scale_ptr"])
def test_raw_misaligned_pointer_raises_value_error(name):
    _, kw = raw_kwargs()
    kw[name] += 1
    with pytest.raises(ValueError, match=f"{name}=0x[0-9a-f]+ is not aligned"):
        C.kv_attention_cpu(**kw, num_threads=1)


def test_raw_bytes_may_be_unaligned():
    """int8 / uint8 cache data has no alignment requirement: an odd address works."""
    q, kq, ks, kz, vq, vs, vz, causal, scale = make_args(1, 4, 2, 1, 10, 32)
    buf = torch.empty(kq.numel() + 1, dtype=torch.int8)
    k_odd = buf[1:].view(kq.shape)
    k_odd.copy_(kq)
    assert k_odd.data_ptr() % 2 == 1
    check((q, k_odd, ks, kz, vq, vs, vz, causal, scale))


def test_wrapper_rejects_bad_tensors():
    q, kq, ks, kz, vq, vs, vz, causal, scale = make_args(1, 4, 2, 1, 10, 32)
    with pytest.raises(TypeError, match="q must have dtype"):
        native(q.double(), kq, ks, kz, vq, vs, vz, causal, scale)
    with pytest.raises(TypeError, match="k_scale must have dtype"):
        native(q, kq, ks.double(), kz, vq, vs, vz, causal, scale)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        native(q[:, :3], kq, ks, kz, vq, vs, vz, causal, scale)
    with pytest.raises(ValueError, match="k_scale"):
        native(q, kq, ks[..., :-1], kz, vq, vs, vz, causal, scale)
    with pytest.raises(ValueError, match="scale must be finite"):
        native(q, kq, ks, kz, vq, vs, vz, causal, math.inf)
