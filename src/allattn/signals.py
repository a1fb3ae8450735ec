"""SIGINT and SIGTERM: what schedulers, torchrun and Ctrl-C send, turned into a clean stop.

Outside a training loop either signal raises `Interrupted` (SIGINT: `KeyboardInterrupt` is left
as Python raises it), which the command line reports in one line with the conventional status
(128 + the signal: 130, 143). Inside `deferred()` a signal only sets a flag: the loop finishes the
step it is in, saves it, and then raises `Interrupted`; a second signal stops at once (every
write is atomic, so nothing is torn). Only standard-library imports: the entry point installs
this before torch is imported.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """The process was asked to stop by a signal (a `BaseException`, like KeyboardInterrupt,
    so no `except Exception` swallows it)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = signum
        self.message = message or f"stopped by {signal.Signals(signum).name}"
        super().__init__(self.message)

    @property
    def status(self) -> int:
        """The exit status a shell reports for this signal."""
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def install() -> None:
    """SIGTERM raises `Interrupted` (its default is to die without cleanup); SIGINT keeps
    raising KeyboardInterrupt."""
    if _main_thread():
        signal.signal(signal.SIGTERM, _raise)


class Pending:
    """The signal received inside `deferred()` (None: none yet)."""

    signum: int | None = None

    def check(self, message: str | None = None) -> None:
        """Raise `Interrupted` if a signal came."""
        if self.signum is not None:
            raise Interrupted(self.signum, message)


@contextlib.contextmanager
def deferred() -> Iterator[Pending]:
    """Record SIGINT/SIGTERM instead of acting on them, until the caller `check`s; a second
    signal raises at once. Outside the main thread (where handlers cannot be set) a no-op."""
    pending = Pending()
    if not _main_thread():
        yield pending
        return

    def record(signum: int, frame: FrameType | None) -> None:
        if pending.signum is not None:
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}")
        pending.signum = signum

    previous = {s: signal.signal(s, record) for s in SIGNALS}
    try:
        yield pending
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
