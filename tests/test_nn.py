"""lowbit.Linear and lowbit.quantize_model (python/lowbit/nn/linear.py, quantize_model.py)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import lowbit
from lowbit.formats import int4, nf4, sparse24, ternary
from lowbit.nn import FORMATS, BitLinear, Linear, quantize_model

FORMAT_MODULES = {"int4": int4, "nf4": nf4, "ternary": ternary, "sparse24": sparse24}

#: (fmt, options) covering every format and its options.
CASES = [
    ("int4", {"group_size": 32}),
    ("int4", {"group_size": 64, "symmetric": True}),
    ("int4", {"group_size": 128}),
    ("int4", {"group_size": -1, "symmetric": True}),
    ("int4", {"group_size": 64, "scale_dtype": torch.float16}),
    ("nf4", {}),
    ("nf4", {"blocksize": 128, "double_quant": True}),
    ("ternary", {}),
    ("ternary", {"per_row": True}),
    ("sparse24", {}),
]
IDS = [f"{f}-" + "-".join(f"{k}={v}" for k, v in o.items()) for f, o in CASES]

#: Buffers whose dtype is part of the format (never changed by .to(dtype)).
FIXED = {
    "int4": {"qweight"},
    "nf4": {"qweight", "absmax", "absmax_scale", "absmax_code"},
    "ternary": {"qweight", "weight_scale"},
    "sparse24": {"meta"},
}


def _float_linear(k=256, n=96, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def _expected(q: Linear, x: torch.Tensor) -> torch.Tensor:
    """What the layer must compute: x @ dequantize().T + bias (ternary: int8 activations)."""
    if q.fmt == "ternary":
        x_q, x_scale = ternary.quantize_activations(x)
        x = x_q.float() / x_scale
    bias = None if q.bias is None else q.bias.float()
    return F.linear(x.float(), q.dequantize(), bias)


def test_public_names():
    assert lowbit.Linear is Linear and lowbit.quantize_model is quantize_model
    assert lowbit.BitLinear is BitLinear and lowbit.QuantizedKVCache is lowbit.nn.QuantizedKVCache
    assert FORMATS == ("int4", "nf4", "ternary", "sparse24")


# ---- from_linear / forward ----


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_forward_matches_dequantized(fmt, opts, bias, device):
    lin = _float_linear(bias=bias).to(device)
    q = Linear.from_linear(lin, fmt, **opts)
    assert q.in_features == 256 and q.out_features == 96 and q.fmt == fmt
    # The module holds exactly what the format's quantize makes of the weight.
    packed = FORMAT_MODULES[fmt].quantize(lin.weight.detach(), **opts)
    for name, t in packed.tensors().items():
        got = getattr(q, name)
        assert (got is None) == (t is None)
        if t is not None:
            assert got.dtype == t.dtype and torch.equal(got, t), name
    assert torch.equal(q.dequantize(), FORMAT_MODULES[fmt].dequantize(packed))
    for shape in [(5, 256), (2, 3, 256), (256,), (1, 256)]:
        x = torch.randn(shape, device=device)
        y = q(x)
        assert y.shape == (*shape[:-1], 96) and y.dtype == x.dtype
        assert rel_err(y, _expected(q, x)) < 1e-5


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
def test_dequantize_is_close_to_the_float_weight(fmt, opts):
    """Quantization error of a Gaussian-like weight, per format (measured, with margin)."""
    lin = _float_linear()
    bound = {"int4": 0.2, "nf4": 0.12, "ternary": 0.6, "sparse24": 0.7}[fmt]
    assert rel_err(Linear.from_linear(lin, fmt, **opts).dequantize(), lin.weight) < bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
def test_half_precision_linear(fmt, opts, dtype):
    lin = _float_linear(dtype=dtype)
    q = Linear.from_linear(lin, fmt, **opts)
    assert q.bias.dtype == dtype
    x = torch.randn(4, 256, dtype=dtype)
    y = q(x)
    assert y.dtype == dtype
    assert rel_err(y, _expected(q, x)) < {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def test_from_linear_keeps_bias_requires_grad_and_copies_it():
    lin = _float_linear()
    q = Linear.from_linear(lin, "int4")
    assert isinstance(q.bias, nn.Parameter) and q.bias.requires_grad
    assert torch.equal(q.bias, lin.bias) and q.bias.data_ptr() != lin.bias.data_ptr()
    lin.bias.requires_grad_(False)
    assert not Linear.from_linear(lin, "int4").bias.requires_grad
    assert [n for n, _ in q.named_parameters()] == ["bias"]  # the packed weight is buffers


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
def test_gradients_through_the_layer(fmt, opts):
    """x and bias get gradients (adapters train through a frozen layer); the weight gets none."""
    q = Linear.from_linear(_float_linear(), fmt, **opts)
    x = torch.randn(3, 256, requires_grad=True)
    g = torch.randn(3, 96)
    q(x).backward(g)
    # Straight-through for ternary: the activation quantization counts as the identity.
    torch.testing.assert_close(x.grad, g @ q.dequantize(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.bias.grad, g.sum(0), rtol=1e-5, atol=1e-5)


def test_from_quantized_wraps_a_packed_weight():
    w = torch.randn(64, 128)
    p = int4.quantize(w, group_size=32)
    gptq = int4.to_gptq(p)
    q = Linear.from_quantized(int4.from_gptq(**gptq), bias=torch.zeros(64))
    assert q.group_size == 32 and not q.symmetric
    assert torch.equal(q.dequantize(), int4.dequantize(p))
    assert Linear.from_quantized(p).bias is None


# ---- constructor, state_dict, checkpoints ----


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
def test_fresh_module_is_a_zero_weight(fmt, opts):
    q = Linear(256, 96, True, fmt, **opts)
    assert torch.equal(q.dequantize(), torch.zeros(96, 256))
    assert torch.equal(q(torch.randn(2, 256)), torch.zeros(2, 96))


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
def test_state_dict_round_trip(fmt, opts):
    src = Linear.from_linear(_float_linear(), fmt, **opts)
    sd = src.state_dict()
    expected = ["bias", *(n for n, t in src.quantized_weight().tensors().items() if t is not None), "_extra_state"]
    assert list(sd) == expected
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    dst = Linear(256, 96, True, fmt, **opts)
    dst.load_state_dict(loaded)
    for name, t in src.state_dict().items():
        if isinstance(t, torch.Tensor):
            assert dst.state_dict()[name].dtype == t.dtype and torch.equal(dst.state_dict()[name], t), name
    assert dst.state_dict()["_extra_state"] == sd["_extra_state"]
    x = torch.randn(3, 256)
    assert torch.equal(dst(x), src(x))


def test_state_dict_of_nf4_double_quant_carries_the_offset():
    src = Linear.from_linear(_float_linear(), "nf4", double_quant=True)
    assert src.absmax_offset != 0.0
    dst = Linear(256, 96, True, "nf4", double_quant=True)
    dst.load_state_dict(src.state_dict())
    assert dst.absmax_offset == src.absmax_offset
    assert torch.equal(dst.dequantize(), src.dequantize())


def test_whole_model_checkpoint_through_deferred_init():
    """Build on meta, materialize empty, load a checkpoint: the usual large-model path."""
    model = quantize_model(nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32)), "nf4")
    sd = model.state_dict()
    with torch.device("meta"):
        fresh = nn.Sequential(Linear(128, 64, fmt="nf4"), nn.ReLU(), Linear(64, 32, fmt="nf4"))
    assert fresh[0].qweight.is_meta
    fresh.to_empty(device="cpu")
    fresh.load_state_dict(sd)
    x = torch.randn(2, 128)
    assert torch.equal(fresh(x), model(x))


def test_load_state_dict_with_other_format_attributes_fails():
    sd = Linear.from_linear(_float_linear(), "int4", group_size=64).state_dict()
    sd["_extra_state"] = {**sd["_extra_state"], "symmetric": True}
    with pytest.raises(ValueError, match="symmetric=True.*symmetric=False"):
        Linear(256, 96, fmt="int4", group_size=64).load_state_dict(sd)
    with pytest.raises(ValueError, match="group_size=64.*group_size=128"):
        Linear(256, 96, fmt="int4", group_size=128).load_state_dict(
            Linear(256, 96, fmt="int4", group_size=64).state_dict()
        )


# ---- .to(): devices move everything, dtypes change only what the format lets change ----


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
@pytest.mark.parametrize("convert", ["to", "half", "bfloat16"])
def test_dtype_conversion_keeps_format_buffers(fmt, opts, convert):
    q = Linear.from_linear(_float_linear(), fmt, **opts)
    before = {n: t.clone() for n, t in q.named_buffers()}
    target = torch.bfloat16 if convert == "bfloat16" else torch.float16
    if convert == "to":
        q.to(torch.float16)
    else:
        getattr(q, convert)()
    for name, t in q.named_buffers():
        if name in FIXED[fmt]:
            assert t.dtype == before[name].dtype and torch.equal(t, before[name]), name
        else:
            assert t.dtype == target, name
    assert q.bias.dtype == target
    x = torch.randn(3, 256, dtype=target)
    assert rel_err(q(x), _expected(q, x)) < 1.6e-2
    q.float()
    for name, t in q.named_buffers():
        if name in FIXED[fmt]:
            assert torch.equal(t, before[name]), name


@pytest.mark.parametrize(("fmt", "opts"), CASES, ids=IDS)
def test_to_meta_and_device(fmt, opts, device):
    q = Linear.from_linear(_float_linear(), fmt, **opts)
    dtypes = {n: t.dtype for n, t in q.named_buffers()}
    m = copy.deepcopy(q).to("meta")
    assert all(t.is_meta for t in m.buffers()) and m.bias.is_meta
    assert {n: t.dtype for n, t in m.named_buffers()} == dtypes
    moved = copy.deepcopy(q).to(device)
    assert all(t.device.type == device for t in moved.buffers())
    x = torch.randn(2, 256)
    assert rel_err(moved(x.to(device)).cpu(), q(x)) < 1e-5


def test_extra_repr_names_format_and_options():
    r = repr(Linear(256, 64, fmt="int4", group_size=64, symmetric=True))
    assert "fmt='int4'" in r and "group_size=64" in r and "symmetric=True" in r and "in_features=256" in r
    assert "double_quant=True" in repr(Linear(64, 64, bias=False, fmt="nf4", double_quant=True))
    assert "per_row=False" in repr(Linear(64, 64, fmt="ternary"))


# ---- errors ----


def test_wrong_in_features_names_both():
    q = Linear(256, 64)
    with pytest.raises(ValueError, match=r"x.shape\[-1\]=128.*in_features=256"):
        q(torch.randn(2, 128))
    with pytest.raises(ValueError, match="scalar"):
        q(torch.tensor(1.0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        q([1.0] * 256)


def test_unknown_format_lists_valid_ones():
    with pytest.raises(ValueError, match="int3.*int4, nf4, ternary, sparse24"):
        Linear(64, 64, fmt="int3")
    with pytest.raises(ValueError, match="int3"):
        Linear.from_linear(nn.Linear(64, 64), "int3")
    with pytest.raises(TypeError, match="fmt must be a str"):
        Linear(64, 64, fmt=4)


@pytest.mark.parametrize(
    ("fmt", "opts", "exc", "match"),
    [
        ("int4", {"groupsize": 64}, TypeError, "unknown option 'groupsize'.*group_size, symmetric, scale_dtype"),
        ("sparse24", {"group_size": 64}, TypeError, "unknown option 'group_size' for fmt='sparse24'"),
        ("int4", {"group_size": 48}, ValueError, "group_size=48 must be 32, 64, 128"),
        ("int4", {"group_size": "64"}, TypeError, "group_size must be an int"),
        ("int4", {"symmetric": 1}, TypeError, "symmetric must be a bool"),
        ("int4", {"scale_dtype": torch.int8}, TypeError, "scale_dtype"),
        ("nf4", {"blocksize": 48}, ValueError, "blocksize=48"),
        ("ternary", {"per_row": "yes"}, TypeError, "per_row must be a bool"),
    ],
)
def test_bad_options(fmt, opts, exc, match):
    with pytest.raises(exc, match=match):
        Linear(256, 64, fmt=fmt, **opts)
    with pytest.raises(exc, match=match):
        Linear.from_linear(nn.Linear(256, 64), fmt, **opts)


def test_shapes_the_format_cannot_take():
    with pytest.raises(ValueError, match="group_size=128 does not divide in_features=96"):
        Linear(96, 64, fmt="int4")
    with pytest.raises(ValueError, match="even in_features"):
        Linear(33, 64, fmt="int4", group_size=-1)
    with pytest.raises(ValueError, match="in_features divisible by 8"):
        Linear.from_linear(nn.Linear(100, 8), "sparse24")
    with pytest.raises(ValueError, match="in_features must be positive"):
        Linear(0, 8)
    with pytest.raises(TypeError, match="dtype"):
        Linear(64, 8, fmt="nf4", dtype=torch.int8)
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        Linear.from_linear(nn.Conv1d(4, 4, 1), "int4")


def test_from_quantized_bad_inputs():
    p = int4.quantize(torch.randn(64, 128), group_size=32)
    with pytest.raises(ValueError, match=r"bias must have shape \(64,\)"):
        Linear.from_quantized(p, bias=torch.zeros(65))
    with pytest.raises(TypeError, match="bias"):
        Linear.from_quantized(p, bias=torch.zeros(64, dtype=torch.int32))
    with pytest.raises(TypeError, match="Int4Weight"):
        Linear.from_quantized(torch.zeros(4, 4))


def test_weight_with_nan_is_rejected():
    lin = nn.Linear(64, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    for fmt in FORMATS:
        with pytest.raises(ValueError, match="NaN"):
            Linear.from_linear(lin, fmt, **({"group_size": 64} if fmt == "int4" else {}))


# ---- quantize_model ----


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 64)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(64, 128), "down": nn.Linear(128, 64)}) for _ in range(2)
        )
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.lm_head = nn.Linear(64, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](F.gelu(b["up"](h)))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.lm_head(h)


def _linear_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, Linear))


def test_quantize_model_replaces_every_linear():
    torch.manual_seed(0)
    model = _Tiny()
    ids = torch.randint(0, 10, (2, 7))
    ref = model(ids)
    out = quantize_model(model, "int4", group_size=64)
    assert out is model
    assert _linear_names(model) == [
        "blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up", "lm_head",
    ]
    # nn.MultiheadAttention reads out_proj.weight directly: it stays in float.
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert rel_err(model(ids), ref) < 0.1


@pytest.mark.parametrize(
    ("skip", "kept"),
    [
        ("lm_head", ["lm_head"]),
        (["blocks.0.up"], ["blocks.0.up"]),
        (["up"], ["blocks.0.up", "blocks.1.up"]),
        (["blocks.1", "lm_head"], ["blocks.1.down", "blocks.1.up", "lm_head"]),
    ],
)
def test_quantize_model_skip(skip, kept):
    model = quantize_model(_Tiny(), "nf4", skip=skip)
    everything = ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up", "lm_head"]
    assert _linear_names(model) == sorted(set(everything) - set(kept))
    for name in kept:
        assert type(model.get_submodule(name)) is nn.Linear


def test_quantize_model_filter_fn():
    seen = []

    def only_down(module, name):
        seen.append(name)
        return name.endswith("down")

    model = quantize_model(_Tiny(), "sparse24", skip=["blocks.0"], filter_fn=only_down)
    assert _linear_names(model) == ["blocks.1.down"]
    assert "blocks.0.down" not in seen  # skip is applied first


def test_quantize_model_shape_error_names_layers_and_changes_nothing():
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 96), nn.Linear(96, 8))
    with pytest.raises(ValueError, match=r"'2' \(in_features=96, out_features=8\).*group_size=64 does not divide"):
        quantize_model(model, "int4", group_size=64)
    assert not _linear_names(model)
    quantize_model(model, "int4", group_size=64, skip=["2"])
    assert _linear_names(model) == ["0", "1"]


def test_quantize_model_shared_layer_stays_shared():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(model, "ternary")
    assert isinstance(model[0], Linear) and model[0] is model[2]


def test_quantize_model_root_linear_and_bad_arguments():
    q = quantize_model(nn.Linear(64, 8), "int4", group_size=32)
    assert isinstance(q, Linear) and q.group_size == 32
    with pytest.raises(TypeError, match="unknown option 'blocksize'"):
        quantize_model(_Tiny(), "int4", blocksize=64)
    with pytest.raises(ValueError, match="valid formats"):
        quantize_model(_Tiny(), "fp8")
    with pytest.raises(TypeError, match="skip entries"):
        quantize_model(_Tiny(), "nf4", skip=[3])
    with pytest.raises(TypeError, match="nn.Module"):
        quantize_model({"a": 1}, "nf4")


def test_quantize_model_converts_bitlinear_for_ternary():
    model = nn.Sequential(BitLinear(64, 32, per_row=True), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(3, 64)
    ref = model[0](x)
    quantize_model(model, "int4", group_size=32)
    assert isinstance(model[0], BitLinear)  # only the ternary format converts BitLinear
    with pytest.raises(ValueError, match="per_row=True"):
        quantize_model(nn.Sequential(BitLinear(64, 32, per_row=True)), "ternary", per_row=False)
    model = nn.Sequential(BitLinear(64, 32, per_row=True))
    ref = model[0](x)
    quantize_model(model, "ternary")
    assert isinstance(model[0], Linear) and model[0].per_row
    assert rel_err(model[0](x), ref) < 1e-5


def test_linear_eager_plan_logic(monkeypatch):
    # lowbit.Linear's plain eager calls reuse a backend's prepared call (the 4-bit CUDA kernels
    # make one); here the CPU backend gets a counting one, to check that the plan gives the op's
    # result and is remade whenever what it was made from changes.
    from lowbit.backends import cpu as cpu_be
    from lowbit.nn import linear as lin

    used = []

    def plan_int4_matmul(x, qweight, scales, zeros, group_size, bias=None):
        def run(x2):
            used.append(1)
            return cpu_be.int4_matmul(x2, qweight, scales, zeros, group_size, bias)

        return run

    monkeypatch.setattr(lin, "_PLAN_DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(cpu_be, "plan_int4_matmul", plan_int4_matmul, raising=False)
    torch.manual_seed(1)
    layer = lowbit.Linear.from_linear(torch.nn.Linear(256, 96), "int4", group_size=64)
    x = torch.randn(5, 256)

    def op(x):  # the op path (checks, backend selection)
        return layer._layout.matmul(layer, x, layer.bias)

    def planned(x):
        n = len(used)
        y = layer(x)
        return y, len(used) > n

    with torch.no_grad():
        y0, hit = planned(x)
        assert not hit and lin._PLANS[layer].run is not None
        y1, hit = planned(x)
        assert hit and torch.equal(y1, y0) and torch.equal(y0, op(x))
        y2, hit = planned(x[:2])
        assert hit and torch.equal(y2, op(x[:2]))
        other = lowbit.Linear.from_linear(torch.nn.Linear(256, 96), "int4", group_size=64)
        layer.load_state_dict(other.state_dict())  # in place: new versions
        y3, hit = planned(x)
        assert not hit and torch.equal(y3, op(x)) and torch.equal(y3, other(x))
        layer.bias = torch.nn.Parameter(torch.randn(96))  # a new object
        y4, hit = planned(x)
        assert not hit and torch.equal(y4, op(x))
        assert planned(x)[1]
        layer.bias = None
        y5, hit = planned(x)
        assert not hit and torch.equal(y5, op(x))
        layer.scales.mul_(2)  # in place on a buffer
        y6, hit = planned(x)
        assert not hit and torch.equal(y6, op(x))
        xb = x.to(torch.bfloat16)
        y7, hit = planned(xb)  # another dtype
        assert not hit and y7.dtype == torch.bfloat16 and torch.equal(y7, op(xb))
        monkeypatch.setenv("LOWBIT_BACKEND", "reference")  # another backend choice
        y8, hit = planned(xb)
        assert not hit
        monkeypatch.delenv("LOWBIT_BACKEND")
        with pytest.raises(ValueError, match="in_features"):
            layer(torch.randn(2, 128))
    layer.bias = torch.nn.Parameter(torch.zeros(96))
    xg = x.clone().requires_grad_()  # autograd wanted: the op path
    y9, hit = planned(xg)
    assert not hit and y9.requires_grad
    y9.sum().backward()
    assert xg.grad is not None and layer.bias.grad is not None
