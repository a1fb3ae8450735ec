"""Export of the incremental decoding step (`torch.export`, or ONNX) for serving without allattn.

The exported program is one step of `AllAttentionLM.forward_kv` as a pure function of
fixed-shape tensors (`DecodeStep`), for B streams (`batch_size`) and M tokens per step
(`tokens_per_step`), both fixed at export:

    inputs   tokens            (B, M) int64    the next M token ids of every stream
             past_keys_l       (B, H', C_l, D) for each layer l = 0 .. n_layers - 1, in the
             past_values_l     (B, H', C_l, D) order tokens, past_keys_0, past_values_0, ...
    outputs  logprobs          (B, M, V)       log-probabilities of the token after each input
             present_keys_l    (B, H', C_l, D) the last C_l rows of past_keys_l followed by the
             present_values_l  (B, H', C_l, D) M new rows: the next step's past

C_l is layer l's cache size (`AllAttentionLayer.cache_size()`: S, or its learned span + 64 with
adapt_cache), H' the heads that read the context (n_heads, or half of them with head_split),
D = d_model / n_heads. The rows are positions, oldest first. The query at block position i
attends to the L_l positions before it, not to itself: the last L_l - i cache rows and the
block's first i tokens (L_l <= C_l is the layer's context length, S minus what its spans trim).
Caches and log-probabilities have the weights' dtype (float32, or float64). The caches of a
stream with nothing before it are zeros (`zero_caches`, what `init_kv_cache` starts from).
Computed: what `forward_kv` computes from key/value caches with the same rows, with the dense
`reference` attention kernel (tested against it to 1e-12 in float64, over more steps than the
caches hold).

Driving it: pass each step's present caches as the next step's past. A prompt goes in M tokens
at a time (so a program with M = 1 takes any prompt); then each drawn token is the next input.
`decode` runs a (B, T) block, T a multiple of M, as T / M steps:

    import torch
    from allattn import export
    program, meta = export.load("model.pt2")  # written by `export.export` or `allattn export`
    step = program.module()
    logprobs, caches = export.decode(step, torch.tensor([meta.vocab.encode("ROMEO:")]),
                                     export.zero_caches(meta))
    for _ in range(100):
        token = logprobs[:, -1].argmax(-1, keepdim=True)  # (B, 1): greedy; M = 1
        logprobs, caches = export.decode(step, token, caches)

The `.pt2` file is `torch.export.save`'s, with the extra file `allattn.json` (`ExportMetadata`:
the model config, the vocabulary, B, M, the dtype, the input and output names, the cache shapes,
the allattn version). The `.onnx` file holds the same graph with the same input and output names
(`torch.onnx.export(..., dynamo=True)`, needs onnx and onnxscript; run it with onnxruntime) and
the same JSON in the model's `metadata_props["allattn"]`.

Every model kind exports, word-level models with adaptive input and softmax included (their
input embedding is computed by `AdaptiveIO.embed_every_cluster`, which has no data-dependent
shapes). What cannot be exported is refused in one line before tracing: a model in training
mode, and to ONNX, weights of 2 GiB or more (a single-file ONNX model's limit).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from . import __version__, atomic, checkpoint
from .checkpoint import verify_setting
from .config import CheckpointChoice, ConfigError, ModelConfig, Settings, setting
from .data import Vocabulary
from .model import AllAttentionLayer, AllAttentionLM

log = logging.getLogger(__name__)

ExportFormat = Literal["pt2", "onnx"]
SUFFIXES: dict[str, ExportFormat] = {".pt2": "pt2", ".onnx": "onnx"}
FORMAT = "allattn-export"
VERSION = 1
METADATA_FILE = "allattn.json"
"""The `.pt2` extra file that holds the metadata."""
ONNX_KEY = "allattn"
"""The ONNX model's `metadata_props` key that holds the metadata."""
ONNX_LIMIT = 2**31
"""Bytes a single-file ONNX model can hold (protobuf's limit)."""


class ExportError(ValueError):
    """A model or an output that cannot be exported, or an export file that cannot be read."""


@dataclass(frozen=True, kw_only=True)
class ExportOptions(Settings):
    """`allattn export CHECKPOINT OUT`: the decoding step of a checkpoint's model as a file."""

    checkpoint: str = setting(
        dataclasses.MISSING, "checkpoint file or run directory", positional=True
    )
    out: str = setting(
        dataclasses.MISSING, "the file to write: .pt2 (torch.export) or .onnx", positional=True
    )
    format: ExportFormat | None = setting(
        None, "pt2 or onnx; must agree with OUT's suffix (default: from the suffix)"
    )
    batch_size: int = setting(1, "streams B every step of the program decodes")
    tokens_per_step: int = setting(1, "tokens M of every stream per step (1: token by token)")
    select: CheckpointChoice = setting(
        "best", "which checkpoint of a run directory: best (by the validation estimate) or last"
    )
    verify: bool = verify_setting()
    force: bool = setting(False, "replace OUT if it exists")

    def validate(self) -> None:
        self._require_ints(1, "batch_size", "tokens_per_step")
        try:
            output_format(self.out, self.format)
        except ExportError as error:
            raise ConfigError(str(error)) from None


def output_format(out: str | Path, format: str | None = None) -> ExportFormat:
    """The format of an output path: its suffix's (.pt2 or .onnx), which `format` must match."""
    suffix = Path(out).suffix.lower()
    if suffix not in SUFFIXES:
        raise ExportError(f"{out}: the output must end in .pt2 (torch.export) or .onnx")
    if format is not None and SUFFIXES[suffix] != format:
        raise ExportError(f"--format {format} writes a .{format} file, not {out}")
    return SUFFIXES[suffix]


class DecodeStep(nn.Module):
    """One decoding step of `model` (in eval mode) as a function of fixed-shape caches:
    `forward(tokens, *caches) -> (logprobs, *caches)` (the module's doc gives the shapes).

    The spans are read once, here: their context lengths and cache sizes are the graph's
    shapes (the weights do not change after export)."""

    def __init__(self, model: AllAttentionLM) -> None:
        super().__init__()
        if model.training:
            raise ExportError("the decoding step is for inference: call model.eval() first")
        self.model = model
        self.context_lengths = model.context_lengths()
        self.cache_sizes = model.cache_sizes()
        self.train(False)

    def _layers(self) -> list[AllAttentionLayer]:
        return self.model._layers()

    def cache_shapes(self, batch_size: int) -> list[tuple[int, int, int, int]]:
        """(B, H', C_l, D) of each layer's key cache (its value cache has the same)."""
        config = self.model.config
        return [(batch_size, config.context_heads, c, config.head_dim) for c in self.cache_sizes]

    def init(self, batch_size: int) -> list[Tensor]:
        """Zero caches, keys then values of each layer, like the weights: `init_kv_cache`'s."""
        like = self.model.pos_emb
        return [like.new_zeros(shape) for shape in self.cache_shapes(batch_size) for _ in range(2)]

    def forward(self, tokens: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        """tokens (B, M); caches: past keys and values of each layer, (B, H', C_l, D) each ->
        log-probabilities (B, M, V) and the present keys and values, shaped as the past."""
        if len(caches) != 2 * len(self.cache_sizes):
            raise ValueError(f"{len(caches)} caches for {len(self.cache_sizes)} layers")
        adaptive = self.model.adaptive
        # Adaptive input picks each cluster's rows by value, which does not trace: the same
        # embeddings with fixed shapes.
        h = adaptive.embed_every_cluster(tokens) if adaptive else self.model._embed(tokens)
        present: list[Tensor] = []
        for i, layer in enumerate(self._layers()):
            h, keys, values = self._layer(layer, h, caches[2 * i], caches[2 * i + 1], i)
            present += [keys, values]
        return self.model._logprobs(h), *present

    def _layer(
        self, layer: AllAttentionLayer, h: Tensor, keys: Tensor, values: Tensor, i: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`layer.forward_kv` with the cache as tensors: new h and the present keys, values."""
        attn, n_context, n_new = layer.attn, self.context_lengths[i], h.size(1)
        new_keys, new_values = attn.block_kv(h)  # (B, H', M, D)
        keys = torch.cat([keys, new_keys], dim=2)  # (B, H', C+M, D)
        values = torch.cat([values, new_values], dim=2)  # (B, H', C+M, D)
        seen = n_context + n_new  # the L context rows and the block: C >= L
        out = attn._attend(
            h,
            keys[:, :, -seen:],  # (B, H', L+M, D)
            values[:, :, -seen:],
            self.model.pos_emb[:n_context],  # (L, D)
            "reference",  # dense: the chunked kernel's loop and autograd.Function do not trace
            attn.fixed(n_context),
        )
        return layer._sublayers(h, out), keys[:, :, n_new:], values[:, :, n_new:]


def input_names(n_layers: int) -> list[str]:
    """The program's inputs in order: tokens, then each layer's past keys and values."""
    return ["tokens", *_cache_names("past", n_layers)]


def output_names(n_layers: int) -> list[str]:
    """The program's outputs in order: logprobs, then each layer's present keys and values."""
    return ["logprobs", *_cache_names("present", n_layers)]


def _cache_names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("keys", "values")]


@dataclass(frozen=True, kw_only=True)
class ExportMetadata:
    """What a server needs besides the program to drive it (stored with it as JSON)."""

    config: ModelConfig
    vocab: Vocabulary | None
    batch_size: int
    tokens_per_step: int
    dtype: str
    """Of the caches and log-probabilities: float32 or float64."""
    cache_shapes: tuple[tuple[int, int, int, int], ...]
    """(B, H', C_l, D) of each layer's key cache and value cache."""
    context_lengths: tuple[int, ...]
    """L_l: the cache rows each layer's queries attend to (the last ones)."""
    allattn_version: str = __version__

    @property
    def input_names(self) -> list[str]:
        return input_names(self.config.n_layers)

    @property
    def output_names(self) -> list[str]:
        return output_names(self.config.n_layers)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "allattn_version": self.allattn_version,
                "config": self.config.to_dict(),
                "vocab": self.vocab.to_dict() if self.vocab is not None else None,
                "batch_size": self.batch_size,
                "tokens_per_step": self.tokens_per_step,
                "dtype": self.dtype,
                "inputs": self.input_names,
                "outputs": self.output_names,
                "cache_shapes": [list(shape) for shape in self.cache_shapes],
                "context_lengths": list(self.context_lengths),
            },
            ensure_ascii=False,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> ExportMetadata:
        """The metadata of an export (`ExportError` if it is not an allattn export's)."""
        try:
            values = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise ExportError(f"bad export metadata ({type(error).__name__})") from None
        if not isinstance(values, dict) or values.get("format") != FORMAT:
            raise ExportError("not an allattn export")
        if values.get("version") != VERSION:
            raise ExportError(
                f"export format version {values.get('version')}, this allattn reads {VERSION}"
            )
        try:
            vocab = values["vocab"]
            return cls(
                config=ModelConfig.from_dict(values["config"]),
                vocab=Vocabulary.from_dict(vocab) if vocab is not None else None,
                batch_size=values["batch_size"],
                tokens_per_step=values["tokens_per_step"],
                dtype=values["dtype"],
                cache_shapes=tuple(tuple(shape) for shape in values["cache_shapes"]),
                context_lengths=tuple(values["context_lengths"]),
                allattn_version=values["allattn_version"],
            )
        except KeyError as error:
            raise ExportError(f"bad export metadata (no {error})") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ExportError(f"bad export metadata ({error})") from None


def metadata(
    step: DecodeStep, batch_size: int, tokens_per_step: int, vocab: Vocabulary | None = None
) -> ExportMetadata:
    """The metadata of `step` exported for `batch_size` streams and `tokens_per_step`."""
    return ExportMetadata(
        config=step.model.config,
        vocab=vocab,
        batch_size=batch_size,
        tokens_per_step=tokens_per_step,
        dtype=str(step.model.pos_emb.dtype).removeprefix("torch."),
        cache_shapes=tuple(step.cache_shapes(batch_size)),
        context_lengths=tuple(step.context_lengths),
    )


def _example(step: DecodeStep, batch_size: int, tokens_per_step: int) -> tuple[Tensor, ...]:
    if batch_size < 1 or tokens_per_step < 1:
        raise ExportError(
            f"batch_size ({batch_size}) and tokens_per_step ({tokens_per_step}) must be positive"
        )
    device = step.model.pos_emb.device
    tokens = torch.zeros(batch_size, tokens_per_step, dtype=torch.long, device=device)
    return tokens, *step.init(batch_size)


def export_program(
    model: AllAttentionLM, *, batch_size: int = 1, tokens_per_step: int = 1
) -> torch.export.ExportedProgram:
    """The decoding step of `model` (eval mode) for `batch_size` streams and `tokens_per_step`,
    traced by `torch.export` (on the model's device, in its dtype)."""
    return _trace(DecodeStep(model), batch_size, tokens_per_step)


def _trace(step: DecodeStep, batch_size: int, tokens_per_step: int) -> torch.export.ExportedProgram:
    example = _example(step, batch_size, tokens_per_step)
    with torch.no_grad():
        return torch.export.export(step, example, strict=False)


def export(
    model: AllAttentionLM,
    out: str | Path,
    *,
    vocab: Vocabulary | None = None,
    batch_size: int = 1,
    tokens_per_step: int = 1,
    format: ExportFormat | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the decoding step of `model` (eval mode) and its metadata to `out` (.pt2, or .onnx),
    atomically; an existing `out` only with `overwrite`."""
    out = Path(out)
    chosen = output_format(out, format)
    if out.is_dir():
        raise ExportError(f"{out} is a directory")
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; pass --force to replace it")
    step = DecodeStep(model)
    meta = metadata(step, batch_size, tokens_per_step, vocab)
    if chosen == "onnx":
        atomic.write_bytes(out, _onnx(step, meta))
        return out
    program = _trace(step, batch_size, tokens_per_step)
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA_FILE: meta.to_json()})
    atomic.write_bytes(out, buffer.getvalue())
    return out


def _onnx(step: DecodeStep, meta: ExportMetadata) -> bytes:
    """The ONNX model of `step` with `meta` in its metadata_props, serialised."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError(
            "--format onnx needs the onnx and onnxscript packages: pip install 'allattn[export]'"
        ) from None
    weights = sum(p.numel() * p.element_size() for p in step.parameters())
    if weights >= ONNX_LIMIT:
        raise ExportError(
            f"the model's weights ({weights / 2**30:.1f} GiB) exceed the 2 GiB of a single-file "
            "ONNX model; export .pt2 instead"
        )
    example = _example(step, meta.batch_size, meta.tokens_per_step)
    with _quiet(), torch.no_grad():
        program = torch.onnx.export(
            step,
            example,
            dynamo=True,
            # onnxscript's optimiser folds `x + 1e-8` to `x` (it takes constants within 1e-8 of
            # zero for zero), dropping the renormalisation's epsilon, which matters where the
            # span mask leaves a head little mass: log-probabilities 1.7 apart on the demo model.
            optimize=False,
            input_names=meta.input_names,
            output_names=meta.output_names,
            verbose=False,
        )
    assert program is not None
    program.model.metadata_props[ONNX_KEY] = meta.to_json()
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the ONNX exporter's warnings about packages and APIs that do not concern us
    (torchvision's operators, deprecations inside torch) and its optimiser's progress log."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class Loaded(NamedTuple):
    """What `load` returns."""

    program: torch.export.ExportedProgram
    metadata: ExportMetadata


def load(path: str | Path) -> Loaded:
    """A `.pt2` decoding step written by `export`, and its metadata. (A `.onnx` one is for
    onnxruntime; its metadata: `ExportMetadata.from_json(model.metadata_props["allattn"])`.)"""
    path = Path(path)
    if output_format(path) != "pt2":
        raise ExportError(f"{path}: load reads .pt2 files; run an .onnx file with onnxruntime")
    if not path.is_file():
        raise ExportError(f"{path} does not exist (or is not a regular file)")
    extra = {METADATA_FILE: ""}
    try:
        program = torch.export.load(path, extra_files=extra)
    except Exception as error:  # torch raises what its reader meets: zip, JSON, pickle errors
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ExportError(f"{path}: not a torch.export program ({reason})") from None
    if not extra[METADATA_FILE]:
        raise ExportError(f"{path}: not an allattn export (no {METADATA_FILE})")
    try:
        meta = ExportMetadata.from_json(extra[METADATA_FILE])
    except ExportError as error:
        raise ExportError(f"{path}: {error}") from None
    return Loaded(program, meta)


def zero_caches(meta: ExportMetadata, device: str | torch.device = "cpu") -> list[Tensor]:
    """The caches of streams with nothing before them: zeros, keys then values of each layer."""
    dtype = getattr(torch, meta.dtype)
    return [
        torch.zeros(shape, dtype=dtype, device=device)
        for shape in meta.cache_shapes
        for _ in range(2)
    ]


class Decoded(NamedTuple):
    """What `decode` returns."""

    logprobs: Tensor
    """(B, T, V): after each input token."""
    caches: list[Tensor]
    """The caches after the last step, for the next call."""


def decode(
    step: Callable[..., Sequence[Tensor]],
    tokens: Tensor,
    caches: Sequence[Tensor],
    tokens_per_step: int = 1,
) -> Decoded:
    """Run tokens (B, T), T a multiple of `tokens_per_step` (M), through T / M calls of the
    decoding step `step(tokens, *caches) -> (logprobs, *caches)`: `program.module()` of a
    loaded program, or a `DecodeStep`."""
    if tokens.dim() != 2 or tokens.size(1) % tokens_per_step:
        raise ValueError(
            f"tokens of shape {tuple(tokens.shape)}: (B, T) with T a multiple of "
            f"tokens_per_step ({tokens_per_step}) expected"
        )
    pieces = []
    state = list(caches)
    for start in range(0, tokens.size(1), tokens_per_step):
        logprobs, *state = step(tokens[:, start : start + tokens_per_step], *state)
        pieces.append(logprobs)
    return Decoded(torch.cat(pieces, dim=1), state)


def run(options: ExportOptions) -> Path:
    """`allattn export`: the decoding step of a checkpoint's model (on the CPU, in its dtype)
    written to `options.out`."""
    out = Path(options.out)
    if out.exists() and not options.force:  # before the checkpoint is read
        raise ExportError(f"{out} exists; pass --force to replace it")
    model, ckpt = checkpoint.load_model(
        options.checkpoint, select=options.select, verify=options.verify
    )
    path = export(
        model,
        out,
        vocab=ckpt.vocab,
        batch_size=options.batch_size,
        tokens_per_step=options.tokens_per_step,
        format=options.format,
        overwrite=options.force,
    )
    log.info("%s: exported to %s", checkpoint.describe(ckpt), path)
    return path
