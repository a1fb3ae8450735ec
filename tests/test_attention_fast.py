"""The chunked kernel computes exactly what the dense reference computes: outputs and every
gradient (queries, keys, values, position table, span mask -> z, persistent keys and values)."""

from __future__ import annotations

import pytest
import torch

from allattn.attention import _ChunkedAttention, attend


def problem(batch, queries, context, heads, dim, n_mem, z, ramp, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    inputs = {
        "q": leaf(batch, heads, queries, dim),
        "k": leaf(batch, heads, context + queries, dim),
        "v": leaf(batch, heads, context + queries, dim),
        "pos": leaf(context, dim),
        "mem_key": leaf(heads, n_mem, dim) if n_mem else None,
        "mem_val": leaf(heads, n_mem, dim) if n_mem else None,
        "z": torch.tensor(z, dtype=dtype).requires_grad_() if z is not None else None,
    }
    upstream = torch.randn(batch, heads, queries, dim, generator=g, dtype=dtype)
    return inputs, upstream, ramp


def run(inputs, upstream, ramp, *, chunk=None, eps=1e-8, dropout=0.0, training=False):
    for t in inputs.values():
        if t is not None:
            t.grad = None
    z = inputs["z"]
    context = inputs["pos"].size(0)
    mask = None
    if z is not None:  # the span mask from z (S = context here), as AdaptiveSpan builds it
        distance_minus_one = torch.arange(context, dtype=z.dtype)
        mask = ((z[:, None] * context - distance_minus_one) / ramp + 1).clamp(0, 1)
    args = (inputs["q"], inputs["k"], inputs["v"], inputs["pos"])
    if chunk is None:
        out = attend(
            *args,
            span_mask=mask,
            mem_key=inputs["mem_key"],
            mem_val=inputs["mem_val"],
            renorm_eps=eps,
            dropout=dropout,
            training=training,
            impl="reference",
        )
    else:
        rate = dropout if training else 0.0
        out = _ChunkedAttention.apply(
            *args, mask, inputs["mem_key"], inputs["mem_val"], eps, rate, chunk
        )
    (out * upstream).sum().backward()
    grads = {n: t.grad.clone() for n, t in inputs.items() if t is not None}
    return out.detach(), grads


CASES = {
    "span, memory, z=0": dict(z=[0.0, 0.0, 0.0], n_mem=5),
    "span, memory, z*S integer": dict(z=[0.25, 0.5, 0.0], n_mem=5),
    "span, memory, partial spans": dict(z=[0.13, 0.71, 1.0], n_mem=5),
    "span, no memory": dict(z=[0.3, 0.05, 0.9], n_mem=0),
    "no span, memory": dict(z=None, n_mem=5),
    "no span, no memory": dict(z=None, n_mem=0),
}


@pytest.mark.parametrize("eps", [0.0, 1e-8])
@pytest.mark.parametrize("chunk", [1, 7, 16, 128])
@pytest.mark.parametrize("name", CASES)
def test_float64_equal_to_reference(name, chunk, eps):
    case = CASES[name]
    inputs, upstream, ramp = problem(2, 23, 48, 3, 8, case["n_mem"], case["z"], 8, torch.float64)
    ref_out, ref_grads = run(inputs, upstream, ramp, eps=eps)
    out, grads = run(inputs, upstream, ramp, chunk=chunk, eps=eps)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-9)
    assert grads.keys() == ref_grads.keys()
    for name_, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name_], rtol=0, atol=1e-9, msg=name_)


def test_zero_mask_keys_still_pass_span_gradient():
    # z = 0, R = 8: the key at distance 9 has mask exactly 0 but a_j dL/du_j != 0 there.
    inputs, upstream, ramp = problem(1, 9, 16, 1, 4, 3, [0.0], 8, torch.float64)
    _, grads = run(inputs, upstream, ramp, chunk=4)
    _, ref = run(inputs, upstream, ramp)
    torch.testing.assert_close(grads["z"], ref["z"], rtol=0, atol=1e-12)
    assert grads["z"].abs().item() > 1e-6


@pytest.mark.parametrize("name", ["span, memory, partial spans", "no span, memory"])
def test_float32_relative_error(name):
    case = CASES[name]
    inputs, upstream, ramp = problem(2, 40, 96, 3, 16, case["n_mem"], case["z"], 16, torch.float32)
    ref_out, ref_grads = run(inputs, upstream, ramp)
    out, grads = run(inputs, upstream, ramp, chunk=16)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5 * ref_out.abs().max().item())
    for key, grad in grads.items():
        scale = ref_grads[key].abs().max().item()
        torch.testing.assert_close(grad, ref_grads[key], rtol=1e-5, atol=1e-5 * scale, msg=key)


def test_dropout_statistics_match_the_reference():
    inputs, upstream, ramp = problem(1, 6, 10, 2, 4, 3, [0.4, 0.9], 4, torch.float64)
    plain, _ = run(inputs, upstream, ramp)
    means = []
    for chunk in (None, 4):
        torch.manual_seed(0)
        outs = [
            run(inputs, upstream, ramp, chunk=chunk, dropout=0.3, training=True)[0]
            for _ in range(600)
        ]
        stacked = torch.stack(outs)
        assert (stacked.std(0) > 0).all()  # dropout is really on
        means.append(stacked.mean(0))
    # E[dropout(w)] = w: both means approach the output without dropout, and each other.
    spread = (means[0] - plain).abs().max().item()
    assert spread < 0.25
    assert (means[1] - plain).abs().max().item() < 0.25
    assert (means[1] - means[0]).abs().max().item() < 0.35


def test_dropout_backward_uses_the_forward_mask():
    inputs, upstream, ramp = problem(1, 6, 10, 2, 4, 3, [0.4, 0.9], 4, torch.float64)
    torch.manual_seed(5)
    _, grads = run(inputs, upstream, ramp, chunk=4, dropout=0.5, training=True)

    def loss(q):  # the same dropout draw, through autograd's numerical check
        torch.manual_seed(5)
        z = inputs["z"]
        mask = ((z[:, None] * 10 - torch.arange(10, dtype=z.dtype)) / ramp + 1).clamp(0, 1)
        out = _ChunkedAttention.apply(
            q,
            inputs["k"],
            inputs["v"],
            inputs["pos"],
            mask,
            inputs["mem_key"],
            inputs["mem_val"],
            1e-8,
            0.5,
            4,
        )
        return (out * upstream).sum()

    q = inputs["q"].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (q,), eps=1e-6, atol=1e-6)
    assert grads["q"].abs().sum() > 0


# -- bfloat16 autocast ---------------------------------------------------------------------------
BF16_TOLERANCE = 1.5e-2
"""Largest relative error (‖x − x64‖ / ‖x64‖) of the output and of every gradient but z's, in
bfloat16 autocast against float64: bfloat16 keeps 8 bits (2^-9 = 2e-3 per rounding); measured
5e-3 to 9e-3 over these cases and seeds, as for the dense kernel under the same autocast."""
BF16_Z_TOLERANCE = 1e-1
"""The span parameter's gradient sums a (g − Σ w g) over every key: the difference cancels, so
bfloat16 rounding of g weighs more (measured up to 5.7e-2, the dense kernel up to 5.5e-2)."""


def run_bf16(inputs, upstream, ramp, impl):
    """Float32 leaves, q, k, v in bfloat16 (as autocast's linear layers give them), the kernel
    under bfloat16 autocast; the output and the float32 gradients."""
    leaves = {
        n: None if t is None else t.detach().float().requires_grad_() for n, t in inputs.items()
    }
    z, context = leaves["z"], leaves["pos"].size(0)
    mask = None
    if z is not None:
        mask = ((z[:, None] * context - torch.arange(context, dtype=z.dtype)) / ramp + 1).clamp(
            0, 1
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = (leaves[n].to(torch.bfloat16) for n in "qkv")
        out = attend(
            q, k, v, leaves["pos"], span_mask=mask, mem_key=leaves["mem_key"],
            mem_val=leaves["mem_val"], impl=impl,
        )  # fmt: skip
    (out.float() * upstream.float()).sum().backward()
    return out.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", CASES)
def test_bfloat16_autocast_against_float64(name, seed):
    case = CASES[name]
    inputs, upstream, ramp = problem(
        2, 70, 96, 3, 16, case["n_mem"], case["z"], 16, torch.float64, seed=seed
    )
    exact, exact_grads = run(inputs, upstream, ramp, chunk=16)
    out, grads = run_bf16(inputs, upstream, ramp, "chunked")
    _, dense_grads = run_bf16(inputs, upstream, ramp, "reference")
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in grads.values())
    assert relative_error(out, exact) <= BF16_TOLERANCE
    for key, grad in grads.items():
        error = relative_error(grad, exact_grads[key])
        dense = relative_error(dense_grads[key], exact_grads[key])
        assert error <= (BF16_Z_TOLERANCE if key == "z" else BF16_TOLERANCE), (key, error, dense)


def test_bfloat16_autocast_with_dropout_runs_and_keeps_the_mean():
    inputs, upstream, ramp = problem(1, 6, 10, 2, 4, 3, [0.4, 0.9], 4, torch.float64)
    plain, _ = run(inputs, upstream, ramp, chunk=4)
    leaves = {n: t.detach().float() for n, t in inputs.items() if t is not None}
    z = leaves["z"]
    mask = ((z[:, None] * 10 - torch.arange(10, dtype=z.dtype)) / ramp + 1).clamp(0, 1)
    torch.manual_seed(0)
    outs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(400):
            q, k, v = (leaves[n].to(torch.bfloat16) for n in "qkv")
            outs.append(
                attend(
                    q, k, v, leaves["pos"], span_mask=mask, mem_key=leaves["mem_key"],
                    mem_val=leaves["mem_val"], dropout=0.3, training=True, impl="chunked",
                ).float()
            )  # fmt: skip
    stacked = torch.stack(outs)
    assert (stacked.std(0) > 0).all()
    assert (stacked.mean(0) - plain).abs().max().item() < 0.25
    q = leaves["q"].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attend(
            q.to(torch.bfloat16), leaves["k"].to(torch.bfloat16), leaves["v"].to(torch.bfloat16),
            leaves["pos"], span_mask=mask, mem_key=leaves["mem_key"], mem_val=leaves["mem_val"],
            dropout=0.3, training=True, impl="chunked",
        )  # fmt: skip
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and q.grad.isfinite().all()
