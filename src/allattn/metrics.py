"""The numbers a run reports: bits per token and perplexity from nats, and the metrics log.

Losses are mean negative log-likelihoods in nats. What a result is reported as depends on the
level of the corpus (`Measure`): character level in bits per character (bpc), byte level
(enwik8, raw bytes) in bits per byte (bpb: the paper's enwik8 "bpc" are bits per byte, as the
authors later corrected), both nats / ln 2; word level as perplexity (ppl, exp nats).
A run directory's `metrics.jsonl` holds one JSON object per validation, in step order. It is
appended before the checkpoint of the same step is written, so a run killed in between holds a
record (possibly torn: a last line without its newline) beyond its checkpoint; `truncate`, run
on resume, drops it, and the resumed run writes it again. With `--train.tensorboard` the same
scalars also go to TensorBoard event files in RUN_DIR/tensorboard (`TensorBoard`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .config import ConfigError

METRICS = "metrics.jsonl"
"""The metrics log of a run directory."""
TENSORBOARD = "tensorboard"
"""The TensorBoard event files of a run directory (`--train.tensorboard`)."""


def bits(nats: float) -> float:
    """Bits per token (per character at character level) of a loss in nats."""
    return nats / math.log(2)


def perplexity(nats: float) -> float:
    """exp(nats); infinite where that overflows a float."""
    return math.exp(nats) if nats < 700 else math.inf


@dataclass(frozen=True)
class Measure:
    """How results of one level are reported: `key` in JSON and metrics.jsonl, `name` in text."""

    key: str
    name: str
    of_nats: Callable[[float], float]

    def __call__(self, nats: float) -> float:
        return self.of_nats(nats)

    def format(self, nats: float) -> str:
        """'2.469 bpc', '1.010 bpb' or 'ppl 20.60'."""
        if self.key == "ppl":
            return f"ppl {self(nats):.2f}"
        return f"{self(nats):.3f} {self.key}"

    def describe(self, nats: float) -> str:
        """'2.469 bits per character', '1.010 bits per byte' or 'perplexity 20.60'."""
        if self.key == "ppl":
            return f"perplexity {self(nats):.2f}"
        return f"{self(nats):.3f} {self.name}"


MEASURES = {
    "char": Measure("bpc", "bits per character", bits),
    "byte": Measure("bpb", "bits per byte", bits),
    "word": Measure("ppl", "perplexity", perplexity),
}


def measure(level: str) -> Measure:
    """The measure of a vocabulary level: char -> bpc, byte -> bpb, word -> ppl."""
    return MEASURES[level]


class MetricsError(ValueError):
    """`metrics.jsonl` is malformed."""


class MetricsLog:
    """`metrics.jsonl` of a run directory: appended at every validation, read back in order;
    with `tensorboard`, every record's scalars also go to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS
        self.tensorboard = TensorBoard(Path(run_dir) / TENSORBOARD) if tensorboard else None

    def append(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as error:
            raise atomic.WriteError(
                error.errno, f"cannot write {self.path}: {error.strerror or error}"
            ) from None
        if self.tensorboard is not None:
            self.tensorboard.add(record)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()

    def records(self, torn_ok: bool = False) -> list[dict[str, Any]]:
        """The records in order; `torn_ok`: ignore a last line cut short by a crash."""
        return self.read(torn_ok)[0]

    def read(self, torn_ok: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """`records(torn_ok)`, and whether the last line lacks its newline (cut short by a
        crash, or still being written), from one read of the file."""
        if not self.path.exists():
            return [], False
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise MetricsError(f"{self.path}: unreadable ({error})") from None
        lines = text.split("\n")
        complete, last = lines[:-1], lines[-1]  # `last` is "" unless the final line is torn
        records = []
        for number, line in enumerate(complete, 1):
            records.append(self._parse(line, number))
        if last and not torn_ok:
            records.append(self._parse(last, len(lines)))
        return records, bool(last)

    def _parse(self, line: str, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsError(f"{self.path}: line {number} is not a metrics record")
        return record

    def truncate(self, step: int) -> None:
        """Keep only the records up to `step`: a crash between a validation and its checkpoint
        (or inside the append) leaves one beyond it, which the resumed run writes again."""
        if self.tensorboard is not None:
            self.tensorboard.purge_after(step)
        if not self.path.exists():
            return
        kept = [r for r in self.records(torn_ok=True) if r["step"] <= step]
        atomic.write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        if self.tensorboard is not None:
            self.tensorboard.clear()


def require_tensorboard() -> None:
    """Refuse `--train.tensorboard` in one line where the tensorboard package is missing."""
    try:
        import tensorboard  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--train.tensorboard needs the tensorboard package: pip install 'allattn[tensorboard]'"
        ) from None


class TensorBoard:
    """TensorBoard events of the metrics records: each number under its metrics.jsonl key (the
    per-head spans as spans/layer_L/head_H), at the record's step. The writer opens at the
    first record; after `purge_after(step)` (a resume) it drops events beyond that step."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.writer: Any = None
        self.purge_step: int | None = None

    def add(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.directory), purge_step=self.purge_step)
        step = record["step"]
        for key, value in record.items():
            if key == "spans":
                for layer, heads in enumerate(value):
                    for head, span in enumerate(heads):
                        self.writer.add_scalar(f"spans/layer_{layer}/head_{head}", span, step)
            elif key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def purge_after(self, step: int) -> None:
        self.purge_step = step + 1

    def clear(self) -> None:
        """A fresh run in this directory: the events of an earlier one go."""
        if self.directory.is_dir():
            for path in self.directory.glob("events.out.tfevents.*"):
                path.unlink()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
