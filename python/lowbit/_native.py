"""The native module ``lowbit._C``, loaded once; its absence never breaks ``import lowbit``.

``C`` is the module itself, or a stand-in whose every attribute access raises a
``RuntimeError`` that names the original import error. Ask :func:`available` (or
:func:`has` for one function) before using it.
"""

from __future__ import annotations

from types import ModuleType


class _Missing:
    """Stand-in for a native module that failed to import."""

    def __init__(self, error: str) -> None:
        self._error = error

    def __getattr__(self, name: str):
        raise RuntimeError(
            f"lowbit native module lowbit._C is not available, so {name!r} cannot be used "
            f"(import failed: {self._error}); reinstall lowbit, or use LOWBIT_BACKEND=reference"
        )

    def __repr__(self) -> str:
        return f"<lowbit._C unavailable: {self._error}>"


_error: str | None
C: ModuleType | _Missing
try:
    from . import _C as _module
except Exception as e:  # ImportError, or an OSError from the dynamic loader
    _error = f"{type(e).__name__}: {e}"
    C = _Missing(_error)
else:
    _error = None
    C = _module


def available() -> bool:
    """True if ``lowbit._C`` was imported."""
    return _error is None


def load_error() -> str | None:
    """Why ``lowbit._C`` could not be imported, or None if it was."""
    return _error


def has(name: str) -> bool:
    """True if the native module is loaded and defines ``name`` (e.g. ``"int4_matmul_cuda"``)."""
    return _error is None and hasattr(C, name)
