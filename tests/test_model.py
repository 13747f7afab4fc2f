"""Whole-model behaviour: a quantized transformer block stays close to the float one,
BitLinear training converts to ternary inference exactly, QuantizedKVCache attends like
dense attention over the dequantized cache, and all of it compiles with fullgraph=True."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import lowbit
from lowbit import BitLinear, Linear, QuantizedKVCache, quantize_model

#: Relative error of the quantized block's output against the float block, per format
#: measured on the residual update of a random block (hidden 256, weights ~ N(0, 0.02), seed 0):
#: int4 g64 0.117, nf4 b64 0.113, sparse24 0.419 (2:4 magnitude pruning of a weight that was
#: never trained sparse drops half its entries: pruning, not packing, is the cost there).
BLOCK_RTOL = {"int4": 0.15, "nf4": 0.15, "sparse24": 0.5}
BLOCK_OPTS = {"int4": {"group_size": 64}, "nf4": {"blocksize": 64}, "sparse24": {}}


class Block(nn.Module):
    """A pre-norm transformer block: causal self-attention (GQA) and a gated MLP."""

    def __init__(self, dim: int = 256, heads: int = 8, kv_heads: int = 2, hidden: int = 512) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, s, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        rep = self.heads // self.kv_heads
        a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def _delta(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's residual update (its output minus its input): what quantization perturbs."""
    return block(x) - x


@pytest.mark.parametrize("fmt", sorted(BLOCK_RTOL))
def test_quantized_block_is_close_to_float(fmt):
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 16, 256)
    with torch.no_grad():
        ref = _delta(block, x)
        qblock = quantize_model(copy.deepcopy(block), fmt, **BLOCK_OPTS[fmt])
        assert sum(isinstance(m, Linear) for m in qblock.modules()) == 6
        assert not any(type(m) is nn.Linear for m in qblock.modules())
        err = rel_err(_delta(qblock, x), ref)
    assert err < BLOCK_RTOL[fmt], f"{fmt}: relative error {err:.3f} of the block's update"


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_quantized_block_in_bfloat16(fmt):
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(1, 8, 256)
    with torch.no_grad():
        ref = _delta(block, x)
        qblock = quantize_model(copy.deepcopy(block), fmt, **BLOCK_OPTS[fmt]).to(torch.bfloat16)
        out = _delta(qblock, x.bfloat16()).float()
    assert out.dtype == torch.float32 and rel_err(out, ref) < BLOCK_RTOL[fmt] + 0.05


@pytest.mark.parametrize("fmt", ["int4", "nf4", "ternary", "sparse24"])
def test_quantized_block_compiles_fullgraph(fmt):
    torch.manual_seed(0)
    opts = BLOCK_OPTS.get(fmt, {})
    qblock = quantize_model(Block(dim=64, heads=4, kv_heads=2, hidden=128).eval(), fmt, **opts)
    x = torch.randn(1, 4, 64)
    compiled = torch.compile(qblock, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert rel_err(compiled(x), qblock(x)) < 1e-6


def test_bitlinear_trains_and_converts_to_the_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(BitLinear(32, 64, bias=True), nn.ReLU(), BitLinear(64, 8, per_row=True))
    x, target = torch.randn(64, 32), torch.randn(64, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]  # the straight-through estimator lets the float weights learn

    with torch.no_grad():
        ref = model(x)
        frozen = quantize_model(copy.deepcopy(model), "ternary")
        assert all(isinstance(frozen[i], Linear) and frozen[i].fmt == "ternary" for i in (0, 2))
        assert frozen[2].per_row and not frozen[0].per_row
        out = frozen(x)
    assert rel_err(out, ref) < 1e-5


def test_bitlinear_to_lowbit_bfloat16_input():
    torch.manual_seed(1)
    layer = BitLinear(64, 16)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = layer(x)
        out = layer.to_lowbit()(x)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1.6e-2


# ---------------------------------------------------------------------------------------------
# QuantizedKVCache


def _dense_attention(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q.float(), k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=False,
        attn_mask=_causal_mask(q.shape[2], k.shape[2]) if causal else None,
    )


def _causal_mask(s_q: int, s_k: int) -> torch.Tensor:
    """Bottom-right aligned: query i sees keys 0 .. s_k - s_q + i."""
    return torch.ones(s_q, s_k, dtype=torch.bool).tril(diagonal=s_k - s_q)


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_cache_prefill_then_decode_matches_dense_attention(bits):
    torch.manual_seed(0)
    b, hq, hkv, d = 2, 8, 2, 64
    cache = QuantizedKVCache(bits=bits)
    k_all, v_all = torch.randn(b, hkv, 21, d), torch.randn(b, hkv, 21, d)
    q = torch.randn(b, hq, 13, d)
    cache.append(k_all[:, :, :13], v_all[:, :, :13])
    out = cache.attend(q, causal=True)
    k_deq, v_deq = cache.dequantize()
    assert rel_err(out, _dense_attention(q, k_deq, v_deq, True)) < 1e-5
    # and close to attention over the float cache (the quantization error only)
    assert rel_err(out, _dense_attention(q, k_all[:, :, :13], v_all[:, :, :13], True)) < (0.02 if bits == 8 else 0.15)
    for t in range(13, 21):  # decode one token at a time, the storage growing as it goes
        cache.append(k_all[:, :, t : t + 1], v_all[:, :, t : t + 1])
        q1 = torch.randn(b, hq, 1, d)
        out = cache.attend(q1)
        k_deq, v_deq = cache.dequantize()
        assert rel_err(out, _dense_attention(q1, k_deq, v_deq, False)) < 1e-5
    assert len(cache) == 21 and cache.capacity >= 21


def test_kv_cache_static_capacity_and_reset():
    cache = QuantizedKVCache(bits=8, max_seq_len=8)
    k = torch.randn(1, 2, 5, 32)
    cache.append(k, k)
    storage = cache.quantized()["k_data"].untyped_storage().data_ptr()
    cache.append(k[:, :, :3], k[:, :, :3])
    assert cache.capacity == 8 and cache.quantized()["k_data"].untyped_storage().data_ptr() == storage
    with pytest.raises(ValueError, match="exceeds max_seq_len=8"):
        cache.append(k[:, :, :1], k[:, :, :1])
    cache.reset()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="the cache is empty"):
        cache.attend(torch.randn(1, 2, 1, 32))
    cache.append(torch.randn(3, 4, 2, 64), torch.randn(3, 4, 2, 64))  # new shape after reset
    assert cache.attend(torch.randn(3, 8, 1, 64)).shape == (3, 8, 1, 64)


def test_kv_cache_bad_inputs():
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        QuantizedKVCache(bits=3)
    with pytest.raises(TypeError, match="bits must be an int"):
        QuantizedKVCache(bits=8.0)
    cache = QuantizedKVCache(bits=4)
    with pytest.raises(ValueError, match="head_dim divisible by 32"):
        cache.append(torch.randn(1, 2, 3, 48), torch.randn(1, 2, 3, 48))
    with pytest.raises(ValueError, match="same shape"):
        cache.append(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 4, 64))
    cache.append(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64))
    with pytest.raises(ValueError, match="the cache holds"):
        cache.append(torch.randn(1, 4, 1, 64), torch.randn(1, 4, 1, 64))
    with pytest.raises(ValueError, match="multiple of the cache's kv heads"):
        cache.attend(torch.randn(1, 3, 1, 64))
    with pytest.raises(ValueError, match=r"q must have shape \[B=1"):
        cache.attend(torch.randn(2, 2, 1, 64))
    # NaN keys are not checked on this hot path (that would sync the device every step); they
    # propagate to the output, so the answer is visibly NaN, never silently wrong.
    cache.append(torch.full((1, 2, 1, 64), float("nan")), torch.randn(1, 2, 1, 64))
    assert cache.attend(torch.randn(1, 2, 1, 64)).isnan().all()


def test_kv_cache_decode_step_compiles_fullgraph():
    cache = QuantizedKVCache(bits=8, max_seq_len=32)
    cache.append(torch.randn(1, 2, 7, 64), torch.randn(1, 2, 7, 64))
    p = cache.quantized()
    q = torch.randn(1, 4, 1, 64)

    def step(q):
        return lowbit.ops.kv_attention(q, p["k_data"], p["k_scale"], None, p["v_data"], p["v_scale"], None)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert rel_err(compiled(q), cache.attend(q)) < 1e-6
