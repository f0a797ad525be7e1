"""Attacks on an unlearned model (is the knowledge gone or only hidden?), run as evaluation tasks.

- :mod:`.quantize`: round-to-nearest 8/4-bit fake quantization of the weights (task ``quantize``).
- :mod:`.relearn`: a short fine-tune on forget-related text (task ``relearn``).
- :mod:`.scoring`: the shared wrapper: re-running the run's other tasks on the attacked copy and the
  recovered fraction ``(after - unlearned) / (before - unlearned)``.
"""

from retainfirst.evals.attacks.quantize import fake_quantize, quantize_groups, quantize_model
from retainfirst.evals.attacks.relearn import finetune, split_targets, texts_naming
from retainfirst.evals.attacks.scoring import (
    AttackData,
    AttackTask,
    forget_score,
    headline_values,
    recovered_fraction,
)

__all__ = [
    "AttackData",
    "AttackTask",
    "fake_quantize",
    "finetune",
    "forget_score",
    "headline_values",
    "quantize_groups",
    "quantize_model",
    "recovered_fraction",
    "split_targets",
    "texts_naming",
]
