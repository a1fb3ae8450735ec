"""Hugging Face Hub directories of allattn models (All-attention networks, arXiv 1907.01470).

A Hub directory (a Hub repository holds the same files):
    config.json        `format` "allattn-hub", `format_version`, the `allattn_version` that wrote
                       it, `library_name` "allattn", the model's `kind`, the `model` config
                       (ModelConfig), the `vocab`'s level and size (null: none), the `step` and
                       the `checkpoint` file it was exported from, the training run's
                       `run_config` (RunConfig, or null) and the `sha256` of each file it lists
    model.safetensors  the model's state dict under its own names (`layers.0.attn.q_proj.weight`)
    vocab.json         the vocabulary (`Vocabulary.to_dict`), when the model has one
    README.md          the model card: YAML front matter for the Hub, then what the model is,
                       its size, vocabulary, configs, checkpoint, evaluation and how to load it

Writing and reading a local directory need only the core dependencies; reading from and pushing
to the Hub need huggingface_hub (pip install 'allattn[hub]'). Each file is written atomically
(`allattn.atomic`) and config.json last: it holds the checksums of the others, so a reader that
meets a half-replaced directory finds a checksum mismatch, never another model's weights. A
directory is written only where it is missing, empty, or already an allattn Hub directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from . import __version__, atomic, checkpoint
from .checkpoint import CheckpointError, verify_setting
from .config import CheckpointChoice, ModelConfig, RunConfig, Settings, setting
from .data import CorpusError, Vocabulary, VocabularyError
from .evaluate import EvalConfig, EvalResult
from .evaluate import run as run_evaluation
from .model import AllAttentionLM

log = logging.getLogger(__name__)

FORMAT = "allattn-hub"
VERSION = 1
READABLE_VERSIONS = (1,)
LIBRARY = "allattn"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
VOCAB = "vocab.json"
CARD = "README.md"
FILES = (CONFIG, WEIGHTS, VOCAB, CARD)
"""Every file of a Hub directory (what is downloaded and uploaded)."""
HUB_EXTRA = "pip install 'allattn[hub]'"
PAPER = "https://arxiv.org/abs/1907.01470"
COMMIT_MESSAGE = "Upload allattn model"
PLACEHOLDER_REPO = "OWNER/NAME"
"""The repository the card's usage names when it is not known yet."""


class HubError(ValueError):
    """A Hub directory or repository is missing, corrupt, of another format, or unreachable."""


@dataclass(frozen=True)
class Evaluation:
    """What the model card says of evaluation: results and the command that produced them, or
    why no evaluation was run."""

    results: tuple[EvalResult, ...] = ()
    command: str = ""
    """The command that produced `results` (`allattn eval --checkpoint ... --split test`)."""
    skipped: str = ""
    """Why no evaluation was run (when there are no results)."""


@dataclass
class Pretrained:
    """What `from_pretrained` read: the model (eval mode, CPU), its vocabulary (None: none
    stored), the training run's config (None: not recorded) and config.json as read."""

    model: AllAttentionLM
    vocab: Vocabulary | None
    info: dict[str, Any]
    """config.json: format_version, allattn_version, kind, model, vocab, step, checkpoint, ..."""
    run_config: RunConfig | None = None
    path: Path | None = None
    """The local directory read (a snapshot in the Hugging Face cache for a repository)."""

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the model as an allattn checkpoint, which `allattn generate`, `eval` and
        `info` read."""
        step = self.info.get("step")
        checkpoint.save(
            path,
            self.model,
            vocab=self.vocab,
            meta={"step": step} if step is not None else {},
            run_config=self.run_config,
        )


def require_hub(what: str) -> None:
    """Refuse in one line, before any work, where huggingface_hub (the extra) is missing."""
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise HubError(f"{what} needs huggingface_hub: {HUB_EXTRA}") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_hub_directory(path: str | Path) -> bool:
    """Whether `path` holds an allattn Hub directory (a config.json of this format, any
    version)."""
    try:
        config = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT


def _check_target(directory: Path, overwrite: bool) -> None:
    """`directory` may be written: missing, empty, or (with `overwrite`) an allattn Hub
    directory; never another non-empty directory."""
    if directory.exists() and not directory.is_dir():
        raise HubError(f"{directory} exists and is not a directory")
    if not directory.is_dir() or not any(directory.iterdir()):
        return
    if not is_hub_directory(directory):
        raise HubError(
            f"{directory} is not empty and not an allattn Hub directory; refusing to write in it"
        )
    if not overwrite:
        raise HubError(f"{directory} already holds an allattn Hub directory; pass --force")


def save_pretrained(
    model: AllAttentionLM,
    directory: str | Path,
    *,
    vocab: Vocabulary | None = None,
    run_config: RunConfig | None = None,
    step: int | None = None,
    source: str | None = None,
    evaluation: Evaluation | None = None,
    card: str | None = None,
    repo_id: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write `model` (and `vocab`) as a Hub directory; returns it. `run_config`, `step` and
    `source` (the checkpoint file it came from) are recorded in config.json and described in
    the card with `evaluation`; `card`: README.md's text instead of `model_card`'s; `repo_id`:
    the repository the card's usage names. An existing allattn Hub directory is replaced
    (`overwrite=False`: refused); any other non-empty directory is refused."""
    directory = Path(directory)
    _check_target(directory, overwrite)
    config = model.config
    if vocab is not None and len(vocab) != config.vocab_size:
        raise HubError(f"the vocabulary has {len(vocab)} tokens, the model {config.vocab_size}")
    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    _check_values(weights, "the model")  # what would not load is not written
    files = {WEIGHTS: save_tensors(weights, metadata={"format": "pt"})}
    if vocab is not None:
        files[VOCAB] = (json.dumps(vocab.to_dict(), ensure_ascii=False) + "\n").encode()
    described = {
        "format": FORMAT,
        "format_version": VERSION,
        "allattn_version": __version__,
        "library_name": LIBRARY,
        "kind": config.kind,
        "model": config.to_dict(),
        "vocab": {"level": vocab.level, "size": len(vocab)} if vocab is not None else None,
        "step": step,
        "checkpoint": source,
        "run_config": run_config.to_dict() if run_config is not None else None,
        "sha256": {name: _sha256(data) for name, data in files.items()},
    }
    if card is None:
        card = model_card(
            model,
            vocab=vocab,
            run_config=run_config,
            step=step,
            source=source,
            evaluation=evaluation,
            repo_id=repo_id,
        )
    for name, data in files.items():
        atomic.write_bytes(directory / name, data)
    if vocab is None:
        (directory / VOCAB).unlink(missing_ok=True)  # a replaced directory's
    atomic.write_bytes(directory / CARD, card.encode())
    atomic.write_bytes(directory / CONFIG, (json.dumps(described, indent=2) + "\n").encode())
    return directory


def from_pretrained(
    name: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    attn_impl: str = "auto",
    verify: bool = True,
) -> Pretrained:
    """The model, vocabulary and facts of a local Hub directory, or of a Hub repository
    `name` ("owner/name", at `revision`) fetched with huggingface_hub's `snapshot_download`
    (into `cache_dir`, default the Hugging Face cache; `local_files_only`: the cache alone).
    Everything is checked (`verify=False` skips only the checksums); errors are one-line
    `HubError`s naming the directory or repository and the problem."""
    path = Path(name)
    if isinstance(name, Path) or path.exists():
        if revision is not None:
            raise HubError(f"{name} is a local directory: a revision applies to a Hub repository")
        if not path.is_dir():
            raise HubError(f"{name} is not a directory")
        return _read(path, str(path), attn_impl, verify)
    where = name if revision is None else f"{name}@{revision}"
    directory = _download(name, revision, token, cache_dir, local_files_only, where)
    return _read(directory, where, attn_impl, verify)


def load_checkpoint(directory: str | Path, verify: bool = True) -> checkpoint.Checkpoint:
    """A local Hub directory as a `checkpoint.Checkpoint` (weights, config, vocabulary, step,
    run config): what lets `allattn eval`, `generate`, `info`, `export` and `train
    --train.init_from` read a Hub directory as they read a checkpoint file."""
    return _read_checkpoint(Path(directory), str(directory), verify)[1]


def load_model_config(directory: str | Path) -> ModelConfig:
    """Only the model config of a local Hub directory (its config.json)."""
    return _configs(_read_config(Path(directory), str(directory)), str(directory))[0]


def _download(
    repo_id: str,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | Path | None,
    local_files_only: bool,
    where: str,
) -> Path:
    """The snapshot of a Hub repository in the cache (downloaded if need be)."""
    require_hub(f"{repo_id} is not a local directory; loading it from the Hub")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=list(FILES),
            library_name=LIBRARY,
            library_version=__version__,
        )
    except HFValidationError:
        raise HubError(f"{repo_id} is neither a local directory nor a Hub repository id") from None
    except RevisionNotFoundError:
        raise HubError(f"{where}: the Hub repository has no such revision") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo_id} is not a local directory nor a Hub repository you can read (a private "
            "or gated one needs a token)"
        ) from None
    except LocalEntryNotFoundError:
        raise HubError(
            f"{where} is not a local directory, and not in the Hugging Face cache while the Hub "
            "cannot be reached"
        ) from None
    except (OSError, ValueError) as error:
        raise HubError(f"{where}: cannot download from the Hub ({_first_line(error)})") from None
    return Path(folder)


def _read(directory: Path, where: str, attn_impl: str, verify: bool) -> Pretrained:
    """A Hub directory's model and contents, checked; errors name `where`."""
    info, ckpt = _read_checkpoint(directory, where, verify)
    try:
        model = ckpt.build_model(attn_impl)
    except CheckpointError as error:
        raise HubError(str(error)) from None
    return Pretrained(model, ckpt.vocab, info, ckpt.run_config, directory)


def _configs(info: dict[str, Any], where: str) -> tuple[ModelConfig, RunConfig | None]:
    """The model and run configs of a config.json."""
    try:
        config = ModelConfig.from_dict(info["model"])
        run_values = info.get("run_config")
        run_config = RunConfig.from_dict(run_values) if run_values is not None else None
    except (ValueError, TypeError, AttributeError) as error:
        raise HubError(f"{where}/{CONFIG}: bad config ({_first_line(error)})") from None
    return config, run_config


def _read_checkpoint(
    directory: Path, where: str, verify: bool
) -> tuple[dict[str, Any], checkpoint.Checkpoint]:
    """config.json and the directory's contents as a checkpoint (weights, config, vocabulary,
    step, run config), checked but not built into a model; errors name `where`."""
    info = _read_config(directory, where)
    config, run_config = _configs(info, where)
    checksums = info["sha256"]
    vocab = None
    if info.get("vocab") is not None:
        data = _read_file(directory, VOCAB, where, f"which its {CONFIG} lists")
        try:
            vocab = Vocabulary.from_dict(json.loads(data))
        except (ValueError, RecursionError) as error:
            raise HubError(f"{where}/{VOCAB}: not a vocabulary ({_first_line(error)})") from None
        _check_sum(data, checksums.get(VOCAB), VOCAB, where, verify)
        if len(vocab) != config.vocab_size:
            raise HubError(
                f"{where}: {VOCAB} has {len(vocab)} tokens, {CONFIG} {config.vocab_size}"
            )
    data = _read_file(directory, WEIGHTS, where)
    try:
        weights = load_tensors(data)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = _first_line(error)
        raise HubError(f"{where}/{WEIGHTS} is corrupt or truncated ({reason})") from None
    _check_sum(data, checksums.get(WEIGHTS), WEIGHTS, where, verify)
    _check_values(weights, f"{where}/{WEIGHTS}")
    step = info.get("step")
    return info, checkpoint.Checkpoint(
        config=config,
        weights=weights,
        vocab=vocab,
        meta={"step": step} if step is not None else {},
        run_config=run_config,
        path=Path(where) / WEIGHTS,
    )


def _read_file(directory: Path, name: str, where: str, why: str = "") -> bytes:
    path = directory / name
    if not path.is_file():
        raise HubError(f"{where} has no {name}" + (f", {why}" if why else ""))
    try:
        return path.read_bytes()
    except OSError as error:
        raise HubError(f"{where}/{name}: cannot read it ({error.strerror})") from None


def _read_config(directory: Path, where: str) -> dict[str, Any]:
    """config.json, of this format and a version this allattn reads."""
    data = _read_file(directory, CONFIG, where, "so it is not an allattn Hub directory")
    try:
        info = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise HubError(f"{where}/{CONFIG} is not valid JSON ({_first_line(error)})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise HubError(
            f"{where}/{CONFIG} is not an allattn model's (format {found!r}, not {FORMAT!r})"
        )
    version = info.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > VERSION:
        raise HubError(
            f"{where} was written by allattn {info.get('allattn_version', '?')} in Hub format "
            f"version {version}; this allattn ({__version__}) reads version "
            f"{', '.join(map(str, READABLE_VERSIONS))}: upgrade allattn"
        )
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise HubError(
            f"{where}/{CONFIG} has an unknown format version {version!r} (this allattn reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})"
        )
    checksums = info.get("sha256")
    if not isinstance(checksums, dict) or not isinstance(checksums.get(WEIGHTS), str):
        raise HubError(f"{where}/{CONFIG} lacks the checksum of {WEIGHTS}")
    if not isinstance(info.get("model"), dict):
        raise HubError(f"{where}/{CONFIG} lacks the model config")
    step = info.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise HubError(f"{where}/{CONFIG}: bad step {step!r}")
    return info


def _check_sum(data: bytes, expected: Any, name: str, where: str, verify: bool) -> None:
    if not isinstance(expected, str):
        raise HubError(f"{where}/{CONFIG} lacks the checksum of {name}")
    if verify and _sha256(data) != expected:
        raise HubError(
            f"{where}/{name} does not match its checksum in {CONFIG}: the file is corrupt"
        )


def _check_values(weights: dict[str, Tensor], where: str) -> None:
    """Weights are finite, all float32 or all float64 (what allattn keeps weights in)."""
    dtypes = {t.dtype for t in weights.values()}
    if not dtypes <= set(checkpoint.WEIGHT_DTYPES) or len(dtypes) > 1:
        names = sorted(str(d).removeprefix("torch.") for d in dtypes)
        raise HubError(f"{where}: weights are {', '.join(names)}; allattn keeps float32 (or 64)")
    for name, tensor in weights.items():
        if not bool(torch.isfinite(tensor).all()):
            raise HubError(f"{where}: weight {name} holds NaN or infinite values")


def push_to_hub(
    source: AllAttentionLM | str | Path,
    repo_id: str,
    *,
    vocab: Vocabulary | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = COMMIT_MESSAGE,
) -> str:
    """Upload a model (with `vocab`, written by `save_pretrained`) or a Hub directory (checked
    by loading it) to the Hub repository `repo_id`, created if need be (`private`); returns
    the repository's URL."""
    require_hub("pushing to the Hub")
    from huggingface_hub import HfApi

    if isinstance(source, AllAttentionLM):
        with tempfile.TemporaryDirectory(prefix="allattn-hub-") as tmp:
            directory = save_pretrained(source, tmp, vocab=vocab, repo_id=repo_id)
            return _upload(HfApi(), directory, repo_id, private, token, commit_message)
    if vocab is not None:
        raise HubError("push_to_hub takes a vocabulary with a model; a directory holds its own")
    directory = Path(source)
    from_pretrained(directory)  # push only what loads
    return _upload(HfApi(), directory, repo_id, private, token, commit_message)


def _upload(
    api: Any,
    directory: Path,
    repo_id: str,
    private: bool | None,
    token: str | None,
    commit_message: str,
) -> str:
    try:
        url = api.create_repo(repo_id, private=private, token=token, exist_ok=True)
        api.upload_folder(
            repo_id=url.repo_id,
            folder_path=directory,
            commit_message=commit_message,
            token=token,
            allow_patterns=[name for name in FILES if (directory / name).is_file()],
        )
    except (OSError, ValueError) as error:
        raise HubError(f"pushing to {repo_id} failed ({_first_line(error)})") from None
    return str(url)


_KINDS = {
    "all-attention": "an all-attention network: each layer is a single attention sublayer whose "
    "keys and values include learned persistent memory vectors, with no feed-forward sublayer",
    "transformer": "a transformer baseline: attention and feed-forward sublayers, no "
    "persistent memory",
    "hybrid": "a transformer whose attention also reads learned persistent memory vectors",
    "attention-only": "an ablation with attention sublayers only: neither persistent memory "
    "nor feed-forward sublayers",
}
_LEVELS = {"char": "character", "byte": "byte", "word": "word"}


def model_card(
    model: AllAttentionLM,
    *,
    vocab: Vocabulary | None = None,
    run_config: RunConfig | None = None,
    step: int | None = None,
    source: str | None = None,
    evaluation: Evaluation | None = None,
    repo_id: str | None = None,
) -> str:
    """README.md of a Hub directory: YAML front matter (library_name, tags, pipeline_tag),
    then only facts allattn has: the kind, size, vocabulary, configs, checkpoint, evaluation
    (or that none was run) and how to load and sample from the model."""
    config = model.config
    kind = config.kind
    spans = model.span_stats()
    lines = [
        "---",
        f"library_name: {LIBRARY}",
        "tags:",
        "- allattn",
        "- all-attention",
        "- language-modeling",
        "- arxiv:1907.01470",
        "pipeline_tag: text-generation",
        "---",
        "",
        f"# allattn {kind} language model",
        "",
        f"This is {_KINDS[kind.split(' (')[0]]} (Sukhbaatar et al., *Augmenting "
        f"Self-attention with Persistent Memory*, 2019, [arXiv:1907.01470]({PAPER})), as the "
        "allattn library implements it.",
        "",
        f"- Kind: {kind}",
        f"- Parameters: {model.num_parameters():,}",
        f"- Layers: {config.n_layers}, d_model {config.d_model}, {config.n_heads} heads, "
        f"{config.n_persistent} persistent vectors per head, feed-forward size {config.d_inner}",
        f"- Attention span: at most {config.attn_span} tokens"
        + (
            f"; learned spans average {spans['span_avg']:.1f}, the largest "
            f"{spans['span_max']:.1f} (adaptive span)"
            if config.adapt_span
            else ""
        ),
        f"- Vocabulary: {_describe_vocab(config, vocab)}",
        *(
            [f"- Checkpoint: {_describe_source(step, source)}"]
            if step is not None or source is not None
            else []
        ),
        f"- Written by allattn {__version__} (Hub format version {VERSION})",
        "",
        "## Evaluation",
        "",
        *_evaluation_lines(evaluation),
        "",
        "## Model config",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| {key} | `{json.dumps(value)}` |" for key, value in config.to_dict().items()),
        "",
        "## Training run",
        "",
        *(
            [
                "The full config of the run (as `allattn train --print-config` shows it):",
                "",
                "```toml",
                run_config.to_toml().rstrip(),
                "```",
            ]
            if run_config is not None
            else ["The checkpoint does not record the run that trained it."]
        ),
        "",
        "## Usage",
        "",
        *_usage_lines(repo_id or PLACEHOLDER_REPO, vocab is not None),
    ]
    return "\n".join(lines) + "\n"


def _describe_vocab(config: ModelConfig, vocab: Vocabulary | None) -> str:
    if vocab is None:
        return f"none stored ({config.vocab_size:,} token ids)"
    adaptive = " (adaptive input and softmax)" if config.adaptive_io else ""
    return f"{_LEVELS[vocab.level]} level, {len(vocab):,} tokens{adaptive}"


def _describe_source(step: int | None, source: str | None) -> str:
    facts = [f"step {step:,}"] if step is not None else []
    if source == checkpoint.BEST:
        facts.append(f"the run's best by its validation estimate ({source})")
    elif source == checkpoint.LAST:
        facts.append(f"the run's newest ({source})")
    elif source is not None:
        facts.append(f"from {source}")
    return ", ".join(facts)


def _evaluation_lines(evaluation: Evaluation | None) -> list[str]:
    if evaluation is None:
        return ["No evaluation results are recorded with this model."]
    if not evaluation.results:
        return [f"No evaluation was run: {evaluation.skipped or 'none was asked for'}."]
    lines = ["| split | tokens scored | loss (nats/token) | result |", "|---|---:|---:|---|"]
    lines += [
        f"| {r.split} | {r.tokens:,} | {r.loss_nats:.4f} | {r.measure.describe(r.loss_nats)} |"
        for r in evaluation.results
    ]
    if evaluation.command:
        lines += [
            "",
            "Produced by allattn's full evaluation (every full block of the split, fresh "
            "caches) with:",
            "",
            "```sh",
            evaluation.command,
            "```",
        ]
    return lines


def _usage_lines(repo_id: str, has_vocab: bool) -> list[str]:
    load = [
        "from allattn import hub",
        *(["from allattn.generate import sample"] if has_vocab else []),
        "",
        f'pretrained = hub.from_pretrained("{repo_id}")  # a Hub repository or a local directory',
        "model, vocab = pretrained.model, pretrained.vocab  # eval mode, on the CPU",
    ]
    if not has_vocab:
        return ["```python", *load, "```", "", "No vocabulary is stored: the model reads ids."]
    return [
        "```python",
        *load,
        'print(sample(model, vocab, "", max_new_tokens=200))',
        "```",
        "",
        "Loading from the Hub needs `pip install 'allattn[hub]'`. The `allattn` commands read "
        "a local copy of this repository as they read a checkpoint:",
        "",
        "```sh",
        f"hf download {repo_id} --local-dir {repo_id.rsplit('/', 1)[-1]}",
        f'allattn generate --checkpoint {repo_id.rsplit("/", 1)[-1]} --prompt "" '
        "--max-new-tokens 200",
        "```",
    ]


@dataclass(frozen=True, kw_only=True)
class ExportHFOptions(Settings):
    """`allattn export-hf RUN OUT`: a run's checkpoint as a Hugging Face Hub directory."""

    run: str = setting(dataclasses.MISSING, "run directory or checkpoint file", positional=True)
    out: str = setting(dataclasses.MISSING, "the Hub directory to write", positional=True)
    select: CheckpointChoice = setting(
        "best",
        "which checkpoint of a run directory: best (by the validation estimate) or last",
    )
    evaluate: bool = setting(
        True,
        "run the full evaluation on the test split for the model card (when the run's data "
        "is available; --no-evaluate: none)",
    )
    repo_id: str | None = setting(None, "the Hub repository the card's usage names")
    force: bool = setting(False, "replace OUT if it is an allattn Hub directory")
    verify: bool = verify_setting()


def export_hf(
    run: str | Path,
    out: str | Path,
    *,
    select: CheckpointChoice = "best",
    evaluate: bool = True,
    repo_id: str | None = None,
    force: bool = False,
    verify: bool = True,
) -> Path:
    """Write the `select`ed checkpoint of a run (or a checkpoint file) as the Hub directory
    `out`, with a model card; unless `evaluate` is false, the card reports the full
    evaluation of the test split (when the run's data is available, else says none was run).
    An existing allattn Hub directory `out` is replaced only with `force`."""
    out = Path(out)
    _check_target(out, force)  # before the evaluation, which takes a while
    ckpt = checkpoint.load(run, select, verify)
    model = ckpt.build_model()
    if evaluate:
        evaluation = _evaluate_test(ckpt, verify)
    else:
        evaluation = Evaluation(skipped="the export was asked not to (--no-evaluate)")
    assert ckpt.path is not None
    return save_pretrained(
        model,
        out,
        vocab=ckpt.vocab,
        run_config=ckpt.run_config,
        step=ckpt.meta.get("step"),
        source=ckpt.path.name,
        evaluation=evaluation,
        repo_id=repo_id,
        overwrite=force,
    )


def _evaluate_test(ckpt: checkpoint.Checkpoint, verify: bool) -> Evaluation:
    """`allattn eval` of the checkpoint on its run's test split, or why it could not run."""
    command = f"allattn eval --checkpoint {ckpt.path} --split test"
    try:
        result = run_evaluation(EvalConfig(checkpoint=str(ckpt.path), split="test", verify=verify))
    except (CorpusError, VocabularyError) as error:
        log.warning("no evaluation for the model card: %s", _first_line(error))
        return Evaluation(skipped=f"the run's test data was not available ({_first_line(error)})")
    return Evaluation(results=(result,), command=command)


def run(options: ExportHFOptions) -> Path:
    """`allattn export-hf`: the Hub directory written."""
    return export_hf(
        options.run,
        options.out,
        select=options.select,
        evaluate=options.evaluate,
        repo_id=options.repo_id,
        force=options.force,
        verify=options.verify,
    )
