"""Forget and retain losses, independent of each other: each maps ``(model, batch, reference)`` to a scalar.

forget = get_forget_objective("simnpo", beta=2.5, delta=0.0)   # ga | npo | simnpo | rmu
retain = get_retain_objective("nll")                           # nll | kl | embed_diff | none
# options: a pydantic model per objective (SimNPO.Options); other packages add objectives through
# the ``retainfirst.objectives`` entry-point group, the class saying kind = "forget" or "retain".
reference = make_reference(model) if forget.needs_reference or retain.needs_reference else None
loss = forget.loss(model, batch, reference)
"""

from retainfirst.objectives import forget as _forget  # noqa: F401 - registers the forget objectives
from retainfirst.objectives import retain as _retain  # noqa: F401 - registers the retain objectives
from retainfirst.objectives.base import Objective, ObjectiveOptions, scored_mask, sequence_logprobs, token_nll
from retainfirst.objectives.layers import decoder_layers, layer_output
from retainfirst.objectives.reference import (
    AdapterDisabledReference,
    FrozenCopyReference,
    Reference,
    is_peft_model,
    make_reference,
)
from retainfirst.objectives.registry import (
    FORGET_OBJECTIVES,
    RETAIN_OBJECTIVES,
    available_forget_objectives,
    available_retain_objectives,
    get_forget_objective,
    get_retain_objective,
    register_forget_objective,
    register_retain_objective,
)

__all__ = [
    "FORGET_OBJECTIVES",
    "RETAIN_OBJECTIVES",
    "AdapterDisabledReference",
    "FrozenCopyReference",
    "Objective",
    "ObjectiveOptions",
    "Reference",
    "available_forget_objectives",
    "available_retain_objectives",
    "decoder_layers",
    "get_forget_objective",
    "get_retain_objective",
    "is_peft_model",
    "layer_output",
    "make_reference",
    "register_forget_objective",
    "register_retain_objective",
    "scored_mask",
    "sequence_logprobs",
    "token_nll",
]
