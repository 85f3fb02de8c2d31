"""The trainable state of a pack: every user's prefix parameters stacked along a leading slot
dimension, and one AdamW step that updates every user of the pack at once.

Slot `s` of every stacked tensor belongs to one user at a time. What is per user — gradient norm
and clipping, learning rate and its schedule, bias correction, step count, weight decay — is a
`[slots]` vector on the device, so one step of the whole pack is a fixed handful of kernels
whatever the number of users, and nothing in it waits for the host. A joining user's slot is
filled from a fresh `UserPrefix` (the initialization of training alone) and its optimizer state
zeroed; a slot that is free, or whose user has failed, is left out of the update by a mask.

The update uses only exactly rounded elementwise operations (no fused multiply-add such as
`lerp` or `addcmul`), so a slot's result does not depend on where in the stack it lies or how
many slots the stack has.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.prefix import PrefixTensors, UserPrefix, expected_shapes
from prefixfleet.workers.spec import PrefixSpec, TrainConfig

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.AdamW's defaults
CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


class PackedPrefixes(nn.Module):
    """Every slot's trainable prefix, `[slots, ...]`, computed as `UserPrefix` computes one.

    `prefix` keeps the reparametrization MLP per slot as batched matrices (`embedding [S, P, h]`,
    `w1 [S, h, w]`, `w2 [S, w, out]`) so the whole pack's prefixes come from two `bmm`s.
    """

    def __init__(self, backbone: Backbone, spec: PrefixSpec, slots: int) -> None:
        super().__init__()
        self.spec = spec
        self.shapes = {k: tuple(v) for k, v in expected_shapes(backbone, spec).items()}
        device = backbone.device

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(slots, *shape, device=device)

        if spec.method != "prefix":
            self.direct = nn.ParameterDict({k: nn.Parameter(zeros(*shape)) for k, shape in self.shapes.items()})
            return
        P, hidden, width = spec.num_virtual_tokens, backbone.hidden_size, spec.reparam_hidden
        self.out_sizes = {k: math.prod(shape) // P for k, shape in self.shapes.items()}
        out = sum(self.out_sizes.values())
        self.embedding = nn.Parameter(zeros(P, hidden))
        self.w1, self.b1 = nn.Parameter(zeros(hidden, width)), nn.Parameter(zeros(1, width))
        self.w2, self.b2 = nn.Parameter(zeros(width, out)), nn.Parameter(zeros(1, out))
        for name, shape in self.shapes.items():
            self.register_buffer(f"base_{name}", zeros(*shape))

    @torch.no_grad()
    def load(self, slot: int, user: UserPrefix) -> None:
        """Fill `slot` with one user's freshly initialized parameters."""
        if self.spec.method != "prefix":
            for name, param in self.direct.items():
                param[slot].copy_(user.tensors[name])
            return
        first, last = user.mlp[0], user.mlp[2]
        self.embedding[slot].copy_(user.embedding)
        self.w1[slot].copy_(first.weight.T)
        self.b1[slot, 0].copy_(first.bias)
        self.w2[slot].copy_(last.weight.T)
        self.b2[slot, 0].copy_(last.bias)
        for name in self.shapes:
            getattr(self, f"base_{name}")[slot].copy_(getattr(user, f"base_{name}"))

    def forward(self) -> PrefixTensors:
        """Every slot's prefix tensors, `{name: [slots, ...]}` (differentiable)."""
        if self.spec.method != "prefix":
            return dict(self.direct.items())
        flat = torch.bmm(torch.tanh(torch.bmm(self.embedding, self.w1) + self.b1), self.w2) + self.b2  # [S, P, out]
        out, start = {}, 0
        for name, size in self.out_sizes.items():
            layers, two, heads, P, dim = self.shapes[name]
            chunk = flat[:, :, start:start + size].reshape(-1, P, layers, two, heads, dim)
            out[name] = getattr(self, f"base_{name}") + chunk.permute(0, 2, 3, 4, 1, 5)
            start += size
        return out


class PackedAdamW:
    """AdamW over stacked parameters: per-slot gradient clipping, learning rate, linear warmup
    and decay schedule, bias correction and step count, all as `[slots]` device vectors."""

    def __init__(self, params: list[nn.Parameter], slots: int) -> None:
        self.params = params
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.scratch = [torch.empty_like(p) for p in params]  # a step allocates nothing param-sized
        device = params[0].device
        self.steps, self.lr, self.weight_decay, self.max_norm, self.warmup, self.total = (
            torch.zeros(slots, device=device) for _ in range(6))

    @torch.no_grad()
    def join(self, slot: int, config: TrainConfig, lr: float) -> None:
        """Start `slot` afresh for a user trained with `config` at base learning rate `lr`."""
        for state in (*self.exp_avg, *self.exp_avg_sq):
            state[slot].zero_()
        self.steps[slot] = 0
        self.lr[slot], self.weight_decay[slot], self.max_norm[slot] = lr, config.weight_decay, config.max_grad_norm
        self.warmup[slot], self.total[slot] = config.warmup_steps, config.steps

    def _schedule(self) -> torch.Tensor:
        """Each slot's learning rate at its own step: linear warmup, then linear decay to zero."""
        warming = (self.steps + 1) / (self.warmup + 1)
        decaying = ((self.total - self.steps) / (self.total - self.warmup).clamp(min=1)).clamp(min=0)
        return self.lr * torch.where(self.steps < self.warmup, warming, decaying)

    @torch.no_grad()
    def step(self, update: torch.Tensor) -> torch.Tensor:
        """One step for the slots where `update` holds and the gradient norm is finite; the mask of
        slots actually updated. Gradients are consumed (set to None).

        Every slot runs the same in-place arithmetic; a slot left out gets factors that make it an
        exact no-op (`m * 1 + 0`, `p * 1 - 0`) and a zero in place of its gradient, so whatever its
        gradient held (NaN included) it keeps every bit of its state."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        norm = sum(torch.linalg.vector_norm(g.flatten(1), dim=1).square() for g in grads).sqrt()
        updated = update & torch.isfinite(norm)
        t = self.steps + 1
        lr = self._schedule()

        def per_slot(value: torch.Tensor | float, idle: float) -> torch.Tensor:
            return torch.where(updated, value, idle)

        clip = per_slot((self.max_norm / (norm + CLIP_EPS)).clamp(max=1.0), 0.0)
        keep1, take1 = per_slot(BETA1, 1.0), per_slot(1 - BETA1, 0.0)
        keep2, take2 = per_slot(BETA2, 1.0), per_slot(1 - BETA2, 0.0)
        shrink = per_slot(1 - lr * self.weight_decay, 1.0)
        step_size = per_slot(lr / (1 - BETA1 ** t), 0.0)
        bias2_root = (1 - BETA2 ** t).sqrt()
        for param, g, m, v, scratch in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, self.scratch,
                                           strict=True):
            shape = (-1,) + (1,) * (param.dim() - 1)
            g.masked_fill_(~updated.view(shape), 0.0).mul_(clip.view(shape))  # the gradient is ours to consume
            m.mul_(keep1.view(shape)).add_(torch.mul(g, take1.view(shape), out=scratch))
            v.mul_(keep2.view(shape)).add_(g.mul_(g).mul_(take2.view(shape)))
            denom = torch.sqrt(v, out=scratch).div_(bias2_root.view(shape)).add_(EPS)
            param.mul_(shrink.view(shape)).sub_(torch.div(m, denom, out=g).mul_(step_size.view(shape)))
            param.grad = None
        self.steps += updated
        return updated
