"""The ``tofu`` task: metadata, config checks, and prepare + run on the tiny model and fixture files."""

from __future__ import annotations

import json
import typing

import pytest

from retainfirst.config import DataConfig, EvalConfig, with_changes
from retainfirst.data.tofu import FORGET_SPLITS, TEMPLATES
from retainfirst.errors import RetainFirstError
from retainfirst.evals.results import EvalResult, save_results
from retainfirst.evals.tasks import get_task


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
    get_task("tofu").check_config(make_context(tofu_dir="elsewhere", data={"dir": None}).config)
    # Split and template are checked by the config itself, in both sections, naming the key.
    with pytest.raises(RetainFirstError, match=r"data\.tofu_split='forget02' is not valid"):
        make_context(data={"tofu_split": "forget02"})
    with pytest.raises(RetainFirstError, match=r"eval\.tofu_split='forget02' is not valid"):
        make_context(tofu_split="forget02")
    with pytest.raises(RetainFirstError, match=r"eval\.tofu_template='chatml' is not valid"):
        make_context(tofu_split="forget05", tofu_template="chatml")
    with pytest.raises(RetainFirstError, match=r"data\.tofu_template='chatml' is not valid"):
        make_context(data={"tofu_template": "chatml"})


def literal_choices(annotation):
    """The values of the Literal in a field's type (``Literal[...] | None`` included)."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return set().union(*(literal_choices(arg) for arg in typing.get_args(annotation)))


def test_the_config_offers_exactly_the_splits_and_templates_the_loader_knows():
    for section in (DataConfig, EvalConfig):
        assert literal_choices(section.model_fields["tofu_split"].annotation) == set(FORGET_SPLITS)
        assert literal_choices(section.model_fields["tofu_template"].annotation) == set(TEMPLATES)


def test_prepare_and_run_then_forget_quality_against_a_saved_retain_evaluation(
    make_context, model, byte_tokenizer, tmp_path
):
    # The split comes from the training data's section when eval names none.
    context = make_context(
        data={"dir": str(write_tofu(tmp_path / "tofu")), "tofu_split": "forget01"}, tofu_max_new_tokens=4
    )
    settings = context.config.eval
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
    settings = with_changes(settings, tofu_retain_results=str(saved))
    context.config = with_changes(context.config, eval=settings)
    again = {r.task: r for r in task.run(model, byte_tokenizer, task.prepare(context), settings)}
    assert again["tofu_forget_quality"].metrics == {"forget_quality": 1.0, "ks_statistic": 0.0}


def test_a_bad_reference_file_fails_in_prepare(make_context, tmp_path):
    folder = str(write_tofu(tmp_path / "tofu"))
    context = make_context(
        data={"dir": folder}, tofu_split="forget01", tofu_retain_results=str(tmp_path / "missing.json")
    )
    with pytest.raises(RetainFirstError, match="does not exist"):
        get_task("tofu").prepare(context)
    (tmp_path / "bad.json").write_text(json.dumps({"results": []}))
    context = make_context(
        data={"dir": folder}, tofu_split="forget01", tofu_retain_results=str(tmp_path / "bad.json")
    )
    with pytest.raises(RetainFirstError, match="no tofu_forget result"):
        get_task("tofu").prepare(context)
