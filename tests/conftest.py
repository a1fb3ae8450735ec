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
