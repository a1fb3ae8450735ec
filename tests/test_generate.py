"""Generation: incremental decoding equals one full forward pass; sampling stays in its set."""

from __future__ import annotations

import pytest
import torch

from allattn import checkpoint, generate
from allattn.cli import main
from allattn.config import ModelConfig
from allattn.data import EOS, Vocabulary, VocabularyError
from allattn.generate import Sampling
from allattn.model import AllAttentionLM

CASES = {
    "all-attention, spans partly trimmed": dict(n_persistent=8, span_init=0.1),
    "all-attention, adaptive cache": dict(n_persistent=8, span_init=0.1, adapt_cache=True),
    "all-attention, full span": dict(n_persistent=8, span_init=1.0),
    "transformer, no span": dict(n_persistent=0, d_inner=48, adapt_span=False),
    # Word level: adaptive input and softmax, clusters [0, 4), [4, 8), [8, 13).
    "word level, adaptive I/O": dict(
        n_persistent=8, span_init=0.1, adaptive_io=True, adaptive_cutoffs=(4, 8), adaptive_div=2
    ),
    "word level, adaptive I/O untied, transformer": dict(
        n_persistent=0,
        d_inner=48,
        adaptive_io=True,
        adaptive_cutoffs=(4, 8),
        adaptive_div=2,
        adaptive_tied=False,
    ),
    # The paper's other integrations of persistent memory (DESIGN §2.9).
    "attn-split": dict(n_persistent=8, span_init=0.1, memory_mode="attn_split"),
    "head-split": dict(n_persistent=8, span_init=0.1, memory_mode="head_split"),
    "single-head": dict(n_persistent=8, span_init=0.1, memory_mode="single_head"),
    "FF-attn": dict(n_persistent=0, d_inner=48, ff_activation="softmax", span_init=0.1),
}


def make_model(seed: int = 0, vocab_size: int = 13, **overrides) -> AllAttentionLM:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab_size, d_model=32, n_heads=4, n_layers=3, attn_span=192, **overrides
    )
    model = AllAttentionLM(config).double().eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.attn.span is not None and overrides.get("span_init", 0) < 1:
                layer.attn.span.z.uniform_(0.0, 0.3)  # different spans per head, some trimmed
    return model


@pytest.mark.parametrize("name", CASES)
def test_incremental_logprobs_equal_one_forward_pass(name):
    model = make_model(**CASES[name])
    if name.startswith("all-attention, spans"):
        assert any(layer.context_length() < 192 for layer in model.layers)  # trimming is on
    tokens = torch.randint(13, (2, 450))  # longer than the span (192)
    with torch.no_grad():
        full = model(tokens).logprobs
    kv = model.init_kv_cache(2)
    pieces = [model.forward_kv(tokens[:, :37], kv)]  # a prompt block
    pieces += [model.forward_kv(tokens[:, t : t + 1], kv) for t in range(37, 300)]  # one by one
    pieces.append(model.forward_kv(tokens[:, 300:], kv))  # a block longer than the cache's room
    incremental = torch.cat(pieces, dim=1)
    assert (incremental - full).abs().max().item() <= 1e-9


def test_forward_kv_refuses_training_mode():
    model = make_model().train()
    with pytest.raises(ValueError, match="eval"):
        model.forward_kv(torch.zeros(1, 1, dtype=torch.long), model.init_kv_cache(1))


def greedy_by_recomputation(model, prompt, n):
    """Argmax continuation, recomputing one full forward pass for every new token."""
    sequence = prompt.clone()
    for _ in range(n):
        with torch.no_grad():
            logprobs = model(sequence).logprobs[:, -1]
        sequence = torch.cat([sequence, logprobs.argmax(-1, keepdim=True)], dim=1)
    return sequence[:, prompt.size(1) :]


def test_temperature_zero_is_argmax_of_the_full_model(monkeypatch):
    monkeypatch.setattr(generate, "PROMPT_BLOCK", 16)  # the prompt in several blocks
    model = make_model(n_persistent=8, span_init=0.1)
    prompt = torch.randint(13, (2, 40))
    got = torch.stack(list(generate.tokens(model, prompt, 30, Sampling(temperature=0))), dim=1)
    assert torch.equal(got, greedy_by_recomputation(model, prompt, 30))
    # and a temperature near 0 draws the argmax too
    near = torch.stack(
        list(generate.tokens(model, prompt, 30, Sampling(temperature=1e-6), seed=1)), dim=1
    )
    assert torch.equal(near, got)


def test_same_seed_same_tokens():
    model = make_model()
    prompt = torch.randint(13, (1, 10))

    def draw(seed):
        return torch.cat(list(generate.tokens(model, prompt, 30, seed=seed)))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))


def random_logprobs(rows=64, vocab=50, seed=0):
    torch.manual_seed(seed)
    return (torch.randn(rows, vocab) * 2).log_softmax(-1)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_top_k_never_samples_outside_the_k_likeliest(temperature):
    logprobs = random_logprobs()
    top = logprobs.topk(5, dim=-1).indices
    generator = torch.Generator().manual_seed(0)
    sampling = Sampling(temperature=temperature, top_k=5)
    for _ in range(200):
        token = generate.next_token(logprobs, sampling, generator)
        assert (top == token[:, None]).any(-1).all()


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9])
def test_top_p_never_samples_outside_the_nucleus(top_p):
    logprobs = random_logprobs(seed=1)
    generator = torch.Generator().manual_seed(0)
    nucleus = []
    for row in logprobs.exp():  # by hand: likeliest first until the mass reaches p
        mass, chosen = 0.0, set()
        for prob, token in sorted(zip(row.tolist(), range(len(row)), strict=True), reverse=True):
            chosen.add(token)
            mass += prob
            if mass >= top_p:
                break
        nucleus.append(chosen)
    seen = [set() for _ in nucleus]
    for _ in range(300):
        tokens = generate.next_token(logprobs, Sampling(top_p=top_p), generator)
        for row, token in enumerate(tokens.tolist()):
            assert token in nucleus[row]
            seen[row].add(token)
    assert any(len(s) > 1 for s in seen) or top_p == 0.1  # it does sample, not only argmax


def test_top_k_and_top_p_together_and_the_sampling_checks():
    logprobs = random_logprobs(seed=2)
    keep = generate.allowed(logprobs, Sampling(top_k=3, top_p=0.999))
    assert (keep.sum(-1) <= 3).all() and (keep.sum(-1) >= 1).all()
    for bad in (dict(temperature=-1), dict(top_k=0), dict(top_p=0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            Sampling(**bad)


def test_prompt_encoding_per_level():
    byte = Vocabulary((EOS, *map(chr, range(32, 256))), "byte")
    ids = generate.encode_prompt(byte, "é\nA")
    assert [byte.tokens[i] for i in ids] == ["\xc3", "\xa9", EOS, "A"]  # UTF-8 bytes, EOS
    char = Vocabulary(tuple("\nab "), "char")
    assert generate.encode_prompt(char, "ab\n") == [1, 2, 0]
    assert generate.encode_prompt(char, "") == [0]  # an empty prompt starts from a newline
    word = Vocabulary(("the", "cat", EOS), "word")
    assert generate.encode_prompt(word, "the cat\nthe") == [0, 1, 2, 0]
    with pytest.raises(VocabularyError, match=r"character 'z' \(U\+007A\)"):
        generate.encode_prompt(char, "abz")
    with pytest.raises(VocabularyError, match="byte 0x0a"):  # no newline token at all
        generate.encode_prompt(Vocabulary(("a",), "byte"), "a\n")


def test_text_decoder_joins_utf8_bytes_split_over_tokens():
    byte = Vocabulary((EOS, *map(chr, range(32, 256))), "byte")
    decoder = generate.TextDecoder(byte)
    pieces = [decoder(byte.id(t)) for t in ["\xc3", "\xa9", EOS, "A"]]
    assert pieces == ["", "é", "\n", "A"]


@pytest.fixture
def checkpoint_file(tmp_path):
    vocab = Vocabulary(tuple("\nabcdefgh RMEO:"), "char")
    torch.manual_seed(0)
    model = AllAttentionLM(
        ModelConfig(vocab_size=len(vocab), d_model=32, n_heads=4, n_layers=2, attn_span=64)
    )
    path = tmp_path / "model.safetensors"
    checkpoint.save(path, model, vocab=vocab)
    return path


def test_cli_streams_the_same_text_for_the_same_seed(checkpoint_file, tmp_path, capsys):
    args = ["generate", "--checkpoint", str(checkpoint_file), "--max-new-tokens", "40"]
    assert main([*args, "--prompt", "ROMEO:", "--seed", "7"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 40 + 1
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("ROMEO:", encoding="utf-8")
    assert main([*args, "--prompt-file", str(prompt_file), "--seed", "7"]) == 0
    assert capsys.readouterr().out == first
    assert main([*args, "--prompt", "ROMEO:", "--seed", "7", "--no-echo", "--top-k", "2"]) == 0
    assert len(capsys.readouterr().out) == 41


@pytest.mark.parametrize("precision", ["bf16", "fp64"])
def test_generation_at_another_precision(precision, checkpoint_file, capsys):
    """bf16 decodes under autocast, entered per forward pass (nothing leaks to the caller
    between tokens); fp64 converts the weights; both stream the asked-for length."""
    model, _ = checkpoint.load_model(checkpoint_file)
    if precision == "fp64":
        model = model.double()
    ids = generate.tokens(model, torch.tensor([[1, 2, 3]]), 5, seed=0, precision=precision)
    for _ in ids:
        assert not torch.is_autocast_enabled("cpu")
    args = ["generate", "--checkpoint", str(checkpoint_file), "--max-new-tokens", "30"]
    assert main([*args, "--prompt", "ROMEO:", "--runtime.precision", precision]) == 0
    assert len(capsys.readouterr().out) == len("ROMEO:") + 30 + 1


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--runtime.precision", "fp16"], "fp16 needs a CUDA device"),
        (["--prompt", "xyz"], "the prompt has character 'x' (U+0078)"),
        (["--temperature", "-1"], "--temperature (-1.0) must be at least 0"),
        (["--top-p", "2"], "--top-p (2.0) must be in (0, 1]"),
        (["--prompt-file", "/nonexistent"], "No such file or directory"),
    ],
)
def test_cli_errors_are_one_line(checkpoint_file, extra, message, capsys):
    assert main(["generate", "--checkpoint", str(checkpoint_file), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_word_level_sampling_joins_words_and_breaks_lines():
    words = (EOS, "the", "cat", "sat", "on", "a", "mat", ".", "dog", "ran", "far", "away", "!")
    vocab = Vocabulary(words, "word")
    model = make_model(
        n_persistent=8, adaptive_io=True, adaptive_cutoffs=(4, 8), adaptive_div=2
    ).float()
    flat = Sampling(temperature=50.0)  # a random model is peaked: draw every word
    text = generate.sample(model, vocab, "the cat", 200, flat, seed=3)
    assert text[0] in " \n"  # continues the prompt's line: a space, or a line break
    lines = text.split("\n")
    assert len(lines) > 2  # <eos> was drawn: a line break
    for line in lines:
        assert "  " not in line and not line.endswith(" ")
        assert all(word in words for word in line.split())
    after_newline = generate.sample(model, vocab, "the cat\n", 5, flat, seed=3)
    assert not after_newline.startswith(" ")
    assert generate.sample(model, vocab, "the cat", 200, flat, seed=3) == text  # seeded
