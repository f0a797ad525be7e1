"""The task registry: names, parametrised tasks, registration rules and config checks."""

from __future__ import annotations

import pytest

from retainfirst.config import DataConfig, EvalConfig, RunConfig
from retainfirst.errors import RetainFirstError
from retainfirst.evals.tasks import (
    EvalTask,
    Headline,
    available_tasks,
    check_tasks,
    get_task,
    register_task,
    unregister_task,
)


def test_available_tasks_lists_the_built_ins():
    assert available_tasks() == [
        "facts",
        "lm_eval:<task>",
        "mia",
        "mmlu",
        "muse",
        "perplexity",
        "quantize",
        "relearn",
        "rwku",
        "tofu",
        "wmdp_bio",
        "wmdp_cyber",
    ]


def test_get_task_by_name_and_with_a_parameter():
    assert get_task("mmlu").id == "mmlu"
    bridge = get_task("lm_eval:arc_easy")
    assert (bridge.name, bridge.param, bridge.id) == ("lm_eval", "arc_easy", "lm_eval:arc_easy")
    with pytest.raises(RetainFirstError, match="'wat' is not valid; choose one of facts, lm_eval:<task>"):
        get_task("wat")
    with pytest.raises(RetainFirstError, match="needs a task name after lm_eval:"):
        get_task("lm_eval:")
    with pytest.raises(RetainFirstError, match="takes no parameter"):
        get_task("mmlu:x")


def test_registering_a_taken_name_or_a_non_task_fails():
    with pytest.raises(RetainFirstError, match="already registered"):

        @register_task("mmlu")
        class Other(EvalTask):
            role = "utility"
            headline = "acc"
            higher_is_better = True

    with pytest.raises(RetainFirstError, match="must decorate an EvalTask"):
        register_task("thing")(object)
    assert "thing" not in available_tasks()


def test_a_forget_number_must_be_lower_is_better():
    with pytest.raises(ValueError, match="lower-is-better"):
        Headline("x", "forget", "acc", higher_is_better=True)
    with pytest.raises(ValueError, match="role"):
        Headline("x", "kept", "acc", higher_is_better=True)


def test_registered_task_is_listed_until_unregistered():
    @register_task("probe_count")
    class ProbeCount(EvalTask):
        role = "diagnostic"
        headline = "n"
        higher_is_better = True

    try:
        assert "probe_count" in available_tasks()
        assert isinstance(get_task("probe_count"), ProbeCount)
    finally:
        unregister_task("probe_count")
    assert "probe_count" not in available_tasks()


def _config(tasks, data_dir=None):
    return RunConfig(synthesizers=[], data=DataConfig(dir=data_dir), eval=EvalConfig(tasks=tasks))


def test_check_tasks_names_the_bad_entry_and_missing_data():
    check_tasks(_config(["facts", "mmlu", "lm_eval:arc_easy"]))
    with pytest.raises(RetainFirstError, match=r"config: eval.tasks\[1\]='wat' is not valid"):
        check_tasks(_config(["mmlu", "wat"]))
    with pytest.raises(RetainFirstError, match="lists 'mmlu' twice"):
        check_tasks(_config(["mmlu", "mmlu"]))
    for task in ("wmdp_bio", "wmdp_cyber", "rwku"):
        with pytest.raises(RetainFirstError, match=f"eval task {task} needs data.dir"):
            check_tasks(_config([task]))
        check_tasks(_config([task], data_dir="somewhere"))
