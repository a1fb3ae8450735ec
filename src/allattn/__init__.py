"""allattn: All-attention networks with persistent memory (Sukhbaatar et al., arXiv 1907.01470).

The names below are imported on first use, so `import allattn` (and the command line's entry
point, which installs its signal handling first) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_NAMES = {
    "AdaptiveSpan": "adaptive_span",
    "AllAttentionLM": "model",
    "AllAttentionLayer": "model",
    "ConfigError": "config",
    "LMOutput": "model",
    "ModelConfig": "config",
    "PersistentMemory": "persistent_memory",
    "attend": "attention",
}

if TYPE_CHECKING:
    from . import checkpoint
    from .adaptive_span import AdaptiveSpan
    from .attention import attend
    from .config import ConfigError, ModelConfig
    from .model import AllAttentionLayer, AllAttentionLM, LMOutput
    from .persistent_memory import PersistentMemory


def __getattr__(name: str) -> Any:
    if name == "checkpoint":
        return importlib.import_module(".checkpoint", __name__)
    if name in _NAMES:
        return getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'allattn' has no attribute {name!r}")


__all__ = [
    "AdaptiveSpan",
    "AllAttentionLM",
    "AllAttentionLayer",
    "ConfigError",
    "LMOutput",
    "ModelConfig",
    "PersistentMemory",
    "__version__",
    "attend",
    "checkpoint",
]
