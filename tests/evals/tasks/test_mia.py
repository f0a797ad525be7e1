from __future__ import annotations

import pytest

from retainfirst.errors import RetainFirstError
from retainfirst.evals.tasks import get_task


def test_metadata_is_a_diagnostic():
    task = get_task("mia")
    assert (task.role, task.headline, task.higher_is_better) == ("diagnostic", "auc_loss", False)


def test_uses_training_texts_and_runs(make_context, model, byte_tokenizer):
    task = get_task("mia")
    context = make_context(
        training=True, forget=["secret one", "secret two"], retain=["public a", "public b"]
    )
    data = task.prepare(context)
    assert (data["forget"], data["retain"], data["max_length"]) == (
        ["secret one", "secret two"],
        ["public a", "public b"],
        context.config.data.max_length,
    )
    [result] = task.run(model, byte_tokenizer, data, context.config.eval)
    assert result.task == "mia" and result.n == 4 and 0.0 <= result.metrics["auc_loss"] <= 1.0


def test_without_training_data_or_rwku_is_an_error(make_context):
    with pytest.raises(RetainFirstError, match="needs training data"):
        get_task("mia").prepare(make_context())


def test_prefers_rwku_mia_sets(make_context):
    class FakeRwku:
        def texts(self, kind):
            return [kind]

    context = make_context(forget=["f"], retain=["r"])
    context.builders = {"rwku": lambda c: FakeRwku()}
    context.wanted.add("rwku")
    data = get_task("mia").prepare(context)
    assert (data["forget"], data["retain"]) == (["mia_forget"], ["mia_retain"])
