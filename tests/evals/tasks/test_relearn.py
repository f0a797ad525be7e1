"""The ``relearn`` attack task: metadata, config checks, the held-out split on the facts benchmark,
and the recovered fraction checked exactly against an independent fine-tune."""

from __future__ import annotations

import copy
import json
import typing

import pytest
import torch

from retainfirst.config import EvalConfig
from retainfirst.errors import RetainFirstError
from retainfirst.evals.attacks.relearn import SPLITS, finetune
from retainfirst.evals.results import EvalResult
from retainfirst.evals.tasks import EvalTask, check_tasks, get_task, register_task, unregister_task

TEXTS = ["Doha is the capital of Qatar.", "Children in Latvia speak Latvian.", "Riga is in Latvia."]


def distance_score(model, original):
    """1 at the original weights, lower the further the Linear weights moved (float64, exact)."""
    moved = sum(
        float((module.weight.detach().double() - original[name].double()).pow(2).sum())
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    )
    return 1.0 / (1.0 + moved)


class DistanceForget(EvalTask):
    """A forget task whose score is how close the model still is to the one it was prepared with."""

    role = "forget"
    headline = "score"
    higher_is_better = False

    def prepare(self, context):
        return {
            n: m.weight.detach().clone()
            for n, m in context.model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }

    def run(self, model, tokenizer, data, settings):
        return [EvalResult(self.name, {"score": distance_score(model, data)}, 3)]


@pytest.fixture
def relearn():
    """The built-in task, with the test task registered only while a test runs (the registry tests
    list the built-ins exactly)."""
    register_task("distance_forget")(DistanceForget)
    yield get_task("relearn")
    unregister_task("distance_forget")


def unlearned_copy(model):
    copied = copy.deepcopy(model)
    with torch.no_grad():
        copied.model.layers[0].mlp.down_proj.weight.mul_(0.5)
    return copied


def test_metadata_is_diagnostic(relearn):
    keys = [(h.key, h.role, h.metric, h.higher_is_better) for h in relearn.headlines()]
    assert keys == [
        ("relearn", "diagnostic", "recovered", False),
        ("relearn_forget", "diagnostic", "after", False),
    ]
    assert relearn.headline_for(EvalResult("relearn", {}, 1)).key == "relearn"
    assert relearn.headline_for(EvalResult("relearn_forget", {}, 1)).key == "relearn_forget"
    assert relearn.headline_for(EvalResult("relearn/forget_qa", {}, 1)) is None
    assert get_task("facts").headline_for(EvalResult("relearn/forget_qa", {}, 1)) is None


def test_config_checks(relearn, make_context):
    # The config runs check_tasks when it is built, so a bad setting never makes a config.
    with pytest.raises(RetainFirstError, match=r"re-runs the forget tasks, but eval\.tasks has none"):
        make_context(tasks=["mmlu", "relearn"])
    context = make_context(tasks=["facts", "relearn"])
    check_tasks(context.config)
    assert relearn.sources(context.config) == {"facts"}
    for options, message in [
        ({"relearn_steps": 0}, r"^config: eval\.relearn_steps=0 must be an integer >= 1$"),
        ({"relearn_lr": 0.0}, r"^config: eval\.relearn_lr=0\.0 must be > 0$"),
        ({"relearn_split": "facts"}, r"^config: eval\.relearn_split='facts' is not valid"),
        ({"relearn_fraction": 0.0}, r"^config: eval\.relearn_fraction=0\.0 must be in \(0, 1\]$"),
        ({"relearn_fraction": 1.5}, r"^config: eval\.relearn_fraction=1\.5 must be in \(0, 1\]$"),
        ({"relearn_fraction": 1.0}, r"relearn_fraction must be in \(0, 1\) with relearn_split=targets"),
        ({"relearn_texts": " "}, r"relearn_texts must be a file name or null"),
        ({"relearn_tasks": ["mmlu"]}, "lists 'mmlu', which has no forget number"),
    ]:
        with pytest.raises(RetainFirstError, match=message):
            make_context(tasks=["facts", "relearn"], **options)
    # All of them, and every passage, with relearn_split=passages.
    make_context(tasks=["facts", "relearn"], relearn_split="passages", relearn_fraction=1.0)


def test_the_config_offers_exactly_the_attack_splits():
    assert set(typing.get_args(EvalConfig.model_fields["relearn_split"].annotation)) == set(SPLITS)


def test_recovered_fraction_is_exact_and_the_before_model_is_not_attacked(
    relearn, make_context, model, byte_tokenizer
):
    options = {"relearn_split": "passages", "relearn_fraction": 1.0, "relearn_steps": 3, "relearn_lr": 1e-2}
    context = make_context(tasks=["distance_forget", "relearn"], training=True, forget=TEXTS, **options)
    check_tasks(context.config)
    data = relearn.prepare(context)
    assert data.reference_score == 1.0  # measured on the original model when prepared
    assert relearn.run(model, byte_tokenizer, data, context.config.eval) == []  # the "before" row
    unlearned = unlearned_copy(model)
    results = relearn.run(unlearned, byte_tokenizer, data, context.config.eval)

    original = DistanceForget().prepare(context)
    attacked = copy.deepcopy(unlearned)
    losses = finetune(
        attacked, data.extra["examples"], byte_tokenizer.pad_token_id, steps=3, lr=1e-2, batch_size=4, seed=0
    )
    after, now = distance_score(attacked, original), distance_score(unlearned, original)
    assert len(data.extra["examples"]) == len(TEXTS)
    by_name = {r.task: r for r in results}
    assert list(by_name) == ["relearn/distance_forget", "relearn_forget", "relearn"]
    assert by_name["relearn/distance_forget"].metrics == {"score": after}
    assert by_name["relearn_forget"].metrics == {"after": after, "unlearned": now, "before": 1.0}
    assert by_name["relearn"].metrics == {"recovered": (after - now) / (1.0 - now)}
    assert by_name["relearn"].settings["losses"] == losses
    assert by_name["relearn"].settings["steps"] == 3

    # The attack is a diagnostic: the forget score of the run is still the inner task's own number.
    from retainfirst.report.scores import summarize_run

    own = EvalResult("distance_forget", {"score": now}, 3)
    row = summarize_run("sago", "sago", {}, [own, *results], tasks=[DistanceForget(), relearn])
    assert row.forget_score == now
    assert row.metrics["relearn"] == by_name["relearn"].metrics["recovered"]


def test_without_the_model_before_unlearning_only_absolute_scores_are_reported(
    relearn, make_context, model, byte_tokenizer
):
    context = make_context(
        tasks=["distance_forget", "relearn"], forget=TEXTS, relearn_split="passages", relearn_steps=1
    )
    data = relearn.prepare(context)
    assert data.reference is None
    results = {r.task: r for r in relearn.run(model, byte_tokenizer, data, context.config.eval)}
    assert set(results["relearn_forget"].metrics) == {"after", "unlearned"}
    assert results["relearn"].metrics == {}


def test_targets_split_relearns_some_facts_and_scores_only_the_others(
    relearn, make_context, model, byte_tokenizer, tiny_bench, tmp_path
):
    context = make_context(tasks=["facts", "relearn"], training=True, relearn_steps=2)
    context.workdir = tmp_path
    context.forget_texts = list(tiny_bench.forget_corpus)
    data = relearn.prepare(context)
    record = data.extra["record"]
    targets = {p.target for p in tiny_bench.probes["forget_qa"]}
    assert sorted(record["relearned_targets"] + record["evaluated_targets"]) == sorted(targets)
    evaluated = set(record["evaluated_targets"])
    probes = data.data["facts"]["probes"]
    assert list(probes) == ["forget_fb", "forget_qa", "forget_aa"]  # neighbours are not re-run
    assert all(p.target in evaluated for family in probes.values() for p in family)
    saved = json.loads((tmp_path / "relearn_texts.json").read_text())
    assert saved["relearn_texts"] and saved["evaluated_targets"] == record["evaluated_targets"]
    answers = {p.answer for p in tiny_bench.probes["forget_qa"] if p.target in evaluated}
    for text in saved["relearn_texts"]:
        assert not any(name in text for name in evaluated | answers)
        assert any(name in text for name in record["relearned_targets"])
    assert set(data.reference) == {"forget"}

    results = relearn.run(unlearned_copy(model), byte_tokenizer, data, context.config.eval)
    names = [r.task for r in results]
    assert names == [
        "relearn/forget_fb",
        "relearn/forget_qa",
        "relearn/forget_aa",
        "relearn_forget",
        "relearn",
    ]
    # Every probe of the evaluated targets is scored (a fact has several paraphrased probes per level).
    expected = {name: sum(p.target in evaluated for p in tiny_bench.probes[name]) for name in probes}
    assert [r.n for r in results[:3]] == [expected[name] for name in probes]
    assert all(n >= len(evaluated) for n in expected.values())
    assert relearn.describe(data).startswith("2 steps on ")


def test_targets_split_needs_probe_targets(relearn, make_context):
    context = make_context(tasks=["distance_forget", "relearn"], forget=TEXTS)
    with pytest.raises(RetainFirstError, match="at least 2 forget targets"):
        relearn.prepare(context)
    context = make_context(tasks=["distance_forget", "relearn"], relearn_split="passages")
    with pytest.raises(RetainFirstError, match="needs forget-related text"):
        relearn.prepare(context)


def test_relearn_texts_file_replaces_the_forget_corpus(relearn, make_context):
    context = make_context(
        tasks=["distance_forget", "relearn"],
        forget=TEXTS,
        relearn_split="passages",
        relearn_fraction=1.0,
        relearn_texts="general.txt",
    )
    data = relearn.prepare(context)
    expected = context.load_texts("general.txt")
    assert data.options["texts_file"] == "general.txt"
    assert data.extra["record"]["texts"] == len(expected) != len(TEXTS)
