"""The `allattn` command line: parses arguments, then calls the library. User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import torch

from . import __version__, bench, checkpoint, evaluate, generate, train
from .config import RunConfig, load_preset, parse_overrides, preset_names
from .data import DEFAULT_SPLIT, SPLITS, load_corpus
from .model import AllAttentionLM
from .original import ImportOptions, import_original
from .prepare import NAMES, prepare


class UsageError(Exception):
    """Bad command-line usage (argparse's errors, turned into one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated fractions") from None


def _add_prepare(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "prepare",
        help="tokenise a corpus into a data directory",
        description="Prepare enwik8 or text8 (from their zip archives, checksum-verified), the "
        "bundled tiny-shakespeare, or any UTF-8 text file (character level).",
    )
    p.add_argument("name", choices=NAMES)
    p.add_argument("--source", help="local file or URL (default: canonical URL / bundled copy)")
    p.add_argument("--out", help="data directory to write (default: data/NAME)")
    p.add_argument(
        "--split",
        type=_fractions,
        default=DEFAULT_SPLIT,
        help="train,valid,test fractions for text corpora (default 0.9,0.05,0.05)",
    )
    p.add_argument("--no-verify", action="store_true", help="accept a checksum mismatch")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    out = args.out or f"data/{args.name}"
    corpus = prepare(
        args.name,
        out,
        source=args.source,
        split=args.split,
        verify=not args.no_verify,
        overwrite=args.force,
    )
    counts = ", ".join(f"{k} {v:,}" for k, v in corpus.meta["tokens"].items())
    print(f"wrote {out}: {corpus.vocab.level} level, vocabulary {len(corpus.vocab)}, {counts}")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "train",
        help="train a model (default: the tiny preset on the bundled tiny-shakespeare)",
        description="Train from a preset, with any config field overridden on the command line.",
        epilog="Any field of [model], [optim] or [train] is a flag: --model.n_persistent 512 "
        "--train.batch_size 4 --train.block_size 512 --train.steps 100 --optim.lr 0.05. "
        f"Presets: {', '.join(preset_names())} (or a .toml file).",
        allow_abbrev=False,
    )
    p.add_argument("--preset", help="preset name or .toml file (default: tiny)")
    p.add_argument("--data", help="prepared data directory (same as --train.data)")
    p.add_argument("--out", help="run directory (default: runs/PRESET)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--force", action="store_true", help="restart a run directory from scratch")
    p.add_argument(
        "--print-config", action="store_true", help="show the resolved config and parameter count"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_train, overrides=True)


def _train_config(args: argparse.Namespace, extra: list[str]) -> tuple[RunConfig, Path]:
    assignments = parse_overrides(extra)
    if args.data is not None:
        assignments["train.data"] = args.data
    if args.resume:
        if args.preset:
            raise UsageError("allattn train: error: --resume takes the config from the run")
        if not args.out:
            raise UsageError("allattn train: error: --resume needs --out RUN_DIR")
        run_dir = Path(args.out)
        meta = checkpoint.load_meta(run_dir / checkpoint.LAST)  # the header only: no tensors
        if "run_config" not in meta:
            raise UsageError(f"allattn train: error: {run_dir} is not a training run")
        base = RunConfig.from_dict(meta["run_config"])
    else:
        preset = args.preset or "tiny"
        base = load_preset(preset)
        run_dir = Path(args.out or f"runs/{Path(preset).stem}")
    return base.override(assignments), run_dir


def _run_train(args: argparse.Namespace, extra: list[str]) -> int:
    config, run_dir = _train_config(args, extra)
    if args.print_config:
        model_config = config.model
        data = config.train.data
        if not data or Path(data).is_dir():
            model_config = model_config.replace(vocab_size=len(load_corpus(data).vocab))
        with torch.device("meta"):
            n_params = AllAttentionLM(model_config).num_parameters()
        print(config.replace(model=model_config).to_toml())
        print(
            f"# {model_config.kind} model: {n_params:,} parameters "
            f"(vocab_size {model_config.vocab_size})"
        )
        return 0
    result = train.run(
        config,
        run_dir,
        resume=args.resume,
        overwrite=args.force,
        progress=not args.no_progress,
    )
    print(
        f"trained to step {result.step}: last validation {result.valid_loss / math.log(2):.3f} "
        f"bpc; checkpoints in {result.run_dir}"
    )
    return 0


def _add_eval(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval",
        help="full evaluation of a checkpoint on a split (bits per character)",
        description="Score every full block of a split with fresh caches (DESIGN §3).",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (best)")
    p.add_argument("--data", help="data directory (default: the one the run trained on)")
    p.add_argument("--split", choices=SPLITS, default="test")
    p.add_argument("--batch-size", type=int, default=8, help="streams (8 as the original)")
    p.add_argument("--block-size", type=int, help="tokens per block (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    result = evaluate.run(
        args.checkpoint,
        data=args.data,
        split=args.split,
        batch_size=args.batch_size,
        block_size=args.block_size,
        device=args.device,
        dtype=args.dtype,
    )
    if args.json:
        print(json.dumps({**result.to_dict(), "checkpoint": str(args.checkpoint)}))
    else:
        print(
            f"{result.split}: {result.tokens:,} tokens, {result.loss_nats:.4f} nats/token, "
            f"{result.bpc:.3f} bits per character (ppl {result.ppl:.3f})"
        )
    return 0


def _add_generate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate",
        help="sample text from a checkpoint, streamed as it is produced",
        description="Continue a prompt with incremental decoding: the prompt goes through the "
        "model in blocks, then one token per step with each layer's cached keys and values.",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file or run directory (best)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    prompt.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=1.0, help="0: always the likeliest")
    p.add_argument("--top-k", type=int, help="draw among the k likeliest tokens only")
    p.add_argument("--top-p", type=float, help="draw from the nucleus of mass p only")
    p.add_argument("--seed", type=int, help="same seed, same text (default: random)")
    p.add_argument("--no-echo", action="store_true", help="print only the continuation")
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 0:
        raise UsageError(f"allattn: error: --max-new-tokens ({args.max_new_tokens}) is negative")
    sampling = generate.Sampling(args.temperature, args.top_k, args.top_p)
    prompt = args.prompt
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UsageError(f"allattn: error: {args.prompt_file} is not UTF-8 text") from None
    model, ckpt = checkpoint.load_model(args.checkpoint, train.resolve_device(args.device))
    if ckpt.vocab is None:
        raise checkpoint.CheckpointError(f"{args.checkpoint}: the checkpoint has no vocabulary")
    pieces = generate.stream(
        model, ckpt.vocab, prompt, args.max_new_tokens, sampling, seed=args.seed
    )
    try:
        if not args.no_echo:
            sys.stdout.write(prompt)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _add_bench(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "bench",
        help="benchmark the attention layer per kernel, a whole training step, or generation",
        description="`allattn bench layer`: one layer forward+backward at the small, paper and "
        "long sizes for each kernel (ms, tokens/s, GFLOP/s as a fraction of the matmul peak "
        "measured in the same run, peak memory). `allattn bench train-step --preset P "
        "[--SECTION.FIELD VALUE ...]`: whole training steps. `allattn bench generate --preset P "
        "[--SECTION.FIELD VALUE ...]`: generated tokens/s, incremental decoding against "
        "recomputing the whole window for every token. Both print JSON as their last line.",
        allow_abbrev=False,
    )
    p.add_argument("what", choices=["layer", "train-step", "generate"])
    p.add_argument("--sizes", default="small,paper,long", help="layer sizes to run")
    p.add_argument("--impls", default="reference,chunked", help="kernels to compare")
    p.add_argument("--repeats", type=int, default=3, help="best of this many (layer)")
    p.add_argument("--preset", default="tiny", help="preset for train-step")
    p.add_argument("--steps", type=int, default=4, help="timed training steps")
    p.add_argument("--new-tokens", type=int, default=64, help="generate: incremental tokens")
    p.add_argument(
        "--recompute-tokens", type=int, default=4, help="generate: tokens by window recomputation"
    )
    p.add_argument(
        "--default-allocator",
        action="store_true",
        help="leave glibc's allocator settings alone (the CLI otherwise keeps freed memory)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="train-step: also time the reference kernel with glibc's default allocator",
    )
    p.add_argument("--json", action="store_true", help="train-step: print only the JSON line")
    p.add_argument("--out", help="write the results as JSON to this file")
    p.set_defaults(run=_run_bench, overrides=True)


def _run_bench(args: argparse.Namespace, extra: list[str]) -> int:
    allocator = not args.default_allocator
    if args.what == "layer":
        if extra:
            raise UsageError(f"allattn bench: error: unrecognized arguments: {' '.join(extra)}")
        sizes = args.sizes.split(",")
        unknown = [s for s in sizes if s not in bench.LAYER_SIZES]
        if unknown:
            raise UsageError(f"allattn bench: error: unknown size {unknown[0]!r}")
        peak = bench.matmul_peak()
        results = bench.layer_benchmark(sizes, args.impls.split(","), args.repeats, allocator, peak)
        print(bench.format_layer_table(results, peak, allocator))
        payload: dict = {
            "matmul_peak_gflops": peak,
            "allocator_kept": allocator,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": [r.__dict__ for r in results],
        }
    elif args.what == "generate":
        load_preset(args.preset).override(parse_overrides(extra))  # errors before any process
        if args.new_tokens < 1 or args.recompute_tokens < 1:
            raise UsageError(
                "allattn bench: error: --new-tokens and --recompute-tokens must be >= 1"
            )
        result = bench.generate_benchmark(
            [args.preset, *extra], args.new_tokens, args.recompute_tokens, allocator
        )
        payload = {"preset": args.preset, "overrides": extra, **result}
        if not args.json:
            print(
                f"generate ({args.preset} {' '.join(extra)}; {result['parameters']:,} parameters, "
                f"window {result['window']}, attended context {result['context']}): "
                f"incremental {result['tokens_per_s']:,.1f} tokens/s, window recomputation "
                f"{result['recompute_tokens_per_s']:,.2f} tokens/s -> {result['speedup']:.1f}x"
            )
        print(json.dumps(payload))
    else:
        load_preset(args.preset).override(parse_overrides(extra))  # errors before any process
        argv = [args.preset, *extra]
        shipped = bench.train_step_benchmark(argv, args.steps, allocator)
        payload = {"preset": args.preset, "overrides": extra, "steps": args.steps, **shipped}
        if args.compare:
            reference = bench.train_step_benchmark(
                [*argv, "--model.attn_impl", "reference"], args.steps, False
            )
            payload["reference_default_allocator"] = reference
            payload["speedup"] = shipped["tokens_per_s"] / reference["tokens_per_s"]
        if not args.json:
            print(
                f"train step ({args.preset} {' '.join(extra)}): "
                f"{shipped['tokens_per_s']:,.0f} tokens/s, {shipped['ms_per_step']:.0f} ms/step, "
                f"peak RSS {shipped['peak_rss_mb']:,.0f} MB"
            )
            if args.compare:
                print(
                    f"reference kernel, default allocator: "
                    f"{payload['reference_default_allocator']['tokens_per_s']:,.0f} tokens/s "
                    f"-> shipped is {payload['speedup']:.2f}x"
                )
        print(json.dumps(payload))
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


def _add_import_original(commands: argparse._SubParsersAction) -> None:
    defaults = ImportOptions()
    p = commands.add_parser(
        "import-original",
        help="convert a checkpoint of the original adaptive-span/all-attention code",
        description="Convert a checkpoint written by the original code (torch.save of "
        "{'model': ..., ...}) into an allattn checkpoint: weights, inferred config, vocabulary.",
    )
    p.add_argument("original", help="the original checkpoint (.pt)")
    p.add_argument("out", help="the allattn checkpoint to write (.safetensors)")
    p.add_argument("--train-txt", help="the original's prepared train.txt (gives its token ids)")
    p.add_argument("--vocab", help="an allattn vocabulary JSON: the id order wanted")
    p.add_argument(
        "--level",
        choices=["auto", "byte", "char", "word"],
        default="auto",
        help="tokens of train.txt: byte (enwik8), char (text8), word; auto guesses",
    )
    p.add_argument("--dropout", type=float, default=defaults.dropout, help="attention dropout")
    p.add_argument("--emb-dropout", type=float, default=defaults.emb_dropout)
    p.add_argument("--span-ramp", type=int, default=defaults.span_ramp, help="span ramp R")
    p.add_argument("--span-loss-coef", type=float, default=defaults.span_loss_coef)
    p.add_argument(
        "--adapt-cache",
        action=argparse.BooleanOptionalAction,
        default=defaults.adapt_cache,
        help="adaptive cache size (the paper's scripts use it; the original's default is off)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=_run_import_original)


def _run_import_original(args: argparse.Namespace) -> int:
    options = ImportOptions(
        dropout=args.dropout,
        emb_dropout=args.emb_dropout,
        span_ramp=args.span_ramp,
        span_loss_coef=args.span_loss_coef,
        adapt_cache=args.adapt_cache,
    )
    result = import_original(
        args.original,
        args.out,
        train_txt=args.train_txt,
        vocab=args.vocab,
        level=args.level,
        options=options,
        overwrite=args.force,
    )
    cfg = result.config
    vocab = result.vocab
    print(
        f"wrote {args.out}: {cfg.kind}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, n_persistent {cfg.n_persistent}, attn_span {cfg.attn_span}, "
        f"{vocab.level if vocab else 'no'} vocabulary of {cfg.vocab_size}, "
        f"{sum(t.numel() for t in result.weights.values()):,} parameters"
    )
    return 0


def _add_info(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser("info", help="describe a checkpoint: config, parameters, vocabulary")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> int:
    ckpt = checkpoint.load(args.checkpoint)
    model = ckpt.build_model()
    info = {
        "checkpoint": args.checkpoint,
        "kind": ckpt.config.kind,
        "parameters": model.num_parameters(),
        "vocab_level": ckpt.vocab.level if ckpt.vocab else None,
        "config": ckpt.config.to_dict(),
        "span": model.span_stats(),
        "meta": {k: v for k, v in ckpt.meta.items() if k != "logger"},
    }
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.checkpoint}: {info['kind']} model, {info['parameters']:,} parameters")
    for key, value in info["config"].items():
        print(f"  model.{key} = {value}")
    print(f"  vocabulary: {info['vocab_level']}, {ckpt.config.vocab_size} tokens")
    print(f"  spans: avg {info['span']['span_avg']:.0f}, max {info['span']['span_max']:.0f}")
    for key, value in info["meta"].items():
        print(f"  {key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="allattn",
        description="All-attention networks with persistent memory (arXiv 1907.01470).",
    )
    parser.add_argument("--version", action="version", version=f"allattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_prepare(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_generate(commands)
    _add_bench(commands)
    _add_import_original(commands)
    _add_info(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors, with a one-line message)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    bench.keep_allocations()  # reuse freed memory: large tensors are not re-mmapped every step
    try:
        args, extra = build_parser().parse_known_args(argv)
        if getattr(args, "overrides", False):
            return args.run(args, extra)
        if extra:
            raise UsageError(f"allattn: error: unrecognized arguments: {' '.join(extra)}")
        return args.run(args)
    except (UsageError, ValueError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if not isinstance(error, UsageError):
            message = f"allattn: error: {message}"
        print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("allattn: interrupted", file=sys.stderr)
        return 130
