import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the reference module
# What every command sets on the CPU (`--runtime.flush_denormal`, process-wide): the same for
# every test, whichever ran first.
torch.set_flush_denormal(True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def hide_package(monkeypatch):
    """hide_package("name"): importing the package (or a submodule) raises ImportError, as
    where an optional extra is not installed."""
    import builtins

    real_import = builtins.__import__

    def hide(package: str) -> None:
        def fake_import(name, *args, **kwargs):
            if name == package or name.startswith(package + "."):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", fake_import)

    return hide
