"""The experiment runner: prepare -> evaluate "before" -> train each sub-run -> evaluate -> report.

```python
result = run_experiment(load_config("my.yaml"), "runs/my")       # one sub-run per synthesizer
result = run_experiment(config, "runs/sw", grid=["alpha=0.5,1"])  # a sweep over a grid
result = run_experiment(None, "runs/my", resume=True)              # continue an interrupted one
```

Every run directory records its state in ``status.json`` (``running``/``failed``/``done`` per
sub-run, with the error line), so a crash is visible and ``resume=True`` continues it: finished
sub-runs are skipped and the interrupted one resumes from the engine's last checkpoint. A failure
before training removes what this invocation wrote. In a multi-process launch only the main process
(``RANK`` 0) evaluates and writes; the others train and follow the directory.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retainfirst import config as cfgmod
from retainfirst.config import RunConfig, SubRun, load_config, parse_grid, plan_runs, to_dict, to_yaml
from retainfirst.errors import RetainFirstError
from retainfirst.evals.tasks import check_tasks
from retainfirst.experiment.console import say
from retainfirst.experiment.during_training import EvidenceSettings, forget_callback, with_seeds
from retainfirst.experiment.prepare import evaluate, prepare
from retainfirst.experiment.report import ITEMS_FILE, rerun_command, save_items, write_report
from retainfirst.experiment.rundir import CONFIG_FILE, RunDir, default_out_dir
from retainfirst.io import atomic_write_text


@dataclass
class ExperimentResult:
    """What ``run_experiment`` produced (``runs`` and ``report`` are empty on non-main processes)."""

    out_dir: Path
    runs: list[dict[str, Any]] = field(default_factory=list)  # per-run summaries (as in results.json)
    report: dict[str, Any] = field(default_factory=dict)  # the results.json payload
    status: dict[str, Any] = field(default_factory=dict)  # status.json

    @property
    def state(self) -> str:
        return str(self.status.get("state", ""))


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def error_line(exc: BaseException) -> str:
    """The first line of an error, as recorded in status.json."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, RetainFirstError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def out_dir_of(config: RunConfig) -> Path:
    """``config.out``, else ``runs/<name>`` (a name that could leave ``runs/`` is refused)."""
    return Path(config.out) if config.out else default_out_dir(config.name)


def resume_config(
    out: Path, config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> RunConfig:
    """The config saved in ``out``; a config file or overrides given with it must not change anything."""
    saved = Path(out) / CONFIG_FILE
    if not saved.is_file():
        raise RetainFirstError(f"nothing to resume in {out}: it has no {CONFIG_FILE}")
    config = load_config(saved)
    if config_path is not None or overrides:
        _check_same(config, load_config(config_path or saved, overrides), saved)
    return config


def _check_same(saved: RunConfig, wanted: RunConfig, where: Path) -> None:
    # The output location may be spelled differently; it is not part of what the run computes.
    diff = [d for d in _diff(to_dict(saved), to_dict(wanted)) if d != "out"]
    if diff:
        raise RetainFirstError(
            f"--resume continues the run as configured in {where}; these settings differ: "
            + ", ".join(diff[:8])
            + (" ..." if len(diff) > 8 else "")
        )


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in dict.fromkeys([*a, *b]):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "config"]


def run_experiment(
    config: RunConfig | None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    grid: Sequence[str] | None = None,
    *,
    sweep: bool | None = None,
    push_to_hub: str | None = None,
) -> ExperimentResult:
    """Train one sub-run per synthesizer (times the sweep ``grid``, e.g. ``["alpha=0.5,1"]``), evaluate
    the model before (once) and after each, and write the report into ``out_dir``.

    ``out_dir`` defaults to ``config.out`` or ``runs/<name>``. ``resume=True`` continues the directory
    with its saved config (``config`` may be None; when given it must equal the saved one) and grid.
    ``sweep`` (default: whether a grid is given) names the directory's command, ``run`` or ``sweep``.
    """
    sweep = grid is not None if sweep is None else sweep
    command = "sweep" if sweep else "run"
    grid_items = list(grid or [])
    if overwrite and resume:
        raise RetainFirstError("--overwrite and --resume exclude each other; pass one")
    if resume:
        if out_dir is None:
            raise RetainFirstError("--resume needs --out DIR (the directory to continue)")
        saved = resume_config(Path(out_dir))
        if config is not None:
            _check_same(saved, config, Path(out_dir) / CONFIG_FILE)
        config = saved
    if config is None:
        raise RetainFirstError("run_experiment needs a config (or resume=True and an existing out_dir)")
    cfgmod.validate(config)
    check_tasks(config)
    evidence = EvidenceSettings.from_config(config)
    out = Path(out_dir) if out_dir is not None else out_dir_of(config)
    # validates every sub-run before anything is written; each sub-run once per seed of `seeds`
    plan = with_seeds(plan_runs(config, parse_grid(grid_items)), evidence.seeds)
    if push_to_hub and not any(sub.train.save_final_model for sub in plan):
        raise RetainFirstError("--push-to-hub needs a saved model: set train.save_final_model=true")
    main = is_main_process()
    if not main:
        rundir = RunDir.follow(out, resume=resume)
    else:
        rundir = RunDir.open(out, command=command, overwrite=overwrite, resume=resume)
    with rundir:
        if resume:
            saved_grid = rundir.status.get("grid", [])
            if main and sweep and grid_items and saved_grid != grid_items:
                raise RetainFirstError(
                    f"--resume: the grid differs from the saved one ({' '.join(saved_grid)})"
                )
            plan = with_seeds(plan_runs(config, parse_grid(saved_grid)), evidence.seeds)
            if main:
                rundir.status["state"] = "running"
        elif main:
            rundir.status["grid"] = grid_items
            rundir.status["runs"] = {"before": {"state": "pending"}} | {
                s.name: {"state": "pending", "family": s.family, "settings": s.settings} for s in plan
            }
        runner = _Runner(
            config, plan, rundir, title=f"{config.name}: {command}", sweep=sweep, push_repo=push_to_hub
        )
        runner.evidence = evidence
        try:
            if not resume and main:
                atomic_write_text(out / CONFIG_FILE, to_yaml(config))
            rundir.save()
            report = runner.execute()
        except BaseException as exc:
            if not runner.started_training and not resume:
                rundir.discard()  # nothing ran: leave no partial output behind
            else:
                rundir.fail(error_line(exc), _running_entry(rundir))
            raise
    return ExperimentResult(out, list(report.get("runs", [])), report, dict(rundir.status))


def plan_summary(config: RunConfig, grid: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The resolved sub-runs of ``config`` as plain data (``retainfirst run CONFIG --plan``): name,
    synthesizer, family, released config reproduced, epochs and the full TrainConfig. Loads nothing.

    With ``epochs`` set, ``train.steps`` is a placeholder: the steps are computed at run time from
    the number of forget examples (ceil(epochs x examples / global forget batch)).
    """
    return [
        {
            "name": sub.name,
            "synthesizer": sub.train.synthesizer,
            "family": sub.family,
            "reproduces": sub.reproduces,
            "epochs": sub.epochs,
            "settings": sub.settings,
            "train": to_dict(sub.train),
        }
        for sub in with_seeds(plan_runs(config, parse_grid(grid)), config.seeds)
    ]


def _running_entry(rundir: RunDir) -> str | None:
    for name, entry in rundir.status.get("runs", {}).items():
        if entry.get("state") == "running":
            return name
    return None


def with_epochs(sub: SubRun, epochs: float, forget_examples: int) -> SubRun:
    """``epochs`` passes over the forget examples, in optimizer steps of the global forget batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = sub.train.forget_batch_size * sub.train.gradient_accumulation_steps * world
    steps = max(1, math.ceil(epochs * forget_examples / per_step))
    return cfgmod.with_changes(sub, train=cfgmod.with_changes(sub.train, steps=steps))


def _load(config: RunConfig) -> tuple[Any, Any]:
    from retainfirst.models import load_model

    return load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)


class _Runner:
    """Runs the sub-runs of a directory (skipping finished ones) and writes the report."""

    def __init__(
        self,
        config: RunConfig,
        plan: list[SubRun],
        rundir: RunDir,
        *,
        title: str,
        sweep: bool,
        push_repo: str | None = None,
    ):
        self.config = config
        self.push_repo = push_repo
        self.plan = plan
        self.rundir = rundir
        self.title = title
        self.sweep = sweep
        self.started_training = False
        self.evidence = EvidenceSettings()

    def share(self, folder: Path, sub: SubRun, after: list[Any], before: list[Any]) -> None:
        """The saved model's Hub model card, and the upload when ``--push-to-hub`` asked for it."""
        from retainfirst.report.model_card import push_to_hub, repo_for_run, write_model_card

        write_model_card(folder, self.config, sub, after, before=before)
        if self.push_repo:
            push_to_hub(folder, repo_for_run(self.push_repo, sub.name, len(self.plan)))

    def execute(self) -> dict[str, Any]:
        from retainfirst import engine
        from retainfirst.evals.results import load_results, save_results

        out, config, rundir = self.rundir.path, self.config, self.rundir
        main = rundir.writer  # non-main processes of a multi-GPU launch only train
        say(f"model {config.model}: preparing data and evaluation sets")
        model, tokenizer = _load(config)
        prep = prepare(config, model, tokenizer, out if main else None, plan=self.plan)
        rundir.status["data"] = prep.info
        rundir.confirm_overwrite()  # the new run passed its checks: a replaced old run may go now
        before_path = out / "before" / "results.json"
        before: list[Any] = []
        if main and (rundir.state_of("before") != "done" or not before_path.is_file()):
            rundir.mark("before", "running")
            say("evaluating the model before unlearning")
            before = evaluate(model, tokenizer, config, prep, "before")
            save_results(before, before_path, extra={"model": config.model})
            rundir.mark("before", "done")
        elif main:
            before = load_results(before_path)
        del model
        self.plan = [
            with_epochs(sub, sub.epochs, len(prep.forget_examples)) if sub.epochs is not None else sub
            for sub in self.plan
        ]
        # In-run evaluation: built on every rank (the engine broadcasts the stop signal), run on the main one.
        during: dict[str, Any] = {}
        if self.evidence.evaluates_during_training:
            callback = forget_callback(config, tokenizer, prep.tasks, prep.task_data, self.evidence)
            during = {"callback": callback, "eval_every": self.evidence.every}

        for k, sub in enumerate(self.plan, 1):
            run_dir = out / "runs" / sub.name
            results_path = run_dir / "results.json"
            state = rundir.state_of(sub.name)
            if state == "done" and (results_path.is_file() or not main):
                say(f"[{k}/{len(self.plan)}] {sub.name}: done, skipped")
                continue
            resume = state in ("running", "failed")
            rundir.mark(sub.name, "running", family=sub.family, settings=sub.settings)
            self.started_training = True
            say(f"[{k}/{len(self.plan)}] {sub.name}: {sub.train.steps} steps{' (resumed)' if resume else ''}")
            model, tokenizer = _load(config)
            result = engine.unlearn(
                model,
                tokenizer,
                prep.forget_examples,
                prep.retain_examples,
                sub.train,
                run_dir,
                resume=resume,
                **during,
            )
            if main:
                after = evaluate(result.model, tokenizer, config, prep, sub.name)
                extra = {"run": sub.name, "family": sub.family, "settings": sub.settings}
                extra["stopped_early"] = bool(getattr(result, "stopped_early", False))
                save_items(after, run_dir / ITEMS_FILE)
                save_results(after, results_path, extra=extra)
                if sub.train.save_final_model:
                    self.share(run_dir / "model", sub, after, before)
                if not config.keep_finished_checkpoints:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            rundir.mark(sub.name, "done", steps_done=result.steps_done)
            del model, result
        if not main:
            return {}
        report = write_report(
            out,
            config,
            self.plan,
            before,
            title=self.title,
            rerun=rerun_command(out, self.sweep, rundir.status.get("grid", [])),
            evidence=self.evidence,
        )
        trackers = sorted({name for sub in self.plan for name in sub.train.report_to})
        if trackers:  # the final table goes to the same trackers as the per-step metrics
            from retainfirst.engine import log_final_table

            columns = ("name", "family", "forget_score", "utility")
            log_final_table(trackers, out, [{k: r.get(k) for k in columns} for r in report["runs"]])
        rundir.status["state"] = "done"
        rundir.status.pop("error", None)
        rundir.save()
        return report
