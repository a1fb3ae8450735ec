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

Two implementations compute this same function (a third, `flex`, opt-in, computes it without
the renormalisation's + eps: see `allattn.flex`). `reference` is the dense one (one score matrix
over all context rows, then a gather of each query's band), the straightforward yardstick.
`chunked` (the default) scores chunks of b queries against only the b + L - 1 rows they can see,
never forms an M x (L + M) matrix, and has a hand-written backward pass that keeps the original's
span gradient at keys whose mask is exactly 0 (DESIGN §2.4).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import flex

CHUNK = 64
"""Queries per chunk of the chunked kernel: a chunk scores b + L - 1 keys for L needed, and
64 measured at least as fast as 32, 128 or 256 at the `small` and `paper` sizes on CPU
(benchmarks/chunk_sizes.py)."""


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
    impl: str = "auto",
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
        impl: "chunked" (fast: chunks of queries against the keys they see, exact hand-written
            backward; under autocast its matrix products run in the autocast dtype), "reference"
            (dense: one score matrix per block, autograd), "auto" (chunked), "flex" (one
            FlexAttention call; opt-in: no + eps, no span gradient at m = 0, no dropout; see
            `flex`).

    Returns:
        The heads' outputs, (B, H, M, D).
    """
    if impl == "flex":
        flex.require(q.device, training=training and torch.is_grad_enabled(), dropout=dropout)
        return flex.attend(q, k, v, pos, span_mask, mem_key, mem_val)
    if impl in ("chunked", "auto"):
        rate = dropout if training else 0.0
        chunk = min(CHUNK, q.size(2))
        return _chunked(q, k, v, pos, span_mask, mem_key, mem_val, renorm_eps, rate, chunk)
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
    weights_all = context_weights.new_zeros(content_all.shape).scatter(-1, index, context_weights)
    out = weights_all @ v  # (B, H, M, D)
    if mem_val is not None:
        out = out + persistent_weights @ mem_val  # (B, H, M, D)
    return out


@torch.compiler.disable
def _chunked(*args) -> Tensor:
    """The chunked kernel, run eagerly under `torch.compile` (`--runtime.compile`): compiled
    regions end before it and resume after it. Traced, its loop over chunks unrolls into one
    graph that took 10x longer to compile and ran slower than the eager kernel."""
    return _ChunkedAttention.apply(*args)


def _band(full: Tensor, n_context: int) -> Tensor:
    """View of each query's L keys in a chunk's score matrix: band[..., r, c] = full[..., r, r + c].

    `full` is (H, B, b, b + L - 1) (any two leading dimensions) with contiguous rows; key
    column c of query r is the key at distance L - c ("key order": oldest first).
    """
    lead0, lead1, rows, width = full.shape
    stride = full.stride()
    return full.as_strided((lead0, lead1, rows, n_context), (stride[0], stride[1], width + 1, 1))


class _ChunkedAttention(torch.autograd.Function):
    """`attend` in chunks of queries, each scored against only the b + L - 1 keys it can see.

    Internally head-major, (H, B, ...). Forward keeps each chunk's softmax (H, B, b, L+N) for
    the backward pass; no score matrix over all L + M rows is ever formed. The position term
    and the persistent scores come from one matmul with a per-head table [p_L ... p_1 ; m_k]
    (L + N rows); a * m is written straight into the band of a reused key matrix; Z is the sum
    of those masked weights and 1 / Z is applied to the (b, D) output. Work tensors are reused
    from chunk to chunk (`_Scratch`), and matmuls write into them.
    Backward uses sum_i w_i dL/dw_i = dO . out, and returns the span mask's gradient for every
    key, including keys whose mask is exactly 0 (a_j dL/du_j is not 0 there), so the span
    parameter gets the original's gradient (DESIGN §2.4).

    Precision (`_precision`): under autocast the matrix products, the kept softmax and the
    elementwise work on it run in the autocast dtype; the normaliser Z, the output kept for
    backward, dO . out, and the gradient accumulators of keys, values, positions, persistent
    vectors and the span mask are float32, and the gradients come back in their inputs'
    dtypes. In float32 and float64 both are the inputs' dtype and nothing is converted.
    """

    @staticmethod
    def forward(ctx, q, k, v, pos, span_mask, mem_key, mem_val, renorm_eps, dropout, chunk):
        compute, work = _precision(q)
        ctx.compute, ctx.work = compute, work
        ctx.input_dtypes = (q.dtype, k.dtype, v.dtype)
        with torch.autocast(q.device.type, enabled=False):  # the dtypes are chosen here
            return _forward(
                ctx, q, k, v, pos, span_mask, mem_key, mem_val, renorm_eps, dropout, chunk
            )

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _backward(ctx, grad_out)


def _precision(q: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The dtype of the kernel's matrix products (`compute`: the autocast dtype under autocast,
    else the queries') and of its softmax, normaliser, span-mask terms and accumulators
    (`work`: float32 when `compute` is half precision, else `compute` itself)."""
    compute = q.dtype
    if torch.is_autocast_enabled(q.device.type) and q.dtype in _AUTOCAST_CASTS:
        compute = torch.get_autocast_dtype(q.device.type)
    work = torch.float32 if compute in (torch.float16, torch.bfloat16) else compute
    return compute, work


_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)
"""The dtypes autocast runs matrix products of in its own dtype (float64 stays float64)."""


def _forward(ctx, q, k, v, pos, span_mask, mem_key, mem_val, renorm_eps, dropout, chunk):
    compute, work = ctx.compute, ctx.work
    # Work head-major, (H, B, ...), so that per-head tables meet (H, B*b, D) matrices.
    q, k, v = (x.to(compute).transpose(0, 1).contiguous() for x in (q, k, v))  # (H, B, *, D)
    n_queries, head_dim = q.shape[2:]
    n_context = k.size(2) - n_queries
    ctx.scale = 1.0 / math.sqrt(head_dim)
    ctx.renorm_eps, ctx.dropout, ctx.chunk = renorm_eps, dropout, chunk
    table, mask_rev, mask_full = _tables(pos, span_mask, mem_key)  # in `work`
    table_c = table.to(compute)
    mask_c, mask_full_c, mem_val_c = _in(compute, mask_rev, mask_full, mem_val)
    k_t = _transposed(k)  # (H, B, D, L+M)
    out = torch.empty_like(q, dtype=work)  # kept in `work` for backward's dO . out
    scratch = _Scratch()
    keeps, probs, totals = [], [], []
    for start, stop, keys in _chunks(n_queries, n_context, chunk):
        q_c = q[:, :, start:stop] * ctx.scale  # (H, B, b, D)
        if _FUSED:
            a, keep, weights, mem_weights, total = _fused_chunk(
                q_c, k_t[..., keys], table_c, mask_full_c, scratch, n_context, dropout,
                renorm_eps, work,
            )  # fmt: skip
            keeps.append(keep)
            probs.append(a)
            o = _matmul(scratch, "out", weights, v[:, :, keys])  # (H, B, b, D)
            if mem_val_c is not None:
                o += _per_head(mem_weights, lambda x: x @ mem_val_c)
            if total is None:
                out[:, :, start:stop] = o
            else:
                totals.append(total)
                torch.div(o, total, out=out[:, :, start:stop])
            continue
        a = _softmax_scores(q_c, k_t[..., keys], table_c, n_context, scratch)  # (H, B, b, L+N)
        keep = _draw_keep(a, n_context, dropout, work) if dropout else None
        keeps.append(keep)
        probs.append(a)
        weights, mem_weights = _masked_band(ctx, a, mask_c, keep, scratch, n_context)
        o = _matmul(scratch, "out", weights, v[:, :, keys])  # (H, B, b, D)
        if mem_val_c is not None:
            o += _per_head(mem_weights, lambda x: x @ mem_val_c)
        if mask_full is None:
            out[:, :, start:stop] = o
        else:  # joint renormalisation: w = a m / (sum_j a_j m_j + eps), before dropout
            if keep is None:  # the masked weights are at hand: Z = their sum
                total = weights.sum(-1, keepdim=True).to(work)  # zero off the band
                if mem_val is not None:
                    total += mem_weights.sum(-1, keepdim=True)
            else:  # weights and mem_weights saw the keep masks
                assert mask_full_c is not None
                total = (a * mask_full_c).sum(-1, keepdim=True).to(work)
            total += renorm_eps  # (H, B, b, 1)
            totals.append(total)
            torch.div(o, total, out=out[:, :, start:stop])
    ctx.keeps, ctx.probs, ctx.totals = keeps, probs, totals
    ctx.save_for_backward(q, k, v, pos, span_mask, mem_key, mem_val, out)
    return out.transpose(0, 1).to(compute)  # (B, H, M, D)


def _backward(ctx, grad_out):
    q, k, v, pos, span_mask, mem_key, mem_val, out = ctx.saved_tensors  # head-major
    compute, work = ctx.compute, ctx.work
    grad_out = grad_out.to(compute).transpose(0, 1).contiguous()  # (H, B, M, D)
    # sum_i w_i dL/dw_i = dO . out (the weights after dropout meet the values in `out`)
    out_dot = (grad_out * out).sum(-1, keepdim=True, dtype=work)  # (H, B, M, 1)
    n_queries = q.size(2)
    n_context = k.size(2) - n_queries
    table, mask_rev, mask_full = _tables(pos, span_mask, mem_key)
    table_c = table.to(compute)
    mask_c, mask_full_c, mem_val_c = _in(compute, mask_rev, mask_full, mem_val)
    renorm = mask_full is not None
    v_t = _transposed(v)  # (H, B, D, L+M)
    dq = torch.zeros_like(q)  # each query's rows are written once
    dk, dv = torch.zeros_like(k, dtype=work), torch.zeros_like(v, dtype=work)  # accumulated
    dtable = torch.zeros_like(table)
    dmask_rev = torch.zeros_like(span_mask) if renorm else None
    dmem_val = torch.zeros_like(mem_val) if mem_val is not None else None
    scratch = _Scratch()
    for index, (start, stop, keys) in enumerate(_chunks(n_queries, n_context, ctx.chunk)):
        q_c, k_c = q[:, :, start:stop] * ctx.scale, k[:, :, keys]
        g_out = grad_out[:, :, start:stop]
        keep, a = ctx.keeps[index], ctx.probs[index]  # a: (H, B, b, L+N)
        g = scratch("g", a.shape, a)  # dL/dw by [context in key order ; persistent]
        mean_g = out_dot[:, :, start:stop]  # sum_i w_i g_i, (H, B, b, 1)
        if renorm:
            total = ctx.totals[index]  # (H, B, b, 1)
            g_out = (g_out / total).to(compute)  # g below holds dL/dw / Z
            mean_g = mean_g / total
        mean_g = mean_g.to(compute)
        # Values: dV = w^T dO (w = the weights after mask, dropout and 1 / Z).
        weights, mem_weights = _masked_band(ctx, a, mask_c, keep, scratch, n_context)
        _add(dv[:, :, keys], _matmul(scratch, "dkv", weights.transpose(-1, -2), g_out))
        if dmem_val is not None:
            _accumulate(dmem_val, _flat(mem_weights).transpose(-1, -2), _flat(g_out))
        # g - sum_i w_i g_i, written straight into g: context by key in key order, then
        # the persistent slots (for dropout, the keep masks scale g first).
        g_ctx, g_mem = g[..., :n_context], g[..., n_context:]
        content = _band(_matmul(scratch, "keys", g_out, v_t[..., keys]), n_context)
        memory = None
        if mem_val_c is not None:
            memory = _matmul(scratch, "memory", _flat(g_out), mem_val_c.transpose(-1, -2))
            memory = memory.view(g_mem.shape)
        if _FUSED:
            g, dmask_part = _FUSED["score_gradient"](
                content, memory, a, mean_g, mask_full_c, keep, ctx.dropout, ctx.renorm_eps
            )
            if dmask_rev is not None:
                dmask_rev += dmask_part
        else:
            if keep is None:
                torch.sub(content, mean_g, out=g_ctx)
                if memory is not None:
                    torch.sub(memory, mean_g, out=g_mem)
            else:
                torch.mul(content, keep[0], out=g_ctx)
                if memory is not None:
                    torch.mul(memory, keep[1], out=g_mem)
                g.mul_(1.0 / (1.0 - ctx.dropout)).sub_(mean_g)
            g.mul_(a)  # t = a (dL/du), with u = a m the unnormalised weights
            if dmask_rev is not None:  # renorm
                assert mask_full_c is not None
                # w = u / Z: dL/du = (g - sum_i w_i g_i) / Z, so dL/dm = a dL/du = t, and the
                # softmax's sum_k a_k dL/da_k = sum_k u_k dL/du_k = (sum_i w_i g_i) eps / Z
                # since sum_k u_k = Z - eps; ds = a (m dL/du - that) = m t - a (that).
                dmask_rev += g_ctx.sum(dim=(1, 2))
                g.mul_(mask_full_c).addcmul_(a, mean_g, value=-ctx.renorm_eps)
        # else ds = a (g - sum_i w_i g_i) = t: no renormalisation, sum_k a_k g_k = mean_g
        ds_keys = scratch("ds", (*g.shape[:-1], k_c.size(2)), g, zero=True)
        _band(ds_keys, n_context).copy_(g[..., :n_context])
        dq_c = _matmul(scratch, "dq", ds_keys, k_c)  # scaled after the loop
        dq[:, :, start:stop] = dq_c.add_(_per_head(g, lambda x: x @ table_c))
        _add(dk[:, :, keys], _matmul(scratch, "dkv", ds_keys.transpose(-1, -2), q_c))
        if dtable.size(0) > 1:
            _accumulate(dtable, _flat(g).transpose(-1, -2), _flat(q_c))  # (H, L+N, D)
        else:  # one position table shared by all heads (no persistent memory)
            dtable += (_flat(g).transpose(-1, -2) @ _flat(q_c)).sum(0, keepdim=True, dtype=work)
    dq *= ctx.scale
    dpos = dtable[:, :n_context].sum(0).flip(0)
    dmem_key = dtable[:, n_context:] if mem_key is not None else None
    dmask = dmask_rev.flip(-1) if dmask_rev is not None else None
    grads = (x.transpose(0, 1).to(t) for x, t in zip((dq, dk, dv), ctx.input_dtypes, strict=True))
    return *grads, dpos, dmask, dmem_key, dmem_val, None, None, None


def _in(compute: torch.dtype, *tensors: Tensor | None) -> list[Tensor | None]:
    """The tensors in the dtype of the matrix products (the same tensors when it is theirs)."""
    return [None if t is None else t.to(compute) for t in tensors]


def _transposed(x: Tensor) -> Tensor:
    """x.transpose(-1, -2) for matrix products with column slices of it: in half precision a
    contiguous copy, so that a slice flattens to (H*B, D, n) without a copy per chunk (the
    float32 products take the strided view as fast)."""
    x_t = x.transpose(-1, -2)
    return x_t.contiguous() if x.dtype in (torch.float16, torch.bfloat16) else x_t


def _add(total: Tensor, x: Tensor) -> None:
    """total += x, converting x first when it is in lower precision (much faster on the CPU
    than a mixed-dtype add into a strided slice; fused, one pass, under `fuse_elementwise`)."""
    if x.dtype == total.dtype:
        total += x
    elif _FUSED:
        _FUSED["add"](total, x)
    else:
        total += x.to(total.dtype)


def _accumulate(total: Tensor, x: Tensor, y: Tensor) -> None:
    """total += x @ y (batched), the product in x's dtype, the sum in total's. In lower
    precision x is a transposed view (x = z^T, z the chunk's weights or score gradients):
    the product is formed transposed, y^T z, so that z is read as it lies (a half-precision
    product copies a transposed operand first)."""
    if x.dtype == total.dtype:
        total.baddbmm_(x, y)
    else:
        _add(total.mT, y.mT @ x.mT)


def _matmul(scratch: _Scratch, name: str, x: Tensor, y: Tensor) -> Tensor:
    """x @ y into the scratch tensor `name` (batched over the leading dimensions)."""
    out = scratch(name, (*x.shape[:-1], y.size(-1)), x)
    return torch.matmul(x, y, out=out)


def _flat(x: Tensor) -> Tensor:
    """(H, B, b, n) -> (H, B*b, n) (a view for contiguous chunks)."""
    return x.reshape(x.size(0), -1, x.size(-1))


def _per_head(x: Tensor, fn) -> Tensor:
    """Apply a per-head matmul to (H, B, b, n) as one (H, B*b, n) batch, back to (H, B, b, m)."""
    y = fn(_flat(x))
    return y.view(*x.shape[:-1], y.size(-1))


def _chunks(n_queries: int, n_context: int, chunk: int):
    """(start, stop, key rows) of each chunk of queries; query i sees rows i .. i + L - 1."""
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        yield start, stop, slice(start, stop + n_context - 1)


def _tables(pos: Tensor, span_mask: Tensor | None, mem_key: Tensor | None):
    """Per-head [p_L .. p_1 ; m_k] (H or 1, L+N, D), and, head-major for broadcasting, the mask
    in key order (H, 1, 1, L) and the same with 1 for the persistent slots (H, 1, 1, L+N)."""
    pos_rev = pos.flip(0)  # key order: row c is p_(L - c)
    if mem_key is None:
        table = pos_rev[None]
    else:
        table = torch.cat([pos_rev.expand(mem_key.size(0), -1, -1), mem_key], dim=1)
    if span_mask is None:
        return table, None, None
    n_mem = 0 if mem_key is None else mem_key.size(1)
    mask_row = torch.cat([span_mask.flip(-1), span_mask.new_ones(span_mask.size(0), n_mem)], -1)
    mask_full = mask_row[:, None, None, :]  # (H, 1, 1, L+N)
    return table, mask_full[..., : span_mask.size(1)], mask_full


def _softmax_scores(q_c: Tensor, k_t: Tensor, table: Tensor, n_context: int, scratch) -> Tensor:
    """Softmax over [context in key order ; persistent] of one chunk; q_c is pre-scaled, k_t
    the keys it sees, transposed (H, B, D, b + L - 1). In
    half precision the softmax's maximum and normaliser are float32 (PyTorch's kernels
    accumulate reduced-precision inputs in float32)."""
    scores = _matmul(scratch, "scores", _flat(q_c), table.transpose(-1, -2))  # position, memory
    scores = scores.view(*q_c.shape[:-1], -1)
    content = _matmul(scratch, "keys", q_c, k_t)
    scores[..., :n_context] += _band(content, n_context)
    return scores.softmax(-1)


_FUSED: dict[str, Callable] = {}
"""The compiled elementwise functions of `--runtime.compile` (empty: the eager kernel)."""


def fuse_elementwise(enabled: bool = True) -> None:
    """Run the chunked kernel's elementwise work on each chunk's softmax as compiled, fused
    loops (`torch.compile`: one pass over the scores instead of five to seven), or, with
    `enabled` false, as the eager operations again. Process-wide; the matrix products, the
    loop over chunks and the hand-written backward stay as they are."""
    _FUSED.clear()
    if enabled:
        functions = (("softmax", _chunk_softmax), ("score_gradient", _score_gradient))
        for name, fn in (*functions, ("add", _add_in_place)):
            _FUSED[name] = torch.compile(fn, fullgraph=True)  # dynamic once a shape changes


def _fused_chunk(q_c, k_t, table, mask_full, scratch, n_context, dropout, renorm_eps, work):
    """One chunk's softmax `a`, its keep masks, the weights as a key matrix for the values, the
    persistent weights and Z (None without renormalisation), by the fused softmax."""
    scores = _matmul(scratch, "scores", _flat(q_c), table.transpose(-1, -2))
    scores = scores.view(*q_c.shape[:-1], -1)  # (H, B, b, L+N)
    content = _band(_matmul(scratch, "keys", q_c, k_t), n_context)
    keep = _draw_keep(scores, n_context, dropout, work) if dropout else None
    a, u_ctx, u_mem, total = _FUSED["softmax"](
        scores, content, mask_full, keep, dropout, renorm_eps
    )
    full = scratch("weights", (*a.shape[:-1], a.size(-2) + n_context - 1), a, zero=True)
    _band(full, n_context).copy_(u_ctx)
    return a, keep, full, u_mem, total


def _chunk_softmax(scores, content, mask_full, keep, dropout: float, eps: float):
    """The forward pass's elementwise work on a chunk, fused: a = softmax of [position +
    content ; persistent] scores, the weights for the values u = a m (* keep / (1 - p)) split
    into context and persistent parts, and Z = sum_j a_j m_j + eps (float32; None without a
    span mask)."""
    n_context = content.size(-1)
    full = torch.cat([scores[..., :n_context] + content, scores[..., n_context:]], dim=-1)
    a = full.softmax(-1)
    u = a if mask_full is None else a * mask_full
    total = None
    if mask_full is not None:
        total = u.sum(-1, keepdim=True, dtype=_accumulator(u)) + eps
    if keep is not None:
        keep_all = torch.cat([keep[0], keep[1]], dim=-1)
        u = u * keep_all * (1.0 / (1.0 - dropout))
    return a, u[..., :n_context], u[..., n_context:], total


def _score_gradient(content, memory, a, mean_g, mask_full, keep, dropout: float, eps: float):
    """The backward pass's elementwise work on a chunk, fused: the scores' gradient ds from
    dL/dw by key (`content`, the persistent `memory`), and the span mask's gradient of the
    chunk (float32; None without a span mask), as the eager lines of `_backward` compute."""
    g = content if memory is None else torch.cat([content, memory], dim=-1)
    if keep is not None:
        keep_all = keep[0] if memory is None else torch.cat([keep[0], keep[1]], dim=-1)
        g = g * keep_all * (1.0 / (1.0 - dropout))
    t = (g - mean_g) * a
    if mask_full is None:
        return t, None
    dmask = t[..., : content.size(-1)].sum(dim=(1, 2), dtype=_accumulator(t))
    return t * mask_full - a * mean_g * eps, dmask


def _add_in_place(total: Tensor, x: Tensor) -> None:
    """total += x for x in lower precision: converted and added in one fused pass."""
    total.add_(x)


def _accumulator(x: Tensor) -> torch.dtype:
    """float32 for half-precision x, else x's dtype (sums of the fused functions)."""
    return torch.promote_types(x.dtype, torch.float32)


class _Scratch:
    """Work tensors reused by the chunks of one call, by name and shape.

    Reuse keeps the working set small and warm (a fresh large tensor costs page faults and
    cache misses). A `zero` tensor is zeroed only when made: its users write only the band, so
    off the band it stays 0 from chunk to chunk.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], like: Tensor, zero=False) -> Tensor:
        tensor = self.tensors.get(name)
        if tensor is None or tensor.shape != shape:
            tensor = like.new_zeros(shape) if zero else like.new_empty(shape)
            self.tensors[name] = tensor
        return tensor


def _draw_keep(
    a: Tensor, n_context: int, dropout: float, work: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Dropout keep-masks (context, persistent); persistent slots draw first, as the original."""
    keep_mem = torch.rand_like(a[..., n_context:], dtype=work) >= dropout
    keep_ctx = torch.rand_like(a[..., :n_context], dtype=work) >= dropout
    return keep_ctx, keep_mem


def _masked_band(ctx, a, mask_rev, keep, scratch, n_context) -> tuple[Tensor, Tensor]:
    """Unnormalised weights a * m (* keep / (1 - p)) as a key matrix, and the persistent ones."""
    a_ctx, a_mem = a[..., :n_context], a[..., n_context:]
    if keep is not None:
        scale = 1.0 / (1.0 - ctx.dropout)
        a_ctx = a_ctx * keep[0] * scale
        a_mem = a_mem * keep[1] * scale
    full = scratch("weights", (*a.shape[:-1], a.size(-2) + n_context - 1), a, zero=True)
    band = _band(full, n_context)
    if mask_rev is None:
        band.copy_(a_ctx)
    else:
        torch.mul(a_ctx, mask_rev, out=band)  # one pass, straight into the band
    return full, a_mem
