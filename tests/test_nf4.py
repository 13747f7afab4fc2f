"""lowbit.formats.nf4: bit-identity with bitsandbytes, round trip bounds, validation, bnb interop.

The KNOWN VECTORS below were produced by bitsandbytes 0.50.2 ``quantize_4bit(quant_type="nf4")``
on CUDA (an H100, torch 2.11+cu130), from the inputs written here; no bitsandbytes is needed.
"""

from __future__ import annotations

import hashlib
import json
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.formats import nf4
from lowbit.formats.nf4 import NF4Weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _hexbytes(t: torch.Tensor) -> str:
    return t.cpu().contiguous().view(torch.uint8).numpy().tobytes().hex()


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _digest(t: torch.Tensor, like: str) -> str:
    return "sha256:" + _sha(t) if like.startswith("sha256:") else _hexbytes(t)


def _floats(hexes: list[str]) -> torch.Tensor:
    return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float32)


def _unpack(qweight: torch.Tensor) -> torch.Tensor:
    """Nibbles in element order: high nibble first."""
    return torch.stack((qweight >> 4, qweight & 0xF), dim=-1).reshape(-1)


# ---- constants --------------------------------------------------------------------------------

# bnb get_4bit_type("nf4") as float32 bytes; sha256 of create_dynamic_map(signed=True) bytes.
NF4_CODE_HEX = ("000080bfb13932bf306b06bfa032cabe4da291be3f353dbe7178babd00000000"
                "fffaa23de3ca243edd047c3e3a03ad3eb8a4e13eab07103fb313393f0000803f")
DYNAMIC_CODE_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"
# The decimal literals of bnb's CUDA dQuantizeNF4 (csrc/kernels.cu), ascending.
CUDA_LITERALS = ["-0.8480964004993439", "-0.6106329262256622", "-0.4599952697753906", "-0.33967943489551544",
                 "-0.23460740596055984", "-0.13791173323988914", "-0.045525018125772476", "0.03979014977812767",
                 "0.1202552504837513", "0.2035212516784668", "0.2920137718319893", "0.3893125355243683",
                 "0.5016634166240692", "0.6427869200706482", "0.8614784181118011"]


def _nearest_f32(decimal: str) -> float:
    """Correctly rounded decimal -> float32 (what nvcc does with a 'f' literal), ties to even."""
    exact = Fraction(decimal)
    f = torch.tensor(float(exact), dtype=torch.float32)
    cands = [torch.nextafter(f, torch.tensor(-2.0)), f, torch.nextafter(f, torch.tensor(2.0))]
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - exact), int(c.view(torch.int32)) & 1)))


def test_code_tables():
    assert nf4.NF4_CODE.dtype == torch.float32 and _hexbytes(nf4.NF4_CODE) == NF4_CODE_HEX
    dyn = nf4.dynamic_code()
    assert dyn.dtype == torch.float32 and dyn.shape == (256,) and _sha(dyn) == DYNAMIC_CODE_SHA256
    assert dyn[127] == 0 and dyn[255] == 1 and float(dyn[0]) == float.fromhex("-0x1.fc6666p-1")
    dyn[0] = 5.0  # a copy: the cached map is unchanged
    assert _sha(nf4.dynamic_code()) == DYNAMIC_CODE_SHA256


def test_thresholds_are_the_cuda_literals():
    t = nf4.NF4_THRESHOLDS
    assert t.dtype == torch.float32 and t.shape == (15,)
    assert t.tolist() == [_nearest_f32(s) for s in CUDA_LITERALS]
    mid = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2  # what bnb's pure-torch CPU path compares against
    ulps = (t.view(torch.int32) - mid.view(torch.int32)).abs()
    assert ulps.max() == 1 and (ulps == 1).nonzero().flatten().tolist() == [0, 8, 12, 14]


# ---- known vectors from bitsandbytes (CUDA) -----------------------------------------------------

def kv1() -> torch.Tensor:  # fp32 (3, 43), blocksize 64: 3 blocks, a short tail block, odd numel
    i = torch.arange(129, dtype=torch.float32)
    return (((i * 37) % 101 - 50) * (1 + torch.div(i, 64, rounding_mode="floor")) / 37).view(3, 43)


def kv2() -> torch.Tensor:  # bf16 (4, 40), blocksize 32, block 2 all zero
    i = torch.arange(160, dtype=torch.float32)
    w = ((i * 53) % 97 - 48) / 16
    w[64:96] = 0
    return w.view(4, 40).to(torch.bfloat16)


def kv3() -> torch.Tensor:  # fp32 (1, 64): absmax 1.0, values exactly at, and next to, the thresholds
    t, c = nf4.NF4_THRESHOLDS, nf4.NF4_CODE
    mid = (c[:-1] + c[1:]) / 2
    vals = [1.0] + t.tolist() + mid.tolist() + torch.nextafter(t, torch.tensor(2.0)).tolist()
    vals += [-1.0, 0.0, -0.0, 0.5, -0.5] + c[:13].tolist()
    return torch.tensor(vals, dtype=torch.float32).view(1, 64)


def kv4() -> torch.Tensor:  # fp16 (64, 1024), blocksize 64, double quant: 1024 blocks (4 nested blocks)
    i = torch.arange(64 * 1024, dtype=torch.float32)
    b = torch.div(i, 64, rounding_mode="floor")
    amp = (1 + b % 13) / 4
    w = ((i * 7919) % 2003 - 1001) / 1001 * 0.999 * amp
    w[::64] = amp[::64] * (1 - 2 * (b[::64] % 2))
    return w.view(64, 1024).to(torch.float16)


def kv5() -> torch.Tensor:  # fp32 (5, 100), blocksize 32, double quant: all 16 absmax equal -> scale 0
    i = torch.arange(500, dtype=torch.float32)
    return (((i * 29) % 61 - 30) / 8).view(5, 100)


def kv6() -> torch.Tensor:  # as kv5 with absmax varying by block (16 blocks, one short nested block)
    i = torch.arange(500, dtype=torch.float32)
    return (((i * 29) % 61 - 30) / 8 * (1 + torch.div(i, 32, rounding_mode="floor") % 3)).view(5, 100)


KNOWN = {  # name: (input, blocksize, double_quant, qweight hex or "sha256:...", absmax, nested (scale, offset))
    "kv1": (kv1, 64, False,
            ("04c16e29f3b05d17e29f3c05d18e2af4c16e18e3b05d17e29f3b05d18e2af4c16d18e3b04c17e29f3b05d17e2af4c06d18e2a"
             "04c16e29f3b05d17e29f3c05d18f7"),
            ["0x1.59f22ap+0", "0x1.59f22ap+1", "0x1.9f2298p+1"], None),
    # bnb's CPU path writes 0x77... for the all-zero block 2; CUDA (and lowbit) 0x00...
    "kv2": (kv2, 32, False,
            ("081a1c3e4e6091b2c3e5f7091b2d3e5f7091b2d3e5f7091c2d3e5f70a1c2d3e5000000000000000000000000000000006081"
             "a1c3e4e6091b2c3e5f7091b2d3e5f7091b2d3e5f7091c2d3e5f70a1c2d3e"),
            ["0x1.8p+1", "0x1.68p+1", "0x0p+0", "0x1.8p+1", "0x1.68p+1"], None),
    # bnb's CPU path (fp32 midpoints) gives f0123456799abcde0123456789abcde023456789abccee077c20123456789abc
    "kv3": (kv3, 64, False, "f0123456789abcde1123456789abddf123456789abcdef077c20123456789abc", ["0x1p+0"], None),
    "kv4": (kv4, 64, True, "sha256:7c74e9782456e21944d10e10d57f99d3d107ba06f86521b236bc2ccb3dcb34a6",
            "sha256:5efcc48a926e55766aee6ce91a53169225268264db9a72cda6c89a04a472d5b8",
            (["0x1.80f0p+0"] * 4, "0x1.bf1p+0")),
    "kv5": (kv5, 32, True, "sha256:83f57211e44907e5fc0b889cbc7a75f4b088098fddd3e712ba21dd3ec239eb79",
            "00000000000000000000000000000000", (["0x0p+0"], "0x1.ep+1")),
    "kv6": (kv6, 32, True, "sha256:83f57211e44907e5fc0b889cbc7a75f4b088098fddd3e712ba21dd3ec239eb79",
            "08b0ff08b0ff08b0ff08b0ff08b0ff08", (["0x1.fep+1"], "0x1.d1p+2")),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_vectors_match_bitsandbytes(name, device):
    make, bs, dq, qweight, absmax, nested = KNOWN[name]
    w = make()
    p = nf4.quantize(w.to(device), blocksize=bs, double_quant=dq)
    assert p.qweight.device.type == device and p.shape == tuple(w.shape) and p.double_quant == dq
    assert _digest(p.qweight, qweight) == qweight
    if not dq:
        assert p.absmax.dtype == torch.float32 and torch.equal(p.absmax.cpu(), _floats(absmax))
        return
    assert p.absmax.dtype == torch.uint8
    assert _digest(p.absmax, absmax) == absmax
    assert torch.equal(p.absmax_scale.cpu(), _floats(nested[0])) and p.absmax_offset == float.fromhex(nested[1])
    assert _sha(p.absmax_code) == DYNAMIC_CODE_SHA256


def test_all_zero_block_codes_like_cuda():
    w = kv2()
    p = nf4.quantize(w, blocksize=32)
    assert bool((p.qweight[32:48] == 0).all()) and p.absmax[2] == 0  # codes 0 (-1.0) * absmax 0
    deq = nf4.dequantize(p).reshape(-1)
    assert bool((deq[64:96] == 0).all()) and bool(torch.signbit(deq[64:96]).all())  # -0.0
    # double quant: the block decodes to -dequantized_absmax, as bnb on CUDA does
    pd = nf4.quantize(w, blocksize=32, double_quant=True)
    a = nf4.dequantize_absmax(pd.absmax, pd.absmax_scale, pd.absmax_code, pd.absmax_offset)
    assert torch.equal(nf4.dequantize(pd).reshape(-1)[64:96], -a[2].expand(32))


def test_reciprocal_hook_reproduces_fast_math():
    # bnb's CUDA kernel computed 1/absmax with rcp.approx (0x1.ffe95cp-1; IEEE gives 0x1.ffe95ep-1) and
    # coded this value 1; with the correctly rounded reciprocal its product falls below the threshold.
    absmax, value, fast = (float.fromhex(h) for h in ("0x1.000b52p+0", "-0x1.b24ce4p-1", "0x1.ffe95cp-1"))
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = absmax, value
    assert int(nf4.quantize(w).qweight[0]) & 0xF == 0
    assert int(nf4.quantize(w, reciprocal=lambda t: torch.full_like(t, fast)).qweight[0]) & 0xF == 1
    with pytest.raises(TypeError, match="reciprocal must return a float32 tensor"):
        nf4.quantize(w, reciprocal=lambda t: t.double())
    with pytest.raises(TypeError, match="reciprocal must be callable"):
        nf4.quantize(w, reciprocal=1.0)


def test_subnormals_flush_like_cuda():
    w = torch.tensor([[1e-39, -5e-40] * 32])  # flushed: an all-zero block
    p = nf4.quantize(w)
    assert p.absmax.tolist() == [0.0] and bool((p.qweight == 0).all())
    w = torch.tensor([[3e38, -1e38, 1.5e38, 1.0] * 16])  # 1/absmax is subnormal -> 0 -> every code 7
    assert bool((nf4.quantize(w).qweight == 0x77).all())


# ---- reference semantics, round trip --------------------------------------------------------------

def _tree(x: float) -> int:
    """bnb's dQuantizeNF4 decision tree, written out (NaN falls through to 0)."""
    t = nf4.NF4_THRESHOLDS.tolist()
    if x > t[7]:
        if x > t[11]:
            return (15 if x > t[14] else 14) if x > t[13] else (13 if x > t[12] else 12)
        return (11 if x > t[10] else 10) if x > t[9] else (9 if x > t[8] else 8)
    if x > t[3]:
        return (7 if x > t[6] else 6) if x > t[5] else (5 if x > t[4] else 4)
    return (3 if x > t[2] else 2) if x > t[1] else (1 if x > t[0] else 0)


def _reference_codes(w: torch.Tensor, blocksize: int) -> tuple[list[int], list[float]]:
    flat = w.float().reshape(-1).tolist()
    codes, absmaxes = [], []
    for start in range(0, len(flat), blocksize):
        block = flat[start:start + blocksize]
        a = max(abs(v) for v in block)
        r = torch.tensor(a, dtype=torch.float32).reciprocal()
        xs = (torch.tensor(block, dtype=torch.float32) * r).tolist()
        codes += [_tree(x) if not math.isnan(x) else 0 for x in xs]
        absmaxes.append(a)
    if len(flat) % 2:
        codes.append(7 if absmaxes[-1] != 0 else 0)  # the pad nibble: the code of 0.0 * (1/absmax)
    return codes, absmaxes


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 70), bs=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(DTYPES), zero_rows=st.booleans(), seed=st.integers(0, 2**16))
def test_matches_reference_tree(n, k, bs, dtype, zero_rows, seed):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 3
    if zero_rows:
        w[::3] = 0
    w = w.to(dtype)
    p = nf4.quantize(w, blocksize=bs)
    codes, absmaxes = _reference_codes(w, bs)
    assert p.qweight.shape == ((n * k + 1) // 2,) and p.absmax.shape == (math.ceil(n * k / bs),)
    assert _unpack(p.qweight).tolist() == codes and p.absmax.tolist() == absmaxes
    # bnb-style dequantization: code[q] * absmax in float32, then cast
    q = torch.tensor(codes[: n * k])
    a = torch.tensor(absmaxes).repeat_interleave(bs)[: n * k]
    want = (nf4.NF4_CODE[q] * a).view(n, k)
    for dt in DTYPES:
        assert torch.equal(nf4.dequantize(p, dt), want.to(dt))
    assert torch.equal(nf4.dequantize_tensors(*p.tensors().values(), p.absmax_offset, bs, (n, k)), want)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 33), k=st.integers(1, 300), bs=st.sampled_from(nf4.BLOCKSIZES),
       dtype=st.sampled_from(DTYPES), dq=st.booleans(), seed=st.integers(0, 2**16))
def test_round_trip_bound(n, k, bs, dtype, dq, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 4).to(dtype)
    p = nf4.quantize(w, blocksize=bs, double_quant=dq)
    NF4Weight.from_tensors(p.tensors(), **p.attributes())  # valid
    exact = nf4.quantize(w, blocksize=bs).absmax
    a = nf4.dequantize_absmax(p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset)
    half_gap = float((nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max()) / 2
    err = (nf4.dequantize(p) - w.float()).abs()
    def rep(t: torch.Tensor) -> torch.Tensor:
        return t.repeat_interleave(bs)[: n * k].view(n, k)

    bound = rep(exact) * (half_gap + 1e-6) + rep((a - exact).abs())
    assert bool((err <= bound).all())


def test_round_trip_accuracy_and_exact_codes():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    for dq in (False, True):
        deq = nf4.dequantize(nf4.quantize(w, double_quant=dq))
        assert float((deq - w).norm() / w.norm()) < 0.11
    q = torch.randint(0, 16, (8, 64))
    q[:, 0] = 15  # absmax = the block's scale, a power of two: every code survives exactly
    w = nf4.NF4_CODE[q] * (2.0 ** torch.arange(-4, 4)).view(8, 1)
    p = nf4.quantize(w, blocksize=64)
    assert torch.equal(_unpack(p.qweight), q.reshape(-1).to(torch.uint8)) and torch.equal(nf4.dequantize(p), w)


@pytest.mark.parametrize("dq", [False, True])
def test_layout_and_devices(device, dq):
    w = torch.randn(7, 37, device=device)  # odd numel
    p = nf4.quantize(w, blocksize=32, double_quant=dq)
    assert (p.out_features, p.in_features, p.blocksize) == (7, 37, 32)
    assert p.qweight.shape == (130,) and p.absmax.shape == (9,)
    assert p.qweight.device.type == device and int(p.qweight[-1]) & 0xF == 7  # pad nibble: code of 0.0
    if dq:
        assert p.absmax.dtype == torch.uint8 and p.absmax_scale.shape == (1,) and p.absmax_code.shape == (256,)
    else:
        assert p.absmax_scale is None and p.absmax_code is None and p.absmax_offset == 0.0
    cpu = nf4.quantize(w.cpu(), blocksize=32, double_quant=dq)
    assert torch.equal(cpu.qweight, p.qweight.cpu())
    assert nf4.dequantize(p, torch.bfloat16).dtype == torch.bfloat16


# ---- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("weight, blocksize, exc, match", [
    (torch.randn(4, 64).double(), 64, TypeError, "weight must have dtype"),
    (torch.randint(0, 5, (4, 64)), 64, TypeError, "weight must have dtype"),
    ([[1.0] * 64], 64, TypeError, "weight must be a torch.Tensor"),
    (torch.randn(64), 64, ValueError, "weight must have 2 dimensions"),
    (torch.randn(2, 4, 64), 64, ValueError, "weight must have 2 dimensions"),
    (torch.empty(0, 64), 64, ValueError, "weight is empty"),
    (torch.tensor([[1.0, float("nan")] * 32]), 64, ValueError, "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")] * 32]).half(), 64, ValueError, "NaN or Inf"),
    (torch.randn(4, 64), 48, ValueError, "blocksize=48 must be a power of two in 32..4096"),
    (torch.randn(4, 64), 16, ValueError, "blocksize=16"),
    (torch.randn(4, 64), 8192, ValueError, "blocksize=8192"),
    (torch.randn(4, 64), 0, ValueError, "blocksize=0"),
    (torch.randn(4, 64), -64, ValueError, "blocksize=-64"),
    (torch.randn(4, 64), 64.0, TypeError, "blocksize must be an int"),
    (torch.randn(4, 64), True, TypeError, "blocksize must be an int"),
])
def test_quantize_rejects(weight, blocksize, exc, match):
    with pytest.raises(exc, match=match):
        nf4.quantize(weight, blocksize=blocksize)


def test_quantize_rejects_options():
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        nf4.quantize(torch.randn(2, 64), double_quant=1)
    with pytest.raises(TypeError, match="p must be an NF4Weight"):
        nf4.dequantize(torch.zeros(4))
    p = nf4.quantize(torch.randn(2, 64))
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        nf4.dequantize(p, torch.int8)


def _good(dq: bool = True) -> NF4Weight:
    return nf4.quantize(torch.randn(10, 100), blocksize=32, double_quant=dq)  # 32 blocks, 500 bytes


def test_from_tensors_round_trip():
    for dq in (False, True):
        p = _good(dq)
        assert list(p.tensors()) == ["qweight", "absmax", "absmax_scale", "absmax_code"]
        attrs = p.attributes()
        assert attrs == {"blocksize": 32, "out_features": 10, "in_features": 100, "absmax_offset": p.absmax_offset}
        assert all(type(v) in (int, float) for v in attrs.values())
        q = NF4Weight.from_tensors(p.tensors(), **attrs)
        assert torch.equal(nf4.dequantize(q), nf4.dequantize(p)) and q.shape == p.shape
    q = NF4Weight(p.qweight, p.absmax, p.absmax_scale, p.absmax_code, 0.1, 32, [10, 100])
    assert q.absmax_offset == float(torch.tensor(0.1, dtype=torch.float32)) and q.shape == (10, 100)


def _replace(p: NF4Weight, **kw):
    args = dict(p.tensors(), absmax_offset=p.absmax_offset, blocksize=p.blocksize, shape=p.shape)
    args.update(kw)
    return NF4Weight(**args)


@pytest.mark.parametrize("change, exc, match", [
    ({"qweight": torch.zeros(500, dtype=torch.int8)}, TypeError, "qweight must have dtype uint8"),
    ({"qweight": torch.zeros(499, dtype=torch.uint8)}, ValueError, r"qweight must have shape \(500\)"),
    ({"qweight": torch.zeros(250, 2, dtype=torch.uint8)}, ValueError, "qweight must have shape"),
    ({"absmax": torch.zeros(31, dtype=torch.uint8)}, ValueError, r"absmax must have shape \(32\)"),
    ({"absmax": torch.zeros(32, dtype=torch.float16)}, TypeError, "absmax must have dtype float32, uint8"),
    ({"absmax_scale": None}, ValueError, "uint8 absmax needs absmax_scale"),
    ({"absmax_code": torch.zeros(255)}, ValueError, r"absmax_code must have shape \(256\)"),
    ({"absmax_scale": torch.zeros(2)}, ValueError, r"absmax_scale must have shape \(1\)"),
    ({"absmax_scale": torch.zeros(1, dtype=torch.float16)}, TypeError, "absmax_scale must have dtype float32"),
    ({"absmax": torch.ones(32), "absmax_offset": 0.0}, ValueError, "float32 absmax takes no absmax_scale"),
    ({"absmax_offset": float("nan")}, ValueError, "must be finite"),
    ({"absmax_offset": 1e39}, ValueError, "must be finite"),
    ({"absmax_offset": "0.5"}, TypeError, "absmax_offset must be a float"),
    ({"blocksize": 24}, ValueError, "blocksize=24"),
    ({"blocksize": 64}, ValueError, "absmax must have shape"),
    ({"shape": (10, 101)}, ValueError, "qweight must have shape"),
    ({"shape": (10, 0)}, ValueError, "shape entries must be positive"),
    ({"shape": (1000,)}, ValueError, "shape must be"),
    ({"shape": (10.0, 100)}, TypeError, "shape entry must be an int"),
])
def test_weight_validation(change, exc, match):
    with pytest.raises(exc, match=match):
        _replace(_good(), **change)


def test_weight_validation_plain():
    p = _good(False)
    with pytest.raises(ValueError, match="0.0 without double quantization"):
        _replace(p, absmax_offset=0.5)
    with pytest.raises(ValueError, match="float32 absmax takes no absmax_code"):
        _replace(p, absmax_code=nf4.dynamic_code())


@pytest.mark.cuda
def test_weight_validation_devices():
    p = _good()
    with pytest.raises(ValueError, match="one device"):
        _replace(p, absmax=p.absmax.cuda())


def test_from_tensors_validation():
    p = _good()
    t, a = p.tensors(), p.attributes()
    with pytest.raises(TypeError, match="tensors must be a dict"):
        NF4Weight.from_tensors(list(t.values()), **a)
    with pytest.raises(ValueError, match="unknown tensors"):
        NF4Weight.from_tensors({**t, "scales": t["absmax"]}, **a)
    with pytest.raises(ValueError, match="missing tensors"):
        NF4Weight.from_tensors({k: v for k, v in t.items() if k != "absmax"}, **a)
    with pytest.raises(ValueError, match="attributes must be"):
        NF4Weight.from_tensors(t, **{k: v for k, v in a.items() if k != "blocksize"})
    with pytest.raises(ValueError, match="attributes must be"):
        NF4Weight.from_tensors(t, **a, group_size=32)
    with pytest.raises(ValueError, match="uint8 absmax needs absmax_code"):
        NF4Weight.from_tensors({k: v for k, v in t.items() if k != "absmax_code"}, **a)


def test_dequantize_helpers_validate():
    p = _good()
    with pytest.raises(ValueError, match="uint8 absmax needs absmax_scale"):
        nf4.dequantize_absmax(p.absmax)
    with pytest.raises(ValueError, match="absmax must have 1 dimensions"):
        nf4.dequantize_absmax(p.absmax.view(4, 8), p.absmax_scale, p.absmax_code, p.absmax_offset)
    with pytest.raises(ValueError, match="qweight must have shape"):
        nf4.dequantize_tensors(p.qweight[:-1], p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset, 32, p.shape)
    with pytest.raises(TypeError, match="dtype must be"):
        nf4.dequantize_tensors(*p.tensors().values(), p.absmax_offset, 32, p.shape, torch.float64)
    want = nf4.dequantize_absmax(p.absmax, p.absmax_scale, p.absmax_code, p.absmax_offset)
    by_hand = p.absmax_code[p.absmax.long()] * p.absmax_scale[0] + torch.tensor(p.absmax_offset)
    assert torch.equal(want, by_hand)


# ---- bitsandbytes checkpoint interop ----------------------------------------------------------------

@pytest.mark.parametrize("dq", [False, True])
def test_bnb_state_dict_round_trip(dq):
    p = nf4.quantize(torch.randn(40, 96), blocksize=64, double_quant=dq)
    sd = nf4.to_bnb_state_dict(p, dtype=torch.bfloat16)
    keys = ["weight", "weight.absmax", "weight.quant_map"]
    keys += ["weight.nested_absmax", "weight.nested_quant_map"] if dq else []
    assert list(sd) == keys + ["weight.quant_state.bitsandbytes__nf4"]
    assert sd["weight"].shape == (1920, 1) and torch.equal(sd["weight.quant_map"], nf4.NF4_CODE)
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    want = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [40, 96]}
    if dq:
        want.update(nested_blocksize=256, nested_dtype="float32", nested_offset=p.absmax_offset)
    assert list(meta.items()) == list(want.items())  # bnb's key order, so the bytes match bnb's
    q = nf4.from_bnb_state_dict(sd)
    assert torch.equal(nf4.dequantize(q), nf4.dequantize(p)) and q.double_quant == dq
    # quant_storage other than uint8 (bnb views the packed bytes as that dtype)
    packed = sd["weight"].view(-1).view(torch.bfloat16).view(-1, 1)  # bnb's [n/4, 1] bfloat16 storage
    r = nf4.from_bnb(packed, sd["weight.absmax"], (40, 96), 64,
                     nested_absmax=sd.get("weight.nested_absmax"), nested_code=sd.get("weight.nested_quant_map"),
                     offset=torch.tensor(p.absmax_offset) if dq else None)
    assert torch.equal(r.qweight, p.qweight)


def test_bnb_loaders_reject():
    p = _good()
    sd = nf4.to_bnb_state_dict(p)
    with pytest.raises(ValueError, match="not a bnb NF4 weight"):
        nf4.from_bnb_state_dict({k: v for k, v in sd.items() if "quant_state" not in k})
    fp4 = {k.replace("bitsandbytes__nf4", "bitsandbytes__fp4"): v for k, v in sd.items()}
    with pytest.raises(ValueError, match="not a bnb NF4 weight"):
        nf4.from_bnb_state_dict(fp4)
    with pytest.raises(ValueError, match="quant_map is not the NF4 table"):
        nf4.from_bnb(p.qweight, torch.ones(32), (10, 100), 32, quant_map=-nf4.NF4_CODE)
    with pytest.raises(ValueError, match="go together"):
        nf4.from_bnb(p.qweight, p.absmax, (10, 100), 32, nested_absmax=p.absmax_scale)
    with pytest.raises(ValueError, match="nested_blocksize=128"):
        nf4.from_bnb(p.qweight, p.absmax, (10, 100), 32, nested_absmax=p.absmax_scale,
                     nested_code=p.absmax_code, offset=p.absmax_offset, nested_blocksize=128)
    with pytest.raises(ValueError, match="qweight must have shape"):
        nf4.from_bnb(p.qweight, p.absmax, (10, 99), 32, nested_absmax=p.absmax_scale,
                     nested_code=p.absmax_code, offset=p.absmax_offset)
    with pytest.raises(TypeError, match="p must be an NF4Weight"):
        nf4.to_bnb_state_dict(p.qweight)
