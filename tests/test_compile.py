"""`--runtime.compile`: torch.compile of the model computes what the eager model computes."""

from __future__ import annotations

import pytest
import torch

from allattn import runtime
from allattn.cli import main
from allattn.config import ModelConfig, RuntimeConfig
from allattn.model import AllAttentionLM

CONFIG = ModelConfig(
    vocab_size=37, d_model=32, n_heads=4, n_layers=2, n_persistent=8, attn_span=48,
    span_ramp=8, span_init=0.5, dropout=0.0, emb_dropout=0.0,
)  # fmt: skip


def loss_and_gradients(model: AllAttentionLM, steps: int = 2):
    """Losses and gradients of `steps` consecutive blocks (the caches carried between them)."""
    g = torch.Generator().manual_seed(1)
    cache = model.init_cache(3)
    results = []
    for _ in range(steps):
        x = torch.randint(0, CONFIG.vocab_size, (3, 24), generator=g)
        y = torch.randint(0, CONFIG.vocab_size, (3, 24), generator=g)
        out = model(x, y, cache)
        model.zero_grad()
        (out.loss + out.span_loss).backward()
        cache = out.cache
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((out.loss.detach(), grads))
    return results


def test_compiled_float32_equals_eager():
    torch.manual_seed(0)
    eager = AllAttentionLM(CONFIG)
    compiled = AllAttentionLM(CONFIG)
    compiled.load_state_dict(eager.state_dict())
    chosen = runtime.resolve(RuntimeConfig(device="cpu", compile=True))
    chosen.prepare(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # names unchanged
    worst = 0.0
    for (loss_e, grads_e), (loss_c, grads_c) in zip(
        loss_and_gradients(eager), loss_and_gradients(compiled), strict=True
    ):
        worst = max(worst, ((loss_c - loss_e).abs() / loss_e.abs()).item())
        for name, grad in grads_e.items():
            scale = grad.abs().max().clamp_min(1e-30)
            worst = max(worst, ((grads_c[name] - grad).abs().max() / scale).item())
    assert worst <= 1e-5, worst


def test_a_missing_compiler_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, str(tmp_path / "no-such-c++")))
    with pytest.raises(runtime.ConfigError, match="needs a C.. compiler"):
        runtime.resolve(RuntimeConfig(device="cpu", compile=True))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--runtime.compile", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a C++ compiler" in err, err
    assert not run.exists()
