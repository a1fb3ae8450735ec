"""A slow reference of DESIGN §2, written from the spec alone: one query at a time, keys gathered
explicitly by distance. It shares no code with allattn (only the parameter names), so the model
is tested against an independent reading of the spec.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class Settings:
    n_heads: int
    attn_span: int
    adapt_span: bool
    span_ramp: int
    adapt_cache: bool
    renorm_eps: float = 1e-8
    trim: bool = True  # False: attend over all S rows (masked ones get weight 0)
    memory_mode: str = "joint"  # DESIGN §2.9: joint, attn_split, head_split, single_head
    ff_activation: str = "relu"  # or softmax (FF-attn)


def trim_and_cache_size(z: Tensor | None, s: Settings) -> tuple[int, int]:
    """(trim, C') from DESIGN §2.7, evaluated in float64 from the parameter."""
    span = s.attn_span
    if z is None:
        return 0, span
    max_span = math.ceil(float(z.detach().max()) * span) + s.span_ramp
    max_span = max(0, min(span, max_span))
    trim = math.floor(min(span - 1, span - max_span) / 64) * 64
    cache_size = min(span, span - trim + 64) if s.adapt_cache else span
    if not s.trim:
        trim = 0
    return trim, cache_size


def layer(p: dict[str, Tensor], i: int, x: Tensor, cache: Tensor, s: Settings):
    """One layer: x (B, M, d), cache (B, C, d) -> (output (B, M, d), new cache)."""
    pre = f"layers.{i}."
    batch, n_block, d = x.shape
    n_heads = s.n_heads
    head_dim = d // n_heads
    z = p.get(pre + "attn.span.z")
    trim, cache_size = trim_and_cache_size(z if s.adapt_span else None, s)
    n_ctx = s.attn_span - trim
    n_cached = cache.shape[1]
    if n_cached >= n_ctx:
        rows = cache[:, n_cached - n_ctx :]
    else:
        rows = torch.cat([cache.new_zeros(batch, n_ctx - n_cached, d), cache], dim=1)
    ctx = torch.cat([rows, x], dim=1)  # row n_ctx + t is block position t

    w_q = p[pre + "attn.q_proj.weight"]
    w_k = p[pre + "attn.k_proj.weight"]
    w_v = p[pre + "attn.v_proj.weight"]
    w_o = p[pre + "attn.out_proj.weight"]
    mem_key = p.get(pre + "attn.memory.key")  # (H, D, N), used times sqrt(D)
    mem_val = p.get(pre + "attn.memory.val")  # (H, N, D), used times sqrt(N)
    distances = torch.arange(1, n_ctx + 1)
    pos = p["pos_emb"][:n_ctx]  # row delta - 1 = p_delta

    mode = s.memory_mode
    ctx_heads = n_heads // 2 if mode == "head_split" else n_heads  # heads that see the context
    outs = []
    for t in range(n_block):
        seen = n_ctx + t - distances  # rows at distance 1..n_ctx, never t itself
        q_full = x[:, t] @ w_q.T  # (B, d), the query before the head split
        q = q_full.view(batch, n_heads, head_dim)
        q_ctx = q[:, :ctx_heads]
        keys = (ctx[:, seen] @ w_k.T).view(batch, n_ctx, ctx_heads, head_dim)
        vals = (ctx[:, seen] @ w_v.T).view(batch, n_ctx, ctx_heads, head_dim)
        scores = torch.einsum("bhe,bjhe->bhj", q_ctx, keys)
        scores = (scores + torch.einsum("bhe,je->bhj", q_ctx, pos)) / math.sqrt(head_dim)
        joint = mode == "joint" and mem_key is not None
        if joint:
            pers_keys = mem_key * math.sqrt(head_dim)
            pers = torch.einsum("bhe,hen->bhn", q, pers_keys) / math.sqrt(head_dim)
            scores = torch.cat([scores, pers], dim=-1)
        a = torch.softmax(scores, dim=-1)
        a_ctx, a_pers = a[..., :n_ctx], a[..., n_ctx:]  # a_pers empty unless joint
        if s.adapt_span:
            m = (z[:, None] * s.attn_span - (distances[None, :] - 1)) / s.span_ramp + 1
            m = torch.clamp(m, 0, 1)  # (H, L)
            a_ctx = a_ctx * m
            total = a_ctx.sum(-1, keepdim=True) + a_pers.sum(-1, keepdim=True) + s.renorm_eps
            a_ctx = a_ctx / total
            a_pers = a_pers / total
        o = torch.einsum("bhj,bjhe->bhe", a_ctx, vals)
        if joint:
            n_mem = mem_val.shape[1]
            o = o + torch.einsum("bhn,hne->bhe", a_pers, mem_val * math.sqrt(n_mem))
        elif mem_key is not None:  # the persistent vectors with a softmax of their own
            width, n_mem = mem_key.shape[1], mem_key.shape[2]
            pers_keys = mem_key * math.sqrt(width)  # (H', width, N)
            pers_vals = mem_val * math.sqrt(n_mem)  # (H', N, width)
            if mode == "single_head":
                w = torch.softmax(q_full @ pers_keys[0] / math.sqrt(width), dim=-1)  # (B, N)
                o = o.reshape(batch, d) + w @ pers_vals[0]
            else:
                q_mem = q if mode == "attn_split" else q[:, ctx_heads:]
                pers = torch.einsum("bhe,hen->bhn", q_mem, pers_keys) / math.sqrt(width)
                o_mem = torch.einsum("bhn,hne->bhe", torch.softmax(pers, dim=-1), pers_vals)
                o = o + o_mem if mode == "attn_split" else torch.cat([o, o_mem], dim=1)
        outs.append(o.reshape(batch, d) @ w_o.T)
    attn = torch.stack(outs, dim=1)

    h = F.layer_norm(x + attn, (d,), p[pre + "norm1.weight"], p[pre + "norm1.bias"], 1e-5)
    if pre + "ff.fc1.weight" in p:
        if s.ff_activation == "softmax":  # FF-attn: no bias inside the softmax
            hidden = torch.softmax(h @ p[pre + "ff.fc1.weight"].T, dim=-1)
        else:
            hidden = torch.relu(h @ p[pre + "ff.fc1.weight"].T + p[pre + "ff.fc1.bias"])
        ff = hidden @ p[pre + "ff.fc2.weight"].T + p[pre + "ff.fc2.bias"]
        h = F.layer_norm(h + ff, (d,), p[pre + "norm2.weight"], p[pre + "norm2.bias"], 1e-5)
    keep = min(cache_size, n_cached + n_block)
    new_cache = torch.cat([cache, x], dim=1)[:, n_cached + n_block - keep :].detach()
    return h, new_cache


def lm(p: dict[str, Tensor], tokens: Tensor, targets: Tensor, caches: list[Tensor], s: Settings):
    """The LM on one block: returns (logprobs (B, M, V), mean NLL, new caches)."""
    n_layers = len(caches)
    adaptive = "adaptive.tables.0.weight" in p
    h = adaptive_embed(p, tokens) if adaptive else p["tok_emb.weight"][tokens]
    new_caches = []
    for i in range(n_layers):
        h, c = layer(p, i, h, caches[i], s)
        new_caches.append(c)
    if adaptive:
        logprobs = adaptive_logprobs(p, h)
    else:
        logits = h @ p["out.weight"].T + p["out.bias"]
        logprobs = torch.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(-1, targets[..., None]).mean()
    return logprobs, nll, new_caches


# -- adaptive input and adaptive softmax (DESIGN §2.8) ---------------------------------------
def adaptive_clusters(p: dict[str, Tensor]) -> list[tuple[int, int]]:
    """[lo, hi) of every cluster, from the sizes of the embedding tables."""
    bounds = [0]
    while f"adaptive.tables.{len(bounds) - 1}.weight" in p:
        bounds.append(bounds[-1] + p[f"adaptive.tables.{len(bounds) - 1}.weight"].shape[0])
    return list(itertools.pairwise(bounds))


def adaptive_embed(p: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """Token by token: the row of the token's cluster table times P_i^T, times sqrt(d)."""
    clusters = adaptive_clusters(p)
    d = p["adaptive.projections.0"].shape[0]
    rows = []
    for token in tokens.flatten().tolist():
        i = next(i for i, (lo, hi) in enumerate(clusters) if lo <= token < hi)
        row = p[f"adaptive.tables.{i}.weight"][token - clusters[i][0]]
        rows.append(row @ p[f"adaptive.projections.{i}"].T * math.sqrt(d))
    return torch.stack(rows).view(*tokens.shape, d)


def adaptive_logprobs(p: dict[str, Tensor], h: Tensor) -> Tensor:
    """Every word's log-probability (..., V): head over the shortlist and the cluster logits;
    a word of tail cluster i adds head column (shortlist + k - i) to its cluster's softmax."""
    clusters = adaptive_clusters(p)
    k = len(clusters) - 1

    def out(name: str, i: int) -> Tensor:  # tied: the input's tables and projections
        own = p.get(f"adaptive.out_{name}.{i}")
        if own is not None:
            return own
        return p[f"adaptive.tables.{i}.weight" if name == "tables" else f"adaptive.projections.{i}"]

    x0 = h @ out("projections", 0)
    head_logits = torch.cat(
        [
            x0 @ out("tables", 0).T + p["adaptive.out_bias.0"],
            x0 @ p["adaptive.cluster.weight"].T + p["adaptive.cluster.bias"],
        ],
        dim=-1,
    )
    head = torch.log_softmax(head_logits, dim=-1)
    shortlist = clusters[0][1]
    parts = [head[..., :shortlist]]
    for i in range(1, k + 1):
        xi = h @ out("projections", i)
        tail = torch.log_softmax(xi @ out("tables", i).T + p[f"adaptive.out_bias.{i}"], dim=-1)
        parts.append(head[..., shortlist + k - i, None] + tail)
    return torch.cat(parts, dim=-1)


def initial_caches(p: dict[str, Tensor], n_layers: int, batch: int, d: int, s: Settings):
    caches = []
    for i in range(n_layers):
        z = p.get(f"layers.{i}.attn.span.z")
        _, cache_size = trim_and_cache_size(z if s.adapt_span else None, s)
        caches.append(torch.zeros(batch, cache_size, d, dtype=p["pos_emb"].dtype))
    return caches
