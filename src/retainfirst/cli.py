"""Command line: ``retainfirst run | sweep | eval | data``: argument parsing and error reporting only.

``run`` trains one sub-run per synthesizer of a config (the bundled demo without one), evaluates
the model before (once) and after each sub-run, and writes a report directory; ``sweep`` does the
same over a cartesian grid of training settings and compares the Pareto fronts of the synthesizer
families; ``eval`` scores any model on a list of tasks; ``data`` downloads a benchmark
(:func:`retainfirst.data.download.setup_benchmark`). The work is done by
:func:`retainfirst.experiment.run_experiment` and :func:`retainfirst.experiment.evaluate_model`.
User errors (:class:`RetainFirstError`, bad arguments) print one line on stderr and exit with 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from retainfirst import config as cfgmod
from retainfirst.config import RunConfig, load_config
from retainfirst.errors import RetainFirstError
from retainfirst.experiment.rundir import close_open_rundirs

PROG = "retainfirst"
EXIT_USAGE = 2


class UsageError(RetainFirstError):
    """A bad command line (argparse's complaint), printed as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + error and exiting (we print one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ----------------------------------------------------------------------------------------------
# Commands


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    for item in items[1:]:
        if "=" not in item:
            raise RetainFirstError(f"{item!r} is not key=value; the config file must come first")
    return None, list(items)


def _start(
    args: argparse.Namespace, sweep: bool, config_path: str | None, overrides: list[str], grid: list[str]
) -> int:
    from retainfirst.experiment import resume_config, run_experiment

    if args.resume:
        if args.out is None:
            raise RetainFirstError("--resume needs --out DIR (the directory to continue)")
        config = resume_config(Path(args.out), config_path, overrides)
    else:
        config = load_config(config_path, overrides)
    grid_arg = grid if sweep else None
    push = getattr(args, "push_to_hub", None)
    extra = {"push_to_hub": push} if push else {}
    run_experiment(
        config, args.out, resume=args.resume, overwrite=args.overwrite, grid=grid_arg, sweep=sweep, **extra
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    config_path, overrides = _split_config_and_overrides(args.items)
    if args.plan:
        return _print_plan(args, config_path, overrides)
    if args.push_to_hub:
        from retainfirst.report.model_card import check_push

        check_push(args.push_to_hub)  # no token or no network: fail now, not after training
    return _start(args, False, config_path, overrides, [])


def _print_plan(args: argparse.Namespace, config_path: str | None, overrides: list[str]) -> int:
    """``run --plan``: the resolved sub-runs as JSON on stdout; no model, data or directory is touched."""
    from retainfirst.experiment import plan_summary
    from retainfirst.io import json_safe

    if args.resume:
        raise RetainFirstError("--plan prints the plan of a config; drop --resume (or --plan)")
    plan = plan_summary(load_config(config_path, overrides))
    print(json.dumps(json_safe(plan), indent=2))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    items = list(args.items)
    if args.resume and not items:
        return _start(args, True, None, list(args.set or []), [])  # config and grid from --out
    if not items or "=" in items[0]:
        raise RetainFirstError("sweep needs a config file first, then grid axes such as alpha=0.5,1,2")
    config_path, rest = items[0], items[1:]
    # key=value with several values is an axis; --set key=value is a plain override.
    return _start(args, True, config_path, list(args.set or []), rest)


def cmd_eval(args: argparse.Namespace) -> int:
    from retainfirst.experiment import evaluate_model

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise RetainFirstError("--tasks is empty; give e.g. --tasks mmlu,facts")
    limit, shots = args.limit, args.shots
    if limit is not None and limit < 1:
        raise RetainFirstError("--limit must be >= 1")
    if shots < 0:
        raise RetainFirstError("--shots must be >= 0")
    limits = {f"{k}_limit": limit for k in ("mmlu", "wmdp", "probe", "lm_eval")}
    ev = cfgmod.EvalConfig(
        tasks=tasks,
        mmlu_shots=shots,
        wmdp_shots=shots,
        batch_size=args.batch_size,
        mcq_mode=args.mode,
        **limits,
    )
    data = cfgmod.DataConfig(dir=args.data_dir, benchmark=args.benchmark)
    config = RunConfig(
        name="eval",
        model=args.model,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        synthesizers=[],
        data=data,
        eval=ev,
    )
    extra = {"tasks": tasks, "limit": limit}
    evaluate_model(config, args.out, overwrite=args.overwrite, extra=extra)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from retainfirst.data.download import setup_benchmark

    setup_benchmark(args.benchmark, args.dir)
    return 0


# ----------------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Retention-first machine unlearning for causal LMs.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,sweep,eval,data}")

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
    run.add_argument(
        "--plan",
        action="store_true",
        help="print the resolved sub-runs as JSON (name, reproduces, full training config) and exit; "
        "loads no model or data",
    )
    run.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload each saved model with its model card to REPO (REPO-<run> for several runs); "
        "needs HF_TOKEN and train.save_final_model: true",
    )
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
        help=f"comma-separated: {', '.join(_task_names())}",
    )
    ev.add_argument("--limit", type=int, default=None, help="at most N items per task")
    ev.add_argument("--shots", type=int, default=0, help="few-shot examples for MCQ tasks")
    ev.add_argument(
        "--mode", choices=cfgmod.MCQ_MODES, default="option", help="MCQ scoring (default: option)"
    )
    ev.add_argument("--data-dir", default=None, help="folder with WMDP / RWKU data")
    ev.add_argument("--benchmark", default=None, help="a saved facts benchmark (e.g. a run's benchmark.json)")
    ev.add_argument("--dtype", choices=cfgmod.DTYPES, default="float32")
    ev.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a hub model run the Python in its repository (off by default; see SECURITY.md)",
    )
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--out", required=True, metavar="DIR", help="output directory for results.json")
    ev.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    ev.set_defaults(handler=cmd_eval)

    data = sub.add_parser(
        "data",
        help="download a benchmark from the Hugging Face hub into the layout the loaders read",
        description="retainfirst data NAME [--dir DIR]: fetch, verify and record (MANIFEST.json) a "
        "benchmark; files already verified are kept. Needs the hub extra and network access.",
    )
    data.add_argument("benchmark", choices=_benchmark_names(), help="muse = MUSE-News")
    data.add_argument(
        "--dir",
        default=None,
        metavar="DIR",
        help="target folder (default: the folder the bundled configs use, e.g. data/TOFU)",
    )
    data.set_defaults(handler=cmd_data)
    return parser


def _benchmark_names() -> list[str]:
    from retainfirst.data.download import benchmark_names

    return list(benchmark_names())


def _task_names() -> list[str]:
    from retainfirst.evals.tasks import available_tasks

    return available_tasks()


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
