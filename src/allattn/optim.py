"""The original recipes' optimisers (DESIGN §3): Adagrad with per-parameter step clipping, Adam
with global gradient-norm clipping, and a linear warm-up.

Adagrad (character level): for each parameter tensor with raw gradient g, the step size is
lr_t * clip / (|g| + 1e-10) when |g| > clip, else lr_t. Only the step is clipped: the
accumulator adds the unclipped g^2, and the update is g / (sqrt(sum) + 1e-10), as
`torch.optim.Adagrad` computes it (one parameter group per tensor carries its step size).
Adam (word level): betas (0.9, 0.999), eps 1e-8; once per batch the gradients are multiplied by
clip / (norm + 1e-6) when that is below 1, norm being the L2 norm over all parameters.
Warm-up: the t-th update (t = 1, 2, ...) uses lr_t = lr * min(1, t / warmup_steps), so the first
update uses lr / warmup_steps (the original steps its scheduler before the optimiser).
Loss scaling (fp16 only, `torch.amp.GradScaler`): the loss is multiplied by a scale before
backward and the gradients divided by it before clipping; a step whose gradients overflowed is
skipped (it counts as no update, so warm-up does not advance) and the scale halves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .config import OptimConfig

ADAGRAD_EPS = 1e-10
CLIP_EPS = 1e-10
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Optimizer:
    """The configured optimiser with its clipping and warm-up, stepped once per batch."""

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        config: OptimConfig,
        *,
        loss_scaling: bool = False,
        device: torch.device | str = "cuda",
    ) -> None:
        self.config = config
        self.scaler = torch.amp.GradScaler(torch.device(device).type) if loss_scaling else None
        """fp16's loss scaler (None: no loss scaling)."""
        self.params = [p for p in params if p.requires_grad]
        self.updates = 0  # optimiser steps taken so far (the warm-up's t - 1)
        if config.optimizer == "adagrad":
            groups = [{"params": [p]} for p in self.params]  # a step size per tensor
            self.inner: torch.optim.Optimizer = torch.optim.Adagrad(
                groups, lr=config.lr, eps=ADAGRAD_EPS, initial_accumulator_value=0.0
            )
        else:
            self.inner = torch.optim.Adam(
                self.params, lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0
            )

    def lr(self, update: int) -> float:
        """Learning rate of the `update`-th update (1-based) after warm-up."""
        warmup = self.config.warmup_steps
        return self.config.lr * min(1.0, update / warmup) if warmup else self.config.lr

    def scale(self, loss: Tensor) -> Tensor:
        """The loss to run backward from (multiplied by the loss scale when there is one)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    @torch.no_grad()
    def step(self) -> dict[str, float]:
        """Clip, set the step sizes, update. Returns the lr used, the global gradient norm and
        `skipped` (1.0: loss scaling found the gradients overflowed and skipped the update)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.inner)
        lr = self.lr(self.updates + 1)
        grads = [p.grad for p in self.params if p.grad is not None]
        each = [p.grad.norm() if p.grad is not None else p.new_zeros(()) for p in self.params]
        norms = torch.stack(each) if each else torch.zeros(0)
        *param_norms, grad_norm = torch.cat([norms, norms.norm()[None]]).tolist()  # one sync
        if self.scaler is not None and not math.isfinite(grad_norm):
            self.scaler.update()  # halves the scale; the unscaled gradients are dropped
            return {"lr": lr, "grad_norm": grad_norm, "skipped": 1.0}
        self.updates += 1
        clip = self.config.grad_clip
        if self.config.optimizer == "adagrad":
            for group, norm in zip(self.inner.param_groups, param_norms, strict=True):
                group["lr"] = lr * clip / (norm + CLIP_EPS) if clip and norm > clip else lr
        else:
            scale = clip / (grad_norm + 1e-6)
            if clip and scale < 1:
                for g in grads:
                    g.mul_(scale)
            for group in self.inner.param_groups:
                group["lr"] = lr
        if self.scaler is None:
            self.inner.step()
        else:
            self.scaler.step(self.inner)  # the gradients are finite: an ordinary step
            self.scaler.update()
        return {"lr": lr, "grad_norm": grad_norm, "skipped": 0.0}

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale (None without loss scaling)."""
        return None if self.scaler is None else float(self.scaler.get_scale())

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        state = {"inner": self.inner.state_dict(), "updates": self.updates}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore accumulators or moments, the update count (so warm-up does not restart) and
        the loss scale (a run saved without loss scaling starts from the initial scale)."""
        self.inner.load_state_dict(state["inner"])
        self.updates = int(state["updates"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
