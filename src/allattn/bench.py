"""Benchmarks: the attention layer per kernel, whole training steps, generation, matmul peak.

Each measurement runs in a fresh Python process (so its peak memory is its own and the
allocator settings are the ones asked for) and reports the best of several repetitions; ratios
between kernels are only meaningful within one run on one machine. `layer`, `train_step` and
`generate` run a whole benchmark and return a `Report`: the table to print and the JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import atomic, flex, runtime
from .config import DEFAULT_PRESET, AttnImpl, ConfigError, RunConfig, Settings, setting
from .data import SPLITS, Corpus
from .train import require_memory


class BenchError(ValueError):
    """A benchmark case failed in its process (the message is its last error line)."""


LAYER_SIZES = {
    # name: (B, M, S, H, D, N, z) with z the span parameter of every head
    "small": (8, 128, 256, 4, 64, 256, 1.0),
    "paper": (4, 512, 1024, 8, 64, 1024, 1.0),
    # spans trimmed to a quarter: max span 960 + 32 -> trim 3072, L = 1024 of S = 4096
    "long": (4, 512, 4096, 8, 64, 2048, 960 / 4096),
}


@dataclass(frozen=True, kw_only=True)
class BenchOptions(Settings):
    """Settings every benchmark takes."""

    default_allocator: bool = setting(
        False, "leave glibc's allocator settings alone (the CLI otherwise keeps freed memory)"
    )
    json: bool = setting(False, "print only the JSON line")
    out: str | None = setting(None, "also write the results as JSON to this file")


@dataclass(frozen=True, kw_only=True)
class LayerBench(BenchOptions):
    """`allattn bench layer`: one layer forward + backward per size and kernel."""

    sizes: str = setting(",".join(LAYER_SIZES), "layer sizes to run, comma-separated")
    impls: str = setting("reference,chunked", "kernels to compare, comma-separated")
    precisions: str = setting(
        "fp32", "precisions to compare, comma-separated: fp32, bf16 (autocast), fp16 (CUDA)"
    )
    compile: str = setting(
        "false",
        "false, true (the layer under torch.compile with the kernel's fused elementwise "
        "functions, as --runtime.compile), or both, comma-separated",
    )
    repeats: int = setting(3, "best of this many repetitions")

    def validate(self) -> None:
        if not self.compile or any(c not in ("false", "true") for c in self.compile.split(",")):
            raise ConfigError(f"--compile ({self.compile}) must be false, true or false,true")
        unknown = [s for s in self.sizes.split(",") if s not in LAYER_SIZES]
        if unknown:
            raise ConfigError(f"unknown size {unknown[0]!r}; choose from {', '.join(LAYER_SIZES)}")
        kernels = typing.get_args(AttnImpl)
        bad = [i for i in self.impls.split(",") if i not in kernels]
        if bad:
            raise ConfigError(f"unknown kernel {bad[0]!r}; choose from {', '.join(kernels)}")
        bad = [d for d in self.precisions.split(",") if d not in LAYER_PRECISIONS]
        if bad:
            raise ConfigError(
                f"unknown precision {bad[0]!r}; choose from {', '.join(LAYER_PRECISIONS)}"
            )
        if "fp16" in self.precisions.split(","):
            raise ConfigError("bench layer runs on the CPU, and fp16 needs CUDA; use bf16")
        if "flex" in self.impls.split(","):
            raise ConfigError(
                "bench layer runs forward + backward on the CPU, and flex has no backward there "
                "(benchmarks/gpu_check.py times it on CUDA)"
            )
        self._require_ints(1, "repeats")


LAYER_PRECISIONS = ("fp32", "bf16", "fp16")
"""The precisions of `RuntimeConfig.precision` that `bench layer` knows (float32 weights; bf16
as autocast; fp16 is refused, the layer benchmark being a CPU one)."""


@dataclass(frozen=True, kw_only=True)
class TrainStepBench(BenchOptions):
    """`allattn bench train-step`: whole training steps of a preset with overrides."""

    preset: str = setting(DEFAULT_PRESET, "preset name or .toml file")
    steps: int = setting(4, "timed training steps")
    compare: bool = setting(False, "also time the reference kernel with glibc's default allocator")
    compare_softmax: bool = setting(
        False,
        "adaptive I/O models: also time a plain embedding and full softmax of the same "
        "vocabulary (--model.adaptive_io false), peak memory included",
    )

    def validate(self) -> None:
        self._require_ints(1, "steps")


@dataclass(frozen=True, kw_only=True)
class GenerateBench(BenchOptions):
    """`allattn bench generate`: incremental decoding against recomputing the window."""

    preset: str = setting(DEFAULT_PRESET, "preset name or .toml file")
    new_tokens: int = setting(64, "tokens generated by incremental decoding")
    recompute_tokens: int = setting(4, "tokens generated by recomputing the whole window")

    def validate(self) -> None:
        self._require_ints(1, "new_tokens", "recompute_tokens")


@dataclass
class Report:
    """A benchmark's result: the table or line to print, and the JSON payload."""

    text: str
    payload: dict[str, Any]

    def save(self, path: str | Path) -> None:
        atomic.write_bytes(path, (json.dumps(self.payload, indent=2) + "\n").encode())


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
    precision: str = "fp32"
    compiled: bool = False


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
    )
    torch.manual_seed(0)
    layer = AllAttentionLayer(config, impl)
    pos = torch.nn.Parameter(torch.randn(span, head_dim))
    h = torch.randn(batch, block, config.d_model, requires_grad=True)
    cache = torch.randn(batch, layer.cache_size(), config.d_model)

    def step() -> None:
        out, _ = layer(h, cache, pos)
        out.sum().backward()

    return layer, step


def _layer_case(
    size: str, impl: str, repeats: int, precision: str = "fp32", compiled: bool = False
) -> dict[str, Any]:
    """Runs in a child process: one layer, forward + backward, best of `repeats`, at
    `precision` (bf16: under autocast), compiled as `--runtime.compile` compiles (the first,
    untimed, run compiles)."""
    batch, block, _, heads, head_dim, n_mem, _ = LAYER_SIZES[size]
    layer, plain_step = layer_step(size, impl)
    if compiled:
        runtime.compile_model(layer)

    def step() -> None:
        with runtime.autocast(torch.device("cpu"), precision):
            plain_step()

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


def _child(args: list[Any], allocator: bool) -> dict[str, Any]:
    code = (
        "import json, sys; from allattn import bench, runtime; "
        f"runtime.keep_allocations() if {allocator} else None; "
        f"print(json.dumps(bench.{args[0]}(*json.loads(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args[1:])],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        lines = out.stderr.strip().splitlines() or [f"exit status {out.returncode}"]
        raise BenchError(f"benchmark case {args[0]} failed: {lines[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def layer_benchmark(
    sizes: list[str],
    impls: list[str],
    repeats: int,
    allocator: bool,
    peak: float,
    rounds: int = 2,
    precisions: tuple[str, ...] = ("fp32",),
    compiles: tuple[bool, ...] = (False,),
) -> list[LayerResult]:
    """Each (size, kernel, precision, compiled) in its own process, the cases interleaved over
    `rounds` rounds (the machine's load drifts), keeping each one's best time and largest peak
    memory."""
    cases = [
        (size, impl, p, c) for size in sizes for impl in impls for p in precisions for c in compiles
    ]
    best: dict[tuple[str, str, str, bool], dict[str, Any]] = {}
    peak_mb: dict[tuple[str, str, str, bool], float] = {}
    for _ in range(rounds):
        for case in cases:
            r = _child(["_layer_case", *case[:2], repeats, *case[2:]], allocator)
            peak_mb[case] = max(peak_mb.get(case, 0.0), r["peak_mb"])
            if case not in best or r["seconds"] < best[case]["seconds"]:
                best[case] = r
    results = []
    for case in cases:
        r = best[case]
        gflops = r["flops"] / r["seconds"] / 1e9
        results.append(
            LayerResult(
                size=case[0],
                impl=case[1],
                ms=r["seconds"] * 1e3,
                tokens_per_s=r["tokens"] / r["seconds"],
                gflops=gflops,
                peak_fraction=gflops / peak,
                peak_mb=peak_mb[case],
                precision=case[2],
                compiled=case[3],
            )
        )
    return results


def train_step_case(run_config: dict[str, Any], steps: int) -> dict[str, Any]:
    """Runs in a child process: `steps` training steps of a run config (`RunConfig.to_dict`)
    on a synthetic corpus, after two untimed ones (the first includes any compilation: its
    time is `first_step_s`)."""
    from .train import Trainer, adopt_vocabulary

    config = RunConfig.from_dict(run_config)
    corpus = synthetic_corpus(config)
    config = adopt_vocabulary(config, corpus.vocab)
    trainer = Trainer(config, corpus, run_dir=None)
    start = time.perf_counter()
    trainer.train_step()
    first = time.perf_counter() - start
    trainer.train_step()
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
        "first_step_s": first,
    }


def synthetic_corpus(config: RunConfig) -> Corpus:
    """A corpus to time `config` on: 90 distinct characters for character-level models; for
    word-level ones (adaptive I/O, or more than 256 tokens), `vocab_size` words drawn from a
    Zipf distribution over the ids, which word-level ids follow (numbered by count)."""
    from .data import Vocabulary, char_corpus, id_dtype

    block = config.train.block_size * config.train.batch_size
    vocab_size = config.model.vocab_size
    if not config.model.adaptive_io and vocab_size <= 256:
        text = "".join(chr(32 + (i * 7919) % 90) for i in range(200_000))
        return char_corpus(text * max(1, math.ceil(4 * block / len(text))), (0.9, 0.05, 0.05))
    rank = np.arange(1, vocab_size + 1, dtype=np.float64)
    rng = np.random.default_rng(0)
    ids = rng.choice(vocab_size, size=4 * block, p=(1 / rank) / (1 / rank).sum())
    ids = ids.astype(id_dtype(vocab_size))
    vocab = Vocabulary(tuple(f"w{i}" for i in range(vocab_size)), "word")
    return Corpus(vocab=vocab, splits={name: ids for name in SPLITS}, meta={"synthetic": True})


def generate_case(
    run_config: dict[str, Any], new_tokens: int, recompute_tokens: int, device: str = "cpu"
) -> dict[str, Any]:
    """Generated tokens/s of a run config's model (random weights, batch 1, after a prompt that
    fills every layer's cache): incremental decoding against recomputing the whole window."""
    from .generate import Sampling, next_token, tokens
    from .model import AllAttentionLM

    config = RunConfig.from_dict(run_config).model
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
        "context": model.context_lengths()[0],
        "parameters": model.num_parameters(),
        "peak_rss_mb": peak_rss_mb(),
    }


def format_layer_table(results: list[LayerResult], peak: float, allocator: bool) -> str:
    lines = [
        f"matmul peak {peak:.0f} GFLOP/s (float32, measured now); allocator: "
        + ("freed memory kept (mallopt)" if allocator else "glibc defaults"),
        f"{'size':6} {'impl':10} {'precision':9} {'compiled':8} {'ms':>9} {'tokens/s':>10} "
        f"{'GFLOP/s':>8} {'of peak':>8} {'peak MB':>8}",
    ]
    for r in results:
        lines.append(
            f"{r.size:6} {r.impl:10} {r.precision:9} {str(r.compiled).lower():8} {r.ms:9.1f} "
            f"{r.tokens_per_s:10,.0f} {r.gflops:8.1f} {r.peak_fraction:8.0%} {r.peak_mb:8.0f}"
        )
    return "\n".join(lines)


def layer(options: LayerBench) -> Report:
    """The layer benchmark: every size and kernel, against the matmul peak measured now."""
    allocator = not options.default_allocator
    if "true" in options.compile.split(","):
        runtime.require_compiler(torch.device("cpu"))
    peak = matmul_peak()
    results = layer_benchmark(
        options.sizes.split(","),
        options.impls.split(","),
        options.repeats,
        allocator,
        peak,
        precisions=tuple(options.precisions.split(",")),
        compiles=tuple(c == "true" for c in options.compile.split(",")),
    )
    payload = {
        "matmul_peak_gflops": peak,
        "allocator_kept": allocator,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "results": [dataclasses.asdict(r) for r in results],
    }
    return Report(format_layer_table(results, peak, allocator), payload)


def _describe(preset: str, overrides: list[str]) -> str:
    return " ".join([preset, *overrides])


def train_step(options: TrainStepBench, config: RunConfig, overrides: list[str]) -> Report:
    """Whole training steps of `config` (the preset with `overrides`, as given), and with
    `compare` the reference kernel with glibc's default allocator."""
    require_memory(config)
    flex.require_trainable(config, runtime.resolve_device(config.runtime.device))
    if options.compare_softmax and not config.model.adaptive_io:
        raise ConfigError("--compare-softmax compares adaptive I/O: the model has none")
    allocator = not options.default_allocator
    shipped = _child(["train_step_case", config.to_dict(), options.steps], allocator)
    payload = {
        "preset": options.preset,
        "overrides": overrides,
        "steps": options.steps,
        **shipped,
    }
    lines = [
        f"train step ({_describe(options.preset, overrides)}): "
        f"{shipped['tokens_per_s']:,.0f} tokens/s, {shipped['ms_per_step']:.0f} ms/step, "
        f"peak RSS {shipped['peak_rss_mb']:,.0f} MB, first step {shipped['first_step_s']:.1f} s"
        + (" (compilation included)" if config.runtime.compile else "")
    ]
    if options.compare_softmax:
        lines.append(_compare_softmax(options, config, shipped, payload, allocator))
    if options.compare:
        reference = config.replace(runtime=config.runtime.replace(attn_impl="reference"))
        slow = _child(["train_step_case", reference.to_dict(), options.steps], False)
        payload["reference_default_allocator"] = slow
        payload["speedup"] = shipped["tokens_per_s"] / slow["tokens_per_s"]
        lines.append(
            f"reference kernel, default allocator: {slow['tokens_per_s']:,.0f} tokens/s "
            f"-> shipped is {payload['speedup']:.2f}x"
        )
    return Report("\n".join(lines), payload)


def _compare_softmax(
    options: TrainStepBench,
    config: RunConfig,
    adaptive: dict[str, Any],
    payload: dict[str, Any],
    allocator: bool,
) -> str:
    """Time the same run with a plain embedding and full softmax; its line of the report."""
    full = config.replace(model=config.model.replace(adaptive_io=False))
    vocab = config.model.vocab_size
    try:
        require_memory(full)
        result = _child(["train_step_case", full.to_dict(), options.steps], allocator)
    except (BenchError, ConfigError, MemoryError) as error:  # too large to run here
        payload["full_softmax"] = {"failed": str(error)}
        return f"full softmax over {vocab:,} tokens: did not run ({error})"
    payload["full_softmax"] = result
    payload["full_softmax_memory_ratio"] = result["peak_rss_mb"] / adaptive["peak_rss_mb"]
    payload["full_softmax_speed_ratio"] = adaptive["tokens_per_s"] / result["tokens_per_s"]
    return (
        f"full softmax over {vocab:,} tokens: {result['tokens_per_s']:,.0f} tokens/s, "
        f"peak RSS {result['peak_rss_mb']:,.0f} MB -> adaptive I/O is "
        f"{payload['full_softmax_speed_ratio']:.2f}x faster with "
        f"{payload['full_softmax_memory_ratio']:.2f}x less peak memory"
    )


def generate(options: GenerateBench, config: RunConfig, overrides: list[str]) -> Report:
    """Generated tokens/s of `config`'s model, incremental against window recomputation."""
    require_memory(config)
    allocator = not options.default_allocator
    result = _child(
        ["generate_case", config.to_dict(), options.new_tokens, options.recompute_tokens],
        allocator,
    )
    text = (
        f"generate ({_describe(options.preset, overrides)}; {result['parameters']:,} "
        f"parameters, window {result['window']}, attended context {result['context']}): "
        f"incremental {result['tokens_per_s']:,.1f} tokens/s, window recomputation "
        f"{result['recompute_tokens_per_s']:,.2f} tokens/s -> {result['speedup']:.1f}x"
    )
    return Report(text, {"preset": options.preset, "overrides": overrides, **result})
