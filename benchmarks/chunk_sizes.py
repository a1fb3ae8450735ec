"""In-process A/B of the attention kernels and chunk sizes on one layer (forward + backward).

    .venv/bin/python benchmarks/chunk_sizes.py paper ref,64,128,192,256

Variants run alternately, five rounds, best time each ("ref" = the dense reference kernel, a
number = the chunked kernel with that many queries per chunk); allocator as the CLI sets it.
Prints milliseconds and the speed-up over the reference.
"""

from __future__ import annotations

import sys
import time

import torch

from allattn import attention, bench
from allattn.config import ModelConfig
from allattn.model import AllAttentionLayer


def main(size: str, variants: list[str], rounds: int = 5) -> None:
    bench.keep_allocations()
    batch, block, span, heads, head_dim, n_mem, z = bench.LAYER_SIZES[size]
    config = ModelConfig(
        d_model=heads * head_dim,
        n_heads=heads,
        n_persistent=n_mem,
        attn_span=span,
        span_init=z,
    )
    torch.manual_seed(0)
    layer = AllAttentionLayer(config)
    pos = torch.nn.Parameter(torch.randn(span, head_dim))
    h = torch.randn(batch, block, config.d_model, requires_grad=True)
    cache = torch.randn(batch, layer.cache_size(), config.d_model)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for variant in variants:
            layer.attn.impl = "reference" if variant == "ref" else "chunked"
            if variant != "ref":
                attention.CHUNK = int(variant)
            for timed in (False, True):
                start = time.perf_counter()
                out, _ = layer(h, cache, pos)
                out.sum().backward()
                if timed:
                    best[variant] = min(best[variant], time.perf_counter() - start)
    reference = best.get("ref")
    for variant, seconds in best.items():
        ratio = f"  {reference / seconds:.2f}x the reference" if reference else ""
        print(f"{size} {variant:>4}: {seconds * 1e3:7.1f} ms{ratio}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
