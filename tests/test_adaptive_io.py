"""Adaptive input and adaptive log-softmax equal the slow reference of DESIGN §2.8 (float64),
gradients included; the targets' path never builds the (n, V) distribution."""

from __future__ import annotations

import pytest
import torch

import reference
from allattn.adaptive_io import AdaptiveIO

TOL = 1e-9


def build(tied: bool, cutoffs=(6, 13, 40), vocab=50, d=32, div=2) -> AdaptiveIO:
    torch.manual_seed(0)
    return AdaptiveIO(vocab, d, cutoffs, div, tied).double()


def params(module: AdaptiveIO) -> dict[str, torch.Tensor]:
    return {
        f"adaptive.{n}": p.detach().clone().requires_grad_() for n, p in module.named_parameters()
    }


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_and_log_probabilities_equal_the_reference(tied):
    module = build(tied)
    p = params(module)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (3, 17), generator=gen)
    targets = torch.randint(0, 50, (3, 17), generator=gen)
    h = torch.randn(3, 17, 32, dtype=torch.float64, generator=gen, requires_grad=True)
    h_ref = h.detach().clone().requires_grad_()
    weights = torch.rand(3, 17, dtype=torch.float64, generator=gen)

    emb, emb_ref = module.embed(tokens), reference.adaptive_embed(p, tokens)
    full, full_ref = module.logprobs(h), reference.adaptive_logprobs(p, h_ref)
    picked = module.target_logprobs(h, targets)
    picked_ref = full_ref.gather(-1, targets[..., None]).squeeze(-1)
    assert (emb - emb_ref).abs().max() <= TOL
    assert (full - full_ref).abs().max() <= TOL
    assert (picked - picked_ref).abs().max() <= TOL
    assert torch.allclose(full.exp().sum(-1), torch.ones(3, 17, dtype=torch.float64))

    loss = (emb.sum(-1) * weights).sum() + (picked * weights).sum() + module.zero_term()
    loss_ref = (emb_ref.sum(-1) * weights).sum() + (picked_ref * weights).sum()
    loss.backward()
    loss_ref.backward()
    assert (h.grad - h_ref.grad).abs().max() <= TOL
    for name, param in module.named_parameters():
        ref = p[f"adaptive.{name}"].grad
        assert param.grad is not None, name
        assert (param.grad - (ref if ref is not None else 0)).abs().max() <= TOL, name


def test_tying_shares_tables_and_projections_not_biases():
    tied, untied = build(True), build(False)
    names = {n for n, _ in tied.named_parameters()}
    assert not any(n.startswith("out_tables") or n.startswith("out_projections") for n in names)
    assert {n for n, _ in untied.named_parameters()} > names
    assert [b.shape[0] for b in tied.out_bias] == [6, 7, 27, 10]
    assert tied.cluster.weight.shape == (3, 32)  # one logit per tail cluster
    assert [t.weight.shape[1] for t in tied.tables] == [32, 16, 8, 4]


def test_tail_cluster_one_uses_the_last_cluster_logit():
    module = build(True)
    with torch.no_grad():
        module.cluster.bias.copy_(torch.tensor([0.0, 0.0, 30.0]))  # the last logit dominates
    full = module.logprobs(torch.zeros(1, 32, dtype=torch.float64))
    mass = [full[0, lo:hi].exp().sum().item() for lo, hi in module.clusters()]
    assert mass[1] > 0.99  # cluster [6, 13) is tail cluster 1


def test_log_softmax_runs_in_float32_under_half_precision():
    module = AdaptiveIO(50, 32, (6, 13, 40), 2, True).to(torch.bfloat16)
    h = torch.randn(4, 32, dtype=torch.bfloat16)
    assert module.target_logprobs(h, torch.tensor([0, 7, 20, 45])).dtype == torch.float32
    assert module.logprobs(h).dtype == torch.float32


def test_embedding_every_cluster_equals_the_embedding():
    """The traceable form (`torch.export`) gives the same embeddings (up to the rounding of
    products over other rows), with empty clusters too."""
    torch.manual_seed(0)
    io = AdaptiveIO(30, 16, (5, 12), 2, tied=True).double()
    tokens = torch.tensor([[0, 4, 5, 11, 12, 29], [3, 3, 3, 3, 3, 3]])
    torch.testing.assert_close(io.embed_every_cluster(tokens), io.embed(tokens), rtol=0, atol=1e-12)
