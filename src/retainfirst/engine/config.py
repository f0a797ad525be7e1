"""TrainConfig: every knob of one unlearning run, validated up front and saved with the run.

Validation happens in ``__post_init__`` so a bad value fails before a model is touched, with a
message that names the field and the valid choices. Registry names (synthesizer, objectives) are
checked when :func:`retainfirst.engine.unlearn` builds them, because those registries can grow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retainfirst.errors import RetainFirstError

LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw",)
MIXED_PRECISION = ("no", "bf16", "fp16")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules")

# Fields that may differ between an interrupted run and its resumption: they change no number.
RESUME_FREE_FIELDS = (
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "disable_progress",
    "save_final_model",
)


@dataclass
class TrainConfig:
    """Settings of one run. Batch sizes are per device: global batch = size x processes x accumulation."""

    steps: int = 100
    lr: float = 1e-5
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    lr_schedule: str = "constant"  # after warmup: constant | linear | cosine (decay to 0)
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    forget_batch_size: int = 4
    retain_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0  # 0 or None = no clipping
    synthesizer: str = "sago"
    alpha: float = 1.0  # retain weight
    gamma: float = 1.0  # forget weight
    synthesizer_options: dict[str, Any] = field(default_factory=dict)
    forget_loss: str = "ga"
    forget_kwargs: dict[str, Any] = field(default_factory=dict)
    retain_loss: str = "nll"
    retain_kwargs: dict[str, Any] = field(default_factory=dict)
    trainable_patterns: list[str] | None = None  # None = the forget objective's default, else all
    lora: dict[str, Any] | None = None  # {"r", "alpha", "dropout", "target_modules"}
    merge_lora: bool = False  # save the final model with adapters merged into the base weights
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end
    keep_checkpoints: int = 0  # newest checkpoints kept on disk; 0 = all
    log_every: int = 1  # steps between metrics.jsonl lines
    max_length: int | None = None  # longest example allowed (also capped by the model's context)
    disable_progress: bool = False
    save_final_model: bool = True  # save_pretrained into out_dir/model at the end

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise RetainFirstError on the first invalid field."""
        _int(self, "steps", minimum=1)
        _number(self, "lr", positive=True)
        _number(self, "warmup_ratio", non_negative=True)
        if self.warmup_ratio >= 1:
            _fail("warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        if self.warmup_steps is not None:
            _int(self, "warmup_steps", minimum=0)
            if self.warmup_steps > self.steps:
                _fail("warmup_steps", self.warmup_steps, f"must be <= steps ({self.steps})")
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "optimizer", OPTIMIZERS)
        _number(self, "weight_decay", non_negative=True)
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(_is_number(b) and 0 <= b < 1 for b in self.betas)
        ):
            _fail("betas", self.betas, "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        _number(self, "adam_eps", positive=True)
        _int(self, "forget_batch_size", minimum=1)
        _int(self, "retain_batch_size", minimum=1)
        _int(self, "gradient_accumulation_steps", minimum=1)
        if self.max_grad_norm is not None:
            _number(self, "max_grad_norm", non_negative=True)
        if not isinstance(self.synthesizer, str) or not self.synthesizer:
            _fail(
                "synthesizer", self.synthesizer, "must be a synthesizer name such as 'sum', 'pcgrad', 'sago'"
            )
        _number(self, "alpha", non_negative=True)
        _number(self, "gamma", non_negative=True)
        for name in ("synthesizer_options", "forget_kwargs", "retain_kwargs"):
            if not isinstance(getattr(self, name), dict):
                _fail(name, getattr(self, name), "must be a mapping of option names to values")
        for name in ("forget_loss", "retain_loss"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _fail(name, getattr(self, name), "must be an objective name such as 'ga', 'npo', 'nll'")
        self._validate_patterns()
        self._validate_lora()
        for name in ("merge_lora", "gradient_checkpointing", "disable_progress", "save_final_model"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "must be true or false")
        _choice(self, "mixed_precision", MIXED_PRECISION)
        _int(self, "seed", minimum=0)
        _int(self, "checkpoint_every", minimum=0)
        _int(self, "keep_checkpoints", minimum=0)
        _int(self, "log_every", minimum=1)
        if self.max_length is not None:
            _int(self, "max_length", minimum=2)

    def _validate_patterns(self) -> None:
        patterns = self.trainable_patterns
        if patterns is None:
            return
        if isinstance(patterns, str) or not isinstance(patterns, list | tuple) or not patterns:
            _fail(
                "trainable_patterns",
                patterns,
                "must be a non-empty list of regexes (or null for the default)",
            )
        self.trainable_patterns = list(patterns)
        for pattern in self.trainable_patterns:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as exc:
                _fail("trainable_patterns", pattern, f"is not a valid regex ({exc})")

    def _validate_lora(self) -> None:
        lora = self.lora
        if lora is None:
            if self.merge_lora:
                _fail("merge_lora", True, "needs lora settings")
            return
        if not isinstance(lora, dict):
            _fail("lora", lora, f"must be null or a mapping with keys {list(LORA_KEYS)}")
        unknown = sorted(set(lora) - set(LORA_KEYS))
        if unknown:
            _fail("lora", unknown, f"has unknown key(s); valid keys: {list(LORA_KEYS)}")
        r = lora.get("r", 8)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            _fail("lora.r", r, "must be an integer >= 1")
        alpha = lora.get("alpha", 16)
        if not _is_number(alpha) or alpha <= 0:
            _fail("lora.alpha", alpha, "must be a number > 0")
        dropout = lora.get("dropout", 0.0)
        if not _is_number(dropout) or not 0 <= dropout < 1:
            _fail("lora.dropout", dropout, "must be a number in [0, 1)")
        targets = lora.get("target_modules")
        if targets is not None and not (
            isinstance(targets, str)
            or (isinstance(targets, list | tuple) and targets and all(isinstance(t, str) for t in targets))
        ):
            _fail("lora.target_modules", targets, "must be a module-name list, a regex string or null")

    # ------------------------------------------------------------------------------------------
    @property
    def num_warmup_steps(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.steps)

    @property
    def clip_enabled(self) -> bool:
        return bool(self.max_grad_norm)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        if not isinstance(data, dict):
            raise RetainFirstError(f"a train config must be a mapping, got {type(data).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise RetainFirstError(f"unknown train config field(s) {unknown}; valid fields: {valid}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def training_fields(self) -> dict[str, Any]:
        """The fields a resumed run must share with the interrupted one (they change the numbers)."""
        return {k: v for k, v in self.to_dict().items() if k not in RESUME_FREE_FIELDS}


# ----------------------------------------------------------------------------------------------


def _fail(name: str, value: Any, rule: str) -> None:
    raise RetainFirstError(f"train config: {name}={value!r} {rule}")


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _number(cfg: TrainConfig, name: str, *, positive: bool = False, non_negative: bool = False) -> None:
    value = getattr(cfg, name)
    if not _is_number(value):
        _fail(name, value, "must be a finite number")
    if positive and not value > 0:
        _fail(name, value, "must be > 0")
    if non_negative and not value >= 0:
        _fail(name, value, "must be >= 0")


def _int(cfg: TrainConfig, name: str, *, minimum: int) -> None:
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"must be an integer >= {minimum}")


def _choice(cfg: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        _fail(name, value, f"is not valid; choose one of {list(choices)}")
