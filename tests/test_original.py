"""Importing checkpoints of the original code, built here from the documented layout."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from allattn import AllAttentionLM, ModelConfig, checkpoint
from allattn.cli import main
from allattn.data import EOS, Vocabulary
from allattn.original import (
    import_original,
    infer_level,
    read_original_vocabulary,
    to_allattn_token,
)

# A small "enwik8": bytes, the newline byte is <eos>; one non-ASCII character (2 bytes).
CORPUS = "ab ca\nbé d\n\nab\n".encode()


def original_train_txt(path):
    """The original's prepared train.txt: decimal byte values, newline byte = line break."""
    lines = CORPUS.split(b"\n")[:-1]
    path.write_text("".join(" ".join(str(b) for b in line) + "\n" for line in lines))
    return path


def allattn_vocab() -> Vocabulary:
    """allattn's byte vocabulary, deliberately in another order than the original's."""
    tokens = [*sorted({chr(b) for b in CORPUS if b != 10}), EOS]
    return Vocabulary(tuple(reversed(tokens)), "byte")


def config(**changes) -> ModelConfig:
    base = dict(
        vocab_size=len(allattn_vocab()),
        d_model=16,
        n_heads=2,
        n_layers=2,
        n_persistent=5,
        attn_span=96,
        span_ramp=32,
        dropout=0.2,
        adapt_cache=False,
    )
    base.update(changes)
    return ModelConfig(**base)


def make_model(cfg: ModelConfig) -> AllAttentionLM:
    torch.manual_seed(0)
    model = AllAttentionLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # spans, norms and biases away from their init
        for layer in model.layers:
            if layer.attn.span is not None:
                layer.attn.span.z.uniform_(0, 1)
    return model


def original_state_dict(model: AllAttentionLM, vocab: Vocabulary, original_tokens: list[str]):
    """What the original code's `model.state_dict()` holds for the same network (DESIGN §2)."""
    cfg = model.config
    src = {n: p.detach().clone() for n, p in model.named_parameters()}
    perm = torch.tensor([vocab.id(to_allattn_token(t, "byte")) for t in original_tokens])
    sd = {
        "module.in_emb.weight": src["tok_emb.weight"][perm],
        "module.out_emb.weight": src["out.weight"][perm],
        "module.out_emb.bias": src["out.bias"][perm],
    }
    # key_pe (1, D, S): column S - delta holds p_delta.
    key_pe = torch.empty(1, cfg.head_dim, cfg.attn_span, dtype=src["pos_emb"].dtype)
    for delta in range(1, cfg.attn_span + 1):
        key_pe[0, :, cfg.attn_span - delta] = src["pos_emb"][delta - 1]
    sd["module.key_pe"] = key_pe
    for i in range(cfg.n_layers):
        o, a = f"module.layers.{i}.", f"layers.{i}."
        for orig, ours in (("query", "q"), ("key", "k"), ("val", "v"), ("out", "out")):
            sd[f"{o}attn.proj_{orig}.weight"] = src[f"{a}attn.{ours}_proj.weight"]
        if cfg.adapt_span:
            z = src[f"{a}attn.span.z"].view(cfg.n_heads, 1, 1)
            template = torch.linspace(1 - cfg.attn_span, 0, steps=cfg.attn_span)
            sd[f"{o}attn.attn.adaptive_span._mask.current_val"] = z
            sd[f"{o}attn.attn.adaptive_span._mask.mask_template"] = template
            if cfg.n_persistent:
                sd[f"{o}attn.attn.persistent_memory.adaptive_span._mask.current_val"] = z
                sd[f"{o}attn.attn.persistent_memory.adaptive_span._mask.mask_template"] = template
        if cfg.n_persistent:
            sd[f"{o}attn.attn.persistent_memory.key"] = src[f"{a}attn.memory.key"]
            sd[f"{o}attn.attn.persistent_memory.val"] = src[f"{a}attn.memory.val"]
        for part in ("norm1", "ff.fc1", "ff.fc2", "norm2") if cfg.d_inner else ("norm1",):
            sd[f"{o}{part}.weight"] = src[f"{a}{part}.weight"]
            sd[f"{o}{part}.bias"] = src[f"{a}{part}.bias"]
    return sd


def write_original(path, model, vocab, original_tokens, **extra):
    state = {
        "model": original_state_dict(model, vocab, original_tokens),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.07, "params": [0, 1]}]},
        "logger": {"step": [1000.0, 2000.0], "train_bpc": [2.5, 2.1]},
        "iter_no": 1,
        "scheduler_iter": 2000,
    }
    state.update(extra)
    torch.save(state, path)
    return path


@pytest.fixture
def files(tmp_path):
    train = original_train_txt(tmp_path / "train.txt")
    vocab_path = tmp_path / "vocab.json"
    allattn_vocab().save(vocab_path)
    return tmp_path, train, vocab_path


def test_original_vocabulary_order_and_levels(files):
    _, train, _ = files
    tokens = read_original_vocabulary(train)
    assert tokens == ["97", "98", "32", "99", EOS, "195", "169", "100"]
    assert infer_level(tokens) == "byte"
    assert infer_level(["t", "_", "h", EOS]) == "char"
    assert infer_level(["the", "cat", EOS]) == "word"
    assert [to_allattn_token(t, "byte") for t in ("97", "32", EOS)] == ["a", " ", EOS]
    assert to_allattn_token("_", "char") == " "


@pytest.mark.parametrize(
    "changes",
    [{}, {"n_persistent": 0, "d_inner": 24}, {"adapt_span": False}],
    ids=["all-attention", "ff-baseline", "no-span"],
)
def test_import_with_permuted_vocabulary_reproduces_the_model(files, changes, capsys):
    tmp, train, vocab_path = files
    cfg = config(**changes)
    model = make_model(cfg)
    original_tokens = read_original_vocabulary(train)
    assert original_tokens != [  # the test is only meaningful if the orders differ
        str(ord(t)) if t != EOS else EOS for t in allattn_vocab().tokens
    ]
    original = write_original(tmp / "model.pt", model, allattn_vocab(), original_tokens)
    out = tmp / "imported.safetensors"
    argv = ["import-original", str(original), str(out), "--train-txt", str(train)]
    assert main([*argv, "--vocab", str(vocab_path)]) == 0
    assert "wrote" in capsys.readouterr().out

    imported, ckpt = checkpoint.load_model(out)
    assert ckpt.config == cfg  # dropout 0.2, ramp 32, no adaptive cache: the original's defaults
    assert ckpt.vocab == allattn_vocab()
    assert ckpt.meta["iter_no"] == 1 and ckpt.meta["logger"]["train_bpc"] == [2.5, 2.1]
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(imported.state_dict()[name], tensor, rtol=0, atol=0)
    # The position table by distance: p_1 was the last key_pe column, p_S the first.
    key_pe = torch.load(original, weights_only=True)["model"]["module.key_pe"]
    torch.testing.assert_close(imported.pos_emb[0], key_pe[0, :, -1], rtol=0, atol=0)
    torch.testing.assert_close(imported.pos_emb[-1], key_pe[0, :, 0], rtol=0, atol=0)


def test_import_with_train_txt_only_keeps_the_original_ids(files):
    tmp, train, _ = files
    model = make_model(config()).eval()
    original_tokens = read_original_vocabulary(train)
    original = write_original(tmp / "model.pt", model, allattn_vocab(), original_tokens)
    out = tmp / "imported.safetensors"
    assert main(["import-original", str(original), str(out), "--train-txt", str(train)]) == 0
    imported, ckpt = checkpoint.load_model(out)
    assert ckpt.vocab.level == "byte"
    assert ckpt.vocab.tokens == tuple(to_allattn_token(t, "byte") for t in original_tokens)
    text = [chr(b) if b != 10 else EOS for b in CORPUS]
    with torch.no_grad():
        ours = model(torch.tensor([allattn_vocab().encode(text)])).logprobs
        theirs = imported(torch.tensor([ckpt.vocab.encode(text)])).logprobs
    reorder = torch.tensor(ckpt.vocab.encode(allattn_vocab().tokens))
    torch.testing.assert_close(theirs[..., reorder], ours, rtol=0, atol=1e-6)


def test_options_the_file_cannot_tell_come_from_flags(files):
    tmp, train, vocab_path = files
    model = make_model(config())
    original = write_original(tmp / "m.pt", model, allattn_vocab(), read_original_vocabulary(train))
    out = tmp / "o.safetensors"
    flags = ["--dropout", "0.3", "--span-ramp", "16", "--span-loss-coef", "1e-7", "--adapt-cache"]
    assert (
        main(["import-original", str(original), str(out), "--vocab", str(vocab_path), *flags]) == 0
    )
    cfg = checkpoint.load(out).config
    assert (cfg.dropout, cfg.span_ramp, cfg.span_loss_coef, cfg.adapt_cache) == (
        0.3,
        16,
        1e-7,
        True,
    )


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_import_errors_are_one_line_and_keep_existing_files(files, capsys):
    tmp, train, vocab_path = files
    model = make_model(config())
    tokens = read_original_vocabulary(train)
    original = write_original(tmp / "m.pt", model, allattn_vocab(), tokens)
    out = tmp / "o.safetensors"
    out.write_bytes(b"precious")

    def run(*argv):
        return main(["import-original", *map(str, argv)])

    assert run(original, out, "--vocab", vocab_path) == 2
    assert "exists" in _error(capsys) and out.read_bytes() == b"precious"
    out.unlink()

    assert run(tmp / "missing.pt", out, "--vocab", vocab_path) == 2
    assert "does not exist" in _error(capsys)
    assert run(original, out) == 2
    assert "--train-txt" in _error(capsys)

    (tmp / "short.txt").write_text("97 98\n")
    assert run(original, out, "--train-txt", tmp / "short.txt") == 2
    assert "has 3 distinct tokens, the checkpoint 8" in _error(capsys)

    (tmp / "garbage.pt").write_bytes(b"not a checkpoint")
    assert run(tmp / "garbage.pt", out, "--vocab", vocab_path) == 2
    assert "cannot be read as an original checkpoint" in _error(capsys)

    torch.save({"model": {"x": torch.nn.Linear(2, 2)}}, tmp / "pickled.pt")  # arbitrary object
    assert run(tmp / "pickled.pt", out, "--vocab", vocab_path) == 2
    assert "cannot be read as an original checkpoint" in _error(capsys)

    sd = original_state_dict(model, allattn_vocab(), tokens)
    sd["module.layers.0.attn.extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp / "extra.pt")
    assert run(tmp / "extra.pt", out, "--vocab", vocab_path) == 2
    assert "unexpected entries" in _error(capsys)

    other = Vocabulary(tuple("xyzwvuts"), "char")
    other.save(tmp / "other.json")
    assert run(original, out, "--train-txt", train, "--vocab", tmp / "other.json") == 2
    assert "byte-level, the given one char-level" in _error(capsys)
    assert not out.exists()


def test_info_describes_an_imported_checkpoint(files, capsys):
    tmp, train, vocab_path = files
    model = make_model(config())
    original = write_original(tmp / "m.pt", model, allattn_vocab(), read_original_vocabulary(train))
    out = tmp / "o.safetensors"
    assert main(["import-original", str(original), str(out), "--vocab", str(vocab_path)]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == model.num_parameters()
    assert info["kind"] == "all-attention" and info["vocab_level"] == "byte"


def test_word_level_train_txt_without_adaptive_io_is_first_appearance(files):
    tmp, train, _ = files
    (tmp / "words.txt").write_text("the cat sat on a mat by\n")  # 8 tokens with <eos>, as V
    model = make_model(config())
    original = write_original(tmp / "m.pt", model, allattn_vocab(), read_original_vocabulary(train))
    ckpt = import_original(original, tmp / "o.safetensors", train_txt=tmp / "words.txt")
    assert ckpt.vocab == Vocabulary(("the", "cat", "sat", "on", "a", "mat", "by", EOS), "word")


# -- word level: adaptive input and adaptive softmax (DESIGN §2.8) ---------------------------
WORD_TRAIN = "the cat sat on the mat\nthe dog sat\n\non a log , the cat ran\nbig mat . dog\n"
# Count order (descending, ties in reverse first appearance): <eos> 5, the 4, then the words
# seen twice and those seen once, each in reverse order of first appearance; 13 in all.
WORD_ORDER = [EOS, "the", "dog", "mat", "on", "sat", "cat", ".", "big", "ran", ",", "log", "a"]


def word_config(**changes) -> ModelConfig:
    base = dict(adaptive_io=True, adaptive_cutoffs=(3, 7), adaptive_div=2, vocab_size=13)
    return config(**base | changes)


def original_word_state_dict(model: AllAttentionLM) -> dict[str, torch.Tensor]:
    """The original's state dict of an adaptive-I/O model, from its documented layout: tied
    output layers are the same tensors as the input's."""
    sd = original_state_dict_layers(model)
    src = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = model.config
    for i in range(len(cfg.adaptive_cutoffs) + 1):
        table, projection = src[f"adaptive.tables.{i}.weight"], src[f"adaptive.projections.{i}"]
        sd[f"module.in_emb.emb_layers.{i}.weight"] = table
        sd[f"module.in_emb.emb_projs.{i}"] = projection
        sd[f"module.out_emb.out_layers.{i}.weight"] = src.get(f"adaptive.out_tables.{i}", table)
        sd[f"module.out_emb.out_layers.{i}.bias"] = src[f"adaptive.out_bias.{i}"]
        sd[f"module.out_emb.out_projs.{i}"] = src.get(f"adaptive.out_projections.{i}", projection)
    sd["module.out_emb.cluster_proj.weight"] = src["adaptive.cluster.weight"]
    sd["module.out_emb.cluster_proj.bias"] = src["adaptive.cluster.bias"]
    return sd


def original_state_dict_layers(model: AllAttentionLM) -> dict[str, torch.Tensor]:
    """Everything but the input and output layers (as for character-level checkpoints)."""
    full = model.config.replace(adaptive_io=False, vocab_size=len(allattn_vocab()))
    plain = AllAttentionLM(full).to(model.pos_emb.dtype)
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("adaptive.")},
        strict=False,
    )
    tokens = [t if t == EOS else str(ord(t)) for t in allattn_vocab().tokens]  # as train.txt
    sd = original_state_dict(plain, allattn_vocab(), tokens)
    for name in ("in_emb.weight", "out_emb.weight", "out_emb.bias"):
        del sd[f"module.{name}"]
    return sd


def write_word_original(path, model):
    torch.save({"model": original_word_state_dict(model), "iter_no": 3}, path)
    return path


@pytest.mark.parametrize("tied", [True, False])
def test_word_level_checkpoint_imports_with_equal_logprobs(tmp_path, tied):
    (tmp_path / "train.txt").write_text(WORD_TRAIN)
    model = make_model(word_config(adaptive_tied=tied)).eval()  # float32, as the original's
    original = write_word_original(tmp_path / "m.pt", model)
    out = tmp_path / "o.safetensors"
    assert (
        main(
            ["import-original", str(original), str(out), "--train-txt", str(tmp_path / "train.txt")]
        )
        == 0
    )
    ckpt = checkpoint.load(out)
    assert ckpt.config.adaptive_io and ckpt.config.adaptive_cutoffs == (3, 7)
    assert (ckpt.config.adaptive_div, ckpt.config.adaptive_tied) == (2, tied)
    assert ckpt.vocab is not None and ckpt.vocab.level == "word"
    assert list(ckpt.vocab.tokens) == WORD_ORDER
    imported = ckpt.build_model().eval()
    tokens = torch.randint(13, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = imported(tokens, logprobs=True).logprobs
        theirs = model(tokens, logprobs=True).logprobs
    assert torch.equal(ours, theirs)  # the same weights in the same places


def test_imported_word_ids_agree_with_allattn_prepare(tmp_path):
    source = tmp_path / "wiki"
    source.mkdir()
    (source / "wiki.train.tokens").write_text(WORD_TRAIN)
    (source / "wiki.valid.tokens").write_text("the cat sat\n")
    (source / "wiki.test.tokens").write_text("the dog ran\n")
    argv = ["prepare", "wikitext-103", "--source", str(source), "--out", str(tmp_path / "data")]
    assert main([*argv, "--no-verify", "--quiet"]) == 0
    original = write_word_original(tmp_path / "m.pt", make_model(word_config()))
    ckpt = import_original(
        original, tmp_path / "o.safetensors", train_txt=source / "wiki.train.tokens"
    )
    from allattn.data import Corpus

    assert ckpt.vocab == Corpus.load(tmp_path / "data").vocab  # every token id the same


def test_word_level_import_errors(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(WORD_TRAIN)
    train = ["--train-txt", str(tmp_path / "train.txt")]
    model = make_model(word_config(adaptive_tied=False))
    sd = original_word_state_dict(model)

    def refused(state, *extra, message):
        torch.save({"model": state}, tmp_path / "bad.pt")
        argv = ["import-original", str(tmp_path / "bad.pt"), str(tmp_path / "o.safetensors")]
        assert main([*argv, *extra, "--force"]) == 2
        assert message in _error(capsys)

    half = dict(sd)
    half["module.out_emb.out_layers.0.weight"] = sd["module.in_emb.emb_layers.0.weight"]
    half["module.out_emb.out_projs.0"] = sd["module.in_emb.emb_projs.0"]
    refused(half, *train, message="are tied to the input and the others are not")
    odd = dict(sd)
    for key in ("in_emb.emb_layers.2.weight", "out_emb.out_layers.2.weight"):
        odd[f"module.{key}"] = torch.zeros(7, 3)
    for key in ("in_emb.emb_projs.2", "out_emb.out_projs.2"):
        odd[f"module.{key}"] = torch.zeros(16, 3)
    refused(odd, *train, message="not d_model 16 divided by a power of one divisor")
    (tmp_path / "short.txt").write_text("the cat\n")
    refused(sd, "--train-txt", str(tmp_path / "short.txt"), message="3 distinct tokens")
    words = Vocabulary(tuple(reversed(import_vocab(tmp_path, sd))), "word")
    words.save(tmp_path / "v.json")
    refused(sd, *train, "--vocab", str(tmp_path / "v.json"), message="cannot be permuted")


def import_vocab(tmp_path, sd) -> tuple[str, ...]:
    torch.save({"model": sd}, tmp_path / "good.pt")
    ckpt = import_original(
        tmp_path / "good.pt", tmp_path / "good.safetensors", train_txt=tmp_path / "train.txt"
    )
    assert ckpt.vocab is not None
    return ckpt.vocab.tokens


# -- four clusters, float64, against the original's layout read directly ---------------------
# 39 words, word j seen (j % 4) + 1 times, plus <eos>: V = 40 = the checkpoint's vocab_size.
WIDE_TRAIN = "".join(" ".join(f"w{j}" for j in range(39) if (j % 4) >= r) + "\n" for r in range(4))


def wide_config(**changes) -> ModelConfig:
    base = dict(adaptive_io=True, adaptive_cutoffs=(6, 13, 25), adaptive_div=2, vocab_size=40)
    return config(**base | changes)


def original_embed(sd: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """The original's adaptive input, read from its layout: row of cluster i's table times
    emb_projs.i transposed, times sqrt(d)."""
    sizes = [
        t.size(0)
        for k, t in sd.items()
        if re.fullmatch(r"module\.in_emb\.emb_layers\.\d+\.weight", k)
    ]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    d = sd["module.in_emb.emb_projs.0"].size(0)
    rows = []
    for token in tokens.reshape(-1).tolist():
        i = max(i for i, start in enumerate(starts) if token >= start)
        row = sd[f"module.in_emb.emb_layers.{i}.weight"][token - starts[i]]
        rows.append(row @ sd[f"module.in_emb.emb_projs.{i}"].t() * d**0.5)
    return torch.stack(rows).view(*tokens.shape, d)


def original_logprobs(sd: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Every word's log-probability from the original's layout: the head is cluster 0's words
    then one logit per tail cluster (`cluster_proj`), and tail cluster i adds the head's
    column -i (so tail 1 takes the last one)."""
    out = "module.out_emb."
    k = sd[f"{out}cluster_proj.weight"].size(0)

    def logits(i: int, x: torch.Tensor) -> torch.Tensor:
        weight, bias = sd[f"{out}out_layers.{i}.weight"], sd[f"{out}out_layers.{i}.bias"]
        if i == 0:
            weight = torch.cat([weight, sd[f"{out}cluster_proj.weight"]])
            bias = torch.cat([bias, sd[f"{out}cluster_proj.bias"]])
        return (x @ sd[f"{out}out_projs.{i}"]) @ weight.t() + bias

    head = torch.log_softmax(logits(0, h), dim=-1)
    parts = [head[..., :-k]]
    parts += [
        head[..., -i, None] + torch.log_softmax(logits(i, h), dim=-1) for i in range(1, k + 1)
    ]
    return torch.cat(parts, dim=-1)


@pytest.mark.parametrize("tied", [True, False])
def test_four_cluster_float64_import_equals_the_original_layout(tmp_path, tied):
    (tmp_path / "train.txt").write_text(WIDE_TRAIN)
    model = make_model(wide_config(adaptive_tied=tied)).double().eval()
    original = write_word_original(tmp_path / "m.pt", model)
    ckpt = import_original(original, tmp_path / "o.safetensors", train_txt=tmp_path / "train.txt")
    cfg = ckpt.config
    assert (cfg.adaptive_cutoffs, cfg.adaptive_div, cfg.adaptive_tied) == ((6, 13, 25), 2, tied)
    assert cfg.adaptive_widths() == (16, 8, 4, 2) and cfg.vocab_size == 40
    assert ckpt.vocab is not None and ckpt.vocab.tokens[:4] == (EOS, "w35", "w31", "w27")
    imported, _ = checkpoint.load_model(tmp_path / "o.safetensors")
    assert imported.pos_emb.dtype == torch.float64

    sd = torch.load(original, weights_only=True)["model"]
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(40, (2, 33), generator=gen)
    h = torch.randn(2, 33, 16, dtype=torch.float64, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(
            imported.adaptive.embed(tokens), original_embed(sd, tokens), rtol=0, atol=1e-9
        )
        theirs = original_logprobs(sd, h)
        assert theirs.logsumexp(-1).abs().max() < 1e-9  # a distribution over all 40 words
        torch.testing.assert_close(imported.adaptive.logprobs(h), theirs, rtol=0, atol=1e-9)
        ours = imported(tokens, logprobs=True).logprobs
        source = model(tokens, logprobs=True).logprobs
    torch.testing.assert_close(ours, source, rtol=0, atol=1e-9)


def test_word_level_vocab_in_the_original_order_is_accepted(tmp_path, capsys):
    source = tmp_path / "wiki"
    source.mkdir()
    (source / "wiki.train.tokens").write_text(WORD_TRAIN)
    (source / "wiki.valid.tokens").write_text("the cat\n")
    (source / "wiki.test.tokens").write_text("a log\n")
    data = tmp_path / "data"
    argv = ["prepare", "wikitext-2", "--source", str(source), "--out", str(data)]
    assert main([*argv, "--no-verify", "--quiet"]) == 0
    original = write_word_original(tmp_path / "m.pt", make_model(word_config()))
    out = tmp_path / "o.safetensors"
    train = ["--train-txt", str(source / "wiki.train.tokens")]
    argv = ["import-original", str(original), str(out), *train, "--vocab", str(data / "vocab.json")]
    assert main(argv) == 0
    assert "word vocabulary of 13" in capsys.readouterr().out
    assert list(checkpoint.load(out).vocab.tokens) == WORD_ORDER

    Vocabulary(tuple("abcdefghijklm"), "char").save(tmp_path / "chars.json")
    argv = ["import-original", str(original), str(out), "--vocab", str(tmp_path / "chars.json")]
    assert main([*argv, "--force"]) == 2
    assert "char-level; the checkpoint has adaptive input/softmax" in _error(capsys)


def test_word_level_layout_errors(tmp_path, capsys):
    (tmp_path / "train.txt").write_text(WORD_TRAIN)
    sd = original_word_state_dict(make_model(word_config()))

    def refused(state, *extra, message):
        torch.save({"model": state}, tmp_path / "bad.pt")
        argv = ["import-original", str(tmp_path / "bad.pt"), str(tmp_path / "o.safetensors")]
        assert main([*argv, *extra]) == 2
        assert message in _error(capsys)
        assert not (tmp_path / "o.safetensors").exists()

    train = ["--train-txt", str(tmp_path / "train.txt")]
    rows = dict(sd, **{"module.out_emb.cluster_proj.weight": torch.zeros(3, 16)})
    refused(rows, *train, message="expected (2, 16): one row per tail cluster")
    bias = dict(sd, **{"module.out_emb.out_layers.1.bias": torch.zeros(5)})
    refused(bias, *train, message="bias (5,) for 4 words")
    refused(sd, *train, "--level", "char", message="which is word level, not char")
    mixed = dict(sd, **{"module.key_pe": sd["module.key_pe"].double()})
    refused(mixed, *train, message="are float32, float64; allattn imports weights that are all")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    refused(sd, "--train-txt", str(tmp_path / "latin1.txt"), message="not UTF-8")


def test_an_imported_checkpoint_starts_a_training_run(files, tmp_path):
    """Fine-tuning the authors' models: import, then --train.init_from (new optimiser)."""
    from allattn import train
    from allattn.config import OptimConfig, RunConfig, TrainConfig
    from allattn.data import Corpus

    tmp, train_txt, vocab_path = files
    model = make_model(config())
    original_tokens = read_original_vocabulary(train_txt)
    original = write_original(tmp / "model.pt", model, allattn_vocab(), original_tokens)
    imported = tmp / "imported.safetensors"
    import_original(original, imported, train_txt=train_txt, vocab=vocab_path)
    rng = np.random.default_rng(0)
    sizes = {"train": 400, "valid": 100, "test": 100}
    splits = {s: rng.integers(0, len(allattn_vocab()), size=n) for s, n in sizes.items()}
    Corpus(allattn_vocab(), splits, {"name": "bytes"}).save(tmp_path / "data")
    run = RunConfig(
        model=config(dropout=0.0),  # the training-only dropout may differ from the original's
        optim=OptimConfig(lr=1e-30, warmup_steps=1),  # a negligible step: the import's weights
        train=TrainConfig(
            data=str(tmp_path / "data"),
            batch_size=2,
            block_size=8,
            steps=1,
            eval_interval=1,
            init_from=str(imported),
        ),
    )
    train.run(run, tmp_path / "tuned")
    tuned = checkpoint.load(tmp_path / "tuned" / train.LAST)
    assert tuned.meta["step"] == 1 and tuned.config == config(dropout=0.0)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tuned.weights[name], tensor, rtol=0, atol=1e-12)
