"""What a run directory needs before its first evaluation: the training data (loaded, tokenized and
checked against every sub-run's limits) and each evaluation task's data (loaded once).

Everything here runs before the "before" evaluation, so a bad data file or an over-long example is
reported in seconds rather than after a long evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retainfirst.config import RunConfig, SubRun
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, TaskContext, get_tasks
from retainfirst.experiment.console import say


@dataclass
class Prepared:
    """Tokenized training data and each task's prepared data (in ``eval.tasks`` order)."""

    forget_examples: list[Any] = field(default_factory=list)
    retain_examples: list[Any] = field(default_factory=list)
    tasks: list[EvalTask] = field(default_factory=list)
    task_data: dict[str, Any] = field(default_factory=dict)  # task id -> what its prepare returned
    info: dict[str, Any] = field(default_factory=dict)  # recorded in status.json ("data")


def fact_benchmark(config: RunConfig, model: Any, tokenizer: Any, workdir: Path | None) -> Any:
    """The bundled benchmark: from ``data.benchmark``, else built from the model (cached per model).

    A copy is saved in the run directory, so ``retainfirst eval --benchmark DIR/benchmark.json``
    scores an unlearned model on exactly the facts the original model knew.
    """
    from retainfirst.benchmarks.facts import FactBenchmark, load_or_build_fact_benchmark

    data = config.data
    if data.benchmark:
        path = Path(data.benchmark)
        if not path.is_file():
            raise RetainFirstError(f"benchmark file {path} does not exist")
        bench = FactBenchmark.load(path)
    else:
        say(f"facts benchmark: loading or building it for {config.model} (cached after the first time)")
        bench = load_or_build_fact_benchmark(
            model,
            tokenizer,
            config.model,
            seed=data.benchmark_seed,
            n_forget=data.n_forget,
            n_retain=data.n_retain,
            n_heldout=data.n_heldout,
            n_general=data.n_general,
        )
    if workdir is not None:
        bench.save(workdir / "benchmark.json")
    return bench


def rwku_forget_targets(config: RunConfig) -> Any:
    from retainfirst.data import load_rwku

    return load_rwku(config.data.dir or "", targets=config.data.rwku_forget_targets)


def source_builders(info: dict[str, Any]) -> dict[str, Callable[[TaskContext], Any]]:
    """The shared sources tasks and training data read, each built once per directory."""

    def facts(context: TaskContext) -> Any:
        bench = fact_benchmark(context.config, context.model, context.tokenizer, context.workdir)
        info["benchmark"] = dict(getattr(bench, "stats", {}))
        return bench

    return {"facts": facts, "rwku": lambda context: rwku_forget_targets(context.config)}


def training_texts(context: TaskContext) -> tuple[list[str], list[str]]:
    """Forget and retain documents of ``data.source`` (facts | corpus | rwku)."""
    data = context.config.data
    if data.source == "facts":
        bench = context.source("facts")
        forget, retain = list(bench.forget_corpus), list(bench.retain_corpus)
    elif data.source == "corpus" and data.jsonl_as_raw_text:
        from retainfirst.data.corpora import read_raw_lines

        forget, retain = (
            read_raw_lines(context.data_path(name or "")) for name in (data.forget, data.retain)
        )
    elif data.source == "corpus":
        forget, retain = context.load_texts(data.forget), context.load_texts(data.retain)
    else:
        from retainfirst.data import load_rwku

        forget = context.source("rwku").forget_corpus()
        retain = load_rwku(data.dir or "", targets=data.rwku_retain_targets).forget_corpus()
    for kind, texts in (("forget", forget), ("retain", retain)):
        if not texts:
            raise RetainFirstError(f"the {kind} set of data.source={data.source} is empty; check the data")
    return forget, retain


def tofu_examples(context: TaskContext, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """TOFU's forget and retain question/answer pairs, the loss on the answer tokens only (as TOFU
    trains); the texts (prompt + answer) also feed tasks that read the training texts (mia)."""
    from retainfirst.data import tokenize_pairs
    from retainfirst.data.tofu import tofu_training_pairs

    data = context.config.data
    forget, retain = tofu_training_pairs(data.dir or "", data.tofu_split, data.tofu_template)
    context.forget_texts = [p + a for p, a in forget]
    context.retain_texts = [p + a for p, a in retain]
    return tuple(  # type: ignore[return-value]
        tokenize_pairs([p for p, _ in pairs], [a for _, a in pairs], tokenizer, max_length=data.max_length)
        for pairs in (forget, retain)
    )


def check_training_data(prep: Prepared, model: Any, plan: Sequence[SubRun]) -> None:
    """Fail now, not after the "before" evaluation, on data no sub-run could train on (empty sets,
    malformed examples, examples longer than the model's context or ``train.max_length``)."""
    from retainfirst.engine.batches import check_examples, context_limit

    for max_length in dict.fromkeys(sub.train.max_length for sub in plan):
        limit = context_limit(model, max_length)
        check_examples(prep.forget_examples, "forget", limit)
        check_examples(prep.retain_examples, "retain", limit)


def prepare(
    config: RunConfig,
    model: Any,
    tokenizer: Any,
    workdir: Path | None,
    *,
    plan: Sequence[SubRun] | None = None,
) -> Prepared:
    """Load the training data (when ``plan`` is given: it is tokenized and checked for every sub-run)
    and then the data of each task in ``config.eval.tasks``."""
    from retainfirst.data import tokenize_texts

    data = config.data
    training = plan is not None
    prep = Prepared(tasks=get_tasks(config.eval.tasks))
    wanted = {name for task in prep.tasks for name in task.sources(config)}
    if training and data.source in ("facts", "rwku"):
        wanted.add(data.source)
    context = TaskContext(
        config,
        model,
        tokenizer,
        workdir,
        training=training,
        builders=source_builders(prep.info),
        wanted=wanted,
    )
    if training:
        if data.source == "tofu":
            forget_examples, retain_examples = tofu_examples(context, tokenizer)
        else:
            context.forget_texts, context.retain_texts = training_texts(context)
            chunk = {
                "max_length": data.max_length,
                "pack": data.pack,
                "join": data.join_documents,
                "bos_per_chunk": data.bos_per_chunk,
            }
            forget_examples = tokenize_texts(context.forget_texts, tokenizer, **chunk)
            retain_examples = tokenize_texts(context.retain_texts, tokenizer, **chunk)
        prep.forget_examples = forget_examples[: data.max_forget_examples]
        prep.retain_examples = retain_examples[: data.max_retain_examples]
        prep.info |= {
            "forget_examples": len(prep.forget_examples),
            "retain_examples": len(prep.retain_examples),
        }
        check_training_data(prep, model, plan)
    for task in prep.tasks:
        prep.task_data[task.id] = task.prepare(context)
    return prep


def evaluate(model: Any, tokenizer: Any, config: RunConfig, prep: Prepared, label: str) -> list[EvalResult]:
    """Run every prepared task on ``model`` (in ``eval.tasks`` order); the model is left as it was."""
    was_training = model.training
    model.eval()
    results: list[EvalResult] = []
    try:
        for task in prep.tasks:
            data = prep.task_data[task.id]
            say(f"[{label}] {task.id}: {task.describe(data)}")
            results.extend(task.run(model, tokenizer, data, config.eval))
    finally:
        model.train(was_training)
    return results
