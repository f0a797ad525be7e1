"""References: frozen copies and adapter-disabled PEFT models, eval semantics, restored train mode."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from retainfirst.errors import RetainFirstError
from retainfirst.objectives import (
    AdapterDisabledReference,
    FrozenCopyReference,
    Reference,
    get_retain_objective,
    make_reference,
)


def with_attention_dropout(model, p: float = 0.5):
    """Turn on attention dropout so train mode is random and eval mode is not."""
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = p
    return model


def lora(model):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(model, config)


def randomise_adapters(peft_model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_frozen_copy_is_frozen_independent_and_in_eval_mode(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    with torch.no_grad():
        before = tiny_model(**batch).logits
    reference = FrozenCopyReference(tiny_model)
    assert isinstance(reference, Reference)
    assert all(not p.requires_grad for p in reference.model.parameters())
    with torch.no_grad():
        for parameter in tiny_model.parameters():
            parameter.mul_(1.5)
    output = reference.forward(batch["input_ids"], batch["attention_mask"])
    assert not output.logits.requires_grad
    assert torch.allclose(output.logits, before, atol=1e-6)
    states = reference.forward(batch["input_ids"], batch["attention_mask"], output_hidden_states=True)
    assert len(states.hidden_states) == tiny_model.config.num_hidden_layers + 1


def test_frozen_copy_has_no_dropout_even_if_put_in_train_mode(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    with_attention_dropout(tiny_model).train()
    with torch.no_grad():  # dropout really is on in train mode, so the check below can fail
        assert not torch.equal(tiny_model(**batch).logits, tiny_model(**batch).logits)
    reference = FrozenCopyReference(tiny_model)
    reference.model.train()  # e.g. a parent module's .train() reached it
    first = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
    second = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(first, second)
    tiny_model.eval()
    with torch.no_grad():
        assert torch.allclose(first, tiny_model(**batch).logits, atol=1e-6)


def test_adapter_disabled_reference_gives_base_outputs_while_adapter_differs(
    tiny_model, byte_tokenizer, helpers
):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    base = copy.deepcopy(tiny_model).eval()
    peft_model = lora(tiny_model)
    randomise_adapters(peft_model)
    reference = make_reference(peft_model)
    assert isinstance(reference, AdapterDisabledReference)
    ref_logits = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
    with torch.no_grad():
        base_logits = base(**batch).logits
        adapted_logits = peft_model(**batch).logits
    assert torch.allclose(ref_logits, base_logits, atol=1e-5)
    assert not torch.allclose(adapted_logits, base_logits, atol=1e-3)
    hidden = reference.layer_output(batch["input_ids"], batch["attention_mask"], 1)
    with torch.no_grad():
        assert torch.allclose(hidden, base(**batch, output_hidden_states=True).hidden_states[2], atol=1e-5)


def test_adapter_disabled_reference_uses_eval_mode_and_restores_every_module_mode(
    tiny_model, byte_tokenizer, helpers
):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    base = copy.deepcopy(tiny_model).eval()
    peft_model = lora(with_attention_dropout(tiny_model))
    randomise_adapters(peft_model)
    peft_model.train()
    with torch.no_grad():
        assert not torch.equal(peft_model(**batch).logits, peft_model(**batch).logits)
    frozen_part = peft_model.base_model.model.model.layers[0]
    frozen_part.eval()  # a submodule deliberately in eval mode must stay so
    modes = {name: module.training for name, module in peft_model.named_modules()}
    reference = AdapterDisabledReference(peft_model)
    first = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
    second = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
    assert torch.equal(first, second)  # no dropout
    with torch.no_grad():
        assert torch.allclose(first, base(**batch).logits, atol=1e-5)
    assert {name: module.training for name, module in peft_model.named_modules()} == modes
    # the adapters are back on afterwards
    with torch.no_grad():
        peft_model.eval()
        assert not torch.allclose(peft_model(**batch).logits, first, atol=1e-3)


def test_lora_model_trains_against_its_adapter_disabled_reference(tiny_model, byte_tokenizer, helpers):
    batch = helpers.batch(byte_tokenizer, helpers.TEXTS)
    peft_model = lora(tiny_model)
    kl = get_retain_objective("kl")
    reference = make_reference(peft_model)
    assert kl.loss(peft_model, batch, reference).item() == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0
    randomise_adapters(peft_model)
    loss = kl.loss(peft_model, batch, reference)
    assert loss.item() > 1e-4
    loss.backward()
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


def test_make_reference_picks_a_frozen_copy_for_plain_models(tiny_model):
    assert isinstance(make_reference(tiny_model), FrozenCopyReference)
    with pytest.raises(RetainFirstError, match="PeftModel"):
        AdapterDisabledReference(tiny_model)
