"""Full evaluation scores exactly the blocks DESIGN §3 says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from allattn import AllAttentionLM, ModelConfig, checkpoint
from allattn.cli import main
from allattn.data import char_corpus
from allattn.evaluate import (
    Segment,
    document_segments,
    evaluate,
    evaluate_segments,
    independent_segments,
    receptive_field,
    score,
    scored_tokens,
    sliding_segments,
)

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


# -- the evaluation options -------------------------------------------------------------------

SPAN_CFG = CFG.replace(attn_span=80, span_ramp=4, adapt_cache=True)
"""Two layers attending up to 80 rows each; `_model` trims the second one's to 16."""
SPANS = ([0.9, 0.35], [0.1, 0.05])


def _model(config: ModelConfig = SPAN_CFG, seed: int = 0) -> AllAttentionLM:
    torch.manual_seed(seed)
    model = AllAttentionLM(config).double().eval()
    if model.config.adapt_span:  # spans of different lengths, one layer's trimmed: L < S
        for layer, z in zip(model.layers, SPANS, strict=True):
            layer.attn.span.z.data = torch.tensor(z, dtype=torch.float64)
    return model


def _continuous(model: AllAttentionLM, ids: np.ndarray, block_size: int = 7) -> torch.Tensor:
    """log p of every target 1..T-1 by one stream read from position 0 (the yardstick)."""
    x = torch.from_numpy(ids[:-1].astype(np.int64))[None]
    y = torch.from_numpy(ids[1:].astype(np.int64))[None]
    cache, picked = model.init_cache(1), []
    with torch.no_grad():
        for p in range(0, x.size(1), block_size):
            out = model(x[:, p : p + block_size], y[:, p : p + block_size], cache)
            cache = out.cache
            picked.append(out.target_logprobs[0])
    return torch.cat(picked)


def test_independent_protocol_scores_every_token_as_one_continuous_pass():
    model = _model()
    ids = np.random.default_rng(1).integers(0, 7, size=301)
    expected = -_continuous(model, ids).mean().item()
    assert receptive_field(model) == sum(model.context_lengths()) == 80 + 16
    for batch_size, block_size in ((1, 5), (3, 16), (8, 7), (40, 4)):
        segments = independent_segments(len(ids), batch_size, receptive_field(model))
        result = evaluate_segments(
            model, ids, segments, batch_size=batch_size, block_size=block_size
        )
        assert result.tokens == len(ids) - 1 and result.protocol == "independent"
        assert result.loss_nats == pytest.approx(expected, rel=1e-12, abs=0)
    # Without the warm-up the cut streams start cold, and the score depends on the cut.
    cold = independent_segments(len(ids), 8, warmup=0)
    result = evaluate_segments(model, ids, cold, batch_size=8, block_size=7)
    assert result.tokens == len(ids) - 1
    assert abs(result.loss_nats - expected) > 1e-6


def test_sliding_windows_each_read_alone():
    model = _model()
    ids = np.random.default_rng(2).integers(0, 7, size=100)
    window, stride = 20, 8
    segments = sliding_segments(len(ids), window, stride)
    scored = [t for seg in segments for t in range(seg.score_from, seg.end)]
    assert scored == list(range(1, len(ids)))  # every target once, in order
    assert all(seg.length <= window for seg in segments)
    assert all(seg.score_from - seg.start - 1 >= window - stride for seg in segments[1:])
    expected = []
    for seg in segments:  # each window from zero caches, one pass
        window_logprobs = _continuous(model, ids[seg.start : seg.end], block_size=window)
        expected.append(window_logprobs[seg.score_from - seg.start - 1 :])
    mean = -torch.cat(expected).mean().item()
    result = evaluate_segments(model, ids, segments, batch_size=3, block_size=6)
    assert result.tokens == len(ids) - 1
    assert result.loss_nats == pytest.approx(mean, rel=1e-12, abs=0)


def test_documents_are_scored_each_as_if_alone():
    model = _model()
    separator = 6
    rng = np.random.default_rng(3)
    first = np.concatenate([[separator], rng.integers(0, 6, size=40)])
    second = np.concatenate([[separator], rng.integers(0, 6, size=25)])
    stream = np.concatenate([first, second])
    segments = document_segments(stream, separator)
    assert [(s.start, s.score_from, s.end) for s in segments] == [(0, 1, 42), (41, 42, 67)]
    scores = score(model, stream, segments, batch_size=2, block_size=8)
    # Alone: the first document with the next one's separator as its last target.
    alone_first = _continuous(model, np.concatenate([first, [separator]])).sum().item()
    alone_second = _continuous(model, second).sum().item()
    assert scores[0].logprob == pytest.approx(alone_first, rel=1e-12)
    assert scores[1].logprob == pytest.approx(alone_second, rel=1e-12)
    assert [s.tokens for s in scores] == [41, 25]
    # Read as one stream, the second document sees the first: a different score.
    together = _continuous(model, stream)[41:].sum().item()
    assert abs(together - alone_second) > 1e-6


def test_score_reports_greedy_targets():
    model = _model()
    ids = np.random.default_rng(4).integers(0, 7, size=30)
    greedy_ids = ids.copy()
    for t in range(11, 16):  # targets 11..15 each the likeliest after the ones before
        with torch.no_grad():
            logprobs = model(torch.from_numpy(greedy_ids[None, :t].astype(np.int64))).logprobs
        greedy_ids[t] = int(logprobs[0, -1].argmax())
    seg = Segment(0, 11, 16)
    assert score(model, greedy_ids, [seg], batch_size=1, block_size=8, greedy=True)[0].greedy
    wrong = greedy_ids.copy()
    wrong[15] = (greedy_ids[15] + 1) % 7
    assert not score(model, wrong, [seg], batch_size=1, block_size=8, greedy=True)[0].greedy


def test_a_longer_span_for_a_fixed_span_model():
    fixed = SPAN_CFG.replace(adapt_span=False, adapt_cache=False)
    model = _model(fixed)
    ids = np.random.default_rng(5).integers(0, 7, size=120)
    trained = _continuous(model, ids)
    model.set_attn_span(80)  # the same span: nothing changes
    assert torch.equal(_continuous(model, ids), trained)
    model.set_attn_span(100)
    assert model.context_lengths() == [100, 100] and model.pos_emb.shape == (100, 8)
    assert torch.equal(model.pos_emb[80:], torch.zeros(20, 8))
    longer = _continuous(model, ids)
    assert not torch.allclose(longer, trained)  # rows at distances 81..100 count
    model.set_attn_impl("reference")  # both kernels agree on the longer context
    assert torch.allclose(_continuous(model, ids), longer, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="fixed-span model"):
        _model().set_attn_span(30)


def test_eval_cli_protocols(tmp_path, capsys):
    corpus = char_corpus("abcdefg\n" * 400, (0.8, 0.1, 0.1))
    corpus.save(tmp_path / "data")
    path = tmp_path / "m.safetensors"
    checkpoint.save(
        path, _model(SPAN_CFG.replace(vocab_size=len(corpus.vocab))), vocab=corpus.vocab
    )
    fixed = tmp_path / "fixed.safetensors"
    fixed_cfg = SPAN_CFG.replace(vocab_size=len(corpus.vocab), adapt_span=False, adapt_cache=False)
    checkpoint.save(fixed, _model(fixed_cfg), vocab=corpus.vocab)
    base = ["eval", "--data", str(tmp_path / "data"), "--block-size", "8", "--json"]

    def run(*extra, ckpt=path):
        assert main([*base, "--checkpoint", str(ckpt), *extra]) == 0
        return json.loads(capsys.readouterr().out)

    test_tokens = len(corpus.splits["test"])
    one = run("--protocol", "independent", "--batch-size", "1")
    three = run("--protocol", "independent", "--batch-size", "3")
    assert one["tokens"] == three["tokens"] == test_tokens - 1
    assert one["protocol"] == "independent"
    assert one["loss_nats"] == pytest.approx(three["loss_nats"], rel=1e-6)
    sliding = run("--protocol", "sliding", "--window", "16", "--stride", "4")
    assert sliding["tokens"] == test_tokens - 1 and sliding["protocol"] == "sliding"
    documents = run("--protocol", "documents", "--separator", "\n")
    assert documents["tokens"] == test_tokens - 1
    longer = run("--attn-span", "120", ckpt=fixed)
    assert longer["protocol"] == "original" and longer["tokens"] == scored_tokens(test_tokens, 8, 8)

    def error(*extra, ckpt=path):
        return main_error(capsys, [*base, "--checkpoint", str(ckpt), *extra])

    assert "--window and --stride apply to --protocol sliding only" in error("--window", "4")
    assert "--stride (9) is longer than --window (4)" in error(
        "--protocol", "sliding", "--window", "4", "--stride", "9"
    )
    assert "go together" in error("--protocol", "documents")
    assert "go together" in error("--separator", "a")
    assert "is not a token" in error("--protocol", "documents", "--separator", "<doc>")
    assert "fixed-span model" in error("--attn-span", "120")
    assert "invalid choice" in error("--protocol", "rolling")
