from __future__ import annotations

from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import get_task


def test_parametrised_metadata():
    task = get_task("lm_eval:arc_easy")
    assert (task.role, task.headline, task.higher_is_better) == ("diagnostic", "acc", True)
    [headline] = task.headlines()
    assert (headline.key, headline.role) == ("lm_eval:arc_easy", "diagnostic")
    assert task.headline_for(EvalResult("arc_easy", {"acc": 0.5}, 4)) == headline
    assert task.headline_for(EvalResult("arc_challenge", {"acc": 0.5}, 4)) is None


def test_runs_the_harness_task_with_the_limit(make_context, model, byte_tokenizer, monkeypatch):
    calls = []

    def fake_run_lm_eval(model_, tokenizer, tasks, limit=None, allow_code=False):
        calls.append((model_, tokenizer, tasks, limit, allow_code))
        return [EvalResult(tasks[0], {"acc": 0.25}, 4)]

    monkeypatch.setattr("retainfirst.evals.lm_eval_bridge.run_lm_eval", fake_run_lm_eval)
    task = get_task("lm_eval:rf_tiny")
    context = make_context(lm_eval_limit=4)
    data = task.prepare(context)
    [result] = task.run(model, byte_tokenizer, data, context.config.eval)
    assert calls == [(model, byte_tokenizer, ["rf_tiny"], 4, False)]  # local task code refused by default
    assert result.task == "rf_tiny" and task.describe(data) == "harness task rf_tiny (limit 4)"
