"""Persistent memory: shapes and the reparametrised initialisation (DESIGN §2.5)."""

from __future__ import annotations

import math

import torch

from allattn import PersistentMemory


def test_shapes_and_reparametrisation():
    torch.manual_seed(0)
    mem = PersistentMemory(n_heads=4, head_dim=64, size=512)
    assert mem.key.shape == (4, 64, 512) and mem.val.shape == (4, 512, 64)
    assert abs(mem.key.std().item() - 1 / math.sqrt(64)) < 0.01
    assert abs(mem.val.std().item() - 1 / math.sqrt(512)) < 0.002
    keys, values = mem.keys(), mem.values()
    assert keys.shape == values.shape == (4, 512, 64)
    torch.testing.assert_close(keys, mem.key.transpose(1, 2) * 8)
    torch.testing.assert_close(values, mem.val * math.sqrt(512))
    assert abs(keys.std().item() - 1) < 0.02 and abs(values.std().item() - 1) < 0.02
    assert sum(p.numel() for p in mem.parameters()) == 2 * 4 * 512 * 64
