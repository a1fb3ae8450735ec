"""Typed, validated configuration; one set of names for code, CLI, presets and checkpoints."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the flag."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


ATTN_IMPLS = ("auto", "chunked", "reference")


class _Section:
    """Shared behaviour of the config sections: dict round trip and replacement."""

    section = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        _require(not unknown, f"unknown {cls.section} config field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def _require_ints(self, minimum: int, *names: str) -> None:
        """Each named field is an int >= minimum (1: positive, 0: non-negative)."""
        kind = "positive" if minimum == 1 else "non-negative"
        for name in names:
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= minimum,
                f"--{self.section}.{name} ({value}) must be a {kind} integer",
            )


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Section):
    """The architecture (DESIGN §2). Defaults are the paper's per-layer settings at a small size."""

    section = "model"

    vocab_size: int = _field(256, "number of tokens in the vocabulary (V)")
    d_model: int = _field(256, "model width (d)")
    n_heads: int = _field(4, "attention heads per layer (H); must divide d_model")
    n_layers: int = _field(4, "number of layers")
    n_persistent: int = _field(
        256, "persistent key/value vectors per head (N); 0 = no persistent memory"
    )
    d_inner: int = _field(
        0, "feed-forward inner size; 0 = no FF sublayer (the all-attention layer)"
    )
    attn_span: int = _field(512, "maximum attention span S (previous tokens a query can see)")
    adapt_span: bool = _field(True, "learn a soft span per head (adaptive attention span)")
    span_ramp: int = _field(32, "length R of the soft span mask's linear ramp")
    span_init: float = _field(0.0, "initial span parameter z in [0, 1] (span = z * attn_span)")
    span_loss_coef: float = _field(0.0, "coefficient of the span regulariser in the training loss")
    adapt_cache: bool = _field(
        True, "shrink each layer's cache to its learned span + 64 (only with adapt_span)"
    )
    dropout: float = _field(0.0, "dropout on attention weights (and the FF hidden layer)")
    emb_dropout: float = _field(0.0, "dropout on the token embeddings and the final hidden state")
    renorm_eps: float = _field(
        1e-8,
        "epsilon of the span renormalisation a/(sum(a)+eps); 1e-8 is the original's, "
        "0 makes trimming exact",
    )
    attn_impl: str = _field(
        "auto",
        "attention kernel: chunked (fast, exact), reference (dense, one score matrix per "
        "block), or auto (chunked); all compute the same function",
    )

    def __post_init__(self) -> None:
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
            self.attn_impl in ATTN_IMPLS,
            f"--model.attn_impl ({self.attn_impl}) must be one of {', '.join(ATTN_IMPLS)}",
        )

    @property
    def head_dim(self) -> int:
        """D = d_model / n_heads."""
        return self.d_model // self.n_heads

    @property
    def kind(self) -> str:
        """'all-attention', 'transformer' (FF baseline), 'hybrid' or 'attention-only' (ablation)."""
        if self.n_persistent and not self.d_inner:
            return "all-attention"
        if self.d_inner and not self.n_persistent:
            return "transformer"
        if self.d_inner and self.n_persistent:
            return "hybrid"
        return "attention-only"


OPTIMIZERS = ("adagrad", "adam")


@dataclass(frozen=True, kw_only=True)
class OptimConfig(_Section):
    """The optimiser and its schedule (DESIGN §3). Defaults: the character-level recipe."""

    section = "optim"

    optimizer: str = _field(
        "adagrad",
        "adagrad (per-parameter step clipping, the character-level recipe) or adam (global "
        "gradient-norm clipping, the word-level recipe)",
    )
    lr: float = _field(0.07, "learning rate after warm-up")
    warmup_steps: int = _field(0, "linear warm-up: update t uses lr * min(1, t / warmup_steps)")
    grad_clip: float = _field(
        0.03,
        "adagrad: shrink a parameter's step when its gradient norm exceeds this; "
        "adam: clip the global gradient norm to this; 0 = no clipping",
    )

    def __post_init__(self) -> None:
        _require(
            self.optimizer in OPTIMIZERS,
            f"--optim.optimizer ({self.optimizer}) must be one of {', '.join(OPTIMIZERS)}",
        )
        _require(self.lr > 0, f"--optim.lr ({self.lr}) must be > 0")
        self._require_ints(0, "warmup_steps")
        _require(self.grad_clip >= 0, f"--optim.grad_clip ({self.grad_clip}) must be >= 0")


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Section):
    """The training run (DESIGN §3). Defaults: the paper's character-level scripts."""

    section = "train"

    data: str = _field(
        "", "prepared data directory (`allattn prepare`); empty = the bundled tiny-shakespeare"
    )
    batch_size: int = _field(64, "parallel streams B (the global batch)")
    block_size: int = _field(512, "tokens per stream per step M")
    batch_split: int = _field(1, "run the batch in this many slices (memory only; divides B)")
    steps: int = _field(1000, "optimiser updates in total (a resumed run continues to this)")
    eval_interval: int = _field(
        1000, "validate, log and checkpoint every this many steps (the original's nbatches)"
    )
    eval_batch_size: int = _field(8, "streams for full evaluation (`allattn eval`)")
    seed: int = _field(0, "seed of initialisation, dropout and wrap-around offsets")
    device: str = _field("auto", "auto (CUDA if available), cpu, cuda, cuda:N")
    dtype: str = _field("float32", "float32, or bfloat16 autocast (softmax statistics in float32)")
    exact_resume: bool = _field(
        True,
        "resume with the saved stream positions, caches and RNG states; false = the original "
        "(restart the data at position 0 with zero caches)",
    )

    def __post_init__(self) -> None:
        self._require_ints(1, "batch_size", "block_size", "batch_split", "steps", "eval_interval")
        _require(
            self.batch_size % self.batch_split == 0,
            f"--train.batch_split ({self.batch_split}) must divide --train.batch_size "
            f"({self.batch_size})",
        )
        self._require_ints(1, "eval_batch_size")
        _require(self.dtype in DTYPES, f"--train.dtype ({self.dtype}) must be one of {DTYPES}")
        _require(
            self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
            f"--train.device ({self.device}) must be auto, cpu, cuda or cuda:N",
        )


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig}


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a training run needs: model, optimiser, training loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

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
        return cls(**{name: SECTIONS[name].from_dict(values.get(name, {})) for name in SECTIONS})

    def override(self, assignments: dict[str, str]) -> RunConfig:
        """Apply `{"model.n_layers": "4", ...}` (strings, as given on the command line)."""
        values = self.to_dict()
        for key, text in assignments.items():
            section, _, name = key.partition(".")
            cls = SECTIONS.get(section)
            fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            _require(name in fields, f"unknown flag --{key}")
            values[section][name] = _parse(key, text, fields[name].type)
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


def parse_overrides(argv: list[str]) -> dict[str, str]:
    """`--section.field VALUE` / `--section.field=VALUE` pairs -> {"section.field": "VALUE"}."""
    assignments, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        _require(arg.startswith("--") and "." in arg, f"unrecognized argument {arg}")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            _require(i + 1 < len(argv), f"--{key} needs a value")
            value = argv[i + 1]
            i += 1
        assignments[key] = value
        i += 1
    return assignments


def _parse(key: str, text: str, kind: Any) -> Any:
    kind = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key} expects {kind}, got {text!r}") from None
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def preset_names() -> list[str]:
    """The presets shipped with the package (TOML files in allattn/configs)."""
    folder = resources.files("allattn") / "configs"
    return sorted(
        p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml")
    )


def load_preset(name: str) -> RunConfig:
    """A shipped preset by name, or any TOML file with [model], [optim], [train] tables."""
    if name.endswith(".toml"):
        path = Path(name)
        _require(path.is_file(), f"preset file {path} does not exist")
        text = path.read_text(encoding="utf-8")
    else:
        resource = resources.files("allattn") / "configs" / f"{name}.toml"
        _require(
            resource.is_file(),
            f"unknown preset {name!r}; choose from {', '.join(preset_names())} or a .toml file",
        )
        text = resource.read_text(encoding="utf-8")
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"preset {name}: {error}") from None
    return RunConfig.from_dict(values)
