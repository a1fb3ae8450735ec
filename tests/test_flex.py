"""The FlexAttention formulation (`--runtime.attn_impl flex`) computes the reference's function
without the + eps of the renormalisation; on the CPU PyTorch runs its forward only (eagerly), so
its backward is checked on CUDA (tests/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from test_attention_fast import BF16_TOLERANCE, CASES, problem, relative_error

from allattn import AllAttentionLM, ModelConfig
from allattn.attention import attend
from allattn.cli import main


def forward(inputs, ramp, impl, eps=1e-8, dtype=None):
    """The output of `impl` on the inputs of `problem` (in `dtype`, default theirs)."""
    t = {n: None if x is None else x.detach().to(dtype or x.dtype) for n, x in inputs.items()}
    mask = None
    if t["z"] is not None:
        context = t["pos"].size(0)
        distance_minus_one = torch.arange(context, dtype=t["z"].dtype)
        mask = ((t["z"][:, None] * context - distance_minus_one) / ramp + 1).clamp(0, 1)
    return attend(
        t["q"], t["k"], t["v"], t["pos"], span_mask=mask, mem_key=t["mem_key"],
        mem_val=t["mem_val"], renorm_eps=eps, impl=impl,
    )  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_float64_equals_the_reference_without_eps(name):
    case = CASES[name]
    inputs, _, ramp = problem(2, 70, 96, 3, 16, case["n_mem"], case["z"], 16, torch.float64)
    exact = forward(inputs, ramp, "reference", eps=0.0)
    torch.testing.assert_close(forward(inputs, ramp, "flex"), exact, rtol=0, atol=1e-12)
    # with the original's + 1e-8, the difference is that of the eps (DESIGN §2.4)
    assert relative_error(forward(inputs, ramp, "flex"), forward(inputs, ramp, "reference")) < 1e-6


@pytest.mark.parametrize("name", CASES)
def test_bfloat16_autocast_against_float64(name):
    case = CASES[name]
    inputs, _, ramp = problem(2, 70, 96, 3, 16, case["n_mem"], case["z"], 16, torch.float64)
    exact = forward(inputs, ramp, "reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = forward(inputs, ramp, "flex", dtype=torch.float32)
    assert relative_error(out, exact) <= BF16_TOLERANCE


def test_the_model_evaluates_as_with_the_chunked_kernel():
    """Whole-model log-probabilities over two blocks (the cache carried), in evaluation."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=30, d_model=32, n_heads=4, n_layers=2, attn_span=48)
    model = AllAttentionLM(config).double().eval()
    with torch.no_grad():
        model.layers[0].attn.span.z.fill_(0.3)
        model.layers[1].attn.span.z.fill_(0.8)
    blocks = torch.randint(0, 30, (2, 2, 25)).unbind(1)
    results = {}
    for impl in ("chunked", "flex"):
        model.set_attn_impl(impl)
        cache, logprobs = model.init_cache(2), []
        with torch.no_grad():
            for block in blocks:
                out = model(block[:, :-1], block[:, 1:], cache)
                cache = out.cache
                logprobs.append(out.logprobs)
        results[impl] = torch.cat(logprobs, dim=1)
    assert relative_error(results["flex"], results["chunked"]) < 1e-6


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "flex trains on CUDA only"),
        (["--model.dropout", "0.1"], "flex has no attention dropout"),
    ],
)
def test_training_flex_where_it_cannot_run_is_refused_in_one_line(flags, message, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--out", str(run), "--runtime.attn_impl", "flex", "--train.steps", "1"]
    assert main([*argv, *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not run.exists()
