"""Matched forgetting: MUSE-style selection, configurations, seeds, the stopping rule in a real run."""

from __future__ import annotations

import json
import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest

from retainfirst.config import plan_runs
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, Headline, register_task, unregister_task
from retainfirst.experiment import run_experiment
from retainfirst.experiment.during_training import EvidenceSettings, forget_part, with_seeds
from retainfirst.experiment.report import matched_comparison
from retainfirst.report.matched import common_level, first_at_or_below, group_configurations, outcome
from retainfirst.report.stats import Measurement

FORGET = Headline("forget", "forget", "score", False, pool=True, precedence=1)
HELDOUT = Headline("heldout", "utility", "score", True, pool=True)


def test_first_at_or_below_is_the_first_evaluated_step_at_or_below_the_level():
    records = [
        {"step": 3, "eval/forget": 0.30},
        {"step": 1, "eval/forget": 0.50},
        {"step": 2},  # not evaluated
        {"step": 4, "eval/forget": 0.20},
        {"step": 5, "eval/forget": None},
    ]
    assert first_at_or_below(records, 0.30)["step"] == 3  # "at" counts
    assert first_at_or_below(records, 0.25)["step"] == 4
    assert first_at_or_below(records, 0.6)["step"] == 1  # by step number, not file order
    assert first_at_or_below(records, 0.1) is None
    assert first_at_or_below([], 1.0) is None


def test_outcome_uses_in_run_evaluations_else_the_final_score():
    records = [{"step": 1, "eval/forget": 0.6}, {"step": 2, "eval/forget": 0.4, "stopped": True}]
    assert outcome("a", records, 0.41, 0.5).to_dict() == {
        "run": "a",
        "reached": True,
        "step": 2,
        "in_run_forget": 0.4,
    }
    missed = outcome("b", records[:1], 0.6, 0.5)
    assert (missed.reached, missed.step, missed.in_run_forget) == (False, None, 0.6)
    assert outcome("c", [{"step": 1}], 0.3, 0.5).reached and not outcome("d", [], 0.7, 0.5).reached
    assert common_level([0.2, math.nan, 0.35, 0.3]) == 0.35 and math.isnan(common_level([]))


def test_configurations_group_seeds_and_name_the_loss_weight_curve():
    runs = [
        ("sum-alpha0.1-s0", "sum", {"alpha": 0.1, "seed": 0}),
        ("sum-alpha0.1-s1", "sum", {"alpha": 0.1, "seed": 1}),
        ("sum-alpha0.5-s0", "sum", {"alpha": 0.5, "seed": 0}),
        ("sago-s0", "sago", {"seed": 0}),
        ("sago-s1", "sago", {"seed": 1}),
    ]
    configs = group_configurations(runs)
    assert [(c.label, c.curve, c.runs, c.seeds) for c in configs] == [
        ("sum-alpha0.1", "sum (alpha grid)", ["sum-alpha0.1-s0", "sum-alpha0.1-s1"], [0, 1]),
        ("sum-alpha0.5", "sum (alpha grid)", ["sum-alpha0.5-s0"], [0]),
        ("sago", "sago", ["sago-s0", "sago-s1"], [0, 1]),
    ]


def test_seeds_multiply_the_sub_runs(tiny_config):
    plan = with_seeds(plan_runs(tiny_config()), [0, 2])
    assert [(s.name, s.family, s.train.seed, s.settings) for s in plan] == [
        ("sum-s0", "sum", 0, {"seed": 0}),
        ("sum-s2", "sum", 2, {"seed": 2}),
        ("sago-s0", "sago", 0, {"seed": 0}),
        ("sago-s2", "sago", 2, {"seed": 2}),
    ]
    assert with_seeds(plan_runs(tiny_config()), None) == plan_runs(tiny_config())


def test_evidence_settings_defaults_fields_and_errors(tiny_config):
    assert EvidenceSettings.from_config(tiny_config()) == EvidenceSettings()
    config = tiny_config("seeds=[0,1,2]", "eval.eval_every=0", "eval.during_limit=8", "stop.forget_below=0.3")
    settings = EvidenceSettings.from_config(config)
    assert (settings.seeds, settings.every, settings.during_limit) == ([0, 1, 2], 1, 8)
    assert settings.evaluates_during_training
    with pytest.raises(RetainFirstError, match=r"seeds=\[1, 1\] must be distinct"):
        EvidenceSettings.from_config(tiny_config("seeds=[1,1]"))
    with pytest.raises(RetainFirstError, match=r"stop\.forget_below=-0\.1 must be >= 0"):
        tiny_config("stop.forget_below=-0.1")  # the config itself refuses it


class NamedProbes(EvalTask):
    name = "named_probes"
    role = "forget"
    headline = "score"
    higher_is_better = False

    def headlines(self):
        return [FORGET, HELDOUT]

    def headline_for(self, result):
        return {"f": FORGET, "u": HELDOUT}.get(result.task[0])


def test_in_run_evaluation_keeps_only_the_forget_probe_sets_cut_to_the_limit():
    data = {"probes": {"f_fb": [1, 2, 3], "f_qa": [4, 5], "u_fb": [6, 7]}, "settings": {"x": 1}}
    assert forget_part(NamedProbes(), data, 2) == {
        "probes": {"f_fb": [1, 2], "f_qa": [4, 5]},
        "settings": {"x": 1},
    }
    assert forget_part(NamedProbes(), [1, 2, 3], 1) == [1] and forget_part(NamedProbes(), "x", 1) == "x"


def _measurement(forget: float, base: np.ndarray, shift: float, rng) -> Measurement:
    items = np.clip(base + shift + rng.normal(0, 0.02, base.size), 0, 1)
    return Measurement({"forget": forget, "heldout": float(items.mean())}, {"heldout": items})


def test_matched_comparison_leaves_out_runs_that_missed_the_level_and_tests_the_rest():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.2, 0.8, 40)
    names = {
        "sum-alpha0.1-s0": ("sum", {"alpha": 0.1, "seed": 0}, 0.29, 0.0),
        "sum-alpha0.1-s1": ("sum", {"alpha": 0.1, "seed": 1}, 0.28, 0.0),
        "sum-alpha1-s0": ("sum", {"alpha": 1.0, "seed": 0}, 0.30, 0.03),
        "sum-alpha1-s1": ("sum", {"alpha": 1.0, "seed": 1}, 0.29, 0.03),
        "sago-s0": ("sago", {"seed": 0}, 0.30, 0.08),
        "sago-s1": ("sago", {"seed": 1}, 0.27, 0.08),
        "pcgrad-s0": ("pcgrad", {"seed": 0}, 0.45, 0.0),
        "pcgrad-s1": ("pcgrad", {"seed": 1}, 0.29, 0.0),
    }
    runs = [
        SimpleNamespace(name=n, family=f, settings=s, forget_score=fs) for n, (f, s, fs, _) in names.items()
    ]
    measurements = {n: _measurement(fs, base, shift, rng) for n, (_, _, fs, shift) in names.items()}
    records = {
        n: [{"step": 1, "eval/forget": 0.5}, {"step": 2, "eval/forget": fs}]
        for n, (_, _, fs, _) in names.items()
    }
    evidence = EvidenceSettings(seeds=[0, 1], forget_below=0.3, resamples=500)
    out = matched_comparison(
        runs,
        measurements,
        records,
        {"heldout": 0.5},
        [FORGET, HELDOUT],
        evidence,
        {"alpha": 0.1, "gamma": 1.0},
    )
    assert out["matched"] and out["level"] == 0.3 and out["not_reached"] == ["pcgrad"]
    assert out["baselines"] == {
        "the configured sum": "sum-alpha0.1",
        "the best sum loss weighting": "sum-alpha1",
    }
    pairs = [(c["a"], c["b"], c["baseline"]) for c in out["comparisons"]]
    assert pairs == [
        ("sago", "sum-alpha0.1", "the configured sum"),
        ("sago", "sum-alpha1", "the best sum loss weighting"),
    ]
    vs_naive, vs_best = out["comparisons"]
    assert vs_naive["difference"]["mean"] == pytest.approx(16.0, abs=2.0)  # +0.08 recall on 0.5
    assert vs_naive["p_holm"] < 0.05 and vs_best["difference"]["mean"] == pytest.approx(10.0, abs=2.0)
    sago = next(p for p in out["configurations"] if p["label"] == "sago")
    assert sago["reached"] and sago["utility"]["low"] < sago["utility"]["mean"] < sago["utility"]["high"]
    verdict = out["verdict"]
    assert verdict.startswith("Compared at matched forgetting: every run stopped at forget score <= 0.3.")
    assert "Did not reach the level (left out of the comparison): pcgrad." in verdict
    assert "- vs the configured sum: sago vs sum-alpha0.1: utility +" in verdict
    assert ": significant at 0.05." in verdict and "2 of 2 differences are significant" in verdict


def test_without_a_stopping_rule_the_verdict_says_the_comparison_is_not_matched():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.8, 30)
    runs = [
        SimpleNamespace(name="sum", family="sum", settings={}, forget_score=0.4),
        SimpleNamespace(name="sago", family="sago", settings={}, forget_score=0.3),
    ]
    measurements = {"sum": _measurement(0.4, base, 0, rng), "sago": _measurement(0.3, base, 0, rng)}
    out = matched_comparison(runs, measurements, {}, {"heldout": 0.5}, [FORGET, HELDOUT], EvidenceSettings())
    assert not out["matched"] and out["level"] == 0.4 and out["not_reached"] == []
    assert out["verdict"].startswith("Not compared at matched forgetting (final forget scores 0.3 to 0.4)")
    assert "not significant at 0.05." in out["verdict"]


# ---- a real run: seeds, in-run evaluation, the stopping rule -------------------------------------

CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@pytest.fixture
def countdown_task():
    """A forget task whose score on one model falls 0.8, 0.4, 0.4, ...: every run stops at step 2."""

    @register_task("countdown")
    class Countdown(EvalTask):
        role = "forget"
        headline = "score"
        higher_is_better = False

        def headlines(self):
            return [FORGET]

        def headline_for(self, result):
            return FORGET if result.task == "countdown" else None

        def prepare(self, context):
            return [1, 2, 3, 4]

        def run(self, model, tokenizer, data, settings):
            CALLS[model] = CALLS.get(model, 0) + 1
            score = 0.8 if CALLS[model] == 1 else 0.4
            samples = [{"score": score} for _ in data]
            return [EvalResult("countdown", {"score": score}, n=len(data), samples=samples)]

    yield
    unregister_task("countdown")


def test_seeded_run_stops_at_the_level_and_reports_matched_statistics(
    tiny_config, tmp_path, countdown_task, monkeypatch
):
    settings = EvidenceSettings(seeds=[0, 1], forget_below=0.5, resamples=200)
    monkeypatch.setattr(EvidenceSettings, "from_config", classmethod(lambda cls, config: settings))
    out = tmp_path / "matched"
    config = tiny_config("train.steps=4", "eval.tasks=[countdown,perplexity]")
    result = run_experiment(config, out)
    names = ["sum-s0", "sum-s1", "sago-s0", "sago-s1"]
    assert [r["name"] for r in result.runs] == names
    assert all(result.status["runs"][n]["steps_done"] == 2 for n in names)
    lines = [
        json.loads(line) for line in (out / "runs" / "sago-s1" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [(r["step"], r["eval/forget"], r.get("stopped")) for r in lines] == [
        (1, 0.8, None),
        (2, 0.4, True),
    ]
    assert json.loads((out / "runs" / "sago-s1" / "items.json").read_text())["items"][0] == [0.4] * 4
    report = json.loads((out / "results.json").read_text())
    assert "hypervolumes" not in report["comparison"]
    evaluation = report["evaluation"]
    assert evaluation["seeds"] == [0, 1] and evaluation["matched_level"] == 0.5 and evaluation["matched"]
    assert evaluation["items_per_headline"] == {"forget": 4, "ppl": 2} and evaluation["eval_every"] == 1
    matched = report["matched"]
    assert [p["label"] for p in matched["configurations"]] == ["sum", "sago"]
    assert all(p["reached"] for p in matched["configurations"])
    assert [c["a"] + "/" + c["b"] for c in matched["comparisons"]] == ["sago/sum"]
    summary = (out / "summary.md").read_text()
    assert "## At matched forgetting" in summary and "| sago | sago | 2 | yes (step 2, 2) |" in summary
    assert "## Verdict" in summary and "- vs the configured sum: sago vs sum: utility" in summary
    assert "## Evaluation protocol" in summary
    assert (out / "matched.png").read_bytes().startswith(b"\x89PNG")
    # resuming the finished directory changes nothing and keeps the seeds
    again = run_experiment(None, out, resume=True)
    assert [r["name"] for r in again.runs] == names
