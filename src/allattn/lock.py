"""One writer per directory: an exclusive OS file lock (`flock`) on a lock file (a run
directory's `.lock`; a corpus directory, which is replaced whole, has `.NAME.lock` beside it).

The lock belongs to the open file, so it disappears with the process however that ends (kill -9
included): a killed run never leaves its directory locked. The file itself stays, holding the
process id of the last holder for the message a refused writer sees.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

LOCK = ".lock"


class LockedError(OSError):
    """Another process holds the directory."""


@contextlib.contextmanager
def hold(directory: str | Path, what: str = "run directory") -> Iterator[Path]:
    """Hold `directory` (created if needed) alone while the block runs; `LockedError` if
    another process holds it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with hold_file(directory / LOCK, f"{what} {directory}"):
        yield directory


@contextlib.contextmanager
def hold_file(path: Path, subject: str) -> Iterator[None]:
    """Hold the lock file `path` (created if needed); `subject` names what it guards."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
                pid = f" (process {holder})" if holder.isdigit() else ""
                raise LockedError(f"{subject} is in use by another allattn process{pid}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
