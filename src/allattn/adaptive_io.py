"""Adaptive input (Baevski & Auli 2019) and adaptive log-softmax (Grave et al. 2017), tied as
in the original word-level models (DESIGN §2.8).

The ids are cut into clusters of consecutive ids at the cutoffs: [0, c_1), [c_1, c_2), ...,
[c_k, V) (the original: 20000, 40000, 200000 with V = 267,735). Cluster i has an embedding
table of width d_i = d // div**i (512, 128, 32, 8) and a bias-free projection P_i (d x d_i).
    input   the token's row of its cluster's table times P_i^T, times sqrt(d);
    output  the head scores the first cluster's words and one logit per tail cluster,
            x_0 = h P_0, logits x_0 [W_0; W_c]^T + [b_0; b_c]; a word of tail cluster i has
            log p = head[c_1 + k - i] + log_softmax(x_i W_i^T + b_i)[word - c_i], x_i = h P_i
            (tail cluster 1 takes the last cluster logit, the original's order).
With tying, W_i is the input table of cluster i and P_i is shared; the biases b_i and the
cluster layer (W_c, b_c) are the output's own. Log-softmaxes run in at least float32.

Training and evaluation need only the targets' log-probabilities (`target_logprobs`): the head
over the shortlist and, for the rows whose target is in a tail cluster, that cluster; never a
(B, M, V) tensor. The full distribution (`logprobs`) is for generation and explicit requests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for a linear layer's weight and
    bias, which the original's projections, output tables and biases get."""
    bound = 1 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def _log_softmax(logits: Tensor) -> Tensor:
    """log_softmax over the last dimension in at least float32 (float64 stays float64)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.log_softmax(logits, dim=-1)


class AdaptiveIO(nn.Module):
    """The input embedding and output log-softmax of a word-level model, by clusters of ids."""

    def __init__(
        self, vocab_size: int, d_model: int, cutoffs: Sequence[int], div: int, tied: bool
    ) -> None:
        super().__init__()
        self.bounds = (0, *cutoffs, vocab_size)
        self.shortlist = self.bounds[1]
        self.n_tails = len(cutoffs)
        self.d_model = d_model
        self.tied = tied
        self.scale = math.sqrt(d_model)
        widths = [d_model // div**i for i in range(len(self.bounds) - 1)]
        sizes = [hi - lo for lo, hi in itertools.pairwise(self.bounds)]
        self.tables = nn.ModuleList(nn.Embedding(n, w) for n, w in zip(sizes, widths, strict=True))
        # P_i (d x d_i), as the original stores it: the weight of a linear layer d_i -> d.
        self.projections = nn.ParameterList(_uniform((d_model, w), w) for w in widths)
        self.out_bias = nn.ParameterList(
            _uniform((n,), w) for n, w in zip(sizes, widths, strict=True)
        )
        self.cluster = nn.Linear(widths[0], self.n_tails)  # W_c, b_c: the tail clusters' logits
        self.out_tables: nn.ParameterList | None = None
        self.out_projections: nn.ParameterList | None = None
        if not tied:
            self.out_tables = nn.ParameterList(
                _uniform((n, w), w) for n, w in zip(sizes, widths, strict=True)
            )
            self.out_projections = nn.ParameterList(_uniform((d_model, w), w) for w in widths)

    def clusters(self) -> list[tuple[int, int]]:
        """The id range [lo, hi) of every cluster, the head's shortlist first."""
        return list(itertools.pairwise(self.bounds))

    def _projection(self, i: int, output: bool) -> Tensor:
        if output and self.out_projections is not None:
            return self.out_projections[i]
        return self.projections[i]

    def _out_table(self, i: int) -> Tensor:
        if self.out_tables is not None:
            return self.out_tables[i]
        return self.tables[i].weight  # type: ignore[return-value]

    # -- input -------------------------------------------------------------------------------
    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (...) -> embeddings (..., d): the cluster table's row times P_i^T, times
        sqrt(d)."""
        flat = tokens.reshape(-1)
        out: Tensor | None = None
        for i, (lo, hi) in enumerate(self.clusters()):
            rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            rows_emb = F.linear(self.tables[i](flat[rows] - lo), self.projections[i])
            if out is None:
                out = rows_emb.new_zeros(flat.numel(), self.d_model)
            out = out.index_copy(0, rows, rows_emb)
        if out is None:  # no tokens at all
            out = self.projections[0].new_zeros(flat.numel(), self.d_model)
        return (out * self.scale).view(*tokens.shape, self.d_model)

    def embed_every_cluster(self, tokens: Tensor) -> Tensor:
        """`embed` without data-dependent shapes, for `torch.export`: every cluster embeds
        every token (its ids clamped into range) and keeps the rows that are its own: the same
        embeddings up to rounding, at the cost of every cluster's product for every token
        (fine for decoding's few tokens per step)."""
        out = self.projections[0].new_zeros(*tokens.shape, self.d_model)
        for i, (lo, hi) in enumerate(self.clusters()):
            mine = (tokens >= lo) & (tokens < hi)
            rows = F.linear(
                self.tables[i]((tokens - lo).clamp(0, hi - lo - 1)), self.projections[i]
            )
            out = torch.where(mine[..., None], rows, out)
        return out * self.scale

    # -- output ------------------------------------------------------------------------------
    def _tail_logits(self, i: int, h: Tensor) -> Tensor:
        return F.linear(h @ self._projection(i, True), self._out_table(i), self.out_bias[i])

    def _head_logprobs(self, h: Tensor) -> Tensor:
        """(n, d) -> (n, shortlist + n_tails): the shortlist words, then the cluster logits."""
        weight = torch.cat([self._out_table(0), self.cluster.weight])
        bias = torch.cat([self.out_bias[0], self.cluster.bias])
        return _log_softmax(F.linear(h @ self._projection(0, True), weight, bias))

    def _cluster_column(self, i: int) -> int:
        """The head column of tail cluster i (1-based): the last column for cluster 1."""
        return self.shortlist + self.n_tails - i

    def target_logprobs(self, h: Tensor, targets: Tensor) -> Tensor:
        """log p(target) for hidden states h (..., d) and targets (...), shape of `targets`,
        at least float32. Only the clusters that hold a target are computed, and only for
        those rows."""
        flat_h = h.reshape(-1, h.size(-1))
        flat = targets.reshape(-1)
        head = self._head_logprobs(flat_h)
        out = head.new_zeros(flat.numel())
        for i, (lo, hi) in enumerate(self.clusters()):
            rows = ((flat >= lo) & (flat < hi)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            target = (flat[rows] - lo)[:, None]
            if i == 0:
                picked = head[rows].gather(1, target).squeeze(1)
            else:
                tail = _log_softmax(self._tail_logits(i, flat_h[rows]))
                picked = head[rows, self._cluster_column(i)] + tail.gather(1, target).squeeze(1)
            out = out.index_copy(0, rows, picked)
        return out.view(targets.shape)

    def logprobs(self, h: Tensor) -> Tensor:
        """The full next-token distribution, log-probabilities (..., V): for generation and
        explicit requests only (it is V wide)."""
        flat_h = h.reshape(-1, h.size(-1))
        head = self._head_logprobs(flat_h)
        parts = [head[:, : self.shortlist]]
        for i in range(1, self.n_tails + 1):
            column = self._cluster_column(i)
            tail = _log_softmax(self._tail_logits(i, flat_h))
            parts.append(head[:, column : column + 1] + tail)
        return torch.cat(parts, dim=1).view(*h.shape[:-1], self.bounds[-1])

    def zero_term(self) -> Tensor:
        """0 x one element of every embedding table, projection and output bias (not the
        cluster layer, which every token reaches): added to the loss so that a cluster with
        no token in a batch still gets a zero gradient rather than none (DESIGN §2.8)."""
        touched: list[Tensor] = [table.weight[0, 0] for table in self.tables]  # type: ignore[index]
        touched += [p[0, 0] for p in self.projections]
        touched += [b[0] for b in self.out_bias]
        if self.out_tables is not None and self.out_projections is not None:
            touched += [p[0, 0] for p in self.out_tables]
            touched += [p[0, 0] for p in self.out_projections]
        return 0 * torch.stack(touched).sum()
