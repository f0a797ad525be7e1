"""Preparing the model for a run: LoRA adapters, the trainable set, gradient checkpointing.

Only trainable parameters reach the optimizer and the synthesizer, so choosing them (regexes on
parameter names, searched anywhere in the name) is checked strictly: a pattern that matches
nothing is almost always a typo and fails before any step runs.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from retainfirst.errors import RetainFirstError


def apply_lora(model: nn.Module, lora: dict[str, Any], seed: int) -> nn.Module:
    """Wrap in a PEFT LoRA model; the base weights are frozen by PEFT, only adapters train."""
    import torch
    from peft import LoraConfig, get_peft_model

    from retainfirst.engine.config import LoraOptions

    options = LoraOptions.parse(lora, root="lora")  # its defaults fill the keys the config left out
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=options.target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):  # adapter init depends on the seed only
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise RetainFirstError(
                f"lora: could not add adapters ({exc}); check lora.target_modules"
            ) from exc


def select_trainable(model: nn.Module, patterns: list[str] | None, *, lora: bool) -> list[str]:
    """Set requires_grad from ``patterns`` and return the trainable parameter names in model order.

    With LoRA the candidates are the adapter weights PEFT left trainable; without, every parameter.
    """
    named = list(model.named_parameters())
    candidates = {name for name, p in named if p.requires_grad} if lora else {name for name, _ in named}
    if patterns:
        compiled = [re.compile(p) for p in patterns]
        for pattern in compiled:
            if not any(pattern.search(name) for name in candidates):
                examples = ", ".join(sorted(candidates)[:4])
                raise RetainFirstError(
                    f"trainable pattern {pattern.pattern!r} matches no "
                    f"{'LoRA adapter ' if lora else ''}parameter; names look like: {examples}"
                )
        chosen = {name for name in candidates if any(p.search(name) for p in compiled)}
    else:
        chosen = candidates
    for name, param in named:
        param.requires_grad_(name in chosen)
    names = [name for name, _ in named if name in chosen]
    if not names:
        raise RetainFirstError("no trainable parameters; check trainable_patterns / lora settings")
    return names


def enable_gradient_checkpointing(model: nn.Module, *, lora: bool) -> None:
    """Non-reentrant checkpointing; with frozen embeddings (LoRA) the inputs must require grad."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise RetainFirstError(f"{type(model).__name__} does not support gradient checkpointing")
    if lora:
        model.enable_input_require_grads()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "use_cache"):
        config.use_cache = False
