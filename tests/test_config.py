"""Config validation names the flag."""

from __future__ import annotations

import re

import pytest

from allattn import ConfigError, ModelConfig
from allattn.config import load_preset


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
        (
            dict(memory_mode="attn_split", n_persistent=0),
            r"--model.memory_mode attn_split needs persistent vectors",
        ),
        (
            dict(memory_mode="head_split", n_heads=1, d_model=16),
            r"head_split needs an even --model.n_heads \(1\)",
        ),
        (dict(ff_activation="softmax"), r"--model.ff_activation softmax needs an FF sublayer"),
        (dict(memory_mode="split"), r"--model.memory_mode"),
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
    assert ModelConfig(memory_mode="single_head").kind == "all-attention (single_head)"
    softmax_ff = ModelConfig(n_persistent=0, d_inner=8, ff_activation="softmax")
    assert softmax_ff.kind == "transformer (FF-attn)"
    with pytest.raises(ConfigError, match=r"unknown model config field.*nb_layers"):
        ModelConfig.from_dict({"nb_layers": 3})
    assert cfg.head_dim == 64


@pytest.mark.parametrize(
    "table,message",
    [
        ('[model]\nadapt_span = "false"', "--model.adapt_span must be true or false, not 'false'"),
        ('[model]\nn_layers = "4"', "--model.n_layers must be an integer, not '4'"),
        ("[model]\nn_layers = true", "--model.n_layers must be an integer, not True"),
        ("[model]\nn_layers = 99999999999999999999", "out of range"),
        ('[optim]\nlr = "0.1"', "--optim.lr must be a number, not '0.1'"),
        ("[optim]\nlr = nan", "--optim.lr (nan) must be a finite number"),
        ("[optim]\nlr = inf", "--optim.lr (inf) must be a finite number"),
        ("[runtime]\ndevice = 5", "--runtime.device must be a string, not 5"),
        ('[runtime]\ndevice = "cuda:abc"', "must be auto, cpu, cuda or cuda:N"),
        ("[train]\nseed = -1", "--train.seed (-1) must be a non-negative integer"),
    ],
)
def test_preset_values_are_type_checked(table, message, tmp_path):
    """A preset TOML gives typed values; a wrong type is refused, never coerced (the string
    "false" is not a true boolean)."""
    path = tmp_path / "p.toml"
    path.write_text(table + "\n")
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_preset(str(path))


def test_integer_values_of_float_settings_become_floats(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("[optim]\nlr = 1\n")
    lr = load_preset(str(path)).optim.lr
    assert lr == 1.0 and isinstance(lr, float)
