"""Forward and backward passes of a small all-attention model on the bundled tiny-shakespeare.

Runs three consecutive blocks of four parallel streams, carrying the per-layer caches, and prints
the loss of each block (untrained, so about log2(V) bits per character) and the gradient norm.
`make demo` runs this until the training toolkit lands.
"""

from __future__ import annotations

import math
import time

import torch

from allattn import AllAttentionLM, ModelConfig
from allattn.data import Vocabulary, bundled_text


def main() -> None:
    torch.manual_seed(0)
    text = bundled_text()
    vocab = Vocabulary.from_tokens(text, "char")
    ids = torch.tensor(vocab.encode(text))
    config = ModelConfig(
        vocab_size=len(vocab),
        d_model=128,
        n_heads=4,
        n_layers=4,
        n_persistent=128,
        attn_span=256,
        span_ramp=32,
        span_loss_coef=1e-6,
    )
    model = AllAttentionLM(config)
    print(
        f"tiny-shakespeare: {len(ids):,} characters, vocabulary {len(vocab)}; "
        f"{config.kind} model, {model.num_parameters():,} parameters"
    )

    batch, block = 4, 128
    streams = ids[: len(ids) // batch * batch].view(batch, -1)  # B contiguous streams
    cache = model.init_cache(batch)
    for step in range(3):
        start = time.perf_counter()
        x = streams[:, step * block : (step + 1) * block]
        y = streams[:, step * block + 1 : (step + 1) * block + 1]
        out = model(x, y, cache)
        (out.loss + out.span_loss).backward()
        grad_norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        model.zero_grad()
        cache = out.cache
        print(
            f"block {step}: loss {out.loss.item():.4f} nats = {out.loss.item() / math.log(2):.3f} "
            f"bpc, grad norm {grad_norm:.3f}, cache rows {[c.size(1) for c in cache]}, "
            f"{(time.perf_counter() - start) * 1e3:.0f} ms"
        )
    print(f"uniform baseline: {math.log2(len(vocab)):.3f} bpc; spans {model.span_stats()}")


if __name__ == "__main__":
    main()
