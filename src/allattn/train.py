"""Training (DESIGN §3): parallel streams with carried caches, the original optimiser rules,
span loss and clamp, periodic validation, checkpoints, and exact resume (DESIGN §3.0).

The corpus is cut into B contiguous streams. Each step reads a block of M tokens from every
stream, carries each layer's cache to the next step, and at the end of the streams restarts at
a random offset in [0, M) with the caches zeroed. Every `eval_interval` steps the model reads a
tenth as many blocks of the validation split (its own streams and cache, carried between
validations), logs, and writes `last.safetensors` (and `best.safetensors` when the validation
loss improved). Checkpoints hold the positions, caches, RNG states and optimiser state, so a
resumed run continues bit for bit as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from . import checkpoint, runtime
from .checkpoint import BEST, LAST, CheckpointError, atomic_write_bytes
from .config import (
    DEFAULT_PRESET,
    ConfigError,
    ModelConfig,
    RunConfig,
    Settings,
    load_preset,
    setting,
)
from .data import Corpus, CorpusError, Streams, Vocabulary, load_corpus
from .metrics import METRICS, MetricsLog, bits
from .model import AllAttentionLM, Cache
from .optim import Optimizer

log = logging.getLogger(__name__)

CONFIG = "config.toml"
"""The resolved config of a run directory, as TOML."""
__all__ = [
    "BEST",
    "CONFIG",
    "LAST",
    "METRICS",
    "Streams",
    "TrainOptions",
    "TrainResult",
    "Trainer",
    "adopt_vocabulary",
    "describe",
    "resolve_config",
    "run",
    "run_block",
]


@dataclass(frozen=True, kw_only=True)
class TrainOptions(Settings):
    """What `allattn train` starts from and where it writes; the run itself is a `RunConfig`."""

    preset: str | None = setting(None, f"preset name or .toml file (default: {DEFAULT_PRESET})")
    data: str | None = setting(None, "prepared data directory (same as --train.data)")
    out: str | None = setting(None, "run directory (default: runs/PRESET)")
    resume: bool = setting(False, "continue the run in --out (its config, with the overrides)")
    force: bool = setting(False, "restart a run directory from scratch")
    print_config: bool = setting(False, "show the resolved config and parameter count, then stop")
    progress: bool = setting(True, "show a progress bar")


def resolve_config(options: TrainOptions, overrides: dict[str, str]) -> tuple[RunConfig, Path]:
    """The run's config and directory: the preset (or, with `resume`, the run's own config)
    with the `--section.field` overrides applied."""
    assignments = dict(overrides)
    if options.data is not None:
        assignments["train.data"] = options.data
    if options.resume:
        if options.preset:
            raise ConfigError("--resume takes the config from the run, not from --preset")
        if not options.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        run_dir = Path(options.out)
        last = run_dir / LAST
        if not last.exists():
            raise CheckpointError(f"nothing to resume: {last} does not exist")
        saved = checkpoint.load_run_config(last)  # the header only: no tensors
        if saved is None:
            raise ConfigError(f"{run_dir} is not a training run")
        base = saved
    else:
        preset = options.preset or DEFAULT_PRESET
        base = load_preset(preset)
        run_dir = Path(options.out or f"runs/{Path(preset).stem}")
    return base.override(assignments), run_dir


def adopt_vocabulary(config: RunConfig, vocab: Vocabulary) -> RunConfig:
    """`config` with the vocabulary size of its data."""
    if config.model.vocab_size == len(vocab):
        return config
    return config.replace(model=config.model.replace(vocab_size=len(vocab)))


def describe(config: RunConfig) -> str:
    """The resolved config as TOML and its parameter count (`--print-config`); the vocabulary
    size is the data's when the data directory exists."""
    data = config.train.data
    if not data or Path(data).is_dir():
        config = adopt_vocabulary(config, load_corpus(data).vocab)
    model = config.model
    with torch.device("meta"):
        n_params = AllAttentionLM(model).num_parameters()
    return (
        f"{config.to_toml()}\n"
        f"# {model.kind} model: {n_params:,} parameters (vocab_size {model.vocab_size})"
    )


def run_block(
    model: AllAttentionLM,
    x: Tensor,
    y: Tensor,
    cache: Cache,
    batch_split: int,
    amp: contextlib.AbstractContextManager,
    backward: bool,
) -> tuple[float, Cache]:
    """Forward (and backward) of one block in `batch_split` slices; returns the data loss.

    Each slice's loss (data + span term) is divided by the number of slices, so the gradients
    add up to the whole batch's and the span term counts once.
    """
    slices = torch.arange(x.size(0)).chunk(batch_split)
    losses, caches = [], []
    for rows in slices:
        with amp:
            out = model(x[rows], y[rows], [c[rows] for c in cache])
        if backward:
            ((out.loss + out.span_loss) / batch_split).backward()
        losses.append(out.loss.detach())
        caches.append(out.cache)
    new_cache = caches[0] if batch_split == 1 else [torch.cat(c) for c in zip(*caches, strict=True)]
    return torch.stack(losses).mean().item(), new_cache


@dataclass
class TrainResult:
    step: int
    train_loss: float
    valid_loss: float
    run_dir: Path


class Trainer:
    """The state of a run: model, optimiser, streams and caches, and the step count."""

    def __init__(self, config: RunConfig, corpus: Corpus, run_dir: Path | None) -> None:
        self.config = config
        self.corpus = corpus
        self.run_dir = run_dir
        train = config.train
        self.runtime = runtime.resolve(config.runtime)
        self.device = self.runtime.device
        self.amp = self.runtime.autocast()
        torch.manual_seed(train.seed)
        self.model = AllAttentionLM(config.model, self.runtime.attn_impl).to(self.device)
        self.optimizer = Optimizer(self.model.parameters(), config.optim)
        batch = train.batch_size
        self.train_streams = Streams(
            corpus.streams("train", batch), train.block_size, train.seed + 1, "train"
        )
        self.valid_streams = Streams(
            corpus.streams("valid", batch), train.block_size, train.seed + 2, "valid"
        )
        self.train_cache = self.model.init_cache(batch)
        self.valid_cache = self.model.init_cache(batch)
        valid_length = self.valid_streams.tokens.shape[1]
        self.valid_blocks = min(
            max(1, train.eval_interval // 10), math.ceil(valid_length / train.block_size)
        )
        self.step = 0
        self.best_valid_loss = math.inf

    # -- one step and one validation ---------------------------------------------------------
    def _next_block(self, streams: Streams, cache: Cache, backward: bool) -> tuple[float, Cache]:
        """Read the next block of `streams` and run it; the caches are zeroed in place (lengths
        kept) when the streams wrap around after it."""
        x, y, wrapped = streams.next_block()
        loss, cache = run_block(
            self.model,
            x.to(self.device),
            y.to(self.device),
            cache,
            self.config.train.batch_split,
            self.amp,
            backward,
        )
        if wrapped:
            for c in cache:
                c.zero_()
        return loss, cache

    def train_step(self) -> tuple[float, dict[str, float]]:
        self.model.train()
        loss, self.train_cache = self._next_block(self.train_streams, self.train_cache, True)
        stats = self.optimizer.step()
        self.optimizer.zero_grad()
        self.model.clamp_spans()
        self.step += 1
        return loss, stats

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the next `valid_blocks` blocks of the validation streams."""
        self.model.eval()
        total = 0.0
        for _ in range(self.valid_blocks):
            loss, self.valid_cache = self._next_block(self.valid_streams, self.valid_cache, False)
            total += loss
        return total / self.valid_blocks

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "step": self.step,
            "best_valid_loss": self.best_valid_loss,
            "optimizer": self.optimizer.state_dict(),
            "train_streams": self.train_streams.state_dict(),
            "valid_streams": self.valid_streams.state_dict(),
            "train_cache": self.train_cache,
            "valid_cache": self.valid_cache,
            "rng": rng,
        }

    def load_state_dict(self, state: dict[str, Any], exact: bool) -> None:
        self.step = int(state["step"])
        self.best_valid_loss = float(state["best_valid_loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        if not exact:  # the original: data from position 0, zero caches
            return
        self.train_streams.load_state_dict(state["train_streams"])
        self.valid_streams.load_state_dict(state["valid_streams"])
        self.train_cache = [c.to(self.device) for c in state["train_cache"]]
        self.valid_cache = [c.to(self.device) for c in state["valid_cache"]]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def save(self, name: str, meta: dict[str, Any]) -> None:
        if self.run_dir is None:
            raise ValueError("this trainer has no run directory to save to")
        checkpoint.save(
            self.run_dir / name,
            self.model,
            vocab=self.corpus.vocab,
            meta=meta,
            state=self.state_dict(),
            run_config=self.config,
        )


RESUMABLE_MODEL_FIELDS = frozenset(
    f.name for f in dataclasses.fields(ModelConfig) if f.metadata["resumable"]
)
"""Model fields a resumed run may change: they act in training only. The optimiser, training
and runtime sections may all change."""


def _check_resumable(saved: RunConfig, wanted: RunConfig) -> None:
    old, new = saved.model.to_dict(), wanted.model.to_dict()
    changed = [k for k in old if old[k] != new[k] and k not in RESUMABLE_MODEL_FIELDS]
    if changed:
        raise ConfigError(
            f"cannot change --model.{changed[0]} when resuming "
            f"({old[changed[0]]} in the checkpoint, {new[changed[0]]} asked)"
        )
    if wanted.train.exact_resume and saved.train.batch_size != wanted.train.batch_size:
        raise ConfigError(
            "cannot change --train.batch_size when resuming exactly (the caches hold "
            f"{saved.train.batch_size} streams); add --train.exact_resume false"
        )


def run(
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train (or continue training) into `run_dir`; returns the final losses."""
    run_dir = Path(run_dir)
    last = run_dir / LAST
    if last.exists() and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or --force to restart"
        )
    if resume and not last.exists():
        raise CheckpointError(f"nothing to resume: {last} does not exist")
    corpus = load_corpus(config.train.data)
    if config.model.vocab_size != len(corpus.vocab):
        log.info("vocabulary of the data: %d tokens (--model.vocab_size)", len(corpus.vocab))
        config = adopt_vocabulary(config, corpus.vocab)
    trainer = Trainer(config, corpus, run_dir)
    metrics = MetricsLog(run_dir)
    if resume:
        saved = checkpoint.load(last)
        if saved.run_config is None:
            raise CheckpointError(f"{last} is not a checkpoint of a training run")
        _check_resumable(saved.run_config, config)
        if saved.vocab != corpus.vocab:
            raise CorpusError(
                f"the vocabulary of {config.train.data or 'the bundled corpus'} "
                f"differs from the checkpoint's"
            )
        if saved.state is None:
            raise CheckpointError(f"{last} holds no training state to resume from")
        trainer.model.load_state_dict(saved.weights)
        trainer.load_state_dict(saved.state, exact=config.train.exact_resume)
        metrics.truncate(trainer.step)
        log.info("resumed %s at step %d", last, trainer.step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics.clear()
        for name in (BEST, LAST):
            (run_dir / name).unlink(missing_ok=True)
    atomic_write_bytes(run_dir / CONFIG, config.to_toml().encode())
    log.info(
        "%s model, %s parameters, %d train tokens, vocabulary %d, device %s",
        config.model.kind,
        f"{trainer.model.num_parameters():,}",
        corpus.splits["train"].size,
        len(corpus.vocab),
        trainer.device,
    )
    trainer.runtime.log()
    return _loop(trainer, config, metrics, progress, run_dir)


def _loop(
    trainer: Trainer, config: RunConfig, metrics: MetricsLog, progress: bool, run_dir: Path
) -> TrainResult:
    train = config.train
    tokens_per_step = train.batch_size * train.block_size
    interval_losses: list[float] = []
    train_loss = valid_loss = math.nan
    start = time.perf_counter()
    interval_start, interval_first_step = start, trainer.step
    bar = tqdm(
        total=train.steps,
        initial=trainer.step,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    stats: dict[str, float] = {}
    while trainer.step < train.steps:
        loss, stats = trainer.train_step()
        interval_losses.append(loss)
        bar.update(1)
        if bar.n % 10 == 0 or trainer.step == train.steps:
            spans = trainer.model.span_stats()
            elapsed = time.perf_counter() - interval_start
            postfix = {
                "tok/s": f"{(trainer.step - interval_first_step) * tokens_per_step / elapsed:,.0f}",
                "loss": f"{loss:.3f}",
                "bpc": f"{bits(loss):.3f}",
                "span": f"{spans['span_avg']:.0f}/{spans['span_max']:.0f}",
            }
            bar.set_postfix(postfix, refresh=False)
        if trainer.step % train.eval_interval == 0 or trainer.step == train.steps:
            valid_loss = trainer.validate()
            elapsed = time.perf_counter() - interval_start
            train_loss = sum(interval_losses) / len(interval_losses)
            record = {
                "step": trainer.step,
                "train_loss": train_loss,
                "train_bpc": bits(train_loss),
                "valid_loss": valid_loss,
                "valid_bpc": bits(valid_loss),
                "lr": stats["lr"],
                "grad_norm": stats["grad_norm"],
                **trainer.model.span_stats(),
                "tokens_per_s": len(interval_losses) * tokens_per_step / elapsed,
                "elapsed_s": time.perf_counter() - start,
            }
            metrics.append(record)
            improved = valid_loss < trainer.best_valid_loss
            trainer.best_valid_loss = min(trainer.best_valid_loss, valid_loss)
            meta = {"step": trainer.step, "valid_loss": valid_loss}
            trainer.save(LAST, meta)
            if improved:
                trainer.save(BEST, meta)
            log.info(
                "step %d: train %.3f bpc, valid %.3f bpc, lr %.3g, span %.0f/%.0f, %s tok/s",
                trainer.step,
                record["train_bpc"],
                record["valid_bpc"],
                stats["lr"],
                record["span_avg"],
                record["span_max"],
                f"{record['tokens_per_s']:,.0f}",
            )
            interval_losses = []
            interval_start, interval_first_step = time.perf_counter(), trainer.step
    bar.close()
    return TrainResult(
        step=trainer.step, train_loss=train_loss, valid_loss=valid_loss, run_dir=run_dir
    )
