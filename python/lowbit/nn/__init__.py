"""Modules: quantized ``Linear``, the BitNet ``BitLinear`` training layer, a quantized KV
cache, and ``quantize_model`` to swap a model's ``nn.Linear`` layers.

    lin = lowbit.Linear.from_linear(torch_linear, "int4", group_size=128)
    model = lowbit.quantize_model(model, "nf4", skip=["lm_head"])
    cache = lowbit.QuantizedKVCache(bits=8); cache.append(k, v); out = cache.attend(q)
"""

from ._layouts import LAYOUTS
from .bitlinear import BitLinear, ternarize
from .kv_cache import QuantizedKVCache
from .linear import Linear
from .quantize_model import quantize_model

#: weight formats ``lowbit.Linear`` and ``quantize_model`` accept
FORMATS: tuple[str, ...] = tuple(LAYOUTS)

__all__ = ["FORMATS", "BitLinear", "Linear", "QuantizedKVCache", "quantize_model", "ternarize"]
