"""The model equals the slow reference of DESIGN §2 in float64: outputs, loss, caches, gradients."""

from __future__ import annotations

import pytest
import torch

import reference
from allattn import AllAttentionLM, ModelConfig

TOL = 1e-9
VOCAB = 11


def build(
    config: ModelConfig, z: list[list[float]] | None = None, seed: int = 0, impl: str = "auto"
):
    torch.manual_seed(seed)
    model = AllAttentionLM(config, impl).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))  # make gains/biases non-trivial
        for i, layer_z in enumerate(z or []):
            model.layers[i].attn.span.z.copy_(torch.tensor(layer_z, dtype=torch.float64))
    return model


def settings(config: ModelConfig, trim: bool = True) -> reference.Settings:
    return reference.Settings(
        n_heads=config.n_heads,
        attn_span=config.attn_span,
        adapt_span=config.adapt_span,
        span_ramp=config.span_ramp,
        adapt_cache=config.adapt_cache,
        renorm_eps=config.renorm_eps,
        trim=trim,
        memory_mode=config.memory_mode,
        ff_activation=config.ff_activation,
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def compare(
    config: ModelConfig,
    z: list[list[float]] | None = None,
    *,
    n_blocks: int = 3,
    block: int = 8,
    batch: int = 2,
    cache: list[torch.Tensor] | None = None,
    z_after_block: dict[int, list[list[float]]] | None = None,
    impl: str = "auto",
) -> dict[str, float]:
    """Run model and reference over consecutive blocks; return the largest differences seen."""
    model = build(config, z, impl=impl)
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    s = settings(config)
    if cache is None:
        model_cache = model.init_cache(batch)
        ref_cache = reference.initial_caches(ref_params, config.n_layers, batch, config.d_model, s)
    else:
        model_cache, ref_cache = [c.clone() for c in cache], [c.clone() for c in cache]
    gen = torch.Generator().manual_seed(1)
    diffs = {"logprobs": 0.0, "loss": 0.0, "cache": 0.0, "grad": 0.0}
    for step in range(n_blocks):
        seq = torch.randint(0, config.vocab_size, (batch, block + 1), generator=gen)
        tokens, targets = seq[:, :-1], seq[:, 1:]
        out = model(tokens, targets, model_cache, logprobs=True)
        logprobs, nll, ref_cache = reference.lm(ref_params, tokens, targets, ref_cache, s)
        ref_span_loss = sum(
            config.span_loss_coef * config.attn_span * p.mean()
            for n, p in ref_params.items()
            if n.endswith("span.z")
        )
        (out.loss + out.span_loss).backward()
        (nll + ref_span_loss).backward()
        model_cache = out.cache
        diffs["logprobs"] = max(diffs["logprobs"], max_diff(out.logprobs, logprobs))
        diffs["loss"] = max(diffs["loss"], abs(out.loss.item() - nll.item()))
        for a, b in zip(model_cache, ref_cache, strict=True):
            diffs["cache"] = max(diffs["cache"], max_diff(a, b))
        if z_after_block and step in z_after_block:
            with torch.no_grad():
                for i, layer_z in enumerate(z_after_block[step]):
                    new = torch.tensor(layer_z, dtype=torch.float64)
                    model.layers[i].attn.span.z.copy_(new)
                    ref_params[f"layers.{i}.attn.span.z"].copy_(new)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        diffs["grad"] = max(diffs["grad"], max_diff(p.grad, ref_params[name].grad))
    for key, value in diffs.items():
        assert value <= TOL, f"{key} differs by {value:.3g}"
    return diffs


def cfg(**changes) -> ModelConfig:
    base = dict(
        vocab_size=VOCAB,
        d_model=16,
        n_heads=2,
        n_layers=2,
        n_persistent=6,
        d_inner=0,
        attn_span=192,
        adapt_span=True,
        span_ramp=8,
        span_loss_coef=0.01,
        adapt_cache=True,
    )
    base.update(changes)
    return ModelConfig(**base)


# Layer 0: max span ceil(0.1*192)+8 = 28 -> trim 128, L = 64, adaptive cache 128 rows.
# Layer 1: max span ceil(0.7*192)+8 = 143 -> no trim, cache 192 rows.
TRIMMED_AND_FULL = [[0.05, 0.1], [0.7, 0.3]]


ADAPTIVE = dict(adaptive_io=True, adaptive_cutoffs=(4, 7), adaptive_div=2, emb_dropout=0.0)

CASES = {
    "all-attention, span trimmed + adaptive cache": dict(config=cfg(), z=TRIMMED_AND_FULL),
    "all-attention, no span": dict(config=cfg(adapt_span=False, attn_span=20)),
    "all-attention, no adaptive cache": dict(config=cfg(adapt_cache=False), z=TRIMMED_AND_FULL),
    "FF baseline": dict(config=cfg(n_persistent=0, d_inner=24), z=TRIMMED_AND_FULL),
    "FF baseline, no span": dict(
        config=cfg(n_persistent=0, d_inner=24, adapt_span=False, attn_span=20)
    ),
    "ablation (no memory, no FF)": dict(config=cfg(n_persistent=0, d_inner=0), z=TRIMMED_AND_FULL),
    "memory and FF": dict(config=cfg(n_persistent=6, d_inner=24), z=TRIMMED_AND_FULL),
    # z = 0, the initial value: m(R + 1) = 0 exactly, and that key still passes gradient to z.
    "z = 0": dict(config=cfg(), z=[[0.0, 0.0], [0.0, 0.0]]),
    # z*S integer (48, 24, 96): m(z*S + R + 1) = 0 exactly, same.
    "z*S integer": dict(config=cfg(), z=[[0.25, 0.125], [0.5, 0.0]]),
    # Word level (DESIGN §2.8): clusters [0, 4), [4, 7), [7, 11) of widths 16, 8, 4.
    "adaptive I/O, tied": dict(config=cfg(**ADAPTIVE), z=TRIMMED_AND_FULL),
    "adaptive I/O, untied": dict(config=cfg(**ADAPTIVE, adaptive_tied=False)),
    "adaptive I/O, one cutoff, FF baseline": dict(
        config=cfg(**ADAPTIVE | {"adaptive_cutoffs": (5,)}, n_persistent=0, d_inner=24)
    ),
    # The paper's other integrations of the persistent vectors (DESIGN §2.9, Fig. 2 right).
    "attn-split": dict(config=cfg(memory_mode="attn_split"), z=TRIMMED_AND_FULL),
    "attn-split, no span": dict(config=cfg(memory_mode="attn_split", adapt_span=False)),
    # 4 heads: the first 2 read the context (and have spans), the last 2 their memory.
    "head-split": dict(config=cfg(memory_mode="head_split", n_heads=4), z=TRIMMED_AND_FULL),
    "head-split, no span": dict(config=cfg(memory_mode="head_split", adapt_span=False)),
    "single-head": dict(config=cfg(memory_mode="single_head"), z=TRIMMED_AND_FULL),
    "single-head, z = 0": dict(config=cfg(memory_mode="single_head"), z=[[0.0, 0.0]] * 2),
    "FF-attn": dict(
        config=cfg(n_persistent=0, d_inner=24, ff_activation="softmax"), z=TRIMMED_AND_FULL
    ),
    "FF-attn, no span": dict(
        config=cfg(n_persistent=0, d_inner=24, ff_activation="softmax", adapt_span=False)
    ),
}


@pytest.mark.parametrize("impl", ["chunked", "reference"])
@pytest.mark.parametrize("name", CASES)
def test_equals_reference_over_three_blocks(name, impl):
    compare(CASES[name]["config"], CASES[name].get("z"), n_blocks=3, impl=impl)


def test_trimming_and_adaptive_cache_are_active_in_the_cases():
    model = build(cfg(), TRIMMED_AND_FULL)
    assert [layer.context_length() for layer in model.layers] == [64, 192]
    assert model.cache_sizes() == [128, 192]
    model = build(cfg(), [[0.0, 0.0], [0.25, 0.5]])
    assert [layer.context_length() for layer in model.layers] == [64, 128]


def test_cache_shorter_than_needed_is_left_padded():
    # A given 5-row cache (random, so padding rows differ from cached ones), then the spans grow
    # by far more than the 64-row buffer: layer 0 goes from L = 64 / C' = 128 to L = 192.
    torch.manual_seed(3)
    short = [torch.randn(2, 5, 16, dtype=torch.float64) for _ in range(2)]
    compare(
        cfg(),
        TRIMMED_AND_FULL,
        n_blocks=3,
        cache=short,
        z_after_block={0: [[0.9, 0.2], [0.7, 0.3]]},
    )


def test_cache_longer_than_needed_drops_oldest_rows():
    torch.manual_seed(4)
    long = [torch.randn(2, 300, 16, dtype=torch.float64) for _ in range(2)]
    compare(cfg(), TRIMMED_AND_FULL, n_blocks=2, cache=long)


def test_initial_cache_is_zeros_of_cache_size():
    model = build(cfg(), TRIMMED_AND_FULL)
    cache = model.init_cache(3)
    assert [tuple(c.shape) for c in cache] == [(3, 128, 16), (3, 192, 16)]
    assert all(c.dtype == torch.float64 and not c.any() for c in cache)


def test_one_block_of_2m_equals_two_blocks_of_m():
    for config in (cfg(), cfg(adapt_cache=False), cfg(adapt_span=False, attn_span=40)):
        model = build(config, TRIMMED_AND_FULL if config.adapt_span else None).eval()
        seq = torch.randint(0, VOCAB, (2, 33), generator=torch.Generator().manual_seed(5))
        tokens, targets = seq[:, :-1], seq[:, 1:]
        whole = model(tokens, targets)
        first = model(tokens[:, :16], targets[:, :16])
        second = model(tokens[:, 16:], targets[:, 16:], first.cache)
        halves = torch.cat([first.logprobs, second.logprobs], dim=1)
        torch.testing.assert_close(halves, whole.logprobs, rtol=0, atol=1e-12)
        torch.testing.assert_close((first.loss + second.loss) / 2, whole.loss, rtol=0, atol=1e-12)
        for a, b in zip(whole.cache, second.cache, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps,tol", [(0.0, 1e-12), (1e-8, 1e-6)])
def test_trimming_changes_nothing(eps, tol):
    config = cfg(renorm_eps=eps)
    model = build(config, TRIMMED_AND_FULL).eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    untrimmed = settings(config, trim=False)
    gen = torch.Generator().manual_seed(6)
    cache = model.init_cache(2)
    ref_cache = reference.initial_caches(params, 2, 2, 16, untrimmed)
    with torch.no_grad():
        for _ in range(3):
            seq = torch.randint(0, VOCAB, (2, 9), generator=gen)
            out = model(seq[:, :-1], seq[:, 1:], cache)
            logprobs, _, ref_cache = reference.lm(
                params, seq[:, :-1], seq[:, 1:], ref_cache, untrimmed
            )
            cache = out.cache
            # Relative tolerance on probabilities = absolute tolerance on log-probabilities.
            torch.testing.assert_close(out.logprobs, logprobs, rtol=0, atol=tol)
    assert model.layers[0].context_length() < config.attn_span  # trimming was really on


def test_cache_is_detached_and_keeps_last_rows():
    model = build(cfg(), TRIMMED_AND_FULL)
    seq = torch.randint(0, VOCAB, (2, 9))
    out = model(seq[:, :-1], seq[:, 1:])
    assert all(not c.requires_grad for c in out.cache)
    emb = model.tok_emb(seq[:, :-1])
    torch.testing.assert_close(out.cache[0][:, -8:], emb.detach())


def test_cache_grows_to_cache_size_when_it_started_short():
    # C' > C + M: the new cache keeps all C + M rows, shorter than C'.
    model = build(cfg(), TRIMMED_AND_FULL)
    short = [torch.zeros(2, 3, 16, dtype=torch.float64) for _ in range(2)]
    out = model(torch.zeros(2, 8, dtype=torch.long), cache=short)
    assert [c.size(1) for c in out.cache] == [11, 11]


def test_mismatched_cache_is_rejected():
    model = build(cfg(), None)
    with pytest.raises(ValueError, match="cache has 1 layers"):
        model(torch.zeros(2, 8, dtype=torch.long), cache=[torch.zeros(2, 4, 16)])
    with pytest.raises(ValueError, match="cache of layer 0 has shape"):
        model(torch.zeros(2, 8, dtype=torch.long), cache=[torch.zeros(3, 4, 16)] * 2)


@pytest.mark.parametrize(
    "changes,expected",
    [
        (dict(n_layers=18, n_persistent=1024), 38_501_725),
        (dict(n_layers=36, n_persistent=2048), 114_017_773),
        (dict(n_layers=18, n_persistent=0, d_inner=1024), 38_547_805),
        (dict(n_layers=36, n_persistent=0, d_inner=2048), 114_146_797),
        (dict(n_layers=18, n_persistent=1024, vocab_size=28), 38_320_300),
        (dict(n_layers=36, n_persistent=2048, vocab_size=28), 113_836_348),
        (dict(n_layers=12, n_persistent=0, d_inner=2048), 38_538_541),
    ],
)
def test_parameter_counts_match_the_original(changes, expected):
    base = dict(vocab_size=205, d_model=512, n_heads=8, attn_span=8192, adapt_span=True)
    base.update(changes)
    with torch.device("meta"):
        model = AllAttentionLM(ModelConfig(**base))
    assert model.num_parameters() == expected


def test_wt103_parameter_counts():
    from allattn.config import load_preset
    from allattn.model import parameter_count

    assert parameter_count(load_preset("wt103").model) == 132_493_746  # DESIGN §3.1
    with torch.device("meta"):
        model = AllAttentionLM(load_preset("wt103").model)
    assert model.num_parameters() == 132_493_746
    # The FF twin: d_inner = N, plus the FF biases and a second LayerNorm per layer.
    assert parameter_count(load_preset("wt103_ff").model) == 132_493_746 + 36 * (2048 + 3 * 512)


def test_adaptive_cluster_without_a_target_gets_a_zero_gradient():
    model = build(cfg(**ADAPTIVE))
    tokens = torch.tensor([[0, 1, 2, 3]])
    out = model(tokens, torch.tensor([[1, 2, 3, 0]]))  # targets only in the shortlist
    assert out.logprobs is None  # only the targets' log-probabilities were computed
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    assert model.adaptive.out_bias[2].grad.abs().max() == 0
    assert model.adaptive.tables[2].weight.grad.abs().max() == 0


def test_span_loss_clamp_and_stats():
    model = build(cfg(span_loss_coef=0.5), [[-0.5, 0.3], [1.7, 0.0]])
    loss = model.span_loss()
    loss.backward()
    for layer in model.layers:
        z = layer.attn.span.z
        torch.testing.assert_close(z.grad, torch.full_like(z, 0.5 * 192 / 2))
    model.clamp_spans()
    assert model.layers[0].attn.span.z.tolist() == [0.0, 0.3]
    assert model.layers[1].attn.span.z.tolist() == [1.0, 0.0]
    # avg: ceil(0.15*192)+8 = 37 and ceil(0.5*192)+8 = 104; max: ceil(192)+8 clipped to 192
    assert model.span_stats() == {"span_avg": (37 + 104) / 2, "span_max": 192.0}


@pytest.mark.parametrize(
    "changes", [{}, {"memory_mode": "attn_split"}, {"memory_mode": "single_head"}]
)
def test_dropout_changes_training_only(changes):
    model = build(cfg(dropout=0.5, emb_dropout=0.2, **changes), TRIMMED_AND_FULL)
    seq = torch.randint(0, VOCAB, (2, 9))
    model.eval()
    a = model(seq[:, :-1], seq[:, 1:]).loss
    b = model(seq[:, :-1], seq[:, 1:]).loss
    assert a.item() == b.item()
    model.train()
    c = model(seq[:, :-1], seq[:, 1:]).loss
    assert c.item() != a.item()


if __name__ == "__main__":
    # `python tests/test_model.py`: the largest differences to the reference, for the README.
    for impl in ("chunked", "reference"):
        for name, case in CASES.items():
            found = compare(case["config"], case.get("z"), impl=impl)
            print(f"{impl:9s} {name:46s}" + "  ".join(f"{k} {v:.1e}" for k, v in found.items()))


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"adapt_span": False},
        {"n_persistent": 0},
        {"d_inner": 24},
        {"n_persistent": 0, "d_inner": 24},
        {"n_layers": 3, "n_heads": 4, "attn_span": 7},
        {"adaptive_io": True, "adaptive_cutoffs": (3, 6), "adaptive_div": 2},
        {"adaptive_io": True, "adaptive_cutoffs": (5,), "adaptive_tied": False},
        {"memory_mode": "attn_split"},
        {"memory_mode": "head_split", "n_heads": 4},
        {"memory_mode": "head_split", "adapt_span": False},
        {"memory_mode": "single_head"},
        {"n_persistent": 0, "d_inner": 24, "ff_activation": "softmax"},
    ],
)
def test_parameter_count_from_the_config_is_the_model_s(changes):
    from allattn.model import parameter_count, skeleton

    config = ModelConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2, n_persistent=5)
    config = config.replace(**changes)
    assert parameter_count(config) == AllAttentionLM(config).num_parameters()
    assert skeleton(config).num_parameters() == parameter_count(config)


def test_parameter_counts_of_the_integration_variants():
    """DESIGN §2.9 at d 16, H 2, N 6, two layers with spans: attn-split and single-head keep the
    all-attention count; head-split drops the unused heads' memory, keys, values and spans;
    FF-attn is the FF baseline without fc1's bias."""
    from allattn.model import parameter_count

    joint = parameter_count(cfg())
    assert parameter_count(cfg(memory_mode="attn_split")) == joint
    assert parameter_count(cfg(memory_mode="single_head")) == joint
    # per layer: half of 2*N*d (persistent), half of 2*d*d (keys and values), 1 span parameter
    dropped = 2 * (6 * 16 + 16 * 16 + 1)
    assert parameter_count(cfg(memory_mode="head_split")) == joint - dropped
    ff = parameter_count(cfg(n_persistent=0, d_inner=24))
    assert parameter_count(cfg(n_persistent=0, d_inner=24, ff_activation="softmax")) == ff - 48
