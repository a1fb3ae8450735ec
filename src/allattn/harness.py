"""The `allattn` model of EleutherAI's lm-evaluation-harness (the `lm-eval` extra).

Importing this module registers the model type `allattn` with the harness; `allattn lm-eval`
(or `python -m allattn.harness`) is the harness's own command line with it registered:

    allattn lm-eval --model allattn --model_args checkpoint=runs/demo --tasks wikitext

(the harness finds models only in its own registry, so a bare `lm_eval --model allattn` works
from Python after `import allattn.harness`, not from the shell). Model arguments:
`checkpoint` (file or run directory), `select` (best|last), `block_size` (tokens per forward
pass; default: the run's), `precision`, `max_length` (refuse any request longer than this many
tokens; default: none, see below) and `verify`. The harness's own `--batch_size` (its default
1; "auto" means 8 here) is how many requests are read at once, and its `--device` (its default
cuda:0, read as the CPU where there is no CUDA) where.

How requests are scored, with the machinery of `allattn evaluate` (`evaluate.score`):
    loglikelihood          the continuation's log-probability after the context, and whether
                           it is the greedy continuation. The context is cut to its last W
                           tokens (W, the model's receptive field, `evaluate.receptive_field`:
                           farther tokens cannot change a prediction), so this is exact.
    loglikelihood_rolling  the whole document read from zero caches in blocks, the cache carried
                           across it, so every token is scored with the model's full span.
    generate_until         incremental decoding (`generate.tokens`): greedy unless the request
                           sets `do_sample` with a temperature; stops at any `until` string (cut
                           off) or after `max_gen_toks` tokens (default 256).
Every request is read alone; its first token is predicted from a line break (the harness's
end-of-text prefix: `<eos>` where the vocabulary has no newline). Text is tokenised as
`allattn generate` tokenises a prompt; a word the vocabulary lacks becomes `<unk>` when the
vocabulary has that token (WikiText's), and is an error otherwise, as is a character of a
character-level model's unknown characters.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch

from . import evaluate, generate, runtime
from .checkpoint import describe, load_model
from .config import CheckpointChoice, ConfigError, RuntimeConfig
from .data import Vocabulary, VocabularyError
from .evaluate import Segment

log = logging.getLogger(__name__)

UNKNOWN = "<unk>"
DEFAULT_GEN_TOKENS = 256


class HarnessError(ValueError):
    """A request the model cannot score, or a missing lm-evaluation-harness."""


def require_lm_eval() -> None:
    """HarnessError (one line) unless lm-evaluation-harness is installed."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise HarnessError(
            "lm-evaluation-harness is not installed: pip install 'allattn[lm-eval]'"
        ) from None


require_lm_eval()

from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402


@register_model("allattn")
class AllAttentionHarnessLM(LM):
    """An allattn checkpoint as a harness model (see the module's doc)."""

    def __init__(
        self,
        checkpoint: str,
        select: str = "best",
        batch_size: int | str | None = 8,
        block_size: int | None = None,
        device: str | None = None,
        precision: str = "fp32",
        max_length: int | None = None,
        verify: bool = True,
        **unused: Any,
    ) -> None:
        super().__init__()
        if select not in ("best", "last"):
            raise HarnessError(f"select={select!r}: choose best or last")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # The harness passes cuda:0 unless told otherwise.
            log.warning("device %s: CUDA is not available, running on the CPU", device)
            device = "cpu"
        settings = {"device": device or "auto", "precision": precision}
        chosen = runtime.resolve(RuntimeConfig.from_dict(settings))
        self.model, ckpt = load_model(
            str(checkpoint),
            chosen.device,
            select=cast(CheckpointChoice, select),
            verify=bool(verify),
        )
        if ckpt.vocab is None:
            raise HarnessError(f"{checkpoint}: the checkpoint has no vocabulary")
        self.vocab: Vocabulary = ckpt.vocab
        self.model = chosen.prepare(self.model)
        self.precision = chosen.precision
        self.batch_size = _batch_size(batch_size)
        run = ckpt.run_config
        self.block_size = int(block_size or (run.train.block_size if run else 512))
        self.max_length = int(max_length) if max_length is not None else None
        if self.block_size < 1 or (self.max_length is not None and self.max_length < 2):
            raise HarnessError("block_size must be positive and max_length at least 2")
        self.receptive_field = evaluate.receptive_field(self.model)
        try:  # a line break: "\n", or `<eos>` where the vocabulary has no "\n"
            self.prefix = generate.encode_prompt(self.vocab, "\n")[0]
        except VocabularyError:
            self.prefix = 0  # neither: the vocabulary's first token
        """The token every request's first token is predicted from."""
        if unused:
            log.info("ignored model arguments: %s", ", ".join(sorted(unused)))
        log.info("%s for lm-evaluation-harness", describe(ckpt))

    # -- tokenisation -----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (empty for ""); unknown words become `<unk>` if it exists."""
        if not text:
            return []
        unknown = UNKNOWN if self.vocab.level == "word" else None
        return generate.encode_prompt(self.vocab, text, unknown)

    def _check_length(self, tokens: int, what: str) -> None:
        if self.max_length is not None and tokens > self.max_length:
            raise HarnessError(
                f"a {what} request of {tokens} tokens is longer than max_length={self.max_length}"
            )

    # -- the harness's three request types --------------------------------------------------
    def loglikelihood(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        ids: list[int] = []
        segments = []
        for request in requests:
            context, continuation = request.args
            context_ids = [self.prefix, *self.encode(context)]
            continuation_ids = self.encode(continuation)
            if not continuation_ids:
                raise HarnessError(f"an empty continuation to score after {context[-40:]!r}")
            self._check_length(len(context_ids) + len(continuation_ids) - 1, "loglikelihood")
            context_ids = context_ids[-(self.receptive_field + 1) :]  # the rest cannot matter
            start = len(ids)
            ids += context_ids + continuation_ids
            segments.append(Segment(start, start + len(context_ids), len(ids)))
        scores = self._score(ids, segments, greedy=True)
        return [(s.logprob, bool(s.greedy)) for s in scores]

    def loglikelihood_rolling(
        self, requests: Sequence[Any], disable_tqdm: bool = False
    ) -> list[float]:
        ids: list[int] = []
        segments = []
        for request in requests:
            (text,) = request.args[:1]
            document = self.encode(text)
            if not document:
                raise HarnessError("an empty document to score")
            self._check_length(len(document), "loglikelihood_rolling")
            start = len(ids)
            ids += [self.prefix, *document]
            segments.append(Segment(start, start + 1, len(ids)))
        return [s.logprob for s in self._score(ids, segments)]

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        return [self._generate(*request.args[:2]) for request in requests]

    def _generate(self, context: str, options: dict[str, Any] | None) -> str:
        options = dict(options or {})
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(options.pop("max_gen_toks", DEFAULT_GEN_TOKENS))
        sample = bool(options.pop("do_sample", False))
        temperature = float(options.pop("temperature", 1.0 if sample else 0.0))
        sampling = generate.Sampling(temperature=temperature if sample else 0.0)
        prompt = [self.prefix, *self.encode(context)]
        self._check_length(len(prompt) + max_new, "generate_until")
        prompt = prompt[-(self.receptive_field + 1) :]
        decoder = generate.TextDecoder(self.vocab, after=context or "\n")
        text = ""
        tokens = generate.tokens(
            self.model,
            torch.tensor([prompt]),
            max_new,
            sampling,
            seed=int(options.pop("seed", 0)),
            precision=self.precision,
        )
        for token in tokens:
            text += decoder(int(token[0]))
            cut = min((text.find(s) for s in until if s and s in text), default=-1)
            if cut >= 0:
                return text[:cut]
        return text + decoder.flush()

    def _score(
        self, ids: list[int], segments: list[Segment], greedy: bool = False
    ) -> list[evaluate.SegmentScore]:
        return evaluate.score(
            self.model,
            ids,
            segments,
            batch_size=self.batch_size,
            block_size=self.block_size,
            precision=self.precision,
            greedy=greedy,
            shard=False,
        )

    @property
    def eot_token_id(self) -> int:
        return self.prefix

    @property
    def tokenizer_name(self) -> str:
        return f"allattn-{self.vocab.level}-{len(self.vocab)}"


def _batch_size(value: int | str | None) -> int:
    """The harness's --batch_size: a number, or "auto" (not measured here: 8)."""
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return 8
    try:
        size = int(value)
    except ValueError:
        raise ConfigError(f"batch_size={value!r} is not a number") from None
    if size < 1:
        raise ConfigError(f"batch_size={size} must be positive")
    return size


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is when it writes (a caller may swap it, as tests do)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """The harness's command line with the `allattn` model registered (`--model allattn` is
    added when no model is named)."""
    from lm_eval.__main__ import cli_evaluate
    from lm_eval.utils import setup_logging

    setup_logging()  # the harness's log handler, made once per process with the stderr of then
    for handler in logging.getLogger("lm_eval").handlers:
        if type(handler) is logging.StreamHandler:
            handler.stream = _CurrentStderr()
    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in args and not any(a.startswith("--model=") for a in args):
        args = ["--model", "allattn", *args]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
