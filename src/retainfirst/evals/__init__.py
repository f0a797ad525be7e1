"""Evaluations: every one returns an EvalResult (see results.py) that records its protocol.

The evaluation *tasks* a run can list (``eval.tasks``) are plugins in :mod:`retainfirst.evals.tasks`.
Names are imported on first use, so reading the task registry does not load torch models' code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "evaluate_generation": "generation",
    "rouge_l_recall": "generation",
    "run_lm_eval": "lm_eval_bridge",
    "build_prompt": "mcq",
    "evaluate_mcq": "mcq",
    "evaluate_mia": "mia",
    "mann_whitney_auc": "mia",
    "evaluate_perplexity": "perplexity",
    "EvalResult": "results",
    "load_results": "results",
    "save_results": "results",
}

if TYPE_CHECKING:
    from retainfirst.evals.generation import evaluate_generation, rouge_l_recall
    from retainfirst.evals.lm_eval_bridge import run_lm_eval
    from retainfirst.evals.mcq import build_prompt, evaluate_mcq
    from retainfirst.evals.mia import evaluate_mia, mann_whitney_auc
    from retainfirst.evals.perplexity import evaluate_perplexity
    from retainfirst.evals.results import EvalResult, load_results, save_results


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'retainfirst.evals' has no attribute {name!r}")
    return getattr(importlib.import_module(f"retainfirst.evals.{module}"), name)


__all__ = [
    "EvalResult",
    "build_prompt",
    "evaluate_generation",
    "evaluate_mcq",
    "evaluate_mia",
    "evaluate_perplexity",
    "load_results",
    "mann_whitney_auc",
    "rouge_l_recall",
    "run_lm_eval",
    "save_results",
]
