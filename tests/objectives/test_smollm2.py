"""Every objective with its defaults on the embedded SmolLM2-135M (real tokenizer, pad == eos)."""

from __future__ import annotations

import math
import re

import pytest
import torch

from retainfirst.objectives import (
    FrozenCopyReference,
    available_forget_objectives,
    available_retain_objectives,
    get_forget_objective,
    get_retain_objective,
)


@pytest.mark.slow
def test_all_objectives_with_defaults_on_smollm2(smollm2):
    model, tokenizer = smollm2
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    texts = ["The capital of France is Paris.", "Water boils at 100 degrees Celsius at sea level, usually."]
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # some padding
    reference = FrozenCopyReference(model)
    losses = {}
    for kind, names, factory in (
        ("forget", available_forget_objectives(), get_forget_objective),
        ("retain", available_retain_objectives(), get_retain_objective),
    ):
        for name in names:
            objective = factory(name)
            if objective.skips_pass:  # retain 'none' has no loss: the engine skips its pass
                continue
            objective.setup(model, seed=0)
            loss = objective.loss(model, batch, reference if objective.needs_reference else None)
            assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss), (kind, name)
            losses[name] = loss.item()
    assert losses["npo"] == pytest.approx(20 * math.log(2), rel=1e-4)  # reference == model
    assert losses["kl"] == pytest.approx(0.0, abs=1e-5)
    assert losses["embed_diff"] == pytest.approx(0.0, abs=1e-8)
    assert 0 < losses["nll"] < 10 and losses["ga"] == pytest.approx(-losses["nll"], rel=1e-5)
    names = [name for name, _ in model.named_parameters()]
    rmu = get_forget_objective("rmu")
    assert [n for n in names if any(re.fullmatch(p, n) for p in rmu.trainable_patterns)] == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)
    ]
