"""Typed, validated configuration; one set of names for code, CLI, presets and checkpoints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _field(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration value is impossible; the message names the flag."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


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

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "attn_span", "span_ramp"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 1,
                f"--model.{name} ({value}) must be a positive integer",
            )
        for name in ("n_persistent", "d_inner"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and value >= 0,
                f"--model.{name} ({value}) must be a non-negative integer",
            )
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
        _require(
            isinstance(self.warmup_steps, int) and self.warmup_steps >= 0,
            f"--optim.warmup_steps ({self.warmup_steps}) must be a non-negative integer",
        )
        _require(self.grad_clip >= 0, f"--optim.grad_clip ({self.grad_clip}) must be >= 0")
