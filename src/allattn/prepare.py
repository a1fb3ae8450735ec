"""Corpus preparation: enwik8, text8, tiny-shakespeare or any text file -> a corpus directory.

Tokenisation follows the original pipeline (DESIGN §3):
    enwik8  every byte is a token; the newline byte is `<eos>`; each split ends with one extra
            `<eos>` unless its last byte is a newline. Bytes [0, 90M) / [90M, 95M) / [95M, 100M).
    text8   leading/trailing whitespace stripped from each split; every character is a token;
            one `<eos>` ends each split. Same 90/5/5 split.
    text    (tiny-shakespeare and any UTF-8 file) every character is a token, newlines too;
            split by characters, 90/5/5 unless chosen otherwise.
Vocabularies come from the training split in order of first appearance. Archives are checked
against their published checksums; a mismatch is refused unless `verify=False`.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import typing
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import __version__, atomic, lock
from .config import Settings, setting
from .data import (
    BUNDLED_SHA256,
    DEFAULT_SPLIT,
    EOS,
    Corpus,
    CorpusError,
    build_corpus,
    bundled_text,
    char_corpus,
    split_points,
)

log = logging.getLogger(__name__)

NEWLINE = 10
EOS_UNIT = -1  # the unit that stands for an added `<eos>` (no character has it)


@dataclass(frozen=True)
class Archive:
    """A canonical zip archive and the member holding the corpus."""

    url: str
    member: str
    size: int
    checksums: dict[str, str]  # of the member: algorithm -> hex digest (published values)
    zip_sha256: str | None = None


ARCHIVES = {
    "enwik8": Archive(
        url="http://mattmahoney.net/dc/enwik8.zip",
        member="enwik8",
        size=100_000_000,
        checksums={"sha256": "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"},
        zip_sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc",
    ),
    # text8's published checksum is Matt Mahoney's md5 of the text8 file.
    "text8": Archive(
        url="http://mattmahoney.net/dc/text8.zip",
        member="text8",
        size=100_000_000,
        checksums={"md5": "3bea1919949baf155f99411df5fada7e"},
    ),
}
CorpusName = Literal["tiny-shakespeare", "enwik8", "text8", "text"]
NAMES: tuple[str, ...] = typing.get_args(CorpusName)


def fractions(text: str) -> tuple[float, ...]:
    """ "0.9,0.05,0.05" -> (0.9, 0.05, 0.05)."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise PrepareError(f"{text!r} is not comma-separated fractions") from None


@dataclass(frozen=True, kw_only=True)
class PrepareOptions(Settings):
    """What `allattn prepare` reads and writes."""

    name: CorpusName = setting("tiny-shakespeare", "the corpus", positional=True)
    source: str | None = setting(
        None, "local file or URL (default: the canonical URL / the bundled copy)"
    )
    out: str | None = setting(None, "data directory to write (default: data/NAME)")
    split: tuple[float, ...] = setting(
        DEFAULT_SPLIT,
        "train,valid,test fractions of text corpora",
        parse=fractions,
        metavar="TRAIN,VALID,TEST",
    )
    verify: bool = setting(True, "refuse an archive whose checksum differs from the published")
    force: bool = setting(False, "replace OUT if it exists")

    @property
    def out_dir(self) -> Path:
        return Path(self.out or f"data/{self.name}")


def run(options: PrepareOptions) -> Corpus:
    """`prepare` with the command's options."""
    return prepare(
        options.name,
        options.out_dir,
        source=options.source,
        split=options.split,
        verify=options.verify,
        overwrite=options.force,
    )


def _lock_file(out: Path) -> Path:
    """The lock of a corpus directory being written: beside it (it is replaced whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.lock"


class PrepareError(ValueError):
    """The source is missing, fails its checksum, or cannot be prepared."""


def _digest(data: bytes | Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    if isinstance(data, Path):
        with data.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(data)
    return h.hexdigest()


def _fetch(source: str, workdir: Path) -> Path:
    """A local path as is; an http(s) URL downloaded into `workdir`."""
    if source.startswith(("http://", "https://")):
        target = workdir / source.rsplit("/", 1)[-1]
        log.info("downloading %s", source)
        try:
            with urllib.request.urlopen(source) as response, target.open("wb") as f:
                shutil.copyfileobj(response, f)
        except OSError as error:
            raise PrepareError(f"cannot download {source} ({error})") from None
        return target
    path = Path(source)
    if not path.is_file():
        raise PrepareError(f"source {path} does not exist")
    return path


def _mismatch(what: str, algorithm: str, expected: str, found: str) -> PrepareError:
    return PrepareError(
        f"{what}: {algorithm} {found} differs from the published {expected} "
        "(pass --no-verify to use it anyway)"
    )


def _read_archive(name: str, path: Path, verify: bool) -> tuple[bytes, dict[str, Any]]:
    archive = ARCHIVES[name]
    meta: dict[str, Any] = {"source_file": path.name, "source_sha256": _digest(path, "sha256")}
    if verify and archive.zip_sha256 and meta["source_sha256"] != archive.zip_sha256:
        raise _mismatch(str(path), "sha256", archive.zip_sha256, meta["source_sha256"])
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(archive.member)
    except KeyError:
        raise PrepareError(f"{path} has no member '{archive.member}'") from None
    except (zipfile.BadZipFile, OSError) as error:
        raise PrepareError(f"{path} is not a readable zip archive ({error})") from None
    for algorithm, expected in archive.checksums.items():
        found = _digest(data, algorithm)
        meta[f"{archive.member}_{algorithm}"] = found
        if verify and found != expected:
            raise _mismatch(f"{path}:{archive.member}", algorithm, expected, found)
    if verify and len(data) != archive.size:
        raise PrepareError(f"{path}:{archive.member} has {len(data):,} bytes, not {archive.size:,}")
    meta["verified"] = verify
    return data, meta


def _three_way(units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    train_end, valid_end = split_points(len(units), DEFAULT_SPLIT)
    return units[:train_end], units[train_end:valid_end], units[valid_end:]


def enwik8_corpus(data: bytes, meta: dict[str, Any]) -> Corpus:
    """Byte level; the newline byte is `<eos>`, and each split ends with an `<eos>`."""
    units = {}
    for split, part in zip(
        ("train", "valid", "test"), _three_way(np.frombuffer(data, np.uint8)), strict=True
    ):
        part = part.astype(np.int64)
        if not len(part) or part[-1] != NEWLINE:
            part = np.append(part, NEWLINE)  # the newline byte is the <eos> token
        units[split] = part
    return build_corpus(units, lambda b: EOS if b == NEWLINE else chr(b), "byte", meta)


def text8_corpus(data: bytes, meta: dict[str, Any]) -> Corpus:
    """Character level; each split stripped of outer whitespace, then one `<eos>` appended."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise PrepareError("text8 must be plain ASCII (lowercase letters and spaces)") from None
    units = {}
    train_end, valid_end = split_points(len(text), DEFAULT_SPLIT)
    parts = (text[:train_end], text[train_end:valid_end], text[valid_end:])
    for split, part in zip(("train", "valid", "test"), parts, strict=True):
        points = np.frombuffer(part.strip().encode("ascii"), np.uint8).astype(np.int64)
        units[split] = np.append(points, EOS_UNIT)
    return build_corpus(units, lambda u: EOS if u == EOS_UNIT else chr(u), "char", meta)


def prepare(
    name: str,
    out: str | Path,
    *,
    source: str | None = None,
    split: Sequence[float] = DEFAULT_SPLIT,
    verify: bool = True,
    overwrite: bool = False,
) -> Corpus:
    """Prepare corpus `name` from `source` (a path or URL; defaults per corpus) into `out`."""
    if name not in NAMES:
        raise PrepareError(f"unknown corpus {name!r}; choose from {', '.join(NAMES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"{out} exists and is not empty; pass --force to replace it")
    with lock.hold_file(_lock_file(out), f"corpus directory {out}"):
        atomic.recover_dir(out)  # an earlier prepare killed while replacing `out`
        corpus = _build(name, out, source, split, verify)
        try:
            corpus.save(out, overwrite=overwrite)
        except CorpusError as error:
            raise PrepareError(str(error)) from None
    return corpus


def _build(
    name: str, out: Path, source: str | None, split: Sequence[float], verify: bool
) -> Corpus:
    meta: dict[str, Any] = {"name": name, "allattn_version": __version__}
    if name == "tiny-shakespeare" and source is None:
        meta |= {"source": "bundled", "source_sha256": BUNDLED_SHA256}
        corpus = char_corpus(bundled_text(), split, meta)
    elif name in ("tiny-shakespeare", "text"):
        if source is None:
            raise PrepareError("`allattn prepare text` needs --source FILE")
        with tempfile.TemporaryDirectory() as workdir:
            path = _fetch(source, Path(workdir))
            raw = path.read_bytes()
        meta |= {"source_file": path.name, "source_sha256": _digest(raw, "sha256")}
        if name == "tiny-shakespeare" and verify and meta["source_sha256"] != BUNDLED_SHA256:
            raise _mismatch(source, "sha256", BUNDLED_SHA256, meta["source_sha256"])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PrepareError(f"{source} is not UTF-8 text ({error})") from None
        corpus = char_corpus(text, split, meta)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as wd:
            path = _fetch(source or ARCHIVES[name].url, Path(wd))
            data, archive_meta = _read_archive(name, path, verify)
        meta |= archive_meta | {"split": list(DEFAULT_SPLIT)}
        corpus = enwik8_corpus(data, meta) if name == "enwik8" else text8_corpus(data, meta)
    corpus.meta["name"] = name
    return corpus
