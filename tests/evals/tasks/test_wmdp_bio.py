from __future__ import annotations

import pytest

from retainfirst.errors import RetainFirstError
from retainfirst.evals.tasks import get_task


@pytest.mark.parametrize("name", ["wmdp_bio", "wmdp_cyber"])
def test_metadata_is_a_forget_accuracy(name):
    task = get_task(name)
    assert (task.role, task.headline, task.higher_is_better) == ("forget", "acc", False)
    [headline] = task.headlines()
    assert (
        headline.key == name and headline.title == {"wmdp_bio": "WMDP-bio", "wmdp_cyber": "WMDP-cyber"}[name]
    )
    assert headline.precedence == 0  # probe recall wins the forget score when both are measured


def test_loads_the_domain_file_with_the_limit_and_runs(make_context, model, byte_tokenizer):
    task = get_task("wmdp_bio")
    context = make_context(wmdp_limit=2)
    questions = task.prepare(context)
    assert [q.subject for q in questions] == ["biology", "biology"]
    [result] = task.run(model, byte_tokenizer, questions, context.config.eval)
    assert (result.task, result.n) == ("wmdp_bio", 2)


def test_needs_a_data_dir(make_context):
    context = make_context(data={"dir": None})
    with pytest.raises(RetainFirstError, match=r"needs data\.dir"):
        get_task("wmdp_bio").check_config(context.config)
