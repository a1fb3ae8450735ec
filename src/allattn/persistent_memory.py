"""Persistent memory (arXiv 1907.01470, §4): learned key/value vectors for every head.

Every head has N input-independent key/value pairs that are appended to the context and share
its softmax. They are stored reparametrised: `key` (H, D, N) ~ N(0, 1/D) and `val` (H, N, D) ~
N(0, 1/N), used multiplied by sqrt(D) and sqrt(N), so the effective vectors start at unit
variance. The reparametrisation changes the effective learning rate and is part of the model.
"""

from __future__ import annotations

import math

import torch
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
