"""Checkpoints: round trip, atomic writes, one-line errors."""

from __future__ import annotations

import pytest
import torch

from allattn import AllAttentionLM, ModelConfig, checkpoint
from allattn.checkpoint import CheckpointError
from allattn.cli import main
from allattn.data import Vocabulary

CFG = ModelConfig(vocab_size=5, d_model=8, n_heads=2, n_layers=1, n_persistent=3, attn_span=16)
VOCAB = Vocabulary((*tuple("abc\n"), "<eos>"), "char")


def test_round_trip(tmp_path):
    model = AllAttentionLM(CFG)
    path = tmp_path / "sub" / "m.safetensors"
    checkpoint.save(path, model, vocab=VOCAB, meta={"step": 7})
    loaded, ckpt = checkpoint.load_model(path)
    assert ckpt.config == CFG and ckpt.vocab == VOCAB and ckpt.meta == {"step": 7}
    assert checkpoint.load_meta(path) == {"step": 7}  # from the header alone
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)
    assert not loaded.training
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no temp files left


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, AllAttentionLM(CFG))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        checkpoint.save(path, AllAttentionLM(CFG), meta={"bad": object()})
    assert path.read_bytes() == before
    with pytest.raises(CheckpointError, match="vocabulary has 5 tokens, the model 6"):
        checkpoint.save(path, AllAttentionLM(CFG.replace(vocab_size=6)), vocab=VOCAB)
    assert path.read_bytes() == before


def test_bad_files_give_one_line_errors(tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    checkpoint.save(good, AllAttentionLM(CFG))
    data = good.read_bytes()
    cases = {
        "missing.safetensors": None,
        "empty.safetensors": b"",
        "truncated.safetensors": data[: len(data) // 2],
        "text.safetensors": b"hello world, this is not a checkpoint",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError):
            checkpoint.load(path)
        if name != "truncated.safetensors":  # its header is intact; only tensors are cut
            with pytest.raises(CheckpointError):
                checkpoint.load_meta(path)
        assert main(["info", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and name in err


def test_weights_that_do_not_match_the_config_are_rejected(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, AllAttentionLM(CFG))
    ckpt = checkpoint.load(path)
    ckpt.config = CFG.replace(n_persistent=4)
    with pytest.raises(CheckpointError, match="has shape"):
        ckpt.build_model()
    ckpt.config = CFG.replace(n_layers=2)
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.build_model()


def test_training_state_round_trip(tmp_path):
    model = AllAttentionLM(CFG)
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    state = {
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "caches": [torch.randn(2, 3, 8), torch.randn(2, 5, 8)],
        "pos": 17,
        "nested": {"best": float("inf"), "flag": True, "none": None, "pair": (1, 2.5)},
    }
    path = tmp_path / "m.safetensors"
    checkpoint.save(path, model, state=state)
    loaded = checkpoint.load(path).state
    assert loaded["pos"] == 17 and loaded["nested"] == {
        "best": float("inf"),
        "flag": True,
        "none": None,
        "pair": [1, 2.5],
    }
    assert torch.equal(loaded["rng"], state["rng"])
    assert all(torch.equal(a, b) for a, b in zip(loaded["caches"], state["caches"], strict=True))
    twin = torch.optim.Adam(model.parameters())
    twin.load_state_dict(loaded["optimizer"])  # int keys and param groups survive
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(twin.state_dict()["state"][0][key], value)
    with pytest.raises(TypeError, match="cannot store a object"):
        checkpoint.save(path, model, state={"x": object()})
    assert checkpoint.load(path).state["pos"] == 17  # the failed save left the file alone


def test_checkpoints_written_before_the_runtime_section_still_load(tmp_path):
    """Before 0.2 the run config sat in `meta`, with the kernel in [model] and the device and
    precision in [train]; such files load with those fields in [runtime]."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    from allattn.config import RunConfig

    path = tmp_path / "old.safetensors"
    run = RunConfig().to_dict()
    run.pop("runtime")
    run["model"]["attn_impl"] = "reference"
    run["train"] |= {"device": "cpu", "dtype": "float32"}  # where and as older runs wrote it
    checkpoint.save(path, AllAttentionLM(CFG), meta={"step": 3})
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    metadata["config"] = json.dumps({**json.loads(metadata["config"]), "attn_impl": "auto"})
    metadata["meta"] = json.dumps({"step": 3, "run_config": run})
    metadata["version"] = "1"  # version 1 files had no checksum
    del metadata["checksum"]
    save_file(load_file(str(path)), str(path), metadata=metadata)
    ckpt = checkpoint.load(path)
    assert ckpt.meta == {"step": 3} and ckpt.config == CFG
    assert ckpt.run_config is not None and ckpt.run_config.runtime.attn_impl == "reference"
    assert ckpt.run_config.runtime.device == "cpu"
    assert checkpoint.load_run_config(path) == ckpt.run_config
