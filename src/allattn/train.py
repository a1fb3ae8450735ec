"""Training (DESIGN §3): parallel streams with carried caches, the original optimiser rules,
span loss and clamp, periodic validation, checkpoints, and exact resume (DESIGN §3.0).

The corpus is cut into B contiguous streams. Each step reads a block of M tokens from every
stream, carries each layer's cache to the next step, and at the end of the streams restarts at
a random offset in [0, M) with the caches zeroed. Every `eval_interval` steps the model reads a
tenth as many blocks of the validation split (its own streams and cache, carried between
validations), logs, and writes `last.safetensors` (and `best.safetensors` when the validation
loss improved). Checkpoints hold the positions, caches, RNG states and optimiser state, so a
resumed run continues bit for bit as if it had never stopped.

Faults (README "Reliability"): a run holds its directory's lock; at a validation it appends to
`metrics.jsonl`, writes `last` and then copies it to `best` if the loss improved, each write
atomic, so a process killed at any instant leaves a state `--resume` continues exactly (the
record beyond `last` is dropped and written again; a `best` not yet copied is copied from
`last`, whose metadata records the best step). SIGINT/SIGTERM finish the step, save it to `last`
and stop. A non-finite loss or weight stops the run at the step it appears, before any file is
written.

Data parallelism (DESIGN §3.0a, `distributed`): under torchrun each of W processes owns B/W of
the B streams, with their caches, and DDP averages the gradients, so the update is the one of a
single process reading all B streams. Losses and validation sums are all-reduced; rank 0 alone
writes files, from a state gathered from every rank (all caches, every rank's RNG), so a run
resumes on any world size that divides B. Every step starts with the ranks agreeing whether to
stop (a signal seen by any of them stops all at the same step), and every file write ends with
them agreeing that it succeeded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from . import atomic, checkpoint, distributed, flex, lock, runtime, signals
from .checkpoint import BEST, LAST, CheckpointError, verify_setting
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
from .metrics import METRICS, MetricsLog, measure, require_tensorboard
from .model import AllAttentionLM, Cache, parameter_count
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
    fallback: bool = setting(
        False, "with --resume: if last.safetensors fails its checks, resume from best"
    )
    verify: bool = verify_setting()
    force: bool = setting(False, "restart a run directory from scratch")
    print_config: bool = setting(False, "show the resolved config and parameter count, then stop")
    progress: bool = setting(True, "show a progress bar")


def resolve_config(options: TrainOptions, overrides: dict[str, str]) -> tuple[RunConfig, Path]:
    """The run's config and directory: the preset (or, with `resume`, the run's own config)
    with the `--section.field` overrides applied."""
    assignments = dict(overrides)
    if options.data is not None:
        assignments["train.data"] = options.data
    if options.fallback and not options.resume:
        raise ConfigError("--fallback only applies with --resume")
    if options.resume:
        if options.preset:
            raise ConfigError("--resume takes the config from the run, not from --preset")
        if options.force:
            raise ConfigError("--resume continues the run, --force restarts it: pass one")
        if not options.out:
            raise ConfigError("--resume needs --out RUN_DIR")
        run_dir = Path(options.out)
        last = run_dir / LAST
        if not last.exists():
            raise CheckpointError(f"nothing to resume: {last} does not exist")
        try:
            saved = checkpoint.load_run_config(last)  # the header only: no tensors
        except CheckpointError:
            if not options.fallback or not (run_dir / BEST).is_file():
                raise
            saved = checkpoint.load_run_config(run_dir / BEST)
        if saved is None:
            raise ConfigError(f"{run_dir} is not a training run")
        base = saved
    else:
        preset = options.preset or DEFAULT_PRESET
        base = load_preset(preset)
        run_dir = Path(options.out or f"runs/{Path(preset).stem}")
    config = base.override(assignments)
    if config.train.init_from and not options.resume:
        config = _model_of_init(config, assignments)
    return config, run_dir


def _model_of_init(config: RunConfig, assignments: dict[str, str]) -> RunConfig:
    """With --train.init_from: the checkpoint's model section, with the training-only fields
    (dropout, span loss) the command line sets; any other model flag must agree with it."""
    source = config.train.init_from
    saved = checkpoint.load_model_config(source)
    changes = {}
    for key in assignments:
        section, _, name = key.partition(".")
        if section != "model":
            continue
        value = getattr(config.model, name)
        if name in RESUMABLE_MODEL_FIELDS:
            changes[name] = value
        elif value != getattr(saved, name):
            raise ConfigError(
                f"--model.{name} {value} differs from the checkpoint --train.init_from {source} "
                f"({getattr(saved, name)}); only {', '.join(sorted(RESUMABLE_MODEL_FIELDS))} "
                "may change"
            )
    return config.replace(model=saved.replace(**changes))


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
    return (
        f"{config.to_toml()}\n"
        f"# {model.kind} model: {parameter_count(model):,} parameters "
        f"(vocab_size {model.vocab_size})"
    )


def run_block(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    cache: Cache,
    batch_split: int,
    amp: contextlib.AbstractContextManager,
    backward: bool,
    scale: Callable[[Tensor], Tensor] = lambda loss: loss,
) -> tuple[float, Cache]:
    """Forward (and backward) of one block in `batch_split` slices; returns the data loss.

    `model` is the `AllAttentionLM` or its data-parallel wrapper (`distributed.wrap`), whose
    gradients are averaged over the ranks in the last slice's backward only. Each slice's loss
    (data + span term) is divided by the number of slices, so the gradients add up to the whole
    batch's and the span term counts once. `scale` turns the loss into the one backward runs
    from (fp16's loss scaling, `Optimizer.scale`).
    """
    slices = torch.arange(x.size(0)).chunk(batch_split)
    losses, caches = [], []
    for i, rows in enumerate(slices):
        accumulate = backward and i < len(slices) - 1
        with distributed.no_sync(model) if accumulate else contextlib.nullcontext(), amp:
            out = model(x[rows], y[rows], [c[rows] for c in cache])
            if backward:
                scale((out.loss + out.span_loss) / batch_split).backward()
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
    level: str = "char"
    """The corpus's level: how the losses are reported (`metrics.measure`)."""


class Trainer:
    """The state of a run: model, optimiser, streams and caches, and the step count.

    In a data-parallel job (DESIGN §3.0a) each rank holds the same model and optimiser and
    owns B/W of the B streams with their caches; the wrap-around offsets are drawn by the same
    seeded generator on every rank, so all streams move together as in one process.
    """

    def __init__(self, config: RunConfig, corpus: Corpus, run_dir: Path | None) -> None:
        self.config = config
        self.corpus = corpus
        self.run_dir = run_dir
        train = config.train
        self.world = distributed.current()
        batch = train.batch_size
        self.rows = self.world.shard(batch, "--train.batch_size")
        """The streams this rank owns."""
        local = batch // self.world.size
        if local % train.batch_split:
            raise ConfigError(
                f"--train.batch_split {train.batch_split} does not divide the {local} streams "
                f"of each of {self.world.size} processes"
            )
        self.runtime = runtime.resolve(config.runtime, self.world.gpu_slot)
        self.device = self.runtime.device
        self.amp = self.runtime.autocast()
        torch.manual_seed(train.seed)  # the same initial weights on every rank
        self.model = self.runtime.prepare(AllAttentionLM(config.model, self.runtime.attn_impl))
        if self.world.distributed:  # dropout: each rank its own stream
            torch.manual_seed(distributed.rank_seed(train.seed, self.world.rank))
        self.module = distributed.wrap(self.model, self.device)
        """What the training forward runs: the model, or its data-parallel wrapper."""
        self.optimizer = Optimizer(
            self.model.parameters(),
            config.optim,
            loss_scaling=self.runtime.loss_scaling,
            device=self.device,
        )
        self.train_streams = Streams(
            corpus.streams("train", batch)[self.rows], train.block_size, train.seed + 1, "train"
        )
        self.valid_streams = Streams(
            corpus.streams("valid", batch)[self.rows], train.block_size, train.seed + 2, "valid"
        )
        self.train_cache = self.model.init_cache(local)
        self.valid_cache = self.model.init_cache(local)
        valid_length = self.valid_streams.tokens.shape[1]
        self.valid_blocks = min(
            max(1, train.eval_interval // 10), math.ceil(valid_length / train.block_size)
        )
        self.step = 0
        self.best_valid_loss = math.inf
        self.best_step: int | None = None
        self.interval_loss = 0.0
        """Sum of the training losses since the last validation (their mean is logged)."""
        self.interval_steps = 0

    # -- one step and one validation ---------------------------------------------------------
    def _next_block(self, streams: Streams, cache: Cache, backward: bool) -> tuple[float, Cache]:
        """Read the next block of `streams` and run it (this rank's loss); the caches are zeroed
        in place (lengths kept) when the streams wrap around after it."""
        x, y, wrapped = streams.next_block()
        loss, cache = run_block(
            self.module if backward else self.model,
            x.to(self.device),
            y.to(self.device),
            cache,
            self.config.train.batch_split,
            self.amp,
            backward,
            self.optimizer.scale,
        )
        if wrapped:
            for c in cache:
                c.zero_()
        return loss, cache

    def train_step(self) -> tuple[float, dict[str, float]]:
        """One update; `NonFiniteError` (the trainer is then unusable) if the loss, the gradient
        or a weight stops being finite."""
        self.model.train()
        step = self.step + 1
        loss, self.train_cache = self._next_block(self.train_streams, self.train_cache, True)
        (loss,) = distributed.mean(loss)  # every rank sees the same loss, and stops on it
        if not math.isfinite(loss):
            raise NonFiniteError(f"the training loss is {loss} at step {step}")
        stats = self.optimizer.step()
        self.optimizer.zero_grad()
        if stats["skipped"]:  # fp16 loss scaling: the gradients overflowed, no update
            log.warning(
                "step %d: float16 gradients overflowed; update skipped, loss scale now %g",
                step,
                self.optimizer.loss_scale,
            )
        elif not math.isfinite(stats["grad_norm"]):
            raise NonFiniteError(f"the gradient norm is {stats['grad_norm']} at step {step}")
        bad = self.nonfinite_weight()
        if bad is not None:
            raise NonFiniteError(f"weight {bad} became NaN or infinite at step {step}")
        self.model.clamp_spans()
        self.step = step
        self.interval_loss += loss
        self.interval_steps += 1
        return loss, stats

    def nonfinite_weight(self) -> str | None:
        """The name of a weight holding NaN or infinity, if any (one synchronisation)."""
        names, params = zip(*self.model.named_parameters(), strict=True)
        finite = torch.stack([torch.isfinite(p).all() for p in params]).tolist()
        return next((name for name, ok in zip(names, finite, strict=True) if not ok), None)

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the next `valid_blocks` blocks of the validation streams."""
        self.model.eval()
        total = 0.0
        for _ in range(self.valid_blocks):
            loss, self.valid_cache = self._next_block(self.valid_streams, self.valid_cache, False)
            total += loss
        (valid_loss,) = distributed.mean(total / self.valid_blocks)  # equal streams per rank
        if not math.isfinite(valid_loss):
            raise NonFiniteError(f"the validation loss is {valid_loss} at step {self.step}")
        return valid_loss

    def end_interval(self) -> float:
        """The mean training loss since the last validation; starts the next interval."""
        mean = self.interval_loss / max(1, self.interval_steps)
        self.interval_loss, self.interval_steps = 0.0, 0
        return mean

    # -- checkpoints -------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Tensor]:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def state_dict(self) -> dict[str, Any] | None:
        """Everything `load_state_dict` needs to continue exactly: all B streams' caches and
        position, every rank's random state, the optimiser. Under data parallelism every rank
        calls it (the caches and random states are gathered) and the main rank gets the state,
        the others None."""
        rng = self._rng_state()
        ranks_rng = distributed.gather_objects(rng)
        train_cache = [distributed.gather_rows(c) for c in self.train_cache]
        valid_cache = [distributed.gather_rows(c) for c in self.valid_cache]
        if not self.world.main:
            return None
        state = {
            "step": self.step,
            "best_valid_loss": self.best_valid_loss,
            "best_step": self.best_step,
            "interval_loss": self.interval_loss,
            "interval_steps": self.interval_steps,
            "optimizer": self.optimizer.state_dict(),
            "train_streams": self.train_streams.state_dict(),
            "valid_streams": self.valid_streams.state_dict(),
            "train_cache": train_cache,
            "valid_cache": valid_cache,
            "rng": rng,
            "world_size": self.world.size,
        }
        if self.world.distributed:
            state["rank_rng"] = ranks_rng
        return state

    def load_state_dict(self, state: dict[str, Any], exact: bool) -> None:
        """Restore a `state_dict`; `ValueError` (and nothing changed in the streams and caches)
        if it does not fit this run."""
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step {step!r}")
        best_step = state.get("best_step")  # absent before 0.2
        if best_step is not None and not (isinstance(best_step, int) and 0 < best_step <= step):
            raise ValueError(f"best step {best_step!r}")
        if exact:
            for name, streams in (("train", self.train_streams), ("valid", self.valid_streams)):
                pos = state[f"{name}_streams"]["pos"]
                if not isinstance(pos, int) or not 0 <= pos < streams.tokens.shape[1]:
                    raise ValueError(f"{name} stream position {pos!r}")
            for name in ("train_cache", "valid_cache"):
                self._check_cache(name, state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = step
        self.best_valid_loss = float(state["best_valid_loss"])
        self.best_step = best_step
        self.interval_loss = float(state.get("interval_loss", 0.0))
        self.interval_steps = int(state.get("interval_steps", 0))
        if not exact:  # the original: data from position 0, zero caches
            return
        saved_world = state.get("world_size", 1)
        if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
            raise ValueError(f"world size {saved_world!r}")
        if saved_world == self.world.size:
            rng = state["rank_rng"][self.world.rank] if self.world.distributed else state["rng"]
        self.train_streams.load_state_dict(state["train_streams"])
        self.valid_streams.load_state_dict(state["valid_streams"])
        dtype = self.runtime.weight_dtype
        self.train_cache = [c[self.rows].to(self.device, dtype) for c in state["train_cache"]]
        self.valid_cache = [c[self.rows].to(self.device, dtype) for c in state["valid_cache"]]
        if saved_world != self.world.size:  # the dropout streams of other ranks: draw afresh
            torch.manual_seed(distributed.rank_seed(self.config.train.seed, self.world.rank, step))
            if self.world.main:
                log.info(
                    "resuming on %d processes a run saved by %d: data, caches and weights "
                    "continue exactly, dropout draws afresh from the seed, rank and step",
                    self.world.size,
                    saved_world,
                )
            return
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _check_cache(self, name: str, cache: Any) -> None:
        """One (B, C, d) tensor per layer, C at most the layer's span (caches shrink and grow
        with the learned spans, so C itself is free)."""
        d, span = self.config.model.d_model, self.config.model.attn_span
        batch = self.config.train.batch_size
        if not isinstance(cache, list) or len(cache) != self.config.model.n_layers:
            raise ValueError(f"{name} does not have one tensor per layer")
        for c in cache:
            if not isinstance(c, Tensor) or c.dim() != 3 or not c.is_floating_point():
                raise ValueError(f"{name} holds something other than (B, C, d) tensors")
            if c.shape[0] != batch or c.shape[2] != d or c.shape[1] > span:
                raise ValueError(f"{name} has shape {tuple(c.shape)}")

    def meta(self, valid_loss: float | None = None) -> dict[str, Any]:
        """What a checkpoint's header says of the run: the step, its validation loss (if it
        was a validation step), and the best step so far."""
        meta: dict[str, Any] = {"step": self.step}
        if valid_loss is not None:
            meta["valid_loss"] = valid_loss
        if self.best_step is not None:
            meta |= {"best_step": self.best_step, "best_valid_loss": self.best_valid_loss}
        return meta

    def save(self, name: str, meta: dict[str, Any]) -> None:
        """Write the run's state to `run_dir/name` (every rank calls it, the main rank writes);
        never non-finite weights."""
        state = self.checkpoint_state()
        with distributed.agreement():
            self.write(name, meta, state)

    def checkpoint_state(self) -> dict[str, Any] | None:
        """The state to write (`state_dict`, gathered on the main rank), once the weights are
        known to be finite; every rank calls it."""
        if self.run_dir is None:
            raise ValueError("this trainer has no run directory to save to")
        bad = self.nonfinite_weight()
        if bad is not None:
            raise NonFiniteError(f"weight {bad} is NaN or infinite at step {self.step}")
        return self.state_dict()

    def write(self, name: str, meta: dict[str, Any], state: dict[str, Any] | None) -> None:
        """The main rank writes the checkpoint `run_dir/name` of `checkpoint_state`'s state."""
        if not self.world.main:
            return
        assert self.run_dir is not None and state is not None
        checkpoint.save(
            self.run_dir / name,
            self.model,
            vocab=self.corpus.vocab,
            meta=meta,
            state=state,
            run_config=self.config,
        )


class NonFiniteError(ValueError):
    """Training produced a NaN or infinite loss, gradient or weight."""


RESUMABLE_MODEL_FIELDS = frozenset(
    f.name for f in dataclasses.fields(ModelConfig) if f.metadata["resumable"]
)
"""Model fields a resumed run may change: they act in training only. The optimiser, training
and runtime sections may all change."""


def _architecture_change(
    saved: ModelConfig, wanted: ModelConfig, ignore: tuple[str, ...] = ()
) -> tuple[str, Any, Any] | None:
    """The first model field other than the training-only ones (and `ignore`) whose value
    differs: (name, saved value, wanted value), or None."""
    old, new = saved.to_dict(), wanted.to_dict()
    for name in old:
        if old[name] != new[name] and name not in RESUMABLE_MODEL_FIELDS and name not in ignore:
            return name, old[name], new[name]
    return None


def _check_resumable(saved: RunConfig, wanted: RunConfig) -> None:
    change = _architecture_change(saved.model, wanted.model)
    if change is not None:
        name, old, new = change
        raise ConfigError(
            f"cannot change --model.{name} when resuming ({old} in the checkpoint, {new} asked)"
        )
    if wanted.train.exact_resume and saved.train.seed != wanted.train.seed:
        raise ConfigError(
            "--train.seed cannot change when resuming exactly (the random states come from "
            "the checkpoint); add --train.exact_resume false"
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
    fallback: bool = False,
    verify: bool = True,
) -> TrainResult:
    """Train (or continue training) into `run_dir`, which the run holds alone (`lock`);
    returns the final losses. `fallback`: resume from `best` if `last` fails its checks.

    Under torchrun every process calls it (`distributed.session` joins the job); the main
    rank holds the lock and writes the directory, the others only read (a resumed run's
    checkpoint, so the run directory must be visible to every node). A failure of the set-up
    on any rank stops all ranks with its message."""
    run_dir = Path(run_dir)
    with distributed.session(config.runtime) as world, contextlib.ExitStack() as held:
        with distributed.agreement():
            trainer, metrics = _start(config, run_dir, held, resume, overwrite, fallback, verify)
        return _loop(trainer, trainer.config, metrics, progress and world.main, run_dir)


def _start(
    config: RunConfig,
    run_dir: Path,
    held: contextlib.ExitStack,
    resume: bool,
    overwrite: bool,
    fallback: bool,
    verify: bool,
) -> tuple[Trainer, MetricsLog | None]:
    """Check the request, take the run directory (main rank: lock, repairs) and build the
    trainer, resumed if asked; the metrics log is the main rank's only."""
    main = distributed.current().main
    last = run_dir / LAST
    if last.exists() and not (resume or overwrite):
        raise ConfigError(
            f"{run_dir} already holds a run; pass --resume to continue it or --force to restart"
        )
    if resume and not last.exists():
        raise CheckpointError(f"nothing to resume: {last} does not exist")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is not a directory")
    corpus = load_corpus(config.train.data)
    if config.model.adaptive_io and corpus.vocab.level != "word":
        raise CorpusError(
            f"--model.adaptive_io is for word-level corpora, and "
            f"{config.train.data or 'the bundled corpus'} has {corpus.vocab.describe()} "
            "(prepare a word-level corpus, or add --model.adaptive_io false)"
        )
    initial = None
    if config.train.init_from and not resume:
        initial = _initial_weights(config, corpus, verify)
    if config.model.vocab_size != len(corpus.vocab):
        log.info("vocabulary of the data: %d tokens (--model.vocab_size)", len(corpus.vocab))
        config = adopt_vocabulary(config, corpus.vocab)
    require_memory(config)
    device = runtime.check(config.runtime, distributed.current().gpu_slot)
    flex.require_trainable(config, device)
    if config.train.tensorboard:
        require_tensorboard()
    metrics = None
    if main:
        held.enter_context(lock.hold(run_dir))
        for path in atomic.remove_stale(run_dir):
            log.info("removed %s, left by an interrupted write", path)
        metrics = MetricsLog(run_dir, tensorboard=config.train.tensorboard)
        held.callback(metrics.close)
    trainer = Trainer(config, corpus, run_dir)
    if resume:
        _resume(trainer, metrics, fallback, verify)
    else:
        if initial is not None:
            checkpoint.check_weights(trainer.model.state_dict(), initial.weights, initial.path)
            trainer.model.load_state_dict(initial.weights)
            log.info("initialised from %s", checkpoint.describe(initial))
        if metrics is not None:
            metrics.clear()
            for name in (BEST, LAST):
                (run_dir / name).unlink(missing_ok=True)
    if main:
        atomic.write_bytes(run_dir / CONFIG, config.to_toml().encode())
    log.info(
        "%s model, %s parameters, %d train tokens, vocabulary %d, device %s%s",
        config.model.kind,
        f"{trainer.model.num_parameters():,}",
        corpus.splits["train"].size,
        len(corpus.vocab),
        trainer.device,
        f", {trainer.world.size} processes" if trainer.world.distributed else "",
    )
    trainer.runtime.log()
    return trainer, metrics


def require_memory(config: RunConfig) -> None:
    """Refuse a run whose weights, gradients, optimiser state and caches alone exceed the
    device's memory (before any of it is allocated)."""
    params = parameter_count(config.model)
    moments = 1 if config.optim.optimizer == "adagrad" else 2
    model = config.model
    cache = 2 * model.n_layers * config.train.batch_size * model.attn_span * model.d_model
    runtime.require_memory(4 * (params * (2 + moments) + cache), config.runtime.device)


def _resume(trainer: Trainer, metrics: MetricsLog | None, fallback: bool, verify: bool) -> None:
    """Load the run's `last` checkpoint (or with `fallback`, `best` when `last` is unusable),
    check that it fits, restore it; the main rank (the one with `metrics`) repairs `best` and
    the metrics log."""
    run_dir = trainer.run_dir
    assert run_dir is not None
    last, best = run_dir / LAST, run_dir / BEST
    try:
        saved = _restore(trainer, checkpoint.load(last, verify=verify))
    except CheckpointError as error:
        if not fallback:
            hint = " (--fallback resumes from best.safetensors)" if best.is_file() else ""
            raise CheckpointError(f"{error}{hint}") from None
        if not best.is_file():
            raise CheckpointError(f"{error}; there is no {BEST} to fall back to") from None
        saved = _restore(trainer, checkpoint.load(best, verify=verify))
        log.warning(
            "%s is unusable (%s); resuming from %s (step %d) as --fallback asks",
            last,
            error,
            best,
            trainer.step,
        )
    if metrics is None:
        return
    copied = checkpoint.step_of(best) == trainer.best_step
    if trainer.best_step == trainer.step and saved.path == last and not copied:
        atomic.copy_file(last, best)  # killed between writing `last` and copying it
        log.info("wrote %s: step %d, the best, had not been copied", best, trainer.step)
    metrics.truncate(trainer.step)
    log.info("resumed %s at step %d", saved.path, trainer.step)


def _initial_weights(config: RunConfig, corpus: Corpus, verify: bool) -> checkpoint.Checkpoint:
    """The checkpoint of --train.init_from, checked against the new run: the same model config
    (`resolve_config` took it from there, training-only fields aside) and vocabulary. Its
    optimiser state, streams, caches and step are not used."""
    source = config.train.init_from
    saved = checkpoint.load(source, verify=verify)
    data = config.train.data or "the bundled corpus"
    if saved.vocab is not None:
        saved.vocab.require_same(corpus.vocab, str(saved.path), data)
    elif saved.config.vocab_size != len(corpus.vocab):
        raise CheckpointError(
            f"{saved.path} has {saved.config.vocab_size} tokens and no vocabulary; {data} has "
            f"{corpus.vocab.describe()}"
        )
    # The vocabulary size is the data's (checked above against the vocabulary).
    change = _architecture_change(saved.config, config.model, ignore=("vocab_size",))
    if change is not None:
        name, old, new = change
        raise CheckpointError(
            f"{saved.path}: its model has {name} {old}, the run {new} (--train.init_from "
            "keeps the checkpoint's model)"
        )
    return saved


def _restore(trainer: Trainer, saved: checkpoint.Checkpoint) -> checkpoint.Checkpoint:
    """Put the trainer in the state of `saved`, a training checkpoint that must fit the
    trainer's data, model and run (`CheckpointError` naming the file if it does not)."""
    path, config = saved.path, trainer.config
    if saved.run_config is None:
        raise CheckpointError(f"{path} is not a checkpoint of a training run")
    if saved.state is None:
        raise CheckpointError(f"{path} holds no training state to resume from")
    if saved.vocab is None:
        raise CheckpointError(f"{path} has no vocabulary")
    saved.vocab.require_same(
        trainer.corpus.vocab, str(path), config.train.data or "the bundled corpus"
    )
    _check_resumable(saved.run_config, config)
    checkpoint.check_weights(trainer.model.state_dict(), saved.weights, path)
    trainer.model.load_state_dict(saved.weights)
    try:
        trainer.load_state_dict(saved.state, exact=config.train.exact_resume)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: inconsistent training state ({reason})") from None
    if trainer.step != saved.meta.get("step", trainer.step):
        raise CheckpointError(f"{path}: the state's step differs from the header's")
    return saved


def _loop(
    trainer: Trainer,
    config: RunConfig,
    metrics: MetricsLog | None,
    progress: bool,
    run_dir: Path,
) -> TrainResult:
    train = config.train
    tokens_per_step = train.batch_size * train.block_size
    unit = measure(trainer.corpus.vocab.level)
    train_loss = valid_loss = math.nan
    start = time.perf_counter()
    interval_start, interval_first_step = start, trainer.step
    stats: dict[str, float] = {}
    saved_step = trainer.step  # the step `last` holds
    first_step = trainer.step + 1
    stop = 0  # the signal every rank stops for (a signal to any rank stops all after a step)
    with (
        signals.deferred() as pending,
        tqdm(
            total=train.steps,
            initial=trainer.step,
            disable=not progress,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        ) as bar,
    ):
        while trainer.step < train.steps:
            stop = distributed.largest(pending.signum or 0)
            if stop:
                break
            try:
                step_start = time.perf_counter()
                loss, stats = trainer.train_step()
                if trainer.runtime.compile and trainer.step == first_step and trainer.world.main:
                    log.info(
                        "first compiled step: %.1f s (compilation included)",
                        time.perf_counter() - step_start,
                    )
                validating = trainer.step % train.eval_interval == 0 or trainer.step == train.steps
                if validating:
                    interval_steps = trainer.interval_steps
                    train_loss = trainer.end_interval()
                    valid_loss = _validate(
                        trainer, metrics, stats, train_loss, interval_steps, interval_start, start
                    )
                    saved_step = trainer.step
            except NonFiniteError as error:
                raise NonFiniteError(
                    f"training diverged: {error}; nothing was written after step {saved_step} "
                    "(lower --optim.lr or raise --optim.warmup_steps)"
                ) from None
            bar.update(1)
            if bar.n % 10 == 0 or trainer.step == train.steps:
                spans = trainer.model.span_stats()
                elapsed = time.perf_counter() - interval_start
                steps = trainer.step - interval_first_step
                postfix = {
                    "tok/s": f"{steps * tokens_per_step / elapsed:,.0f}",
                    "loss": f"{loss:.3f}",
                    unit.key: f"{unit(loss):.3f}" if unit.key != "ppl" else f"{unit(loss):.1f}",
                    "span": f"{spans['span_avg']:.0f}/{spans['span_max']:.0f}",
                }
                bar.set_postfix(postfix, refresh=False)
            if validating:
                interval_start, interval_first_step = time.perf_counter(), trainer.step
        if stop:  # (a signal after the last step does not stop: the run is finished)
            if saved_step != trainer.step:
                trainer.save(LAST, trainer.meta())
            bar.close()
            raise distributed.leave_report_to_main(
                signals.Interrupted(
                    stop,
                    f"stopped by {signal.Signals(stop).name} after step {trainer.step}; "
                    f"{run_dir / LAST} holds it (continue with --resume)",
                )
            )
    return TrainResult(
        step=trainer.step,
        train_loss=train_loss,
        valid_loss=valid_loss,
        run_dir=run_dir,
        level=trainer.corpus.vocab.level,
    )


def _head_spans(model: AllAttentionLM) -> dict[str, list[list[float]]]:
    """The metrics record's `spans`: each layer's per-head learned span z_h * S (none without
    adaptive span)."""
    spans = model.head_spans()
    return {"spans": spans} if spans else {}


def _loss_scale(optimizer: Optimizer) -> dict[str, float]:
    """The metrics record's `loss_scale` (fp16 runs only)."""
    scale = optimizer.loss_scale
    return {} if scale is None else {"loss_scale": scale}


def _validate(
    trainer: Trainer,
    metrics: MetricsLog | None,
    stats: dict[str, float],
    train_loss: float,
    interval_steps: int,
    interval_start: float,
    start: float,
) -> float:
    """Validate, log, and write the checkpoints, in the order that keeps them consistent
    whenever the process dies: the metrics record, then `last`, then `best` as a copy (the
    main rank writes, after every rank has contributed its streams' state)."""
    valid_loss = trainer.validate()
    train = trainer.config.train
    now = time.perf_counter()
    tokens = interval_steps * train.batch_size * train.block_size
    unit = measure(trainer.corpus.vocab.level)
    record = {
        "step": trainer.step,
        "train_loss": train_loss,
        f"train_{unit.key}": unit(train_loss),
        "valid_loss": valid_loss,
        f"valid_{unit.key}": unit(valid_loss),
        "lr": stats["lr"],
        "grad_norm": stats["grad_norm"],
        **trainer.model.span_stats(),
        **_head_spans(trainer.model),
        **_loss_scale(trainer.optimizer),
        "tokens_per_s": tokens / max(now - interval_start, 1e-9),
        "elapsed_s": now - start,
    }
    improved = valid_loss < trainer.best_valid_loss
    if improved:
        trainer.best_valid_loss, trainer.best_step = valid_loss, trainer.step
    state = trainer.checkpoint_state()
    with distributed.agreement():
        if metrics is not None:
            metrics.append(record)
        trainer.write(LAST, trainer.meta(valid_loss), state)
        if improved and metrics is not None:
            assert trainer.run_dir is not None
            atomic.copy_file(trainer.run_dir / LAST, trainer.run_dir / BEST)
    log.info(
        "step %d: train %s, valid %s, lr %.3g, span %.0f/%.0f, %s tok/s",
        trainer.step,
        unit.format(train_loss),
        unit.format(valid_loss),
        stats["lr"],
        record["span_avg"],
        record["span_max"],
        f"{record['tokens_per_s']:,.0f}",
    )
    return valid_loss
