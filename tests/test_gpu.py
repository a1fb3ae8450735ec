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


if __name__ == "__main__":
    for check in (test_cuda_float32_matches_cpu_float64, test_bf16_autocast_forward_backward):
        check()
        print(f"ok  {check.__name__}")
