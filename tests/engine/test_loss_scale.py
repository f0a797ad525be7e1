"""fp16 loss scaling driven by the engine: unscale both gradient lists, back off on overflow, grow."""

from __future__ import annotations

import torch
from torch.amp import GradScaler

from retainfirst.engine.loss_scale import LossScale


def make_scale(growth_interval: int = 2) -> LossScale:
    scaler = GradScaler("cpu", init_scale=1024.0, growth_interval=growth_interval)
    scaler.scale(torch.tensor(1.0))  # what accelerator.backward does first; initialises the scale
    return LossScale(scaler)


def test_unscale_divides_both_lists_by_the_scale():
    scale = make_scale()
    forget, retain = [torch.full((3,), 2048.0), None], [torch.full((2,), 1024.0), torch.ones(1) * 512]
    scale.unscale(forget, retain)
    assert forget[0].tolist() == [2.0, 2.0, 2.0] and forget[1] is None
    assert retain[0].tolist() == [1.0, 1.0] and retain[1].tolist() == [0.5]


def test_overflow_backs_off_and_good_steps_grow_the_scale():
    scale = make_scale(growth_interval=2)
    scale.update(overflow=True)
    assert scale.scaler.get_scale() == 512.0
    scale.update(overflow=False)
    assert scale.scaler.get_scale() == 512.0
    scale.update(overflow=False)
    assert scale.scaler.get_scale() == 1024.0
    restored = make_scale(growth_interval=2)
    scale.update(overflow=False)
    restored.load_state_dict(scale.state_dict())
    assert restored.scaler.get_scale() == 1024.0 and restored.good_steps == 1


def test_disabled_without_a_scaler():
    scale = LossScale(None)
    grads = [torch.ones(2)]
    scale.unscale(grads)
    scale.update(overflow=True)
    assert not scale.enabled and grads[0].tolist() == [1.0, 1.0] and scale.state_dict() == {}
