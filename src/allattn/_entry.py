"""The `allattn` command's entry point: signal handling first, then the (slow) imports, so a
Ctrl-C or SIGTERM while torch loads ends with one line, not a traceback."""

from __future__ import annotations

import os
import sys

from . import signals


def main() -> int:
    signals.install()
    if "WORLD_SIZE" in os.environ:  # a data-parallel launch: errors are ours to report, in a
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")  # line, not c10d's C++ traces
    try:
        from .cli import main as cli_main
    except signals.Interrupted as stop:
        print(f"allattn: {stop.message}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:
        print("allattn: interrupted", file=sys.stderr)
        return 130
    return cli_main()
