"""Full evaluation (DESIGN §3): every full block of a split, fresh caches, eval mode.

The split is cut into B_eval contiguous streams (default 8, as the original scripts evaluate)
and read in blocks of M from position 0 with zero caches of each layer's current cache size.
Blocks start at p = 0, M, 2M, ... while p + M <= T - 1, so every stream scores
floor((T - 1) / M) * M targets; never scored are the last partial block of each stream, the
first token of each stream, and the len mod B_eval tokens that batchify drops. The result is the
mean of the per-block mean losses, which equals the mean over scored tokens (all blocks full).

Under torchrun (DESIGN §3.0a) each of the W processes scores B_eval/W of the streams and the
sums are all-reduced, so the result is the single process's.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import checkpoint, distributed, runtime
from .checkpoint import verify_setting
from .config import CheckpointChoice, RuntimeConfig, Settings, TrainConfig, setting
from .data import Corpus, CorpusError, Split, batchify, full_blocks, load_corpus
from .metrics import Measure, measure
from .model import AllAttentionLM

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EvalConfig(Settings):
    """What `allattn eval` scores: which checkpoint, on which split, in how many streams."""

    checkpoint: str = setting(dataclasses.MISSING, "checkpoint file or run directory")
    select: CheckpointChoice = setting(
        "best",
        "which checkpoint of a run directory: best (by the validation estimate) or last "
        "(the newest, which the original evaluates)",
    )
    data: str | None = setting(None, "data directory (default: the one the run trained on)")
    split: Split = setting("test", "the split to score")
    batch_size: int | None = setting(
        None, "parallel streams (default: the run's --train.eval_batch_size, 8 as the original)"
    )
    block_size: int | None = setting(None, "tokens per block (default: the run's block size)")
    verify: bool = verify_setting()

    def validate(self) -> None:
        for name in ("batch_size", "block_size"):
            if getattr(self, name) is not None:
                self._require_ints(1, name)


@dataclass
class EvalResult:
    split: str
    tokens: int
    loss_nats: float
    level: str = "char"
    """The vocabulary's level, which decides the measure: char bpc, byte bpb, word ppl."""
    checkpoint: str | None = None
    """The checkpoint file scored (set by `run`)."""

    @property
    def measure(self) -> Measure:
        return measure(self.level)

    @property
    def value(self) -> float:
        """The result in the level's measure (bits per character or byte, or perplexity)."""
        return self.measure(self.loss_nats)

    def to_dict(self) -> dict[str, float | int | str | None]:
        """split, tokens, loss_nats, level, the measure's key ("bpc", "bpb" or "ppl") with
        its value, and checkpoint."""
        values = asdict(self)
        checkpoint = values.pop("checkpoint")
        return {**values, self.measure.key: self.value, "checkpoint": checkpoint}

    def describe(self) -> str:
        """'test: 55,296 tokens, 1.7116 nats/token, 2.469 bits per character'."""
        return (
            f"{self.split}: {self.tokens:,} tokens, {self.loss_nats:.4f} nats/token, "
            f"{self.measure.describe(self.loss_nats)}"
        )


def _full_blocks(length: int, batch_size: int, block_size: int, split: str) -> int:
    n_blocks = (length // batch_size - 1) // block_size
    if n_blocks < 1:
        raise CorpusError(
            f"the {split} split ({length} tokens) has no full block of {block_size} "
            f"in {batch_size} streams"
        )
    return n_blocks


def scored_tokens(length: int, batch_size: int, block_size: int) -> int:
    """Targets a full evaluation scores in a split of `length` tokens."""
    return (length // batch_size - 1) // block_size * block_size * batch_size


@torch.no_grad()
def evaluate(
    model: AllAttentionLM,
    ids: np.ndarray,
    *,
    batch_size: int = TrainConfig().eval_batch_size,
    block_size: int,
    split: str = "test",
    precision: str = "fp32",
    level: str = "char",
) -> EvalResult:
    """Score `ids` (1-D) as DESIGN §3 says; the model's device and weight dtype are used, under
    the autocast of `precision` (bf16, fp16). In a
    data-parallel session this rank scores its share of the streams and every rank gets the
    whole result."""
    n_blocks = _full_blocks(len(ids), batch_size, block_size, split)
    world = distributed.current()
    rows = world.shard(batch_size, "the evaluation batch size (--batch-size)")
    device = next(model.parameters()).device
    model.eval()
    cache = model.init_cache(batch_size // world.size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with runtime.autocast(device, precision):
        for x, y in full_blocks(batchify(ids, batch_size, split)[rows], block_size):
            out = model(x.to(device), y.to(device), cache)
            cache = out.cache
            total += out.loss.double()  # this rank's streams' mean loss of the block
    loss = distributed.all_reduce_sum(total).item() / (n_blocks * world.size)
    return EvalResult(
        split=split,
        tokens=n_blocks * block_size * batch_size,
        loss_nats=loss,
        level=level,
    )


def run(config: EvalConfig, runtime_config: RuntimeConfig | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split of its data (or of `config.data`); under torchrun
    every process calls it and gets the result."""
    runtime_config = runtime_config or RuntimeConfig()
    with distributed.session(runtime_config) as world:
        with distributed.agreement():
            ckpt, ids, batch_size, block_size, level = _prepare(config)
            chosen = runtime.resolve(runtime_config, world.gpu_slot)
            model = chosen.prepare(ckpt.build_model(chosen.attn_impl))
        log.info(
            "%s, %s split, %d streams of blocks of %d%s",
            checkpoint.describe(ckpt),
            config.split,
            batch_size,
            block_size,
            f" over {world.size} processes" if world.distributed else "",
        )
        chosen.log()
        result = evaluate(
            model,
            ids,
            batch_size=batch_size,
            block_size=block_size,
            split=config.split,
            precision=chosen.precision,
            level=level,
        )
    result.checkpoint = str(ckpt.path)
    return result


def _prepare(config: EvalConfig) -> tuple[checkpoint.Checkpoint, np.ndarray, int, int, str]:
    """The checkpoint, the split's ids, the streams, the block size and the level, checked."""
    ckpt = checkpoint.load(config.checkpoint, config.select, config.verify)
    run = ckpt.run_config
    data = config.data
    if data is None:
        if run is None:
            raise CorpusError("the checkpoint does not name its data; pass --data")
        data = run.train.data
    corpus: Corpus = load_corpus(data)
    if ckpt.vocab is not None:
        ckpt.vocab.require_same(corpus.vocab, "the checkpoint", data or "the bundled corpus")
    block_size = config.block_size
    if block_size is None:
        if run is None:
            raise CorpusError("the checkpoint does not record its block size; pass --block-size")
        block_size = run.train.block_size
    batch_size = config.batch_size
    if batch_size is None:
        batch_size = (run.train if run is not None else TrainConfig()).eval_batch_size
    ids = corpus.splits[config.split]
    _full_blocks(len(ids), batch_size, block_size, config.split)
    distributed.current().shard(batch_size, "the evaluation batch size (--batch-size)")
    return ckpt, ids, batch_size, block_size, corpus.vocab.level
