"""LoRA: only adapters train (also with gradient checkpointing), the reference is the adapter-less model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import retainfirst.objectives as objectives
from retainfirst.engine import TrainConfig, unlearn
from retainfirst.objectives.reference import AdapterDisabledReference, FrozenCopyReference


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_adapters_only_and_reuses_the_model_as_reference(
    worker, tmp_path, monkeypatch, checkpointing
):
    model, tokenizer, forget, retain = worker.tiny_setup()
    base_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    references = []
    real = objectives.make_reference
    monkeypatch.setattr(objectives, "make_reference", lambda m: references.append(real(m)) or references[-1])

    def no_copy(*args, **kwargs):
        raise AssertionError("LoRA runs must not deep-copy the model for the reference")

    monkeypatch.setattr(FrozenCopyReference, "__init__", no_copy)
    cfg = TrainConfig(
        steps=3,
        lr=1e-2,
        forget_batch_size=2,
        retain_batch_size=2,
        synthesizer="sago",
        forget_loss="npo",
        forget_kwargs={"beta": 0.5},
        retain_loss="kl",
        lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        gradient_checkpointing=checkpointing,
        disable_progress=True,
        save_final_model=False,
    )
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    peft_model = result.model
    assert len(references) == 1 and isinstance(references[0], AdapterDisabledReference)
    assert references[0].model is peft_model
    assert peft_model.base_model.model.model.gradient_checkpointing is checkpointing

    adapters = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    moved = [n for n, p in adapters.items() if "lora_B" in n and p.abs().sum() > 0]  # B starts at zero
    assert len(moved) == len([n for n in adapters if "lora_B" in n])
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            continue
        base_name = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, base_before[base_name]), name

    saved = load_file(str(tmp_path / "checkpoints" / "step-3" / "model.safetensors"))
    assert set(saved) == set(adapters)


def test_lora_merge_saves_a_plain_model(worker, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer, forget, retain = worker.tiny_setup()
    cfg = TrainConfig(
        steps=1,
        lr=1e-2,
        forget_batch_size=2,
        retain_batch_size=2,
        lora={"r": 2, "target_modules": ["q_proj"]},
        merge_lora=True,
        disable_progress=True,
        save_final_model=True,
    )
    result = unlearn(model, tokenizer, forget, retain, cfg, tmp_path)
    assert not hasattr(result.model, "peft_config")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = forget[0]["input_ids"][None]
    with torch.no_grad():
        result.model.eval()
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
