"""The optimisers follow DESIGN §3 exactly: per-parameter step clipping, warm-up, global clip."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from allattn.config import ConfigError, OptimConfig
from allattn.optim import Optimizer


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)) for _ in range(3)]


def gradients(step: int, ps):
    g = torch.Generator().manual_seed(100 + step)
    # Parameter 0 has big gradients (clipped), 1 small ones (not clipped), 2 alternates.
    scales = [1.0, 1e-3, 1.0 if step % 2 else 1e-3]
    return [
        torch.randn(p.shape, generator=g, dtype=p.dtype) * s
        for p, s in zip(ps, scales, strict=True)
    ]


def test_adagrad_clips_the_step_not_the_accumulator():
    cfg = OptimConfig(optimizer="adagrad", lr=0.07, warmup_steps=3, grad_clip=0.03)
    ps = params()
    expected = [p.detach().clone() for p in ps]
    sums = [torch.zeros_like(p) for p in ps]
    opt = Optimizer(ps, cfg)
    for t in range(1, 7):
        grads = gradients(t, ps)
        for p, g in zip(ps, grads, strict=True):
            p.grad = g.clone()
        stats = opt.step()
        lr_t = 0.07 * min(1.0, t / 3)
        assert stats["lr"] == lr_t
        for i, g in enumerate(grads):
            norm = g.norm().item()
            lr_p = lr_t * 0.03 / (norm + 1e-10) if norm > 0.03 else lr_t
            sums[i] += g * g  # unclipped
            expected[i] -= lr_p * g / (sums[i].sqrt() + 1e-10)
        for p, e in zip(ps, expected, strict=True):
            torch.testing.assert_close(p.detach(), e, rtol=1e-14, atol=1e-15)
    assert any(g.norm() > 0.03 for g in gradients(1, ps))  # clipping was really exercised
    assert any(g.norm() < 0.03 for g in gradients(1, ps))


def test_first_update_uses_lr_over_warmup():
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = Optimizer([p], OptimConfig(lr=0.07, warmup_steps=32000, grad_clip=0.0))
    p.grad = torch.tensor([2.0], dtype=torch.float64)
    opt.step()
    # accumulator 0 + g^2: the step is lr_1 * g / (|g| + 1e-10) = lr / warmup
    torch.testing.assert_close(p.detach(), torch.tensor([-0.07 / 32000], dtype=torch.float64))


def test_adam_with_global_norm_clipping():
    cfg = OptimConfig(optimizer="adam", lr=2.5e-4, warmup_steps=2, grad_clip=1.0)
    ps = params()
    twins = [nn.Parameter(p.detach().clone()) for p in ps]
    opt = Optimizer(ps, cfg)
    ref = torch.optim.Adam(twins, lr=2.5e-4, betas=(0.9, 0.999), eps=1e-8)
    for t in range(1, 5):
        grads = gradients(t, ps)
        total = math.sqrt(sum(g.pow(2).sum().item() for g in grads))
        scale = 1.0 / (total + 1e-6)
        assert scale < 1  # clipping active
        for p, q, g in zip(ps, twins, grads, strict=True):
            p.grad = g.clone()
            q.grad = g * scale
        stats = opt.step()
        assert stats["grad_norm"] == pytest.approx(total, rel=1e-12)
        for group in ref.param_groups:
            group["lr"] = 2.5e-4 * min(1.0, t / 2)
        ref.step()
        for p, q in zip(ps, twins, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_state_round_trip_continues_exactly(name):
    cfg = OptimConfig(optimizer=name, lr=0.05, warmup_steps=4, grad_clip=0.03)

    def run(ps, opt, steps):
        for t in steps:
            for p, g in zip(ps, gradients(t, ps), strict=True):
                p.grad = g
            opt.step()

    straight = params()
    run(straight, Optimizer(straight, cfg), range(1, 7))
    resumed = params()
    first = Optimizer(resumed, cfg)
    run(resumed, first, range(1, 4))
    second = Optimizer(resumed, cfg)
    second.load_state_dict(first.state_dict())
    run(resumed, second, range(4, 7))
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_fine_tuning_applies_a_new_lr_from_the_first_update():
    ps = params()
    opt = Optimizer(ps, OptimConfig(lr=0.07, warmup_steps=2))
    for t in (1, 2, 3):
        for p, g in zip(ps, gradients(t, ps), strict=True):
            p.grad = g
        opt.step()
    tuned = Optimizer(ps, OptimConfig(lr=0.007, warmup_steps=2))
    tuned.load_state_dict(opt.state_dict())
    for p, g in zip(ps, gradients(4, ps), strict=True):
        p.grad = g
    assert tuned.step()["lr"] == 0.007


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(optimizer="sgd"), r"--optim.optimizer \(sgd\) must be one of adagrad, adam"),
        (dict(lr=0.0), r"--optim.lr \(0.0\) must be > 0"),
        (dict(warmup_steps=-1), r"--optim.warmup_steps \(-1\)"),
        (dict(grad_clip=-0.1), r"--optim.grad_clip \(-0.1\) must be >= 0"),
    ],
)
def test_bad_optim_config(changes, message):
    with pytest.raises(ConfigError, match=message):
        OptimConfig(**changes)


@pytest.mark.parametrize("name", ["adagrad", "adam"])
def test_loss_scaling_takes_the_same_steps_and_skips_an_overflow(name):
    """fp16's loss scaling (here on the CPU, float32 parameters): the scaled gradients are
    unscaled before clipping, so the steps equal the unscaled optimiser's; an infinite gradient
    skips the update, halves the scale and does not advance warm-up; the state round-trips."""
    cfg = OptimConfig(optimizer=name, lr=0.05, warmup_steps=4, grad_clip=0.03)
    plain_ps = [nn.Parameter(p.detach().float()) for p in params()]
    scaled_ps = [nn.Parameter(p.detach().clone()) for p in plain_ps]
    plain = Optimizer(plain_ps, cfg)
    scaled = Optimizer(scaled_ps, cfg, loss_scaling=True, device="cpu")
    initial = scaled.loss_scale
    assert plain.loss_scale is None and initial == 2.0**16
    for t in range(1, 5):
        grads = [g.float() for g in gradients(t, plain_ps)]
        for p, q, g in zip(plain_ps, scaled_ps, grads, strict=True):
            p.grad = g.clone()
            q.grad = scaled.scale(g.clone())  # what backward from a scaled loss gives
        assert plain.step()["lr"] == scaled.step()["lr"]
        for p, q in zip(plain_ps, scaled_ps, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)
    before = [q.detach().clone() for q in scaled_ps]
    for q in scaled_ps:
        q.grad = torch.full_like(q, math.inf)
    stats = scaled.step()
    assert stats["skipped"] == 1.0 and scaled.updates == 4 and scaled.loss_scale == initial / 2
    assert all(torch.equal(a, q.detach()) for a, q in zip(before, scaled_ps, strict=True))
    again = Optimizer(scaled_ps, cfg, loss_scaling=True, device="cpu")
    again.load_state_dict(scaled.state_dict())
    assert again.loss_scale == initial / 2 and again.updates == 4
