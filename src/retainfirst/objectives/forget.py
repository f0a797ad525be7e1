"""Forget objectives, each returned *as minimised*: ga, npo, simnpo, rmu.

None of them knows about the retain side; the engine takes the gradient of each loss separately and
a synthesizer combines them.
"""

from __future__ import annotations

import re
import warnings
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from retainfirst.errors import RetainFirstError
from retainfirst.objectives.base import (
    Objective,
    ObjectiveOptions,
    masked_mse,
    model_logits,
    require_tokens,
    scored_mask,
    sequence_logprobs,
)
from retainfirst.objectives.layers import check_layer, decoder_layers, layer_output
from retainfirst.objectives.registry import register_forget_objective
from retainfirst.validation import Float, NonNegativeInt, PositiveFloat


def _scored_sequence_logprobs(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Summed log-prob and scored-token count of every sequence of the batch under ``model``."""
    logits = model_logits(model, batch)
    return sequence_logprobs(logits, batch["input_ids"], scored_mask(batch))


@register_forget_objective("ga")
class GradientAscent(Objective):
    """Gradient ascent: minimise -NLL, the mean over all scored forget tokens of the batch."""

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        sums, counts = _scored_sequence_logprobs(model, batch)
        total = counts.sum()
        require_tokens(total, "forget objective 'ga'")
        nll = -sums.sum() / total
        self._record(nll=nll)
        return -nll


@register_forget_objective("npo")
class NPO(Objective):
    """Negative Preference Optimization (Zhang et al. 2024).

    L = -(2/beta) * mean_i log sigmoid(-beta * (log p_model(y_i|x_i) - log p_ref(y_i|x_i))), with
    sequence log-probs summed over scored tokens. Sequences without scored tokens are left out of
    the mean. Equals (2/beta) log 2 when the model is the reference; tends to GA as beta -> 0.
    """

    needs_reference = True

    class Options(ObjectiveOptions):
        beta: PositiveFloat = 0.1

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        sums, counts = _scored_sequence_logprobs(model, batch)
        require_tokens(counts.sum(), "forget objective 'npo'")
        with torch.no_grad():
            ref_logits = reference.forward(batch["input_ids"], batch["attention_mask"]).logits
            ref_sums, _ = sequence_logprobs(ref_logits, batch["input_ids"], scored_mask(batch))
        valid = counts > 0
        log_ratio = (sums - ref_sums)[valid]
        loss = -(2.0 / self.beta) * F.logsigmoid(-self.beta * log_ratio).mean()
        self._record(nll=-sums.sum() / counts.sum(), log_ratio=log_ratio.mean())
        return loss


@register_forget_objective("simnpo")
class SimNPO(Objective):
    """SimNPO (Fan et al. 2024): reference-free NPO on the length-normalised NLL.

    L = -(2/beta) * mean_i log sigmoid(beta * (NLL(y_i|x_i)/|y_i| - delta)), NLL summed over the
    scored (answer) tokens and |y_i| their number. As in the published code (where delta is called
    gamma) the margin sits *inside* the beta factor; the SimNPO paper writes beta*NLL/|y| - delta
    instead, i.e. its delta equals ours times beta. Defaults beta=2.5, delta=0.0 are the published
    code's defaults (its TOFU setting); the paper's WMDP runs use beta 0.02-0.1 and delta 0.1.
    """

    class Options(ObjectiveOptions):
        beta: PositiveFloat = 2.5
        delta: Float = 0.0

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        sums, counts = _scored_sequence_logprobs(model, batch)
        require_tokens(counts.sum(), "forget objective 'simnpo'")
        valid = counts > 0
        mean_nll = -sums[valid] / counts[valid]
        loss = -(2.0 / self.beta) * F.logsigmoid(self.beta * (mean_nll - self.delta)).mean()
        self._record(nll=-sums.sum() / counts.sum())
        return loss


def layer_weight_patterns(layers: list[int], parameter: str = r"mlp\.down_proj\.weight") -> list[str]:
    """Regexes naming one parameter of the given decoder layers, with any module prefix.

    They match with ``re.fullmatch`` and ``re.search`` alike, for plain (``model.layers.7...``) and
    PEFT-wrapped (``base_model.model.model.layers.7...``) names.
    """
    choice = "|".join(str(index) for index in layers)
    return [rf"(?:.*\.)?layers\.(?:{choice})\.{parameter}"]


@register_forget_objective("rmu")
class RMU(Objective):
    """Representation Misdirection for Unlearning (Li et al. 2024, WMDP).

    Loss = MSE(h_l(x_f), u): the output of decoder layer ``layer`` on forget tokens is pushed to a
    fixed random control vector u = c * r / ||r||, r ~ U[0,1)^d, drawn in :meth:`setup` from a
    seeded generator (saved by :meth:`state_dict` so a resumed run keeps it). The MSE averages over
    scored tokens (attention mask & loss mask) and hidden dimensions. By default only the MLP
    down projections of layers l-2..l train (``trainable_patterns``); pair it with the retain
    objective ``embed_diff`` at the same ``layer`` (``retain_layer``).
    """

    class Options(ObjectiveOptions):
        layer: NonNegativeInt = 7
        steering_coeff: PositiveFloat = 6.5
        seed: NonNegativeInt | None = None  # None: the run's seed
        trainable_layers: Annotated[list[NonNegativeInt], Field(min_length=1)] | None = None
        early_exit: bool = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.control_vector: Tensor | None = None  # float32 [d], on CPU

    @property
    def retain_layer(self) -> int:
        """The layer the paired ``embed_diff`` retain loss should compare."""
        return self.layer

    @property
    def trainable_layer_indices(self) -> list[int]:
        if self.trainable_layers is not None:
            return list(self.trainable_layers)
        return list(range(max(0, self.layer - 2), self.layer + 1))

    @property
    def trainable_patterns(self) -> list[str]:
        return layer_weight_patterns(self.trainable_layer_indices)

    def setup(self, model: nn.Module, seed: int = 0) -> None:
        """Validate the layers against the model and draw the control vector (``seed`` option wins)."""
        check_layer(model, self.layer, "forget objective 'rmu'")
        for index in self.trainable_layer_indices:
            check_layer(model, index, "forget objective 'rmu' (trainable_layers)")
        names = [name for name, _ in model.named_parameters()]
        if not any(re.fullmatch(pattern, name) for pattern in self.trainable_patterns for name in names):
            warnings.warn(
                f"rmu: no parameter matches the default trainable patterns {self.trainable_patterns}; "
                "set the trainable parameters explicitly",
                stacklevel=2,
            )
        hidden_size = _hidden_size(model)
        generator = torch.Generator().manual_seed(self.seed if self.seed is not None else seed)
        direction = torch.rand(hidden_size, generator=generator, dtype=torch.float32)
        self.control_vector = direction / direction.norm() * self.steering_coeff

    def state_dict(self) -> dict[str, Any]:
        if self.control_vector is None:
            return {}
        return {"control_vector": self.control_vector.clone(), "layer": self.layer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "control_vector" not in state:
            raise RetainFirstError(f"rmu state needs 'control_vector', got keys {sorted(state)}")
        if state.get("layer", self.layer) != self.layer:
            raise RetainFirstError(
                f"rmu state was saved for layer {state['layer']} but this objective uses layer {self.layer}"
            )
        vector = torch.as_tensor(state["control_vector"], dtype=torch.float32)
        self.control_vector = vector.detach().cpu().clone()

    def compute(self, model: nn.Module, batch: dict[str, Tensor], reference: Any) -> Tensor:
        if self.control_vector is None:
            raise RetainFirstError("forget objective 'rmu': call setup(model, seed) before the first loss")
        mask = scored_mask(batch)
        require_tokens(mask.sum(), "forget objective 'rmu'")
        hidden = layer_output(
            model, batch["input_ids"], batch["attention_mask"], self.layer, early_exit=self.early_exit
        )
        if hidden.shape[-1] != self.control_vector.numel():
            raise RetainFirstError(
                f"rmu: control vector has {self.control_vector.numel()} dims but layer {self.layer} outputs "
                f"{hidden.shape[-1]}; call setup(model) again for this model"
            )
        target = self.control_vector.to(hidden.device)
        loss = masked_mse(hidden, target, mask)
        self._record(mse=loss)
        return loss


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)
    size = getattr(config, "hidden_size", None)
    if isinstance(size, int):
        return size
    layers = decoder_layers(model)
    for parameter in layers[0].parameters():  # fall back: the width of the block's first norm/proj
        return parameter.shape[-1]
    raise RetainFirstError(f"cannot tell the hidden size of {type(model).__name__}")
