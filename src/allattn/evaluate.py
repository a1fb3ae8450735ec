"""Full evaluation (DESIGN §3): every full block of a split, fresh caches, eval mode.

The split is cut into B_eval contiguous streams (default 8, as the original scripts evaluate)
and read in blocks of M from position 0 with zero caches of each layer's current cache size.
Blocks start at p = 0, M, 2M, ... while p + M <= T - 1, so every stream scores
floor((T - 1) / M) * M targets; never scored are the last partial block of each stream, the
first token of each stream, and the len mod B_eval tokens that batchify drops. The result is the
mean of the per-block mean losses, which equals the mean over scored tokens (all blocks full).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint
from .data import SPLITS, Corpus, CorpusError, load_corpus
from .model import AllAttentionLM
from .train import autocast, resolve_device


@dataclass
class EvalResult:
    split: str
    tokens: int
    loss_nats: float
    bpc: float
    ppl: float

    def to_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def scored_tokens(length: int, batch_size: int, block_size: int) -> int:
    """Targets a full evaluation scores in a split of `length` tokens."""
    return (length // batch_size - 1) // block_size * block_size * batch_size


@torch.no_grad()
def evaluate(
    model: AllAttentionLM,
    ids: np.ndarray,
    *,
    batch_size: int = 8,
    block_size: int,
    split: str = "test",
    dtype: str = "float32",
) -> EvalResult:
    """Score `ids` (1-D) as DESIGN §3 says; the model's device and dtype are used."""
    length = len(ids) // batch_size
    n_blocks = (length - 1) // block_size
    if n_blocks < 1:
        raise CorpusError(
            f"the {split} split ({len(ids)} tokens) has no full block of {block_size} "
            f"in {batch_size} streams"
        )
    device = next(model.parameters()).device
    streams = ids[: batch_size * length].reshape(batch_size, length)
    model.eval()
    cache = model.init_cache(batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with autocast(device, dtype):
        for i in range(n_blocks):
            p = i * block_size
            block = torch.from_numpy(np.array(streams[:, p : p + block_size + 1], np.int64))
            block = block.to(device)
            out = model(block[:, :-1], block[:, 1:], cache)
            cache = out.cache
            total += out.loss.double()
    loss = total.item() / n_blocks
    return EvalResult(
        split=split,
        tokens=n_blocks * block_size * batch_size,
        loss_nats=loss,
        bpc=loss / math.log(2),
        ppl=math.exp(loss) if loss < 700 else math.inf,
    )


def run(
    checkpoint_file: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    batch_size: int = 8,
    block_size: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
) -> EvalResult:
    """Evaluate a checkpoint on a split of its data (or of `data`)."""
    if split not in SPLITS:
        raise CorpusError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise CorpusError(f"--batch-size ({batch_size}) must be a positive integer")
    ckpt = checkpoint.load(checkpoint_file)
    run_config = ckpt.meta.get("run_config", {}).get("train", {})
    if data is None:
        data = ckpt.meta.get("data", run_config.get("data"))
        if data is None:
            raise CorpusError("the checkpoint does not name its data; pass --data")
    corpus: Corpus = load_corpus(data)
    if ckpt.vocab is not None and ckpt.vocab != corpus.vocab:
        raise CorpusError(
            f"the vocabulary of {data or 'the bundled corpus'} differs from the checkpoint's"
        )
    if block_size is None:
        block_size = run_config.get("block_size")
        if block_size is None:
            raise CorpusError("the checkpoint does not record its block size; pass --block-size")
    model = ckpt.build_model().to(resolve_device(device))
    return evaluate(
        model,
        corpus.splits[split],
        batch_size=batch_size,
        block_size=block_size,
        split=split,
        dtype=dtype,
    )
