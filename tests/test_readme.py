"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from allattn import checkpoint
from allattn.config import ModelConfig
from allattn.data import Vocabulary
from allattn.model import AllAttentionLM

README = Path(__file__).parent.parent / "README.md"


def python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"README has {len(found)} python examples with {containing!r}"
    return found[0]


def test_readme_library_example_runs():
    namespace: dict = {}
    exec(python_block("AllAttentionLayer(cfg)"), namespace)
    h, cache = namespace["h"], namespace["cache"]
    assert h.shape == (2, 32, 128) and cache.shape[0] == 2
    assert namespace["out"].loss.ndim == 0


def test_readme_generation_example_runs(tmp_path, monkeypatch, capsys):
    vocab = Vocabulary(tuple("\nabcdefgh RMEO:"), "char")
    config = ModelConfig(vocab_size=len(vocab), d_model=32, n_heads=4, n_layers=2, attn_span=64)
    torch.manual_seed(0)
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    checkpoint.save(tmp_path / "runs/demo/best.safetensors", AllAttentionLM(config), vocab=vocab)
    monkeypatch.chdir(tmp_path)
    exec(python_block("generate.stream"), {})
    assert len(capsys.readouterr().out) == 200
