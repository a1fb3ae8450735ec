"""Adaptive attention span (Sukhbaatar et al. 2019, arXiv 1905.07799): soft mask, loss, trimming.

Each head h learns z_h in [0, 1]; its span is z_h * S. The soft mask over the distance
delta = t - j (1 <= delta <= S) of a key from its query is

    m_h(delta) = clamp((z_h * S - (delta - 1)) / R + 1, 0, 1)

(delta - 1, as the original code, where the paper writes delta). Keys that every head of a layer
masks to 0 are trimmed before the scores are computed, in multiples of 64 (DESIGN §2.7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

TRIM_MULTIPLE = 64
"""Trimming and the adaptive cache work in blocks of this many positions (as the original)."""


class AdaptiveSpan(nn.Module):
    """The span parameters z (one per head) of one layer and everything derived from them."""

    def __init__(self, n_heads: int, attn_span: int, ramp: int, init: float) -> None:
        super().__init__()
        self.attn_span = attn_span
        self.ramp = ramp
        self.z = nn.Parameter(torch.full((n_heads,), float(init)))

    def mask(self, length: int) -> Tensor:
        """Soft mask for distances 1..length, shape (H, length); column i is distance i + 1."""
        z: Tensor = self.z
        if z.dtype in (torch.float16, torch.bfloat16):
            z = z.float()  # S * z needs more than 8 bits of mantissa
        distance_minus_one = torch.arange(length, device=z.device, dtype=z.dtype)
        unclamped = (z[:, None] * self.attn_span - distance_minus_one) / self.ramp + 1
        # torch.clamp passes the gradient at both bounds, so keys whose mask is exactly 0 still
        # contribute to dL/dz (DESIGN §2.4); keep the multiplicative form that relies on this.
        return unclamped.clamp(0, 1)

    def _ceil_span(self, z: float) -> int:
        # z is a Python float (float64) from a float32 parameter, as in the original: in float32
        # the ceil can differ (z = 0.3, S = 320 gives 97 in float64, 96 in float32).
        return max(0, min(self.attn_span, math.ceil(z * self.attn_span) + self.ramp))

    def max_span(self) -> int:
        """Current maximum span of the layer: ceil(max_h z_h * S) + R, clipped to [0, S]."""
        return self._ceil_span(self.z.detach().max().item())

    def avg_span(self) -> int:
        """ceil(mean_h z_h * S) + R, clipped to [0, S] (the 'average span' the original logs)."""
        return self._ceil_span(self.z.detach().mean().item())

    def trim_length(self) -> int:
        """Farthest positions that every head masks to zero, rounded down to a multiple of 64."""
        span = self.attn_span
        trim = min(span - 1, span - self.max_span())
        return trim // TRIM_MULTIPLE * TRIM_MULTIPLE

    def cache_size(self) -> int:
        """Rows of cache the layer needs with the adaptive cache: min(S, S - trim + 64)."""
        return min(self.attn_span, self.attn_span - self.trim_length() + TRIM_MULTIPLE)

    def loss(self) -> Tensor:
        """S * mean_h(z_h); the caller multiplies by span_loss_coef."""
        return self.attn_span * self.z.mean()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep z in [0, 1]; call after every optimiser step."""
        self.z.clamp_(0, 1)

    def extra_repr(self) -> str:
        return f"n_heads={self.z.numel()}, attn_span={self.attn_span}, ramp={self.ramp}"
