"""TrainConfig validation and round trips."""

from __future__ import annotations

import pytest

from retainfirst.engine import TrainConfig
from retainfirst.errors import RetainFirstError


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("lr_schedule", "step", "lr_schedule='step' is not valid; choose one of constant, linear, cosine"),
        ("optimizer", "sgd", "choose one of adamw"),
        ("mixed_precision", "fp8", "choose one of no, bf16, fp16"),
        ("steps", 0, "steps=0 must be an integer >= 1"),
        ("lr", -1.0, "lr=-1.0 must be > 0"),
        ("lr", float("nan"), "must be a finite number"),
        ("warmup_ratio", 1.0, "must be in [0, 1)"),
        ("warmup_steps", 20, "must be <= steps"),
        ("betas", (0.9, 1.5), "betas[1]=1.5 must be in [0, 1)"),
        ("gradient_accumulation_steps", 0, "gradient_accumulation_steps=0"),
        ("forget_batch_size", True, "forget_batch_size=True is invalid; expected an integer"),
        ("max_grad_norm", -1, "max_grad_norm=-1 must be >= 0"),
        ("trainable_patterns", "layers", "non-empty list of regexes"),
        ("trainable_patterns", ["(unclosed"], "not a valid regex"),
        (
            "lora",
            {"rank": 8},
            "unknown key 'lora.rank'; valid keys in lora: r, alpha, dropout, target_modules",
        ),
        ("lora", {"r": 0}, "lora.r=0 must be an integer >= 1"),
        ("merge_lora", True, "merge_lora=True needs lora"),
        ("forget_kwargs", [1], "forget_kwargs=[1] is invalid; expected a mapping"),
        ("log_every", 0, "log_every=0"),
        ("max_length", 1, "max_length=1"),
    ],
)
def test_invalid_fields_name_the_field_and_choices(field, value, message):
    with pytest.raises(RetainFirstError, match="train config") as info:
        TrainConfig(**{"steps": 10, field: value})
    assert message in str(info.value)


def test_dict_round_trip_and_json_file(tmp_path):
    cfg = TrainConfig(
        steps=7,
        lr=2e-5,
        betas=[0.8, 0.95],
        lora={"r": 4, "alpha": 8, "target_modules": ["q_proj"]},
        trainable_patterns=[r"layers\.1\."],
        synthesizer_options={"keep_retain_where_forget_zero": True},
    )
    assert cfg.betas == (0.8, 0.95)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    cfg.save(tmp_path / "train_config.json")
    assert TrainConfig.load(tmp_path / "train_config.json") == cfg


def test_from_dict_rejects_unknown_fields_listing_valid_ones():
    with pytest.raises(RetainFirstError, match=r"unknown key 'learning_rate'; valid keys: steps, lr,"):
        TrainConfig.from_dict({"learning_rate": 1e-5})


def test_warmup_steps_override_ratio():
    assert TrainConfig(steps=100, warmup_ratio=0.1).num_warmup_steps == 10
    assert TrainConfig(steps=100, warmup_ratio=0.1, warmup_steps=3).num_warmup_steps == 3


def test_training_fields_ignore_bookkeeping():
    a = TrainConfig(steps=5, checkpoint_every=1, disable_progress=True)
    b = TrainConfig(steps=5, checkpoint_every=0)
    assert a.training_fields() == b.training_fields()
    assert a.training_fields() != TrainConfig(steps=6).training_fields()


def test_registry_names_and_their_options_are_checked_at_construction():
    with pytest.raises(
        RetainFirstError,
        match=r"^train config: synthesizer='nope' is not valid; choose one of aligned_mtl, blur,",
    ):
        TrainConfig(synthesizer="nope")
    with pytest.raises(
        RetainFirstError,
        match=r"^train config: forget_kwargs: forget objective 'simnpo': unknown option 'gamma'; "
        r"valid options: beta",
    ):
        TrainConfig(forget_kwargs={"gamma": 1.0})
    with pytest.raises(
        RetainFirstError, match=r"synthesizer_options: synthesizer 'sago': unknown option 'eps'"
    ):
        TrainConfig(synthesizer_options={"eps": 1e-8})
    cfg = TrainConfig(synthesizer="pcgrad", synthesizer_options={"eps": 0.0}, forget_loss="npo")
    assert cfg.forget_kwargs == {}  # the default options belong to the default forget loss
    cfg.validate()  # still valid
