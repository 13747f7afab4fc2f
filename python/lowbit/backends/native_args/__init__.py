"""Tensors -> the plain integers the native module takes (pointers, sizes, strides, dtype codes).

Shared by the native backends (cpu.py, cuda.py). The op layer has validated the call
already; these helpers still check every size that a pointer's buffer must have, because
the C++ side only sees addresses and cannot. One module per op; this package re-exports
their public names.
"""

from ._common import (
    DTYPE_CODES,
    NATIVE_DTYPES,
    dtype_code,
    rows_with_unit_stride,
    unit_inner,
)
from .int4 import Int4Call, int4_supported, prepare_int4
from .kv import KvAttentionCall, kv_attention_supported, prepare_kv_attention
from .nf4 import Nf4Call, nf4_supported, prepare_nf4
from .sparse24 import Sparse24Call, prepare_sparse24, sparse24_supported
from .ternary import TERNARY_MAX_K, TernaryCall, prepare_ternary, ternary_supported

__all__ = [
    "DTYPE_CODES", "NATIVE_DTYPES", "dtype_code", "rows_with_unit_stride", "unit_inner",
    "Int4Call", "int4_supported", "prepare_int4",
    "KvAttentionCall", "kv_attention_supported", "prepare_kv_attention",
    "Nf4Call", "nf4_supported", "prepare_nf4",
    "Sparse24Call", "prepare_sparse24", "sparse24_supported",
    "TERNARY_MAX_K", "TernaryCall", "prepare_ternary", "ternary_supported",
]
