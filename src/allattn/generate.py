"""Text generation: incremental decoding with key/value caches, and sampling.

The prompt goes through the model in blocks, then one token per step (`AllAttentionLM.forward_kv`):
each layer keeps the keys and values of its last C positions, trimmed to its learned span, so
nothing of the context is computed twice. The log-probabilities are those of one forward pass
over the whole sequence (tested to 1e-9 in float64).

    from allattn import checkpoint, generate
    model, ckpt = checkpoint.load_model("runs/demo")  # a run directory: its best checkpoint
    print(generate.sample(model, ckpt.vocab, "ROMEO:", max_new_tokens=200, seed=0))
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from . import checkpoint, runtime
from .checkpoint import verify_setting
from .config import CheckpointChoice, ConfigError, RuntimeConfig, Settings, setting
from .data import EOS, Vocabulary, VocabularyError
from .model import AllAttentionLM

log = logging.getLogger(__name__)

PROMPT_BLOCK = 256
"""Prompt tokens per forward pass while the prompt is consumed."""


@dataclass(frozen=True)
class Sampling(Settings):
    """How the next token is drawn from the model's distribution."""

    temperature: float = setting(
        1.0, "divides the log-probabilities; 0 always takes the likeliest token (greedy)"
    )
    top_k: int | None = setting(None, "draw among the k likeliest tokens only")
    top_p: float | None = setting(
        None, "draw only among the likeliest tokens whose probabilities sum to p (nucleus)"
    )

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"--temperature ({self.temperature}) must be at least 0")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"--top-k ({self.top_k}) must be a positive integer")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p ({self.top_p}) must be in (0, 1]")


@dataclass(frozen=True, kw_only=True)
class GenerateConfig(Settings):
    """What `allattn generate` continues, from which checkpoint, and how much."""

    checkpoint: str = setting(dataclasses.MISSING, "checkpoint file or run directory")
    select: CheckpointChoice = setting(
        "best", "which checkpoint of a run directory: best (by the validation estimate) or last"
    )
    prompt: str = setting("", "text to continue (default: a newline)")
    prompt_file: str | None = setting(None, "read the prompt from this UTF-8 file instead")
    max_new_tokens: int = setting(500, "tokens to generate")
    seed: int | None = setting(None, "same seed, same text on the same machine (default: random)")
    echo: bool = setting(True, "print the prompt before its continuation")
    verify: bool = verify_setting()

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens ({self.max_new_tokens}) is negative")
        if self.prompt and self.prompt_file is not None:
            raise ConfigError("--prompt and --prompt-file exclude each other")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"--seed ({self.seed}) is negative")

    def read_prompt(self) -> str:
        """The prompt text: `prompt`, or the contents of `prompt_file`."""
        if self.prompt_file is None:
            return self.prompt
        path = Path(self.prompt_file)
        if not path.exists():
            raise ConfigError(f"prompt file {path}: No such file or directory")
        if not path.is_file():  # a FIFO or a device would block or never end
            raise ConfigError(f"prompt file {path} is not a regular file")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{self.prompt_file} is not UTF-8 text") from None


def allowed(logprobs: Tensor, sampling: Sampling) -> Tensor:
    """The tokens `sampling` may draw, a boolean mask like `logprobs` (..., V)."""
    keep = torch.ones_like(logprobs, dtype=torch.bool)
    if sampling.top_k is not None and sampling.top_k < logprobs.size(-1):
        kth = logprobs.topk(sampling.top_k, dim=-1).values[..., -1:]
        keep &= logprobs >= kth  # ties with the k-th token stay in
    if sampling.top_p is not None and sampling.top_p < 1:
        # With temperature, the nucleus is that of the distribution drawn from.
        scaled = logprobs / sampling.temperature if sampling.temperature > 0 else logprobs
        probs = scaled.masked_fill(~keep, -torch.inf).softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the more likely tokens
        in_nucleus = before < sampling.top_p  # the smallest set reaching p; the first always
        keep &= torch.zeros_like(keep).scatter(-1, order, in_nucleus)
    return keep


def next_token(logprobs: Tensor, sampling: Sampling, generator: torch.Generator | None) -> Tensor:
    """Draw one token per row of `logprobs` (B, V) -> (B,)."""
    if sampling.temperature == 0:
        return logprobs.argmax(-1)
    scores = (logprobs.double() / sampling.temperature).masked_fill(
        ~allowed(logprobs, sampling), -torch.inf
    )
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def tokens(
    model: AllAttentionLM,
    prompt: Tensor,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    seed: int | None = None,
    precision: str = "fp32",
) -> Iterator[Tensor]:
    """Yield max_new_tokens new token ids (B,) one at a time, continuing `prompt` (B, T), T >= 1.

    The model must be in eval mode; its forward passes run under the autocast of `precision`
    (bf16, fp16; entered per pass, so none leaks to the caller between tokens). Same seed, same
    tokens (on the same machine and device).
    """
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise ValueError("the prompt must be a (batch, length) tensor of at least one token")
    if prompt.min() < 0 or prompt.max() >= model.config.vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {model.config.vocab_size})")
    device = model.pos_emb.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    prompt = prompt.to(device)
    kv = model.init_kv_cache(prompt.size(0))
    for start in range(0, prompt.size(1), PROMPT_BLOCK):
        with runtime.autocast(device, precision):
            logprobs = model.forward_kv(prompt[:, start : start + PROMPT_BLOCK], kv, last=True)
    for step in range(max_new_tokens):
        token = next_token(logprobs[:, -1].float(), sampling, generator)
        yield token
        if step + 1 < max_new_tokens:
            with runtime.autocast(device, precision):
                logprobs = model.forward_kv(token[:, None], kv)


def encode_prompt(vocab: Vocabulary, text: str, unknown: str | None = None) -> list[int]:
    """Token ids of a prompt; a newline is `<eos>` where the vocabulary has no newline token.

    An empty prompt starts from a newline. A character (or byte, or word) the vocabulary lacks
    becomes the token `unknown` when given (and in the vocabulary), and is otherwise an error
    naming it.
    """
    if not text:
        text = "\n"
    newline = "\n" if "\n" in vocab else EOS
    if vocab.level == "byte":
        units = [chr(b) for b in text.encode("utf-8")]
    elif vocab.level == "char":
        units = list(text)
    else:
        units = [w for line in text.split("\n") for w in (*line.split(), "\n")][:-1]
    ids = []
    for unit in units:
        token = newline if unit == "\n" else unit
        if token not in vocab and unknown is not None and unknown in vocab:
            token = unknown
        if token not in vocab:
            raise VocabularyError(
                f"the prompt has {_describe(unit, vocab.level)}, which the model's "
                f"vocabulary ({len(vocab)} {vocab.level} tokens) lacks"
            )
        ids.append(vocab.id(token))
    return ids


def _describe(unit: str, level: str) -> str:
    if level == "byte":
        return f"byte 0x{ord(unit):02x}"
    if level == "char":
        return f"character {unit!r} (U+{ord(unit):04X})"
    return f"word {unit!r}"


class TextDecoder:
    """Turns a stream of token ids into text pieces. Bytes are decoded as UTF-8 incrementally,
    so a character split over several tokens appears once it is complete; words are joined by
    single spaces, and `<eos>` is a line break. `after`: the text the pieces continue."""

    def __init__(self, vocab: Vocabulary, after: str = "") -> None:
        self.vocab = vocab
        self.bytes = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.line_start = not after or after[-1].isspace()
        """Word level: no space is needed before the next word."""

    def __call__(self, token_id: int) -> str:
        token = self.vocab.tokens[token_id]
        if token == EOS:
            token = "\n"
        if self.vocab.level == "byte":
            return self.bytes.decode(token.encode("latin-1"))
        if self.vocab.level == "word":
            if token == "\n":
                self.line_start = True
                return token
            piece = token if self.line_start else " " + token
            self.line_start = False
            return piece
        return token

    def flush(self) -> str:
        return self.bytes.decode(b"", final=True) if self.vocab.level == "byte" else ""


def stream(
    model: AllAttentionLM,
    vocab: Vocabulary,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    seed: int | None = None,
    precision: str = "fp32",
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text pieces, as they are generated.

    The prompt is checked at the call (a token the vocabulary lacks raises at once).
    """
    if len(vocab) != model.config.vocab_size:
        raise ValueError(
            f"the vocabulary has {len(vocab)} tokens, the model {model.config.vocab_size}"
        )
    ids = torch.tensor([encode_prompt(vocab, prompt)])
    decoder = TextDecoder(vocab, after=prompt or "\n")
    pieces = tokens(model, ids, max_new_tokens, sampling, seed=seed, precision=precision)
    return _text(pieces, decoder)


def _text(ids: Iterator[Tensor], decoder: TextDecoder) -> Iterator[str]:
    for token in ids:
        piece = decoder(int(token[0]))
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


def sample(
    model: AllAttentionLM,
    vocab: Vocabulary,
    prompt: str,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    *,
    seed: int | None = None,
    precision: str = "fp32",
) -> str:
    """The continuation of `prompt` (max_new_tokens tokens) as one string."""
    pieces = stream(model, vocab, prompt, max_new_tokens, sampling, seed=seed, precision=precision)
    return "".join(pieces)


def run(
    config: GenerateConfig,
    sampling: Sampling = Sampling(),
    runtime_config: RuntimeConfig | None = None,
) -> Iterator[str]:
    """The text `allattn generate` writes, piece by piece: the prompt (if `echo`), then its
    continuation as it is sampled. The checkpoint and prompt are checked at the call."""
    prompt = config.read_prompt()
    chosen = runtime.resolve(runtime_config or RuntimeConfig())
    model, ckpt = checkpoint.load_model(
        config.checkpoint,
        chosen.device,
        select=config.select,
        attn_impl=chosen.attn_impl,
        verify=config.verify,
    )
    model = model.to(chosen.weight_dtype)
    if ckpt.vocab is None:
        raise checkpoint.CheckpointError(f"{config.checkpoint}: the checkpoint has no vocabulary")
    pieces = stream(
        model,
        ckpt.vocab,
        prompt,
        config.max_new_tokens,
        sampling,
        seed=config.seed,
        precision=chosen.precision,
    )
    log.info("%s", checkpoint.describe(ckpt))
    chosen.log()
    return _echoed(prompt if config.echo else "", pieces)


def _echoed(prompt: str, pieces: Iterator[str]) -> Iterator[str]:
    if prompt:
        yield prompt
    yield from pieces
