"""Import checkpoints written by the authors' original adaptive-span / all-attention code.

The original saves `torch.save({'model': state_dict, 'optimizer': ..., 'logger': ..., 'iter_no':
..., 'scheduler_iter': ...})` with the model wrapped (keys start with `module.`). Its token ids
follow its prepared `train.txt` (whitespace-separated tokens, `<eos>` after every line).

Character level (enwik8, text8): `in_emb.weight`, `out_emb.{weight, bias}`; ids in order of first
appearance (enwik8 bytes written as decimal numbers, text8 characters with space written as `_`).
A `--vocab` in another order permutes the embedding and output rows.

Word level (WikiText-103, `--adapt-io`): adaptive input and adaptive softmax, stored as
`in_emb.emb_layers.i.weight` (size_i, d_i), `in_emb.emb_projs.i` (d, d_i),
`out_emb.out_layers.i.{weight, bias}`, `out_emb.out_projs.i` and `out_emb.cluster_proj`. The
cutoffs are the tables' cumulative sizes, the width divisor follows from d_i = d // div**i
(checked for every cluster), and the output is tied (`--adapt-io-tied`) when every output table
and projection equals the input's. The original numbers the words by count when adaptive I/O is
on: descending count, ties in reverse order of first appearance, `<eos>` an ordinary token
(DESIGN §2.8), the order `allattn prepare wikitext-103` gives; the vocabulary is built by the
same code (`data.word_vocabulary`), so an imported model and a corpus prepared from the same
files agree on every id. The clusters are id ranges, so these ids are never permuted: a
`--vocab` in another order is refused. Without adaptive I/O the original numbers any
`train.txt`, words too, by first appearance (the order is switched by that flag, not the level).

Options the file cannot tell (dropout, span ramp, span loss, adaptive cache) come from
`ImportOptions`, whose defaults are the original's command-line defaults (its WikiText-103 script
also sets `--emb-dropout 0.1`; dropout does not change evaluation).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from . import checkpoint
from .config import ConfigError, ModelConfig, Settings, setting
from .data import EOS, CorpusError, Level, Vocabulary, VocabularyError, word_vocabulary

WRAPPER_PREFIX = "module."
SPAN = "attn.attn.adaptive_span._mask"
MEMORY = "attn.attn.persistent_memory"
MEMORY_SPAN = "attn.attn.persistent_memory.adaptive_span._mask"


class OriginalFormatError(ValueError):
    """The file is not a checkpoint of the original code, or does not match the vocabulary."""


@dataclass(frozen=True, kw_only=True)
class ImportFiles(Settings):
    """What `allattn import-original` reads and writes."""

    original: str = setting(dataclasses.MISSING, "the original checkpoint (.pt)", positional=True)
    out: str = setting(dataclasses.MISSING, "the allattn checkpoint to write", positional=True)
    train_txt: str | None = setting(None, "the original's prepared train.txt (gives its token ids)")
    vocab: str | None = setting(None, "an allattn vocabulary JSON: the id order wanted")
    level: Literal["auto", Level] = setting(
        "auto", "tokens of train.txt: byte (enwik8), char (text8), word; auto guesses"
    )
    force: bool = setting(False, "replace OUT if it exists")


@dataclass(frozen=True, kw_only=True)
class ImportOptions(Settings):
    """Settings a checkpoint of the original code does not record (the original's defaults)."""

    dropout: float = setting(0.2, "attention dropout")
    emb_dropout: float = setting(
        0.0, "embedding dropout (the original's word-level WikiText-103 script uses 0.1)"
    )
    span_ramp: int = setting(32, "span ramp R")
    span_loss_coef: float = setting(0.0, "span loss coefficient")
    adapt_cache: bool = setting(
        False, "adaptive cache size (the paper's scripts use it; the original's default is off)"
    )


def read_original_vocabulary(train_txt: str | Path) -> list[str]:
    """Token strings in the original's id order: first appearance, `<eos>` after every line."""
    order: dict[str, None] = {}
    with open(train_txt, encoding="utf-8") as f:  # universal newlines, as the original
        for line in f:
            order.update(dict.fromkeys(line.split()))
            order[EOS] = None
    return list(order)


def infer_level(tokens: list[str]) -> str:
    """'byte' for decimal byte values (enwik8), 'char' for single characters (text8), or 'word'."""
    plain = [t for t in tokens if t != EOS]
    if plain and all(t.isdecimal() and int(t) <= 255 for t in plain):
        return "byte"
    if all(len(t) == 1 for t in plain):
        return "char"
    return "word"


def to_allattn_token(token: str, level: str) -> str:
    """The original's token string as allattn writes it (see `allattn.data`)."""
    if token == EOS or level == "word":
        return token
    if level == "byte":
        if not (token.isdecimal() and int(token) <= 255):
            raise OriginalFormatError(f"byte-level token {token!r} is not a byte value 0..255")
        return chr(int(token))
    if len(token) != 1:
        raise OriginalFormatError(f"character-level token {token!r} is not one character")
    return " " if token == "_" else token


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OriginalFormatError(f"original checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, zip and torch errors alike
        text = str(error)
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            raise OriginalFormatError(
                f"{path}: cannot be read as an original checkpoint: it pickles "
                f"{found.group(1)}, not only tensors and plain containers (refused: allattn "
                "never runs code from a checkpoint)"
            ) from None
        if "Weights only load failed" in text:  # torch's advice; the cause is further down
            cause = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            reason = cause.group(1).strip() if cause else "not a torch checkpoint"
        else:
            reason = text.strip().splitlines()[0] if text.strip() else type(error).__name__
        raise OriginalFormatError(
            f"{path}: cannot be read as an original checkpoint ({reason})"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise OriginalFormatError(f"{path}: no 'model' state dict (not an original checkpoint)")
    return state


def convert_state_dict(
    state: dict[str, Tensor], options: ImportOptions = ImportOptions()
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The original's model state dict -> (ModelConfig, allattn weights), ids unchanged."""
    state = {k.removeprefix(WRAPPER_PREFIX): v for k, v in state.items()}

    def take(name: str) -> Tensor:
        try:
            return state.pop(name)
        except KeyError:
            raise OriginalFormatError(f"original state dict has no '{name}'") from None

    weights: dict[str, Tensor] = {}
    adaptive: dict[str, Any] = {}
    if "in_emb.emb_layers.0.weight" in state:
        adaptive = _adaptive_io(take, state, weights)
        vocab_size, d_model = adaptive.pop("vocab_size"), adaptive.pop("d_model")
    else:
        weights["tok_emb.weight"] = take("in_emb.weight")
        vocab_size, d_model = weights["tok_emb.weight"].shape
        weights["out.weight"] = take("out_emb.weight")
        weights["out.bias"] = take("out_emb.bias")
    key_pe = take("key_pe")  # (1, D, S): column S - delta is the vector for distance delta
    if key_pe.dim() != 3 or key_pe.size(0) != 1:
        raise OriginalFormatError(f"key_pe has shape {tuple(key_pe.shape)}, expected (1, D, S)")
    head_dim, attn_span = key_pe.shape[1:]
    if d_model % head_dim:
        raise OriginalFormatError(f"key_pe width {head_dim} does not divide d_model {d_model}")
    n_heads = d_model // head_dim
    weights["pos_emb"] = key_pe[0].t().flip(0).contiguous()  # (S, D): row delta - 1

    layer_ids = sorted({int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k))})
    if layer_ids != list(range(len(layer_ids))) or not layer_ids:
        raise OriginalFormatError(f"original state dict has layers {layer_ids}")
    spans, memories, inners = set(), set(), set()
    for i in layer_ids:
        src, dst = f"layers.{i}.", f"layers.{i}."
        for original, ours in (("query", "q"), ("key", "k"), ("val", "v"), ("out", "out")):
            weights[f"{dst}attn.{ours}_proj.weight"] = take(f"{src}attn.proj_{original}.weight")
        has_span = f"{src}{SPAN}.current_val" in state
        spans.add(has_span)
        if has_span:
            z = take(f"{src}{SPAN}.current_val")
            weights[f"{dst}attn.span.z"] = z.reshape(-1).clone()
            state.pop(f"{src}{SPAN}.mask_template", None)  # a constant, rebuilt from S
            if f"{src}{MEMORY_SPAN}.current_val" in state:  # the same parameter, listed twice
                if not torch.equal(take(f"{src}{MEMORY_SPAN}.current_val"), z):
                    raise OriginalFormatError(f"layer {i}: the two copies of the span differ")
                state.pop(f"{src}{MEMORY_SPAN}.mask_template", None)
        n_persistent = 0
        if f"{src}{MEMORY}.key" in state:
            weights[f"{dst}attn.memory.key"] = take(f"{src}{MEMORY}.key")
            weights[f"{dst}attn.memory.val"] = take(f"{src}{MEMORY}.val")
            n_persistent = weights[f"{dst}attn.memory.key"].size(2)
        memories.add(n_persistent)
        for name in ("weight", "bias"):
            weights[f"{dst}norm1.{name}"] = take(f"{src}norm1.{name}")
        d_inner = 0
        if f"{src}ff.fc1.weight" in state:
            d_inner = state[f"{src}ff.fc1.weight"].size(0)
            if d_inner == 0:
                raise OriginalFormatError(
                    "the original's d_inner = 0 layer computes LN(LN(h + Attn) + b2), which "
                    "allattn does not model (its attention-only ablation has no second norm)"
                )
            for part in ("ff.fc1", "ff.fc2", "norm2"):
                for name in ("weight", "bias"):
                    weights[f"{dst}{part}.{name}"] = take(f"{src}{part}.{name}")
        inners.add(d_inner)
    if len(spans) > 1 or len(memories) > 1 or len(inners) > 1:
        raise OriginalFormatError("layers differ in adaptive span, persistent memory or FF size")
    if state:
        raise OriginalFormatError(
            f"unexpected entries in the original state dict: {sorted(state)[:5]}"
        )
    dtypes = {t.dtype for t in weights.values()}
    if len(dtypes) > 1 or not dtypes <= set(checkpoint.WEIGHT_DTYPES):
        names = sorted(str(t).removeprefix("torch.") for t in dtypes)
        raise OriginalFormatError(
            f"the original's weights are {', '.join(names)}; allattn imports weights that are "
            "all float32 (or all float64)"
        )

    try:
        config = ModelConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            n_heads=n_heads,
            n_layers=len(layer_ids),
            n_persistent=memories.pop(),
            d_inner=inners.pop(),
            attn_span=attn_span,
            adapt_span=spans.pop(),
            span_ramp=options.span_ramp,
            span_init=0.0,
            span_loss_coef=options.span_loss_coef,
            adapt_cache=options.adapt_cache,
            dropout=options.dropout,
            emb_dropout=options.emb_dropout,
            **adaptive,
        )
    except ConfigError as error:
        raise OriginalFormatError(f"cannot build a model for this checkpoint: {error}") from None
    return config, weights


def _adaptive_io(take: Any, state: dict[str, Tensor], weights: dict[str, Tensor]) -> dict[str, Any]:
    """Move the original's adaptive input/softmax into `weights`; its config fields (with
    vocab_size and d_model) from the tensors' shapes and equalities."""
    tables: list[Tensor] = []
    projections: list[Tensor] = []
    while f"in_emb.emb_layers.{len(tables)}.weight" in state:
        i = len(tables)
        tables.append(take(f"in_emb.emb_layers.{i}.weight"))
        projections.append(take(f"in_emb.emb_projs.{i}"))
    d_model = projections[0].size(0) if projections[0].dim() == 2 else -1
    for i, (table, projection) in enumerate(zip(tables, projections, strict=True)):
        if (
            table.dim() != 2
            or projection.dim() != 2
            or projection.shape != (d_model, table.size(1))
        ):
            raise OriginalFormatError(
                f"adaptive cluster {i}: table {tuple(table.shape)} and projection "
                f"{tuple(projection.shape)} do not fit (expected (n, d_i) and (d, d_i))"
            )
    widths = [t.size(1) for t in tables]
    div = widths[0] // widths[1] if len(widths) > 1 and widths[1] else 4
    if widths[0] != d_model or widths != [d_model // div**i for i in range(len(widths))]:
        raise OriginalFormatError(
            f"adaptive embedding widths {widths} are not d_model {d_model} divided by a power "
            "of one divisor"
        )
    tied = []
    for i, (table, projection) in enumerate(zip(tables, projections, strict=True)):
        weights[f"adaptive.tables.{i}.weight"] = table
        weights[f"adaptive.projections.{i}"] = projection
        out_table = take(f"out_emb.out_layers.{i}.weight")
        out_projection = take(f"out_emb.out_projs.{i}")
        bias = take(f"out_emb.out_layers.{i}.bias")
        if out_table.shape != table.shape or out_projection.shape != projection.shape:
            raise OriginalFormatError(
                f"adaptive output cluster {i}: table {tuple(out_table.shape)} and projection "
                f"{tuple(out_projection.shape)}, the input's {tuple(table.shape)} and "
                f"{tuple(projection.shape)}"
            )
        if bias.shape != (table.size(0),):
            raise OriginalFormatError(
                f"adaptive output cluster {i}: bias {tuple(bias.shape)} for {table.size(0)} words"
            )
        weights[f"adaptive.out_bias.{i}"] = bias
        tied.append(_same(out_table, table) and _same(out_projection, projection))
        weights[f"adaptive.out_tables.{i}"] = out_table
        weights[f"adaptive.out_projections.{i}"] = out_projection
    if len(set(tied)) > 1:
        raise OriginalFormatError(
            f"adaptive output clusters {[i for i, t in enumerate(tied) if t]} are tied to the "
            "input and the others are not (allattn ties all clusters or none)"
        )
    if tied[0]:
        for i in range(len(tables)):
            del weights[f"adaptive.out_tables.{i}"], weights[f"adaptive.out_projections.{i}"]
    cluster = weights["adaptive.cluster.weight"] = take("out_emb.cluster_proj.weight")
    weights["adaptive.cluster.bias"] = take("out_emb.cluster_proj.bias")
    if cluster.shape != (len(tables) - 1, d_model):
        raise OriginalFormatError(
            f"out_emb.cluster_proj.weight has shape {tuple(cluster.shape)}, expected "
            f"({len(tables) - 1}, {d_model}): one row per tail cluster"
        )
    sizes = [t.size(0) for t in tables]
    return {
        "vocab_size": sum(sizes),
        "d_model": d_model,
        "adaptive_io": True,
        "adaptive_cutoffs": tuple(sum(sizes[: i + 1]) for i in range(len(sizes) - 1)),
        "adaptive_div": div,
        "adaptive_tied": tied[0],
    }


def _same(a: Tensor, b: Tensor) -> bool:
    """`a` and `b` are one tensor (tied parameters saved together share storage) or equal."""
    shared = (
        a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
    )
    return shared or (a.dtype == b.dtype and torch.equal(a, b))


def permute_vocabulary(
    weights: dict[str, Tensor], source: Vocabulary, target: Vocabulary
) -> dict[str, Tensor]:
    """Reorder the embedding and output rows from `source` ids to `target` ids."""
    if source.level != target.level:
        raise OriginalFormatError(
            f"the original vocabulary is {source.level}-level, the given one {target.level}-level"
        )
    missing = [t for t in target.tokens if t not in source]
    extra = [t for t in source.tokens if t not in target]
    if missing or extra:
        token = (missing or extra)[0]
        where = "in the original's train.txt" if missing else "in the given vocabulary"
        raise OriginalFormatError(f"token {token!r} is not {where}")
    order = torch.tensor(source.encode(target.tokens))  # new id i <- original id order[i]
    permuted = dict(weights)
    for name in ("tok_emb.weight", "out.weight", "out.bias"):
        permuted[name] = weights[name][order].contiguous()
    return permuted


def _original_vocabulary(train_txt: str | Path, level: str, config: ModelConfig) -> Vocabulary:
    """The original's vocabulary of `train_txt` for a checkpoint of `config`: count order for
    adaptive input/softmax (always word level), else first appearance."""
    if config.adaptive_io and level not in ("auto", "word"):
        raise OriginalFormatError(
            f"the checkpoint has adaptive input/softmax, which is word level, not {level}"
        )
    try:
        if config.adaptive_io:  # allattn's own word-level numbering: `prepare` agrees by design
            with open(train_txt, encoding="utf-8") as f:  # universal newlines, as the original
                tokens = list(word_vocabulary(f).tokens)
        else:
            tokens = read_original_vocabulary(train_txt)
    except (CorpusError, OSError, UnicodeDecodeError) as error:
        raise OriginalFormatError(f"{train_txt}: {error}") from None
    if len(tokens) != config.vocab_size:
        raise OriginalFormatError(
            f"{train_txt} has {len(tokens)} distinct tokens, the checkpoint {config.vocab_size}"
        )
    chosen = "word" if config.adaptive_io else infer_level(tokens) if level == "auto" else level
    return Vocabulary(tuple(to_allattn_token(t, chosen) for t in tokens), chosen)


def _jsonable(value: Any) -> Any:
    """`value` if it can be stored as JSON (the original's logger is lists of floats), else None."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return None
    return value


def import_original(
    path: str | Path,
    out: str | Path,
    *,
    train_txt: str | Path | None = None,
    vocab: str | Path | None = None,
    level: str = "auto",
    options: ImportOptions = ImportOptions(),
    overwrite: bool = False,
) -> checkpoint.Checkpoint:
    """Convert an original checkpoint to an allattn checkpoint at `out`, and return it.

    `train_txt` (the original's prepared training file) gives the original's id order;
    `vocab` (an allattn vocabulary JSON) the order wanted. With only `vocab`, the original's
    ids are taken to be in that order already (true for allattn's own enwik8/text8 preparation,
    which numbers tokens by first appearance too).
    """
    path, out = Path(path), Path(out)
    if train_txt is None and vocab is None:
        raise OriginalFormatError("give --train-txt (the original's train.txt) or --vocab")
    if out.exists() and not overwrite:
        raise OriginalFormatError(f"{out} exists; pass --force to replace it")
    raw = _load(path)
    config, weights = convert_state_dict(raw["model"], options)

    source = target = None
    try:
        if train_txt is not None:
            source = _original_vocabulary(train_txt, level, config)
        if vocab is not None:
            target = Vocabulary.load(vocab)
            if len(target) != config.vocab_size:
                raise OriginalFormatError(
                    f"{vocab} has {len(target)} tokens, the checkpoint {config.vocab_size}"
                )
            if config.adaptive_io and target.level != "word":
                raise OriginalFormatError(
                    f"{vocab} is {target.level}-level; the checkpoint has adaptive "
                    "input/softmax, which is word level"
                )
    except VocabularyError as error:
        raise OriginalFormatError(str(error)) from None
    if source is not None and target is not None and config.adaptive_io:
        if source != target:
            raise OriginalFormatError(
                f"{vocab} orders the words differently from the original's train.txt: an "
                "adaptive-softmax model's clusters are id ranges, so its ids cannot be permuted"
            )
    elif source is not None and target is not None:
        weights = permute_vocabulary(weights, source, target)
    result = checkpoint.Checkpoint(
        config=config,
        weights=weights,
        vocab=target or source,
        meta={
            "source": "original",
            "original_file": path.name,
            "iter_no": _jsonable(raw.get("iter_no")),
            "scheduler_iter": _jsonable(raw.get("scheduler_iter")),
            "logger": _jsonable(raw.get("logger")),
        },
    )
    model = result.build_model()  # checks every shape against the inferred config
    checkpoint.save(out, model, vocab=result.vocab, meta=result.meta)
    return result
