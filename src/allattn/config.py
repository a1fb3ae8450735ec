"""Typed, validated configuration; one set of names for code, CLI, presets and checkpoints.

Every setting is a field of a frozen, keyword-only dataclass derived from `Settings`, declared
with `setting(default, help)`: that one declaration gives the Python name, the type, the
default, the help text, the choices (a `Literal` type) and the command-line flag. A section of a
run (`ModelConfig` is `[model]`) has dotted flags, `--model.n_heads`; a command's own settings
(`Settings.section == ""`) have plain ones, `--batch-size`. Validation errors name the flag.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

AttnImpl = Literal["auto", "chunked", "reference", "flex"]
Optimizer = Literal["adagrad", "adam"]
Precision = Literal["fp32", "bf16", "fp16", "fp64"]
CheckpointChoice = Literal["best", "last"]
MemoryMode = Literal["joint", "attn_split", "head_split", "single_head"]
FFActivation = Literal["relu", "softmax"]

DEFAULT_PRESET = "tiny"


def setting(default: Any, help: str, *, resumable: bool = False, **metadata: Any) -> Any:
    """A settings field. `resumable`: a model field that acts in training only, so a resumed
    run may change it. Other metadata: `positional` (a positional argument on the command
    line; with `nargs="+"` one or more, a tuple), `parse` (turns the command-line text into the
    value), `metavar`."""
    if default is dataclasses.MISSING:
        return field(metadata={"help": help, "resumable": resumable, **metadata})
    return field(default=default, metadata={"help": help, "resumable": resumable, **metadata})


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the flag."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def choices(hint: Any) -> tuple[Any, ...] | None:
    """The values of a `Literal` type (also inside `X | None`), else None."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        for arg in typing.get_args(hint):
            found = choices(arg)
            if found is not None:
                return found
    return None


def base_type(hint: Any) -> Any:
    """int for `int | None`, str for a `Literal` of strings, tuple for `tuple[int, ...]`, else
    the hint itself."""
    if typing.get_origin(hint) is tuple:
        return tuple
    options = choices(hint)
    if options is not None:
        return type(options[0])
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return base_type(inner[0])
    return hint


def _optional(hint: Any) -> bool:
    """Whether `hint` admits None (`X | None`)."""
    return (isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union) and type(
        None
    ) in typing.get_args(hint)


INT_MIN, INT_MAX = -(2**63), 2**63 - 1
"""Integer settings fit in 64 bits (what torch takes)."""
_HINTS: dict[type, dict[str, Any]] = {}


class Settings:
    """Shared behaviour of settings dataclasses: flag names, the choice rule, dict round trip."""

    section: ClassVar[str] = ""
    """The TOML table and flag prefix (`model` -> `--model.n_heads`); "" for a command's own
    settings (`--batch-size`)."""

    @classmethod
    def flag(cls, name: str) -> str:
        if cls.section:
            return f"--{cls.section}.{name}"
        return "--" + name.replace("_", "-")

    @classmethod
    def hints(cls) -> dict[str, Any]:
        """The resolved type of every field."""
        if cls not in _HINTS:
            hints = typing.get_type_hints(cls)
            _HINTS[cls] = {f.name: hints[f.name] for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return _HINTS[cls]

    def __post_init__(self) -> None:
        for name, hint in self.hints().items():
            self._check_type(name, hint)
            options = choices(hint)
            value = getattr(self, name)
            if options is not None and value is not None:
                _require(
                    value in options,
                    f"{self.flag(name)} ({value}) must be one of {', '.join(map(str, options))}",
                )
        self.validate()

    def _check_type(self, name: str, hint: Any) -> None:
        """The value has the field's type (as a preset or checkpoint might not): bools are
        bools, ints 64-bit ints, floats finite numbers (ints become floats), strings strings."""
        value = getattr(self, name)
        if value is None and _optional(hint):
            return
        kind = base_type(hint)
        flag = self.flag(name)
        if kind is bool:
            _require(isinstance(value, bool), f"{flag} must be true or false, not {value!r}")
        elif kind is int:
            _require(
                isinstance(value, int) and not isinstance(value, bool),
                f"{flag} must be an integer, not {value!r}",
            )
            _require(INT_MIN <= value <= INT_MAX, f"{flag} ({value}) is out of range")
        elif kind is float:
            _require(
                isinstance(value, int | float) and not isinstance(value, bool),
                f"{flag} must be a number, not {value!r}",
            )
            _require(math.isfinite(value), f"{flag} ({value}) must be a finite number")
            object.__setattr__(self, name, float(value))
        elif kind is str:
            _require(isinstance(value, str), f"{flag} must be a string, not {value!r}")
        elif kind is tuple and typing.get_args(hint) == (int, Ellipsis):
            _require(
                isinstance(value, list | tuple)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
                f"{flag} must be a list of integers, not {value!r}",
            )
            _require(
                all(INT_MIN <= v <= INT_MAX for v in value), f"{flag} ({value}) is out of range"
            )
            object.__setattr__(self, name, tuple(value))  # TOML and JSON give lists
        elif kind is tuple and typing.get_args(hint) == (str, Ellipsis):
            _require(
                isinstance(value, list | tuple) and all(isinstance(v, str) for v in value),
                f"{flag} must be a list of strings, not {value!r}",
            )
            object.__setattr__(self, name, tuple(value))  # the command line gives a list

    def validate(self) -> None:
        """Checks beyond the types and the choices of `Literal` fields (overridden by the
        sections)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - known)
        _require(not unknown, f"unknown {cls.section} config field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def _require_ints(self, minimum: int, *names: str) -> None:
        """Each named field is an int >= minimum (1: positive, 0: non-negative)."""
        kind = "positive" if minimum == 1 else "non-negative"
        for name in names:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= minimum,
                f"{self.flag(name)} ({value}) must be a {kind} integer",
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Settings):
    """The architecture (DESIGN §2). Defaults are the paper's per-layer settings at a small size."""

    section: ClassVar[str] = "model"

    vocab_size: int = setting(256, "number of tokens in the vocabulary (V)")
    d_model: int = setting(256, "model width (d)")
    n_heads: int = setting(4, "attention heads per layer (H); must divide d_model")
    n_layers: int = setting(4, "number of layers")
    n_persistent: int = setting(
        256, "persistent key/value vectors per head (N); 0 = no persistent memory"
    )
    d_inner: int = setting(
        0, "feed-forward inner size; 0 = no FF sublayer (the all-attention layer)"
    )
    memory_mode: MemoryMode = setting(
        "joint",
        "how the persistent vectors meet the context (DESIGN §2.9, the paper's Fig. 2): joint "
        "(one softmax, the all-attention layer), attn_split (two softmaxes per head, outputs "
        "added), head_split (half the heads read only the context, half only their persistent "
        "vectors), single_head (one full-width persistent memory per layer, its own softmax)",
    )
    ff_activation: FFActivation = setting(
        "relu",
        "the FF sublayer's activation: relu (the transformer), or softmax over the d_inner "
        "units with no bias inside it (FF-attn, DESIGN §2.9)",
    )
    attn_span: int = setting(512, "maximum attention span S (previous tokens a query can see)")
    adapt_span: bool = setting(True, "learn a soft span per head (adaptive attention span)")
    span_ramp: int = setting(32, "length R of the soft span mask's linear ramp")
    span_init: float = setting(0.0, "initial span parameter z in [0, 1] (span = z * attn_span)")
    span_loss_coef: float = setting(
        0.0, "coefficient of the span regulariser in the training loss", resumable=True
    )
    adapt_cache: bool = setting(
        True, "shrink each layer's cache to its learned span + 64 (only with adapt_span)"
    )
    dropout: float = setting(
        0.0, "dropout on attention weights (and the FF hidden layer)", resumable=True
    )
    emb_dropout: float = setting(
        0.0, "dropout on the token embeddings and the final hidden state", resumable=True
    )
    renorm_eps: float = setting(
        1e-8,
        "epsilon of the span renormalisation a/(sum(a)+eps); 1e-8 is the original's, "
        "0 makes trimming exact",
    )
    adaptive_io: bool = setting(
        False,
        "adaptive input and adaptive softmax over clusters of ids (word level, DESIGN §2.8) "
        "instead of a full embedding and softmax",
    )
    adaptive_cutoffs: tuple[int, ...] = setting(
        (20000, 40000, 200000),
        "with adaptive_io: where the id clusters end (increasing, below vocab_size); the "
        "first cluster is the head's shortlist",
    )
    adaptive_div: int = setting(
        4, "with adaptive_io: cluster i has embedding width d_model / adaptive_div**i"
    )
    adaptive_tied: bool = setting(
        True,
        "with adaptive_io: the output clusters share the input's embedding tables and "
        "projections (the original's setting)",
    )

    def validate(self) -> None:
        self._require_ints(
            1, "vocab_size", "d_model", "n_heads", "n_layers", "attn_span", "span_ramp"
        )
        self._require_ints(0, "n_persistent", "d_inner")
        _require(
            self.d_model % self.n_heads == 0,
            f"--model.n_heads ({self.n_heads}) must divide --model.d_model ({self.d_model})",
        )
        _require(
            0.0 <= self.span_init <= 1.0, f"--model.span_init ({self.span_init}) must be in [0, 1]"
        )
        for name in ("dropout", "emb_dropout"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"--model.{name} ({value}) must be in [0, 1)")
        _require(
            self.span_loss_coef >= 0.0,
            f"--model.span_loss_coef ({self.span_loss_coef}) must be >= 0",
        )
        _require(self.renorm_eps >= 0.0, f"--model.renorm_eps ({self.renorm_eps}) must be >= 0")
        _require(
            self.memory_mode == "joint" or self.n_persistent > 0,
            f"--model.memory_mode {self.memory_mode} needs persistent vectors "
            "(--model.n_persistent > 0)",
        )
        _require(
            self.memory_mode != "head_split" or self.n_heads % 2 == 0,
            f"--model.memory_mode head_split needs an even --model.n_heads ({self.n_heads})",
        )
        _require(
            self.ff_activation == "relu" or self.d_inner > 0,
            f"--model.ff_activation {self.ff_activation} needs an FF sublayer "
            "(--model.d_inner > 0)",
        )
        self._require_ints(1, "adaptive_div")
        if self.adaptive_io:
            self._validate_adaptive()

    def _validate_adaptive(self) -> None:
        cutoffs = self.adaptive_cutoffs
        bounds = (0, *cutoffs, self.vocab_size)
        _require(
            len(cutoffs) >= 1 and all(a < b for a, b in itertools.pairwise(bounds)),
            f"--model.adaptive_cutoffs ({','.join(map(str, cutoffs))}) must be at least one "
            f"increasing positive id below --model.vocab_size ({self.vocab_size})",
        )
        narrowest = self.d_model // self.adaptive_div ** len(cutoffs)
        _require(
            narrowest >= 1,
            f"--model.adaptive_div ({self.adaptive_div}) leaves the last of "
            f"{len(cutoffs) + 1} clusters no width (d_model {self.d_model})",
        )

    def adaptive_sizes(self) -> tuple[int, ...]:
        """Ids in each adaptive cluster: [0, c_1), [c_1, c_2), ..., [c_k, vocab_size)."""
        bounds = (0, *self.adaptive_cutoffs, self.vocab_size)
        return tuple(hi - lo for lo, hi in itertools.pairwise(bounds))

    def adaptive_widths(self) -> tuple[int, ...]:
        """Embedding width of each adaptive cluster: d_model // adaptive_div**i."""
        return tuple(
            self.d_model // self.adaptive_div**i for i in range(len(self.adaptive_cutoffs) + 1)
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        # Checkpoints before 0.2 stored the kernel as architecture; it is a run-time choice now.
        return super().from_dict({k: v for k, v in values.items() if k != "attn_impl"})

    @property
    def head_dim(self) -> int:
        """D = d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def context_heads(self) -> int:
        """Heads that attend to the context: all of them, or the first half with head_split."""
        return self.n_heads // 2 if self.memory_mode == "head_split" else self.n_heads

    @property
    def kind(self) -> str:
        """'all-attention', 'transformer' (FF baseline), 'hybrid' or 'attention-only' (ablation),
        with the Fig. 2 variant in brackets when there is one: 'all-attention (attn_split)',
        'transformer (FF-attn)'."""
        if self.n_persistent and not self.d_inner:
            kind = "all-attention"
        elif self.d_inner and not self.n_persistent:
            kind = "transformer"
        elif self.d_inner and self.n_persistent:
            kind = "hybrid"
        else:
            kind = "attention-only"
        variants: list[str] = [self.memory_mode] if self.memory_mode != "joint" else []
        variants += ["FF-attn"] if self.ff_activation == "softmax" else []
        return f"{kind} ({', '.join(variants)})" if variants else kind


@dataclass(frozen=True, kw_only=True)
class OptimConfig(Settings):
    """The optimiser and its schedule (DESIGN §3). Defaults: the character-level recipe."""

    section: ClassVar[str] = "optim"

    optimizer: Optimizer = setting(
        "adagrad",
        "adagrad (per-parameter step clipping, the character-level recipe) or adam (global "
        "gradient-norm clipping, the word-level recipe)",
    )
    lr: float = setting(0.07, "learning rate after warm-up")
    warmup_steps: int = setting(0, "linear warm-up: update t uses lr * min(1, t / warmup_steps)")
    grad_clip: float = setting(
        0.03,
        "adagrad: shrink a parameter's step when its gradient norm exceeds this; "
        "adam: clip the global gradient norm to this; 0 = no clipping",
    )

    def validate(self) -> None:
        _require(self.lr > 0, f"--optim.lr ({self.lr}) must be > 0")
        self._require_ints(0, "warmup_steps")
        _require(self.grad_clip >= 0, f"--optim.grad_clip ({self.grad_clip}) must be >= 0")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Settings):
    """The training run (DESIGN §3). Defaults: the paper's character-level scripts."""

    section: ClassVar[str] = "train"

    data: str = setting(
        "", "prepared data directory (`allattn prepare`); empty = the bundled tiny-shakespeare"
    )
    batch_size: int = setting(64, "parallel streams B (the global batch)")
    block_size: int = setting(512, "tokens per stream per step M")
    batch_split: int = setting(1, "run the batch in this many slices (memory only; divides B)")
    steps: int = setting(1000, "optimiser updates in total (a resumed run continues to this)")
    eval_interval: int = setting(
        1000, "validate, log and checkpoint every this many steps (the original's nbatches)"
    )
    eval_batch_size: int = setting(
        8, "streams of the full evaluation (`allattn eval` of this run; 8 as the original)"
    )
    seed: int = setting(0, "seed of initialisation, dropout and wrap-around offsets")
    tensorboard: bool = setting(
        False,
        "also write metrics.jsonl's scalars as TensorBoard events to RUN_DIR/tensorboard "
        "(needs the tensorboard extra: pip install 'allattn[tensorboard]')",
    )
    init_from: str = setting(
        "",
        "start from the weights of this checkpoint (file or run directory's best: allattn's "
        "own, or one converted by `allattn import-original`) with a new optimiser, at step 0; "
        "the model section is the checkpoint's (only its training-only fields may change)",
    )
    exact_resume: bool = setting(
        True,
        "resume with the saved stream positions, caches and RNG states; false = the original "
        "(restart the data at position 0 with zero caches)",
    )

    def validate(self) -> None:
        self._require_ints(1, "batch_size", "block_size", "batch_split", "steps", "eval_interval")
        _require(
            self.batch_size % self.batch_split == 0,
            f"--train.batch_split ({self.batch_split}) must divide --train.batch_size "
            f"({self.batch_size})",
        )
        self._require_ints(1, "eval_batch_size")
        self._require_ints(0, "seed")


@dataclass(frozen=True, kw_only=True)
class RuntimeConfig(Settings):
    """Where and how the computation runs; changes no result beyond rounding, so training,
    resuming, evaluation and generation may each choose (`allattn.runtime` applies it)."""

    section: ClassVar[str] = "runtime"

    device: str = setting("auto", "auto (CUDA if available), cpu, cuda, cuda:N")
    precision: Precision = setting(
        "fp32",
        "fp32; bf16 (bfloat16 autocast); fp16 (float16 autocast with loss scaling, CUDA only); "
        "or fp64 (float64 weights and arithmetic, for checks against the reference, slow). "
        "Weights and optimiser state stay float32 under bf16 and fp16; softmax statistics, "
        "the span mask's sums and the losses run in float32",
    )
    compile: bool = setting(
        False,
        "torch.compile the model (inductor: a C++ compiler on the CPU, triton on CUDA); the "
        "attention kernel runs eagerly between compiled regions; the first steps include the "
        "compilation, whose time is logged",
    )
    attn_impl: AttnImpl = setting(
        "auto",
        "attention kernel: chunked (fast, exact), reference (dense, one score matrix per "
        "block), auto (chunked), or flex (one FlexAttention call, opt-in: its renormalisation "
        "has no + renorm_eps, keys at span mask 0 give the span no gradient, no attention "
        "dropout, trains on CUDA only)",
    )

    flush_denormal: bool = setting(
        True,
        "on the CPU, treat subnormal floats (below 1.2e-38 in float32) as zero: the softmax "
        "of a peaked distribution (an adaptive softmax early in training) otherwise makes "
        "matrix products 10x slower; process-wide (torch.set_flush_denormal)",
    )

    dist_timeout_s: float = setting(
        600.0,
        "data-parallel runs: how long the rendezvous or any collective waits for the other "
        "processes before the job stops with an error (seconds)",
    )

    def validate(self) -> None:
        _require(
            math.isfinite(self.dist_timeout_s) and self.dist_timeout_s > 0,
            f"--runtime.dist_timeout_s ({self.dist_timeout_s}) must be a positive number",
        )
        _require(
            re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,4})?", self.device) is not None,
            f"--runtime.device ({self.device}) must be auto, cpu, cuda or cuda:N",
        )


SECTIONS: dict[str, type[Settings]] = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "runtime": RuntimeConfig,
}
# Fields that moved sections (checkpoints and presets written before 0.2): old -> new.
_MOVED = {
    ("train", "device"): "runtime",
    ("train", "dtype"): "runtime",
    ("model", "attn_impl"): "runtime",
}
_OLD_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float64": "fp64"}
"""`runtime.dtype` (older runs) -> the `runtime.precision` it meant."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run needs: model, optimiser, training loop, runtime."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with whole sections replaced, e.g. `config.replace(model=new_model_config)`."""
        return dataclasses.replace(self, **sections)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        unknown = sorted(set(values) - set(SECTIONS))
        _require(not unknown, f"unknown config section(s): {', '.join(unknown)}")
        for name, section in values.items():
            _require(isinstance(section, dict), f"config section [{name}] must be a table")
        values = {name: dict(values.get(name, {})) for name in SECTIONS}
        for (old, name), new in _MOVED.items():
            if name in values[old]:
                values[new].setdefault(name, values[old].pop(name))
        if "dtype" in values["runtime"]:  # older runs: runtime.dtype float32, bfloat16, float64
            dtype = values["runtime"].pop("dtype")
            old_name = _OLD_DTYPES.get(dtype) if isinstance(dtype, str) else None
            values["runtime"].setdefault("precision", old_name or dtype)
        sections = {name: SECTIONS[name].from_dict(values[name]) for name in SECTIONS}
        return cls(**sections)  # type: ignore[arg-type]

    def override(self, assignments: dict[str, str]) -> RunConfig:
        """Apply `{"model.n_layers": "4", ...}` (strings, as given on the command line)."""
        values = self.to_dict()
        for key, text in assignments.items():
            section, _, name = key.partition(".")
            cls = SECTIONS.get(section)
            hints = cls.hints() if cls else {}
            _require(name in hints, f"unknown flag --{key}")
            values[section][name] = parse_value(f"--{key}", text, hints[name])
        return RunConfig.from_dict(values)

    def to_toml(self) -> str:
        """The config as TOML (what `--print-config` shows and the run directory keeps)."""
        lines = []
        for name in SECTIONS:
            lines.append(f"[{name}]")
            for key, value in getattr(self, name).to_dict().items():
                lines.append(f"{key} = {_toml_value(value)}")
            lines.append("")
        return "\n".join(lines)


def parse_value(flag: str, text: str, hint: Any) -> Any:
    """The value of `text` given on the command line for a field of type `hint`."""
    kind = base_type(hint)
    try:
        if kind is tuple:  # "20000,40000,200000" (or as a TOML list, "[20000, 40000]")
            items = text.strip().removeprefix("[").removesuffix("]").split(",")
            return tuple(int(item) for item in items if item.strip())
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind in (int, float):
            return kind(text)
    except ValueError:
        expected = "comma-separated integers" if kind is tuple else kind.__name__
        raise ConfigError(f"{flag} expects {expected}, got {text!r}") from None
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def preset_names() -> list[str]:
    """The presets shipped with the package (TOML files in allattn/configs)."""
    folder = resources.files("allattn") / "configs"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_preset(name: str) -> RunConfig:
    """A shipped preset by name, or any TOML file with [model], [optim], [train], [runtime]
    tables. `extends = "BASE"` (a preset name or a .toml path, relative to the file) takes
    BASE's tables and overrides the fields given."""
    return RunConfig.from_dict(_preset_values(name, ()))


def _preset_values(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
    if name.endswith(".toml"):
        path = Path(name)
        key = str(path.resolve())
        _require(path.is_file(), f"preset file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("allattn") / "configs" / f"{name}.toml"
        key = name
        _require(
            resource.is_file(),
            f"unknown preset {name!r}; choose from {', '.join(preset_names())} or a .toml file",
        )
        text = resource.read_text(encoding="utf-8")
    _require(
        key not in chain,
        f"preset {name} extends itself: {' -> '.join((*chain, key))}",
    )
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"preset {name}: {error}") from None
    base = values.pop("extends", None)
    if base is None:
        return values
    _require(isinstance(base, str), f"preset {name}: extends must be a preset name or file")
    if base.endswith(".toml") and name.endswith(".toml"):
        base = str(Path(name).parent / base)
    merged = _preset_values(base, (*chain, key))
    for section, table in values.items():
        _require(isinstance(table, dict), f"config section [{section}] must be a table")
        merged[section] = {**merged.get(section, {}), **table}
    return merged
