"""Frozen reference models for objectives that compare against the model before unlearning.

Two ways to get one: a frozen deep copy (any model; doubles the weights in memory), or — for a PEFT
model — the same model with its adapters switched off, which *is* the base model and costs no
memory. Either way the reference runs in eval mode (no dropout) under ``torch.no_grad``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from retainfirst.errors import RetainFirstError
from retainfirst.objectives.layers import layer_output


@runtime_checkable
class Reference(Protocol):
    """What objectives need from a reference: an HF forward, and one decoder layer's output."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False) -> Any:
        """The HF model output (``.logits``, ``.hidden_states``) computed under no_grad."""
        ...

    def layer_output(self, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
        """Output of decoder layer ``layer`` ([B, T, d]) under no_grad, stopping the forward there."""
        ...


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode and restore every submodule's own train/eval flag afterwards.

    ``model.train(was_training)`` would not do: it would flip submodules that the caller had put in
    a different mode on purpose (e.g. a frozen, eval-mode sub-network inside a training model).
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class FrozenCopyReference:
    """A frozen deep copy of the model as it was when the reference was built (build it before training)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = copy.deepcopy(model)
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def _ensure_eval(self) -> None:
        if self.model.training:  # someone called .train() on everything, e.g. via a parent module
            self.model.eval()

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False) -> Any:
        self._ensure_eval()
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )

    @torch.no_grad()
    def layer_output(self, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
        self._ensure_eval()
        return layer_output(self.model, input_ids, attention_mask, layer)


class AdapterDisabledReference:
    """The PEFT model itself with its adapters disabled (``peft_model.disable_adapter()``): no second copy.

    Valid as a reference only while the base weights stay frozen, which is how PEFT trains.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        if not is_peft_model(peft_model):
            raise RetainFirstError(
                f"AdapterDisabledReference needs a peft.PeftModel, got {type(peft_model).__name__}; "
                "use FrozenCopyReference (or make_reference) for a plain model"
            )
        self.model = peft_model

    @contextmanager
    def _base_model(self) -> Iterator[None]:
        with torch.no_grad(), eval_mode(self.model), self.model.disable_adapter():
            yield

    def forward(self, input_ids: Tensor, attention_mask: Tensor, output_hidden_states: bool = False) -> Any:
        with self._base_model():
            return self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                output_hidden_states=output_hidden_states,
                use_cache=False,
            )

    def layer_output(self, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
        with self._base_model():
            return layer_output(self.model, input_ids, attention_mask, layer)


def is_peft_model(model: nn.Module) -> bool:
    """True for a peft.PeftModel (imported lazily: peft is optional at import time)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency, but keep plain models working
        return False
    return isinstance(model, PeftModel)


def make_reference(model: nn.Module) -> Reference:
    """The cheapest correct reference: adapters disabled for a PEFT model, else a frozen deep copy."""
    if is_peft_model(model):
        return AdapterDisabledReference(model)
    return FrozenCopyReference(model)
