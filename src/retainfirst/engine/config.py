"""TrainConfig: every knob of one unlearning run, validated up front and saved with the run.

A pydantic model (see :mod:`retainfirst.validation`): a bad value fails at construction, before a
model is touched, with one line naming the field and the valid choices or range. The registry
names (synthesizer, objectives) and their options are checked too, against the registries as they
are then (plugins included).

``TrainConfig()`` is the bundled demo's training (``RunConfig().train``): SimNPO forget + NLL
retain on 4 x 64 tokens per side, sized for two CPU cores; the demo itself (``config.DEMO_PRESET``)
raises lr to 1e-4 and stops each sub-run at the matched forget level within 20 steps. The default
``forget_kwargs`` belong to the default ``forget_loss``: naming another forget loss without options
gives that loss's own defaults (the same for ``retain_loss`` / ``retain_kwargs``).

SimNPO's weight on a forget sequence is 2 sigmoid(-beta (NLL/|y| - delta)); the packed fact
passages start near 3-4 nats/token, so beta = 0.25 keeps that weight around 0.6 (measured: forget
gradient norm ~5 vs retain ~4-10) and lets it decay as the facts are forgotten. With beta = 2.5
(SimNPO's TOFU value) the weight is ~1e-3 here and nothing is forgotten (measured). With
alpha = gamma = 1 (measured, two shared CPU cores, 24 steps of ~4 s, sum): forget recall
0.51 -> 0.15 but neighbor 0.65 -> 0.73, MMLU 0.325 -> 0.325: the retain gradient dominates and there
is no conflict to resolve. The demo uses the paper's SimNPO weighting (alpha = 0.1, gamma = 1),
where the naive sum lets forgetting damage retention.
"""

from __future__ import annotations

import json
import math
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from retainfirst.errors import RetainFirstError
from retainfirst.io import atomic_write_text
from retainfirst.registry import Registry
from retainfirst.validation import (
    CommaList,
    Int,
    ListAsTuple,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Settings,
    UnitFloat,
    parse_options,
    validate_nested,
)

LrSchedule = Literal["constant", "linear", "cosine"]
Optimizer = Literal["adamw"]
MixedPrecision = Literal["no", "bf16", "fp16"]
SynthesisSpace = Literal["gradient", "update"]
LR_SCHEDULES: tuple[str, ...] = typing.get_args(LrSchedule)
OPTIMIZERS: tuple[str, ...] = typing.get_args(Optimizer)
MIXED_PRECISION: tuple[str, ...] = typing.get_args(MixedPrecision)

# Fields that may differ between an interrupted run and its resumption: they change no number.
RESUME_FREE_FIELDS = (
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "disable_progress",
    "save_final_model",
    "report_to",
    "run_name",
    "tracker_project",
    "tracker_dir",
    "log_step_cosines",
)

# Registry name -> the options that belong to it.
_OPTIONS_OF = {"forget_loss": "forget_kwargs", "retain_loss": "retain_kwargs"}


def options_follow_their_loss(data: Any) -> Any:
    """Train data where a loss named without options gets its own defaults, not the default loss's options."""
    if isinstance(data, dict):
        for name, options in _OPTIONS_OF.items():
            if name in data and options not in data and data[name] != TrainConfig.model_fields[name].default:
                data = {**data, options: {}}
    return data


class LoraOptions(Settings):
    """LoRA adapter settings (``train.lora``); the defaults apply to keys a config leaves out."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16
    dropout: UnitFloat = 0.0
    target_modules: Annotated[list[str], Field(min_length=1)] | str | None = None  # None = all linear


LORA_KEYS = tuple(LoraOptions.model_fields)


class TrainConfig(Settings):
    """Settings of one run. Batch sizes are per device: global batch = size x processes x accumulation."""

    error_prefix: typing.ClassVar[str] = "train config: "

    steps: PositiveInt = 24
    lr: PositiveFloat = 5e-5
    warmup_ratio: UnitFloat = 0.0
    warmup_steps: NonNegativeInt | None = None  # overrides warmup_ratio when set
    lr_schedule: LrSchedule = "constant"  # after warmup: constant | linear | cosine (decay to 0)
    optimizer: Optimizer = "adamw"
    weight_decay: NonNegativeFloat = 0.0
    betas: Annotated[tuple[UnitFloat, UnitFloat], ListAsTuple] = (0.9, 0.999)
    adam_eps: PositiveFloat = 1e-8
    forget_batch_size: PositiveInt = 4
    retain_batch_size: PositiveInt = 4
    gradient_accumulation_steps: PositiveInt = 1
    max_grad_norm: NonNegativeFloat | None = 1.0  # 0 or None = no clipping
    synthesizer: str = "sago"
    alpha: NonNegativeFloat = 0.1  # retain weight
    gamma: NonNegativeFloat = 1.0  # forget weight
    synthesizer_options: dict[str, Any] = Field(default_factory=dict)
    forget_loss: str = "simnpo"
    forget_kwargs: dict[str, Any] = Field(default_factory=lambda: {"beta": 0.25, "delta": 0.0})
    retain_loss: str = "nll"
    retain_kwargs: dict[str, Any] = Field(default_factory=dict)
    trainable_patterns: list[str] | None = None  # None = the forget objective's default, else all
    lora: dict[str, Any] | None = None  # LoraOptions keys: r, alpha, dropout, target_modules
    merge_lora: bool = False  # save the final model with adapters merged into the base weights
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    seed: NonNegativeInt = 0
    checkpoint_every: NonNegativeInt = 0  # steps; 0 = only at the end
    keep_checkpoints: NonNegativeInt = 0  # newest engine checkpoints kept on disk while training; 0 = all
    log_every: PositiveInt = 1  # steps between metrics.jsonl lines
    max_length: Annotated[Int, Field(ge=2)] | None = None  # longest example (also capped by the model)
    disable_progress: bool = False
    save_final_model: bool = False  # save_pretrained into out_dir/model at the end
    # "update": synthesize Adam's two preconditioned directions instead of the raw gradients (optim.py)
    synthesis_space: SynthesisSpace = "gradient"
    # cos(weight change, g_r / g_f) of every step; peak memory + ~3 copies of the trainable params
    log_step_cosines: bool = True
    report_to: Annotated[list[str], CommaList] = Field(default_factory=list)  # tensorboard, wandb, ...
    run_name: str | None = None  # the trackers' run name; None = the out_dir's name
    tracker_project: str = "retainfirst"  # the trackers' project (TensorBoard: a sub-directory)
    tracker_dir: str | None = None  # where local trackers write; None = the run's out_dir

    # ------------------------------------------------------------------------------------------
    @model_validator(mode="before")
    @classmethod
    def _options_follow_their_loss(cls, data: Any) -> Any:
        return options_follow_their_loss(data)

    @field_validator("trainable_patterns", mode="before")
    @classmethod
    def _patterns(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
            raise ValueError("must be a non-empty list of regexes (or null for the default)")
        for pattern in value:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                raise ValueError(f"has {pattern!r}, which is not a valid regex ({exc})") from None
        return list(value)

    @field_validator("report_to")
    @classmethod
    def _usable_trackers(cls, value: list[str]) -> list[str]:
        from retainfirst.engine.tracking import tracker_problem

        for name in value:
            problem = tracker_problem(name)
            if problem is not None:
                raise ValueError(problem)
        if len(set(value)) != len(value):
            raise ValueError("names a tracker twice")
        return value

    @field_validator("lora")
    @classmethod
    def _lora(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            validate_nested(LoraOptions, value)
        return value

    @field_validator("synthesizer")
    @classmethod
    def _known_synthesizer(cls, value: str) -> str:
        from retainfirst.synthesis import SYNTHESIZERS

        return registered(value, SYNTHESIZERS)

    @field_validator("forget_loss")
    @classmethod
    def _known_forget_loss(cls, value: str) -> str:
        from retainfirst.objectives import FORGET_OBJECTIVES

        return registered(value, FORGET_OBJECTIVES)

    @field_validator("retain_loss")
    @classmethod
    def _known_retain_loss(cls, value: str) -> str:
        from retainfirst.objectives import RETAIN_OBJECTIVES

        return registered(value, RETAIN_OBJECTIVES)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be <= steps ({self.steps})")
        if self.merge_lora and self.lora is None:
            raise ValueError("merge_lora=True needs lora settings")
        from retainfirst.objectives import FORGET_OBJECTIVES, RETAIN_OBJECTIVES
        from retainfirst.synthesis import SYNTHESIZERS

        checks = (  # validated against each class's Options model, without building anything
            ("synthesizer_options", SYNTHESIZERS, self.synthesizer, self.synthesizer_options),
            ("forget_kwargs", FORGET_OBJECTIVES, self.forget_loss, self.forget_kwargs),
            ("retain_kwargs", RETAIN_OBJECTIVES, self.retain_loss, self.retain_kwargs),
        )
        for key, registry, name, options in checks:
            cls = registry.lookup(name)
            try:
                parse_options(f"{registry.what} {cls.name!r}", cls.Options, options)
            except RetainFirstError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return self

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:  # type: ignore[override]  # BaseModel.validate is pydantic v1's
        """Check again (valid since construction; the registries behind the names may have changed)."""
        type(self).parse(dict(self))

    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.steps)

    @property
    def clip_enabled(self) -> bool:
        return bool(self.max_grad_norm)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls.parse(data)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def training_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the interrupted one (they change the numbers)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_FIELDS}


def registered(value: str, registry: Registry[Any]) -> str:
    """A field validator's check that ``value`` names an entry of ``registry`` (plugins included)."""
    try:
        registry.lookup(value)
    except RetainFirstError as exc:
        if str(exc).startswith("unknown "):
            raise ValueError(f"is not valid; choose one of {', '.join(registry.available())}") from None
        raise ValueError(f"cannot be loaded: {exc}") from None  # a plugin that failed to load says why
    return value
