"""Replacing files and directories so that a reader, or a process killed at any instant, sees
the old version or the new one, never a mix and never neither.

A file is written to a temporary sibling (`.NAME.XXXX.tmp`), fsynced, and renamed over the
target. A directory is built as a temporary sibling (`.NAME.XXXX.tmp`) and swapped with the
target in one `renameat2(RENAME_EXCHANGE)` (Linux); where that call is missing, the old
directory is first renamed aside (`.NAME.XXXX.old`) and put back by `recover_dir` if the process
died before the new one took its place. Temporary files keep the user's umask, as `open` does.
Interrupted writes leave their temporaries behind; `remove_stale` deletes them, and callers run
it when they hold the directory alone (a training run's lock, a corpus being prepared).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


class WriteError(OSError):
    """Writing or replacing a file failed (disk full, permissions, ...); the old file is kept.
    Raised as `WriteError(errno, "cannot write PATH: reason")`; prints as the message alone."""

    def __str__(self) -> str:
        return str(self.strerror)


def umask() -> int:
    """The process's file-creation mask (read without changing it, where Linux tells)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temporary(target: Path) -> str:
    """The prefix of `target`'s temporaries (then a random part and a suffix)."""
    return f".{target.name}."


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. a platform where directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write `data` (bytes, or pieces written in order) to `path` atomically: readers and a
    crash see the old file or the new one. Errors name the file; the old file is kept."""
    path = Path(path)
    directory = path.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temporary(path), suffix=TMP_SUFFIX, dir=directory)
    except OSError as error:
        raise WriteError(error.errno, f"cannot write {path}: {error.strerror or error}") from None
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; a file we write follows the umask
        with os.fdopen(fd, "wb") as f:
            for piece in [data] if isinstance(data, bytes | bytearray | memoryview) else data:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise WriteError(
                error.errno, f"cannot write {path}: {error.strerror or error}"
            ) from None
        raise
    fsync_dir(directory)


def copy_file(source: str | Path, target: str | Path) -> None:
    """Make `target` a copy of `source`, atomically. A real copy, not a hard link: the two
    files must not share their bytes on disk, so that one can stand in for the other."""
    source = Path(source)
    try:
        with source.open("rb") as f:
            data = f.read()
    except OSError as error:
        raise WriteError(error.errno, f"cannot read {source}: {error.strerror}") from None
    write_bytes(target, data)


def make_temporary_dir(target: Path) -> Path:
    """A new empty directory next to `target`, to be filled and then `replace_dir`ed in; it has
    the mode a plain `mkdir` would give (mkdtemp makes 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temporary(target), suffix=TMP_SUFFIX, dir=target.parent))
    tmp.chmod(0o777 & ~umask())
    return tmp


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@functools.cache
def _renameat2() -> Any:
    """glibc's renameat2 (None where there is none)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    result = renameat2(
        _AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), ctypes.c_uint(_RENAME_EXCHANGE)
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` in the place of `target` (which may exist); at every
    instant `target` holds the old directory or the new one (see `recover_dir` for systems
    without an atomic exchange)."""
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # now the old directory
    else:
        aside = Path(
            tempfile.mktemp(prefix=_temporary(target), suffix=OLD_SUFFIX, dir=target.parent)
        )
        os.replace(target, aside)
        os.replace(new, target)  # a crash before this line: `recover_dir` puts `aside` back
        shutil.rmtree(aside)
    fsync_dir(target.parent)


def _siblings(target: Path, suffix: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefix = _temporary(target)
    return [
        p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(suffix)
    ]


def recover_dir(target: Path) -> None:
    """After a crash inside `replace_dir` without an atomic exchange: if `target` is missing
    and the old directory was set aside, put it back. Then remove leftover temporaries."""
    if not target.exists():
        old = sorted(_siblings(target, OLD_SUFFIX), key=lambda p: p.stat().st_mtime)
        if old:
            os.replace(old[-1], target)
    for path in _siblings(target, OLD_SUFFIX) + _siblings(target, TMP_SUFFIX):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def remove_stale(directory: Path) -> list[Path]:
    """Delete the temporary files interrupted writes left in `directory`; returns them. Only
    for a directory this process holds alone (another writer's temporaries would go too)."""
    if not directory.is_dir():
        return []
    stale = [
        p
        for p in directory.iterdir()
        if p.name.startswith(".") and p.name.endswith(TMP_SUFFIX) and p.is_file()
    ]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
