from __future__ import annotations

from retainfirst.evals.tasks import get_task


def test_loads_cyber_questions_and_runs_with_wmdp_shots(make_context, model, byte_tokenizer):
    task = get_task("wmdp_cyber")
    context = make_context(wmdp_shots=1)
    questions = task.prepare(context)
    assert len(questions) == 3 and {q.subject for q in questions} == {"cybersecurity"}
    [result] = task.run(model, byte_tokenizer, questions, context.config.eval)
    assert (result.task, result.n, result.settings["shots"]) == ("wmdp_cyber", 3, 1)
