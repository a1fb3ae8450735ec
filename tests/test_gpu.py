"""CUDA: float32 on the GPU equals float64 on the CPU; bf16 autocast runs (skipped without CUDA)."""

from __future__ import annotations

import torch

from allattn import AllAttentionLM, ModelConfig

try:
    import pytest

    pytestmark = pytest.mark.gpu
except ImportError:  # GPU machines may lack pytest: `python3 tests/test_gpu.py` runs the checks
    pass

CFG = ModelConfig(
    vocab_size=50, d_model=64, n_heads=4, n_layers=2, n_persistent=32, attn_span=192, span_ramp=8
)


def test_cuda_float32_matches_cpu_float64():
    torch.manual_seed(0)
    cpu = AllAttentionLM(CFG).double()
    with torch.no_grad():
        cpu.layers[0].attn.span.z.fill_(0.1)  # trimmed layer
        cpu.layers[1].attn.span.z.fill_(0.7)
    gpu = AllAttentionLM(CFG).cuda()
    gpu.load_state_dict({k: v.float() for k, v in cpu.state_dict().items()})
    seq = torch.randint(0, 50, (2, 3, 33))
    cache_cpu, cache_gpu = cpu.init_cache(2), gpu.init_cache(2)
    for block in seq.unbind(1):
        a = cpu(block[:, :-1], block[:, 1:], cache_cpu)
        b = gpu(block[:, :-1].cuda(), block[:, 1:].cuda(), cache_gpu)
        a.loss.backward()
        b.loss.backward()
        cache_cpu, cache_gpu = a.cache, b.cache
        torch.testing.assert_close(b.logprobs.double().cpu(), a.logprobs, rtol=0, atol=1e-4)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters(), strict=True):
        torch.testing.assert_close(q.grad.double().cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_forward_backward():
    model = AllAttentionLM(CFG).cuda()
    seq = torch.randint(0, 50, (4, 129), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(seq[:, :-1], seq[:, 1:])
    assert out.logprobs.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_flex_float32_on_cuda_matches_the_float64_reference():
    """Outputs and every gradient of `--runtime.attn_impl flex` (compiled, float32) against the
    dense kernel in float64 on the CPU with renorm_eps 0; z * S is not an integer, so no key
    has a span mask of exactly 0 (where flex gives z no gradient)."""
    from allattn.attention import attend

    g = torch.Generator().manual_seed(0)
    shapes = {"q": (2, 4, 96, 16), "k": (2, 4, 256, 16), "v": (2, 4, 256, 16), "pos": (160, 16),
              "mk": (4, 8, 16), "mv": (4, 8, 16)}  # fmt: skip
    exact = {
        n: torch.randn(*shape, generator=g, dtype=torch.float64) for n, shape in shapes.items()
    }
    exact["z"] = torch.tensor([0.123, 0.456, 0.789, 0.901], dtype=torch.float64)
    upstream = torch.randn(2, 4, 96, 16, generator=g, dtype=torch.float64)
    runs = []
    for impl, device, dtype in (
        ("reference", "cpu", torch.float64),
        ("flex", "cuda", torch.float32),
    ):
        t = {n: x.to(device, dtype).requires_grad_() for n, x in exact.items()}
        distance = torch.arange(160, device=device)
        mask = ((t["z"][:, None] * 160 - distance) / 16 + 1).clamp(0, 1)
        out = attend(t["q"], t["k"], t["v"], t["pos"], span_mask=mask, mem_key=t["mk"],
                     mem_val=t["mv"], renorm_eps=0.0, impl=impl)  # fmt: skip
        (out * upstream.to(device, dtype)).sum().backward()
        runs.append([out.detach()] + [t[n].grad for n in exact])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b.double().cpu(), a, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    checks = (
        test_cuda_float32_matches_cpu_float64,
        test_bf16_autocast_forward_backward,
        test_flex_float32_on_cuda_matches_the_float64_reference,
    )
    for check in checks:
        check()
        print(f"ok  {check.__name__}")
