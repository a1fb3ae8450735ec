"""In-process A/B of the attention kernels and chunk sizes on one layer (forward + backward).

    .venv/bin/python benchmarks/chunk_sizes.py paper ref,64,128,192,256

Variants run alternately, five rounds, best time each ("ref" = the dense reference kernel, a
number = the chunked kernel with that many queries per chunk); allocator as the CLI sets it.
Prints milliseconds and the speed-up over the reference.
"""

from __future__ import annotations

import sys
import time

from allattn import attention, bench, runtime


def main(size: str, variants: list[str], rounds: int = 5) -> None:
    runtime.keep_allocations()
    layer, step = bench.layer_step(size, "chunked")
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):
        for variant in variants:
            layer.attn.impl = "reference" if variant == "ref" else "chunked"
            if variant != "ref":
                attention.CHUNK = int(variant)
            for timed in (False, True):
                start = time.perf_counter()
                step()
                if timed:
                    best[variant] = min(best[variant], time.perf_counter() - start)
    reference = best.get("ref")
    for variant, seconds in best.items():
        ratio = f"  {reference / seconds:.2f}x the reference" if reference else ""
        print(f"{size} {variant:>4}: {seconds * 1e3:7.1f} ms{ratio}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
