"""The numbers a run reports: bits per token and perplexity from nats, and the metrics log.

Losses are mean negative log-likelihoods in nats. Character- and byte-level results are
reported in bits per character (nats / ln 2), word-level ones as perplexity (exp nats).
A run directory's `metrics.jsonl` holds one JSON object per validation, in step order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_bytes

METRICS = "metrics.jsonl"
"""The metrics log of a run directory."""


def bits(nats: float) -> float:
    """Bits per token (per character at character level) of a loss in nats."""
    return nats / math.log(2)


def perplexity(nats: float) -> float:
    """exp(nats); infinite where that overflows a float."""
    return math.exp(nats) if nats < 700 else math.inf


class MetricsLog:
    """`metrics.jsonl` of a run directory: appended at every validation, read back in order."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / METRICS

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def truncate(self, step: int) -> None:
        """Drop records written after `step` (a crash between a validation and its
        checkpoint), so a resumed run's log reads as if it had never stopped."""
        if not self.path.exists():
            return
        kept = [r for r in self.records() if r["step"] <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
