"""A deterministic fuzz test of the command line.

The contract: `allattn.cli.main(argv)` returns 0, or returns 2 with a one-line error on stderr
("allattn: error: ..." or argparse's "allattn CMD: error: ..."); it never raises, never returns
another status and never hangs. Cases are base command lines that succeed (or fail cleanly) in
well under a second, each with one or two mutations drawn by a seeded `random.Random`: a value
from a pool of odd values and degenerate files, a dropped value or flag, a repeated or unknown
flag, `--flag=value`, a bad choice, an absurd size. Every case runs in-process, in a temporary
working directory, under a timeout (a hang is a failure, not a stuck run) and a cap on the
address space (an absurd allocation fails instead of killing the test process).

The benchmarks' child processes are replaced by a stand-in that only builds the model and
returns made-up numbers, so `bench` cases cost no process and no real benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import logging
import os
import random
import re
import resource
import shlex
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from allattn import bench, cli
from allattn.cli import main
from allattn.config import RunConfig
from allattn.model import AllAttentionLM

SEED, CASES = 1907, 1500
SLOW_SEED, SLOW_CASES = 1470, 6000
TIMEOUT_S = 10.0
"""Per case: a valid one takes well under a second (0.4 s at most, 20 ms on average)."""
ADDRESS_HEADROOM = 6 << 30
"""Address space a case may add before allocations fail (RLIMIT_AS)."""
HEAVY_MB = 1024
"""A case whose peak resident memory grew more than this is listed as heavy (not a failure)."""
LISTED = 30
"""Distinct failures the assertion message lists."""

RESULTS: dict[str, dict[str, Any]] = {}
"""Per test: the counts of each verdict, the seconds, and the heavy cases (for a report)."""

TINY = (
    "--train.eval_interval 2 --train.batch_size 2 --train.block_size 8 --train.eval_batch_size 2 "
    "--model.d_model 16 --model.n_heads 2 --model.n_layers 1 --model.n_persistent 4 "
    "--model.attn_span 16"
)
ALPHABET = "abcdefghij klmnop\nqrstuvwxyz.,;ABC"

# ----------------------------------------------------------------------------------------------
# What the cases are made of

VALUES = [
    "NaN", "nan", "inf", "-inf", "-1", "0", "1", "2", "3", "8", "0.5", "1e-3", "1e308",
    str(10**30), str(2**63), str(2**64), str(-(2**63)), "", " ", "abc", "1.5", "0x10", "true",
    "false", "\udcff", "é", "a\nb", "a" * 5000, "é" * 2000, "x" * 300, "a/" * 3000,
    "best", "last", "train", "valid", "test", "cpu", "auto", "fp32", "bf16", "fp16", "chunked",
    "reference", "adam", "small", "char", "byte", "word", "{new}",
]  # fmt: skip
"""Values for any flag (relative paths only: written ones land in the working directory)."""

UNKNOWN = [
    ["--nosuch"], ["--nosuch", "1"], ["--nosuch=1"], ["--model.nosuch", "1"], ["--model.nosuch=1"],
    ["--model."], ["--.x"], ["--."], ["-x"], ["-"], ["--"], ["--", "--quiet"], ["stray"],
    ["--model.n_layers.x", "1"], ["--MODEL.n_layers", "1"], ["--train.steps_", "1"], ["---quiet"],
]  # fmt: skip

SPECIAL = [
    *[("--runtime.device", v) for v in ("cuda:abc", "cuda:-1", "mps", "cpu:0", "gpu", "cuda")],
    *[("--runtime.device", v) for v in ("cuda:0", "cuda:99999999999999999999", "CPU", "meta")],
    *[("--runtime.device", v) for v in ("", "cuda:", "cuda:0:1", "cpu:-1")],
    ("--runtime.precision", "fp8"), ("--runtime.precision", "float16"),
    ("--runtime.attn_impl", "x"),
    ("--split", "nosuch"), ("--select", "nosuch"), ("--level", "nosuch"),
    ("--block-size", "0"), ("--batch-size", "0"), ("--block-size", "100000"),
    ("--model.n_layers", str(10**30)), ("--model.n_layers", str(2**63)),
    ("--model.d_model", str(2**30)), ("--model.attn_span", str(10**12)),
    ("--model.n_persistent", str(10**12)), ("--model.vocab_size", str(10**15)),
    ("--model.n_heads", str(10**12)), ("--model.d_inner", str(10**12)),
    ("--model.span_ramp", str(10**12)), ("--train.batch_size", str(10**12)),
    ("--train.block_size", str(10**12)), ("--train.eval_batch_size", str(10**12)),
    ("--train.batch_split", str(10**12)), ("--train.seed", str(2**64)), ("--seed", str(2**64)),
    ("--top-k", str(10**30)), ("--seed", "-1"), ("--max-new-tokens", "-1"), ("--repeats", "0"),
    ("--model.span_init", "nan"), ("--model.dropout", "nan"), ("--optim.lr", "nan"),
    ("--optim.lr", "inf"), ("--optim.grad_clip", "nan"), ("--temperature", "nan"),
    ("--temperature", "inf"), ("--top-p", "nan"), ("--split", "1,0,0"), ("--split", "nan,0,1"),
]  # fmt: skip
"""Flags with a bad choice, a device this machine lacks, or an absurd size: clean errors all."""

KIND_OF = {
    "--checkpoint": "checkpoint",
    "--data": "data",
    "--train.data": "data",
    "--source": "source",
    "--prompt-file": "file",
    "--train-txt": "file",
    "--vocab": "file",
    "--preset": "preset",
    "--out": "out",
}
"""The pool a flag's values come from; "out" pools hold only paths a case may destroy."""

PRESETS = {
    "bad_types.toml": '[model]\nadapt_span = "false"\nn_layers = "4"\n[train]\nsteps = 1.5\n',
    "bad_bool.toml": '[model]\nadapt_span = "false"\n',
    "bad_int.toml": '[model]\nn_layers = "4"\n',
    "bad_float.toml": '[model]\nspan_init = "0.5"\n',
    "bad_steps.toml": "[train]\nsteps = 1.5\n",
    "bad_device.toml": "[runtime]\ndevice = 5\n",
    "bad_dtype.toml": '[runtime]\ndtype = ["float32"]\n',
    "bad_table.toml": "model = 3\n",
    "bad_field.toml": "[model]\nnosuch = 1\n",
    "bad_section.toml": "[nosuch]\nx = 1\n",
    "bad_extends.toml": "extends = 3\n",
    "extends_missing.toml": 'extends = "nosuch.toml"\n',
    "self.toml": 'extends = "self.toml"\n',
    "cycle_a.toml": 'extends = "cycle_b.toml"\n',
    "cycle_b.toml": 'extends = "cycle_a.toml"\n',
    "not_toml.toml": "this is [not toml\n",
    "good.toml": 'extends = "tiny"\n[model]\nd_model = 16\nn_heads = 2\nn_layers = 1\n',
}

PRESET_NAMES = ["tiny", "tiny_ff", "nosuch", "nosuch.toml", "good.toml"]
"""Presets by name (good.toml: relative to the working directory, where it is not)."""


@dataclass(frozen=True)
class Base:
    """A command line that succeeds quickly (or fails cleanly), with {placeholders} for the
    fixture's paths and {new} for a fresh directory; `kinds` are the pools of its positional
    arguments; mutations leave the `protected` flags alone (they would make a valid case slow,
    or reach the network); `weight`: how often it is drawn."""

    line: str
    kinds: tuple[str, ...] = ()
    protected: frozenset[str] = frozenset()
    weight: float = 1.0


STEPS = frozenset({"--train.steps"})
SOURCE = frozenset({"--source"})
PRINT = frozenset({"--print-config"})
TOKENS = frozenset({"--max-new-tokens"})
IMPORT = ("original", "out")
TRAIN = f"--data {{data}} --out {{new}} --train.steps 1 {TINY}"
BASES = [
    Base("prepare text --source {text} --out {new}", ("corpus",)),
    Base("prepare text --source {text} --out {new} --split 0.8,0.1,0.1 --force", ("corpus",)),
    Base("prepare tiny-shakespeare --out {new}", ("corpus",)),
    Base("prepare text --source {binary} --out {new}", ("corpus",)),
    Base("prepare text --source {empty} --out {new}", ("corpus",)),
    Base("prepare enwik8 --source {garbage} --out {new} --no-verify", ("corpus",), SOURCE),
    Base("prepare text8 --source {binary} --out {new}", ("corpus",), SOURCE),
    Base(f"train {TRAIN}", (), STEPS, 3),
    Base(f"train {TRAIN} --no-progress --optim.optimizer adam --train.seed 3", (), STEPS, 2),
    Base(f"train {TRAIN} --preset {{good.toml}} --runtime.attn_impl reference", (), STEPS, 2),
    Base(f"train {TRAIN} --model.d_inner 8 --model.n_persistent 0", (), STEPS, 2),
    *[Base(f"train {TRAIN} --preset {{{name}}}", (), STEPS, 0.2) for name in PRESETS],
    Base("train --print-config --data {data} --model.d_model 32", (), PRINT, 2),
    Base("train --print-config --preset enwik8_large", (), PRINT),
    Base("train --resume --out {spare_run} --train.steps 3", (), STEPS),
    Base("train --resume --out {notrun} --train.steps 1", (), STEPS, 0.5),
    Base("train --resume --out {out_fake_run} --train.steps 1", (), STEPS, 0.5),
    Base("train --resume --out {new} --train.steps 1", (), STEPS, 0.5),
    Base(f"train --data {{data_onechar}} --out {{new}} --train.steps 1 {TINY}", (), STEPS, 0.5),
    Base(f"train --data {{data_corrupt}} --out {{new}} --train.steps 1 {TINY}", (), STEPS, 0.5),
    Base("eval --checkpoint {run} --data {data} --split valid --batch-size 2 --block-size 8"),
    Base("eval --checkpoint {best} --select last --json --batch-size 2 --block-size 8"),
    Base("eval --checkpoint {run} --split test --runtime.attn_impl reference --block-size 4"),
    Base("eval --checkpoint {spare_run} --data {data} --split test --json --block-size 8"),
    Base("generate --checkpoint {run} --prompt ab --max-new-tokens 3 --seed 0", (), TOKENS, 2),
    Base(
        "generate --checkpoint {last} --prompt-file {prompt} --max-new-tokens 2 --no-echo "
        "--temperature 0",
        (),
        TOKENS,
        2,
    ),
    Base("generate --checkpoint {run} --top-k 2 --top-p 0.9 --max-new-tokens 2", (), TOKENS, 2),
    Base("info {best}", ("checkpoint",)),
    Base("info --json {last}", ("checkpoint",)),
    Base("info {truncated}", ("checkpoint",)),
    Base("import-original {orig_empty} {new}/x.safetensors --vocab {vocab}", IMPORT),
    Base("import-original {garbage} {new}/x.safetensors --train-txt {text}", IMPORT, weight=0.5),
    Base("import-original {orig_list} {new}/x.safetensors --vocab {vocab}", IMPORT, weight=0.5),
    Base("import-original {orig_partial} {new}/x --vocab {vocab} --level char", IMPORT),
    Base("bench layer --sizes small --impls chunked --repeats 1 --json"),
    Base("bench train-step --steps 1 --preset {good.toml} --model.attn_span 16"),
    Base("bench generate --new-tokens 1 --recompute-tokens 1 --model.attn_span 16 --json"),
]


def command_of(argv: list[str]) -> str:
    return " ".join(argv[: 2 if argv[:1] == ["bench"] else 1])


assert all(("--train.steps" in b.line) == ("--train.steps" in b.protected) for b in BASES)

# ----------------------------------------------------------------------------------------------
# Fixtures: a corpus, a trained checkpoint, degenerate files and presets


@dataclass(repr=False)
class World:
    paths: dict[str, str]
    """Placeholder -> absolute path."""
    pools: dict[str, list[str]]
    """Kind -> values for the flags and positionals of that kind."""

    def __repr__(self) -> str:
        return f"World({len(self.paths)} paths)"


def _file(path: Path, data: bytes | str) -> str:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _ok(argv: list[str]) -> None:
    outcome = run_cli(argv, timeout=300)
    assert outcome.verdict == "success", outcome.describe()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("fuzz"))


def make_world(root: Path) -> World:
    """The fixture's files under `root`, and the pools of values drawn from them."""
    rng = random.Random(SEED)
    p: dict[str, str] = {}
    p["text"] = _file(root / "corpus.txt", "".join(rng.choice(ALPHABET) for _ in range(2000)))
    p["prompt"] = _file(root / "prompt.txt", "abc")
    p["empty"] = _file(root / "empty.txt", b"")
    p["onechar"] = _file(root / "one.txt", "a")
    p["binary"] = _file(root / "random.bin", rng.randbytes(4096))
    p["latin1"] = _file(root / "latin1.txt", "déjà vu, ça va?\n".encode("latin-1") * 50)
    p["garbage"] = _file(root / "x.safetensors", rng.randbytes(2048))
    (root / "adir").mkdir()
    _file(root / "adir" / "inside.txt", "a")
    p["dir"] = str(root / "adir")
    (root / "void").mkdir()
    p["void"] = str(root / "void")
    os.mkfifo(root / "fifo")
    p["fifo"] = str(root / "fifo")
    p["missing"] = str(root / "missing" / "nothing")
    for name, text in PRESETS.items():
        p[name] = _file(root / name, text)
    p["latin1.toml"] = _file(root / "latin1.toml", "[model]\n# caf\xe9\n".encode("latin-1"))

    p["data"], p["run"] = str(root / "data"), str(root / "run")
    _ok(["prepare", "text", "--source", p["text"], "--out", p["data"], "--quiet"])
    tiny = f"--quiet --train.steps 2 {TINY}".split()
    _ok(["train", "--data", p["data"], "--out", p["run"], *tiny])
    _ok(["train", "--print-config", "--quiet"])  # warm up: no lazy import under a timeout
    p["vocab"] = f"{p['data']}/vocab.json"
    p["best"], p["last"] = f"{p['run']}/best.safetensors", f"{p['run']}/last.safetensors"
    good = Path(p["best"]).read_bytes()
    p["truncated"] = _file(root / "truncated.safetensors", good[: len(good) // 2])
    p["cut_header"] = _file(root / "cut_header.safetensors", good[:64])
    save_file({"w": torch.zeros(2)}, root / "foreign.safetensors")
    p["foreign"] = str(root / "foreign.safetensors")
    for name, obj in {
        "orig_empty": {"model": {}},
        "orig_list": [1, 2, 3],
        "orig_partial": {"model": {"module.in_emb.weight": torch.zeros(3, 4)}},
    }.items():
        p[name] = str(root / f"{name}.pt")
        torch.save(obj, p[name])

    data_pool = [p["data"]]
    for name in ("empty", "onechar", "binary", "latin1"):  # degenerate corpora, where they prepare
        out = root / f"data_{name}"
        outcome = run_cli(["prepare", "text", "--source", p[name], "--out", str(out), "--quiet"])
        p[f"data_{name}"] = str(out)
        if outcome.verdict == "success":
            data_pool.append(str(out))
    for name in ("corrupt", "novocab", "badvocab", "copy"):
        p[f"data_{name}"] = str(shutil.copytree(p["data"], root / f"data_{name}"))
    _file(root / "data_corrupt" / "train.npy", rng.randbytes(300))
    os.remove(root / "data_novocab" / "vocab.json")
    _file(root / "data_badvocab" / "vocab.json", '{"level": "char", "tokens": ["a", "a"]}')
    np.save(root / "data_copy" / "valid.npy", np.array([[1, 2], [3, 4]]))  # 2-D: refused
    p["spare_run"] = str(shutil.copytree(p["run"], root / "spare_run"))
    (root / "fake_run").mkdir()
    _file(root / "fake_run" / "last.safetensors", rng.randbytes(100))
    p["fake_run"] = str(root / "fake_run")
    (root / "notrun").mkdir()  # for `train --resume` alone
    _file(root / "notrun" / "notes.txt", "x")
    p["notrun"] = str(root / "notrun")

    out = root / "out"  # targets a case may overwrite or destroy
    (out / "junk").mkdir(parents=True)
    _file(out / "junk" / "keep.txt", "x")
    os.mkfifo(out / "fifo")
    p["out_fake_run"] = str(shutil.copytree(p["fake_run"], out / "fake_run"))
    targets = [_file(out / "file.txt", "x"), str(out / "junk"), str(out / "fifo")]
    targets += [p["out_fake_run"], str(shutil.copytree(p["run"], out / "run"))]
    targets.append(str(out / "missing" / "deep"))

    def pick(*keys: str) -> list[str]:
        return [p[k] for k in keys]

    anything = pick("empty", "binary", "latin1", "dir", "void", "fifo", "missing")
    pools = {
        "checkpoint": pick("run", "best", "last", "spare_run", "truncated", "cut_header")
        + pick("foreign", "garbage", "fake_run", "orig_empty", "data")
        + anything,
        "data": data_pool
        + pick("data_corrupt", "data_novocab", "data_badvocab", "data_copy", "run", "text")
        + ["", *anything],
        "source": pick("text", "onechar", "garbage") + anything,
        "file": pick("prompt", "text", "vocab", "garbage", "best") + anything,
        "original": pick("orig_empty", "orig_list", "orig_partial", "best", "text", "truncated")
        + anything,
        "preset": pick(*PRESETS, "latin1.toml") + PRESET_NAMES + anything,
        "out": ["{new}", "{new}/deeper", *targets],
        "corpus": ["text", "tiny-shakespeare", "nosuch", "", "TEXT"],  # no download: no enwik8
    }
    pools["path"] = sorted({v for k, vs in pools.items() if k != "out" for v in vs if "/" in v})
    return World(p, pools)


# ----------------------------------------------------------------------------------------------
# Building the cases


@dataclass
class Arg:
    """One argument of a case: a positional (flag None), a flag with a value, or without one."""

    flag: str | None
    value: str | None
    kind: str = ""
    equals: bool = False

    def tokens(self) -> list[str]:
        if self.flag is None:
            return [self.value or ""]
        if self.value is None:
            return [self.flag]
        return [f"{self.flag}={self.value}"] if self.equals else [self.flag, self.value]


@dataclass
class Case:
    words: list[str]
    args: list[Arg]
    protected: frozenset[str]
    options: dict[str, bool]
    """Every option of the command, and whether it takes a value (from the parser)."""

    def flags(self, with_value: bool = True) -> list[Arg]:
        """What a mutation may change: positionals and unprotected flags (with a value)."""
        return [
            a
            for a in self.args
            if (a.flag is None or a.flag not in self.protected)
            and (not with_value or a.value is not None)
        ]


def command_options() -> dict[tuple[str, ...], dict[str, bool]]:
    """The options of every (sub)command, from the parser: option -> takes a value."""
    table: dict[tuple[str, ...], dict[str, bool]] = {}

    def walk(parser: argparse.ArgumentParser, words: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, (*words, name))
            elif words:
                for option in action.option_strings:
                    if option not in ("-h", "--help"):
                        table.setdefault(words, {})[option] = action.nargs != 0

    walk(cli.build_parser(), ())
    return table


def draw(rng: random.Random, world: World, kind: str) -> str:
    """A value for an argument of `kind`: mostly its own pool, else any odd value or path."""
    if kind == "out":  # never a path another case relies on
        return rng.choice(world.pools["out"] if rng.random() < 0.7 else VALUES)
    r = rng.random()
    if kind and r < 0.6:
        return rng.choice(world.pools[kind])
    return rng.choice(world.pools["path"] if r > 0.75 else VALUES)


def _kind(flag: str) -> str:
    return KIND_OF.get(flag.partition("=")[0], "")


def mutate(rng: random.Random, case: Case, world: World) -> None:
    """Apply one mutation to `case` (one that applies to it)."""
    while True:
        name = rng.choices(list(MUTATIONS), weights=[w for w, _ in MUTATIONS.values()])[0]
        if MUTATIONS[name][1](rng, case, world) is not False:
            return


def _replace(rng: random.Random, case: Case, world: World) -> bool:
    args = case.flags()
    if not args:
        return False
    arg = rng.choice(args)
    arg.value = draw(rng, world, arg.kind)
    return True


def _drop_value(rng: random.Random, case: Case, world: World) -> bool:
    args = [a for a in case.flags() if a.flag is not None]
    if not args:
        return False
    rng.choice(args).value = None
    return True


def _drop(rng: random.Random, case: Case, world: World) -> bool:
    args = case.flags(with_value=False)
    if not args:
        return False
    case.args.remove(rng.choice(args))
    return True


def _repeat(rng: random.Random, case: Case, world: World) -> bool:
    args = [a for a in case.flags() if a.flag is not None]
    if not args:
        return False
    arg = rng.choice(args)
    case.args.append(Arg(arg.flag, draw(rng, world, arg.kind), arg.kind))
    return True


def _add(rng: random.Random, case: Case, world: World) -> bool:
    options = [o for o in case.options if o.replace("--no-", "--") not in case.protected]
    flag = rng.choice(options)
    value = draw(rng, world, _kind(flag)) if case.options[flag] else None
    case.args.append(Arg(flag, value, _kind(flag)))
    return True


def _unknown(rng: random.Random, case: Case, world: World) -> bool:
    case.args.extend(Arg(None, token) for token in rng.choice(UNKNOWN))
    return True


def _equals(rng: random.Random, case: Case, world: World) -> bool:
    args = [a for a in case.flags() if a.flag is not None]
    if not args:
        return False
    arg = rng.choice(args)
    arg.equals = True
    if rng.random() < 0.5:
        arg.value = draw(rng, world, arg.kind)
    return True


def _special(rng: random.Random, case: Case, world: World) -> bool:
    pairs = [(f, v) for f, v in SPECIAL if f in case.options and f not in case.protected]
    if not pairs:
        return False
    flag, value = rng.choice(pairs)
    case.args.append(Arg(flag, value))
    return True


MUTATIONS = {
    "replace a value": (4, _replace),
    "add a flag": (3, _add),
    "bad choice or absurd size": (3, _special),
    "drop a value": (1, _drop_value),
    "drop an argument": (1, _drop),
    "repeat a flag": (1, _repeat),
    "unknown flag": (1, _unknown),
    "--flag=value": (1, _equals),
}


def parse_base(base: Base, world: World, options: dict[tuple[str, ...], dict[str, bool]]) -> Case:
    def fill(token: str) -> str:
        return re.sub(r"\{([\w.]+)\}", lambda m: world.paths.get(m[1], m[0]), token)

    tokens = [fill(t) for t in shlex.split(base.line)]
    n_words = len(command_of(tokens).split())
    words, rest = tokens[:n_words], tokens[n_words:]
    args, kinds = [], iter(base.kinds)
    i = 0
    while i < len(rest):
        if not rest[i].startswith("--"):
            args.append(Arg(None, rest[i], next(kinds, "")))
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            args.append(Arg(rest[i], rest[i + 1], _kind(rest[i])))
            i += 1
        else:
            args.append(Arg(rest[i], None))
        i += 1
    return Case(words, args, base.protected, options[tuple(words)])


def build_cases(world: World, n: int, seed: int) -> list[list[str]]:
    """`n` command lines: every base as it is, then bases with one or two mutations."""
    rng = random.Random(seed)
    options = command_options()
    weights = [base.weight for base in BASES]
    cases = []
    for i in range(n):
        base = BASES[i] if i < len(BASES) else rng.choices(BASES, weights)[0]
        case = parse_base(base, world, options)
        if i >= len(BASES):
            for _ in range(1 if rng.random() < 0.6 else 2):
                mutate(rng, case, world)
        if rng.random() < 0.5:
            case.args.append(Arg("--quiet", None))
        argv = case.words + [t for a in case.args for t in a.tokens()]
        cases.append([t.replace("{new}", f"fresh/{i}") for t in argv])
    return cases


# ----------------------------------------------------------------------------------------------
# Running a case


class _Timeout(BaseException):
    """Raised by SIGALRM in a case past its time; a BaseException, so no `except` takes it.
    Its argument names where the case was stuck."""


class _Alarm:
    """The SIGALRM handler of one case: past the timeout it looks at the stack five times,
    0.1 s apart, then raises _Timeout naming the deepest package frame all looks share (the
    loop the case is stuck in, rather than wherever the first signal happened to land)."""

    def __init__(self) -> None:
        self.stacks: list[list[str]] = []

    def __call__(self, signum: int, frame: Any) -> None:
        stack = []
        while frame is not None:
            code = frame.f_code
            if "/allattn/" in code.co_filename:
                stack.append(f"{Path(code.co_filename).name} {code.co_qualname}")
            frame = frame.f_back
        self.stacks.append(stack[::-1])
        if len(self.stacks) < 5:
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            return
        levels = zip(*self.stacks, strict=False)  # outermost first
        shared = [lv[0] for lv in itertools.takewhile(lambda lv: len(set(lv)) == 1, levels)]
        raise _Timeout(shared[-1] if shared else "outside allattn")


def _proc_status_kb(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)


def _innermost(error: BaseException) -> str:
    """Where `error` was stuck or raised: the innermost frame of the package, file:line name."""
    if isinstance(error, _Timeout):
        return str(error)
    where, tb = "outside allattn", error.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if "/allattn/" in code.co_filename:
            where = f"{Path(code.co_filename).name}:{tb.tb_lineno} {code.co_qualname}"
        tb = tb.tb_next
    return where


def _show(argv: list[str]) -> str:
    """A command line to print: fixture paths as $F/..., the tiny sizes as $TINY, long values
    shortened, odd characters escaped."""

    def one(token: str) -> str:
        token = re.sub(r"(^|=)/\S*/fuzz\d*/", r"\1$F/", token)
        if len(token) > 60:
            token = f"{token[:12]}...({len(token)} chars)"
        return shlex.quote(token.encode("utf-8", "backslashreplace").decode())

    return "allattn " + " ".join(map(one, argv)).replace(TINY, "$TINY")


ERROR_LINE = re.compile(r"allattn(?: [\w-]+)*: error: \S")


@dataclass
class Outcome:
    argv: list[str]
    status: Any = None
    stdout: str = ""
    stderr: str = ""
    raised: str = ""
    """The type of the exception that escaped main, if one did ("_Timeout": the case hung)."""
    message: str = ""
    where: str = ""
    seconds: float = 0.0
    grew_mb: float = 0.0
    """Peak resident memory above the resident memory before the case."""

    @property
    def verdict(self) -> str:
        """success, clean error, or a failure: traceback, hang, bad status, bad message."""
        if self.raised == "_Timeout":
            return "hang"
        if self.raised:
            return "traceback"
        if type(self.status) is not int or self.status not in (0, 2):
            return "bad status"
        if self.status == 0:
            return "success"
        lines = self.stderr.splitlines()
        errors = [i for i, line in enumerate(lines) if "error:" in line]
        if errors == [len(lines) - 1] and ERROR_LINE.match(lines[-1]):
            return "clean error"
        return "bad message"

    @property
    def signature(self) -> str:
        """What tells one failure from another: the command and where or how it failed."""
        command = command_of(self.argv)
        verdict = self.verdict
        if verdict == "traceback":
            return f"{command}: {self.raised} at {self.where}"
        if verdict == "hang":
            return f"{command}: hang at {self.where}"
        if verdict == "bad status":
            return f"{command}: status {self.status!r}"
        last = self.stderr.strip().splitlines()[-1:] or [""]
        return f"{command}: bad message {last[0][:40]!r}"

    def describe(self) -> str:
        text = f"{_show(self.argv)} -> {self.verdict}"
        if self.verdict == "traceback":
            text += f": {self.raised}: {self.message} (at {self.where})"
        elif self.verdict == "hang":
            text += f" (past {TIMEOUT_S:.0f} s, at {self.where})"
        elif self.verdict != "success":
            tail = self.stderr.strip().splitlines()[-3:]
            text += f", status {self.status!r}, stderr ends {tail!r}"
        return text


def run_cli(argv: list[str], timeout: float = TIMEOUT_S) -> Outcome:
    """`main(argv)` with stdout and stderr captured, stopped after `timeout` seconds."""
    outcome = Outcome(list(argv))
    out, err = io.StringIO(), io.StringIO()
    before_kb = _proc_status_kb("VmRSS")
    _reset_peak_rss()
    previous = signal.signal(signal.SIGALRM, _Alarm())
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                outcome.status = main(list(argv))
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except KeyboardInterrupt:  # main turns its own into status 130: this one stops the test
        raise
    except BaseException as error:  # what escapes main breaks the contract, whatever it is
        lines = str(error).strip().splitlines()  # not the exception: its frames hold memory
        outcome.raised, outcome.message = type(error).__name__, lines[0][:200] if lines else ""
        outcome.where = _innermost(error)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    outcome.seconds = time.perf_counter() - start
    outcome.stdout, outcome.stderr = out.getvalue(), err.getvalue()
    outcome.grew_mb = max(0, _proc_status_kb("VmHWM") - before_kb) / 1024
    return outcome


@contextlib.contextmanager
def address_space_cap(headroom: int = ADDRESS_HEADROOM):
    """Allocations past `headroom` more bytes of address space fail (instead of the machine
    running out of memory and the test process being killed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _proc_status_kb("VmSize") * 1024 + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _fake_child(args: list[Any], allocator: bool) -> dict[str, Any]:
    """Stands in for a benchmark's child process: builds the run's model as the child would
    (under the address-space cap), raises as `bench._child` does when the child fails, and
    returns made-up numbers."""
    if args[0] != "_layer_case":
        try:
            AllAttentionLM(RunConfig.from_dict(args[1]).model)
        except Exception as error:
            raise RuntimeError(f"benchmark case {args[0]} failed: {error}") from None
    numbers = ("seconds", "peak_mb", "flops", "tokens", "tokens_per_s", "ms_per_step")
    numbers += ("peak_rss_mb", "parameters", "recompute_tokens_per_s", "speedup", "first_step_s")
    return {key: 1.0 for key in numbers} | {"window": 1, "context": 1}


FAILURES = ("traceback", "hang", "bad status", "bad message")


def summarize(outcomes: list[Outcome], seconds: float) -> tuple[int, str]:
    """The number of failures, and a report: the counts, then one line per distinct failure
    (most frequent first, with one example), then the heavy cases."""
    counts = Counter(o.verdict for o in outcomes)
    groups: dict[str, list[Outcome]] = {}
    for o in outcomes:
        if o.verdict in FAILURES:
            groups.setdefault(o.signature, []).append(o)
    failed = sum(counts[v] for v in FAILURES)
    lines = [
        f"{failed:,} of {len(outcomes):,} cases failed ({counts['traceback']} tracebacks, "
        f"{counts['hang']} hangs, {counts['bad message']} bad messages, {counts['bad status']} "
        f"bad statuses); {counts['success']:,} succeeded, {counts['clean error']:,} clean "
        f"errors; {seconds:.0f} s. {len(groups)} distinct failures:"
    ]
    ordered = sorted(groups.values(), key=len, reverse=True)
    lines += [f"  [{len(group)}x] {group[0].describe()}" for group in ordered[:LISTED]]
    if len(ordered) > LISTED:
        lines.append(f"  ... and {len(ordered) - LISTED} more distinct failures")
    heavy = [o for o in outcomes if o.grew_mb > HEAVY_MB]
    lines += [f"  heavy (+{o.grew_mb:,.0f} MB): {_show(o.argv)}" for o in heavy[:10]]
    return failed, "\n".join(lines)


def fuzz(name: str, world: World, tmp_path: Path, monkeypatch, n: int, seed: int) -> None:
    monkeypatch.chdir(tmp_path)  # default outputs (runs/..., data/...) land here
    monkeypatch.setattr(logging.getLogger("allattn"), "propagate", False)  # not into pytest's log
    monkeypatch.setattr(bench, "_child", _fake_child)
    monkeypatch.setattr(bench, "matmul_peak", lambda *args, **kwargs: 1000.0)
    cases = build_cases(world, n, seed)
    start = time.perf_counter()
    outcomes = []
    with address_space_cap():
        for argv in cases:
            outcomes.append(run_cli(argv))
            shutil.rmtree(tmp_path / "fresh", ignore_errors=True)
    failed, report = summarize(outcomes, time.perf_counter() - start)
    RESULTS[name] = {
        "counts": Counter(o.verdict for o in outcomes),
        "seconds": time.perf_counter() - start,
        "heavy": [o.argv for o in outcomes if o.grew_mb > HEAVY_MB],
        "outcomes": outcomes,
    }
    print(report.splitlines()[0])
    assert not failed, report


# ----------------------------------------------------------------------------------------------
# The tests


def _loop(argv):
    while True:
        pass


def _print_and_return(stderr: str, status: Any):
    def fake_main(argv):
        print(stderr, end="", file=sys.stderr)
        return status

    return fake_main


def _raise(error: BaseException):
    def fake_main(argv):
        raise error

    return fake_main


@pytest.mark.parametrize(
    ("fake_main", "verdict"),
    [
        (_print_and_return("", 0), "success"),
        (_print_and_return("allattn: error: no\n", 2), "clean error"),
        (_print_and_return("a log line\nallattn train: error: no\n", 2), "clean error"),
        (_print_and_return("allattn: error: no\nmore\n", 2), "bad message"),
        (_print_and_return("allattn: error: no\nallattn: error: no\n", 2), "bad message"),
        (_print_and_return("error: no\n", 2), "bad message"),
        (_print_and_return("", 2), "bad message"),
        (_print_and_return("", 1), "bad status"),
        (_print_and_return("", None), "bad status"),
        (_print_and_return("", True), "bad status"),
        (_raise(ValueError("x")), "traceback"),
        (_raise(SystemExit(0)), "traceback"),
        (_loop, "hang"),
        (lambda argv: time.sleep(60), "hang"),
    ],
)
def test_the_runner_judges_and_recovers(fake_main, verdict, monkeypatch):
    """The runner's verdicts, and nothing of a case (alarm, handler, streams) outlives it."""
    monkeypatch.setattr(sys.modules[__name__], "main", fake_main)
    handler, stdout, stderr = signal.getsignal(signal.SIGALRM), sys.stdout, sys.stderr
    outcome = run_cli(["info", "x"], timeout=0.3)
    assert outcome.verdict == verdict, outcome.describe()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) is handler
    assert (sys.stdout, sys.stderr) == (stdout, stderr)


def test_cases_are_deterministic(world):
    assert build_cases(world, 200, SEED) == build_cases(world, 200, SEED)
    assert build_cases(world, 200, SEED) != build_cases(world, 200, SLOW_SEED)


def test_fuzz_command_line(world, tmp_path, monkeypatch):
    fuzz("default", world, tmp_path, monkeypatch, CASES, SEED)


@pytest.mark.slow
def test_fuzz_command_line_long(world, tmp_path, monkeypatch):
    fuzz("slow", world, tmp_path, monkeypatch, SLOW_CASES, SLOW_SEED)
