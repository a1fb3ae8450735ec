"""Config validation names the flag."""

from __future__ import annotations

import pytest

from allattn import ConfigError, ModelConfig


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            dict(n_heads=6, d_model=512),
            r"--model.n_heads \(6\) must divide --model.d_model \(512\)",
        ),
        (dict(n_layers=0), r"--model.n_layers \(0\) must be a positive integer"),
        (dict(n_persistent=-1), r"--model.n_persistent \(-1\) must be a non-negative integer"),
        (dict(span_init=1.5), r"--model.span_init \(1.5\) must be in \[0, 1\]"),
        (dict(dropout=1.0), r"--model.dropout \(1.0\) must be in \[0, 1\)"),
        (dict(span_ramp=0), r"--model.span_ramp \(0\) must be a positive integer"),
        (dict(renorm_eps=-1.0), r"--model.renorm_eps"),
        (dict(attn_span=2.5), r"--model.attn_span must be an integer, not 2.5"),
    ],
)
def test_impossible_values_are_rejected(changes, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**changes)


def test_round_trip_and_unknown_fields():
    cfg = ModelConfig(vocab_size=7, n_persistent=0, d_inner=32)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.kind == "transformer" and ModelConfig().kind == "all-attention"
    assert ModelConfig(n_persistent=0).kind == "attention-only"
    with pytest.raises(ConfigError, match=r"unknown model config field.*nb_layers"):
        ModelConfig.from_dict({"nb_layers": 3})
    assert cfg.head_dim == 64
