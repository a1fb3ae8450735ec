"""Vocabularies, tokenised corpora on disk, parallel streams of blocks, and the bundled corpus.

A vocabulary is an ordered list of token strings and a level:
    byte  every byte is a token, written as the one character chr(byte) (Latin-1); the newline
          byte is the token `<eos>` (enwik8, as the original pipeline);
    char  every character is a token, itself (space is " "); `<eos>` ends a split (text8);
    word  whitespace-separated words plus `<eos>` at the end of every line (WikiText).
Ids are positions in the list. The list is stored as JSON next to the token arrays and inside
every checkpoint, so a model always knows its tokens.

A prepared corpus is a directory: `vocab.json`, `train.npy`, `valid.npy`, `test.npy` (token ids,
memory-mapped when read, no pickles) and `meta.json` (source, checksum, token counts, ...).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import typing
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from . import atomic

EOS = "<eos>"
Level = Literal["byte", "char", "word"]
LEVELS: tuple[str, ...] = typing.get_args(Level)
BUNDLED_CORPUS = "tinyshakespeare.txt.gz"
BUNDLED_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
Split = Literal["train", "valid", "test"]
SPLITS: tuple[str, ...] = typing.get_args(Split)
DEFAULT_SPLIT = (0.9, 0.05, 0.05)


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

    def describe(self) -> str:
        """'a word-level vocabulary of 267,735 tokens'."""
        return f"a {self.level}-level vocabulary of {len(self):,} tokens"

    def require_same(self, other: Vocabulary, mine: str, theirs: str) -> None:
        """`CorpusError` unless `other` is this vocabulary; the message says first whether the
        levels differ (a character-level corpus for a word-level model, say)."""
        if self == other:
            return
        if self.level != other.level:
            raise CorpusError(
                f"{theirs} has {other.describe()} but {mine} {self.describe()}: a "
                f"{other.level}-level corpus cannot be scored by a {self.level}-level model"
            )
        raise CorpusError(f"the vocabulary of {theirs} differs from {mine}'s")

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


class CorpusError(ValueError):
    """A corpus directory is missing, incomplete or inconsistent, or a split is unusable."""


@dataclass
class Corpus:
    """Token ids of the train/valid/test splits with their vocabulary and metadata."""

    vocab: Vocabulary
    splits: dict[str, np.ndarray]
    meta: dict[str, Any]

    def save(self, out: str | Path, overwrite: bool = False) -> None:
        """Write the corpus directory; it appears complete or not at all, and an old one it
        replaces stays complete until the new one takes its place (`atomic.replace_dir`)."""
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise CorpusError(f"{out} exists and is not a directory")
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise CorpusError(f"{out} exists and is not empty; pass --force to replace it")
        tmp = atomic.make_temporary_dir(out)
        try:
            self.vocab.save(tmp / "vocab.json")
            for name, ids in self.splits.items():
                np.save(tmp / f"{name}.npy", ids)
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2) + "\n")
            for path in tmp.iterdir():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
            atomic.replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, path: str | Path) -> Corpus:
        path = Path(path)
        if not path.is_dir():
            raise CorpusError(
                f"data directory {path} does not exist (make one with `allattn prepare`)"
            )
        missing = [
            n
            for n in ("vocab.json", "meta.json", *(f"{s}.npy" for s in SPLITS))
            if not (path / n).is_file()
        ]
        if missing:
            raise CorpusError(f"data directory {path} lacks {', '.join(missing)}")
        vocab = Vocabulary.load(path / "vocab.json")
        try:
            meta = json.loads((path / "meta.json").read_text())
            splits = {s: np.load(path / f"{s}.npy", mmap_mode="r") for s in SPLITS}
        except (ValueError, OSError) as error:
            raise CorpusError(f"{path}: corrupt corpus ({error})") from None
        for name, ids in splits.items():
            if ids.ndim != 1 or ids.dtype.kind not in "iu":
                raise CorpusError(f"{path}/{name}.npy is not a 1-D array of token ids")
            if ids.size and int(ids.max()) >= len(vocab):
                raise CorpusError(f"{path}/{name}.npy has ids beyond the vocabulary")
        return cls(vocab=vocab, splits=splits, meta=meta)

    def streams(self, split: str, batch_size: int) -> np.ndarray:
        """The split as `batch_size` parallel streams, (B, T) (see `batchify`)."""
        return batchify(self.splits[split], batch_size, split)


def batchify(ids: np.ndarray, batch_size: int, split: str = "") -> np.ndarray:
    """B contiguous streams (B, T), T = len // B; the last len mod B tokens are dropped."""
    length = len(ids) // batch_size
    if length < 2:
        raise CorpusError(
            f"the {split} split ({len(ids)} tokens) is too short for {batch_size} streams"
        )
    return ids[: batch_size * length].reshape(batch_size, length)


def read_block(streams: np.ndarray, start: int, block_size: int) -> tuple[Tensor, Tensor]:
    """Inputs and targets (B, M) of the block at `start` of every stream: x = tokens
    start..start+M-1, y = x shifted by one."""
    block = torch.from_numpy(np.array(streams[:, start : start + block_size + 1], np.int64))
    return block[:, :-1], block[:, 1:]


class Streams:
    """B parallel streams over one split, read block by block (training and validation, DESIGN
    §3): at the end of the streams, they restart at a random offset in [0, M)."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int, split: str) -> None:
        self.tokens = tokens  # (B, T)
        self.block_size = block_size
        length = tokens.shape[1]
        if length < 2 * block_size:
            raise CorpusError(
                f"the {split} split gives streams of {length} tokens, too short for "
                f"--train.block_size {block_size} (needs {2 * block_size})"
            )
        self.pos = 0
        self.generator = torch.Generator().manual_seed(seed)

    def next_block(self) -> tuple[Tensor, Tensor, bool]:
        """(x, y) of shape (B, M) and whether the streams wrapped around after this block."""
        x, y = read_block(self.tokens, self.pos, self.block_size)
        self.pos += self.block_size
        wrapped = self.pos >= self.tokens.shape[1] - self.block_size
        if wrapped:
            self.pos = int(torch.randint(0, self.block_size, (1,), generator=self.generator))
        return x, y, wrapped

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])
        self.generator.set_state(state["generator"])


def full_blocks(streams: np.ndarray, block_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Every full block of the streams from position 0, no wrap-around (full evaluation,
    DESIGN §3): starts p = 0, M, 2M, ... while p + M <= T - 1."""
    for i in range((streams.shape[1] - 1) // block_size):
        yield read_block(streams, i * block_size, block_size)


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise CorpusError(f"vocabulary of {vocab_size} tokens is too large")


def build_corpus(
    units: dict[str, np.ndarray],
    token_of: Callable[[int], str],
    level: str,
    meta: dict[str, Any],
) -> Corpus:
    """Number the units (bytes or code points, one per token) of each split.

    The vocabulary is the training split's units in order of first appearance; `token_of` gives
    each unit's token string. A valid/test unit absent from the training split is an error.
    """
    values, first = np.unique(units["train"], return_index=True)
    order = values[np.argsort(first, kind="stable")]  # units by first appearance
    for name in SPLITS:
        _check_length(name, len(units[name]))
    vocab = Vocabulary(tuple(token_of(int(u)) for u in order), level)
    id_of_sorted = np.empty(len(values), dtype=np.int64)
    id_of_sorted[np.searchsorted(values, order)] = np.arange(len(order))
    dtype = id_dtype(len(vocab))
    splits = {}
    for name in SPLITS:
        split_units = units[name]
        pos = np.searchsorted(values, split_units).clip(0, len(values) - 1)
        unknown = values[pos] != split_units if len(values) else np.ones(len(split_units), bool)
        if unknown.any():
            unit = int(split_units[np.argmax(unknown)])
            raise CorpusError(
                f"the {name} split has token {token_of(unit)!r}, which the training split "
                "lacks (the vocabulary comes from the training split only)"
            )
        splits[name] = id_of_sorted[pos].astype(dtype)
    meta = {
        **meta,
        "level": level,
        "vocab_size": len(vocab),
        "tokens": {name: len(ids) for name, ids in splits.items()},
    }
    return Corpus(vocab=vocab, splits=splits, meta=meta)


def _check_length(split: str, tokens: int) -> None:
    if tokens < 2:
        raise CorpusError(f"the {split} split would hold {tokens} tokens; the text is too short")


def split_points(length: int, split: Sequence[float]) -> tuple[int, int]:
    """Ends of the train and valid parts for fractions (train, valid, test) summing to 1."""
    if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-9:
        raise CorpusError(f"split {tuple(split)} must be three positive fractions summing to 1")
    train_end = round(length * split[0])
    valid_end = round(length * (split[0] + split[1]))
    return train_end, valid_end


def char_corpus(
    text: str, split: Sequence[float] = DEFAULT_SPLIT, meta: dict[str, Any] | None = None
) -> Corpus:
    """A character-level corpus of `text`: every character is a token (newlines too)."""
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    train_end, valid_end = split_points(len(points), split)
    units = {
        "train": points[:train_end],
        "valid": points[train_end:valid_end],
        "test": points[valid_end:],
    }
    meta = {**(meta or {}), "split": list(split), "characters": len(points)}
    return build_corpus(units, chr, "char", meta)


def word_lines(text: str) -> Iterator[str]:
    """The lines of `text` as a file read in text mode gives them (universal newlines): \\n,
    \\r\\n and a lone \\r end a line; \\x0b, \\x0c, \\x1c-\\x1e, \\x85, \\u2028 and \\u2029 do
    not, unlike `str.splitlines`. A last line without a newline is still a line."""
    return iter(io.StringIO(text, newline=None))


class _FirstAppearance(dict[str, int]):
    """Word -> id in order of first appearance: a new word gets the next id."""

    def __missing__(self, word: str) -> int:
        self[word] = number = len(self)
        return number


def _encode_words(
    lines: Iterable[str], split: str, lookup: Callable[[str], int], unknown: int | None
) -> tuple[array, int, int]:
    """The ids of the words of every line plus `<eos>`, the number of lines and the number of
    words mapped to `unknown` (a word `lookup` lacks is an error when `unknown` is None)."""
    ids = array("I")
    number = mapped = 0
    try:
        for number, line in enumerate(lines, 1):
            words = line.split()
            words.append(EOS)
            start = len(ids)
            try:
                ids.extend(map(lookup, words))
            except KeyError as error:
                if unknown is None:
                    raise CorpusError(
                        f"the {split} split has word {error.args[0]!r} (line {number}), which "
                        "the training split lacks (the vocabulary comes from the training split "
                        "only; --unknown-as TOKEN maps such words to TOKEN)"
                    ) from None
                del ids[start:]
                for word in words:
                    try:
                        ids.append(lookup(word))
                    except KeyError:
                        ids.append(unknown)
                        mapped += 1
    except UnicodeDecodeError as error:
        raise CorpusError(f"the {split} split is not UTF-8 text ({error})") from None
    return ids, number, mapped


def _count_order(words: list[str], ids: array) -> tuple[Vocabulary, np.ndarray]:
    """The word-level vocabulary of a split whose `ids` number `words` by first appearance,
    and the first-appearance id of each of its entries: descending count, ties in reverse
    order of first appearance (the original's stable ascending sort, reversed)."""
    counts = np.bincount(np.frombuffer(ids, np.uintc), minlength=len(words))
    order = np.argsort(counts, kind="stable")[::-1]
    return Vocabulary(tuple(words[i] for i in order.tolist()), "word"), order


def word_vocabulary(lines: Iterable[str]) -> Vocabulary:
    """The vocabulary `word_corpus` numbers a training split of these lines with (the
    original's order for adaptive input/softmax, DESIGN §2.8)."""
    first = _FirstAppearance()
    ids, _, _ = _encode_words(lines, "train", first.__getitem__, None)
    return _count_order(list(first), ids)[0]


def word_corpus(
    texts: Mapping[str, str | Iterable[str]],
    meta: dict[str, Any] | None = None,
    unknown_as: str | None = None,
) -> Corpus:
    """A word-level corpus (DESIGN §2.8): the words of every line (`str.split()`) plus `<eos>`.

    `texts` gives each split ("train", "valid", "test") as its text or as its lines (an open
    text file; read with universal newlines, as `word_lines` splits a text). The vocabulary is
    the training split's words in descending order of count, ties in reverse order of first
    appearance (the original sorts by count with a stable sort and reverses); `<eos>` is an
    ordinary word in that order. A valid/test word the training split lacks is an error, or
    with `unknown_as` (a word of the training split, e.g. "<unk>") becomes that word.
    """
    missing = [name for name in SPLITS if name not in texts]
    if missing:
        raise CorpusError(f"a word-level corpus needs the {', '.join(missing)} split")
    lines = {name: word_lines(t) if isinstance(t, str) else t for name, t in texts.items()}
    first = _FirstAppearance()
    train, n_lines, _ = _encode_words(lines["train"], "train", first.__getitem__, None)
    _check_length("train", len(train))
    vocab, order = _count_order(list(first), train)
    dtype = id_dtype(len(vocab))
    new_id = np.empty(len(vocab), dtype)
    new_id[order] = np.arange(len(vocab))
    splits = {"train": new_id[np.frombuffer(train, np.uintc)]}
    del train, first
    line_counts = {"train": n_lines}
    mapped = {}
    ids = {word: i for i, word in enumerate(vocab.tokens)}
    if unknown_as is not None and unknown_as not in ids:
        raise CorpusError(
            f"--unknown-as {unknown_as!r} is not a word of the training split, so it cannot "
            "stand for the words the training split lacks"
        )
    unknown = None if unknown_as is None else ids[unknown_as]
    for name in SPLITS[1:]:
        encoded, line_counts[name], mapped[name] = _encode_words(
            lines[name], name, ids.__getitem__, unknown
        )
        _check_length(name, len(encoded))
        splits[name] = np.frombuffer(encoded, np.uintc).astype(dtype)
    meta = {
        **(meta or {}),
        "level": "word",
        "vocab_size": len(vocab),
        "tokens": {name: len(splits[name]) for name in SPLITS},
        "lines": line_counts,
        "unknown_as": unknown_as,
        "unknown_mapped": mapped,
    }
    return Corpus(vocab=vocab, splits=splits, meta=meta)


def load_corpus(path: str | Path | None) -> Corpus:
    """A prepared corpus directory, or for None or "" the bundled tiny-shakespeare as
    `allattn prepare tiny-shakespeare` makes it (character level, split 90/5/5)."""
    if path:
        return Corpus.load(path)
    meta = {"name": "tiny-shakespeare", "source": "bundled", "source_sha256": BUNDLED_SHA256}
    return char_corpus(bundled_text(), DEFAULT_SPLIT, meta)
