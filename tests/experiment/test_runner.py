"""run_experiment / evaluate_model from Python (no CLI) on a tiny model: outputs, resume, data checks."""

from __future__ import annotations

import json
import math

import pytest
import torch

import retainfirst.engine as engine
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, register_task, unregister_task
from retainfirst.experiment import evaluate_model, run_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_run_experiment_writes_the_report(tiny_config, tmp_path, capsys):
    out = tmp_path / "out"
    result = run_experiment(tiny_config(), out)
    assert result.out_dir == out and result.state == "done"
    assert result.report == json.loads((out / "results.json").read_text())
    assert result.status == json.loads((out / "status.json").read_text())
    assert [r["name"] for r in result.runs] == ["sum", "sago"]
    assert result.report["before"]["metrics"]["ppl"] > 1.0
    assert all(set(r["recovery"]) == {"ppl"} and math.isfinite(r["utility"]) for r in result.runs)
    for name in ("config.yaml", "metrics.jsonl", "summary.md"):
        assert (out / name).is_file()
    for name in ("pareto.png", "training_curves.png", "cos_vs_recovery.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)
    assert (
        "No forget score was measured (evaluate facts or muse or rwku or tofu or wmdp_bio or wmdp_cyber"
        in (result.report["comparison"]["verdict"])
    )
    assert "report written to" in capsys.readouterr().out


def test_resume_after_a_crash_and_config_mismatch(tiny_config, tmp_path, monkeypatch):
    real = engine.unlearn
    calls = []

    def crash_on_sago(model, tokenizer, forget, retain, config, out_dir, resume=False):
        calls.append((config.synthesizer, resume))
        if config.synthesizer == "sago" and not resume:
            raise RuntimeError("simulated crash")
        return real(model, tokenizer, forget, retain, config, out_dir, resume=resume)

    monkeypatch.setattr(engine, "unlearn", crash_on_sago)
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(), out)
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["runs"]["sago"]["error"]) == ("failed", "RuntimeError: simulated crash")
    with pytest.raises(RetainFirstError, match=r"these settings differ: train\.steps"):
        run_experiment(tiny_config("train.steps=5"), out, resume=True)
    with pytest.raises(RetainFirstError, match="exclude each other"):
        run_experiment(None, out, resume=True, overwrite=True)
    result = run_experiment(None, out, resume=True)
    assert calls == [("sum", False), ("sago", False), ("sago", True)]
    assert result.state == "done" and "error" not in result.status
    assert [r["name"] for r in result.runs] == ["sum", "sago"]


def test_sweep_grid_from_python(tiny_config, tmp_path):
    result = run_experiment(tiny_config("synthesizers=[sum]"), tmp_path / "sw", grid=["alpha=0.5,1"])
    assert [r["name"] for r in result.runs] == ["sum-alpha0.5", "sum-alpha1"]
    assert result.status["command"] == "sweep" and result.status["grid"] == ["alpha=0.5,1"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        # documents kept whole (pack=false) are 16 tokens; the engine allows 8
        (["data.pack=false", "train.max_length=8"], "forget example 0 has 16 tokens but at most 8 fit"),
        # a 600-byte document kept whole is longer than the tiny model's 512 positions
        (
            ["data.pack=false", "data.max_length=4096", "data.forget=long.jsonl"],
            "has 6.. tokens but at most 512",
        ),
    ],
)
def test_unusable_training_data_fails_before_any_evaluation(
    tiny_config, tmp_path, monkeypatch, overrides, message
):
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": "x" * 600}) + "\n")
    evaluated = []
    monkeypatch.setattr(
        "retainfirst.evals.tasks.perplexity.PerplexityTask.run", lambda *a, **k: evaluated.append(a) or []
    )
    out = tmp_path / "long"
    with pytest.raises(RetainFirstError, match=message):
        run_experiment(tiny_config(*overrides), out)
    assert evaluated == []  # rejected before the "before" evaluation
    assert not out.exists()  # and nothing is left behind


def test_evaluate_model_writes_results(tiny_config, tmp_path):
    config = tiny_config("eval.tasks=[perplexity,mmlu]", "eval.mmlu_limit=2")
    results = evaluate_model(config, tmp_path / "ev", extra={"note": "x"}, show=False)
    assert [r.task for r in results] == ["perplexity", "mmlu"]
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert saved["note"] == "x" and [r["task"] for r in saved["results"]] == ["perplexity", "mmlu"]


@pytest.fixture
def weight_norm_task(monkeypatch):
    """A task defined in one place (as a new evals/tasks/ module would be): the mean absolute weight."""

    @register_task("weight_norm")
    class WeightNormTask(EvalTask):
        role = "utility"
        headline = "mean_abs_weight"
        higher_is_better = True
        label = "|w|"
        description = "mean absolute weight of the model"

        def prepare(self, context):
            return list(context.retain_texts)  # shows the context hands tasks the training texts

        def run(self, model, tokenizer, data, settings):
            weights = torch.cat([p.detach().abs().flatten().double() for p in model.parameters()])
            return [EvalResult(self.id, {"mean_abs_weight": float(weights.mean())}, n=len(data))]

    yield WeightNormTask
    unregister_task("weight_norm")


def test_a_registered_task_reaches_results_and_report(weight_norm_task, tiny_config, tmp_path):
    out = tmp_path / "plugin"
    result = run_experiment(tiny_config("eval.tasks=[perplexity,weight_norm]"), out)
    before = result.report["before"]
    assert [r["task"] for r in before["results"]] == ["perplexity", "weight_norm"]
    assert before["results"][1]["n"] == 4  # the four retain documents
    for run in result.runs:
        expected = 100.0 * run["metrics"]["weight_norm"] / before["metrics"]["weight_norm"]
        assert run["recovery"]["weight_norm"] == pytest.approx(expected, rel=1e-12)
        assert run["utility"] == pytest.approx((run["recovery"]["ppl"] + expected) / 2, rel=1e-12)
    summary = (out / "summary.md").read_text()
    assert "| |w| ↑ |" in summary and "rec. |w| %" in summary
    assert "- **|w|**: mean absolute weight of the model." in summary
