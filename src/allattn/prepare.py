"""Corpus preparation: enwik8, text8, WikiText, tiny-shakespeare or any text -> a corpus directory.

Tokenisation follows the original pipeline (DESIGN §3):
    enwik8  every byte is a token; the newline byte is `<eos>`; each split ends with one extra
            `<eos>` unless its last byte is a newline. Bytes [0, 90M) / [90M, 95M) / [95M, 100M).
    text8   leading/trailing whitespace stripped from each split; every character is a token;
            one `<eos>` ends each split. Same 90/5/5 split.
    text    (tiny-shakespeare and any UTF-8 file) every character is a token, newlines too;
            split by characters, 90/5/5 unless chosen otherwise.
    wikitext-103, wikitext-2  word level (DESIGN §2.8): the words of every line plus `<eos>`;
            the splits are the archive's wiki.{train,valid,test}.tokens.
Vocabularies come from the training split: in order of first appearance, or at word level in
descending order of count. Archives and their members are checked against their published
checksums; a mismatch is refused unless `verify=False`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile
import typing
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

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
    word_corpus,
)

log = logging.getLogger(__name__)

NEWLINE = 10
EOS_UNIT = -1  # the unit that stands for an added `<eos>` (no character has it)


@dataclass(frozen=True)
class Member:
    """A file of a corpus inside its archive, with its published size and checksums."""

    path: str  # inside the archive
    checksums: dict[str, str] = field(default_factory=dict)  # algorithm -> hex digest
    size: int | None = None

    @property
    def filename(self) -> str:
        """Its name without the archive's folder (the name in a source folder)."""
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Archive:
    """A canonical zip archive, its published checksums and the members holding the corpus:
    "corpus" (one file, split 90/5/5) or one per split ("train", "valid", "test")."""

    url: str
    members: dict[str, Member]
    checksums: dict[str, str] = field(default_factory=dict)  # of the zip file


def _wikitext(name: str, zip_md5: str, sha256: dict[str, str]) -> Archive:
    """A WikiText archive: `name`-v1.zip holding `name`/wiki.{train,valid,test}.tokens."""
    members = {
        split: Member(
            f"{name}/wiki.{split}.tokens", {"sha256": sha256[split]} if split in sha256 else {}
        )
        for split in ("train", "valid", "test")
    }
    url = f"https://s3.amazonaws.com/research.metamind.io/wikitext/{name}-v1.zip"
    return Archive(url=url, members=members, checksums={"md5": zip_md5})


ARCHIVES = {
    "enwik8": Archive(
        url="http://mattmahoney.net/dc/enwik8.zip",
        members={
            "corpus": Member(
                "enwik8",
                {"sha256": "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"},
                size=100_000_000,
            )
        },
        checksums={"sha256": "547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc"},
    ),
    # text8's published checksum is Matt Mahoney's md5 of the text8 file.
    "text8": Archive(
        url="http://mattmahoney.net/dc/text8.zip",
        members={
            "corpus": Member("text8", {"md5": "3bea1919949baf155f99411df5fada7e"}, size=100_000_000)
        },
    ),
    # The zips' md5 values are torchtext's; the files' sha256 values are those published for
    # the official files (WikiText-103's training file has none we know: recorded, not checked).
    "wikitext-103": _wikitext(
        "wikitext-103",
        "9ddaacaf6af0710eda8c456decff7832",
        {
            "valid": "9aee9f52d6e77de6c7751fc5e7c44287db3ec0eaf15477098acc6b93c1c4250b",
            "test": "56db52eb157b1ab5c89646eef70510c1eca6e12a3bfdb99f0d6b05b4eacb75b9",
        },
    ),
    "wikitext-2": _wikitext(
        "wikitext-2",
        "542ccefacc6c27f945fb54453812b3cd",
        {
            "train": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
            "valid": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
            "test": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
        },
    ),
}
CorpusName = Literal["tiny-shakespeare", "enwik8", "text8", "wikitext-103", "wikitext-2", "text"]
NAMES: tuple[str, ...] = typing.get_args(CorpusName)
WORD_CORPORA = ("wikitext-103", "wikitext-2")


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
        None,
        "local file or URL, or for wikitext a folder of wiki.{train,valid,test}.tokens "
        "(default: the canonical URL / the bundled copy)",
    )
    out: str | None = setting(None, "data directory to write (default: data/NAME)")
    split: tuple[float, ...] = setting(
        DEFAULT_SPLIT,
        "train,valid,test fractions of text corpora",
        parse=fractions,
        metavar="TRAIN,VALID,TEST",
    )
    verify: bool = setting(True, "refuse an archive whose checksum differs from the published")
    unknown_as: str | None = setting(
        None,
        "word-level corpora: map valid/test words the training split lacks to this word of "
        "the training split (e.g. '<unk>'); without it such a word is an error",
        metavar="TOKEN",
    )
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
        unknown_as=options.unknown_as,
        overwrite=options.force,
    )


def _lock_file(out: Path) -> Path:
    """The lock of a corpus directory being written: beside it (it is replaced whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.lock"


class PrepareError(ValueError):
    """The source is missing, fails its checksum, or cannot be prepared."""


def _digests(data: bytes | Path, algorithms: Sequence[str]) -> dict[str, str]:
    """Hex digests of `data` (bytes, or a file read once), algorithm -> digest."""
    hashes = [hashlib.new(algorithm) for algorithm in algorithms]
    if isinstance(data, Path):
        with data.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                for h in hashes:
                    h.update(chunk)
    else:
        for h in hashes:
            h.update(data)
    return {algorithm: h.hexdigest() for algorithm, h in zip(algorithms, hashes, strict=True)}


def _digest(data: bytes | Path, algorithm: str) -> str:
    return _digests(data, (algorithm,))[algorithm]


def _algorithms(published: dict[str, str]) -> tuple[str, ...]:
    """What to compute and record: sha256 always, and every published algorithm."""
    return tuple(dict.fromkeys(("sha256", *published)))


class _Hashing(io.RawIOBase):
    """A binary stream that hashes what is read through it (checksums while tokenising)."""

    def __init__(self, stream: IO[bytes], algorithms: Sequence[str]) -> None:
        self.stream = stream
        self.hashes = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.stream.readinto(buffer)  # type: ignore[attr-defined]
        view = memoryview(buffer)[:n]
        for h in self.hashes.values():
            h.update(view)
        self.size += n
        return n

    def digests(self) -> dict[str, str]:
        """The digests of the whole stream: what was not read yet is read (and hashed) now."""
        buffer = bytearray(1 << 20)
        while self.readinto(buffer):
            pass
        return {algorithm: h.hexdigest() for algorithm, h in self.hashes.items()}


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


def _check(what: str, published: dict[str, str], found: dict[str, str], verify: bool) -> None:
    """Refuse `what` if a published checksum differs (unless not verifying)."""
    for algorithm, expected in published.items():
        if verify and found[algorithm] != expected:
            raise _mismatch(what, algorithm, expected, found[algorithm])


def _check_member(
    what: str, member: Member, found: dict[str, str], size: int, verify: bool, meta: dict[str, Any]
) -> None:
    """Record the member's digests in `meta` and refuse it if one or its size differs."""
    meta |= {f"{member.filename}_{algorithm}": digest for algorithm, digest in found.items()}
    _check(what, member.checksums, found, verify)
    if verify and member.size is not None and size != member.size:
        raise PrepareError(f"{what} has {size:,} bytes, not {member.size:,}")


def _zip_meta(path: Path, archive: Archive, verify: bool) -> dict[str, Any]:
    """The zip file's name and digests; refused if a published checksum differs."""
    found = _digests(path, _algorithms(archive.checksums))
    _check(str(path), archive.checksums, found, verify)
    return {"source_file": path.name} | {f"source_{a}": d for a, d in found.items()}


_UNREADABLE = (zipfile.BadZipFile, zlib.error, EOFError, OSError)


@contextmanager
def _zip_members(path: Path, members: Sequence[Member]) -> Iterator[list[IO[bytes]]]:
    """The members of the zip archive `path`, open for reading; a missing member, or an archive
    that cannot be read (also while the caller reads it), is a one-line PrepareError."""
    try:
        with zipfile.ZipFile(path) as z, ExitStack() as stack:
            names = set(z.namelist())
            missing = [repr(m.path) for m in members if m.path not in names]
            if missing:
                plural = "s" if len(missing) > 1 else ""
                raise PrepareError(f"{path} has no member{plural} {', '.join(missing)}")
            yield [stack.enter_context(z.open(m.path)) for m in members]
    except _UNREADABLE as error:
        raise PrepareError(f"{path} is not a readable zip archive ({error})") from None


def _read_archive(name: str, path: Path, verify: bool) -> tuple[bytes, dict[str, Any]]:
    """The bytes of the single member of corpus `name`'s zip archive, checked, and its meta."""
    archive = ARCHIVES[name]
    member = archive.members["corpus"]
    meta = _zip_meta(path, archive, verify)
    with _zip_members(path, [member]) as (stream,):
        data = stream.read()
    found = _digests(data, _algorithms(member.checksums))
    _check_member(f"{path}:{member.path}", member, found, len(data), verify, meta)
    meta["verified"] = verify
    return data, meta


def _read_words(
    name: str, path: Path, verify: bool, unknown_as: str | None, meta: dict[str, Any]
) -> Corpus:
    """Word corpus `name` from its zip archive or a folder of its three files, each hashed while
    it is tokenised (read once) and checked against its published checksum."""
    archive = ARCHIVES[name]
    members = [archive.members[split] for split in ("train", "valid", "test")]
    with ExitStack() as stack:
        if path.is_dir():
            files = [path / member.filename for member in members]
            missing = [file.name for file in files if not file.is_file()]
            if missing:
                raise PrepareError(f"source folder {path} lacks {', '.join(missing)}")
            meta |= {"source_dir": path.resolve().name}
            streams: list[IO[bytes]] = [stack.enter_context(f.open("rb")) for f in files]
            names = [str(file) for file in files]
        else:
            meta |= _zip_meta(path, archive, verify)
            streams = stack.enter_context(_zip_members(path, members))
            names = [f"{path}:{member.path}" for member in members]
        hashing = [
            _Hashing(s, _algorithms(m.checksums)) for s, m in zip(streams, members, strict=True)
        ]
        texts = {
            split: io.TextIOWrapper(io.BufferedReader(h, 1 << 20), encoding="utf-8")
            for split, h in zip(("train", "valid", "test"), hashing, strict=True)
        }
        digests: dict[str, Any] = {}
        try:
            corpus = word_corpus(texts, meta, unknown_as)
        except CorpusError:  # a file that is not the published one is the likelier cause
            for what, member, h in zip(names, members, hashing, strict=True):
                _check_member(what, member, h.digests(), h.size, verify, digests)
            raise  # no checksum explains it: the error is in the text itself
        for what, member, h in zip(names, members, hashing, strict=True):
            _check_member(what, member, h.digests(), h.size, verify, digests)
    corpus.meta |= digests | {"verified": verify}
    return corpus


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
    unknown_as: str | None = None,
    overwrite: bool = False,
) -> Corpus:
    """Prepare corpus `name` from `source` (a path or URL; defaults per corpus) into `out`.

    `unknown_as` (word-level corpora only): the training-split word that stands for valid/test
    words the training split lacks; without it such a word is an error.
    """
    if name not in NAMES:
        raise PrepareError(f"unknown corpus {name!r}; choose from {', '.join(NAMES)}")
    if name in WORD_CORPORA and tuple(split) != DEFAULT_SPLIT:
        raise PrepareError(f"--split does not apply to {name}: its archive gives the splits")
    if unknown_as is not None and name not in WORD_CORPORA:
        raise PrepareError(
            f"--unknown-as applies to word-level corpora only ({', '.join(WORD_CORPORA)})"
        )
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepareError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrepareError(f"{out} exists and is not empty; pass --force to replace it")
    with lock.hold_file(_lock_file(out), f"corpus directory {out}"):
        atomic.recover_dir(out)  # an earlier prepare killed while replacing `out`
        corpus = _build(name, out, source, split, verify, unknown_as)
        try:
            corpus.save(out, overwrite=overwrite)
        except CorpusError as error:
            raise PrepareError(str(error)) from None
    return corpus


def _build(
    name: str,
    out: Path,
    source: str | None,
    split: Sequence[float],
    verify: bool,
    unknown_as: str | None,
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
    elif name in WORD_CORPORA:
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as wd:
            if source is not None and Path(source).is_dir():
                path = Path(source)
            else:
                path = _fetch(source or ARCHIVES[name].url, Path(wd))
            corpus = _read_words(name, path, verify, unknown_as, meta)
    else:
        with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as wd:
            path = _fetch(source or ARCHIVES[name].url, Path(wd))
            data, archive_meta = _read_archive(name, path, verify)
        meta |= archive_meta | {"split": list(DEFAULT_SPLIT)}
        corpus = enwik8_corpus(data, meta) if name == "enwik8" else text8_corpus(data, meta)
    corpus.meta["name"] = name
    return corpus
