"""Optional bridge to EleutherAI's lm-evaluation-harness (the ``retainfirst[lm-eval]`` extra, 0.4.13).

The in-memory model is wrapped in ``lm_eval.models.huggingface.HFLM`` (no reload, no copy), the
tasks run through ``lm_eval.simple_evaluate`` and every task (and group) of its results becomes one
``EvalResult``. Metric keys ``"<metric>,<filter>"`` become ``"<metric>"`` for the default filter
``none`` and ``"<metric>_<filter>"`` otherwise (``"acc,none"`` -> ``acc``, ``"acc_stderr,none"``
-> ``acc_stderr``, ``"exact_match,strict-match"`` -> ``exact_match_strict-match``); values the
harness could not compute (``"N/A"`` stderrs) are left out. Built-in tasks download their datasets
from the Hugging Face hub; ``task_dir`` adds local task YAMLs (TaskManager ``include_path``).

Local task YAMLs (a task given as a file path, every YAML under ``task_dir``, and the files they
``include``) can run Python: lm-eval imports the module a ``!function`` tag names. They are refused
unless ``allow_code=True`` (the config's ``eval.lm_eval_allow_code``); the harness's own registry
tasks stay allowed.
"""

from __future__ import annotations

import fnmatch
import math
import os
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
    allow_code: bool = False,
) -> list[EvalResult]:
    """Run lm-eval-harness ``tasks`` on a model (instance, local folder, hub id or retainfirst alias).

    ``include_default_tasks=False`` skips indexing the harness's ~15k built-in task configs (several
    seconds) when only ``task_dir`` tasks are wanted. The model's training mode and the tokenizer's
    padding side are restored afterwards. ``allow_code=False`` refuses local task files that would run
    Python (see the module docstring).
    """
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise RetainFirstError("run_lm_eval needs at least one task name")
    include_path = _task_paths(task_dir)
    if not allow_code:
        refuse_task_code(tasks, include_path)
    lm_eval, hflm_class, task_manager_class = import_lm_eval()
    if isinstance(model_or_path, str | Path):
        from retainfirst.models import load_model

        model, loaded_tokenizer = load_model(str(model_or_path))
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model = model_or_path
    if tokenizer is None:
        raise RetainFirstError("run_lm_eval got a model instance without its tokenizer; pass tokenizer=...")

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


# YAML tags a task file may use without running code (the core schema, spelled out or short).
_PLAIN_TAGS = {
    f"tag:yaml.org,2002:{name}"
    for name in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "binary", "merge", "omap")
}


def local_task_files(tasks: Sequence[str], include_path: Sequence[str] | None) -> list[Path]:
    """The task YAMLs lm-eval would read from the user's disk: tasks given as files, task_dir YAMLs."""
    files = [Path(t) for t in tasks if Path(t).is_file()]
    for root in include_path or []:
        root_path = Path(root)
        files += [root_path] if root_path.is_file() else sorted(root_path.rglob("*.yaml"))
    return files


def refuse_task_code(tasks: Sequence[str], include_path: Sequence[str] | None) -> None:
    """One-line error when a local task file (or a file it includes) would run Python."""
    for file in local_task_files(tasks, include_path):
        for culprit, what in _code_in_yaml(file, set()):
            raise RetainFirstError(
                f"lm-eval task file {culprit} uses {what}, which would import and run Python from your "
                "disk; retainfirst runs task code only with eval.lm_eval_allow_code: true "
                "(check the file first)"
            )


def _builtin_task_root() -> Path | None:
    """lm-eval's own task folder, found without importing the harness (seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return (Path(spec.submodule_search_locations[0]) / "tasks").resolve()


def _code_in_yaml(file: Path, seen: set[Path]) -> list[tuple[Path, str]]:
    """``(file, tag or key)`` for every code-running construct of ``file`` and its includes."""
    import yaml

    from retainfirst.io import read_user_text

    resolved = file.resolve()
    builtin = _builtin_task_root()
    if resolved in seen or (builtin is not None and resolved.is_relative_to(builtin)):
        return []  # the harness's own tasks are trusted like the harness
    seen.add(resolved)
    text = read_user_text(file, "lm-eval task file", fix="fix the file or the task name")
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RetainFirstError(f"lm-eval task file {file} is not valid YAML: {first}") from None
    found: list[tuple[Path, str]] = []
    includes: list[str] = []
    stack = [node for node in nodes if node is not None]
    while stack:
        node = stack.pop()
        if node.tag not in _PLAIN_TAGS:
            value = node.value if isinstance(node, yaml.ScalarNode) else ""
            found.append((file, f"{node.tag} {value}".strip()))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == "include":
                    items = value.value if isinstance(value, yaml.SequenceNode) else [value]
                    includes += [item.value for item in items if isinstance(item, yaml.ScalarNode)]
                if (
                    isinstance(key, yaml.ScalarNode)
                    and key.value == "trust_remote_code"
                    and isinstance(value, yaml.ScalarNode)
                    and value.value.lower() in ("true", "yes", "on", "1")
                ):
                    found.append((file, "trust_remote_code: true"))
                stack += [key, value]
        elif isinstance(node, yaml.SequenceNode):
            stack += node.value
    for include in includes:
        path = Path(os.path.expanduser(include))
        path = path if path.is_absolute() else file.parent / path
        if path.exists() or path.is_symlink():
            found += _code_in_yaml(path, seen)
    return found


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
