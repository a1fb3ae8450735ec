"""Figures of runs and of studies (matplotlib, the `plot` extra: pip install 'allattn[plot]').

`learning_curves` draws what `metrics.jsonl` holds for one or more runs: training and
validation bits (or perplexity) against steps and against wall-clock time, the runs overlaid,
and each run's per-head spans over training. `bars` and `sweep` draw a study's results (mean
and standard deviation over seeds) in the style of the paper's Fig. 2. A run still in progress
can be drawn: a last line cut short by a writer is skipped with a warning.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import atomic
from .config import ConfigError, Settings, setting
from .metrics import MEASURES, METRICS, MetricsLog

log = logging.getLogger(__name__)

FORMATS = ("png", "pdf", "svg")


class PlotError(ValueError):
    """A run directory cannot be drawn (no metrics, nothing recorded yet)."""


@dataclass(frozen=True, kw_only=True)
class PlotOptions(Settings):
    """`allattn plot RUN_DIR... --out FIG.png`."""

    runs: tuple[str, ...] = setting(
        dataclasses.MISSING,
        "run directories (each with the metrics.jsonl of `allattn train`), overlaid",
        positional=True,
        nargs="+",
    )
    out: str = setting(dataclasses.MISSING, "the figure to write (.png, .pdf or .svg)")
    labels: str = setting("", "legend labels, comma-separated, one per run (default: names)")
    dpi: int = setting(120, "resolution of a .png figure, dots per inch")

    def validate(self) -> None:
        self._require_ints(1, "dpi")
        suffix = Path(self.out).suffix.lstrip(".").lower()
        if suffix not in FORMATS:
            raise ConfigError(f"--out {self.out}: the figure must end in .png, .pdf or .svg")
        if self.labels and len(self.labels.split(",")) != len(self.runs):
            raise ConfigError(
                f"--labels gives {len(self.labels.split(','))} labels for {len(self.runs)} runs"
            )


@dataclass
class Curves:
    """One run's records, as series."""

    label: str
    key: str
    """bpc, bpb or ppl (`metrics.Measure.key`)."""
    steps: list[int]
    train: list[float]
    valid: list[float]
    minutes: list[float]
    """Wall-clock minutes of training at each record, summed over resumed sessions."""
    spans: list[list[list[float]]]
    """Per record, each layer's per-head spans (empty without adaptive span)."""


def read_run(run_dir: str | Path, label: str | None = None) -> Curves:
    """The curves of a run directory (finished or in progress)."""
    path = Path(run_dir)
    if not path.is_dir():
        raise PlotError(f"{path}: no such run directory")
    metrics = MetricsLog(path)
    if not metrics.path.is_file():
        raise PlotError(f"{path}: no {METRICS} (no validation has run yet)")
    records, torn = metrics.read(torn_ok=True)
    if torn:
        log.warning("%s: skipped a truncated last line (a run still writing?)", metrics.path)
    if not records:
        raise PlotError(f"{metrics.path}: no records yet")
    key = next((m.key for m in MEASURES.values() if f"valid_{m.key}" in records[0]), None)
    if key is None:
        raise PlotError(f"{metrics.path}: records without train/valid results")
    minutes, offset, previous = [], 0.0, 0.0
    for record in records:
        elapsed = float(record.get("elapsed_s", 0.0))
        if elapsed < previous:  # a resumed session starts its clock again
            offset += previous
        previous = elapsed
        minutes.append((offset + elapsed) / 60)
    return Curves(
        label=label or path.name,
        key=key,
        steps=[r["step"] for r in records],
        train=[r[f"train_{key}"] for r in records],
        valid=[r[f"valid_{key}"] for r in records],
        minutes=minutes,
        spans=[r.get("spans", []) for r in records],
    )


def _axis_label(key: str) -> str:
    return next(m.name for m in MEASURES.values() if m.key == key)


def _figure(rows: int, cols: int, size: tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError("allattn plot needs matplotlib: pip install 'allattn[plot]'") from None
    figure = Figure(figsize=size, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False)


def require_matplotlib() -> None:
    """Refuse in one line, before any work, where matplotlib is missing."""
    _figure(1, 1, (1, 1))


def _save(figure: Any, out: str | Path, dpi: int) -> Path:
    out = Path(out)
    buffer = io.BytesIO()
    figure.savefig(buffer, format=out.suffix.lstrip(".").lower(), dpi=dpi)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(out, buffer.getvalue())
    return out


def learning_curves(runs: Sequence[Curves], out: str | Path, dpi: int = 120) -> Path:
    """Bits (or perplexity) against steps and against time, the runs overlaid (train dashed,
    validation solid), then one panel per run with spans: each head's span over training,
    one colour per layer."""
    with_spans = [run for run in runs if any(run.spans)]
    keys = {run.key for run in runs}
    if len(keys) > 1:
        raise PlotError(f"the runs report different measures ({', '.join(sorted(keys))})")
    figure, axes = _figure(1 + len(with_spans), 2, (11, 4 + 3 * len(with_spans)))
    colours = _colours(len(runs))
    ylabel = _axis_label(runs[0].key)
    for run, colour in zip(runs, colours, strict=True):
        for ax, x in ((axes[0][0], run.steps), (axes[0][1], run.minutes)):
            ax.plot(x, run.train, "--", color=colour, label=f"{run.label} (train)")
            ax.plot(x, run.valid, "-", marker=".", color=colour, label=f"{run.label} (valid)")
    axes[0][0].set_xlabel("training step")
    axes[0][1].set_xlabel("wall-clock time (minutes)")
    for ax in axes[0]:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    axes[0][0].set_title("learning curves")
    axes[0][1].set_title("learning curves against time")
    for row, run in enumerate(with_spans, start=1):
        gs = axes[row][0].get_gridspec()
        for ax in axes[row]:
            ax.remove()
        ax = figure.add_subplot(gs[row, :])
        n_layers = max(len(s) for s in run.spans)
        layer_colours = _colours(n_layers)
        for layer in range(n_layers):
            points = [(step, s[layer]) for step, s in zip(run.steps, run.spans, strict=True) if s]
            n_heads = len(points[0][1])
            for head in range(n_heads):
                ax.plot(
                    [p[0] for p in points],
                    [p[1][head] for p in points],
                    color=layer_colours[layer],
                    alpha=0.8,
                    label=f"layer {layer}" if head == 0 else None,
                )
        ax.set_title(f"{run.label}: each head's learned span (z·S), one line per head")
        ax.set_xlabel("training step")
        ax.set_ylabel("span (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", ncol=min(n_layers, 6))
    return _save(figure, out, dpi)


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(n)]


@dataclass(frozen=True)
class Result:
    """One configuration of a study: its label and its results over seeds."""

    label: str
    mean: float
    std: float
    seeds: int


def bars(
    results: Sequence[Result], out: str | Path, *, title: str, ylabel: str, dpi: int = 120
) -> Path:
    """A bar per configuration with its standard deviation over seeds (the paper's Fig. 2,
    right); the axis starts near the lowest bar so that differences stay visible."""
    figure, axes = _figure(1, 1, (max(6.0, 2.2 * len(results)), 4.5))
    ax = axes[0][0]
    x = range(len(results))
    ax.bar(
        x,
        [r.mean for r in results],
        yerr=[r.std for r in results],
        capsize=5,
        color=_colours(len(results)),
    )
    names = [f"{textwrap.fill(r.label, 18)}\n({r.seeds} seeds)" for r in results]
    ax.set_xticks(list(x), names, fontsize="small")
    low = min(r.mean - r.std for r in results)
    high = max(r.mean + r.std for r in results)
    margin = max(high - low, 1e-3) * 0.5
    ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60))
    ax.grid(axis="y", alpha=0.3)
    return _save(figure, out, dpi)


def sweep(
    xs: Sequence[float],
    results: Sequence[Result],
    out: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    dpi: int = 120,
) -> Path:
    """Mean and standard deviation over seeds against a swept setting (the paper's Fig. 2,
    left: the number of persistent vectors)."""
    figure, axes = _figure(1, 1, (6, 4))
    ax = axes[0][0]
    ax.errorbar(list(xs), [r.mean for r in results], yerr=[r.std for r in results], marker="o",
                capsize=5)  # fmt: skip
    ax.set_xticks(list(xs), [str(int(x)) for x in xs])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(textwrap.fill(title, 60))
    ax.grid(alpha=0.3)
    return _save(figure, out, dpi)


def run(options: PlotOptions) -> Path:
    """`allattn plot`: the learning curves and spans of `options.runs` in `options.out`."""
    require_matplotlib()
    labels = options.labels.split(",") if options.labels else [None] * len(options.runs)
    curves = [read_run(r, label) for r, label in zip(options.runs, labels, strict=True)]
    return learning_curves(curves, options.out, options.dpi)
