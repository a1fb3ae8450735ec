"""`--runtime.compile`: torch.compile of the model computes what the eager model computes."""

from __future__ import annotations

import pytest
import torch
from test_attention_fast import (
    BF16_TOLERANCE,
    BF16_Z_TOLERANCE,
    CASES,
    problem,
    relative_error,
    run,
    run_bf16,
)  # fmt: skip

from allattn import attention, runtime
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


@pytest.fixture
def fused():
    """The chunked kernel with its compiled elementwise functions, for this test only."""
    attention.fuse_elementwise(True)
    yield
    attention.fuse_elementwise(False)


def test_compiled_float32_equals_eager(fused):
    torch.manual_seed(0)
    eager = AllAttentionLM(CONFIG)
    compiled = AllAttentionLM(CONFIG)
    compiled.load_state_dict(eager.state_dict())
    chosen = runtime.resolve(RuntimeConfig(device="cpu", compile=True))
    chosen.prepare(compiled)  # compiles the model and fuses the kernel's elementwise work
    assert attention._FUSED
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


def test_a_missing_compiler_is_one_line_and_exit_2(tmp_path, capsys):
    from torch._inductor import config as inductor_config

    run = tmp_path / "run"
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-c++"))}):
        with pytest.raises(runtime.ConfigError, match=r"needs a C\+\+ compiler"):
            runtime.resolve(RuntimeConfig(device="cpu", compile=True))
        assert main(["train", "--out", str(run), "--runtime.compile", "true"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a C++ compiler" in err, err
    assert not run.exists()


def chunked(inputs, upstream, ramp, *, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return run(inputs, upstream, ramp, chunk=16, dropout=dropout, training=dropout > 0)


@pytest.mark.parametrize(
    "name,dropout",
    [("span, memory, partial spans", 0.0), ("span, memory, partial spans", 0.3),
     ("span, no memory", 0.0), ("no span, memory", 0.3), ("no span, no memory", 0.0)],
)  # fmt: skip
def test_fused_elementwise_float64_equals_the_eager_kernel(name, dropout):
    """The same function, the same dropout draws: the fused kernel against the eager one."""
    case = CASES[name]
    inputs, upstream, ramp = problem(2, 32, 48, 3, 8, case["n_mem"], case["z"], 8, torch.float64)
    eager_out, eager_grads = chunked(inputs, upstream, ramp, dropout=dropout)
    attention.fuse_elementwise(True)
    try:
        out, grads = chunked(inputs, upstream, ramp, dropout=dropout)
    finally:
        attention.fuse_elementwise(False)
    assert relative_error(out, eager_out) <= 1e-12
    for key, grad in grads.items():
        assert relative_error(grad, eager_grads[key]) <= 1e-12, key


def test_fused_elementwise_bfloat16_against_float64(fused):
    case = CASES["span, memory, partial spans"]
    inputs, upstream, ramp = problem(2, 64, 96, 3, 16, case["n_mem"], case["z"], 16, torch.float64)
    exact, exact_grads = run(inputs, upstream, ramp, chunk=16)
    out, grads = run_bf16(inputs, upstream, ramp, "chunked")
    assert relative_error(out, exact) <= BF16_TOLERANCE
    for key, grad in grads.items():
        error = relative_error(grad, exact_grads[key])
        assert error <= (BF16_Z_TOLERANCE if key == "z" else BF16_TOLERANCE), (key, error)
