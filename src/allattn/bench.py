"""Benchmarks: the attention layer per kernel, a whole training step, and the matmul peak.

Each measurement runs in a fresh Python process (so its peak memory is its own and the
allocator settings are the ones asked for) and reports the best of several repetitions; ratios
between kernels are only meaningful within one run on one machine.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

LAYER_SIZES = {
    # name: (B, M, S, H, D, N, z) with z the span parameter of every head
    "small": (8, 128, 256, 4, 64, 256, 1.0),
    "paper": (4, 512, 1024, 8, 64, 1024, 1.0),
    # spans trimmed to a quarter: max span 960 + 32 -> trim 3072, L = 1024 of S = 4096
    "long": (4, 512, 4096, 8, 64, 2048, 960 / 4096),
}

# glibc mallopt parameters: keep freed memory instead of returning big blocks to the OS
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4


def keep_allocations() -> bool:
    """Tell glibc to reuse freed memory (no mmap per large tensor, no trimming).

    Large tensors are otherwise mmapped fresh and returned on free, so every step pays for
    zeroed pages again; this alone made one CPU implementation 3.7x slower. Returns whether
    the settings were applied (only glibc has mallopt).
    """
    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
        return bool(ok and libc.mallopt(M_TOP_PAD, 64 << 20))
    except (OSError, AttributeError):
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """float32 GFLOP/s of a square matmul on this machine, best of three tries."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return repeats * 2 * size**3 / best / 1e9


def layer_flops(batch, block, context, heads, head_dim, n_mem) -> float:
    """Floating-point operations one layer needs for forward + backward.

    Projections: q and o over the M block rows (forward, input and weight gradients); k and v
    over the L + M context rows (forward, weight gradient) and the M block rows (input gradient:
    the cached rows are detached). Attention: per query, L content and L position scores, N
    persistent scores and L + N weighted values; backward twice the forward.
    """
    d = heads * head_dim
    matmul = 2 * batch * d * d  # one projection of one row, x rows
    projections = matmul * (2 * 3 * block + 2 * (2 * (context + block) + block))
    attention = 3 * 2 * batch * heads * block * head_dim * (3 * context + 2 * n_mem)
    return projections + attention


@dataclass
class LayerResult:
    size: str
    impl: str
    ms: float
    tokens_per_s: float
    gflops: float
    peak_fraction: float
    peak_mb: float


def layer_step(size: str, impl: str) -> tuple[Any, Callable[[], None]]:
    """A layer of one of the LAYER_SIZES and a function running its forward + backward."""
    from .config import ModelConfig
    from .model import AllAttentionLayer

    batch, block, span, heads, head_dim, n_mem, z = LAYER_SIZES[size]
    config = ModelConfig(
        d_model=heads * head_dim,
        n_heads=heads,
        n_persistent=n_mem,
        attn_span=span,
        span_init=z,
        attn_impl=impl,
    )
    torch.manual_seed(0)
    layer = AllAttentionLayer(config)
    pos = torch.nn.Parameter(torch.randn(span, head_dim))
    h = torch.randn(batch, block, config.d_model, requires_grad=True)
    cache = torch.randn(batch, layer.cache_size(), config.d_model)

    def step() -> None:
        out, _ = layer(h, cache, pos)
        out.sum().backward()

    return layer, step


def _layer_case(size: str, impl: str, repeats: int) -> dict[str, Any]:
    """Runs in a child process: one layer, forward + backward, best of `repeats`."""
    batch, block, _, heads, head_dim, n_mem, _ = LAYER_SIZES[size]
    layer, step = layer_step(size, impl)
    context = layer.context_length()
    base = current_rss_mb()

    step()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    return {
        "seconds": best,
        "context": context,
        "peak_mb": peak_rss_mb() - base,
        "flops": layer_flops(batch, block, context, heads, head_dim, n_mem),
        "tokens": batch * block,
    }


def _child(args: list[str], allocator: bool) -> dict[str, Any]:
    code = (
        "import json, sys; from allattn import bench; "
        f"bench.keep_allocations() if {allocator} else None; "
        f"print(json.dumps(bench.{args[0]}(*json.loads(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args[1:])],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(f"benchmark case {args} failed: {out.stderr.strip().splitlines()[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def layer_benchmark(
    sizes: list[str],
    impls: list[str],
    repeats: int,
    allocator: bool,
    peak: float,
    rounds: int = 2,
) -> list[LayerResult]:
    """Each (size, kernel) in its own process, the kernels interleaved over `rounds` rounds
    (the machine's load drifts), keeping each one's best time and its largest peak memory."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    peak_mb: dict[tuple[str, str], float] = {}
    for _ in range(rounds):
        for size in sizes:
            for impl in impls:
                case = (size, impl)
                r = _child(["_layer_case", size, impl, repeats], allocator)
                peak_mb[case] = max(peak_mb.get(case, 0.0), r["peak_mb"])
                if case not in best or r["seconds"] < best[case]["seconds"]:
                    best[case] = r
    results = []
    for size in sizes:
        for impl in impls:
            r = best[(size, impl)]
            gflops = r["flops"] / r["seconds"] / 1e9
            results.append(
                LayerResult(
                    size=size,
                    impl=impl,
                    ms=r["seconds"] * 1e3,
                    tokens_per_s=r["tokens"] / r["seconds"],
                    gflops=gflops,
                    peak_fraction=gflops / peak,
                    peak_mb=peak_mb[(size, impl)],
                )
            )
    return results


def train_step_case(argv: list[str], steps: int) -> dict[str, Any]:
    """Runs in a child process: `steps` training steps of a preset with overrides."""
    from .config import load_preset, parse_overrides
    from .data import char_corpus
    from .train import Trainer

    preset, assignments = argv[0], parse_overrides(argv[1:])
    config = load_preset(preset).override(assignments)
    text = "".join(chr(32 + (i * 7919) % 90) for i in range(200_000))  # synthetic characters
    block = config.train.block_size * config.train.batch_size
    text = text * max(1, math.ceil(4 * block / len(text)))
    corpus = char_corpus(text, (0.9, 0.05, 0.05))
    config = config.override({"model.vocab_size": str(len(corpus.vocab))})
    trainer = Trainer(config, corpus, run_dir=None)  # type: ignore[arg-type]
    trainer.train_step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    seconds = time.perf_counter() - start
    tokens = steps * config.train.batch_size * config.train.block_size
    return {
        "tokens_per_s": tokens / seconds,
        "ms_per_step": seconds / steps * 1e3,
        "peak_rss_mb": peak_rss_mb(),
        "parameters": trainer.model.num_parameters(),
    }


def train_step_benchmark(argv: list[str], steps: int, allocator: bool) -> dict[str, Any]:
    return _child(["train_step_case", argv, steps], allocator)


def generate_case(
    argv: list[str], new_tokens: int, recompute_tokens: int, device: str = "cpu"
) -> dict[str, Any]:
    """Generated tokens/s of a preset's model (random weights, batch 1, after a prompt that
    fills every layer's cache): incremental decoding against recomputing the whole window."""
    from .config import load_preset, parse_overrides
    from .generate import Sampling, next_token, tokens
    from .model import AllAttentionLM

    config = load_preset(argv[0]).override(parse_overrides(argv[1:])).model
    torch.manual_seed(0)
    model = AllAttentionLM(config).to(device).eval()
    window = config.attn_span
    prompt = torch.randint(config.vocab_size, (1, window), device=device)
    sampling = Sampling()
    sync = torch.cuda.synchronize if model.pos_emb.is_cuda else (lambda: None)

    decoding = tokens(model, prompt, new_tokens + 1, sampling, seed=0)
    next(decoding)  # the prompt, not timed
    sync()
    start = time.perf_counter()
    for _ in decoding:
        pass
    sync()
    incremental = new_tokens / (time.perf_counter() - start)

    generator = torch.Generator(device=device).manual_seed(0)
    sequence = prompt
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(recompute_tokens):  # the last S tokens from zero caches, every time
            logprobs = model(sequence[:, -window:]).logprobs[:, -1]
            sequence = torch.cat([sequence, next_token(logprobs, sampling, generator)[:, None]], 1)
    sync()
    recompute = recompute_tokens / (time.perf_counter() - start)
    return {
        "tokens_per_s": incremental,
        "recompute_tokens_per_s": recompute,
        "speedup": incremental / recompute,
        "window": window,
        "context": model.layers[0].context_length(),
        "parameters": model.num_parameters(),
        "peak_rss_mb": peak_rss_mb(),
    }


def generate_benchmark(
    argv: list[str], new_tokens: int, recompute_tokens: int, allocator: bool
) -> dict[str, Any]:
    return _child(["generate_case", argv, new_tokens, recompute_tokens], allocator)


def format_layer_table(results: list[LayerResult], peak: float, allocator: bool) -> str:
    lines = [
        f"matmul peak {peak:.0f} GFLOP/s (float32, measured now); allocator: "
        + ("freed memory kept (mallopt)" if allocator else "glibc defaults"),
        f"{'size':6} {'impl':10} {'ms':>9} {'tokens/s':>10} {'GFLOP/s':>8} {'of peak':>8} "
        f"{'peak MB':>8}",
    ]
    for r in results:
        lines.append(
            f"{r.size:6} {r.impl:10} {r.ms:9.1f} {r.tokens_per_s:10,.0f} {r.gflops:8.1f} "
            f"{r.peak_fraction:8.0%} {r.peak_mb:8.0f}"
        )
    return "\n".join(lines)
