"""The all-attention function as a FlexAttention call (`--runtime.attn_impl flex`, opt-in).

FlexAttention (torch.nn.attention.flex_attention) generates one fused kernel from a score
modification and a block mask. Here the keys are the L + M context rows followed by the N
persistent slots; the block mask lets query i see context rows i .. i + L - 1 (distances
L .. 1) and every persistent slot; the score modification adds, at context keys, the position
term q . p_delta / sqrt(D) from a captured (B, H, M, L) tensor and log m(delta), the log of the
span mask (-inf where m = 0). softmax(s + log m) = a m / sum_j a_j m_j is the joint
renormalisation without its + eps.

Where it differs from `chunked` and `reference` (DESIGN §2.4), and why it is opt-in:
  - forward: the renormalisation has no + renorm_eps, a relative difference of
    eps / sum_j a_j m_j, small for random inputs but not always in a trained model, whose
    softmax may put nearly all its mass beyond the span (a 2,000-step `tiny` model: 2.3451
    valid bpc against 2.3415); with `renorm_eps` 0 the two are equal up to rounding;
  - backward: keys whose mask is exactly 0 give the span parameter no gradient (the original
    gives them a_j (g_j - sum_i w_i g_i) / Z); without adaptive span there is no difference;
  - no attention dropout (FlexAttention has none): refused when training with dropout > 0;
  - PyTorch runs its backward on CUDA only, and is fast only compiled (used compiled on CUDA,
    eagerly elsewhere, where it is a slow reference for checks).
"""

from __future__ import annotations

import math
import warnings
from functools import cache, lru_cache

import torch
from torch import Tensor

from .config import ConfigError, RunConfig


def require_trainable(config: RunConfig, device: torch.device) -> None:
    """Refuse, before a training run or benchmark touches anything, a run of `config` with the
    flex kernel where it cannot train (nothing to refuse with another kernel)."""
    if config.runtime.attn_impl == "flex":
        require(device, training=True, dropout=config.model.dropout)


def require(device: torch.device, *, training: bool, dropout: float) -> None:
    """Refuse what the FlexAttention formulation cannot run, in one line."""
    if training and dropout > 0:
        raise ConfigError(
            f"--runtime.attn_impl flex has no attention dropout (--model.dropout {dropout}): "
            "train with dropout 0, or use chunked"
        )
    if training and device.type != "cuda":
        raise ConfigError(
            "--runtime.attn_impl flex trains on CUDA only (PyTorch's FlexAttention has no "
            f"backward on {device.type}); use chunked"
        )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    span_mask: Tensor | None,
    mem_key: Tensor | None,
    mem_val: Tensor | None,
) -> Tensor:
    """`attention.attend` without the + eps of the renormalisation (shapes as there)."""
    batch, _, n_queries, head_dim = q.shape
    n_context = k.size(2) - n_queries
    n_rows = n_context + n_queries
    scale = 1.0 / math.sqrt(head_dim)
    position = (q @ pos.transpose(0, 1)) * scale  # (B, H, M, L), by distance
    log_mask = None
    if span_mask is not None:  # log m, -inf at m = 0 (where: no gradient through log 0)
        tiny = torch.finfo(span_mask.dtype).tiny
        log_mask = torch.where(span_mask > 0, span_mask.clamp_min(tiny).log(), -math.inf)
    if mem_key is not None and mem_val is not None:
        slots = (batch, -1, -1, -1)
        k = torch.cat([k, mem_key.to(k.dtype).expand(*slots)], dim=2)  # (B, H, L+M+N, D)
        v = torch.cat([v, mem_val.to(v.dtype).expand(*slots)], dim=2)

    def score_mod(score, b, h, i, j):
        distance = (n_context + i - j - 1).clamp(0, n_context - 1)  # delta - 1 (in range)
        bias = position[b, h, i, distance]
        if log_mask is not None:
            bias = bias + log_mask[h, distance]
        return torch.where(j < n_rows, score + bias, score)

    blocks = _block_mask(n_queries, n_context, k.size(2), q.device)
    return _flex(q.device.type)(q, k, v, score_mod=score_mod, block_mask=blocks, scale=scale)


@lru_cache(maxsize=64)
def _block_mask(n_queries: int, n_context: int, n_keys: int, device: torch.device):
    """The visible keys: query i sees context rows i .. i + L - 1 and every persistent slot
    (rows from L + M on). It depends on the shapes only, so the layers and blocks of one
    shape share one (building it evaluates the mask over all blocks); the spans' context
    lengths change in training, hence a bounded cache."""
    from torch.nn.attention.flex_attention import create_block_mask

    n_rows = n_context + n_queries

    def mask_mod(b, h, i, j):
        return (j >= n_rows) | ((j >= i) & (j < i + n_context))

    return create_block_mask(mask_mod, None, None, n_queries, n_keys, device=device)


@cache
def _flex(device_type: str):
    """flex_attention, compiled on CUDA (its fused kernels), eager elsewhere: there it
    materialises every score, a slow check (PyTorch's warning about that is expected here)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type == "cuda":
        return torch.compile(flex_attention)

    def eager(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
            return flex_attention(*args, **kwargs)

    return eager
