"""Child processes of the tests: `allattn.cli.main` forked from the test process.

torch is already imported in the test process, so a forked run costs a fraction of a second
against seconds for a fresh interpreter. Children run with one thread (bitwise-reproducible,
and safe after a fork) and report their exit status and stderr.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from allattn.cli import main


def forked(
    argv: list[str],
    setup: Callable[[], None] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, Path]:
    """Run `main(argv)` in a forked child (with `env` added to its environment); returns
    (pid, stderr file) to `wait` on."""
    err = Path(os.environ.get("TMPDIR", "/tmp")) / f"allattn-child-{os.getpid()}-{time.time_ns()}"
    err.touch()  # before the fork: a child killed at once still leaves it
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            torch.set_num_threads(1)
            os.environ.update(env or {})
            from allattn import signals

            signals.install()
            if setup is not None:
                setup()
            code = main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid, err


def wait(pid: int, err: Path, timeout: float = 120) -> tuple[int, str]:
    """The child's exit status (negative: killed by that signal) and its stderr."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child hung: {err.read_text()}")
        time.sleep(0.01)
    text = err.read_text()
    err.unlink()
    code = os.waitstatus_to_exitcode(status)
    return code, text
