"""The all-attention kernel (arXiv 1907.01470 §4, on arXiv 1905.07799 and 1901.02860).

Notation (used in every shape comment of this package):
    B  batch (parallel streams)        M  block length (queries per call)
    S  maximum attention span          L  context rows kept before the block (S - trim)
    C  rows in a layer's cache         H  heads, D head width (d_model = H * D)
    N  persistent vectors per head     V  vocabulary

The query at block position i sits at context row L + i and attends to the L rows before it,
at distances delta = 1..L, but not to itself; then to the N persistent slots. Context score:
(q.k + q.p_delta) / sqrt(D) with one relative-position table p shared by all heads and layers.
Persistent score: q.m_k / sqrt(D). One softmax over the L + N scores; the span mask multiplies
the context weights and all L + N weights are renormalised together (DESIGN §2.2-2.4).

This is the dense implementation (one score matrix over all context rows, then a gather of each
query's band), the straightforward yardstick that faster paths are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def band_index(n_queries: int, n_context: int, device: torch.device) -> Tensor:
    """Context row seen by query i at distance delta: L + i - delta, shape (M, L), by distance."""
    queries = torch.arange(n_queries, device=device)[:, None]
    distance = torch.arange(1, n_context + 1, device=device)[None, :]
    return n_context + queries - distance


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pos: Tensor,
    *,
    span_mask: Tensor | None = None,
    mem_key: Tensor | None = None,
    mem_val: Tensor | None = None,
    renorm_eps: float = 1e-8,
    dropout: float = 0.0,
    training: bool = False,
) -> Tensor:
    """All-attention for one block.

    Args:
        q: queries of the block, (B, H, M, D).
        k, v: keys and values of the context, L cached rows then the M block rows, (B, H, L+M, D).
        pos: relative position vectors by distance, row delta - 1 = p_delta, (L, D).
        span_mask: soft span mask by distance, (H, L); None = adaptive span off.
        mem_key, mem_val: effective persistent keys/values, (H, N, D); None = no memory.
        renorm_eps: the epsilon of the joint renormalisation (the original's 1e-8).
        dropout: attention-weight dropout rate, applied only when `training`.

    Returns:
        The heads' outputs, (B, H, M, D).
    """
    batch, n_heads, n_queries, head_dim = q.shape
    n_context = k.size(2) - n_queries
    scale = 1.0 / math.sqrt(head_dim)
    index = band_index(n_queries, n_context, q.device).expand(batch, n_heads, -1, -1)

    content_all = q @ k.transpose(-1, -2)  # (B, H, M, L+M), every query against every row
    content = content_all.gather(-1, index)  # (B, H, M, L), by distance
    position = q @ pos.transpose(0, 1)  # (B, H, M, L), by distance
    scores = (content + position) * scale  # (B, H, M, L)
    if mem_key is not None:
        persistent_scores = (q @ mem_key.transpose(-1, -2)) * scale  # (B, H, M, N)
        scores = torch.cat([scores, persistent_scores], dim=-1)  # (B, H, M, L+N)

    # Softmax statistics in float32 when the inputs are half precision (autocast).
    low_precision = scores.dtype in (torch.float16, torch.bfloat16)
    weights = scores.softmax(-1, dtype=torch.float32 if low_precision else None)
    context_weights = weights[..., :n_context]  # (B, H, M, L)
    persistent_weights = weights[..., n_context:]  # (B, H, M, N)

    if span_mask is not None:
        context_weights = context_weights * span_mask[:, None, :].to(weights.dtype)
        total = context_weights.sum(-1, keepdim=True) + persistent_weights.sum(-1, keepdim=True)
        total = total + renorm_eps
        context_weights = context_weights / total
        persistent_weights = persistent_weights / total

    context_weights = context_weights.to(v.dtype)
    persistent_weights = persistent_weights.to(v.dtype)
    if training and dropout > 0:
        # The persistent weights draw their mask first (as in the original), then the context.
        persistent_weights = F.dropout(persistent_weights, dropout, training=True)
        context_weights = F.dropout(context_weights, dropout, training=True)

    # Scatter each query's band back to context rows, then one matmul with the values.
    weights_all = torch.zeros_like(content_all).scatter(-1, index, context_weights)
    out = weights_all @ v  # (B, H, M, D)
    if mem_val is not None:
        out = out + persistent_weights @ mem_val  # (B, H, M, D)
    return out
