"""Retain objectives: nll (plain gradient descent, "GD"), kl, embed_diff (RMU's retain loss), none.

None of them knows about the forget side.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retainfirst.errors import RetainFirstError
from retainfirst.objectives.base import (
    Objective,
    ObjectiveOptions,
    masked_mse,
    model_logits,
    predicted_mask,
    require_tokens,
    scored_mask,
    sequence_logprobs,
)
from retainfirst.objectives.layers import check_layer, layer_output
from retainfirst.objectives.registry import register_retain_objective
from retainfirst.validation import NonNegativeFloat, NonNegativeInt


@register_retain_objective("nll")
class NLL(Objective):
    """Gradient descent on the retain data: mean NLL over all scored tokens of the batch."""

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        logits = model_logits(model, batch)
        sums, counts = sequence_logprobs(logits, batch["input_ids"], scored_mask(batch))
        total = counts.sum()
        require_tokens(total, "retain objective 'nll'")
        nll = -sums.sum() / total
        self._record(nll=nll)
        return nll


@register_retain_objective("kl")
class KL(Objective):
    """KL(ref || model) of the next-token distributions, full vocabulary, mean over scored retain tokens.

    Only scored positions are upcast to float32, so padding and prompt tokens cost no softmax.
    """

    needs_reference = True

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        mask = predicted_mask(batch)
        rows, cols = mask.nonzero(as_tuple=True)
        require_tokens(rows.numel(), "retain objective 'kl'")
        logits = model_logits(model, batch)
        rows, cols = rows.to(logits.device), cols.to(logits.device)
        with torch.no_grad():
            ref_logits = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
            ref_logits = ref_logits.to(logits.device)
            ref_logprobs = F.log_softmax(ref_logits[:, :-1][rows, cols].float(), dim=-1)
        logprobs = F.log_softmax(logits[:, :-1][rows, cols].float(), dim=-1)
        per_token = F.kl_div(logprobs, ref_logprobs, log_target=True, reduction="none").sum(dim=-1)
        loss = per_token.mean()
        self._record(kl=loss)
        return loss


@register_retain_objective("embed_diff")
class EmbedDiff(Objective):
    """RMU's retain loss: coefficient * MSE(h_l(x_r), h_l_ref(x_r)) over scored tokens and hidden dims.

    ``coefficient`` is alpha in the RMU paper; the default 1.0 is neutral, while the official
    Zephyr-7B recipe uses 1200 (its activations are small, so the MSE is tiny without it).
    """

    needs_reference = True

    class Options(ObjectiveOptions):
        layer: NonNegativeInt = 7
        coefficient: NonNegativeFloat = 1.0
        early_exit: bool = True

    def setup(self, model: nn.Module, seed: int = 0) -> None:
        check_layer(model, self.layer, "retain objective 'embed_diff'")

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        mask = scored_mask(batch)
        require_tokens(mask.sum(), "retain objective 'embed_diff'")
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        hidden = layer_output(model, input_ids, attention_mask, self.layer, early_exit=self.early_exit)
        with torch.no_grad():
            ref_hidden = reference.layer_output(input_ids, attention_mask, self.layer)
        mse = masked_mse(hidden, ref_hidden, mask)
        self._record(mse=mse)
        return self.coefficient * mse


@register_retain_objective("none")
class NoRetain(Objective):
    """No retain term: the forget-only baselines (GradAscent, NPOForget, SimNPOForget of the paper's code).

    The engine sees ``skips_pass`` and runs no retain forward or backward; g_r is zero, so every
    synthesizer's update is gamma * g_f.
    """

    skips_pass: ClassVar[bool] = True

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        raise RetainFirstError("retain objective 'none' has no loss; the engine skips the retain pass")
