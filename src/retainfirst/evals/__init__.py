"""Evaluations: every one returns an EvalResult (see results.py) that records its protocol."""

from retainfirst.evals.generation import evaluate_generation, rouge_l_recall
from retainfirst.evals.lm_eval_bridge import run_lm_eval
from retainfirst.evals.mcq import build_prompt, evaluate_mcq
from retainfirst.evals.mia import evaluate_mia, mann_whitney_auc
from retainfirst.evals.perplexity import evaluate_perplexity
from retainfirst.evals.results import EvalResult, load_results, save_results

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
