"""Vocabularies, word-level corpora and the bundled corpus."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest

from allattn.data import (
    EOS,
    Corpus,
    CorpusError,
    Vocabulary,
    VocabularyError,
    bundled_text,
    word_corpus,
    word_lines,
)


def test_first_appearance_order_and_round_trip(tmp_path):
    vocab = Vocabulary.from_tokens("hello world", "char")
    assert vocab.tokens == tuple("helo wrd")
    assert vocab.encode("hold") == [0, 3, 2, 7]
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocabulary.load(path) == vocab
    with pytest.raises(VocabularyError, match="token 'z' is not in the vocabulary"):
        vocab.encode("z")


def test_decode_per_level():
    byte = Vocabulary((chr(0xC3), chr(0xA9), "a", EOS), "byte")
    assert byte.decode([2, 0, 1, 3]) == "aé\n"
    words = Vocabulary(("the", "cat", EOS), "word")
    assert words.decode([0, 1, 2, 1, 0]) == "the cat\ncat the"


def test_malformed_vocabularies(tmp_path):
    with pytest.raises(VocabularyError, match="twice"):
        Vocabulary(("a", "a"), "char")
    with pytest.raises(VocabularyError, match="not one character"):
        Vocabulary(("ab",), "char")
    with pytest.raises(VocabularyError, match="level"):
        Vocabulary(("a",), "bytes")
    path = tmp_path / "v.json"
    path.write_text("[1, 2]")
    with pytest.raises(VocabularyError, match=r"v\.json"):
        Vocabulary.load(path)


def test_bundled_corpus_is_tiny_shakespeare():
    text = bundled_text()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    digest = hashlib.sha256(text.encode()).hexdigest()
    assert digest == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def words_of(corpus: Corpus, split: str) -> list[str]:
    return [corpus.vocab.tokens[i] for i in corpus.splits[split].tolist()]


def original_word_vocabulary(path) -> list[str]:
    """The original's sorted dictionary (adaptive-span data.py, sort_dict=True), verbatim."""
    word2count: dict[str, int] = {}
    with open(path, encoding="utf8") as f:
        for line in f:
            for word in [*line.split(), "<eos>"]:
                word2count[word] = word2count.get(word, 0) + 1
    return [word for word, _ in sorted(word2count.items(), key=lambda kv: kv[1])[::-1]]


def test_word_ids_by_descending_count_ties_in_reverse_first_appearance():
    # the cat sat <eos> the dog <eos> <eos> sat cat the <eos>: <eos> 4, the 3, cat 2, sat 2, dog 1;
    # cat and sat tie, and sat (the later first appearance) comes first.
    train = "the cat sat\nthe dog\n\nsat cat the\n"
    corpus = word_corpus({"train": train, "valid": "dog cat\n", "test": "the\n"})
    assert corpus.vocab.tokens == (EOS, "the", "sat", "cat", "dog")
    assert corpus.vocab.level == "word"
    assert corpus.splits["train"].tolist() == [1, 3, 2, 0, 1, 4, 0, 0, 2, 3, 1, 0]
    assert corpus.splits["valid"].tolist() == [4, 3, 0] and corpus.splits["test"].tolist() == [1, 0]
    assert corpus.meta == {
        "level": "word",
        "vocab_size": 5,
        "tokens": {"train": 12, "valid": 3, "test": 2},
        "lines": {"train": 4, "valid": 1, "test": 1},
        "unknown_as": None,
        "unknown_mapped": {"valid": 0, "test": 0},
    }


def test_word_vocabulary_equals_the_originals_on_random_text(tmp_path):
    rng = random.Random(0)
    pool = [f"w{i}" for i in range(40)]
    lines = [" ".join(rng.choices(pool, k=rng.randrange(0, 12))) for _ in range(300)]
    path = tmp_path / "wiki.train.tokens"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(path, encoding="utf-8") as f:
        corpus = word_corpus({"train": f, "valid": "w0\n", "test": "w1\n"})
    assert list(corpus.vocab.tokens) == original_word_vocabulary(path)
    assert words_of(corpus, "train") == [w for line in lines for w in [*line.split(), EOS]]


def test_word_lines_are_universal_newlines(tmp_path):
    text = "a b\r\nc\rd\n\ne"  # \r\n, a lone \r, \n, an empty line, no final newline
    corpus = word_corpus({"train": text, "valid": "a\n", "test": "e"})
    assert words_of(corpus, "train") == ["a", "b", EOS, "c", EOS, "d", EOS, EOS, "e", EOS]
    assert words_of(corpus, "test") == ["e", EOS]
    assert corpus.meta["lines"]["train"] == 5
    path = tmp_path / "text"
    path.write_bytes(text.encode())
    with open(path, encoding="utf-8") as f:  # a file in text mode gives the same lines
        assert list(word_lines(text)) == list(f) == ["a b\n", "c\n", "d\n", "\n", "e"]


def test_whitespace_that_does_not_end_a_line():
    # str.split() separates words at these, but only \n, \r\n and \r end a line: no <eos>
    # between them (str.splitlines would see nine lines here).
    line = "a\x0bb\x0cc\x1cd\x1de\x1ef\x85g\u2028h\u2029i\tj\u3000k\n"
    assert len(line.splitlines()) == 9
    corpus = word_corpus({"train": line, "valid": "a\n", "test": "k\n"})
    assert words_of(corpus, "train") == [*"abcdefghijk", EOS]
    assert corpus.meta["lines"]["train"] == 1


def test_a_byte_order_mark_stays_inside_the_first_word():
    corpus = word_corpus({"train": "\ufeffa b\na\n", "valid": "a\n", "test": "b\n"})
    assert words_of(corpus, "train") == ["\ufeffa", "b", EOS, "a", EOS]
    assert "\ufeffa" in corpus.vocab and "a" in corpus.vocab


def test_a_word_the_training_split_lacks():
    texts = {"train": "a b <unk>\n", "valid": "a\n", "test": "a\nzz b yy\n"}
    with pytest.raises(CorpusError) as error:
        word_corpus(texts)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("the test split has word 'zz' (line 2), which the training split")
    assert "--unknown-as" in message
    corpus = word_corpus(texts, {"name": "x"}, unknown_as="<unk>")
    assert words_of(corpus, "test") == ["a", EOS, "<unk>", "b", "<unk>", EOS]
    assert corpus.meta["unknown_as"] == "<unk>" and corpus.meta["name"] == "x"
    assert corpus.meta["unknown_mapped"] == {"valid": 0, "test": 2}
    with pytest.raises(CorpusError, match=r"--unknown-as '<UNK>' is not a word of the training"):
        word_corpus(texts, unknown_as="<UNK>")


def test_word_splits_that_cannot_be_used():
    with pytest.raises(CorpusError, match="the valid split would hold 0 tokens"):
        word_corpus({"train": "a b\n", "valid": "", "test": "a\n"})
    with pytest.raises(CorpusError, match="the train split would hold 0 tokens"):
        word_corpus({"train": "", "valid": "a\n", "test": "a\n"})
    with pytest.raises(CorpusError, match="needs the test split"):
        word_corpus({"train": "a b\n", "valid": "a\n"})


def test_word_corpus_round_trip_and_id_width(tmp_path):
    small = word_corpus({"train": "a b\nb\n", "valid": "a\n", "test": "b\n"})
    assert small.splits["train"].dtype == np.uint8
    train = "\n".join(" ".join(f"w{i}" for i in range(j, j + 100)) for j in range(0, 70_000, 100))
    corpus = word_corpus({"train": train, "valid": "w69999 w0\n", "test": "w12345\n"})
    assert len(corpus.vocab) == 70_001  # 70,000 words and <eos>
    assert corpus.vocab.tokens[0] == EOS  # 700 times; every word once, the last one first
    assert corpus.vocab.tokens[1:3] == ("w69999", "w69998")
    assert corpus.splits["valid"].tolist() == [1, 70_000, 0]
    corpus.save(tmp_path / "wt")
    loaded = Corpus.load(tmp_path / "wt")
    assert loaded.vocab == corpus.vocab and loaded.meta == corpus.meta
    for split in ("train", "valid", "test"):
        assert loaded.splits[split].dtype == np.uint32
        assert np.array_equal(loaded.splits[split], corpus.splits[split])
