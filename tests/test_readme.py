"""The README's library example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    namespace: dict = {}
    exec(blocks[0], namespace)
    h, cache = namespace["h"], namespace["cache"]
    assert h.shape == (2, 32, 128) and cache.shape[0] == 2
    assert namespace["out"].loss.ndim == 0
