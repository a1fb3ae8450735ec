"""Self-describing, pickle-free, atomically written checkpoints (safetensors).

One `.safetensors` file holds the weights under `model.` and, in its JSON metadata, the format
version, the full `ModelConfig`, the vocabulary, the `RunConfig` of the run that wrote it (if
any) and free-form facts (`meta`: step, source, ...).
A training checkpoint adds `state`: any nest of dicts, lists, numbers and tensors (optimiser
state, stream positions, caches, RNG states), stored as JSON with its tensors under `state.`.
Loading rebuilds the model from the file alone. Writes go to a temporary file in the same
directory, are fsynced and then renamed over the target, so a crash never leaves a torn file
(`allattn.atomic`).

Integrity: the metadata's `checksum` is the SHA-256 of the rest of the header (canonical JSON:
every tensor's name, dtype, shape and offsets, and all metadata) followed by the tensor bytes,
so any changed, missing or added byte is found. Every reader (`eval`, `generate`, `info`,
`train --resume`) goes through `load`, which checks the checksum (unless `verify=False`), the
header's structure, that the weights are finite floating-point tensors matching the config,
and that `meta` and `state` are well formed; any failure is a `CheckpointError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from . import atomic, runtime
from .config import CheckpointChoice, ConfigError, ModelConfig, RunConfig, setting
from .data import Vocabulary
from .model import AllAttentionLM, parameter_count, skeleton

LAST = "last.safetensors"
"""A run directory's newest checkpoint."""
BEST = "best.safetensors"
"""A run directory's checkpoint with the best validation loss."""
FORMAT = "allattn-checkpoint"
VERSION = 2
"""2 adds the checksum; version 1 files (no checksum) still load."""
READABLE_VERSIONS = ("1", "2")
CHECKSUM = "checksum"
MAX_HEADER = 100_000_000
WEIGHT_DTYPES = (torch.float32, torch.float64)
"""The precisions allattn keeps weights in (bfloat16 runs autocast over float32 weights)."""
MODEL_PREFIX = "model."
STATE_PREFIX = "state."


def verify_setting() -> Any:
    """The `--verify/--no-verify` setting of every command that reads a checkpoint."""
    return setting(True, "check the checkpoint's checksum (--no-verify skips only that check)")


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
        # Before building: an absurd config (a hostile header) would take forever.
        runtime.require_memory(4 * parameter_count(self.config), "cpu", f"{self.path}'s model")
        model = skeleton(self.config, attn_impl)  # no random init of weights to be replaced
        check_weights(model.state_dict(), self.weights, self.path)
        model.load_state_dict(self.weights, assign=True)
        return model.eval()


def check_weights(
    expected: Mapping[str, Tensor], weights: Mapping[str, Tensor], path: Path | None
) -> None:
    """`weights` has exactly the names and shapes of `expected` (a model's state dict)."""
    where = f"{path}: " if path is not None else ""
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}checkpoint weights do not match its config: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    for name, tensor in expected.items():
        if tensor.shape != weights[name].shape:
            raise CheckpointError(
                f"{where}checkpoint weight {name} has shape {tuple(weights[name].shape)}, "
                f"the config needs {tuple(tensor.shape)}"
            )


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


def _canonical(header: dict[str, Any]) -> bytes:
    """The header without its checksum, as the bytes the checksum covers."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != CHECKSUM}
    rest = {k: v for k, v in header.items() if k != "__metadata__"}
    return json.dumps(
        {**rest, "__metadata__": metadata}, sort_keys=True, separators=(",", ":")
    ).encode()


def _checksum(header: dict[str, Any], data: bytes | memoryview) -> str:
    digest = hashlib.sha256(_canonical(header))
    digest.update(data)
    return "sha256:" + digest.hexdigest()


def _with_checksum(blob: bytes) -> list[bytes | memoryview]:
    """The pieces of a safetensors file `blob` with the checksum added to its metadata."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    data = memoryview(blob)[8 + size :]
    header["__metadata__"][CHECKSUM] = _checksum(header, data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()  # same bytes
    text += b" " * (-len(text) % 8)  # safetensors aligns the tensor data to 8 bytes
    return [len(text).to_bytes(8, "little"), text, data]


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
    blob = save_tensors(tensors, metadata=metadata)
    atomic.write_bytes(path, _with_checksum(blob))


def _json(path: Path, text: str | bytes, what: str) -> Any:
    """JSON from a checkpoint header; malformed or hostile (deeply nested) text is an error."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, TypeError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else error
        raise CheckpointError(f"{path}: corrupt checkpoint {what} ({reason})") from None


def _header(path: Path, data: bytes | None = None) -> dict[str, Any]:
    """The safetensors JSON header (read from `data`, or from the file's first bytes)."""
    try:
        if data is None:
            _require_file(path)
            with path.open("rb") as f:
                prefix = f.read(8)
                size = int.from_bytes(prefix, "little")
                text = f.read(size) if len(prefix) == 8 and 2 <= size <= MAX_HEADER else b""
            total = path.stat().st_size
        else:
            size = int.from_bytes(data[:8], "little")
            text, total = data[8 : 8 + size], len(data)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    if not 2 <= size <= MAX_HEADER or 8 + size > total or len(text) != size:
        raise CheckpointError(f"{path}: not a safetensors file (or truncated)")
    header = _json(path, text, "header")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: not an allattn checkpoint")
    return header


def _require_file(path: Path) -> None:
    if not path.is_file():  # a FIFO would block, a directory fail later
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a regular file)")


def _read_metadata(path: Path, header: dict[str, Any] | None = None) -> dict[str, str]:
    """The checked JSON metadata of an allattn checkpoint (from the header alone)."""
    metadata = (header or _header(path))["__metadata__"]
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an allattn checkpoint")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {metadata.get('version')}, "
            f"this allattn reads versions {', '.join(READABLE_VERSIONS)}"
        )
    return metadata


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """`meta` is an object whose step (if any) is a non-negative integer and whose losses
    are numbers."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: bad checkpoint metadata (meta is not an object)")
    for key in ("step", "best_step"):
        value = meta.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(f"{path}: bad checkpoint metadata ({key} {value!r})")
    for key in ("valid_loss", "best_valid_loss"):
        value = meta.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise CheckpointError(f"{path}: bad checkpoint metadata ({key} {value!r})")
    if "best_step" in meta and meta["best_step"] > meta.get("step", 0):
        raise CheckpointError(f"{path}: bad checkpoint metadata (best step after its step)")
    meta.pop("run_config", None)  # written into meta before 0.2
    return meta


def load_meta(path: str | Path) -> dict[str, Any]:
    """Only a checkpoint's `meta` (step, ...), without reading its tensors."""
    path = Path(path)
    metadata = _read_metadata(path)
    if "meta" not in metadata:
        raise CheckpointError(f"{path}: bad checkpoint metadata (no meta)")
    return _check_meta(path, _json(path, metadata["meta"], "meta"))


def load_model_config(path: str | Path, select: CheckpointChoice = "best") -> ModelConfig:
    """Only the model config of a checkpoint (or of a run directory's `select` checkpoint),
    from the header alone."""
    if _is_hub_layout(Path(path)):
        from . import hub

        return hub.load_model_config(path)
    path = resolve(path, select)
    metadata = _read_metadata(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path}: bad checkpoint metadata (no config)")
    try:
        return ModelConfig.from_dict(_json(path, metadata["config"], "config"))
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: bad model config in the checkpoint ({error})") from None


def load_run_config(path: str | Path) -> RunConfig | None:
    """Only the run config of a checkpoint (None if no run wrote it), from the header alone."""
    path = Path(path)
    return _run_config(path, _read_metadata(path))


def _run_config(path: Path, metadata: dict[str, str]) -> RunConfig | None:
    if "run_config" in metadata:
        values = _json(path, metadata["run_config"], "run config")
    else:  # before 0.2 the run config was part of meta
        meta = _json(path, metadata.get("meta", "{}"), "meta")
        values = meta.get("run_config") if isinstance(meta, dict) else None
    try:
        return RunConfig.from_dict(values) if values is not None else None
    except (AttributeError, TypeError, ConfigError) as error:
        raise CheckpointError(f"{path}: bad run config in the checkpoint ({error})") from None


def step_of(path: Path) -> int | None:
    """The step a checkpoint's header records (None: no such file, or unreadable)."""
    try:
        return load_meta(path).get("step") if path.is_file() else None
    except CheckpointError:
        return None


def best_of_run(run_dir: Path) -> Path | None:
    """The file holding a run's best checkpoint, by the record in `last.safetensors`: `best`,
    or `last` itself when the run was killed after writing `last` and before copying it to
    `best` (the copy is made when the run resumes). None: no file records a best."""
    last, best = run_dir / LAST, run_dir / BEST
    if not last.is_file():
        return best if best.is_file() else None
    meta = load_meta(last)
    if "best_step" not in meta:  # written before 0.2: no record
        return best if best.is_file() else last
    if step_of(best) == meta["best_step"]:
        return best
    if meta.get("step") == meta["best_step"]:
        return last
    raise CheckpointError(
        f"{best} does not hold step {meta['best_step']}, the best that {last} records "
        "(resume the run, or evaluate --select last)"
    )


def _is_hub_layout(path: Path) -> bool:
    """Whether `path` is laid out as a Hugging Face Hub directory (a config.json, no run's
    checkpoint): `allattn.hub` then reads it, and says so if it is not an allattn one
    (`hub.is_hub_directory` is the strict test, of the config's format)."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / LAST).exists()


def resolve(path: str | Path, select: CheckpointChoice = "best") -> Path:
    """A checkpoint file, or a run directory's best (else last) or last checkpoint."""
    path = Path(path)
    if path.is_dir():
        chosen = best_of_run(path) if select == "best" else path / LAST
        if chosen is not None and chosen.is_file():
            return chosen
        raise CheckpointError(f"run directory {path} holds no {select} checkpoint")
    return path


def _check_tensors(path: Path, weights: dict[str, Tensor], state: dict[str, Tensor]) -> None:
    dtypes = {t.dtype for t in weights.values()}
    for name, tensor in weights.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"{path}: weight {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                "allattn weights are float32 (or float64)"
            )
    if len(dtypes) > 1:
        raise CheckpointError(f"{path}: weights mix {sorted(map(str, dtypes))}")
    for kind, tensors in (("weight", weights), ("state tensor", state)):
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(f"{path}: {kind} {name} holds NaN or infinite values")


def load(path: str | Path, select: CheckpointChoice = "best", verify: bool = True) -> Checkpoint:
    """Read a checkpoint file or a run directory's best (else last) or last checkpoint,
    tensors on the CPU, checked (see the module's doc; `verify=False` skips the checksum).
    Errors name the file and the problem. A Hugging Face Hub directory (`allattn.hub`) is read
    too (its checksums checked unless `verify=False`)."""
    if _is_hub_layout(Path(path)):
        from . import hub

        return hub.load_checkpoint(path, verify)
    path = resolve(path, select)
    _require_file(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    header = _header(path, data)
    metadata = _read_metadata(path, header)
    expected = metadata.get(CHECKSUM)
    if expected is None and metadata["version"] != "1":
        raise CheckpointError(f"{path}: the checkpoint has no checksum")
    if verify and expected is not None:
        size = int.from_bytes(data[:8], "little")
        if _checksum(header, memoryview(data)[8 + size :]) != expected:
            raise CheckpointError(
                f"{path}: checksum mismatch, the file is corrupt (--no-verify loads it anyway)"
            )
    try:
        tensors = load_tensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: corrupt checkpoint ({reason})") from None
    for key in ("config", "vocab", "meta"):
        if key not in metadata:
            raise CheckpointError(f"{path}: bad checkpoint metadata (no {key})")
    try:
        config = ModelConfig.from_dict(_json(path, metadata["config"], "config"))
        vocab_values = _json(path, metadata["vocab"], "vocabulary")
        vocab = Vocabulary.from_dict(vocab_values) if vocab_values is not None else None
        meta = _check_meta(path, _json(path, metadata["meta"], "meta"))
        state = None
        if "state" in metadata:
            state = unpack(_json(path, metadata["state"], "state"), tensors)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: bad checkpoint metadata ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: bad checkpoint state (nested too deeply)") from None
    if vocab is not None and len(vocab) != config.vocab_size:
        raise CheckpointError(
            f"{path}: the vocabulary has {len(vocab)} tokens, the config {config.vocab_size}"
        )
    run_config = _run_config(path, metadata)
    weights = {
        name.removeprefix(MODEL_PREFIX): t
        for name, t in tensors.items()
        if name.startswith(MODEL_PREFIX)
    }
    others = {k: t for k, t in tensors.items() if not k.startswith(MODEL_PREFIX)}
    foreign = [k for k in others if not k.startswith(STATE_PREFIX)]
    if foreign:
        raise CheckpointError(f"{path}: unexpected tensor {foreign[0]}")
    _check_tensors(path, weights, others)
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
    verify: bool = True,
) -> tuple[AllAttentionLM, Checkpoint]:
    """The model stored in `path` (in eval mode) and the checkpoint it came from."""
    checkpoint = load(path, select, verify)
    return checkpoint.build_model(attn_impl).to(device), checkpoint


def describe(checkpoint: Checkpoint) -> str:
    """Which checkpoint this is, for the log: its file, step and what chose it."""
    step = checkpoint.meta.get("step")
    facts = [f"step {step}"] if step is not None else []
    if checkpoint.path is not None and checkpoint.path.name in (BEST, LAST):
        facts.append("best validation estimate" if checkpoint.path.name == BEST else "newest")
    return f"checkpoint {checkpoint.path}" + (f" ({', '.join(facts)})" if facts else "")


def info(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """What `allattn info` shows: kind, parameters, vocabulary, config, spans and meta."""
    ckpt = load(path, verify=verify)
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
