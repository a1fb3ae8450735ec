"""Vocabularies and the bundled corpus."""

from __future__ import annotations

import hashlib

import pytest

from allattn.data import EOS, Vocabulary, VocabularyError, bundled_text


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
