"""``lowbit.info()``: what this build and this machine can run, and which backend runs what."""

from __future__ import annotations

import importlib.util

import torch

from . import _native, backends
from ._version import __version__


class Info(dict):
    """A dict of facts about the installation that prints as a readable report."""

    def __str__(self) -> str:
        lines = [f"lowbit {self['version']} (torch {self['torch']})"]
        native = self["native"]
        if native["loaded"]:
            b = native["build"]
            lines.append(f"native module: loaded ({b.get('compiler', '?')})")
            cuda = f"CUDA {b.get('cuda_version')} archs {', '.join(b.get('cuda_archs', []))}" if b.get("cuda") else "no"
            lines.append(f"  CUDA kernels: {cuda}")
            lines.append(f"  Metal kernels: {'yes' if b.get('metal') else 'no'}")
            feats = [k for k, v in native["cpu_features"].items() if v]
            lines.append(f"  CPU features found at run time: {', '.join(feats) or 'none'}")
            isa = native["cpu_isa"]
            lines.append(f"  CPU kernel instruction sets: compiled {', '.join(isa['compiled'])}; "
                         f"this CPU runs {', '.join(isa['supported'])}; selected {isa['selected']}")
        else:
            lines.append(f"native module: NOT loaded ({native['error']})")
        lines.append(f"triton: {self['triton'] or 'not installed'}")
        if self["forced_backend"]:
            lines.append(f"{backends.ENV_VAR}={self['forced_backend']} (forced)")
        for device, ops in self["ops"].items():
            lines.append(f"ops on {device} (first backend that has a kernel runs):")
            for op, names in ops.items():
                lines.append(f"  {op:<16} {' > '.join(names)}")
        return "\n".join(lines)


def _devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def info() -> Info:
    """Version, the native build (compiler, CUDA archs, Metal), CPU features found at run
    time, the CPU kernels' instruction sets (compiled, supported, selected), Triton, and for each op and device the backends that have a kernel for it, in the
    order the dispatcher tries them."""
    native: dict = {"loaded": _native.available(), "error": _native.load_error()}
    if native["loaded"]:
        native["build"] = dict(_native.C.build_info())
        native["cpu_features"] = dict(_native.C.cpu_features())
        native["cpu_isa"] = dict(_native.C.cpu_isa())
        try:
            native["cpu_isa"]["selected"] = _native.C.selected_cpu_isa()
        except ValueError as e:  # a bad LOWBIT_CPU_ISA must not break info()
            native["cpu_isa"]["selected"] = f"invalid: {e}"
    triton_version = None
    if importlib.util.find_spec("triton") is not None:
        try:
            import triton

            triton_version = triton.__version__
        except Exception as e:  # a broken triton install must not break info()
            triton_version = f"installed but failed to import: {e}"
    try:
        forced = backends.forced_backend()
    except ValueError as e:
        forced = f"invalid: {e}"
    return Info(
        version=__version__,
        torch=torch.__version__,
        native=native,
        triton=triton_version,
        forced_backend=forced,
        ops={d: backends.availability(d) for d in _devices()},
    )
