"""The `allattn` command line: parses arguments, then calls the library. User errors exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from . import __version__, checkpoint
from .data import DEFAULT_SPLIT
from .original import ImportOptions, import_original
from .prepare import NAMES, prepare

log = logging.getLogger("allattn")


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
    _add_import_original(commands)
    _add_info(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors, with a one-line message)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except (UsageError, ValueError, OSError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        if not isinstance(error, UsageError):
            message = f"allattn: error: {message}"
        print(message, file=sys.stderr)
        return 2
