"""Adaptive span: the mask convention, max span, trim length and cache size (DESIGN §2.4, §2.7)."""

from __future__ import annotations

import torch

from allattn import AdaptiveSpan


def span(n_heads=1, attn_span=16, ramp=4, z=(0.5,), dtype=torch.float32):
    s = AdaptiveSpan(n_heads, attn_span, ramp, 0.0).to(dtype)
    with torch.no_grad():
        s.z.copy_(torch.tensor(z, dtype=dtype))
    return s


def test_mask_uses_delta_minus_one():
    # z*S = 8, R = 4: m(delta) = clamp((8 - (delta - 1)) / 4 + 1, 0, 1)
    m = span().mask(16)[0].tolist()
    assert m[:9] == [1.0] * 9  # distances 1..9
    assert m[9:13] == [0.75, 0.5, 0.25, 0.0]  # distances 10..13
    assert m[13:] == [0.0] * 3


def test_mask_is_in_unit_interval_for_any_z():
    s = span(n_heads=5, attn_span=64, ramp=8, z=(-0.7, 0.0, 0.33, 1.0, 1.9))
    m = s.mask(64)
    assert m.min() >= 0 and m.max() <= 1
    assert m[0].max() == 0 and m[4].min() == 1


def test_clamp_keeps_z_in_unit_interval():
    s = span(n_heads=3, z=(-0.5, 0.3, 1.7))
    s.clamp_()
    assert s.z.tolist() == [0.0, torch.tensor(0.3).item(), 1.0]


def test_loss_has_a_gradient():
    s = span(n_heads=2, attn_span=100, z=(0.2, 0.4))
    loss = s.loss()
    torch.testing.assert_close(loss, torch.tensor(30.0))
    loss.backward()
    torch.testing.assert_close(s.z.grad, torch.tensor([50.0, 50.0]))


def test_initial_cache_of_long_spans_is_128_rows():
    for attn_span in (8192, 2048):
        s = span(attn_span=attn_span, ramp=32, z=(0.0,))
        assert s.max_span() == 32
        assert s.trim_length() == attn_span - 64
        assert s.cache_size() == 128


def test_max_span_is_computed_in_float64_from_the_float32_parameter():
    # float32(0.3) * 320 = 96.0000038...: ceil is 97 in float64 (96 in float32 arithmetic).
    s = span(attn_span=320, ramp=32, z=(0.3,))
    assert s.max_span() == 97 + 32
    assert s.trim_length() == 128  # min(319, 191) -> 128 (float32 arithmetic would give 192)
    assert s.cache_size() == 256


def test_max_span_clipped_and_short_spans_never_trim():
    s = span(attn_span=48, ramp=32, z=(1.0,))
    assert s.max_span() == 48 and s.trim_length() == 0 and s.cache_size() == 48
    s = span(attn_span=48, ramp=2, z=(0.0,))
    assert s.trim_length() == 0  # min(47, 46) < 64
    s = span(attn_span=64, ramp=1, z=(0.0,))
    assert s.trim_length() == 0  # min(63, 63) < 64


def test_avg_and_max_span():
    s = span(n_heads=2, attn_span=100, ramp=10, z=(0.1, 0.45))
    assert s.max_span() == 55
    assert s.avg_span() == 38  # ceil(27.5) + 10


def test_mask_is_float32_for_half_precision_parameters():
    s = span(attn_span=8192, ramp=32, z=(0.5,), dtype=torch.bfloat16)
    m = s.mask(8192)
    assert m.dtype == torch.float32
    # m = (4096 - c) / 32 + 1 for column c: 1/32 at c = 4127, 0 at c = 4128, exactly
    assert m[0, 4096 + 31].item() == 1 / 32 and m[0, 4096 + 32].item() == 0.0
