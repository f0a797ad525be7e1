"""Scoring one model on a list of tasks, outside any run directory (``retainfirst eval``)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from retainfirst import config as cfgmod
from retainfirst.config import RunConfig
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult, save_results
from retainfirst.evals.tasks import check_tasks
from retainfirst.experiment.console import print_eval_results
from retainfirst.experiment.prepare import evaluate, prepare
from retainfirst.experiment.rundir import RunDir


def looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/"))


def check_model_name(name: str) -> None:
    """A model must be an embedded alias, an existing folder or an ``owner/name`` hub id."""
    from retainfirst.models import EMBEDDED_ALIASES

    if name not in EMBEDDED_ALIASES and not Path(name).exists() and not looks_like_hub_id(name):
        raise RetainFirstError(f"model {name!r} does not exist (not a folder, alias or owner/name id)")


def evaluate_model(
    config: RunConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    show: bool = True,
) -> list[EvalResult]:
    """Evaluate ``config.model`` on ``config.eval.tasks`` and write ``out_dir/results.json``.

    Task data comes from ``config.data`` (``dir`` for WMDP/RWKU, ``benchmark`` for a saved facts
    benchmark). ``extra`` is stored next to the results; ``show`` prints the results table.
    """
    cfgmod.validate(config)
    check_tasks(config)
    check_model_name(config.model)
    if config.data.dir and not Path(config.data.dir).is_dir():
        raise RetainFirstError(f"--data-dir {config.data.dir} is not a directory")
    out = Path(out_dir)
    path = out / "results.json"
    with RunDir.open(out, command="eval", overwrite=overwrite, resume=False) as rundir:
        try:
            from retainfirst.models import load_model

            model, tokenizer = load_model(
                config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code
            )
            prep = prepare(config, model, tokenizer, None)
            rundir.confirm_overwrite()
            results = evaluate(model, tokenizer, config, prep, config.model)
            save_results(results, path, extra={"model": config.model, **(extra or {})})
            rundir.status["state"] = "done"
            rundir.save()
        except BaseException:
            rundir.discard()
            raise
    if show:
        print_eval_results(results, config.model, path)
    return results
