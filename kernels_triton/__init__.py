"""Triton kernels of lowbit (installed as ``lowbit.kernels_triton``): the GPU fallback.

They serve every GPU without a native lowbit kernel (NVIDIA, and AMD/Intel GPUs where Triton
runs) and run on CPU tensors only in Triton's interpreter (``TRITON_INTERPRET=1``, tests).
Importing this package raises ImportError when Triton is not installed; the dispatcher
(``lowbit.backends``) then falls through to the reference.

One module per op family (``int4``, ``nf4``, ``ternary``, ``sparse24``, ``kv_attention``) plus
``_common`` (configurations, the per-shape choice cache, split-K). The kernels read the
checkpoint layouts of ``lowbit.formats`` directly; the only cached derived data are tiny
per-device lookup tables (NF4 code pairs), never a repacked weight.
"""

from __future__ import annotations

import triton  # noqa: F401  (ImportError here means: no Triton backend)

from ._common import CACHES, INTERPRET, Config


def chosen_configs() -> dict[str, dict[tuple, str]]:
    """For each op family, the configuration chosen per shape key so far (for reports)."""
    return {name: {k: str(v) for k, v in c.chosen().items()} for name, c in CACHES.items()}


__all__ = ["CACHES", "INTERPRET", "Config", "chosen_configs"]
