"""All-attention layers and language model (Sukhbaatar et al. 2019, arXiv 1907.01470).

One layer class covers the paper's three variants, chosen by the config:
    all-attention     n_persistent > 0, d_inner = 0:  h <- LN(h + Attn(h))            (no FF)
    transformer       n_persistent = 0, d_inner > 0:  h <- LN(h + Attn(h)); h <- LN(h + FF(h))
    attention-only    n_persistent = 0, d_inner = 0:  h <- LN(h + Attn(h))  (ablation, new here)
Each layer attends over a cache of its own inputs from previous blocks (Transformer-XL style,
arXiv 1901.02860), trimmed to its learned span (arXiv 1905.07799).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import persistent_memory
from .adaptive_io import AdaptiveIO
from .adaptive_span import AdaptiveSpan
from .attention import attend
from .config import ModelConfig
from .persistent_memory import PersistentMemory

if TYPE_CHECKING:
    from .data import Vocabulary

Cache = list[Tensor]
"""One tensor per layer, (B, C_l, d): the layer's inputs from previous blocks (detached)."""


@dataclass
class LMOutput:
    """What `AllAttentionLM.forward` returns."""

    logprobs: Tensor | None
    """Log-probabilities of the next token, (B, M, V); with adaptive I/O and targets, None
    unless asked for (`forward(..., logprobs=True)`): the loss needs only the targets'."""
    cache: Cache
    """The caches to pass to the next block of the same streams."""
    span_loss: Tensor
    """span_loss_coef * S * mean_h(z_h), summed over layers: add it to the training loss only."""
    loss: Tensor | None = None
    """Mean negative log-likelihood of `targets` (nats), when targets were given."""
    target_logprobs: Tensor | None = None
    """log p(target) of each position, (B, M), when targets were given: for scores that
    weigh or leave out positions (`allattn.evaluate.score`)."""


class MultiHeadAttention(nn.Module):
    """Projections (no bias), adaptive span and persistent memory around `attention.attend`.

    `memory_mode` (DESIGN §2.9) says how the persistent vectors meet the context: `joint`, the
    all-attention layer, puts them in every head's softmax over the context; the paper's other
    integrations read them with a softmax of their own (`persistent_memory.read`) and add or
    concatenate the result: `attn_split` (every head, added to its context output),
    `head_split` (the first H/2 heads read only the context, the others only their memory; the
    keys, values, spans and persistent vectors a head does not use are not allocated) and
    `single_head` (one memory of width d read by the unsplit query, added to the concatenated
    heads). The span mask and its renormalisation act on the context slots of the heads that
    read the context (with a separate memory: the context alone, as without memory).
    """

    def __init__(self, config: ModelConfig, attn_impl: str = "auto") -> None:
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.context_heads = config.context_heads
        self.head_dim = config.head_dim
        self.memory_mode = config.memory_mode
        self.dropout = config.dropout
        self.renorm_eps = config.renorm_eps
        self.attn_impl = attn_impl
        """The kernel (`attention.attend`'s impl): a run-time choice, not architecture."""
        context_width = self.context_heads * self.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, context_width, bias=False)
        self.v_proj = nn.Linear(d, context_width, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.span = (
            AdaptiveSpan(self.context_heads, config.attn_span, config.span_ramp, config.span_init)
            if config.adapt_span
            else None
        )
        self.memory = None
        if config.n_persistent:
            heads, width = config.n_heads, config.head_dim
            if config.memory_mode == "head_split":
                heads = config.n_heads - self.context_heads
            elif config.memory_mode == "single_head":
                heads, width = 1, d
            self.memory = PersistentMemory(heads, width, config.n_persistent)

    def _heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, -1, self.head_dim).transpose(1, 2)  # (B, H, *, D)

    def _project(self, proj: nn.Linear, cached: Tensor, h: Tensor) -> Tensor:
        # Cached rows and block rows separately: the cached rows are detached, so backward
        # computes only the weight gradient for them (DESIGN §2.1), not an unused input gradient.
        return self._heads(torch.cat([proj(cached), proj(h)], dim=1))  # (B, H, L+M, D)

    def forward(self, h: Tensor, cached: Tensor, pos: Tensor) -> Tensor:
        """h: the block (B, M, d); cached: the L kept cache rows (B, L, d); pos: (L, D)."""
        keys = self._project(self.k_proj, cached, h)
        values = self._project(self.v_proj, cached, h)
        return self._attend(h, keys, values, pos, self.attn_impl, self.fixed(pos.size(0)))

    def fixed(self, n_context: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """What depends on the weights only: span mask (H, L), persistent keys and values."""
        return (
            self.span.mask(n_context) if self.span is not None else None,
            self.memory.keys() if self.memory is not None else None,
            self.memory.values() if self.memory is not None else None,
        )

    def block_kv(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of the block's own rows, (B, H, M, D) each."""
        return self._heads(self.k_proj(h)), self._heads(self.v_proj(h))

    def forward_kv(self, h: Tensor, kv: KVCache, pos: Tensor) -> Tensor:
        """Inference from a cache of the context's keys and values instead of its inputs (the
        weights do not change, so they need not be recomputed); appends the block's own."""
        kv.append(*self.block_kv(h))
        keys, values = kv.last(pos.size(0) + h.size(1))  # (B, H, L+M, D) views
        if kv.fixed is None:  # computed once per cache: the weights do not change
            kv.fixed = self.fixed(pos.size(0))
        # One query sees every context row: the dense kernel needs no band and no copies.
        impl = "reference" if h.size(1) == 1 else self.attn_impl
        return self._attend(h, keys, values, pos, impl, kv.fixed)

    def _attend(self, h, keys, values, pos, impl, fixed) -> Tensor:
        batch, n_queries, d_model = h.shape
        span_mask, mem_key, mem_val = fixed
        queries = self.q_proj(h)  # (B, M, d)
        q = self._heads(queries)  # (B, H, M, D)
        joint = self.memory_mode == "joint"
        memory_out = None
        if not joint and mem_key is not None and mem_val is not None:
            # Read first: its dropout mask is drawn before the context's, as the joint
            # softmax's persistent mask is.
            if self.memory_mode == "single_head":
                memory_q = queries[:, None]  # (B, 1, M, d): the query before the head split
            else:
                memory_q = q[:, self.n_heads - mem_key.size(0) :]  # every head, or the last H/2
            memory_out = persistent_memory.read(
                memory_q, mem_key, mem_val, dropout=self.dropout, training=self.training
            )
        out = attend(
            q[:, : self.context_heads],
            keys,
            values,
            pos,
            span_mask=span_mask,
            mem_key=mem_key if joint else None,
            mem_val=mem_val if joint else None,
            renorm_eps=self.renorm_eps,
            dropout=self.dropout,
            training=self.training,
            impl=impl,
        )  # (B, H, M, D): every head, or the context heads with head_split
        if memory_out is not None and self.memory_mode == "attn_split":
            out = out + memory_out
        elif memory_out is not None and self.memory_mode == "head_split":
            out = torch.cat([out, memory_out], dim=1)
        out = out.transpose(1, 2).reshape(batch, n_queries, d_model)
        if memory_out is not None and self.memory_mode == "single_head":
            out = out + memory_out[:, 0]
        return self.out_proj(out)


class FeedForward(nn.Module):
    """W2 dropout(relu(W1 h + b1)) + b2, the sublayer the all-attention layer replaces; with
    `ff_activation = softmax` (FF-attn, DESIGN §2.9) W2 dropout(softmax(W1 h)) + b2: the rows
    of W1 and columns of W2 as persistent keys and values read by an attention of their own
    (no bias inside the softmax; the softmax in float32 under autocast)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.softmax = config.ff_activation == "softmax"
        self.fc1 = nn.Linear(config.d_model, config.d_inner, bias=not self.softmax)
        self.fc2 = nn.Linear(config.d_inner, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: Tensor) -> Tensor:
        x = self.fc1(h)
        if self.softmax:
            low_precision = x.dtype in (torch.float16, torch.bfloat16)
            x = x.softmax(-1, dtype=torch.float32 if low_precision else None).to(x.dtype)
        else:
            x = F.relu(x)
        return self.fc2(self.dropout(x))


class AllAttentionLayer(nn.Module):
    """A post-norm layer with its cache; all-attention, transformer or ablation by the config.

    The relative-position table is shared by all layers, so it is an argument of `forward`,
    shape (S, D) with row delta - 1 holding p_delta.
    """

    def __init__(self, config: ModelConfig, attn_impl: str = "auto") -> None:
        super().__init__()
        self.attn_span = config.attn_span
        self.adapt_cache = config.adapt_cache
        self.attn = MultiHeadAttention(config, attn_impl)
        self.norm1 = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config) if config.d_inner else None
        self.norm2 = nn.LayerNorm(config.d_model) if config.d_inner else None

    def context_length(self) -> int:
        """L = S - trim: cached rows the block attends to with the current spans."""
        span = self.attn.span
        return self.attn_span - (span.trim_length() if span is not None else 0)

    def cache_size(self) -> int:
        """C': rows of cache kept after a block (S, or min(S, S - trim + 64) with adapt_cache)."""
        span = self.attn.span
        if span is not None and self.adapt_cache:
            return span.cache_size()
        return self.attn_span

    def init_cache(self, batch_size: int) -> Tensor:
        """A zero cache of the current cache size, (B, C', d), like the weights."""
        weight = self.norm1.weight
        return weight.new_zeros(batch_size, self.cache_size(), weight.numel())

    def forward(self, h: Tensor, cache: Tensor, pos_emb: Tensor) -> tuple[Tensor, Tensor]:
        """h: (B, M, d), cache: (B, C, d), pos_emb: (S, D) -> (new h, new cache (B, C', d))."""
        n_context = self.context_length()
        cache_size = self.cache_size()  # from the spans as they are before this block
        n_cached = cache.size(1)
        if n_cached >= n_context:
            kept = cache[:, n_cached - n_context :]  # drop the oldest rows
        else:
            # Missing oldest rows are zeros (a zero row has key 0 and value 0, no biases).
            kept = F.pad(cache, (0, 0, n_context - n_cached, 0))
        h_in = h
        h = self._sublayers(h, self.attn(h, kept, pos_emb[:n_context]))
        new_cache = torch.cat([cache, h_in], dim=1)[:, -cache_size:].detach()  # (B, C', d)
        return h, new_cache

    def forward_kv(self, h: Tensor, kv: KVCache, pos_emb: Tensor) -> Tensor:
        """Inference with a cache of keys and values (`KVCache`), which it updates in place.

        Computes what `forward` computes when the cache holds the same rows' inputs.
        """
        n_context = self.context_length()
        return self._sublayers(h, self.attn.forward_kv(h, kv, pos_emb[:n_context]))

    def init_kv_cache(self, batch_size: int) -> KVCache:
        """The key/value cache of `init_cache(batch_size)`: C zero rows."""
        attn = self.attn
        like = self.norm1.weight
        return KVCache(batch_size, attn.context_heads, attn.head_dim, self.cache_size(), like)

    def _sublayers(self, h: Tensor, attn_out: Tensor) -> Tensor:
        h = self.norm1(h + attn_out)
        if self.ff is not None and self.norm2 is not None:
            h = self.norm2(h + self.ff(h))
        return h


class KVCache:
    """One layer's keys and values of its recent positions, for inference, (B, H, *, D) each.

    It holds at least the last C rows (the layer's cache size), in a buffer with room to
    append; when the buffer fills, the last C rows move to its front, so appending costs O(1)
    copies per row on average and `last` is a view, never a copy. It starts as C zero rows:
    the keys and values of `init_cache`'s zero inputs.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, size: int, like: Tensor) -> None:
        self.size = size
        self.room = max(size, 64)
        self.keys = like.new_zeros(batch, heads, size + self.room, head_dim)
        self.values = torch.zeros_like(self.keys)
        self.end = size  # rows [0, end) are valid, the newest last
        self.fixed: tuple | None = None  # the layer's span mask and persistent memory

    def append(self, keys: Tensor, values: Tensor) -> None:
        """Add the newest rows (B, H, M, D)."""
        rows = keys.size(2)
        if self.end + rows > self.keys.size(2):
            keep = min(self.size, self.end)
            capacity = max(self.keys.size(2), keep + rows + self.room)
            self.keys, self.values = (
                self._compact(x, keep, capacity) for x in (self.keys, self.values)
            )
            self.end = keep
        self.keys[:, :, self.end : self.end + rows] = keys
        self.values[:, :, self.end : self.end + rows] = values
        self.end += rows

    def _compact(self, x: Tensor, keep: int, capacity: int) -> Tensor:
        fresh = x.new_empty(*x.shape[:2], capacity, x.size(3))
        fresh[:, :, :keep] = x[:, :, self.end - keep : self.end]
        return fresh

    def last(self, n: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the last n positions, (B, H, n, D) views."""
        if n > self.end:
            raise ValueError(f"the cache holds {self.end} rows, {n} were asked for")
        return self.keys[:, :, self.end - n : self.end], self.values[:, :, self.end - n : self.end]


class AllAttentionLM(nn.Module):
    """Character/byte/word language model: embedding, layers with caches, linear + log-softmax
    (or, with `adaptive_io`, adaptive input and adaptive log-softmax, `allattn.adaptive_io`)."""

    def __init__(self, config: ModelConfig, attn_impl: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.tok_emb: nn.Embedding | None = None
        self.out: nn.Linear | None = None
        self.adaptive: AdaptiveIO | None = None
        if config.adaptive_io:
            self.adaptive = AdaptiveIO(
                config.vocab_size,
                config.d_model,
                config.adaptive_cutoffs,
                config.adaptive_div,
                config.adaptive_tied,
            )
        else:
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)  # N(0, 1), no scaling
        # Relative positions, shared by every head and layer: row delta - 1 = p_delta, N(0, 1).
        self.pos_emb = nn.Parameter(torch.randn(config.attn_span, config.head_dim))
        self.layers = nn.ModuleList(
            AllAttentionLayer(config, attn_impl) for _ in range(config.n_layers)
        )
        self.emb_dropout = nn.Dropout(config.emb_dropout)
        if not config.adaptive_io:
            self.out = nn.Linear(config.d_model, config.vocab_size)  # not tied to tok_emb

    def _layers(self) -> list[AllAttentionLayer]:
        return cast(list[AllAttentionLayer], list(self.layers))

    def context_lengths(self) -> list[int]:
        """Context rows each layer keeps before a block (S minus what its span trims)."""
        return [layer.context_length() for layer in self._layers()]

    def set_attn_impl(self, attn_impl: str) -> None:
        """Run the attention with another kernel: "chunked", "reference" or "auto" (chunked, or
        reference for half precision and autocast). Every kernel computes the same function."""
        for layer in self._layers():
            layer.attn.attn_impl = attn_impl

    @torch.no_grad()
    def set_attn_span(self, attn_span: int) -> None:
        """Attend over `attn_span` positions instead of the trained S (an evaluation option,
        DESIGN §3 protocol unchanged otherwise): every layer keeps that many cached rows, and
        distances beyond S, which have no learned relative position, get the zero vector (the
        content score alone); a shorter span drops the farthest positions. Only without
        adaptive span: the learned spans mask every distance beyond z·S + R <= S + R, so a
        longer span would change nothing, and they are fractions of S."""
        if self.config.adapt_span:
            raise ValueError(
                "an evaluation span other than the trained one needs a fixed-span model "
                "(adapt_span false): the learned spans mask everything beyond them"
            )
        if attn_span < 1:
            raise ValueError(f"the attention span must be positive, not {attn_span}")
        table = self.pos_emb.new_zeros(attn_span, self.config.head_dim)
        kept = min(attn_span, self.pos_emb.size(0))
        table[:kept] = self.pos_emb[:kept]
        self.pos_emb = nn.Parameter(table, requires_grad=self.pos_emb.requires_grad)
        for layer in self._layers():
            layer.attn_span = attn_span
        self.config = self.config.replace(attn_span=attn_span)

    def init_cache(self, batch_size: int) -> Cache:
        """Zero caches for `batch_size` streams, each of its layer's current cache size."""
        return [layer.init_cache(batch_size) for layer in self._layers()]

    def cache_sizes(self) -> list[int]:
        return [layer.cache_size() for layer in self._layers()]

    def forward(
        self,
        tokens: Tensor,
        targets: Tensor | None = None,
        cache: Cache | None = None,
        *,
        logprobs: bool = False,
    ) -> LMOutput:
        """tokens, targets: (B, M) ids; cache: from `init_cache` or the previous call;
        `logprobs`: also the full distribution when targets are given (always computed by a
        full softmax, which needs it for the loss; adaptive I/O otherwise computes only the
        targets' log-probabilities)."""
        batch = tokens.size(0)
        if cache is None:
            cache = self.init_cache(batch)
        self._check_cache(cache, batch)
        h = self.emb_dropout(self._embed(tokens))  # (B, M, d)
        new_cache = []
        for layer, layer_cache in zip(self._layers(), cache, strict=True):
            h, layer_cache = layer(h, layer_cache, self.pos_emb)
            new_cache.append(layer_cache)
        h = self.emb_dropout(h)
        distribution = loss = picked = None
        if self.adaptive is not None:
            if targets is None or logprobs:
                distribution = self.adaptive.logprobs(h)  # (B, M, V)
            if targets is not None:
                picked = self.adaptive.target_logprobs(h, targets)  # (B, M)
                loss = -picked.mean()
                if torch.is_grad_enabled():
                    loss = loss + self.adaptive.zero_term()
        else:
            distribution = self._logprobs(h)  # (B, M, V)
            if targets is not None:
                loss = F.nll_loss(distribution.flatten(0, 1), targets.flatten())
                picked = distribution.gather(-1, targets[..., None]).squeeze(-1)  # (B, M)
        return LMOutput(
            logprobs=distribution,
            cache=new_cache,
            span_loss=self.span_loss(),
            loss=loss,
            target_logprobs=picked,
        )

    def _embed(self, tokens: Tensor) -> Tensor:
        if self.adaptive is not None:
            return self.adaptive.embed(tokens)
        assert self.tok_emb is not None
        return self.tok_emb(tokens)

    def init_kv_cache(self, batch_size: int) -> list[KVCache]:
        """Key/value caches for inference (`forward_kv`), equivalent to `init_cache`'s."""
        return [layer.init_kv_cache(batch_size) for layer in self._layers()]

    @torch.no_grad()
    def forward_kv(self, tokens: Tensor, kv: list[KVCache], last: bool = False) -> Tensor:
        """Inference on the next block of tokens (B, M), any M (1 for token-by-token decoding):
        log-probabilities (B, M, V), the same as `forward`'s with the equivalent input caches;
        `last`: those of the last position only, (B, 1, V).

        The caches hold each layer's keys and values, so the context is never projected again;
        they are updated in place. The model must be in eval mode (no dropout).
        """
        if self.training:
            raise ValueError("forward_kv is for inference: call model.eval() first")
        if len(kv) != len(self.layers):
            raise ValueError(f"cache has {len(kv)} layers, the model {len(self.layers)}")
        h = self._embed(tokens)  # (B, M, d)
        for layer, layer_kv in zip(self._layers(), kv, strict=True):
            h = layer.forward_kv(h, layer_kv, self.pos_emb)
        return self._logprobs(h[:, -1:] if last else h)

    def _logprobs(self, h: Tensor) -> Tensor:
        """Log-probabilities of the next token from the last layer's output (B, M, d)."""
        if self.adaptive is not None:
            return self.adaptive.logprobs(h)
        assert self.out is not None
        logits = self.out(h)  # (B, M, V)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # log-softmax in float32 under autocast
        return F.log_softmax(logits, dim=-1)

    def _check_cache(self, cache: Cache, batch: int) -> None:
        if len(cache) != len(self.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model {len(self.layers)}")
        for i, layer_cache in enumerate(cache):
            if layer_cache.dim() != 3 or layer_cache.size(0) != batch:
                raise ValueError(
                    f"cache of layer {i} has shape {tuple(layer_cache.shape)}, "
                    f"expected ({batch}, C, {self.config.d_model})"
                )
            if layer_cache.size(2) != self.config.d_model:
                raise ValueError(
                    f"cache of layer {i} has width {layer_cache.size(2)}, "
                    f"expected {self.config.d_model}"
                )

    def _spans(self) -> list[AdaptiveSpan]:
        return [layer.attn.span for layer in self._layers() if layer.attn.span is not None]

    def span_loss(self) -> Tensor:
        """span_loss_coef * S * mean_h(z_h) summed over layers (a zero tensor without spans)."""
        spans = self._spans()
        if not spans:
            return self.pos_emb.new_zeros(())
        return self.config.span_loss_coef * torch.stack([span.loss() for span in spans]).sum()

    @torch.no_grad()
    def clamp_spans(self) -> None:
        """Clamp every span parameter to [0, 1]; call after each optimiser step."""
        for span in self._spans():
            span.clamp_()

    def span_stats(self) -> dict[str, float]:
        """'span_avg': mean over layers of the average span, 'span_max': the largest max span."""
        spans = self._spans()
        if not spans:
            span = float(self.config.attn_span)
            return {"span_avg": span, "span_max": span}
        return {
            "span_avg": sum(span.avg_span() for span in spans) / len(spans),
            "span_max": float(max(span.max_span() for span in spans)),
        }

    def head_spans(self) -> list[list[float]]:
        """Each layer's per-head learned span z_h * S in positions (rounded to 0.01; the soft
        mask reaches R further); empty without adaptive span."""
        return [[round(z * span.attn_span, 2) for z in span.z.tolist()] for span in self._spans()]

    def num_parameters(self) -> int:
        """Distinct parameters (each span parameter counted once)."""
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: str | Path, *, vocab: Vocabulary | None = None) -> Path:
        """Write a Hugging Face Hub directory (config.json, model.safetensors, vocab.json, a
        model card): `allattn.hub.save_pretrained`, which also records a run for the card."""
        from . import hub  # the Hub's module only when asked for

        return hub.save_pretrained(self, directory, vocab=vocab)

    @classmethod
    def from_pretrained(
        cls, name: str | Path, *, revision: str | None = None, token: str | bool | None = None
    ) -> AllAttentionLM:
        """The model (eval mode, CPU) of a Hub directory or a Hub repository "owner/name"
        (huggingface_hub needed); `allattn.hub.from_pretrained` also gives its vocabulary."""
        from . import hub

        return hub.from_pretrained(name, revision=revision, token=token).model

    def push_to_hub(
        self,
        repo_id: str,
        *,
        vocab: Vocabulary | None = None,
        private: bool | None = None,
        token: str | None = None,
    ) -> str:
        """Upload the model (and `vocab`) to the Hub repository `repo_id`, created if need be
        (`allattn.hub.push_to_hub`, huggingface_hub needed); returns its URL."""
        from . import hub

        return hub.push_to_hub(self, repo_id, vocab=vocab, private=private, token=token)


def parameter_count(config: ModelConfig) -> int:
    """The parameters `AllAttentionLM(config)` has, from the config alone (no model is built,
    so absurd sizes are refused before any memory is taken)."""
    d, n, inner = config.d_model, config.n_persistent, config.d_inner
    context_width = config.context_heads * config.head_dim  # d, or d / 2 with head_split
    layer = 2 * d * d + 2 * d * context_width + 2 * d  # projections, norm1
    layer += config.context_heads if config.adapt_span else 0  # span parameters z
    memory_width = d - context_width if config.memory_mode == "head_split" else d
    layer += 2 * memory_width * n  # persistent keys and values: H * D * N each (or 1 * d * N)
    fc1_bias = inner if config.ff_activation == "relu" else 0  # no bias inside a softmax
    layer += 2 * d * inner + fc1_bias + d + 2 * d if inner else 0  # FF and norm2
    return _io_parameters(config) + config.attn_span * config.head_dim + config.n_layers * layer


def _io_parameters(config: ModelConfig) -> int:
    """The embedding and output layer's parameters (full or adaptive, DESIGN §2.8)."""
    d, v = config.d_model, config.vocab_size
    if not config.adaptive_io:
        return v * d + d * v + v  # embedding; output weight and bias (not tied)
    widths = config.adaptive_widths()
    tables = sum(n * w for n, w in zip(config.adaptive_sizes(), widths, strict=True))
    projections = sum(d * w for w in widths)
    copies = 1 if config.adaptive_tied else 2  # untied: the output's own tables, projections
    n_tails = len(config.adaptive_cutoffs)
    return copies * (tables + projections) + v + n_tails * d + n_tails  # + biases, W_c, b_c


_UNINITIALISED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.LayerNorm)


@contextlib.contextmanager
def _no_init() -> Iterator[None]:
    """nn.Linear, nn.Embedding and nn.LayerNorm allocate their weights but skip initialising
    them (the weights are about to be replaced)."""
    saved = [cls.reset_parameters for cls in _UNINITIALISED]  # type: ignore[attr-defined]
    try:
        for cls in _UNINITIALISED:
            cls.reset_parameters = lambda self: None  # type: ignore[attr-defined]
        yield
    finally:
        for cls, method in zip(_UNINITIALISED, saved, strict=True):
            cls.reset_parameters = method  # type: ignore[attr-defined]


def skeleton(config: ModelConfig, attn_impl: str = "auto") -> AllAttentionLM:
    """`AllAttentionLM(config)` on the CPU without the random initialisation of its linear,
    embedding and norm weights: the shapes for weights about to be loaded. (Not the meta
    device: its Python kernels import the whole compiler stack, seconds at start-up.)"""
    with _no_init():
        return AllAttentionLM(config, attn_impl)
