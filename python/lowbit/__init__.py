"""lowbit: native low-bit kernels for PyTorch.

>>> import torch, lowbit
>>> lin = lowbit.Linear.from_linear(torch.nn.Linear(256, 128), "int4", group_size=64)
>>> y = lin(torch.randn(4, 256))
>>> print(lowbit.info())  # doctest: +SKIP

Formats: ``int4`` (group-wise, GPTQ/AWQ loadable), ``nf4`` (bitsandbytes layout),
``ternary`` (BitNet b1.58), ``sparse24`` (2:4), and int8/int4 KV caches. Ops live in
``torch.ops.lowbit`` (wrappers in :mod:`lowbit.ops`).
"""

from __future__ import annotations

from . import formats, ops
from ._version import __version__
from .info import info
from .nn import BitLinear, Linear, QuantizedKVCache, quantize_model

__all__ = [
    "BitLinear",
    "Linear",
    "QuantizedKVCache",
    "__version__",
    "formats",
    "info",
    "ops",
    "quantize_model",
]
