"""Persistent memory (arXiv 1907.01470, §4): learned key/value vectors for every head.

Every head has N input-independent key/value pairs that are appended to the context and share
its softmax. They are stored reparametrised: `key` (H, D, N) ~ N(0, 1/D) and `val` (H, N, D) ~
N(0, 1/N), used multiplied by sqrt(D) and sqrt(N), so the effective vectors start at unit
variance. The reparametrisation changes the effective learning rate and is part of the model.

The all-attention layer reads them in one softmax with the context (`attention.attend`'s
mem_key/mem_val). The other ways of integrating them that the paper compares (Fig. 2, right;
DESIGN §2.9, `ModelConfig.memory_mode`) read them with a softmax of their own: `read`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PersistentMemory(nn.Module):
    """N persistent key/value vectors for each of H heads of width D (2 * H * N * D parameters)."""

    def __init__(self, n_heads: int, head_dim: int, size: int) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.randn(n_heads, head_dim, size) / math.sqrt(head_dim))
        self.val = nn.Parameter(torch.randn(n_heads, size, head_dim) / math.sqrt(size))

    @property
    def size(self) -> int:
        return self.val.size(1)

    def keys(self) -> Tensor:
        """Effective persistent keys, (H, N, D)."""
        return self.key.transpose(1, 2) * math.sqrt(self.key.size(1))

    def values(self) -> Tensor:
        """Effective persistent values, (H, N, D)."""
        return self.val * math.sqrt(self.size)

    def extra_repr(self) -> str:
        n_heads, head_dim, size = self.key.shape
        return f"n_heads={n_heads}, head_dim={head_dim}, size={size}"


def read(q: Tensor, keys: Tensor, values: Tensor, *, dropout: float, training: bool) -> Tensor:
    """Persistent vectors read with their own softmax: softmax(q . m_k / sqrt(D)) m_v.

    q: (B, H, M, D) queries; keys, values: (H, N, D) effective persistent vectors (H = 1 for
    the single-head mode's one full-width memory). Dropout on the weights as on the joint
    softmax's (kept weights scaled by 1 / (1 - dropout)); the softmax in float32 under
    autocast. Returns (B, H, M, D).
    """
    scores = (q @ keys.transpose(-1, -2).to(q.dtype)) / math.sqrt(q.size(-1))  # (B, H, M, N)
    low_precision = scores.dtype in (torch.float16, torch.bfloat16)
    weights = scores.softmax(-1, dtype=torch.float32 if low_precision else None)
    weights = F.dropout(weights.to(q.dtype), dropout, training=training)
    return weights @ values.to(q.dtype)
