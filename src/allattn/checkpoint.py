"""Self-describing, pickle-free, atomically written checkpoints (safetensors).

One `.safetensors` file holds the weights under `model.` and, in its JSON metadata, the format
version, the full `ModelConfig`, the vocabulary, the `RunConfig` of the run that wrote it (if
any) and free-form facts (`meta`: step, source, ...).
A training checkpoint adds `state`: any nest of dicts, lists, numbers and tensors (optimiser
state, stream positions, caches, RNG states), stored as JSON with its tensors under `state.`.
Loading rebuilds the model from the file alone. Writes go to a temporary file in the same
directory, are fsynced and then renamed over the target, so a crash never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from .config import CheckpointChoice, ConfigError, ModelConfig, RunConfig
from .data import Vocabulary, VocabularyError
from .model import AllAttentionLM

LAST = "last.safetensors"
"""A run directory's newest checkpoint."""
BEST = "best.safetensors"
"""A run directory's checkpoint with the best validation loss."""
FORMAT = "allattn-checkpoint"
VERSION = 1
MODEL_PREFIX = "model."
STATE_PREFIX = "state."


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt or does not match the model."""


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: dict[str, Tensor]
    vocab: Vocabulary | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] | None = None
    run_config: RunConfig | None = None
    """The full config of the training run that wrote the checkpoint (None: not from a run)."""
    path: Path | None = None
    """The file it was read from."""

    def build_model(self, attn_impl: str = "auto") -> AllAttentionLM:
        """The model with these weights (dtype as stored, on the CPU, in eval mode)."""
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            model = AllAttentionLM(self.config, attn_impl)
        missing, unexpected = _compare_keys(model.state_dict(), self.weights)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint weights do not match its config: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for name, tensor in model.state_dict().items():
            if tensor.shape != self.weights[name].shape:
                raise CheckpointError(
                    f"checkpoint weight {name} has shape {tuple(self.weights[name].shape)}, "
                    f"the config needs {tuple(tensor.shape)}"
                )
        model.load_state_dict(self.weights, assign=True)
        return model.eval()


def _compare_keys(expected: dict[str, Tensor], found: dict[str, Tensor]):
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))


def pack(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """A JSON-able tree for `obj`; its tensors go to `tensors` (copied to the CPU)."""
    if isinstance(obj, Tensor):
        key = f"{STATE_PREFIX}{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: pack(v, tensors) for k, v in obj.items()}
        return {"__items__": [[pack(k, tensors), pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, list | tuple):
        return [pack(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def unpack(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """The inverse of `pack` (tuples come back as lists)."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__items__"}:
            return {unpack(k, tensors): unpack(v, tensors) for k, v in tree["__items__"]}
        return {k: unpack(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack(v, tensors) for v in tree]
    return tree


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(
    path: str | Path,
    model: AllAttentionLM,
    *,
    vocab: Vocabulary | None = None,
    meta: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    run_config: RunConfig | None = None,
) -> None:
    """Save the model's weights, config, vocabulary, `meta` (JSON), `state` and the run's
    config to `path`."""
    if vocab is not None and len(vocab) != model.config.vocab_size:
        raise CheckpointError(
            f"vocabulary has {len(vocab)} tokens, the model {model.config.vocab_size}"
        )
    tensors = {
        MODEL_PREFIX + name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()
    }
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(model.config.to_dict()),
        "vocab": json.dumps(vocab.to_dict() if vocab is not None else None, ensure_ascii=False),
        "meta": json.dumps(meta or {}),
    }
    if state is not None:
        metadata["state"] = json.dumps(pack(state, tensors))
    if run_config is not None:
        metadata["run_config"] = json.dumps(run_config.to_dict())
    atomic_write_bytes(path, save_tensors(tensors, metadata=metadata))


def _read_metadata(path: Path) -> dict[str, str]:
    """The checked JSON metadata of an allattn checkpoint, read from the header alone."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    # safetensors layout: 8-byte little-endian header length, then the JSON header.
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100_000_000:
                raise CheckpointError(f"{path}: not a safetensors file")
            metadata = json.loads(f.read(size)).get("__metadata__") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({error})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an allattn checkpoint")
    if metadata.get("version") != str(VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format version {metadata.get('version')}, "
            f"this allattn reads version {VERSION}"
        )
    return metadata


def load_meta(path: str | Path) -> dict[str, Any]:
    """Only a checkpoint's `meta` (step, ...), without reading its tensors."""
    path = Path(path)
    try:
        meta = json.loads(_read_metadata(path)["meta"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: bad checkpoint metadata ({error})") from None
    meta.pop("run_config", None)  # written into meta before 0.2
    return meta


def load_run_config(path: str | Path) -> RunConfig | None:
    """Only the run config of a checkpoint (None if no run wrote it), from the header alone."""
    path = Path(path)
    return _run_config(path, _read_metadata(path))


def _run_config(path: Path, metadata: dict[str, str]) -> RunConfig | None:
    try:
        if "run_config" in metadata:
            values = json.loads(metadata["run_config"])
        else:  # before 0.2 the run config was part of meta
            values = json.loads(metadata.get("meta", "{}")).get("run_config")
        return RunConfig.from_dict(values) if values is not None else None
    except (AttributeError, TypeError, json.JSONDecodeError, ConfigError) as error:
        raise CheckpointError(f"{path}: bad run config in the checkpoint ({error})") from None


CHOICES: dict[str, tuple[str, ...]] = {"best": (BEST, LAST), "last": (LAST,)}
"""The files a run directory's `best` and `last` checkpoint mean, in order of preference: `best`
is the best validation estimate (the last while a run has no best yet)."""


def resolve(path: str | Path, select: CheckpointChoice = "best") -> Path:
    """A checkpoint file, or a run directory's best (else last) or last checkpoint."""
    path = Path(path)
    if path.is_dir():
        for name in CHOICES[select]:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"run directory {path} holds no {select} checkpoint")
    return path


def load(path: str | Path, select: CheckpointChoice = "best") -> Checkpoint:
    """Read a checkpoint file or a run directory's best (else last) or last checkpoint,
    tensors on the CPU. Errors name the file and the problem."""
    path = resolve(path, select)
    metadata = _read_metadata(path)
    try:
        tensors = load_tensors(path.read_bytes())
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: corrupt checkpoint ({error})") from None
    try:
        config = ModelConfig.from_dict(json.loads(metadata["config"]))
        vocab_values = json.loads(metadata["vocab"])
        vocab = Vocabulary.from_dict(vocab_values) if vocab_values is not None else None
        meta = json.loads(metadata["meta"])
        state = unpack(json.loads(metadata["state"]), tensors) if "state" in metadata else None
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError, VocabularyError) as error:
        raise CheckpointError(f"{path}: bad checkpoint metadata ({error})") from None
    run_config = _run_config(path, metadata)
    meta.pop("run_config", None)
    weights = {
        name.removeprefix(MODEL_PREFIX): t
        for name, t in tensors.items()
        if name.startswith(MODEL_PREFIX)
    }
    return Checkpoint(
        config=config,
        weights=weights,
        vocab=vocab,
        meta=meta,
        state=state,
        run_config=run_config,
        path=path,
    )


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    *,
    select: CheckpointChoice = "best",
    attn_impl: str = "auto",
) -> tuple[AllAttentionLM, Checkpoint]:
    """The model stored in `path` (in eval mode) and the checkpoint it came from."""
    checkpoint = load(path, select)
    return checkpoint.build_model(attn_impl).to(device), checkpoint


def describe(checkpoint: Checkpoint) -> str:
    """Which checkpoint this is, for the log: its file, step and what chose it."""
    step = checkpoint.meta.get("step")
    facts = [f"step {step}"] if step is not None else []
    if checkpoint.path is not None and checkpoint.path.name in (BEST, LAST):
        facts.append("best validation estimate" if checkpoint.path.name == BEST else "newest")
    return f"checkpoint {checkpoint.path}" + (f" ({', '.join(facts)})" if facts else "")


def info(path: str | Path) -> dict[str, Any]:
    """What `allattn info` shows: kind, parameters, vocabulary, config, spans and meta."""
    ckpt = load(path)
    model = ckpt.build_model()
    return {
        "checkpoint": str(path),
        "kind": ckpt.config.kind,
        "parameters": model.num_parameters(),
        "vocab_level": ckpt.vocab.level if ckpt.vocab else None,
        "vocab_size": ckpt.config.vocab_size,
        "config": ckpt.config.to_dict(),
        "span": model.span_stats(),
        "run_config": ckpt.run_config.to_dict() if ckpt.run_config else None,
        "meta": {k: v for k, v in ckpt.meta.items() if k != "logger"},
    }


def format_info(info: dict[str, Any]) -> str:
    """`info` as the lines `allattn info` prints."""
    lines = [f"{info['checkpoint']}: {info['kind']} model, {info['parameters']:,} parameters"]
    lines += [f"  model.{key} = {value}" for key, value in info["config"].items()]
    lines.append(f"  vocabulary: {info['vocab_level']}, {info['vocab_size']} tokens")
    lines.append(f"  spans: avg {info['span']['span_avg']:.0f}, max {info['span']['span_max']:.0f}")
    if info["run_config"] is not None:
        lines.append(f"  run_config: {info['run_config']}")
    lines += [f"  {key}: {value}" for key, value in info["meta"].items()]
    return "\n".join(lines)
