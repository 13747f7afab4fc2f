"""The README's quickstart runs as written."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # reference fallbacks on this machine
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)
    assert namespace["y"].shape == (2, 4096) and namespace["out"].shape == (1, 32, 1, 128)
