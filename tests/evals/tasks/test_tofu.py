"""The ``tofu`` task: metadata, config checks, and prepare + run on the tiny model and fixture files."""

from __future__ import annotations

import json

import pytest

from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult, save_results
from retainfirst.evals.tasks import available_tasks, get_task, register_task, unregister_task


@pytest.fixture(autouse=True, scope="module")
def registered():
    """Register the task for these tests only (other tests see exactly the built-in tasks)."""
    was_registered = "tofu" in available_tasks()
    from retainfirst.evals.tasks.tofu import TofuTask

    register_task("tofu")(TofuTask)
    yield
    if not was_registered:
        unregister_task("tofu")


def write_tofu(root):
    """The four ``_perturbed`` configs of forget01 in the hub's file layout (JSON Lines named .json)."""
    root.mkdir()

    def lines(name, records):
        (root / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in records))

    lines(
        "forget01_perturbed",
        [
            {
                "question": f"Who is author {i}?",
                "answer": f"Author {i} writes",
                "paraphrased_answer": f"Writer {i}",
                "perturbed_answer": [f"Cook {i}", f"Pilot {i}"],
            }
            for i in range(4)
        ],
    )
    lines(
        "retain_perturbed",
        [
            {
                "question": "Where?",
                "answer": "Here",
                "paraphrased_answer": "Just here",
                "perturbed_answer": ["There"],
            }
        ],
    )
    lines(
        "real_authors_perturbed",
        [{"question": "Hamlet?", "answer": "Shakespeare", "perturbed_answer": ["Dickens"]}],
    )
    lines(
        "world_facts_perturbed",
        [{"question": "France?", "answer": "Paris", "perturbed_answer": ["Rome", "Oslo"]}],
    )
    return root


def test_metadata():
    task = get_task("tofu")
    keys = {h.key: h for h in task.headlines()}
    assert list(keys) == ["tofu_forget", "tofu_model_utility", "tofu_forget_quality"]
    assert keys["tofu_forget"].role == "forget" and not keys["tofu_forget"].higher_is_better
    assert keys["tofu_model_utility"].role == "utility" and keys["tofu_model_utility"].higher_is_better
    assert keys["tofu_forget_quality"].role == "diagnostic"
    assert task.headline_for(EvalResult("tofu_forget_quality", {}, 1)).key == "tofu_forget_quality"
    assert task.headline_for(EvalResult("tofu_retain", {}, 1)) is None
    assert task.headline_for(EvalResult("forget_qa", {}, 1)) is None


def test_check_config_names_the_missing_setting(make_context):
    context = make_context(data={"dir": None})
    with pytest.raises(RetainFirstError, match=r"tofu needs data.dir or eval.tofu_dir"):
        get_task("tofu").check_config(context.config)
    context = make_context()
    context.config.data.tofu_split = "forget02"  # the training data's split, when eval names none
    with pytest.raises(RetainFirstError, match="TOFU split 'forget02'"):
        get_task("tofu").check_config(context.config)
    context.config.eval.tofu_split, context.config.eval.tofu_template = "forget05", "chatml"
    with pytest.raises(RetainFirstError, match="TOFU template 'chatml'"):
        get_task("tofu").check_config(context.config)


def test_prepare_and_run_then_forget_quality_against_a_saved_retain_evaluation(
    make_context, model, byte_tokenizer, tmp_path
):
    context = make_context(data={"dir": str(write_tofu(tmp_path / "tofu"))})
    settings = context.config.eval
    context.config.data.tofu_split, settings.tofu_max_new_tokens = "forget01", 4
    task = get_task("tofu")
    data = task.prepare(context)
    assert task.describe(data) == "forget 4, retain 1, real_authors 1, world_facts 1 questions"
    results = task.run(model, byte_tokenizer, data, settings)
    by_task = {r.task: r for r in results}
    assert by_task["tofu_forget"].n == 4
    for name in ("tofu_forget", "tofu_retain", "tofu_real_authors", "tofu_world_facts"):
        metrics = by_task[name].metrics
        assert 0 < metrics["prob"] < 1 and 0 <= metrics["rougeL_recall"] <= 1 and metrics["truth_ratio"] >= 0
    assert 0 <= by_task["tofu_model_utility"].metrics["model_utility"] <= 1
    assert by_task["tofu_forget_quality"].metrics["forget_quality"] is None
    assert "tofu_retain_results" in by_task["tofu_forget_quality"].settings["note"]

    # The same model as its own "retain model": identical distributions, KS statistic 0, p-value 1.
    saved = save_results(results, tmp_path / "retain" / "results.json", extra={"model": "retain"})
    settings.tofu_retain_results = str(saved)
    again = {r.task: r for r in task.run(model, byte_tokenizer, task.prepare(context), settings)}
    assert again["tofu_forget_quality"].metrics == {"forget_quality": 1.0, "ks_statistic": 0.0}


def test_a_bad_reference_file_fails_in_prepare(make_context, tmp_path):
    context = make_context(data={"dir": str(write_tofu(tmp_path / "tofu"))})
    context.config.eval.tofu_split = "forget01"
    context.config.eval.tofu_retain_results = str(tmp_path / "missing.json")
    with pytest.raises(RetainFirstError, match="does not exist"):
        get_task("tofu").prepare(context)
    (tmp_path / "bad.json").write_text(json.dumps({"results": []}))
    context.config.eval.tofu_retain_results = str(tmp_path / "bad.json")
    with pytest.raises(RetainFirstError, match="no tofu_forget result"):
        get_task("tofu").prepare(context)
