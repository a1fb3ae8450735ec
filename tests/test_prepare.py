"""Corpus preparation on synthetic archives and folders with the real member names (no
downloads)."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pytest

from allattn import prepare as prep
from allattn.cli import main
from allattn.data import EOS, Corpus, CorpusError, load_corpus, word_corpus


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
        members={
            "corpus": prep.Member(
                "enwik8", {"sha256": hashlib.sha256(data).hexdigest()}, size=len(data)
            )
        },
        checksums={"sha256": hashlib.sha256(archive.read_bytes()).hexdigest()},
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


# -- WikiText (word level) ------------------------------------------------------------------

WIKITEXT = {
    "train": " = Valkyria = \n \n Senjō no Valkyria 3 : <unk> Chronicles \n"
    " the game the <unk> the \n",
    "valid": " = Valkyria = \r\n the game \n",
    "test": " the <unk> Chronicles \n",
}


def write_wikitext(folder, texts=WIKITEXT, skip=()):
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in texts.items():
        if split not in skip:
            (folder / f"wiki.{split}.tokens").write_bytes(text.encode())
    return folder


def wikitext_zip(path, name="wikitext-2", texts=WIKITEXT, skip=()):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{name}/", "")
        for split, text in texts.items():
            if split not in skip:
                z.writestr(f"{name}/wiki.{split}.tokens", text.encode())
    return path


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_wikitext_from_a_folder_on_the_command_line(tmp_path, capsys):
    source = write_wikitext(tmp_path / "src")
    out = tmp_path / "wt2"
    argv = ["prepare", "wikitext-2", "--source", str(source), "--out", str(out), "--no-verify"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {out}: word level, vocabulary 11, train 19, valid 7, test 4"
    )
    corpus = Corpus.load(out)
    expected = word_corpus(WIKITEXT)
    assert corpus.vocab == expected.vocab and corpus.vocab.level == "word"
    # <eos> 4; the 3; =, Valkyria, <unk> 2 (a tie: the later first appearance first); then the
    # words seen once, the last seen first.
    assert corpus.vocab.tokens[:7] == (EOS, "the", "<unk>", "Valkyria", "=", "game", "Chronicles")
    for split in ("train", "valid", "test"):
        assert np.array_equal(corpus.splits[split], expected.splits[split])
        assert corpus.splits[split].dtype == np.uint8
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "wikitext-2" and meta["level"] == "word" and meta["vocab_size"] == 11
    assert meta["lines"] == {"train": 4, "valid": 2, "test": 1}
    assert meta["verified"] is False and meta["source_dir"] == "src"
    for split, text in WIKITEXT.items():
        assert meta[f"wiki.{split}.tokens_sha256"] == sha256(text)


def test_wikitext_from_its_zip_archive(tmp_path):
    archive = wikitext_zip(tmp_path / "wikitext-103-v1.zip", "wikitext-103")
    texts = dict(WIKITEXT, valid=WIKITEXT["valid"] + "Chronicles game\n")
    argv = ["prepare", "wikitext-103", "--source", str(archive), "--out", str(tmp_path / "a")]
    assert main([*argv, "--no-verify"]) == 0
    corpus = prep.prepare("wikitext-103", tmp_path / "b", source=str(archive), verify=False)
    assert Corpus.load(tmp_path / "a").meta == corpus.meta
    expected = word_corpus(WIKITEXT)
    assert corpus.vocab == expected.vocab
    assert corpus.meta["source_file"] == "wikitext-103-v1.zip"
    assert corpus.meta["source_md5"] == hashlib.md5(archive.read_bytes()).hexdigest()
    assert corpus.meta["source_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert corpus.meta["wiki.train.tokens_sha256"] == sha256(WIKITEXT["train"])
    archive = wikitext_zip(tmp_path / "other.zip", "wikitext-103", texts)
    corpus = prep.prepare("wikitext-103", tmp_path / "c", source=str(archive), verify=False)
    assert corpus.meta["tokens"]["valid"] == 10


def test_wikitext_is_downloaded_from_its_canonical_url(tmp_path, monkeypatch):
    asked = []

    def fetch(source, workdir):
        asked.append(source)
        name = source.rsplit("/", 1)[-1].removesuffix("-v1.zip")
        return wikitext_zip(workdir / "local.zip", name)

    monkeypatch.setattr(prep, "_fetch", fetch)
    prep.prepare("wikitext-2", tmp_path / "wt2", verify=False)
    assert asked == ["https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"]
    prep.prepare("wikitext-103", tmp_path / "wt103", verify=False)
    assert asked[1].endswith("/research.metamind.io/wikitext/wikitext-103-v1.zip")


def test_wikitext_checksums_are_verified(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "out")
    archive = wikitext_zip(tmp_path / "wikitext-2-v1.zip")
    assert main(["prepare", "wikitext-2", "--source", str(archive), "--out", out]) == 2
    err = one_line_error(capsys)
    assert f"{archive}: md5 " in err and "differs from the published 542ccefacc6c" in err
    folder = write_wikitext(tmp_path / "src")
    assert main(["prepare", "wikitext-2", "--source", str(folder), "--out", out]) == 2
    err = one_line_error(capsys)
    assert f"{folder / 'wiki.train.tokens'}: sha256 {sha256(WIKITEXT['train'])} differs" in err
    assert "published 9e9fa1ad" in err and "--no-verify" in err
    # WikiText-103's training file has no published checksum: its valid file is the first refused.
    assert main(["prepare", "wikitext-103", "--source", str(folder), "--out", out]) == 2
    assert f"{folder / 'wiki.valid.tokens'}: sha256 " in one_line_error(capsys)
    # A file that differs is named even when it also makes a word unknown (the likelier cause).
    unknown = write_wikitext(tmp_path / "unknown", dict(WIKITEXT, test="zebra\n"))
    assert main(["prepare", "wikitext-103", "--source", str(unknown), "--out", out]) == 2
    assert "wiki.valid.tokens: sha256" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
    # The published values accepted: verified, from a folder and from the zip.
    published = prep.Archive(
        url="unused",
        members={
            split: prep.Member(f"wikitext-2/wiki.{split}.tokens", {"sha256": sha256(text)})
            for split, text in WIKITEXT.items()
        },
        checksums={"md5": hashlib.md5(archive.read_bytes()).hexdigest()},
    )
    monkeypatch.setitem(prep.ARCHIVES, "wikitext-2", published)
    corpus = prep.prepare("wikitext-2", tmp_path / "a", source=str(folder))
    assert corpus.meta["verified"] is True
    corpus = prep.prepare("wikitext-2", tmp_path / "b", source=str(archive))
    assert corpus.meta["verified"] is True and corpus.meta["tokens"]["train"] == 19


def test_wikitext_sources_and_options_that_cannot_be_used(tmp_path, capsys):
    out = str(tmp_path / "out")

    def prepare(*args: str) -> str:
        assert main(["prepare", *args, "--out", out]) == 2
        return one_line_error(capsys)

    folder = write_wikitext(tmp_path / "partial", skip=("train", "test"))
    err = prepare("wikitext-2", "--source", str(folder), "--no-verify")
    assert err.endswith(f"source folder {folder} lacks wiki.train.tokens, wiki.test.tokens")
    archive = wikitext_zip(tmp_path / "partial.zip", skip=("valid",))
    err = prepare("wikitext-2", "--source", str(archive), "--no-verify")
    assert err.endswith(f"{archive} has no member 'wikitext-2/wiki.valid.tokens'")
    archive = wikitext_zip(tmp_path / "wrong-folder.zip", "wikitext-103")
    assert "has no members 'wikitext-2/wiki.train.tokens', " in prepare(
        "wikitext-2", "--source", str(archive), "--no-verify"
    )
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    assert "not a readable zip archive" in prepare(
        "wikitext-2", "--source", str(tmp_path / "junk.zip"), "--no-verify"
    )
    unknown = write_wikitext(tmp_path / "unknown", dict(WIKITEXT, test="the\nzebra the\n"))
    err = prepare("wikitext-2", "--source", str(unknown), "--no-verify")
    assert "the test split has word 'zebra' (line 2), which the training split lacks" in err
    assert "--unknown-as TOKEN" in err
    err = prepare("wikitext-2", "--source", str(unknown), "--no-verify", "--unknown-as", "<UNK>")
    assert "--unknown-as '<UNK>' is not a word of the training split" in err
    latin1 = write_wikitext(tmp_path / "latin1")
    (latin1 / "wiki.valid.tokens").write_bytes("caf\xe9\n".encode("latin-1"))
    assert "the valid split is not UTF-8 text" in prepare(
        "wikitext-2", "--source", str(latin1), "--no-verify"
    )
    folder = write_wikitext(tmp_path / "src")
    err = prepare("wikitext-2", "--source", str(folder), "--no-verify", "--split", "0.8,0.1,0.1")
    assert "--split does not apply to wikitext-2" in err
    err = prepare("text", "--source", str(folder / "wiki.train.tokens"), "--unknown-as", "<unk>")
    assert "--unknown-as applies to word-level corpora only (wikitext-103, wikitext-2)" in err
    assert not (tmp_path / "out").exists()


def test_wikitext_unknown_words_mapped(tmp_path):
    source = write_wikitext(tmp_path / "src", dict(WIKITEXT, test="zebra the\n\nyak\n"))
    out = tmp_path / "wt2"
    argv = ["prepare", "wikitext-2", "--source", str(source), "--out", str(out), "--no-verify"]
    assert main([*argv, "--unknown-as", "<unk>"]) == 0
    corpus = Corpus.load(out)
    test = [corpus.vocab.tokens[i] for i in corpus.splits["test"].tolist()]
    assert test == ["<unk>", "the", EOS, EOS, "<unk>", EOS]
    assert corpus.meta["unknown_as"] == "<unk>"
    assert corpus.meta["unknown_mapped"] == {"valid": 0, "test": 2}
