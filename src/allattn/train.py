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
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from . import checkpoint
from .checkpoint import BEST, LAST, CheckpointError, atomic_write_bytes
from .config import ConfigError, RunConfig
from .data import Corpus, CorpusError, load_corpus
from .model import AllAttentionLM, Cache
from .optim import Optimizer

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CONFIG = "config.toml"
# Model fields a resumed run may change: they act in training only.
RESUMABLE_MODEL_FIELDS = {"dropout", "emb_dropout", "span_loss_coef"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--train.device {name}: CUDA is not available")
    return torch.device(name)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Streams:
    """B parallel streams over one split, read block by block, wrapping at a random offset."""

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int, split: str) -> None:
        self.tokens = tokens  # (B, T)
        self.block_size = block_size
        length = tokens.shape[1]
        if length < 2 * block_size:
            raise CorpusError(
                f"the {split} split gives streams of {length} tokens, too short for "
                f"--train.block_size {block_size} (needs {2 * block_size})"
            )
        self.pos = 0
        self.generator = torch.Generator().manual_seed(seed)

    def next_block(self) -> tuple[Tensor, Tensor, bool]:
        """(x, y) of shape (B, M) and whether the streams wrapped around after this block."""
        p, m = self.pos, self.block_size
        block = torch.from_numpy(np.array(self.tokens[:, p : p + m + 1], dtype=np.int64))
        self.pos += m
        wrapped = self.pos >= self.tokens.shape[1] - m
        if wrapped:
            self.pos = int(torch.randint(0, m, (1,), generator=self.generator))
        return block[:, :-1], block[:, 1:], wrapped

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])
        self.generator.set_state(state["generator"])


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

    def __init__(self, config: RunConfig, corpus: Corpus, run_dir: Path) -> None:
        self.config = config
        self.corpus = corpus
        self.run_dir = run_dir
        train = config.train
        self.device = resolve_device(train.device)
        self.amp = autocast(self.device, train.dtype)
        torch.manual_seed(train.seed)
        self.model = AllAttentionLM(config.model).to(self.device)
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
        checkpoint.save(
            self.run_dir / name,
            self.model,
            vocab=self.corpus.vocab,
            meta=meta,
            state=self.state_dict(),
        )


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


def _bpc(loss: float) -> float:
    return loss / math.log(2)


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
        config = config.replace(model=config.model.replace(vocab_size=len(corpus.vocab)))
    trainer = Trainer(config, corpus, run_dir)
    metrics_path = run_dir / METRICS
    if resume:
        saved = checkpoint.load(last)
        _check_resumable(RunConfig.from_dict(saved.meta["run_config"]), config)
        if saved.vocab != corpus.vocab:
            raise CorpusError(
                f"the vocabulary of {config.train.data or 'the bundled corpus'} "
                f"differs from the checkpoint's"
            )
        trainer.model.load_state_dict(saved.weights)
        trainer.load_state_dict(saved.state, exact=config.train.exact_resume)
        _truncate_metrics(metrics_path, trainer.step)
        log.info("resumed %s at step %d", last, trainer.step)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.unlink(missing_ok=True)
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
    return _loop(trainer, config, metrics_path, progress)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (a crash in between)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    atomic_write_bytes(path, "".join(ln + "\n" for ln in lines).encode())


def _loop(trainer: Trainer, config: RunConfig, metrics_path: Path, progress: bool) -> TrainResult:
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
                "bpc": f"{_bpc(loss):.3f}",
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
                "train_bpc": _bpc(train_loss),
                "valid_loss": valid_loss,
                "valid_bpc": _bpc(valid_loss),
                "lr": stats["lr"],
                "grad_norm": stats["grad_norm"],
                **trainer.model.span_stats(),
                "tokens_per_s": len(interval_losses) * tokens_per_step / elapsed,
                "elapsed_s": time.perf_counter() - start,
            }
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            improved = valid_loss < trainer.best_valid_loss
            trainer.best_valid_loss = min(trainer.best_valid_loss, valid_loss)
            meta = {
                "step": trainer.step,
                "valid_loss": valid_loss,
                "run_config": config.to_dict(),
                "data": config.train.data,
            }
            trainer.save(LAST, meta)
            if improved:
                trainer.save(BEST, meta)
            bar.write(
                f"step {trainer.step}: train {record['train_bpc']:.3f} bpc, "
                f"valid {record['valid_bpc']:.3f} bpc, lr {stats['lr']:.3g}, "
                f"span {record['span_avg']:.0f}/{record['span_max']:.0f}, "
                f"{record['tokens_per_s']:,.0f} tok/s"
            )
            interval_losses = []
            interval_start, interval_first_step = time.perf_counter(), trainer.step
    bar.close()
    return TrainResult(
        step=trainer.step, train_loss=train_loss, valid_loss=valid_loss, run_dir=trainer.run_dir
    )
