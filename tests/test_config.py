from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from retainfirst.config import (
    DataConfig,
    EvalConfig,
    RunConfig,
    apply_overrides,
    build,
    load_config,
    parse_grid,
    parse_range,
    parse_value,
    plan_runs,
    to_dict,
    to_yaml,
    with_changes,
)
from retainfirst.engine import TrainConfig
from retainfirst.errors import RetainFirstError


@pytest.mark.demo_preset
def test_defaults_are_the_demo():
    cfg = load_config()
    assert cfg.model == "smollm2-135m"
    assert cfg.synthesizers == ["sum", "pcgrad", "sago"]
    assert cfg.train.forget_loss == "simnpo" and cfg.train.retain_loss == "nll"
    assert isinstance(cfg.train, TrainConfig)
    assert cfg.eval.mcq_mode == "option"


def test_yaml_roundtrip_reproduces_config(tmp_path):
    cfg = load_config(None, ["steps=3", "train.forget_kwargs.beta=0.7", "eval.tasks=[facts]"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    again = load_config(path)
    assert to_dict(again) == to_dict(cfg)
    assert again.train.betas == (0.9, 0.999)


def test_file_merges_sections_and_replaces_option_mappings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model: some/model\ntrain:\n  forget_loss: npo\n  forget_kwargs: {beta: 1e-4}\n  lr: 1e-5\n"
        "eval:\n  tasks: [mmlu]\n"
    )
    cfg = load_config(path)
    assert cfg.model == "some/model"
    # forget_kwargs replaced (simnpo's delta would be invalid for npo), other train keys kept
    assert cfg.train.forget_kwargs == {"beta": 1e-4}
    assert cfg.train.lr == pytest.approx(1e-5) and isinstance(cfg.train.lr, float)
    assert cfg.train.retain_loss == "nll"
    assert cfg.eval.tasks == ["mmlu"] and cfg.eval.mcq_mode == "option"


@pytest.mark.parametrize(
    ("overrides", "check"),
    [
        (["train.lr=5e-5"], lambda c: c.train.lr == pytest.approx(5e-5)),
        (["lr=2e-5"], lambda c: c.train.lr == pytest.approx(2e-5)),  # short key: unique section
        (["steps=7"], lambda c: c.train.steps == 7),
        (["synthesizers=sum,sago"], lambda c: c.synthesizers == ["sum", "sago"]),
        (["synthesizers=[pcgrad]"], lambda c: c.synthesizers == ["pcgrad"]),
        (
            ["synthesizers=[]", "synthesizer=blur"],
            lambda c: c.synthesizers == [] and c.train.synthesizer == "blur",
        ),
        (["eval.mmlu_limit=null"], lambda c: c.eval.mmlu_limit is None),
        (["train.lora.r=4"], lambda c: c.train.lora == {"r": 4}),
        (["train.betas=[0.8,0.9]"], lambda c: c.train.betas == (0.8, 0.9)),
        (["data.max_length=64"], lambda c: c.data.max_length == 64),
        (["train.max_grad_norm=null"], lambda c: c.train.max_grad_norm is None),
        (["train.steps=1e2"], lambda c: c.train.steps == 100),
    ],
)
def test_overrides(overrides, check):
    assert check(load_config(None, overrides))


def test_unknown_key_lists_valid_keys():
    with pytest.raises(RetainFirstError, match=r"unknown key 'train\.stepz'; valid keys in train: steps, lr"):
        load_config(None, ["train.stepz=3"])
    with pytest.raises(RetainFirstError, match=r"unknown key 'bogus'; valid keys: name, model"):
        load_config(None, ["bogus=1"])


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  taskz: [mmlu]\n")
    with pytest.raises(RetainFirstError, match=r"unknown key 'eval\.taskz'; valid keys in eval: tasks"):
        load_config(path)


def test_ambiguous_short_key():
    with pytest.raises(RetainFirstError, match=r"ambiguous; write one of data\.max_length, train\.max_"):
        load_config(None, ["max_length=10"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("synthesizers=[sum,nope]", r"synthesizers\[1\]='nope' is not valid; choose one of .*pcgrad.*sago"),
        ("train.synthesizer=nope", r"choose one of"),
        ("train.forget_loss=nope", r"train.forget_loss='nope' is not valid; choose one of .*simnpo"),
        ("train.forget_kwargs.gamma=1", r"train.forget_kwargs: .*unknown option"),
        ("dtype=int8", r"dtype='int8' is not valid; choose one of float32, bfloat16, float16"),
        ("train.lr=-1", r"train.lr=-1 must be > 0"),
        ("train.warmup_ratio=1", r"train.warmup_ratio=1 must be in \[0, 1\)"),
        ("train.forget_kwargs.beta=0", r"train.forget_kwargs: forget objective 'simnpo': beta=0 must be > 0"),
        ("synthesizer_overrides={sago: {lr: 0}}", r"config: train.lr=0 must be > 0"),
        (
            "synthesizer_overrides={sago: {lrr: 1}}",
            r"unknown key 'synthesizer_overrides.sago.lrr'; valid keys in",
        ),
        ("eval.batch_size=0", r"eval.batch_size=0 must be an integer >= 1"),
        ("data.n_forget=true", r"data.n_forget=True is invalid; expected an integer"),
        ("epochs=0", r"epochs=0 must be > 0"),
        ("train.steps=abc", r"train.steps='abc' is invalid; expected an integer"),
        ("train.steps=2.5", r"expected an integer"),
        ("data.source=web", r"data.source='web' is not valid; choose one of facts, corpus, rwku"),
        ("eval.tasks=[mmlu,wat]", r"eval.tasks\[1\]='wat' is not valid"),
        ("eval.tasks=[wmdp_bio]", r"needs data.dir"),
        ("eval.mcq_mode=bogus", r"choose one of option, letter"),
        ("data.source=corpus", r"needs data.forget and data.retain"),
        ("train.gradient_checkpointing=yes please", r"expected true or false"),
        ("synthesizers=[sum,sum]", r"lists a name twice"),
        ("data.rwku_forget_targets=50-1", r"1 <= first <= last"),
        ("train.lr", r"must look like key=value"),
        ("=3", r"empty key"),
        ("train.steps.x=1", r"not a section or mapping"),
    ],
)
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(RetainFirstError, match=message) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_bad_file(tmp_path):
    with pytest.raises(RetainFirstError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(RetainFirstError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RetainFirstError, match="must hold a mapping"):
        load_config(listy)
    (tmp_path / "empty.yaml").write_text("")  # would silently run the demo: refused instead
    with pytest.raises(RetainFirstError, match=r"empty\.yaml is empty"):
        load_config(tmp_path / "empty.yaml")


def test_parse_value():
    assert parse_value("1e-5") == pytest.approx(1e-5)
    assert parse_value("3") == 3
    assert parse_value("true") is True
    assert parse_value("[a, b]") == ["a", "b"]
    assert parse_value("sago") == "sago"
    assert parse_value("") is None


def test_apply_overrides_does_not_mutate():
    data = to_dict(RunConfig())
    out = apply_overrides(data, ["train.forget_kwargs.beta=9"])
    assert out["train"]["forget_kwargs"]["beta"] == 9
    assert data["train"]["forget_kwargs"]["beta"] != 9


def test_build_generic_dataclass():
    assert build(DataConfig, {"source": "rwku", "dir": "x"}).dir == "x"
    assert build(EvalConfig, {"tasks": "mmlu,facts"}).tasks == ["mmlu", "facts"]
    with pytest.raises(RetainFirstError, match=r"data=3 is invalid; expected a mapping \(DataConfig keys\)"):
        build(RunConfig, {"data": 3})


def test_parse_range():
    assert parse_range("1-50") == (1, 50)
    with pytest.raises(RetainFirstError, match="must look like 1-50"):
        parse_range("a-b", "data.rwku_forget_targets")


def test_config_tree_is_frozen_pydantic_models():
    cfg = RunConfig()
    assert all(isinstance(getattr(cfg, s), BaseModel) for s in ("data", "train", "eval"))
    with pytest.raises(ValidationError):
        cfg.train.steps = 3  # copies go through with_changes, which validates


def test_one_set_of_defaults():
    assert RunConfig().train == TrainConfig()
    assert TrainConfig().forget_loss == "simnpo" and TrainConfig().forget_kwargs == {
        "beta": 0.25,
        "delta": 0.0,
    }
    # keep_checkpoints exists once (an int, in train); the run-level switch has its own name
    assert "keep_checkpoints" not in RunConfig.model_fields
    assert load_config(None, ["keep_checkpoints=2"]).train.keep_checkpoints == 2
    assert load_config(None, ["keep_finished_checkpoints=true"]).keep_finished_checkpoints is True


def test_another_loss_without_options_gets_its_own_defaults(tmp_path):
    assert load_config(None, ["train.forget_loss=npo"]).train.forget_kwargs == {}
    assert TrainConfig(forget_loss="ga").forget_kwargs == {}
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  forget_loss: npo\n")
    assert load_config(path, ["train.forget_kwargs.beta=0.5"]).train.forget_kwargs == {"beta": 0.5}
    runs = plan_runs(load_config(None, ["synthesizer_overrides={sago: {forget_loss: ga}}"]))
    assert [(r.name, r.train.forget_loss, r.train.forget_kwargs) for r in runs][1:] == [
        ("pcgrad", "simnpo", {"beta": 0.25, "delta": 0.0}),
        ("sago", "ga", {}),
    ]


def test_with_changes_validates_a_copy():
    cfg = RunConfig()
    changed = with_changes(cfg, train=with_changes(cfg.train, steps=3))
    assert changed.train.steps == 3 and cfg.train.steps == 24
    with pytest.raises(RetainFirstError, match=r"train config: steps=0 must be an integer >= 1"):
        with_changes(cfg.train, steps=0)


def test_built_in_code_configs_fail_with_one_line():
    with pytest.raises(RetainFirstError, match=r"^config: eval task wmdp_bio needs data.dir"):
        RunConfig(eval=EvalConfig(tasks=["wmdp_bio"]))
    with pytest.raises(
        RetainFirstError, match=r"^config: eval.tasks\[0\]='nope' is not valid; choose one of"
    ):
        EvalConfig(tasks=["nope"])


def test_yaml_roundtrip_with_every_section_set(tmp_path):
    overrides = [
        "name=full",
        "model=some/model",
        "dtype=bfloat16",
        "synthesizers=[pcgrad,sago]",
        "out=runs/x",
        "keep_finished_checkpoints=true",
        "synthesizer_overrides={pcgrad: {steps: 5, lr: 3e-6}}",
        "epochs=1.5",
        "data.source=corpus",
        "data.forget=f.jsonl",
        "data.retain=r.jsonl",
        "data.dir=/tmp/data",
        "data.max_forget_examples=7",
        "train.forget_loss=rmu",
        "train.forget_kwargs={layer: 2, trainable_layers: [1, 2], seed: 3}",
        "train.retain_loss=embed_diff",
        "train.retain_kwargs.coefficient=1200",
        "train.synthesizer_options.keep_retain_where_forget_zero=true",
        "train.synthesizer=sago",
        "train.betas=[0.8,0.9]",
        "train.lora={r: 4, target_modules: [q_proj]}",
        "train.merge_lora=true",
        "train.trainable_patterns=[layers\\.1\\.]",
        "train.warmup_steps=2",
        "train.lr=1e-6",
        "train.max_grad_norm=null",
        "eval.tasks=[mmlu,wmdp_bio,lm_eval:hellaswag]",
        "eval.mcq_mode=letter",
        "eval.wmdp_limit=5",
    ]
    with pytest.raises(RetainFirstError, match="keep_retain_where_forget_zero"):
        load_config(None, overrides)  # pcgrad has no such option
    overrides.remove("train.synthesizer_options.keep_retain_where_forget_zero=true")
    cfg = load_config(None, overrides)
    assert cfg.train.lora == {"r": 4, "target_modules": ["q_proj"]} and cfg.train.betas == (0.8, 0.9)
    for config in (cfg, RunConfig()):
        path = tmp_path / "config.yaml"
        path.write_text(to_yaml(config))
        again = load_config(path)
        assert again == config and to_yaml(again) == to_yaml(config)


# ----------------------------------------------------------------------------------------------
# Shipped recipes

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.stem for p in CONFIGS}
    for domain in ("bio", "cyber"):
        for method in ("graddiff", "npo", "simnpo", "rmu"):
            assert f"wmdp_{domain}_zephyr_{method}" in names
    assert "rwku_llama3_8b_graddiff_1-50" in names and "demo" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    runs = plan_runs(cfg)
    if cfg.runs:  # the explicit form: one sub-run per entry, in order
        assert [r.name for r in runs] == list(cfg.runs) and cfg.synthesizers == []
    else:
        assert [r.family for r in runs] == (cfg.synthesizers or [cfg.train.synthesizer])
    assert cfg.name == path.stem
    # the resolved config round-trips
    assert to_dict(load_config(path)) == to_dict(cfg)


@pytest.mark.demo_preset
def test_demo_yaml_is_the_default():
    demo = next(p for p in CONFIGS if p.stem == "demo")
    assert to_dict(load_config(demo)) == to_dict(load_config())


@pytest.mark.demo_preset
def test_the_demo_preset_applies_only_without_a_config_file(tmp_path):
    demo = load_config()
    assert demo.stop.forget_below is not None and demo.eval.eval_every > 0
    path = tmp_path / "mine.yaml"
    path.write_text("model: smollm2-135m\n")
    mine = load_config(path)  # a file starts from the plain defaults: no inherited stopping rule
    assert mine.stop.forget_below is None and mine.eval.eval_every == 0
    assert mine.train == RunConfig().train
    # overrides go on top of the preset
    assert load_config(None, ["stop.forget_below=0.3"]).stop.forget_below == 0.3


def test_paper_hyperparameters_in_recipes():
    by_name = {p.stem: load_config(p) for p in CONFIGS}
    simnpo_bio = {r.name: r.train for r in plan_runs(by_name["wmdp_bio_zephyr_simnpo"])}
    assert simnpo_bio["sago"].steps == 150 and simnpo_bio["pcgrad"].steps == 100
    assert simnpo_bio["sago"].forget_kwargs == {"beta": 0.02, "delta": 0.1}
    assert (simnpo_bio["sago"].alpha, simnpo_bio["sago"].gamma) == (0.1, 1.0)
    npo_cyber = {r.name: r.train for r in plan_runs(by_name["wmdp_cyber_zephyr_npo"])}["sago"]
    assert (npo_cyber.steps, npo_cyber.forget_kwargs["beta"], npo_cyber.alpha) == (300, 1e-3, 0.1)
    rmu = by_name["wmdp_bio_zephyr_rmu_wmdp_repo"]
    assert rmu.train.lr == pytest.approx(5e-5) and rmu.train.retain_kwargs["coefficient"] == 1200
    for cfg in by_name.values():
        if cfg.model != "smollm2-135m":  # the GPU recipes; demo, evidence and update_space run on CPU
            assert cfg.dtype == "bfloat16" and cfg.train.mixed_precision == "bf16"
    rwku = {r.name: r.train for r in plan_runs(by_name["rwku_llama3_8b_graddiff_1-50"])}
    assert rwku["pcgrad"].lr == pytest.approx(3e-6) and rwku["sago"].lr == pytest.approx(1e-5)


def test_plan_runs_grid_and_synthesizer_overrides():
    cfg = load_config(None, ["synthesizer_overrides={pcgrad: {steps: 5}}", "train.steps=9"])
    assert [(r.name, r.train.steps) for r in plan_runs(cfg)] == [("sum", 9), ("pcgrad", 5), ("sago", 9)]
    grid = parse_grid(["synthesizer=sum,sago", "gamma=[0.5, 2]", "train.forget_kwargs.beta=3"])
    runs = plan_runs(cfg, grid)
    assert [r.name for r in runs] == ["sum-gamma0.5", "sum-gamma2", "sago-gamma0.5", "sago-gamma2"]
    assert [r.family for r in runs] == ["sum", "sum", "sago", "sago"]
    assert runs[1].settings == {"gamma": 2} and runs[1].train.gamma == 2.0
    assert all(r.train.forget_kwargs == {"beta": 3, "delta": 0.0} for r in runs)
    # without a synthesizer axis, the config's synthesizers are the first axis
    assert len(plan_runs(cfg, parse_grid(["alpha=0.5,1"]))) == 6


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["model=a,b"], "grid keys must be train"),
        (["alpha=1", "train.alpha=2"], "given twice"),
        (["alpha="], "has no values"),
        (["synthesizer=sum,nope"], "not valid; choose one of"),
        (["lr=-1,1"], "train.lr=-1 must be > 0"),
    ],
)
def test_bad_grids(items, message):
    with pytest.raises(RetainFirstError, match=message):
        plan_runs(RunConfig(), parse_grid(items))


def test_synthesizer_overrides_must_name_a_run():
    with pytest.raises(RetainFirstError, match="names 'blur', which is not run"):
        load_config(None, ["synthesizer_overrides={blur: {steps: 3}}"])


def test_comma_and_scalar_overrides_of_number_lists():
    assert load_config(None, ["eval.quantize_bits=8,4"]).eval.quantize_bits == [8, 4]
    assert load_config(None, ["eval.quantize_bits=4"]).eval.quantize_bits == [4]
    assert load_config(None, ["synthesizers=sum,sago"]).synthesizers == ["sum", "sago"]
    with pytest.raises(RetainFirstError, match="quantize_bits"):
        load_config(None, ["eval.quantize_bits=8,x"])
