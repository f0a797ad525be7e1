"""Attacks on an unlearned model (is the knowledge gone or only hidden?): pure torch, no tasks.

- :mod:`.quantize`: round-to-nearest 8/4-bit fake quantization of the weights (task ``quantize``).
- :mod:`.relearn`: a short seeded fine-tune on forget-related text (task ``relearn``).

The tasks that run them and re-score the model with the run's other tasks are
:mod:`retainfirst.evals.tasks.quantize` and :mod:`retainfirst.evals.tasks.relearn`, on the shared
base :mod:`retainfirst.evals.tasks.attack` (it lives in the tasks package so that registering the
built-in tasks never imports a half-initialised module).
"""

from retainfirst.evals.attacks.quantize import fake_quantize, quantize_groups, quantize_model
from retainfirst.evals.attacks.relearn import finetune, split_targets, texts_naming

__all__ = [
    "fake_quantize",
    "finetune",
    "quantize_groups",
    "quantize_model",
    "split_targets",
    "texts_naming",
]
