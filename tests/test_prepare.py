"""Corpus preparation on synthetic archives with the real member names (no downloads)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest

from allattn import prepare as prep
from allattn.cli import main
from allattn.data import EOS, Corpus, CorpusError, load_corpus


def synthetic_bytes(n: int = 4000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    alphabet = np.frombuffer(b"abcde fg\n<>" + "é".encode(), np.uint8)
    data = rng.choice(alphabet, size=n)
    data[: len(alphabet)] = alphabet  # every byte value appears early in the training split
    return data.tobytes()


def make_zip(path, member: str, data: bytes):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, data)
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_checksum_mismatch_is_refused(tmp_path, capsys):
    archive = make_zip(tmp_path / "enwik8.zip", "enwik8", synthetic_bytes())
    out = tmp_path / "enwik8"
    assert main(["prepare", "enwik8", "--source", str(archive), "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert "sha256" in err and "differs from the published 547994d9" in err and "--no-verify" in err
    assert not out.exists()
    archive = make_zip(tmp_path / "text8.zip", "text8", b"the cat sat")
    assert main(["prepare", "text8", "--source", str(archive), "--out", str(out)]) == 2
    assert "md5" in one_line_error(capsys)


def test_matching_checksums_are_accepted(tmp_path, monkeypatch):
    data = synthetic_bytes()
    archive = make_zip(tmp_path / "enwik8.zip", "enwik8", data)
    published = prep.Archive(
        url="unused",
        member="enwik8",
        size=len(data),
        checksums={"sha256": hashlib.sha256(data).hexdigest()},
        zip_sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
    )
    monkeypatch.setitem(prep.ARCHIVES, "enwik8", published)
    corpus = prep.prepare("enwik8", tmp_path / "out", source=str(archive))
    assert corpus.meta["verified"] is True


def test_enwik8_tokenisation(tmp_path):
    data = synthetic_bytes()
    archive = make_zip(tmp_path / "enwik8.zip", "enwik8", data)
    out = tmp_path / "enwik8"
    assert (
        main(["prepare", "enwik8", "--source", str(archive), "--out", str(out), "--no-verify"]) == 0
    )
    corpus = Corpus.load(out)
    vocab = corpus.vocab
    assert vocab.level == "byte"
    # First appearance in the training bytes, the newline byte written as <eos>.
    expected = [EOS if b == 10 else chr(b) for b in dict.fromkeys(data[:3600])]
    assert list(vocab.tokens) == expected and len(vocab) == 13
    parts = (data[:3600], data[3600:3800], data[3800:])  # 90% / 5% / 5%
    for split, part in zip(("train", "valid", "test"), parts, strict=True):
        ids = corpus.splits[split]
        tokens = [EOS if b == 10 else chr(b) for b in part]
        if part[-1] != 10:
            tokens.append(EOS)  # one extra <eos> unless the split ends with a newline
        assert vocab.encode(tokens) == ids.tolist()
        assert ids.dtype == np.uint8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tokens"] == {k: len(v) for k, v in corpus.splits.items()}
    assert meta["source_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert meta["vocab_size"] == 13 and meta["level"] == "byte" and meta["verified"] is False


def test_text8_tokenisation(tmp_path):
    words = " anarchism originated as a term of abuse first used against early working class"
    data = (words * 40).encode()
    archive = make_zip(tmp_path / "text8.zip", "text8", data)
    corpus = prep.prepare("text8", tmp_path / "t8", source=str(archive), verify=False)
    assert corpus.vocab.level == "char" and corpus.vocab.tokens[-1] == EOS
    assert " " in corpus.vocab and "_" not in corpus.vocab
    n = len(data)
    parts = (
        data[: round(n * 0.9)],
        data[round(n * 0.9) : round(n * 0.95)],
        data[round(n * 0.95) :],
    )
    for split, part in zip(("train", "valid", "test"), parts, strict=True):
        expected = [*part.decode().strip(), EOS]
        assert corpus.vocab.encode(expected) == corpus.splits[split].tolist()


def test_custom_text_with_a_chosen_split_and_unknown_characters(tmp_path, capsys):
    source = tmp_path / "book.txt"
    source.write_text("hello world\n" * 50)
    out = tmp_path / "book"
    argv = ["prepare", "text", "--source", str(source), "--out", str(out), "--split", "0.8,0.1,0.1"]
    assert main(argv) == 0
    corpus = load_corpus(out)
    assert corpus.meta["tokens"] == {"train": 480, "valid": 60, "test": 60}
    assert corpus.vocab.tokens == tuple("helo wrd\n")
    source.write_text("hello world\n" * 50 + "xyz")
    assert main([*argv[:-2], "--split", "0.8,0.1,0.1", "--force"]) == 2
    assert "the test split has token 'x', which the training split lacks" in one_line_error(capsys)
    assert load_corpus(out).meta["tokens"]["train"] == 480  # the old corpus is intact


def test_tiny_shakespeare_from_the_bundled_copy(tmp_path):
    corpus = prep.prepare("tiny-shakespeare", tmp_path / "ts")
    assert len(corpus.vocab) == 65
    assert corpus.meta["tokens"] == {"train": 1_003_855, "valid": 55_769, "test": 55_770}
    loaded = Corpus.load(tmp_path / "ts")
    assert loaded.vocab == corpus.vocab
    assert np.array_equal(loaded.splits["test"], corpus.splits["test"])
    assert isinstance(loaded.splits["train"], np.memmap)


def test_bad_sources_and_directories(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["prepare", "enwik8", "--source", str(tmp_path / "nope.zip"), "--out", out]) == 2
    assert "does not exist" in one_line_error(capsys)
    bad = make_zip(tmp_path / "enwik8.zip", "wrong-name", b"abc")
    assert main(["prepare", "enwik8", "--source", str(bad), "--out", out, "--no-verify"]) == 2
    assert "has no member 'enwik8'" in one_line_error(capsys)
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert (
        main(
            [
                "prepare",
                "enwik8",
                "--source",
                str(tmp_path / "junk.zip"),
                "--out",
                out,
                "--no-verify",
            ]
        )
        == 2
    )
    assert "not a readable zip" in one_line_error(capsys)
    assert main(["prepare", "wikitext-9"]) == 2
    assert "invalid choice" in one_line_error(capsys)
    assert main(["prepare", "text", "--out", out]) == 2
    assert "needs --source" in one_line_error(capsys)
    assert main(["prepare", "tiny-shakespeare", "--out", out, "--split", "0.5,0.5"]) == 2
    assert "three positive fractions" in one_line_error(capsys)
    with pytest.raises(CorpusError, match="does not exist"):
        Corpus.load(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "vocab.json").write_text("{}")
    with pytest.raises(CorpusError, match=r"lacks meta\.json, train\.npy"):
        Corpus.load(tmp_path / "half")
