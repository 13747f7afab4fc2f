"""Which backend runs an op: the one dispatch rule of lowbit, in one place.

For each op and device: the native kernel if this build has one for the device, dtype and
shape; else the Triton kernel (GPUs); else the pure-PyTorch reference, with a one-time
warning naming what is missing. ``LOWBIT_BACKEND=reference|triton|native`` forces one
(an error if it cannot run the call), for tests and benchmarks.

A backend module provides, per op name ``op``, a function ``op(*args)`` and optionally a
predicate ``supports_op(*args) -> bool`` (absent means: takes every valid call).
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from types import ModuleType

from . import reference

BACKEND_NAMES = ("native", "triton", "reference")
OPS = tuple(reference.KERNELS)
ENV_VAR = "LOWBIT_BACKEND"

# Native backend module per torch device type; imported lazily so that a missing or
# broken native build never breaks `import lowbit`.
_NATIVE_MODULES = {"cpu": "cpu", "cuda": "cuda", "mps": "mps"}
_loaded: dict[str, ModuleType | None] = {}
_warned: set[tuple[str, str]] = set()


def _module(name: str) -> ModuleType | None:
    """Import ``lowbit.backends.<name>`` once; None if it does not exist or cannot load."""
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"{__name__}.{name}")
        except ImportError:
            _loaded[name] = None
    return _loaded[name]


def _backend_module(backend: str, device_type: str) -> ModuleType | None:
    if backend == "reference":
        return reference
    if backend == "native":
        mod_name = _NATIVE_MODULES.get(device_type)
        return _module(mod_name) if mod_name else None
    if backend == "triton":
        mod = _module("triton")
        return mod if mod is not None and mod.available(device_type) else None
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")


def _kernel(backend: str, op: str, device_type: str, args: tuple) -> Callable | None:
    """The kernel ``backend`` would run for this call, or None if it cannot run it."""
    mod = _backend_module(backend, device_type)
    if mod is None:
        return None
    fn = getattr(mod, op, None)
    if fn is None:
        return None
    supports = getattr(mod, f"supports_{op}", None)
    if supports is not None and not supports(*args):
        return None
    return fn


def forced_backend() -> str | None:
    """The backend named by ``LOWBIT_BACKEND``, or None when unset."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if not forced:
        return None
    if forced not in BACKEND_NAMES:
        raise ValueError(f"{ENV_VAR}={forced!r} is not one of {', '.join(BACKEND_NAMES)}")
    return forced


# (op, device type) -> [(backend, kernel, supports predicate or None)] for the unforced rule:
# the modules and attributes are looked up once, not at every call.
_candidates: dict[tuple[str, str], list[tuple[str, Callable, Callable | None]]] = {}


def _candidates_for(op: str, device_type: str) -> list[tuple[str, Callable, Callable | None]]:
    key = (op, device_type)
    found = _candidates.get(key)
    if found is None:
        found = []
        for backend in ("native", "triton"):
            mod = _backend_module(backend, device_type)
            fn = None if mod is None else getattr(mod, op, None)
            if fn is not None:
                found.append((backend, fn, getattr(mod, f"supports_{op}", None)))
        _candidates[key] = found
    return found


def select(op: str, device_type: str, args: tuple) -> tuple[str, Callable]:
    """Return ``(backend name, kernel)`` for one call of ``op`` on ``device_type``."""
    forced = forced_backend() if ENV_VAR in os.environ else None
    if forced is not None:
        fn = _kernel(forced, op, device_type, args)
        if fn is None:
            raise RuntimeError(
                f"{ENV_VAR}={forced} but the {forced} backend has no {op} kernel for this call on "
                f"{device_type} (see lowbit.info())"
            )
        return forced, fn
    for backend, fn, supports in _candidates_for(op, device_type):
        if supports is None or supports(*args):
            return backend, fn
    if (op, device_type) not in _warned:
        _warned.add((op, device_type))
        warnings.warn(
            f"lowbit: no native or Triton {op} kernel for this call on {device_type}; "
            "running the slow PyTorch reference (lowbit.info() lists what this build has)",
            RuntimeWarning,
            stacklevel=4,
        )
    return "reference", reference.KERNELS[op]


def run(op: str, device_type: str, *args):
    """Run ``op`` with the selected backend."""
    return select(op, device_type, args)[1](*args)


def plan(op: str, device_type: str, args: tuple) -> Callable | None:
    """A prepared ``x -> op(x, *args[1:])`` for repeated eager calls that differ only in ``x``'s
    values and leading dimensions, from the selected backend's ``plan_<op>`` (None if it has
    none or declines). The caller re-plans whenever anything else may have changed."""
    backend, _ = select(op, device_type, args)
    mod = _backend_module(backend, device_type)
    maker = None if mod is None else getattr(mod, f"plan_{op}", None)
    return None if maker is None else maker(*args)


def availability(device_type: str) -> dict[str, list[str]]:
    """For each op, the backends that have a kernel for it on ``device_type`` (any shape)."""
    out: dict[str, list[str]] = {}
    for op in OPS:
        names = []
        for backend in BACKEND_NAMES:
            mod = _backend_module(backend, device_type)
            if mod is not None and getattr(mod, op, None) is not None:
                names.append(backend)
        out[op] = names
    return out
