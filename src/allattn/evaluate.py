"""Full evaluation (DESIGN §3) and its options: which tokens are scored, with what context.

`--protocol original` (the default, the original scripts' protocol): the split is cut into
B_eval contiguous streams (default 8) and read in blocks of M from position 0 with zero caches
of each layer's current cache size. Blocks start at p = 0, M, 2M, ... while p + M <= T - 1, so
every stream scores floor((T - 1) / M) * M targets; never scored are the last partial block of
each stream, the first token of each stream, and the len mod B_eval tokens that batchify drops.
The result is the mean of the per-block mean losses, which equals the mean over scored tokens
(all blocks full). It depends on B_eval and M: each stream starts cold.

The other protocols score *segments* (`Segment`): runs of the split each read from zero caches
in blocks of M, the cache carried from block to block, scoring a chosen range of targets;
segments are batched B_eval at a time (right-padded, the padding never scored):
    independent  every target 1..T-1 once, whatever B_eval and M: the targets are cut into
                 B_eval ranges and each range is first *warmed up* over the W tokens before it,
                 W = the sum over layers of the rows each attends to (S minus what its span
                 trims), which is the model's whole receptive field. So every token is scored
                 with exactly the context of one continuous pass over the split from position 0
                 (equal to B_eval = 1 up to rounding; tested).
    sliding      windows of K tokens (`--window`, default M) every `--stride` tokens, each read
                 from zero caches, scoring its last `stride` targets (the first window all of
                 its): every token sees at least K - stride tokens of context, none carried
                 from before its window (the evaluation of fixed-context models).
    documents    the split cut before each `--separator` token; every document (starting with
                 its separator, and scoring the next document's separator as its last target) is
                 read alone from zero caches, so no document attends across another.
`--attn-span S'` evaluates a fixed-span model with a span other than the trained S
(`AllAttentionLM.set_attn_span`: distances beyond S have no learned position).

Under torchrun (DESIGN §3.0a) each of the W processes scores B_eval/W of the streams (original)
or every W-th group of segments, and the sums are all-reduced: the result is the single
process's.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from . import checkpoint, distributed, runtime
from .checkpoint import verify_setting
from .config import (
    CheckpointChoice,
    ConfigError,
    RuntimeConfig,
    Settings,
    TrainConfig,
    setting,
)
from .data import Corpus, CorpusError, Split, Vocabulary, batchify, full_blocks, load_corpus
from .metrics import Measure, measure
from .model import AllAttentionLM

log = logging.getLogger(__name__)

Protocol = Literal["original", "independent", "sliding", "documents"]


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
    protocol: Protocol = setting(
        "original",
        "which targets are scored with what context: original (B streams from zero caches, "
        "full blocks only: the original scripts'), independent (every token once with its "
        "whole receptive field, whatever --batch-size and --block-size), sliding (windows "
        "from zero caches, see --window, --stride), documents (each document alone, see "
        "--separator)",
    )
    window: int | None = setting(None, "sliding: tokens per window (default: the block size)")
    stride: int | None = setting(
        None, "sliding: tokens between window starts, the targets each scores (default: half)"
    )
    separator: str | None = setting(
        None, "documents: the token that starts every document (e.g. '<eos>' or a character)"
    )
    attn_span: int | None = setting(
        None,
        "attend over this many positions instead of the trained span (fixed-span models "
        "only; distances beyond it have no learned position)",
    )
    verify: bool = verify_setting()

    def validate(self) -> None:
        for name in ("batch_size", "block_size", "window", "stride", "attn_span"):
            if getattr(self, name) is not None:
                self._require_ints(1, name)
        if self.protocol != "sliding" and (self.window is not None or self.stride is not None):
            raise ConfigError("--window and --stride apply to --protocol sliding only")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ConfigError(
                f"--stride ({self.stride}) is longer than --window ({self.window}): each "
                "window scores the `stride` targets after the previous one, and must hold them"
            )
        if (self.protocol == "documents") != (self.separator is not None):
            raise ConfigError("--protocol documents and --separator TOKEN go together")


@dataclass
class EvalResult:
    split: str
    tokens: int
    loss_nats: float
    level: str = "char"
    """The vocabulary's level, which decides the measure: char bpc, byte bpb, word ppl."""
    protocol: str = "original"
    """Which targets were scored with what context (`EvalConfig.protocol`)."""
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


@dataclass(frozen=True)
class Segment:
    """A run of the token ids read alone from zero caches: inputs ids[start : end - 1],
    targets ids[start + 1 : end], of which ids[score_from : end] are scored."""

    start: int
    score_from: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.score_from <= self.end:
            raise ValueError(f"bad segment {self}")

    @property
    def length(self) -> int:
        """Input tokens."""
        return self.end - 1 - self.start


@dataclass
class SegmentScore:
    logprob: float
    """Sum of the scored targets' log-probabilities (nats, float64)."""
    tokens: int
    """Targets scored."""
    greedy: bool | None = None
    """Whether every scored target was the likeliest token (when asked for)."""


def receptive_field(model: AllAttentionLM) -> int:
    """W: how many tokens before a position can change its prediction, the sum over layers of
    the rows each attends to (its span, less what the learned span trims)."""
    return sum(model.context_lengths())


def independent_segments(length: int, pieces: int, warmup: int) -> list[Segment]:
    """Targets 1..length-1 cut into `pieces` near-equal ranges, each warmed up over the
    `warmup` tokens before its first input."""
    targets = length - 1
    if targets < 1:
        raise CorpusError(f"a split of {length} tokens has nothing to score")
    pieces = min(pieces, targets)
    bounds = [1 + targets * i // pieces for i in range(pieces + 1)]
    return [
        Segment(max(0, first - 1 - warmup), first, end) for first, end in itertools.pairwise(bounds)
    ]


def sliding_segments(length: int, window: int, stride: int) -> list[Segment]:
    """Windows of `window` inputs ending `stride` targets apart; each scores the targets after
    the previous window's (the first all of its own)."""
    if length < 2:
        raise CorpusError(f"a split of {length} tokens has nothing to score")
    segments, scored = [], 1
    end = min(window + 1, length)
    while True:
        segments.append(Segment(max(0, end - 1 - window), scored, end))
        if end == length:
            return segments
        scored, end = end, min(end + stride, length)


def document_segments(ids: np.ndarray, separator: int) -> list[Segment]:
    """One segment per document: from a separator (or the split's start) to the token before
    the next, whose separator is its last target."""
    if len(ids) < 2:
        raise CorpusError(f"a split of {len(ids)} tokens has nothing to score")
    starts = [int(i) for i in np.flatnonzero(np.asarray(ids) == separator) if 0 < i < len(ids)]
    bounds = [0, *starts, len(ids) - 1]
    return [Segment(a, a + 1, b + 1) for a, b in itertools.pairwise(bounds) if b > a]


@torch.no_grad()
def score(
    model: AllAttentionLM,
    ids: np.ndarray | Sequence[int],
    segments: Sequence[Segment],
    *,
    batch_size: int,
    block_size: int,
    precision: str = "fp32",
    greedy: bool = False,
    shard: bool = True,
) -> list[SegmentScore]:
    """Score each segment as if it were read alone (zero caches, blocks of `block_size`, the
    cache carried between blocks), `batch_size` segments at a time, longest first; `greedy`:
    also whether each scored target was the argmax. In a data-parallel session (with `shard`)
    this rank scores every W-th group and the scores are summed over ranks, so every rank gets
    them all."""
    tokens = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    device = next(model.parameters()).device
    model.eval()
    world = distributed.current()
    order = sorted(range(len(segments)), key=lambda i: -segments[i].length)
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    totals = torch.zeros(len(segments), 3, dtype=torch.float64)  # logprob, tokens, not greedy
    ranks = world.size if shard and world.distributed else 1
    for group in groups[world.rank % ranks :: ranks]:
        chosen = [segments[i] for i in group]
        x, y, scored = _batch(tokens, chosen, block_size)
        sums = torch.zeros(len(group), 3, dtype=torch.float64, device=device)
        cache = model.init_cache(len(group))
        stop = int(scored.any(0).nonzero().max()) + 1 if bool(scored.any()) else 0
        with runtime.autocast(device, precision):
            for p in range(0, stop, block_size):  # no block of padding only
                rows = scored[:, p : p + block_size].to(device)
                xb, yb = x[:, p : p + block_size].to(device), y[:, p : p + block_size].to(device)
                out = model(xb, yb, cache, logprobs=greedy)
                cache = out.cache
                picked = out.target_logprobs.double()
                sums[:, 0] += (picked * rows).sum(1)
                sums[:, 1] += rows.sum(1)
                if greedy:
                    missed = (out.logprobs.argmax(-1) != yb) & rows
                    sums[:, 2] += missed.sum(1)
        totals[group] = sums.cpu()
    if ranks > 1:
        totals = distributed.all_reduce_sum(totals.to(device)).cpu()
    return [
        SegmentScore(float(t[0]), int(t[1]), bool(t[2] == 0) if greedy else None) for t in totals
    ]


def _batch(
    ids: torch.Tensor, segments: Sequence[Segment], block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the scored mask (B, n·M) of segments, right-padded to whole
    blocks (padding: token 0, never scored; causal attention keeps it from earlier rows)."""
    width = math.ceil(max(seg.length for seg in segments) / block_size) * block_size
    x = torch.zeros(len(segments), width, dtype=torch.long)
    y = torch.zeros_like(x)
    scored = torch.zeros(len(segments), width, dtype=torch.bool)
    for row, seg in enumerate(segments):
        x[row, : seg.length] = ids[seg.start : seg.end - 1]
        y[row, : seg.length] = ids[seg.start + 1 : seg.end]
        scored[row, seg.score_from - seg.start - 1 : seg.length] = True
    return x, y, scored


def evaluate_segments(
    model: AllAttentionLM,
    ids: np.ndarray,
    segments: Sequence[Segment],
    *,
    batch_size: int,
    block_size: int,
    split: str = "test",
    precision: str = "fp32",
    level: str = "char",
    protocol: str = "independent",
) -> EvalResult:
    """The mean loss over every scored target of `segments` (`score`)."""
    scores = score(
        model, ids, segments, batch_size=batch_size, block_size=block_size, precision=precision
    )
    tokens = sum(s.tokens for s in scores)
    if tokens == 0:
        raise CorpusError(f"the {split} split has no target to score")
    loss = -math.fsum(s.logprob for s in scores) / tokens
    return EvalResult(split=split, tokens=tokens, loss_nats=loss, level=level, protocol=protocol)


def segments_for(
    config: EvalConfig,
    model: AllAttentionLM,
    ids: np.ndarray,
    vocab: Vocabulary | None,
    batch_size: int,
    block_size: int,
) -> list[Segment]:
    """The segments of `config.protocol` (not `original`) over `ids`."""
    if config.protocol == "independent":
        return independent_segments(len(ids), batch_size, receptive_field(model))
    if config.protocol == "sliding":
        window = config.window or block_size
        stride = config.stride or max(1, window // 2)
        if stride > window:
            raise ConfigError(f"--stride ({stride}) is longer than the window ({window})")
        return sliding_segments(len(ids), window, stride)
    assert config.protocol == "documents" and config.separator is not None
    if vocab is None:
        raise CorpusError("--protocol documents needs the vocabulary to find --separator")
    if config.separator not in vocab:
        raise CorpusError(
            f"the separator {config.separator!r} is not a token of {vocab.describe()}"
        )
    return document_segments(ids, vocab.id(config.separator))


def run(config: EvalConfig, runtime_config: RuntimeConfig | None = None) -> EvalResult:
    """Evaluate a checkpoint on a split of its data (or of `config.data`) by
    `config.protocol`; under torchrun every process calls it and gets the result."""
    runtime_config = runtime_config or RuntimeConfig()
    with distributed.session(runtime_config) as world:
        with distributed.agreement():
            job = _prepare(config)
            chosen = runtime.resolve(runtime_config, world.gpu_slot)
            model = job.ckpt.build_model(chosen.attn_impl)
            if config.attn_span is not None:
                model.set_attn_span(config.attn_span)
            model = chosen.prepare(model)
            segments = None
            if config.protocol != "original":
                segments = segments_for(
                    config, model, job.ids, job.ckpt.vocab, job.batch_size, job.block_size
                )
        log.info(
            "%s, %s split, %s%s",
            checkpoint.describe(job.ckpt),
            config.split,
            _describe_protocol(config, model, job.batch_size, job.block_size, segments),
            f" over {world.size} processes" if world.distributed else "",
        )
        chosen.log()
        if segments is None:
            result = evaluate(
                model,
                job.ids,
                batch_size=job.batch_size,
                block_size=job.block_size,
                split=config.split,
                precision=chosen.precision,
                level=job.level,
            )
        else:
            result = evaluate_segments(
                model,
                job.ids,
                segments,
                batch_size=job.batch_size,
                block_size=job.block_size,
                split=config.split,
                precision=chosen.precision,
                level=job.level,
                protocol=config.protocol,
            )
    result.checkpoint = str(job.ckpt.path)
    return result


def _describe_protocol(
    config: EvalConfig,
    model: AllAttentionLM,
    batch_size: int,
    block_size: int,
    segments: Sequence[Segment] | None,
) -> str:
    """What the log says about how the split is read."""
    span = f", span {config.attn_span}" if config.attn_span is not None else ""
    if segments is None:
        return f"{batch_size} streams of blocks of {block_size}{span}"
    if config.protocol == "independent":
        what = f"every token with its receptive field of {receptive_field(model)} tokens"
    elif config.protocol == "sliding":
        what = f"{len(segments)} sliding windows"
    else:
        what = f"{len(segments)} documents, each alone"
    return f"{what} ({config.protocol}), {batch_size} at a time in blocks of {block_size}{span}"


@dataclass
class _Job:
    ckpt: checkpoint.Checkpoint
    ids: np.ndarray
    batch_size: int
    block_size: int
    level: str


def _prepare(config: EvalConfig) -> _Job:
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
    if config.attn_span is not None and ckpt.config.adapt_span:
        raise ConfigError(
            "--attn-span needs a fixed-span model (adapt_span false): the learned spans of "
            f"{config.checkpoint} mask every distance beyond them"
        )
    ids = corpus.splits[config.split]
    if config.protocol == "original":
        _full_blocks(len(ids), batch_size, block_size, config.split)
        distributed.current().shard(batch_size, "the evaluation batch size (--batch-size)")
    return _Job(ckpt, ids, batch_size, block_size, corpus.vocab.level)
