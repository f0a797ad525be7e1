"""Optional bridge to EleutherAI's lm-evaluation-harness (the ``retainfirst[lm-eval]`` extra, 0.4.13).

The in-memory model is wrapped in ``lm_eval.models.huggingface.HFLM`` (no reload, no copy), the
tasks run through ``lm_eval.simple_evaluate`` and every task (and group) of its results becomes one
``EvalResult``. Metric keys ``"<metric>,<filter>"`` become ``"<metric>"`` for the default filter
``none`` and ``"<metric>_<filter>"`` otherwise (``"acc,none"`` -> ``acc``, ``"acc_stderr,none"``
-> ``acc_stderr``, ``"exact_match,strict-match"`` -> ``exact_match_strict-match``); values the
harness could not compute (``"N/A"`` stderrs) are left out. Built-in tasks download their datasets
from the Hugging Face hub; ``task_dir`` adds local task YAMLs (TaskManager ``include_path``).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError
from retainfirst.evals.perplexity import evaluation_mode
from retainfirst.evals.results import EvalResult

INSTALL_HINT = "install the extra: pip install 'retainfirst[lm-eval]'"


def import_lm_eval() -> tuple[Any, Any, Any]:
    """``(lm_eval, HFLM, TaskManager)``, or a RetainFirstError that says how to install them."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise RetainFirstError(f"lm-evaluation-harness is not available ({exc}); {INSTALL_HINT}") from exc
    return lm_eval, HFLM, TaskManager


def run_lm_eval(
    model_or_path: Any,
    tokenizer: Any = None,
    tasks: Sequence[str] = ("mmlu",),
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    task_dir: str | Path | Sequence[str | Path] | None = None,
    *,
    include_default_tasks: bool = True,
    apply_chat_template: bool = False,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> list[EvalResult]:
    """Run lm-eval-harness ``tasks`` on a model (instance, local folder, hub id or retainfirst alias).

    ``include_default_tasks=False`` skips indexing the harness's ~15k built-in task configs (several
    seconds) when only ``task_dir`` tasks are wanted. The model's training mode and the tokenizer's
    padding side are restored afterwards.
    """
    lm_eval, hflm_class, task_manager_class = import_lm_eval()
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise RetainFirstError("run_lm_eval needs at least one task name")
    if isinstance(model_or_path, str | Path):
        from retainfirst.models import load_model

        model, loaded_tokenizer = load_model(str(model_or_path))
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = model_or_path
    if tokenizer is None:
        raise RetainFirstError("run_lm_eval got a model instance without its tokenizer; pass tokenizer=...")

    include_path = _task_paths(task_dir)
    task_manager = task_manager_class(include_path=include_path, include_defaults=include_default_tasks)
    known = task_manager.all_tasks
    unknown = [t for t in tasks if not fnmatch.filter(known, t) and not Path(t).is_file()]
    if unknown:
        where = f"in {include_path} or " if include_path else ""
        raise RetainFirstError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: not found {where}among the "
            f"{'built-in' if include_default_tasks else '(disabled) built-in'} tasks; check the names"
        )

    saved_side = tokenizer.padding_side
    try:
        with evaluation_mode(model):
            lm = hflm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=task_manager,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                apply_chat_template=apply_chat_template,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    finally:
        tokenizer.padding_side = saved_side
    if output is None:  # not the main process
        return []
    common = {
        "harness": "lm-eval",
        "lm_eval_version": output.get("lm_eval_version") or getattr(lm_eval, "__version__", None),
        "limit": limit,
        "batch_size": batch_size,
        "apply_chat_template": apply_chat_template,
        "bootstrap_iters": bootstrap_iters,
        "seed": seed,
        "task_dir": [str(p) for p in include_path] if include_path else None,
    }
    return convert_lm_eval_results(output, common)


def _task_paths(task_dir: str | Path | Sequence[str | Path] | None) -> list[str] | None:
    if task_dir is None:
        return None
    paths = [task_dir] if isinstance(task_dir, str | Path) else list(task_dir)
    for path in paths:
        if not Path(path).exists():
            raise RetainFirstError(
                f"lm-eval task_dir {str(path)!r} does not exist; pass a folder of task YAMLs"
            )
    return [str(p) for p in paths]


def convert_lm_eval_results(output: dict[str, Any], common: dict[str, Any] | None = None) -> list[EvalResult]:
    """One EvalResult per entry of ``output["results"]`` (the dict ``simple_evaluate`` returns)."""
    results = []
    n_samples = output.get("n-samples", {})
    groups = output.get("group_subtasks", {})
    for task, values in output.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metric, filter_name = key.split(",", 1)
            if math.isfinite(float(value)):
                metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
        counts = n_samples.get(task, {})
        n = counts.get("effective", values.get("sample_len", 0))
        if not counts and groups.get(task):
            n = sum(n_samples.get(sub, {}).get("effective", 0) for sub in groups[task])
        settings = dict(common or {})
        settings.update(
            {
                "num_fewshot": output.get("n-shot", {}).get(task),
                "version": output.get("versions", {}).get(task),
                "higher_is_better": output.get("higher_is_better", {}).get(task, {}),
                "n_original": counts.get("original"),
                "subtasks": list(groups.get(task, [])),
            }
        )
        results.append(EvalResult(task=task, metrics=metrics, n=int(n), settings=settings))
    return results
