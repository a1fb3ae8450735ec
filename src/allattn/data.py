"""Vocabularies and the bundled corpus.

A vocabulary is an ordered list of token strings and a level:
    byte  every byte is a token, written as the one character chr(byte) (Latin-1); the newline
          byte is the token `<eos>` (enwik8, as the original pipeline);
    char  every character is a token, itself (space is " "); `<eos>` ends a split (text8);
    word  whitespace-separated words plus `<eos>` at the end of every line (WikiText).
Ids are positions in the list. The list is stored as JSON next to the token arrays and inside
every checkpoint, so a model always knows its tokens.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

EOS = "<eos>"
LEVELS = ("byte", "char", "word")
BUNDLED_CORPUS = "tinyshakespeare.txt.gz"


class VocabularyError(ValueError):
    """A vocabulary file is malformed or a token is not in the vocabulary."""


@dataclass(frozen=True)
class Vocabulary:
    tokens: tuple[str, ...]
    level: str
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise VocabularyError(f"vocabulary level {self.level!r} is not one of {LEVELS}")
        ids = {token: i for i, token in enumerate(self.tokens)}
        if len(ids) != len(self.tokens):
            raise VocabularyError("vocabulary lists a token twice")
        if self.level in ("byte", "char"):
            bad = [t for t in self.tokens if t != EOS and len(t) != 1]
            if bad:
                raise VocabularyError(f"{self.level}-level token {bad[0]!r} is not one character")
        if self.level == "byte" and any(t != EOS and ord(t) > 255 for t in self.tokens):
            raise VocabularyError("byte-level tokens must be characters 0..255")
        object.__setattr__(self, "_ids", ids)

    @classmethod
    def from_tokens(cls, tokens: Iterable[str], level: str) -> Vocabulary:
        """Vocabulary in order of first appearance (as the original builds it)."""
        return cls(tuple(dict.fromkeys(tokens)), level)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def id(self, token: str) -> int:
        try:
            return self._ids[token]
        except KeyError:
            raise VocabularyError(f"token {token!r} is not in the vocabulary") from None

    def encode(self, tokens: Iterable[str]) -> list[int]:
        return [self.id(token) for token in tokens]

    def decode(self, ids: Sequence[int]) -> str:
        """Text for ids: `<eos>` becomes a newline; bytes are decoded as UTF-8 (lossy)."""
        tokens = [self.tokens[i] for i in ids]
        if self.level == "word":
            lines = " ".join(tokens).split(EOS)
            return "\n".join(line.strip() for line in lines)
        text = "".join("\n" if t == EOS else t for t in tokens)
        if self.level == "byte":
            return text.encode("latin-1").decode("utf-8", errors="replace")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, values: Any) -> Vocabulary:
        if not isinstance(values, dict) or set(values) != {"level", "tokens"}:
            raise VocabularyError("a vocabulary must be a JSON object with 'level' and 'tokens'")
        tokens = values["tokens"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise VocabularyError("vocabulary 'tokens' must be a list of strings")
        return cls(tuple(tokens), values["level"])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise VocabularyError(f"{path}: not a JSON vocabulary ({error})") from None
        try:
            return cls.from_dict(values)
        except VocabularyError as error:
            raise VocabularyError(f"{path}: {error}") from None


def bundled_text() -> str:
    """The bundled default corpus: tiny-shakespeare (1,115,394 characters, public domain)."""
    data = resources.files("allattn") / "data" / BUNDLED_CORPUS
    with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8", newline="") as text:
        return text.read()
