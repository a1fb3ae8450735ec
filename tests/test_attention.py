"""Properties of the attention kernel: which keys a query sees, normalisation, the span gradient."""

from __future__ import annotations

import pytest
import torch

from allattn import AdaptiveSpan, attend

B, H, M, D, N = 2, 2, 5, 4, 3


def inputs(n_context: int, seed: int = 0, n_mem: int = N):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = r(B, H, M, D), r(B, H, n_context + M, D), r(B, H, n_context + M, D)
    pos = r(n_context, D)
    mem = (r(H, n_mem, D), r(H, n_mem, D)) if n_mem else (None, None)
    return q, k, v, pos, mem


def run(q, k, v, pos, mem, span_mask=None, eps=1e-8):
    return attend(q, k, v, pos, span_mask=span_mask, mem_key=mem[0], mem_val=mem[1], renorm_eps=eps)


@pytest.mark.parametrize("n_mem", [0, N])
def test_query_sees_exactly_the_previous_rows_not_itself(n_mem):
    n_context = 6
    q, k, v, pos, mem = inputs(n_context, n_mem=n_mem)
    base = run(q, k, v, pos, mem)
    for row in range(n_context + M):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, row] += 1.0
        v2[:, :, row] += 1.0
        changed = (run(q, k2, v2, pos, mem) - base).abs().amax(dim=(0, 1, 3)) > 1e-12  # (M,)
        # query i sits at row n_context + i and sees rows i .. n_context + i - 1
        expected = [i <= row <= n_context + i - 1 for i in range(M)]
        assert changed.tolist() == expected, row


def test_position_vector_of_distance_delta_meets_the_key_at_delta():
    n_context = 6
    q, k, v, pos, mem = inputs(n_context)
    base = run(q, k, v, pos, mem)
    for delta in range(1, n_context + 1):
        pos2 = pos.clone()
        pos2[delta - 1] += 1.0
        changed = (run(q, k, v, pos2, mem) - base).abs().amax(dim=(0, 1, 3)) > 1e-12
        assert changed.all()  # every query has a key at every distance 1..L
    # Replace the position term by hand: scores must use p_delta for the key at distance delta.
    scale = D**-0.5
    i = M - 1
    rows = n_context + i - torch.arange(1, n_context + 1)
    scores = torch.einsum("bhe,bhje->bhj", q[:, :, i], k[:, :, rows]) + q[:, :, i] @ pos.T
    scores = torch.cat(
        [scores * scale, torch.einsum("bhe,hne->bhn", q[:, :, i], mem[0]) * scale], -1
    )
    w = scores.softmax(-1)
    expected = torch.einsum("bhj,bhje->bhe", w[..., :n_context], v[:, :, rows]) + torch.einsum(
        "bhn,hne->bhe", w[..., n_context:], mem[1]
    )
    torch.testing.assert_close(base[:, :, i], expected, rtol=0, atol=1e-12)


def unmasked_softmax(q, k, pos, mem_key, i):
    """Softmax over [context by distance ; persistent] for query i, before the span mask."""
    n_context = pos.size(0)
    rows = n_context + i - torch.arange(1, n_context + 1)
    s = torch.einsum("bhe,bhje->bhj", q[:, :, i], k[:, :, rows]) + q[:, :, i] @ pos.T
    parts = [s * D**-0.5]
    if mem_key is not None:
        parts.append(torch.einsum("bhe,hne->bhn", q[:, :, i], mem_key) * D**-0.5)
    a = torch.cat(parts, -1).softmax(-1)
    return a[..., :n_context], a[..., n_context:], rows


@pytest.mark.parametrize("n_mem", [0, N])
@pytest.mark.parametrize("eps", [0.0, 1e-8])
def test_weights_sum_to_one_up_to_the_epsilon(n_mem, eps):
    n_context = 40
    q, k, _, pos, mem = inputs(n_context, n_mem=n_mem)
    ones = torch.ones(B, H, n_context + M, D, dtype=torch.float64)
    mem_ones = (mem[0], torch.ones_like(mem[1])) if n_mem else mem
    span = AdaptiveSpan(H, n_context, 4, 0.0).double()
    with torch.no_grad():
        span.z.copy_(torch.tensor([0.1, 0.6]))
    m = span.mask(n_context).detach()
    total = run(q, k, ones, pos, mem_ones, m, eps)[..., 0]  # values 1: the sum of the weights
    for i in range(M):
        a_ctx, a_mem, _ = unmasked_softmax(q, k, pos, mem[0], i)
        kept = (a_ctx * m).sum(-1) + a_mem.sum(-1)  # (B, H)
        torch.testing.assert_close(total[:, :, i], kept / (kept + eps), rtol=0, atol=1e-15)
        assert (kept < 1).all()  # the mask really removed weight
    if eps:
        assert (total < 1).all()  # the epsilon is in the denominator
    no_span = run(q, k, ones, pos, mem_ones)
    torch.testing.assert_close(no_span, torch.ones_like(no_span), rtol=0, atol=1e-12)


def test_persistent_slots_are_not_masked():
    n_context = 20
    q, k, v, pos, mem = inputs(n_context)
    span = AdaptiveSpan(H, n_context, 2, 0.0).double()
    masked_everything = torch.zeros(H, n_context, dtype=torch.float64)
    out = run(q, k, v, pos, mem, masked_everything, eps=0.0)
    # Only persistent slots keep weight; renormalised among themselves.
    w = (q @ mem[0].transpose(-1, -2) * D**-0.5).softmax(-1)
    torch.testing.assert_close(out, w @ mem[1], rtol=0, atol=1e-12)
    assert span.mask(n_context).shape == (H, n_context)


@pytest.mark.parametrize("z", [[0.0, 0.0], [0.25, 0.5]], ids=["z=0", "zS-integer"])
def test_span_gradient_matches_the_design_formula(z):
    """dL/dz_h = (S/R) sum_{keys with unclamped mask in [0, 1]} a_j (g_j - sum_i w_i g_i) / Z."""
    n_context, ramp = 24, 4
    q, k, v, pos, mem = inputs(n_context)
    span = AdaptiveSpan(H, n_context, ramp, 0.0).double()
    with torch.no_grad():
        span.z.copy_(torch.tensor(z))
    upstream = torch.randn(B, H, M, D, dtype=torch.float64)
    out = run(q, k, v, pos, mem, span.mask(n_context))
    (out * upstream).sum().backward()

    distance = torch.arange(1, n_context + 1, dtype=torch.float64)
    unclamped = (span.z.detach()[:, None] * n_context - (distance - 1)) / ramp + 1  # (H, L)
    m = unclamped.clamp(0, 1)
    in_range = (unclamped >= 0) & (unclamped <= 1)
    expected = torch.zeros(H, dtype=torch.float64)
    without_zero_mask = torch.zeros(H, dtype=torch.float64)
    for i in range(M):
        a_ctx, a_mem, rows = unmasked_softmax(q, k, pos, mem[0], i)
        total = (a_ctx * m).sum(-1) + a_mem.sum(-1) + 1e-8  # (B, H)
        w = torch.cat([a_ctx * m, a_mem], -1) / total[..., None]
        g_ctx = torch.einsum("bhe,bhje->bhj", upstream[:, :, i], v[:, :, rows])
        g = torch.cat([g_ctx, torch.einsum("bhe,hne->bhn", upstream[:, :, i], mem[1])], -1)
        mean_g = (w * g).sum(-1, keepdim=True)
        term = n_context / ramp * a_ctx * (g_ctx - mean_g) / total[..., None]  # (B, H, L)
        expected += (term * in_range).sum(dim=(0, 2))
        without_zero_mask += (term * (in_range & (m > 0))).sum(dim=(0, 2))
    torch.testing.assert_close(span.z.grad, expected, rtol=0, atol=1e-12)
    # The keys with mask exactly 0 matter: dropping them (a where(m > 0) log form) is wrong.
    assert (span.z.grad - without_zero_mask).abs().min() > 1e-6
