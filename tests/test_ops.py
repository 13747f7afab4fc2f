"""The op layer: schemas, fake kernels, autograd, torch.compile, dispatch, op-level errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from _cases import SMALL, int4_args, kv_args, to_device
from conftest import rel_err

import lowbit
from lowbit import backends
from lowbit.backends import reference

OPS = list(SMALL)


def _op(name):
    return getattr(torch.ops.lowbit, name).default


@pytest.mark.parametrize("name", OPS)
def test_opcheck(name, device):
    args = to_device(SMALL[name](), device)
    torch.library.opcheck(_op(name), args)
    grad_args = (args[0].clone().requires_grad_(),) + args[1:]
    torch.library.opcheck(_op(name), grad_args)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_matches_reference(name, dtype, device):
    args = to_device(SMALL[name](dtype), device)
    out = _op(name)(*args)
    ref = reference.KERNELS[name](*args)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


@pytest.mark.parametrize("name", [n for n in OPS if n != "kv_attention"])
def test_matmul_backward_matches_dense(name):
    """d/dx of a quantized matmul equals d/dx of x @ W_dense.T (straight-through for ternary)."""
    args = SMALL[name]()
    x = args[0].clone().requires_grad_()
    bias = args[-1].clone().requires_grad_()
    y = _op(name)(x, *args[1:-1], bias)
    g = torch.randn_like(y)
    y.backward(g)
    k = x.shape[-1]
    w = lowbit.ops._DENSE_WEIGHT[name](args, k, torch.float32)
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, g.sum(0), rtol=1e-5, atol=1e-5)


def test_attention_backward_matches_autograd_of_reference():
    args = kv_args(1, 4, 2, 3, 9, 32, causal=True)
    q = args[0].clone().requires_grad_()
    out = lowbit.ops.kv_attention(q, *args[1:])
    g = torch.randn_like(out)
    out.backward(g)
    q2 = args[0].clone().requires_grad_()
    reference.kv_attention(q2, *args[1:]).backward(g)
    torch.testing.assert_close(q.grad, q2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", OPS)
def test_compile_fullgraph(name):
    args = SMALL[name]()
    fn = torch.compile(lambda *a: _op(name)(*a) * 2, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(fn(*args), _op(name)(*args) * 2)


def test_empty_batch_returns_empty():
    x, *rest = int4_args(3, 64, 16)
    out = lowbit.ops.int4_matmul(x[:0], *rest)
    assert out.shape == (0, 16)


def test_batched_and_noncontiguous_activations():
    x, *rest = int4_args(6, 64, 16)
    x3 = torch.randn(2, 64, 3).transpose(1, 2)  # [2, 3, 64], inner stride 3
    out = lowbit.ops.int4_matmul(x3, *rest)
    torch.testing.assert_close(out, reference.int4_matmul(x3.contiguous(), *rest), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: (a[0].to(torch.int32),) + a[1:], TypeError, "x must have dtype"),
        (lambda a: (a[0][:, :32],) + a[1:], ValueError, "in_features=32"),
        (lambda a: a[:1] + (a[1].to(torch.int8),) + a[2:], TypeError, "qweight"),
        (lambda a: a[:2] + (a[2][:, :1],) + a[3:], ValueError, "scales"),
        (lambda a: a[:4] + (48,) + a[5:], ValueError, "group_size=48"),
        (lambda a: a[:5] + (torch.zeros(3),), ValueError, "bias"),
        (lambda a: (a[0].to("meta"),) + a[1:], ValueError, "one device"),
        (lambda a: (torch.zeros(3, 0),) + a[1:], ValueError, "in_features=0"),
    ],
)
def test_int4_bad_inputs(mutate, exc, match):
    with pytest.raises(exc, match=match):
        lowbit.ops.int4_matmul(*mutate(int4_args(3, 64, 16)))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: (a[0][:, :3],) + a[1:], "multiple of kv heads"),
        (lambda a: a[:1] + (a[1][:, :, :0], a[2][:, :, :0]) + a[3:4] + (a[4][:, :, :0], a[5][:, :, :0]) + a[6:],
         "empty"),
        (lambda a: (a[0].repeat(1, 1, 4, 1),) + a[1:], "S_q <= S_kv"),
        (lambda a: a[:2] + (a[2][..., :-1],) + a[3:], "k_scale"),
        (lambda a: a[:3] + (a[2],) + a[4:], "k_zero must be None"),
    ],
)
def test_kv_attention_bad_inputs(mutate, match):
    with pytest.raises(ValueError, match=match):
        lowbit.ops.kv_attention(*mutate(kv_args(1, 4, 2, 3, 7, 32, causal=True)))


def test_forced_backend(monkeypatch):
    args = SMALL["ternary_matmul"]()
    monkeypatch.setenv("LOWBIT_BACKEND", "reference")
    assert backends.select("ternary_matmul", "cpu", args)[0] == "reference"
    monkeypatch.setenv("LOWBIT_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="LOWBIT_BACKEND=triton"):
        lowbit.ops.ternary_matmul(*args)
    monkeypatch.setenv("LOWBIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="not one of"):
        lowbit.ops.ternary_matmul(*args)


def test_native_cpu_int4_is_selected():
    assert lowbit.info()["native"]["loaded"]
    assert backends.select("int4_matmul", "cpu", int4_args(1, 64, 8))[0] == "native"


def test_reference_fallback_warns_once(monkeypatch):
    monkeypatch.delenv("LOWBIT_BACKEND", raising=False)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_NATIVE_MODULES", {})  # as in a build without native kernels
    monkeypatch.setattr(backends, "_candidates", {})
    name = "int4_matmul"
    args = SMALL[name]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _op(name)(*args)
        _op(name)(*args)
    msgs = [str(w.message) for w in caught if "slow PyTorch reference" in str(w.message)]
    assert len(msgs) == 1 and name in msgs[0]


def test_info_reports_every_op():
    info = lowbit.info()
    assert set(info["ops"]["cpu"]) == set(OPS)
    assert all(b[-1] == "reference" for b in info["ops"]["cpu"].values())
    text = str(info)
    assert "native module: loaded" in text and "int4_matmul" in text


def test_eager_calls_skip_the_dispatcher_only_when_nothing_differs():
    from lowbit import ops

    args = SMALL["int4_matmul"]()
    assert ops._eager_ok(args)
    x = args[0].clone().requires_grad_()
    assert not ops._eager_ok((x,) + args[1:])
    with torch.no_grad():
        assert ops._eager_ok((x,) + args[1:])
    assert not ops._eager_ok((args[0].to("meta"),) + args[1:])
    out = lowbit.ops.int4_matmul(*args)
    assert torch.equal(out, torch.ops.lowbit.int4_matmul.default(*args))
