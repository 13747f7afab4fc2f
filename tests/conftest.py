"""Shared test set-up: devices present, backends to test, CUDA-only tests deselected off GPUs."""

from __future__ import annotations

import pytest
import torch

import lowbit  # noqa: F401  (registers torch.ops.lowbit.*)

HAS_CUDA = torch.cuda.is_available()

#: Devices this machine can run tests on.
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def pytest_collection_modifyitems(config, items):
    """Without a GPU, CUDA tests are deselected (reported as such), not skipped one by one."""
    if HAS_CUDA:
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("cuda") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


#: Relative tolerance of a kernel against the reference, per activation dtype.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
