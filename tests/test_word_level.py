"""Word level end to end: prepare WikiText-style files, train an adaptive-I/O model, report
perplexity (and bits per byte / per character at the other levels), generate; the errors of
mixing levels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from allattn import checkpoint
from allattn.cli import main
from allattn.data import Vocabulary, char_corpus
from allattn.metrics import MetricsLog, measure

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "big",
    "small",
    ".",
    ",",
    "and",
]


def wiki_text(lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(lines):
        n = int(rng.integers(3, 12))
        out.append(" " + " ".join(rng.choice(WORDS, size=n)) + " \n")
    return "".join(out)


@pytest.fixture
def wikitext(tmp_path):
    """A prepared word-level corpus (its vocabulary, with <eos>, is 16 words)."""
    source = tmp_path / "src"
    source.mkdir()
    for name, lines, seed in (("train", 600, 0), ("valid", 120, 1), ("test", 120, 2)):
        (source / f"wiki.{name}.tokens").write_text(wiki_text(lines, seed), encoding="utf-8")
    data = tmp_path / "data"
    argv = ["prepare", "wikitext-2", "--source", str(source), "--out", str(data), "--no-verify"]
    assert main(argv) == 0
    return data


WORD_RUN = [
    "--preset",
    "tiny",
    "--model.adaptive_io",
    "true",
    "--model.adaptive_cutoffs",
    "4,8",
    "--model.adaptive_div",
    "2",
    "--model.d_model",
    "32",
    "--model.n_layers",
    "2",
    "--model.n_persistent",
    "16",
    "--model.attn_span",
    "64",
    "--optim.optimizer",
    "adam",
    "--optim.lr",
    "0.003",
    "--optim.grad_clip",
    "1.0",
    "--train.batch_size",
    "4",
    "--train.block_size",
    "16",
    "--train.steps",
    "20",
    "--train.eval_interval",
    "10",
]


def test_word_level_run_reports_perplexity(wikitext, tmp_path, capsys):
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--quiet", *WORD_RUN, "--data", str(wikitext), "--out", str(run)]) == 0
    assert "last validation ppl " in capsys.readouterr().out
    records = MetricsLog(run).records()
    assert {"train_ppl", "valid_ppl"} <= set(records[-1]) and "valid_bpc" not in records[-1]
    assert records[-1]["valid_ppl"] == pytest.approx(np.exp(records[-1]["valid_loss"]))
    ckpt = checkpoint.load(run)
    assert ckpt.config.adaptive_io and ckpt.config.adaptive_cutoffs == (4, 8)
    assert ckpt.vocab is not None and ckpt.vocab.level == "word"

    assert main(["eval", "--quiet", "--checkpoint", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["level"] == "word" and "bpc" not in result
    assert result["ppl"] == pytest.approx(np.exp(result["loss_nats"]))
    assert records[-1]["valid_loss"] < records[0]["valid_loss"]  # it learns
    assert main(["eval", "--quiet", "--checkpoint", str(run)]) == 0
    assert "nats/token, perplexity " in capsys.readouterr().out

    assert main(["generate", "--quiet", "--checkpoint", str(run), "--prompt", "the cat"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and set(text.split()) <= set(WORDS)


def test_byte_level_results_are_bits_per_byte(tmp_path, capsys):
    from allattn.prepare import enwik8_corpus

    data = bytes(range(32, 127)) * 40
    corpus = enwik8_corpus(data, {"name": "enwik8"})
    corpus.save(tmp_path / "data")
    assert measure(corpus.vocab.level).key == "bpb"
    from allattn import AllAttentionLM, ModelConfig

    config = ModelConfig(vocab_size=len(corpus.vocab), d_model=16, n_heads=2, n_layers=1)
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, AllAttentionLM(config), vocab=corpus.vocab)
    argv = ["eval", "--checkpoint", str(path), "--data", str(tmp_path / "data")]
    assert main([*argv, "--quiet", "--block-size", "8", "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["level"] == "byte" and "bpb" in result and "bpc" not in result
    assert main([*argv, "--quiet", "--block-size", "8", "--batch-size", "2"]) == 0
    assert "bits per byte" in capsys.readouterr().out


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_levels_cannot_be_mixed(wikitext, tmp_path, capsys):
    chars = tmp_path / "chars"
    char_corpus("the cat sat on the mat.\n" * 300).save(chars)
    # A word-level (adaptive I/O) model on a character-level corpus, at training.
    argv = ["train", "--quiet", *WORD_RUN, "--data", str(chars), "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--model.adaptive_io is for word-level corpora" in one_line(capsys)
    assert not (tmp_path / "r").exists()
    # A character-level checkpoint given the word-level corpus, and the reverse.
    run = tmp_path / "run"
    assert main(["train", "--quiet", *WORD_RUN, "--data", str(wikitext), "--out", str(run)]) == 0
    assert main(["eval", "--quiet", "--checkpoint", str(run), "--data", str(chars)]) == 2
    err = one_line(capsys)
    assert "char-level vocabulary" in err and "word-level model" in err
    char_run = tmp_path / "char_run"
    small = ["--model.d_model", "16", "--model.n_layers", "1", "--train.batch_size", "2"]
    tiny = [*small, "--train.block_size", "8", "--train.steps", "2", "--train.eval_interval", "2"]
    argv = ["train", "--quiet", "--preset", "tiny", *tiny, "--data", str(chars)]
    assert main([*argv, "--out", str(char_run)]) == 0
    assert main(["eval", "--quiet", "--checkpoint", str(char_run), "--data", str(wikitext)]) == 2
    err = one_line(capsys)
    assert "word-level vocabulary" in err and "char-level model" in err


def test_adaptive_cutoffs_parse_from_flags_and_toml(tmp_path, capsys):
    from allattn.config import ConfigError, load_preset

    config = load_preset("wt103").override({"model.adaptive_cutoffs": "100,2000"})
    assert config.model.adaptive_cutoffs == (100, 2000)
    preset = tmp_path / "p.toml"
    preset.write_text(config.to_toml())
    assert load_preset(str(preset)).model.adaptive_cutoffs == (100, 2000)
    for bad, message in (
        ("2000,100", "increasing"),
        ("a,b", "comma-separated integers"),
        ("300000", "below --model.vocab_size"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_preset("wt103").override({"model.adaptive_cutoffs": bad})
    argv = ["train", "--preset", "wt103", "--model.adaptive_cutoffs", "5,3", "--print-config"]
    assert main(argv) == 2
    assert "--model.adaptive_cutoffs (5,3)" in one_line(capsys)
    with pytest.raises(ConfigError, match="no width"):
        load_preset("wt103").override({"model.adaptive_div": "1024"})


def test_corpus_vocabulary_levels_describe_themselves():
    vocab = Vocabulary(("<eos>", "a"), "word")
    assert vocab.describe() == "a word-level vocabulary of 2 tokens"
