"""The GPU recipes reproduce the paper's released runs: every sub-run against its row of the provenance
table (configs/reference/official_runs.yaml), every row by exactly one sub-run; the ``runs:`` form of
a config; ``retainfirst run CONFIG --plan``; the released code's corpus formatting switches."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from retainfirst import cli
from retainfirst.config import (
    RunConfig,
    SubRun,
    load_config,
    parse_grid,
    plan_runs,
    to_dict,
    to_yaml,
    with_changes,
    yaml_load,
)
from retainfirst.data import tokenize_texts
from retainfirst.data.corpora import read_raw_lines
from retainfirst.errors import RetainFirstError
from retainfirst.models import build_byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TABLE = yaml_load((ROOT / "configs" / "reference" / "official_runs.yaml").read_text())
RECIPES = sorted([*ROOT.glob("configs/wmdp_*.yaml"), *ROOT.glob("configs/rwku_*.yaml")])
# The WMDP repository's RMU recipe is kept as a second variant; no released row backs it.
UNBACKED = {"wmdp_bio_zephyr_rmu_wmdp_repo", "wmdp_cyber_zephyr_rmu_wmdp_repo"}

# Released method name -> (forget loss, retain loss); strategy -> synthesizer.
LOSSES = {
    "GradAscent": ("ga", "none"),
    "GradDiff": ("ga", "nll"),
    "GradDiffWithSurgery": ("ga", "nll"),
    "NPO": ("npo", "nll"),
    "NPOWithSurgery": ("npo", "nll"),
    "NPOForget": ("npo", "none"),
    "SimNPO": ("simnpo", "nll"),
    "SimNPOWithSurgery": ("simnpo", "nll"),
    "SimNPOForget": ("simnpo", "none"),
    "RMU": ("rmu", "embed_diff"),
}
SYNTHESIZERS = {"naive": "sum", "pcgrad": "pcgrad", "pcgrad_global": "pcgrad_global", "sago": "sago"}


def expected_forget_kwargs(row: dict[str, Any], forget_loss: str) -> dict[str, Any]:
    if forget_loss == "npo":
        return {"beta": row["beta"]}
    if forget_loss == "simnpo":
        return {"beta": row["beta"], "delta": row["delta"]}
    if forget_loss == "rmu":
        rmu = TABLE["rmu"]
        return {
            "layer": rmu["layer"],
            "steering_coeff": rmu["steering_coeff"],
            "trainable_layers": rmu["trainable_layers"],
        }
    return {}


def mismatches(sub: SubRun, config: RunConfig) -> list[str]:
    """Every field of ``sub`` (and its config) that differs from its row of the provenance table."""
    row = TABLE["runs"][sub.reproduces]
    train = sub.train
    forget_loss, retain_loss = LOSSES[row["method"]]
    launch = TABLE["launch"][row["launch"]]
    defaults = TABLE["defaults"]
    benchmark = sub.reproduces.split("/")[0]
    expected: dict[str, tuple[Any, Any]] = {
        "lr": (train.lr, row["lr"]),
        "warmup_ratio": (train.warmup_ratio, row["warmup_ratio"]),
        "warmup_steps": (train.warmup_steps, None),
        "lr_schedule": (train.lr_schedule, row["schedule"]),
        "gamma": (train.gamma, 1.0 if row["gamma"] is None else row["gamma"]),
        "synthesizer": (train.synthesizer, SYNTHESIZERS[row["strategy"]]),
        "forget_loss": (train.forget_loss, forget_loss),
        "retain_loss": (train.retain_loss, retain_loss),
        "forget_kwargs": (train.forget_kwargs, expected_forget_kwargs(row, forget_loss)),
        "forget_batch_size": (train.forget_batch_size, launch["per_device_batch"]),
        "retain_batch_size": (train.retain_batch_size, launch["per_device_batch"]),
        "gradient_accumulation_steps": (
            train.gradient_accumulation_steps,
            launch["gradient_accumulation_steps"],
        ),
        "gradient_checkpointing": (train.gradient_checkpointing, launch["gradient_checkpointing"]),
        "weight_decay": (train.weight_decay, defaults["weight_decay"]),
        "max_grad_norm": (train.max_grad_norm, defaults["max_grad_norm"]),
        "seed": (train.seed, defaults["seed"]),
        "optimizer": (train.optimizer, "adamw"),
        "mixed_precision": (train.mixed_precision, "bf16"),
        "lora": (train.lora, None),
        "synthesizer_options": (train.synthesizer_options, {}),
        "dtype": (config.dtype, defaults["dtype"]),
        "model": (config.model, TABLE["models"][benchmark]),
        "family": (sub.family, "forget_only" if retain_loss == "none" else SYNTHESIZERS[row["strategy"]]),
    }
    if row["alpha"] is not None:
        expected["alpha"] = (train.alpha, row["alpha"])
    if row["steps"] is not None:
        expected["steps"] = (train.steps, row["steps"])
        expected["epochs"] = (sub.epochs, None)
    else:
        expected["epochs"] = (sub.epochs, row["epochs"])
    if retain_loss == "embed_diff":
        expected["retain_kwargs"] = (
            train.retain_kwargs,
            {"layer": TABLE["rmu"]["layer"], "coefficient": 1.0},
        )
        expected["trainable_patterns"] = (train.trainable_patterns, None)  # RMU's own: down_proj of 5-7
    else:
        expected["retain_kwargs"] = (train.retain_kwargs, {})
        expected["trainable_patterns"] = (train.trainable_patterns, None)
    if benchmark == "rwku":
        targets = TABLE["rwku_targets"]
        expected["rwku_targets"] = (
            (config.data.rwku_forget_targets, config.data.rwku_retain_targets),
            (targets["forget"], targets["retain"]),
        )
    per_step = launch["per_device_batch"] * launch["processes"] * launch["gradient_accumulation_steps"]
    expected["global_batch"] = (per_step, defaults["global_batch"])
    problems = []
    for field, (got, want) in expected.items():
        same = got == want and type(got) is type(want) if isinstance(want, bool) else got == want
        if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
            same = math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0)
        if not same:
            problems.append(f"{sub.name}.{field}: {got!r} != {want!r} ({sub.reproduces})")
    return problems


def _recipe_plans() -> list[tuple[Path, RunConfig, list[SubRun]]]:
    out = []
    for path in RECIPES:
        config = load_config(path)
        out.append((path, config, plan_runs(config)))
    return out


PLANS = _recipe_plans()


def test_the_table_has_every_released_row():
    runs = TABLE["runs"]
    assert len(runs) == 41
    assert sum(name.startswith("wmdp/") for name in runs) == 28
    assert sum(name.startswith("rwku/") for name in runs) == 13
    for name, row in runs.items():
        assert row["method"] in LOSSES and row["strategy"] in SYNTHESIZERS, name
        assert isinstance(row["lr"], float), name  # yaml_load reads 7e-07 as a float
        assert (row["steps"] is None) != (row["epochs"] is None), name
        assert row["launch"] in TABLE["launch"], name


@pytest.mark.parametrize(("path", "config", "plan"), PLANS, ids=[p.stem for p, _, _ in PLANS])
def test_every_sub_run_matches_its_released_row(path, config, plan):
    assert config.name == path.stem
    text = path.read_text()
    assert "accelerate launch --num_processes" in text and f"configs/{path.name}" in text
    if path.stem in UNBACKED:
        assert all(sub.reproduces is None for sub in plan)
        return
    assert plan, path
    assert "--num_processes 4" in text  # the released layouts: 4 GPUs
    for sub in plan:
        assert sub.reproduces in TABLE["runs"], f"{path.stem}.{sub.name} reproduces {sub.reproduces!r}"
        assert mismatches(sub, config) == []


def test_every_row_is_reproduced_by_exactly_one_sub_run():
    seen: dict[str, list[str]] = {}
    for path, _, plan in PLANS:
        for sub in plan:
            if sub.reproduces is not None:
                seen.setdefault(sub.reproduces, []).append(f"{path.stem}.{sub.name}")
    assert {row: where for row, where in seen.items() if len(where) != 1} == {}
    assert sorted(seen) == sorted(TABLE["runs"])


def _sub(recipe: str, name: str) -> tuple[SubRun, RunConfig]:
    _, config, plan = next(item for item in PLANS if item[0].stem == recipe)
    return next(sub for sub in plan if sub.name == name), config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("lr", 2e-5),
        ("steps", 150),
        ("warmup_ratio", 0.0),
        ("lr_schedule", "constant"),
        ("alpha", 0.5),
        ("gamma", 0.5),
        ("forget_kwargs", {"beta": 0.03, "delta": 0.1}),
        ("forget_kwargs", {"beta": 0.7, "delta": 0.0}),
        ("synthesizer", "pcgrad"),
        ("retain_loss", "kl"),
        ("forget_batch_size", 2),
        ("gradient_accumulation_steps", 4),
        ("gradient_checkpointing", False),
        ("max_grad_norm", None),
        ("weight_decay", 0.01),
    ],
)
def test_the_comparison_catches_each_changed_field(field, value):
    sub, config = _sub("wmdp_bio_zephyr_simnpo", "sum")  # SimNPO_bio: 4 x 4 x 2 with checkpointing
    assert mismatches(sub, config) == []
    changed = with_changes(sub, train=with_changes(sub.train, **{field: value}))
    problems = mismatches(changed, config)
    assert any(p.startswith(f"sum.{field}:") for p in problems), problems


def test_the_comparison_catches_epochs_model_and_a_wrong_row():
    sub, config = _sub("rwku_llama3_8b_npo_1-50", "pcgrad")
    assert mismatches(sub, config) == []
    assert mismatches(with_changes(sub, epochs=3.0), config)
    assert mismatches(sub, with_changes(config, model="HuggingFaceH4/zephyr-7b-beta"))
    assert mismatches(with_changes(sub, reproduces="rwku/Batch50_SAGO_NPO.yaml"), config)  # lr 1e-5


def test_fixed_problems_of_the_old_recipes():
    """The issue's list: linear schedule with warmup everywhere but RMU, naive rows with their own settings,
    the PCGrad rows that differed, pcgrad_global present, RWKU with warmup and three methods."""
    graddiff = {s.name: s.train for s in _plan("wmdp_bio_zephyr_graddiff")}
    assert graddiff["sum"].lr == 3e-6 and graddiff["sum"].steps == 100 and graddiff["sago"].steps == 500
    assert graddiff["pcgrad"].alpha == 1.0 and graddiff["pcgrad_global"].steps == 300
    assert {s.train.forget_kwargs["beta"] for s in _plan("wmdp_cyber_zephyr_npo") if s.name == "pcgrad"} == {
        0.005
    }
    assert [
        s.train.forget_kwargs["beta"] for s in _plan("wmdp_cyber_zephyr_simnpo") if s.name == "pcgrad"
    ] == [1.0]
    for _, _, plan in PLANS:
        for sub in plan:
            if sub.reproduces and not sub.reproduces.startswith("wmdp/RMU"):
                assert (sub.train.lr_schedule, sub.train.warmup_ratio) == ("linear", 0.1), sub.reproduces
    rmu = _plan("wmdp_bio_zephyr_rmu")[0].train
    assert (rmu.forget_kwargs["steering_coeff"], rmu.alpha, rmu.steps, rmu.lr_schedule) == (
        2.0,
        2.5,
        80,
        "constant",
    )
    assert _config("wmdp_bio_zephyr_rmu").data.retain == "bio-retain-corpus.jsonl"
    repo = _config("wmdp_bio_zephyr_rmu_wmdp_repo")
    assert repo.train.retain_kwargs["coefficient"] == 1200 and repo.data.retain == "wikitext.jsonl"
    for method in ("graddiff", "npo", "simnpo"):
        assert len(_plan(f"rwku_llama3_8b_{method}_1-50")) >= 4


def _plan(recipe: str) -> list[SubRun]:
    return next(plan for path, _, plan in PLANS if path.stem == recipe)


def _config(recipe: str) -> RunConfig:
    return next(config for path, config, _ in PLANS if path.stem == recipe)


# ----------------------------------------------------------------------------------------------
# The runs: form


def _runs_config(**extra: Any) -> RunConfig:
    runs = {
        "naive": {"synthesizer": "sum", "lr": 3e-6, "steps": 7, "reproduces": "x/a.yaml"},
        "sago": {"synthesizer": "sago", "alpha": 0.5, "epochs": 3},
        "alone": {"retain_loss": "none", "gamma": 2.0},
    }
    return load_config(None, [f"runs={json.dumps(runs)}", "train.steps=5", *extra.get("overrides", [])])


def test_runs_form_precedence_names_and_families():
    config = _runs_config(overrides=["epochs=2"])
    assert config.synthesizers == []
    plan = plan_runs(config)
    assert [(s.name, s.family, s.reproduces, s.epochs) for s in plan] == [
        ("naive", "sum", "x/a.yaml", 2.0),
        ("sago", "sago", None, 3.0),  # a runs entry's epochs beats the run-level one
        ("alone", "forget_only", None, 2.0),
    ]
    assert [(s.train.steps, s.train.lr, s.train.alpha) for s in plan] == [
        (7, 3e-6, 0.1),
        (5, 5e-5, 0.5),
        (5, 5e-5, 0.1),
    ]
    assert plan[2].train.synthesizer == "sago" and plan[2].train.retain_kwargs == {}
    # a sweep grid goes on top of each entry (and wins over it)
    swept = plan_runs(config, parse_grid(["lr=1e-4,2e-4"]))
    assert [s.name for s in swept] == [
        "naive-lr0.0001",
        "naive-lr0.0002",
        "sago-lr0.0001",
        "sago-lr0.0002",
        "alone-lr0.0001",
        "alone-lr0.0002",
    ]
    assert swept[0].train.lr == 1e-4 and swept[0].settings == {"lr": 1e-4}


def test_runs_form_round_trips_through_the_saved_yaml(tmp_path):
    config = _runs_config()
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(config))
    again = load_config(saved)
    assert to_dict(again) == to_dict(config)
    assert [to_dict(s) for s in plan_runs(again)] == [to_dict(s) for s in plan_runs(config)]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["synthesizers=[sum]"], "either as runs or as synthesizers"),
        (["synthesizer_overrides={sum: {steps: 2}}"], "synthesizer_overrides does not apply to runs"),
        (["runs={a: {stepz: 3}}"], "runs.a.stepz"),
        (["runs={a: {lr: -1}}"], "runs.a.lr"),
        (["runs={a: {synthesizer: nope}}"], "runs.a.synthesizer"),
        (["runs={a: {epochs: 0}}"], "runs.a.epochs"),
        (["runs={a: {reproduces: 3}}"], "runs.a.reproduces"),
        (["runs={a: 3}"], "runs.a"),
        (["runs={'a b': {lr: 1.0e-5}}"], "folder name"),
    ],
)
def test_runs_form_errors_are_one_line(overrides, message):
    extra = [] if overrides[0].startswith("runs=") else ["runs={a: {lr: 1.0e-5}}"]
    with pytest.raises(RetainFirstError) as info:
        load_config(None, [*extra, *overrides])
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_short_form_still_works_and_is_unchanged():
    config = load_config(None, ["synthesizer_overrides={pcgrad: {steps: 5}}"])
    plan = plan_runs(config)
    assert [(s.name, s.family, s.reproduces, s.train.steps) for s in plan] == [
        ("sum", "sum", None, 24),
        ("pcgrad", "pcgrad", None, 5),
        ("sago", "sago", None, 24),
    ]


# ----------------------------------------------------------------------------------------------
# run --plan


def test_plan_prints_every_sub_run_and_loads_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = ROOT / "configs" / "wmdp_bio_zephyr_graddiff.yaml"
    assert cli.main(["run", str(recipe), "--plan", "model=no-such-org/no-such-model"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in plan] == ["sum", "pcgrad", "pcgrad_global", "sago", "forget_only"]
    assert [p["reproduces"] for p in plan] == [
        "wmdp/GradDiff_bio.yaml",
        "wmdp/GradDiff_pcgrad_bio.yaml",
        "wmdp/GradDiff_pcgrad_global_bio.yaml",
        "wmdp/GradDiff_sago_bio.yaml",
        "wmdp/GradAscent_bio.yaml",
    ]
    expected = [to_dict(s.train) for s in plan_runs(load_config(recipe))]
    assert [p["train"] for p in plan] == expected  # the full resolved TrainConfig
    assert plan[4]["train"]["retain_loss"] == "none" and plan[4]["family"] == "forget_only"
    assert plan[0]["synthesizer"] == "sum" and plan[0]["epochs"] is None
    assert list(tmp_path.iterdir()) == []  # no run directory, no data, no model


def test_plan_of_an_epochs_recipe_and_with_resume(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "configs" / "rwku_llama3_8b_simnpo_1-50.yaml")
    assert cli.main(["run", recipe, "--plan", "data.dir=/no/such/folder"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {p["epochs"] for p in plan} == {2.0} and len(plan) == 4
    assert cli.main(["run", recipe, "--plan", "--resume", "--out", "x"]) == 2
    assert "--plan" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The released code's corpus formatting


def test_release_formatting_switches(tmp_path):
    tokenizer = build_byte_tokenizer()
    bos = tokenizer.bos_token_id
    blank = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ours = tokenize_texts(["ab", "cd"], tokenizer, max_length=3, keep_tail=True)
    eos = tokenizer.eos_token_id
    assert [e["input_ids"].tolist() for e in ours] == [[65, 66, eos], [67, 68, eos]]
    released = tokenize_texts(
        ["ab", "cd"], tokenizer, max_length=3, join="blank_line", bos_per_chunk=True, keep_tail=True
    )
    stream = [65, 66, *blank, 67, 68]
    assert [e["input_ids"].tolist() for e in released] == [[bos, *stream[i : i + 2]] for i in range(0, 6, 2)]
    with pytest.raises(RetainFirstError, match="join"):
        tokenize_texts(["ab"], tokenizer, join="space")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "a"}\n\n{"text": "b", "doi": 1}\r\n')
    assert read_raw_lines(corpus) == ['{"text": "a"}', '{"text": "b", "doi": 1}']
    with pytest.raises(RetainFirstError):
        read_raw_lines(tmp_path / "missing.jsonl")


def test_runs_of_one_family_that_differ_carry_their_differences_as_settings():
    runs = {
        "sum": {"synthesizer": "sum"},
        "sum-alpha1": {"synthesizer": "sum", "alpha": 1.0},
        "sum-slow": {"synthesizer": "sum", "alpha": 1.0, "lr": 1e-5},
        "sago": {"synthesizer": "sago", "alpha": 0.5},
    }
    config = load_config(None, [f"runs={json.dumps(runs)}"])
    plan = plan_runs(config)
    assert [(s.name, s.settings) for s in plan] == [
        ("sum", {"lr": 5e-5, "alpha": 0.1}),
        ("sum-alpha1", {"lr": 5e-5, "alpha": 1.0}),
        ("sum-slow", {"lr": 1e-5, "alpha": 1.0}),
        ("sago", {}),  # alone in its family: nothing to tell apart
    ]
    # seeds are not settings: the seeded copies of one entry stay one configuration
    seeded = load_config(None, [f"runs={json.dumps(runs)}", "seeds=[0,1]"])
    assert all("seed" not in s.settings for s in plan_runs(seeded))
