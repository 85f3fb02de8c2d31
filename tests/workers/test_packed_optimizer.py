"""The pack's stacked state against torch's own per-user pieces: `PackedPrefixes` yields what
`UserPrefix` yields, and one `PackedAdamW` step equals, slot by slot, what `clip_grad_norm_` +
`torch.optim.AdamW` + a linear warmup/decay `LambdaLR` do for that user alone."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from prefixfleet.workers.pack import PackedAdamW, PackedPrefixes
from prefixfleet.workers.prefix import UserPrefix
from prefixfleet.workers.spec import METHODS, PrefixSpec, TrainConfig

CONFIGS = [  # per slot: its own learning rate, schedule, clipping, decay and length
    TrainConfig(steps=6, lr=0.05),
    TrainConfig(steps=9, lr=0.01, warmup_steps=3, weight_decay=0.1, max_grad_norm=0.05),
    TrainConfig(steps=4, lr=0.2, max_grad_norm=100.0),
]


def _reference(param: torch.Tensor, grads: list[torch.Tensor], config: TrainConfig) -> torch.Tensor:
    """One user alone, the torch way."""
    p = nn.Parameter(param.clone())
    optimizer = torch.optim.AdamW([p], lr=config.lr, weight_decay=config.weight_decay)
    warmup, total = config.warmup_steps, config.steps

    def factor(step: int) -> float:
        return (step + 1) / (warmup + 1) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for grad in grads:
        p.grad = grad.clone()
        nn.utils.clip_grad_norm_([p], config.max_grad_norm)
        optimizer.step()
        schedule.step()
    return p.detach()


def test_each_slot_steps_as_torch_adamw_with_its_own_schedule_and_clipping():
    torch.manual_seed(0)
    slots, steps = len(CONFIGS), 9
    start = torch.randn(slots, 5, 7)
    grads = torch.randn(steps, slots, 5, 7) * torch.tensor([1.0, 3.0, 0.01]).view(1, slots, 1, 1)
    param = nn.Parameter(start.clone())
    optimizer = PackedAdamW([param], slots)
    for slot, config in enumerate(CONFIGS):
        optimizer.join(slot, config, config.lr)
    for step in range(steps):
        param.grad = grads[step].clone()
        running = torch.tensor([step < c.steps for c in CONFIGS])
        assert torch.equal(optimizer.step(running), running)
    for slot, config in enumerate(CONFIGS):
        expected = _reference(start[slot], list(grads[: config.steps, slot]), config)
        # 1e-5: the schedule and bias corrections are float32 vectors here, python floats in torch
        torch.testing.assert_close(param[slot].detach(), expected, rtol=1e-5, atol=1e-5)
    assert optimizer.steps.tolist() == [c.steps for c in CONFIGS]


def test_a_masked_or_non_finite_slot_keeps_every_bit_and_leaves_the_others_alone():
    torch.manual_seed(1)
    param = nn.Parameter(torch.randn(3, 4))
    optimizer = PackedAdamW([param], 3)
    for slot in range(3):
        optimizer.join(slot, CONFIGS[0], 0.1)
    before = param.detach().clone()
    clean = torch.randn(3, 4)
    param.grad = clean.clone()
    param.grad[1, 2] = float("nan")
    updated = optimizer.step(torch.tensor([True, True, False]))
    assert updated.tolist() == [True, False, False]
    assert torch.equal(param[1], before[1]) and torch.equal(param[2], before[2])
    assert torch.equal(optimizer.exp_avg[0][1:], torch.zeros(2, 4))

    alone = nn.Parameter(before[:1].clone())
    single = PackedAdamW([alone], 1)
    single.join(0, CONFIGS[0], 0.1)
    alone.grad = clean[:1].clone()
    single.step(torch.tensor([True]))
    assert torch.equal(param[0], alone[0])


@pytest.mark.parametrize("method", METHODS)
def test_packed_prefixes_yield_what_each_user_prefix_yields(backbones, method):
    backbone = backbones["t5"]  # encoder and decoder stacks
    spec = PrefixSpec(method=method, num_virtual_tokens=3, reparam_hidden=16)
    users = [UserPrefix(backbone, spec, torch.Generator().manual_seed(seed)) for seed in (4, 5)]
    packed = PackedPrefixes(backbone, spec, slots=3)
    packed.load(2, users[0])
    packed.load(0, users[1])
    with torch.no_grad():
        stacked = packed()
        for slot, user in ((2, users[0]), (0, users[1])):
            for name, value in user().items():
                torch.testing.assert_close(stacked[name][slot], value, rtol=1e-5, atol=1e-6)
