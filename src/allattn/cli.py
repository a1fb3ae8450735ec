"""The `allattn` command line: parses arguments, then calls the library. User errors exit 2.

Every flag comes from a settings dataclass (`allattn.flags`): a command's own settings are
plain flags (`--batch-size`), the sections of a run dotted ones (`--model.n_layers`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from tqdm.contrib.logging import logging_redirect_tqdm

from . import (
    __version__,
    bench,
    checkpoint,
    distributed,
    evaluate,
    export,
    flags,
    generate,
    hub,
    plot,
    prepare,
    runtime,
    train,
)
from .checkpoint import verify_setting
from .config import (
    ModelConfig,
    OptimConfig,
    RunConfig,
    RuntimeConfig,
    Settings,
    TrainConfig,
    load_preset,
    preset_names,
    setting,
)
from .metrics import measure
from .original import ImportFiles, ImportOptions, import_original
from .signals import Interrupted

RUN_SECTIONS = (ModelConfig, OptimConfig, TrainConfig, RuntimeConfig)


class UsageError(Exception):
    """Bad command-line usage (argparse's errors, turned into one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        missing = re.fullmatch(r"argument (--\w+\.\w+): expected one argument", message)
        if missing:
            message = f"{missing.group(1)} needs a value"
        raise UsageError(f"{self.prog}: error: {message}")


@dataclass(frozen=True, kw_only=True)
class Common(Settings):
    """Settings of every subcommand."""

    quiet: bool = setting(False, "no progress bar and no log lines (errors still print)")


Handler = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Command:
    """A subcommand: its settings classes, whether it takes run sections, and its handler."""

    name: str
    help: str
    description: str
    settings: tuple[type[Settings], ...]
    handler: Handler
    sections: tuple[type[Settings], ...] = ()
    epilog: str | None = None


def _run_prepare(args: argparse.Namespace) -> int:
    options = flags.settings(prepare.PrepareOptions, args)
    corpus = prepare.run(options)
    counts = ", ".join(f"{k} {v:,}" for k, v in corpus.meta["tokens"].items())
    print(
        f"wrote {options.out_dir}: {corpus.vocab.level} level, vocabulary {len(corpus.vocab)}, "
        f"{counts}"
    )
    return 0


def _run_train(args: argparse.Namespace) -> int:
    options = flags.settings(train.TrainOptions, args)
    config, run_dir = train.resolve_config(options, flags.overrides(args))
    if options.print_config:
        print(train.describe(config))
        return 0
    result = train.run(
        config,
        run_dir,
        resume=options.resume,
        overwrite=options.force,
        progress=options.progress and not args.quiet,
        fallback=options.fallback,
        verify=options.verify,
    )
    if distributed.detect().main:  # under torchrun: rank 0 speaks for the job
        print(
            f"trained to step {result.step}: last validation "
            f"{measure(result.level).format(result.valid_loss)}; checkpoints in {result.run_dir}"
        )
    return 0


def _runtime(args: argparse.Namespace) -> RuntimeConfig:
    """The [runtime] section of a command that runs a checkpoint: defaults plus the flags."""
    return RunConfig().override(flags.overrides(args)).runtime


def _run_eval(args: argparse.Namespace) -> int:
    config = flags.settings(evaluate.EvalConfig, args)
    result = evaluate.run(config, _runtime(args))
    if not distributed.detect().main:  # under torchrun: rank 0 speaks for the job
        return 0
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(result.describe())
    return 0


@dataclass(frozen=True, kw_only=True)
class _EvalOutput(Settings):
    json: bool = setting(False, "print one JSON object")


def _run_generate(args: argparse.Namespace) -> int:
    pieces = generate.run(
        flags.settings(generate.GenerateConfig, args),
        flags.settings(generate.Sampling, args),
        _runtime(args),
    )
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _bench_report(options: bench.BenchOptions, report: bench.Report) -> int:
    if not options.json:
        print(report.text)
    print(json.dumps(report.payload))
    if options.out:
        report.save(options.out)
    return 0


def _run_bench_layer(args: argparse.Namespace) -> int:
    options = flags.settings(bench.LayerBench, args)
    return _bench_report(options, bench.layer(options))


def _bench_config(args: argparse.Namespace, preset: str) -> RunConfig:
    return load_preset(preset).override(flags.overrides(args))  # errors before any process


def _run_bench_train_step(args: argparse.Namespace) -> int:
    options = flags.settings(bench.TrainStepBench, args)
    config = _bench_config(args, options.preset)
    return _bench_report(options, bench.train_step(options, config, flags.override_argv(args)))


def _run_bench_generate(args: argparse.Namespace) -> int:
    options = flags.settings(bench.GenerateBench, args)
    config = _bench_config(args, options.preset)
    return _bench_report(options, bench.generate(options, config, flags.override_argv(args)))


def _run_import_original(args: argparse.Namespace) -> int:
    files = flags.settings(ImportFiles, args)
    result = import_original(
        files.original,
        files.out,
        train_txt=files.train_txt,
        vocab=files.vocab,
        level=files.level,
        options=flags.settings(ImportOptions, args),
        overwrite=files.force,
    )
    cfg = result.config
    vocab = result.vocab
    print(
        f"wrote {files.out}: {cfg.kind}, {cfg.n_layers} layers, d_model {cfg.d_model}, "
        f"{cfg.n_heads} heads, n_persistent {cfg.n_persistent}, attn_span {cfg.attn_span}, "
        f"{vocab.level if vocab else 'no'} vocabulary of {cfg.vocab_size}, "
        f"{sum(t.numel() for t in result.weights.values()):,} parameters"
    )
    return 0


@dataclass(frozen=True, kw_only=True)
class _InfoOptions(Settings):
    checkpoint: str = setting(dataclasses.MISSING, "checkpoint file", positional=True)
    json: bool = setting(False, "print one JSON object")
    verify: bool = verify_setting()


def _run_info(args: argparse.Namespace) -> int:
    options = flags.settings(_InfoOptions, args)
    info = checkpoint.info(options.checkpoint, options.verify)
    print(json.dumps(info) if options.json else checkpoint.format_info(info))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    out = export.run(flags.settings(export.ExportOptions, args))
    print(f"wrote {out}")
    return 0


def _run_export_hf(args: argparse.Namespace) -> int:
    out = hub.run(flags.settings(hub.ExportHFOptions, args))
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def _run_plot(args: argparse.Namespace) -> int:
    out = plot.run(flags.settings(plot.PlotOptions, args))
    print(f"wrote {out}")
    return 0


def _run_lm_eval(argv: list[str]) -> int:
    """The harness's own command line (its flags, passed through) with `allattn` registered."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UsageError(
            "allattn lm-eval: lm-evaluation-harness is not installed: "
            "pip install 'allattn[lm-eval]'"
        ) from None
    from . import harness

    harness.main(argv)
    return 0


def _bench_commands() -> list[Command]:
    return [
        Command(
            "layer",
            "one layer forward+backward per size and kernel",
            "One layer forward+backward at the small, paper and long sizes for each kernel (ms, "
            "tokens/s, GFLOP/s as a fraction of the matmul peak measured in the same run, peak "
            "memory). Prints the table, then the JSON.",
            (bench.LayerBench,),
            _run_bench_layer,
        ),
        Command(
            "train-step",
            "whole training steps of a preset",
            "Whole training steps of a preset with any --section.field override; prints the "
            "JSON as the last line.",
            (bench.TrainStepBench,),
            _run_bench_train_step,
            RUN_SECTIONS,
        ),
        Command(
            "generate",
            "generated tokens/s: incremental decoding against window recomputation",
            "Generated tokens/s of a preset's model (random weights), incremental decoding "
            "against recomputing the whole window for every token; prints the JSON last.",
            (bench.GenerateBench,),
            _run_bench_generate,
            RUN_SECTIONS,
        ),
    ]


def _commands() -> list[Command]:
    return [
        Command(
            "prepare",
            "tokenise a corpus into a data directory",
            "Prepare enwik8 or text8 (from their zip archives, checksum-verified), WikiText-103 "
            "or WikiText-2 (word level, from their zip archives or a folder of "
            "wiki.{train,valid,test}.tokens, checksum-verified), the bundled tiny-shakespeare, "
            "or any UTF-8 text file (character level).",
            (prepare.PrepareOptions,),
            _run_prepare,
        ),
        Command(
            "train",
            "train a model (default: the tiny preset on the bundled tiny-shakespeare)",
            "Train from a preset, with any config field overridden on the command line.",
            (train.TrainOptions,),
            _run_train,
            RUN_SECTIONS,
            epilog="Any field of [model], [optim], [train] or [runtime] is a flag: "
            "--model.n_persistent 512 --train.batch_size 4 --train.block_size 512 "
            f"--train.steps 100 --optim.lr 0.05. Presets: {', '.join(preset_names())} "
            "(or a .toml file).",
        ),
        Command(
            "eval",
            "full evaluation of a checkpoint on a split (bpc, bits per byte or perplexity)",
            "Score every full block of a split with fresh caches (DESIGN §3).",
            (evaluate.EvalConfig, _EvalOutput),
            _run_eval,
            (RuntimeConfig,),
        ),
        Command(
            "generate",
            "sample text from a checkpoint, streamed as it is produced",
            "Continue a prompt with incremental decoding: the prompt goes through the model in "
            "blocks, then one token per step with each layer's cached keys and values.",
            (generate.GenerateConfig, generate.Sampling),
            _run_generate,
            (RuntimeConfig,),
        ),
        Command(
            "import-original",
            "convert a checkpoint of the original adaptive-span/all-attention code",
            "Convert a checkpoint written by the original code (torch.save of {'model': ..., "
            "...}) into an allattn checkpoint: weights, inferred config, vocabulary.",
            (ImportFiles, ImportOptions),
            _run_import_original,
        ),
        Command(
            "export",
            "export the incremental decoding step (torch.export .pt2, or ONNX)",
            "Export one decoding step of a checkpoint's model: tokens (B, M) and each layer's "
            "key and value caches in, log-probabilities and the updated caches out, as a "
            "torch.export program (.pt2, its metadata inside) or an ONNX model (.onnx, the "
            "export extra). See allattn.export for the inputs, outputs and a generation loop.",
            (export.ExportOptions,),
            _run_export,
        ),
        Command(
            "export-hf",
            "write a run's checkpoint as a Hugging Face Hub directory with a model card",
            "Write config.json, model.safetensors, vocab.json and a model card (README.md: the "
            "model, its run's config, and its test-split evaluation, run here when the data is "
            "available) for `allattn.hub.from_pretrained`, the Hub's web pages, or `hf upload` / "
            "`allattn.hub.push_to_hub` (the hub extra).",
            (hub.ExportHFOptions,),
            _run_export_hf,
        ),
        Command(
            "plot",
            "draw runs' learning curves and spans (needs the plot extra)",
            "Draw the learning curves of one or more runs (train and validation against steps "
            "and against wall-clock time, overlaid) and each run's per-head spans over "
            "training, from their metrics.jsonl; a run in progress can be drawn.",
            (plot.PlotOptions,),
            _run_plot,
        ),
        Command(
            "info",
            "describe a checkpoint: config, parameters, vocabulary",
            "Describe a checkpoint: its config, parameters, vocabulary, spans and run.",
            (_InfoOptions,),
            _run_info,
        ),
    ]


def _add(commands: Any, command: Command) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        command.name,
        help=command.help,
        description=command.description,
        epilog=command.epilog,
        allow_abbrev=False,
    )
    for cls in (*command.settings, Common):
        flags.add_settings(parser, cls)
    flags.add_sections(parser, *command.sections)
    parser.set_defaults(handler=command.handler, sections=bool(command.sections))
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="allattn",
        description="All-attention networks with persistent memory (arXiv 1907.01470).",
    )
    parser.add_argument("--version", action="version", version=f"allattn {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in _commands():
        _add(commands, command)
    bench_parser = commands.add_parser(
        "bench",
        help="benchmark the attention layer per kernel, a whole training step, or generation",
        description="Benchmarks; each prints a table or line and its JSON.",
    )
    commands.add_parser(
        "lm-eval",
        help="lm-evaluation-harness with the allattn model (needs the lm-eval extra)",
        description="The harness's command line (`lm_eval`'s flags) with the model type "
        "`allattn` registered and chosen: allattn lm-eval --model_args "
        "checkpoint=RUN_DIR[,block_size=M,precision=P,max_length=N] --batch_size B "
        "--device D --tasks wikitext. See allattn.harness for how each request type is scored.",
        add_help=False,
    )
    benches = bench_parser.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for command in _bench_commands():
        _add(benches, command)
    return parser


_log_handler: logging.Handler | None = None


def _configure_logging(quiet: bool) -> None:
    """The library logs through `logging` (loggers `allattn.*`); the CLI shows INFO and above
    on stderr, or only warnings with --quiet. Other loggers are left alone."""
    global _log_handler
    logger = logging.getLogger("allattn")
    if _log_handler is not None:
        logger.removeHandler(_log_handler)
    _log_handler = logging.StreamHandler(sys.stderr)  # the current stderr (tests swap it)
    _log_handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(_log_handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 for user errors, with a one-line message)."""
    try:
        runtime.keep_allocations()  # reuse freed memory: no fresh mmap per large tensor
        argv = list(sys.argv[1:] if argv is None else argv)
        if argv[:1] == ["lm-eval"]:  # the harness's own flags, its --help included
            _configure_logging(quiet=False)
            return _run_lm_eval(argv[1:])
        args, extra = build_parser().parse_known_args(argv)
        _configure_logging(args.quiet or not distributed.detect().main)  # rank 0's log only
        flags.reject_extra(extra, args.sections)
        with logging_redirect_tqdm([logging.getLogger("allattn")]):  # lines above the bar
            return args.handler(args)
    except (UsageError, ValueError, OSError, MemoryError) as error:
        if not distributed.reported_by_main(error):
            print(_one_line(error), file=sys.stderr)
        return 2
    except Interrupted as stop:
        if not distributed.reported_by_main(stop):
            print(f"allattn: {stop.message}", file=sys.stderr)
        return stop.status
    except distributed.DistributedError as error:  # a lost peer or a timeout: not bad input
        print(_one_line(error), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("allattn: interrupted", file=sys.stderr)
        return 130


_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _one_line(error: BaseException) -> str:
    """The error as one line: its first line, without terminal escape codes."""
    text = _ESCAPES.sub("", str(error)).strip()
    if isinstance(error, MemoryError):
        text = "out of memory" + (f" ({text})" if text else "")
    message = text.splitlines()[0].strip() if text else type(error).__name__
    return message if isinstance(error, UsageError) else f"allattn: error: {message}"
