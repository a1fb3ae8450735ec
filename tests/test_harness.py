"""The lm-evaluation-harness model `allattn` scores as the model's own evaluation does."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from allattn import AllAttentionLM, ModelConfig, checkpoint, generate
from allattn.cli import main
from allattn.data import Vocabulary

pytest.importorskip("lm_eval", reason="lm-evaluation-harness (the lm-eval extra) is missing")

from allattn.harness import AllAttentionHarnessLM, HarnessError

TEXT = "the quick brown fox jumps over the lazy dog.\n"
VOCAB = Vocabulary.from_tokens(TEXT, "char")
CFG = ModelConfig(
    vocab_size=len(VOCAB), d_model=16, n_heads=2, n_layers=2, n_persistent=4, attn_span=24
)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = AllAttentionLM(CFG.replace(span_ramp=4, span_init=0.5)).double()
    path = tmp_path_factory.mktemp("harness") / "m.safetensors"
    checkpoint.save(path, model, vocab=VOCAB)
    return path


@pytest.fixture(scope="module")
def lm(model_file):
    return AllAttentionHarnessLM(
        checkpoint=str(model_file), block_size=8, batch_size=3, precision="fp64"
    )


def request(*args):
    return SimpleNamespace(args=args)


def direct(model: AllAttentionLM, ids: list[int]) -> torch.Tensor:
    """log p of ids[1:] by one forward pass over the whole sequence (no blocks, no cache)."""
    x = torch.tensor([ids[:-1]])
    with torch.no_grad():
        return model(x, torch.tensor([ids[1:]])).target_logprobs[0]


def encode(text: str) -> list[int]:
    return [VOCAB.id(c) for c in text]


def test_loglikelihood_is_the_continuations_logprob(lm):
    newline = VOCAB.id("\n")
    pairs = [("the quick", " brown"), ("", "the"), ("over the lazy dog.\nthe quick brown", " fox")]
    results = lm.loglikelihood([request(*pair) for pair in pairs])
    for (context, continuation), (logprob, _) in zip(pairs, results, strict=True):
        ids = [newline, *encode(context + continuation)]
        expected = direct(lm.model, ids)[-len(continuation) :].sum().item()
        assert logprob == pytest.approx(expected, rel=1e-10)
    # Greedy: the continuation of greedy decoding is greedy, a changed last token is not.
    greedy = generate.sample(lm.model, VOCAB, "the quick", 4, generate.Sampling(temperature=0))
    other = greedy[:-1] + ("a" if greedy[-1] != "a" else "b")
    (_, is_greedy), (_, not_greedy) = lm.loglikelihood(
        [request("the quick", greedy), request("the quick", other)]
    )
    assert is_greedy and not not_greedy


def test_a_long_context_is_cut_to_the_receptive_field_exactly(lm):
    context = TEXT * 3  # 135 characters, more than the 2 x 24 the model can see
    assert lm.receptive_field <= 48 < len(context)
    ((logprob, _),) = lm.loglikelihood([request(context, "the")])
    ids = [VOCAB.id("\n"), *encode(context + "the")]
    assert logprob == pytest.approx(direct(lm.model, ids)[-3:].sum().item(), rel=1e-10)


def test_rolling_loglikelihood_carries_the_cache_across_the_document(lm):
    document = (TEXT * 4).strip()  # 179 characters: 23 blocks of 8
    (logprob,) = lm.loglikelihood_rolling([request(document)])
    ids = [VOCAB.id("\n"), *encode(document)]
    assert logprob == pytest.approx(direct(lm.model, ids).sum().item(), rel=1e-10)
    # Scored block by block without the cache, the score would differ.
    cold = sum(direct(lm.model, ids[p : p + 9]).sum().item() for p in range(0, len(ids) - 1, 8))
    assert abs(cold - logprob) > 1e-3


def test_generate_until_is_greedy_decoding_cut_at_a_stop_string(lm):
    full = generate.sample(lm.model, VOCAB, "the lazy", 30, generate.Sampling(temperature=0))
    (text,) = lm.generate_until([request("the lazy", {"max_gen_toks": 30})])
    assert text == full
    stop = full[3:5]
    (cut,) = lm.generate_until([request("the lazy", {"until": [stop], "max_gen_toks": 30})])
    assert cut == full[: full.index(stop)]


def test_word_level_unknown_words_become_unk(tmp_path):
    vocab = Vocabulary(("the", "cat", "<unk>", "<eos>"), "word")
    torch.manual_seed(0)
    model = AllAttentionLM(CFG.replace(vocab_size=4))
    path = tmp_path / "w.safetensors"
    checkpoint.save(path, model, vocab=vocab)
    lm = AllAttentionHarnessLM(checkpoint=str(path), block_size=4)
    assert lm.encode("the dog\ncat") == [0, 2, 3, 1]
    assert lm.prefix == 3  # <eos>: no newline token at word level


def test_requests_it_cannot_score_are_one_line_errors(model_file):
    lm = AllAttentionHarnessLM(checkpoint=str(model_file), block_size=8, max_length=20)
    with pytest.raises(HarnessError, match="longer than max_length=20"):
        lm.loglikelihood_rolling([request(TEXT)])
    with pytest.raises(HarnessError, match="longer than max_length=20"):
        lm.loglikelihood([request(TEXT, "the")])
    with pytest.raises(HarnessError, match="empty continuation"):
        lm.loglikelihood([request("the", "")])
    with pytest.raises(ValueError, match="character 'Z'"):
        lm.loglikelihood([request("the", " Zebra")])


def test_the_harness_runs_three_local_tasks(model_file, tmp_path, monkeypatch, capsys):
    """Through the harness's own evaluator: a rolling, a multiple-choice and a generation task,
    from a local JSON file (no network)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs.jsonl"
    rows = [
        {"page": "the lazy dog jumps over the fox.", "question": "the quick", "gold": 0},
        {"page": "a quick brown dog.\nthe fox.", "question": "the lazy", "gold": 1},
    ]
    docs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\ntest_split: test\n"
    )
    tasks = {
        "tiny_rolling": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{page}}"\nmetric_list:\n  - metric: bits_per_byte\n',
        "tiny_choice": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: [" brown", " dog"]\ndoc_to_target: "{{gold}}"\n'
        "metric_list:\n  - metric: acc\n",
        "tiny_gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
        'doc_to_target: " dog"\ngeneration_kwargs:\n  until: ["."]\n  max_gen_toks: 12\n'
        "metric_list:\n  - metric: exact_match\n",
    }
    for name, body in tasks.items():
        (tmp_path / f"{name}.yaml").write_text(f"task: {name}\n{common}{body}")
    out = tmp_path / "results"
    argv = [
        "lm-eval",
        "--model_args",
        f"checkpoint={model_file},block_size=8",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(tmp_path),
        "--output_path",
        str(out),
    ]
    assert main(argv) == 0
    (written,) = out.rglob("results_*.json")
    results = json.loads(written.read_text())["results"]
    # The rolling task's bits per byte from the model's own log-likelihood of each page.
    model, _ = checkpoint.load_model(model_file)
    nats = sum(-direct(model, [VOCAB.id("\n"), *encode(row["page"])]).sum().item() for row in rows)
    n_bytes = sum(len(row["page"].encode()) for row in rows)
    bits_per_byte = nats / n_bytes / np.log(2)
    assert results["tiny_rolling"]["bits_per_byte,none"] == pytest.approx(bits_per_byte)
    assert 0 <= results["tiny_choice"]["acc,none"] <= 1
    assert "exact_match,none" in results["tiny_gen"]


def test_the_command_line_errors_are_one_line(
    model_file, tmp_path, monkeypatch, capsys, hide_package
):
    def error(*model_args, tasks="tiny"):
        """The harness logs its progress to stderr; the error is the last line, alone."""
        argv = ["lm-eval", "--model_args", ",".join(model_args), "--tasks", tasks]
        assert main([*argv, "--include_path", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err and err.splitlines()[-1].startswith("allattn"), err
        return err.splitlines()[-1]

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"page": TEXT * 2}) + "\n")
    (tmp_path / "tiny.yaml").write_text(
        f"task: tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {docs}\n"
        'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{page}}"\nmetric_list:\n  - metric: bits_per_byte\n'
    )
    ckpt = f"checkpoint={model_file}"
    assert "does not exist" in error(f"checkpoint={tmp_path / 'missing.safetensors'}")
    assert "Tasks not found: nothing" in error(ckpt, tasks="nothing")
    assert "of 90 tokens is longer than max_length=50" in error(ckpt, "max_length=50")
    hide_package("lm_eval")
    assert "pip install 'allattn[lm-eval]'" in error(ckpt)
