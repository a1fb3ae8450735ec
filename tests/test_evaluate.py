"""Full evaluation scores exactly the blocks DESIGN §3 says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allattn import AllAttentionLM, ModelConfig, checkpoint
from allattn.cli import main
from allattn.data import char_corpus
from allattn.evaluate import evaluate, scored_tokens

CFG = ModelConfig(
    vocab_size=7, d_model=16, n_heads=2, n_layers=2, n_persistent=4, attn_span=80, span_ramp=4
)


def test_scored_tokens_of_the_wikitext_example():
    assert scored_tokens(245_569, batch_size=8, block_size=256) == 243_712


def test_evaluation_is_the_token_mean_over_full_blocks():
    torch.manual_seed(0)
    model = AllAttentionLM(CFG).double().eval()
    ids = np.random.default_rng(0).integers(0, 7, size=1003)
    result = evaluate(model, ids, batch_size=4, block_size=16)
    # T = 250 per stream, blocks at p = 0..224 (p + 16 <= 249): 15 blocks x 16 x 4 targets.
    assert result.tokens == 15 * 16 * 4 == scored_tokens(1003, 4, 16)
    streams = torch.from_numpy(ids[:1000].reshape(4, 250))
    nll, cache = [], model.init_cache(4)
    with torch.no_grad():
        for p in range(0, 15 * 16, 16):
            out = model(streams[:, p : p + 16], None, cache)
            cache = out.cache
            target = streams[:, p + 1 : p + 17]
            nll.append(-out.logprobs.gather(-1, target[..., None]))
    token_mean = torch.cat(nll, dim=1).mean().item()
    assert result.loss_nats == pytest.approx(token_mean, rel=1e-12)
    assert result.value == pytest.approx(token_mean / np.log(2), rel=1e-12)  # bpc


def test_eval_cli(tmp_path, capsys):
    corpus = char_corpus("abcdefg\n" * 400, (0.8, 0.1, 0.1))
    corpus.save(tmp_path / "data")
    model = AllAttentionLM(CFG.replace(vocab_size=len(corpus.vocab)))
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, vocab=corpus.vocab)
    argv = ["eval", "--checkpoint", str(path), "--data", str(tmp_path / "data")]
    assert main([*argv, "--block-size", "8", "--batch-size", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["tokens"] == scored_tokens(320, 2, 8)
    assert result["level"] == "char" and {"loss_nats", "bpc"} <= set(result)
    assert "bpb" not in result and "ppl" not in result

    def error(*extra):
        assert main([*argv, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "does not record its block size" in error()
    assert "no full block" in error("--block-size", "400")
    other = char_corpus("xyz\n" * 100, (0.8, 0.1, 0.1))
    other.save(tmp_path / "other")
    assert "differs from the checkpoint" in main_error(
        capsys, ["eval", "--checkpoint", str(path), "--data", str(tmp_path / "other")]
    )
    assert "does not exist" in main_error(capsys, ["eval", "--checkpoint", str(tmp_path / "x")])
    assert "invalid choice" in error("--split", "dev")


def main_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err
