"""The ``muse`` task: metadata, config checks, and prepare + run on the tiny model and fixture files."""

from __future__ import annotations

import json
import typing

import pytest

from retainfirst.config import EvalConfig, with_changes
from retainfirst.errors import RetainFirstError
from retainfirst.evals.muse import PUBLISHED_RETRAIN_AUC
from retainfirst.evals.results import EvalResult, save_results
from retainfirst.evals.tasks import get_task


def write_muse(root):
    """MUSE's own JSON layout (data/<corpus>/<config>/<split>.json)."""
    for config in ("verbmem", "knowmem", "privleak"):
        (root / config).mkdir(parents=True)
    (root / "verbmem" / "forget.json").write_text(
        json.dumps([{"prompt": "Once upon a", "gt": " time there was"}])
    )
    qa = [{"question": "Who wrote it?", "answer": "Ann"}, {"question": "Where?", "answer": "Rome"}]
    for split in ("forget_qa", "forget_qa_icl", "retain_qa", "retain_qa_icl"):
        (root / "knowmem" / f"{split}.json").write_text(json.dumps(qa))
    for split in ("forget", "holdout", "retain"):
        texts = [f"The {split} text number {i} is here." for i in range(3)]
        (root / "privleak" / f"{split}.json").write_text(json.dumps(texts))
    return root


def test_metadata():
    task = get_task("muse")
    heads = {h.key: h for h in task.headlines()}
    assert [h.role for h in heads.values()] == ["forget", "forget", "utility", "diagnostic"]
    assert all(not h.higher_is_better for h in heads.values() if h.role == "forget")
    assert task.headline_for(EvalResult("muse_knowmem_retain", {}, 1)).key == "muse_knowmem_retain"
    assert task.headline_for(EvalResult("muse_privleak", {}, 1)).metric == "privleak_abs"
    assert task.headline_for(EvalResult("mia", {}, 1)) is None


def test_check_config(make_context):
    with pytest.raises(RetainFirstError, match=r"muse needs data.dir or eval.muse_dir"):
        get_task("muse").check_config(make_context(data={"dir": None}).config)
    get_task("muse").check_config(make_context(muse_dir="elsewhere", data={"dir": None}).config)
    with pytest.raises(
        RetainFirstError, match=r"^config: eval\.muse_corpus='papers' is not valid; choose one of"
    ):
        make_context(muse_corpus="papers")  # the config itself knows the two corpora


def test_the_config_offers_exactly_the_corpora_with_a_published_retrain_auc():
    corpus = EvalConfig.model_fields["muse_corpus"].annotation
    assert set(typing.get_args(typing.get_args(corpus)[0])) == set(PUBLISHED_RETRAIN_AUC)
    assert type(None) in typing.get_args(corpus)  # none: PrivLeak needs eval.muse_retrain_results


def test_prepare_and_run_with_published_then_saved_retrain_auc(make_context, model, byte_tokenizer, tmp_path):
    context = make_context(data={"dir": str(write_muse(tmp_path / "news"))}, muse_corpus="news")
    settings = context.config.eval
    task = get_task("muse")
    data = task.prepare(context)
    results = {r.task: r for r in task.run(model, byte_tokenizer, data, settings)}
    assert list(results) == [
        "muse_verbmem_forget",
        "muse_knowmem_forget",
        "muse_knowmem_retain",
        "muse_privleak",
    ]
    assert results["muse_knowmem_retain"].settings["icl_examples"] == 2
    leak = results["muse_privleak"].metrics
    assert leak["retrain_auc"] == PUBLISHED_RETRAIN_AUC["news"]
    assert leak["privleak"] == pytest.approx((leak["auc"] - leak["retrain_auc"]) / leak["retrain_auc"] * 100)
    assert leak["privleak_abs"] == abs(leak["privleak"])

    # The same model as the retrained one: PrivLeak 0.
    saved = save_results(list(results.values()), tmp_path / "retrain" / "results.json")
    settings = with_changes(settings, muse_retrain_results=str(saved))
    context.config = with_changes(context.config, eval=settings)
    again = {r.task: r for r in task.run(model, byte_tokenizer, task.prepare(context), settings)}
    assert again["muse_privleak"].metrics["privleak"] == 0.0


def test_without_a_retrain_auc_privleak_is_null(make_context, model, byte_tokenizer, tmp_path):
    context = make_context(data={"dir": str(write_muse(tmp_path / "news"))})
    task = get_task("muse")
    data = task.prepare(context)
    data["data"].knowmem_forget = data["data"].knowmem_retain = []
    results = {r.task: r for r in task.run(model, byte_tokenizer, data, context.config.eval)}
    assert list(results) == ["muse_verbmem_forget", "muse_privleak"]
    assert results["muse_privleak"].metrics["privleak"] is None
    assert "PrivLeak not computed" in results["muse_privleak"].settings["retrain_auc_source"]
