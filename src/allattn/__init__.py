"""allattn: All-attention networks with persistent memory (Sukhbaatar et al., arXiv 1907.01470)."""

__version__ = "0.1.0"  # before the imports: submodules read it

from . import checkpoint
from .adaptive_span import AdaptiveSpan
from .attention import attend
from .config import ConfigError, ModelConfig
from .model import AllAttentionLayer, AllAttentionLM, LMOutput
from .persistent_memory import PersistentMemory

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
