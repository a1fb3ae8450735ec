"""Hub directories: save/load round trips give the same distribution; a repository loads from
the Hugging Face cache offline; push uploads what loads; every bad directory is a one-line
error; `export-hf` of a trained run writes a card with its size and test result."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_train import TEXT, small_config

from allattn import AllAttentionLM, checkpoint, hub, train
from allattn.config import ModelConfig
from allattn.data import EOS, Vocabulary, char_corpus
from allattn.evaluate import EvalConfig
from allattn.evaluate import run as run_evaluation

CHAR_VOCAB = Vocabulary((*"abcdefg", EOS), "char")
WORD_VOCAB = Vocabulary(
    ("the", "a", "cat", "dog", "sat", "ran", "on", "mat", "log", "big", "small", EOS), "word"
)


def char_model() -> AllAttentionLM:
    config = ModelConfig(
        vocab_size=len(CHAR_VOCAB), d_model=16, n_heads=2, n_layers=2, n_persistent=4,
        attn_span=16, span_ramp=4, span_init=0.5,
    )  # fmt: skip
    return seeded(config)


def word_model() -> AllAttentionLM:
    config = ModelConfig(
        vocab_size=len(WORD_VOCAB), d_model=16, n_heads=2, n_layers=2, n_persistent=4,
        attn_span=16, span_ramp=4, span_init=0.5, adaptive_io=True, adaptive_cutoffs=(4, 8),
        adaptive_div=2,
    )  # fmt: skip
    return seeded(config)


def seeded(config: ModelConfig) -> AllAttentionLM:
    """The same model for the same config, every weight moved off its initial value (norms not
    1, spans not span_init), so a weight that is not saved or not loaded changes the output."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AllAttentionLM(config)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.rand_like(p))
    return model.eval()


def logprobs(model: AllAttentionLM) -> torch.Tensor:
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        out = model(tokens).logprobs
    assert out is not None
    return out


@pytest.mark.parametrize("make,vocab", [(char_model, CHAR_VOCAB), (word_model, WORD_VOCAB)])
def test_round_trip_gives_the_same_distribution(tmp_path, make, vocab):
    model = make()
    directory = hub.save_pretrained(model, tmp_path / "hub", vocab=vocab)
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "vocab.json",
    ]  # fmt: skip
    loaded = hub.from_pretrained(directory)
    assert not loaded.model.training and loaded.vocab == vocab and loaded.path == directory
    assert loaded.model.config == model.config
    assert torch.equal(logprobs(loaded.model), logprobs(model))
    info = json.loads((directory / "config.json").read_text())
    assert info["format"] == "allattn-hub" and info["format_version"] == hub.VERSION
    assert info["library_name"] == "allattn" and info["allattn_version"]
    assert info["vocab"] == {"level": vocab.level, "size": len(vocab)}
    assert set(info["sha256"]) == {"model.safetensors", "vocab.json"}
    with (directory / "model.safetensors").open("rb") as f:  # plain names, no "model." prefix
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert set(header) - {"__metadata__"} == set(model.state_dict())


def test_model_methods_and_a_model_without_vocabulary(tmp_path):
    model = char_model()
    model.save_pretrained(tmp_path / "hub")
    assert not (tmp_path / "hub" / "vocab.json").exists()
    loaded = AllAttentionLM.from_pretrained(tmp_path / "hub")
    assert isinstance(loaded, AllAttentionLM)
    assert torch.equal(logprobs(loaded), logprobs(model))
    assert hub.from_pretrained(tmp_path / "hub").vocab is None
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "none stored" in card and "No evaluation results are recorded" in card


def test_writes_only_where_it_may(tmp_path):
    model = char_model()
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    with pytest.raises(hub.HubError, match="not an allattn Hub directory; refusing") as error:
        hub.save_pretrained(model, foreign)
    assert one_line(error) and sorted(p.name for p in foreign.iterdir()) == ["todo.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(hub.HubError, match="is not a directory"):
        hub.save_pretrained(model, tmp_path / "file")
    # An allattn Hub directory is replaced, and a vocabulary it no longer has goes with it.
    hub.save_pretrained(model, tmp_path / "hub", vocab=CHAR_VOCAB)
    hub.save_pretrained(model, tmp_path / "hub")
    assert hub.from_pretrained(tmp_path / "hub").vocab is None
    assert not (tmp_path / "hub" / "vocab.json").exists()
    with pytest.raises(hub.HubError, match="already holds an allattn Hub directory"):
        hub.save_pretrained(model, tmp_path / "hub", overwrite=False)
    with torch.no_grad():
        model.pos_emb[0, 0] = float("inf")
    with pytest.raises(hub.HubError, match="the model: weight pos_emb holds NaN or infinite"):
        hub.save_pretrained(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_the_card_has_valid_front_matter_and_only_known_facts(tmp_path):
    model = word_model()
    hub.save_pretrained(
        model, tmp_path / "hub", vocab=WORD_VOCAB, step=7, source="best.safetensors"
    )
    text = (tmp_path / "hub" / "README.md").read_text()
    assert text.startswith("---\nlibrary_name: allattn\n")
    assert f"Parameters: {model.num_parameters():,}" in text
    assert "word level, 12 tokens (adaptive input and softmax)" in text
    assert "step 7, the run's best by its validation estimate" in text
    assert "arXiv:1907.01470" in text and "| adaptive_cutoffs | `[4, 8]` |" in text
    huggingface_hub = pytest.importorskip("huggingface_hub")
    card = huggingface_hub.ModelCard(text)
    assert card.data.library_name == "allattn" and "all-attention" in card.data.tags
    assert card.data.pipeline_tag == "text-generation"


# --- from the Hub, offline -------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline Hugging Face cache holding owner/name at `main` (what a download leaves)."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    repo = cache / "models--owner--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    hub.save_pretrained(char_model(), repo / "snapshots" / COMMIT, vocab=CHAR_VOCAB)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return repo


def test_a_repository_loads_from_the_cache_offline(hf_cache):
    loaded = hub.from_pretrained("owner/name")
    assert loaded.path == hf_cache / "snapshots" / COMMIT and loaded.vocab == CHAR_VOCAB
    assert torch.equal(logprobs(loaded.model), logprobs(char_model()))
    assert hub.from_pretrained("owner/name", revision="main").vocab == CHAR_VOCAB
    assert torch.equal(
        logprobs(AllAttentionLM.from_pretrained("owner/name")), logprobs(char_model())
    )
    with pytest.raises(hub.HubError, match="not in the Hugging Face cache") as error:
        hub.from_pretrained("owner/missing")
    assert one_line(error).startswith("owner/missing is not a local directory")
    with pytest.raises(hub.HubError, match="neither a local directory nor a Hub repository id"):
        hub.from_pretrained("runs/no/such-dir")


def test_a_repository_needs_the_hub_extra(tmp_path, hide_package, monkeypatch):
    hub.save_pretrained(char_model(), tmp_path / "hub", vocab=CHAR_VOCAB)
    hide_package("huggingface_hub")
    monkeypatch.chdir(tmp_path)
    assert hub.from_pretrained("hub").vocab == CHAR_VOCAB  # a local directory needs no extra
    for call in (
        lambda: hub.from_pretrained("owner/name"),
        lambda: hub.push_to_hub("hub", "owner/name"),
    ):
        with pytest.raises(
            hub.HubError, match=r"needs huggingface_hub: pip install 'allattn\[hub\]'"
        ) as error:
            call()
        assert one_line(error)


# --- push, with the Hub's calls recorded -------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        files = sorted(p.name for p in folder.iterdir())  # what would be uploaded, while it exists
        card = (folder / "README.md").read_text()
        calls.append(("upload_folder", kwargs, files, hub.from_pretrained(folder), card))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_a_model_creates_the_repository_and_uploads_its_directory(hub_calls):
    model = char_model()
    url = model.push_to_hub("owner/name", vocab=CHAR_VOCAB, private=True, token="hf_x")
    assert url == "https://huggingface.co/owner/name"
    (_, repo_id, create), (_, upload, files, loaded, card) = hub_calls
    assert repo_id == "owner/name" and create == {
        "private": True,
        "token": "hf_x",
        "exist_ok": True,
    }
    assert upload["repo_id"] == "owner/name" and upload["token"] == "hf_x"
    assert upload["commit_message"] == hub.COMMIT_MESSAGE
    assert files == sorted(upload["allow_patterns"]) == sorted(hub.FILES)
    assert loaded.vocab == CHAR_VOCAB and torch.equal(logprobs(loaded.model), logprobs(model))
    assert 'hub.from_pretrained("owner/name")' in card


def test_push_a_directory_only_if_it_loads(tmp_path, hub_calls):
    directory = hub.save_pretrained(char_model(), tmp_path / "hub")
    hub.push_to_hub(directory, "owner/name", commit_message="v1")
    assert hub_calls[1][1]["commit_message"] == "v1"
    assert hub_calls[1][1]["allow_patterns"] == ["config.json", "model.safetensors", "README.md"]
    hub_calls.clear()
    flip_byte(directory / "model.safetensors", -4)
    with pytest.raises(hub.HubError, match="checksum"):
        hub.push_to_hub(directory, "owner/name")
    assert hub_calls == []


# --- errors --------------------------------------------------------------------------------------


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def edit_config(directory, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def save_weights(directory, weights) -> None:
    """Replace model.safetensors, with its checksum in config.json (a well-formed file)."""
    from safetensors.torch import save

    data = save(weights)
    (directory / "model.safetensors").write_bytes(data)
    info = json.loads((directory / "config.json").read_text())
    info["sha256"]["model.safetensors"] = hub._sha256(data)
    (directory / "config.json").write_text(json.dumps(info))


def nan_weight(directory) -> None:
    weights = hub.from_pretrained(directory).model.state_dict()
    weights["pos_emb"] = weights["pos_emb"].clone().fill_(float("nan"))
    save_weights(directory, weights)


def missing_weight(directory) -> None:
    weights = dict(hub.from_pretrained(directory).model.state_dict())
    del weights["pos_emb"]
    save_weights(directory, weights)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda d: (d / "config.json").unlink(), "has no config.json, so it is not an allattn"),
        (lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
        (lambda d: (d / "vocab.json").unlink(), "has no vocab.json, which its config.json lists"),
        (
            lambda d: flip_byte(d / "model.safetensors", -4),
            "model.safetensors does not match its checksum",
        ),
        (lambda d: flip_byte(d / "vocab.json", 12), "vocab.json"),
        (
            lambda d: (d / "model.safetensors").write_bytes(
                (d / "model.safetensors").read_bytes()[:-100]
            ),
            "model.safetensors is corrupt or truncated",
        ),
        (lambda d: (d / "config.json").write_text("{"), "config.json is not valid JSON"),
        (lambda d: edit_config(d, format="other"), r"not an allattn model's \(format 'other'"),
        (lambda d: (d / "config.json").write_text('{"model_type": "gpt2"}'), "format None"),
        (
            lambda d: edit_config(d, format_version=2, allattn_version="9.0"),
            r"by allattn 9.0 in Hub format version 2; this allattn \(.*\) reads version 1: upgrade",
        ),
        (lambda d: edit_config(d, format_version="1"), "unknown format version '1'"),
        (lambda d: edit_config(d, format_version=0), "unknown format version 0"),
        (lambda d: edit_config(d, sha256={}), "lacks the checksum of model.safetensors"),
        (lambda d: edit_config(d, model={"n_layers": "two"}), "bad config .--model.n_layers"),
        (lambda d: edit_config(d, step=-1), "bad step -1"),
        (lambda d: edit_config(d, vocab=None) or nan_weight(d), "weight pos_emb holds NaN"),
        (lambda d: edit_config(d, vocab=None) or missing_weight(d), r"missing \['pos_emb'\]"),
    ],
)
def test_bad_directories_are_one_line_errors(tmp_path, damage, message):
    directory = hub.save_pretrained(char_model(), tmp_path / "hub", vocab=CHAR_VOCAB)
    damage(directory)
    with pytest.raises(hub.HubError, match=message) as error:
        hub.from_pretrained(directory)
    assert one_line(error).startswith(str(directory))


def test_a_model_config_that_does_not_fit_the_weights(tmp_path):
    directory = hub.save_pretrained(char_model(), tmp_path / "hub")
    info = json.loads((directory / "config.json").read_text())
    edit_config(directory, model=info["model"] | {"attn_span": 32})
    with pytest.raises(
        hub.HubError, match=r"pos_emb has shape \(16, 8\), the config needs \(32, 8\)"
    ) as error:
        hub.from_pretrained(directory)
    assert one_line(error)


def test_verify_false_skips_only_the_checksum(tmp_path):
    directory = hub.save_pretrained(char_model(), tmp_path / "hub")
    flip_byte(directory / "model.safetensors", -4)
    with pytest.raises(hub.HubError, match="checksum"):
        hub.from_pretrained(directory)
    assert not torch.equal(
        logprobs(hub.from_pretrained(directory, verify=False).model), logprobs(char_model())
    )


def test_local_paths_are_not_repository_ids(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(hub.HubError, match="is not a directory"):
        hub.from_pretrained(tmp_path / "file")
    with pytest.raises(hub.HubError, match="is not a directory"):
        hub.from_pretrained(tmp_path / "missing")  # a Path is never a repository id
    directory = hub.save_pretrained(char_model(), tmp_path / "hub")
    with pytest.raises(hub.HubError, match="a revision applies to a Hub repository"):
        hub.from_pretrained(directory, revision="main")


# --- export-hf from a trained run ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    char_corpus(TEXT, (0.6, 0.2, 0.2), {"name": "test"}).save(root / "data")
    train.run(small_config(str(root / "data"), steps=4), root / "run", progress=False)
    return root / "run"


def test_export_of_a_trained_run(trained_run, tmp_path):
    out = hub.run(
        hub.ExportHFOptions(run=str(trained_run), out=str(tmp_path / "hf"), repo_id="me/tiny")
    )
    model, ckpt = checkpoint.load_model(trained_run)
    loaded = hub.from_pretrained(out)
    assert torch.equal(logprobs(loaded.model), logprobs(model))
    assert loaded.vocab == ckpt.vocab and loaded.run_config == ckpt.run_config
    assert loaded.info["step"] == 4 and loaded.info["checkpoint"] == ckpt.path.name
    card = (out / "README.md").read_text()
    assert f"Parameters: {model.num_parameters():,}" in card
    result = run_evaluation(EvalConfig(checkpoint=str(trained_run), split="test"))
    value = result.measure.describe(result.loss_nats)
    assert f"| test | {result.tokens:,} | {result.loss_nats:.4f} | {value} |" in card
    assert f"allattn eval --checkpoint {ckpt.path} --split test" in card
    assert "[train]\ndata = " in card and 'hub.from_pretrained("me/tiny")' in card
    # The card's way to the command line: an allattn checkpoint with the same weights.
    loaded.save_checkpoint(tmp_path / "m.safetensors")
    again = checkpoint.load(tmp_path / "m.safetensors")
    assert again.meta["step"] == 4 and again.run_config == ckpt.run_config
    assert all(torch.equal(again.weights[k], v) for k, v in ckpt.weights.items())


def test_export_without_evaluation_or_data_and_where_it_may_write(trained_run, tmp_path):
    options = hub.ExportHFOptions(run=str(trained_run), out=str(tmp_path / "hf"), evaluate=False)
    card = (hub.run(options) / "README.md").read_text()
    assert "No evaluation was run: the export was asked not to (--no-evaluate)." in card
    with pytest.raises(
        hub.HubError, match="already holds an allattn Hub directory; pass --force"
    ) as error:
        hub.run(options)
    assert one_line(error)
    # A checkpoint whose run's data is gone: the card says so.
    ckpt = checkpoint.load(trained_run)
    run_config = ckpt.run_config.replace(
        train=ckpt.run_config.train.replace(data=str(tmp_path / "gone"))
    )
    moved = tmp_path / "moved.safetensors"
    checkpoint.save(
        moved, ckpt.build_model(), vocab=ckpt.vocab, meta=ckpt.meta, run_config=run_config
    )
    hub.run(hub.ExportHFOptions(run=str(moved), out=str(tmp_path / "hf"), force=True))
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "No evaluation was run: the run's test data was not available (data directory" in card
    assert hub.from_pretrained(tmp_path / "hf").info["checkpoint"] == "moved.safetensors"
    # Never into another directory, even with --force; nothing is evaluated before refusing.
    shutil.rmtree(tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("")
    forced = hub.ExportHFOptions(run=str(trained_run), out=str(tmp_path / "hf"), force=True)
    with pytest.raises(hub.HubError, match="not an allattn Hub directory"):
        hub.run(forced)
    with pytest.raises(checkpoint.CheckpointError, match="holds no best checkpoint"):
        hub.run(hub.ExportHFOptions(run=str(tmp_path), out=str(tmp_path / "out")))


def test_export_hf_command(trained_run, tmp_path, capsys):
    from allattn.cli import main

    out = tmp_path / "hf"
    assert main(["export-hf", str(trained_run), str(out), "--no-evaluate"]) == 0
    assert "README.md, config.json, model.safetensors, vocab.json" in capsys.readouterr().out
    assert hub.from_pretrained(out).vocab is not None

    def error(*argv):
        assert main(["export-hf", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "does not exist" in error(str(tmp_path / "nothing"), str(tmp_path / "x"))
    assert "--force" in error(str(trained_run), str(out))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    error(str(trained_run), str(tmp_path / "mine"), "--force")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_commands_read_a_hub_directory_as_a_checkpoint(trained_run, tmp_path, capsys):
    from allattn.cli import main

    out = tmp_path / "hf"
    hub.export_hf(trained_run, out, evaluate=False)
    ckpt = checkpoint.load(out)
    original = checkpoint.load(trained_run)
    assert ckpt.config == original.config and ckpt.vocab == original.vocab
    assert ckpt.meta["step"] == original.meta["step"] and ckpt.run_config == original.run_config
    assert all(torch.equal(ckpt.weights[k], original.weights[k]) for k in original.weights)
    assert checkpoint.load_model_config(out) == original.config
    assert main(["eval", "--checkpoint", str(out), "--json", "--quiet"]) == 0
    from_hub = json.loads(capsys.readouterr().out)
    assert main(["eval", "--checkpoint", str(trained_run), "--json", "--quiet"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert from_hub["loss_nats"] == from_run["loss_nats"]
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "5", "--seed", "0"]) == 0
    (out / "model.safetensors").write_bytes(b"broken")
    assert main(["eval", "--checkpoint", str(out)]) == 2
    assert "corrupt or truncated" in capsys.readouterr().err
